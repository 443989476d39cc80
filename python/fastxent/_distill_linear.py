"""Distillation losses from hidden states and head weights: the losses of
:func:`fastxent.kl_div_with_logits` / :func:`fastxent.jsd_with_logits` between the student's
logits ``hs @ Ws.T + bs`` and the teacher's ``ht @ Wt.T + bt``, with the student's gradients
with respect to hs, Ws and bs, without ever holding the N x V logits.

The tiling is fastxent._linear's (the same row-tile size helper): per tile of rows,

- ``Zs = hs[tile] @ Ws.T (+ bs)`` and ``Zt = ht[tile] @ Wt.T (+ bt)`` into two reused tile
  buffers (the backend's matmul: NumPy's BLAS here, torch.mm in fastxent.torch);
- the dense distillation kernel (``_core.distill``, the one under kl_div_with_logits) turns
  ``Zs`` in place into the tile's student gradient G, with reduction "none" and row weights
  pre-divided by the whole batch's "mean" denominator (as fastxent._distill_sparse does), its
  float64 row losses written into their slots;
- ``grad_hs[tile] = G @ Ws``, ``grad_Ws += G.T @ hs[tile]``, ``grad_bs += G.sum(0)``.

The loss is the float64 sum of the row losses in row order: independent of the tile size and
of the thread count. The kernel's gradient is bitwise independent of its thread count; the
weight and bias gradients are summed across tiles (their rounding depends on the tile size
and on the BLAS).

The teacher's head is taken as frozen: no gradient flows to ht, Wt or bt (the torch wrapper
refuses teacher tensors that require grad). float32, float64, float16 and bfloat16: 16-bit
inputs are multiplied in float32 by NumPy (float32 copies of the weights and biases; NumPy has
no 16-bit BLAS), natively by a backend with a 16-bit matmul (PyTorch: 16-bit tiles, the
kernel computing in float32 and rounding G once, grad_weight accumulated by the BLAS and
rounded per tile, grad_bias summed in float32). The loss is float32 for 16-bit inputs.
Everything is checked before the first matmul.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from . import _core
from ._distill import _beta, _direction, _row_weight, _temperature
from ._linear_plan import tile_rows as _tile_rows
from ._options import half_kind, reduction_code, threads, to_numpy

__all__ = [
    "linear_kl_div",
    "linear_kl_div_with_grad",
    "linear_jsd",
    "linear_jsd_with_grad",
]

# Bytes of the vocabulary chunks through which grad_weight is accumulated (NumPy's matmul
# cannot add into its output): as fastxent._linear.
CHUNK_BYTES = 1 << 20


class NumpyOps:
    """The matmuls of the tile loop on NumPy arrays (NumPy's BLAS). No 16-bit matmul
    (half = False): run() multiplies 16-bit inputs in float32."""

    half = False

    @staticmethod
    def mm(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        """out = a @ b."""
        np.matmul(a, b, out=out)

    @staticmethod
    def mm_bias(a: np.ndarray, b: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
        """out = a @ b + bias."""
        np.matmul(a, b, out=out)
        np.add(out, bias, out=out)

    @staticmethod
    def col_sum(g: np.ndarray, acc: np.ndarray) -> None:
        """acc += g summed over its rows (acc: float32 for 16-bit g)."""
        acc += g.sum(axis=0, dtype=acc.dtype)

    @staticmethod
    def mm_add(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        """out += a @ b, through vocabulary chunks (no V x H temporary)."""
        v, h = out.shape
        chunk = max(1, CHUNK_BYTES // max(1, h * out.itemsize))
        tmp = np.empty((min(chunk, v), h), out.dtype)
        for v0 in range(0, v, chunk):
            v1 = min(v, v0 + chunk)
            t = tmp[: v1 - v0]
            np.matmul(a[v0:v1], b, out=t)
            np.add(out[v0:v1], t, out=out[v0:v1])


def check_dtype(a: Any, name: str) -> Any:
    """a itself when its dtype is float32, float64, float16 or bfloat16 (a: any array with a
    NumPy dtype, the front end's own); anything else a TypeError."""
    if half_kind(np.dtype(a.dtype)) is None and a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {a.dtype}")
    return a


def _array(v: Any, name: str) -> np.ndarray:
    return check_dtype(to_numpy(v, name), name)


def check_inputs(
    hs: Any,
    ws: Any,
    ht: Any,
    wt: Any,
    bs: Any,
    bt: Any,
    as_array: Callable[[Any, str], Any] = _array,
) -> Tuple[Any, ...]:
    """The six arrays as the front end's arrays (biases None when not given), checked: dtypes
    (all that of student_hidden), shapes (equal leading shapes, weights (V, H_s) / (V, H_t),
    the same V, biases (V,)). as_array(v, name): the front end's array, its dtype checked by
    check_dtype (default: NumPy arrays over v's memory)."""
    s_h = as_array(hs, "student_hidden")
    dt = s_h.dtype
    arrs: Dict[str, Any] = {"student_hidden": s_h}
    for name, v in (
        ("student_weight", ws),
        ("teacher_hidden", ht),
        ("teacher_weight", wt),
        ("student_bias", bs),
        ("teacher_bias", bt),
    ):
        if v is None:
            if name.endswith("bias"):
                arrs[name] = None
                continue
            raise TypeError(f"{name} is required")
        a = as_array(v, name)
        if a.dtype != dt:
            raise TypeError(f"{name} has dtype {a.dtype}, expected {dt} (student_hidden's dtype)")
        arrs[name] = a
    s_h, s_w, t_h, t_w = (arrs[k] for k in ("student_hidden", "student_weight",
                                              "teacher_hidden", "teacher_weight"))  # fmt: skip
    for name, h in (("student_hidden", s_h), ("teacher_hidden", t_h)):
        if h.ndim == 0:
            raise ValueError(f"{name} must have at least one dimension (the hidden axis)")
    if s_h.shape[:-1] != t_h.shape[:-1]:
        raise ValueError(
            f"student_hidden has shape {s_h.shape} and teacher_hidden {t_h.shape}: their "
            "leading shapes (the rows) must be equal"
        )
    for name, w, h, hn in (
        ("student_weight", s_w, s_h, "student_hidden"),
        ("teacher_weight", t_w, t_h, "teacher_hidden"),
    ):
        if w.ndim != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(
                f"{name} has shape {w.shape}, expected (V, {h.shape[-1]}) "
                f"({hn}'s last axis is {h.shape[-1]})"
            )
    v = s_w.shape[0]
    if t_w.shape[0] != v:
        raise ValueError(
            f"student_weight has V = {v} rows and teacher_weight {t_w.shape[0]}: the "
            "student and the teacher must share the vocabulary"
        )
    if v == 0:
        raise ValueError("the weights have no rows (V = 0 classes)")
    for name in ("student_bias", "teacher_bias"):
        b = arrs[name]
        if b is not None and b.shape != (v,):
            raise ValueError(f"{name} has shape {b.shape}, expected ({v},)")
    return s_h, s_w, t_h, t_w, arrs["student_bias"], arrs["teacher_bias"]


def run(
    arrays: Tuple[Any, ...],
    divergence: int,
    beta: float,
    temperature: Any,
    reduction: Any,
    labels: Any,
    ignore_index: Any,
    mask: Any,
    sample_weight: Any,
    num_threads: Any,
    tile_rows: Any,
    want: Tuple[bool, bool, bool],
    ops: Any = NumpyOps,
    row_scale: Optional[np.ndarray] = None,
):
    """The tile loop. arrays: (hs, Ws, ht, Wt, bs, bt) as given; want: which of grad_hs,
    grad_Ws, grad_bs to compute (grad_bs only with bs). row_scale (float64, one per row)
    multiplies the rows of the gradient (the torch wrapper's backward of "none"). Returns
    (loss, grad_hs, grad_Ws, grad_bs), None for a gradient not wanted."""
    # --- every check before anything is computed
    hs, ws, ht, wt, bs, bt = check_inputs(*arrays)
    tau = _temperature(temperature)
    red = reduction_code(reduction)
    nt = threads(num_threads)
    lead = hs.shape[:-1]
    rw = _row_weight(lead, labels, ignore_index, mask, sample_weight)
    v = ws.shape[0]
    n = int(np.prod(lead, dtype=np.int64))
    dt = hs.dtype
    hk = half_kind(dt)
    # The tiles' dtype: the inputs', or float32 for 16-bit inputs where the backend has no
    # 16-bit matmul (NumPy: float32 copies of the weights and biases, each hidden tile
    # converted; the gradients accumulated in float32 and rounded once at the end).
    native = hk is None or bool(ops.half)
    cdt = dt if native else np.dtype(np.float32)
    if not native:
        ws, wt = ws.astype(cdt), wt.astype(cdt)
        bs = None if bs is None else bs.astype(cdt)
        bt = None if bt is None else bt.astype(cdt)
    tile = _tile_rows(max(n, 1), v, 2 * cdt.itemsize, tile_rows)
    want = (want[0], want[1], want[2] and bs is not None)

    # --- row weights: "mean" is "none" with the weights divided by the denominator
    w = np.ones(n, np.float64) if rw is None else rw
    if red == 2:
        den = float(w.sum())
        w = w / den if den > 0 else np.zeros(n, np.float64)
    w = np.ascontiguousarray(w, np.float64)
    # The upstream gradient of "none" scales the rows of G after the kernel (it may be
    # negative or NaN, which row weights may not be).
    rs = None if row_scale is None else np.asarray(row_scale, np.float64).reshape(n, 1)

    h2s = hs.reshape(n, hs.shape[-1])
    h2t = ht.reshape(n, ht.shape[-1])
    gh = np.zeros(h2s.shape, dt) if want[0] else None
    gw = np.zeros(ws.shape, cdt) if want[1] else None  # 16-bit natively: rounded per tile
    gb = np.zeros(v, np.float32 if hk is not None else dt) if want[2] else None

    def rows(x: np.ndarray) -> np.ndarray:
        return x if native else x.astype(cdt)

    def logits(x: np.ndarray, wm: np.ndarray, bias: Optional[np.ndarray], z: np.ndarray) -> None:
        if bias is None:
            ops.mm(x, wm.T, z)
        elif hk is not None and native:  # 16-bit: one rounding of the product plus the bias
            ops.mm_bias(x, wm.T, bias, z)
        else:  # (float32 / float64: the rounding of every release before 16-bit support)
            ops.mm(x, wm.T, z)
            np.add(z, bias, out=z)

    # 16-bit tiles go to the kernel as their bits (uint16) with their kind (hk)
    bits = (lambda z: z.view(np.uint16)) if (hk is not None and native) else (lambda z: z)
    kind = hk if (hk is not None and native) else -1
    losses = np.zeros(n, np.float64)
    grad = any(want)
    if n:
        zs_buf = np.empty((tile, v), cdt)
        zt_buf = np.empty((tile, v), cdt)
        first = True
        for a in range(0, n, tile):
            b = min(a + tile, n)
            zs, zt = zs_buf[: b - a], zt_buf[: b - a]
            xs = rows(h2s[a:b])  # (16-bit in NumPy: converted once for both matmuls)
            logits(xs, ws, bs, zs)
            logits(rows(h2t[a:b]), wt, bt, zt)
            g = bits(zs).reshape(-1) if grad else None
            _core.distill(
                bits(zs), bits(zt), divergence, beta, tau, 0, w[a:b], nt, kind, g, None, losses[a:b]
            )
            if not grad:
                continue
            if rs is not None:
                np.multiply(zs, rs[a:b], out=zs, casting="unsafe")
            if gh is not None:
                if native:
                    ops.mm(zs, ws, gh[a:b])
                else:
                    gh[a:b] = zs @ ws  # float32, rounded once to the 16-bit dtype
            if gw is not None:
                if first:
                    ops.mm(zs.T, xs, gw)
                else:
                    ops.mm_add(zs.T, xs, gw)
            if gb is not None and hk is not None:
                ops.col_sum(zs, gb)  # 16-bit G summed in float32
            elif gb is not None:
                gb += zs.sum(axis=0)
            first = False
    if gw is not None and gw.dtype != dt:
        gw = gw.astype(dt)
    if gb is not None and gb.dtype != dt:
        gb = gb.astype(dt)
    ldt = np.dtype(np.float32) if hk is not None else dt  # (as kl_div_with_logits)
    if red == 0:
        loss: Any = losses.astype(ldt).reshape(lead)
    else:
        loss = ldt.type(losses.sum())
    return loss, (None if gh is None else gh.reshape(hs.shape)), gw, gb


_DOC_COMMON = """
    student_hidden (..., H_s) and teacher_hidden (..., H_t) share their leading shape (the
    rows); student_weight (V, H_s) and teacher_weight (V, H_t) share V (as ``nn.Linear``);
    biases (V,). All of one dtype: float32, float64, float16 or bfloat16 (16-bit: see the
    module's notes; the loss float32). temperature,
    reduction ("mean" divides by the sum of the row weights), labels / ignore_index, mask,
    sample_weight and num_threads mean what they mean in :func:`fastxent.kl_div_with_logits`.
    tile_rows overrides the rows per tile (default: fastxent.linear_cross_entropy's size for
    two tile buffers). The teacher's head is frozen: no teacher gradient."""


def call_kw(temperature, reduction, labels, ignore_index, mask, sample_weight, num_threads,
            tile_rows) -> Dict[str, Any]:  # fmt: skip
    """The keywords of run() from the public functions' (every front end's)."""
    return dict(temperature=temperature, reduction=reduction, labels=labels,
                ignore_index=ignore_index, mask=mask, sample_weight=sample_weight,
                num_threads=num_threads, tile_rows=tile_rows)  # fmt: skip


def _call(
    args: Tuple[Any, ...],
    divergence: int,
    beta: float,
    kw: dict,
    want_grad: bool,
):
    w = (want_grad, want_grad, want_grad)
    loss, gh, gw, gb = run(args, divergence, beta, **kw, want=w)
    return (loss, gh, gw, gb) if want_grad else loss


def linear_kl_div(
    student_hidden: Any,
    student_weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    direction: str = "forward",
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    tile_rows: Optional[int] = None,
):
    """:func:`fastxent.kl_div_with_logits` of the student's logits
    ``student_hidden @ student_weight.T + student_bias`` and the teacher's
    ``teacher_hidden @ teacher_weight.T + teacher_bias``, computed in row tiles: the N x V
    logits never exist."""
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight,
            student_bias, teacher_bias)  # fmt: skip
    kw = dict(temperature=temperature, reduction=reduction, labels=labels,
              ignore_index=ignore_index, mask=mask, sample_weight=sample_weight,
              num_threads=num_threads, tile_rows=tile_rows)  # fmt: skip
    return _call(args, _direction(direction), 0.5, kw, False)


def linear_kl_div_with_grad(
    student_hidden: Any,
    student_weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    direction: str = "forward",
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    tile_rows: Optional[int] = None,
):
    """``(loss, grad_student_hidden, grad_student_weight, grad_student_bias)`` of
    :func:`linear_kl_div` (grad_student_bias None without student_bias; "none" gives the
    gradients of the sum of the row losses). No teacher gradients: the teacher's head is
    taken as frozen."""
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight,
            student_bias, teacher_bias)  # fmt: skip
    kw = dict(temperature=temperature, reduction=reduction, labels=labels,
              ignore_index=ignore_index, mask=mask, sample_weight=sample_weight,
              num_threads=num_threads, tile_rows=tile_rows)  # fmt: skip
    return _call(args, _direction(direction), 0.5, kw, True)


def linear_jsd(
    student_hidden: Any,
    student_weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    tile_rows: Optional[int] = None,
):
    """:func:`fastxent.jsd_with_logits` (generalised JSD, beta in [0, 1]) of the student's and
    the teacher's logits from their hidden states and heads, in row tiles (see
    :func:`linear_kl_div`)."""
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight,
            student_bias, teacher_bias)  # fmt: skip
    kw = dict(temperature=temperature, reduction=reduction, labels=labels,
              ignore_index=ignore_index, mask=mask, sample_weight=sample_weight,
              num_threads=num_threads, tile_rows=tile_rows)  # fmt: skip
    return _call(args, 2, _beta(beta), kw, False)


def linear_jsd_with_grad(
    student_hidden: Any,
    student_weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    tile_rows: Optional[int] = None,
):
    """``(loss, grad_student_hidden, grad_student_weight, grad_student_bias)`` of
    :func:`linear_jsd`. No teacher gradients (frozen teacher head)."""
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight,
            student_bias, teacher_bias)  # fmt: skip
    kw = dict(temperature=temperature, reduction=reduction, labels=labels,
              ignore_index=ignore_index, mask=mask, sample_weight=sample_weight,
              num_threads=num_threads, tile_rows=tile_rows)  # fmt: skip
    return _call(args, 2, _beta(beta), kw, True)


for _f in (linear_kl_div, linear_kl_div_with_grad, linear_jsd, linear_jsd_with_grad):
    _f.__doc__ = (_f.__doc__ or "") + "\n" + _DOC_COMMON
del _f
