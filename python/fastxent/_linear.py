"""Fused linear + softmax cross-entropy: the loss of
``cross_entropy(hidden @ linear_weight.T + linear_bias, target, ...)`` and its gradients with
respect to hidden, linear_weight and linear_bias, without ever holding the N x V logits.

This module owns the tile loop (:func:`run_tiles`), which a backend (NumPy here, PyTorch in
``_torch_linear``) supplies with its matmuls, the NumPy backend and out= buffers, and the
NumPy front end (:func:`linear_cross_entropy`, :func:`linear_cross_entropy_with_grad`).
The argument checks shared by the NumPy, PyTorch and JAX front ends (:func:`make_plan`),
the global "mean" denominator and the row-tile size live in ``_linear_plan``; their names
are importable from here.

Invariants of the tile loop:

- Rows are taken in tiles of at most ``plan.tile`` rows, in increasing order; one reused
  buffer of tile x V logits is the only array with V columns besides the weight and its
  gradient (16-bit NumPy also keeps float32 copies of those two, see below), but for a
  backward through the per-row statistics of outputs=, whose product takes temporaries of
  blocks of at most STAT_BLOCK logits.
- Per tile: ``Z = hidden[tile] @ W.T (+ bias)`` by the backend's BLAS; fastxent's in-place
  kernel (``cross_entropy_with_grad(Z, ..., out=Z)``) turns Z into the tile's loss and its
  gradient G, with "mean" divided by the whole batch's denominator D (passed as
  ``normalizer``), so that the tiles add up to the batch's loss and gradient; then
  ``grad_hidden[tile] = G @ W``, ``grad_weight += G.T @ hidden[tile]``,
  ``grad_bias += G.sum(0)``, always in this order.
- A forward pass alone (no gradient) at the default tile, float32 or float64, with fewer
  rows than classes, takes tiles of the vocabulary instead (``plan.cols`` > 0,
  :func:`run_vocab_tiles`): every row times ``cols`` classes, ``Z = hidden @ W[v0:v1].T``,
  the slice's shard statistics (fastxent.shard_stats), merged in float64 slice after slice;
  each product then packs the hidden states again, not the weight. Its loss is the row-tiled
  pass's to rounding, not bit for bit (float64 merge of per-slice sums), as shards are.
- The BLAS and fastxent's OpenMP kernel run one after the other, never at the same time.
- Everything (shapes, dtypes, options, every class index, out= buffers) is checked before
  the first byte of an out= buffer is written.
- Bit stability: the kernel's part is independent of its thread count; the matmuls are the
  BLAS's (their rounding may depend on its thread count), and the tile size decides how
  the weight and bias gradients and the loss are summed across tiles (float32 round-off);
  in tiles of the vocabulary, the columns per tile decide how the row statistics merge.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _core
from ._api import RowStats, _row_stats, cross_entropy, cross_entropy_with_grad
from ._keywords import LINEAR, LinearKeywords, Unpack, kernel_outputs
from ._linear_plan import (  # noqa: F401 (re-exported: fastxent._linear's names)
    _MIN_ROWS,
    _OPTION_NAMES,
    TILE_BYTES,
    _is_half,
    _Plan,
    check_options,
    class_targets,
    make_plan,
    shape_checks,
    tile_cols,
    tile_rows,
    tile_shape,
)
from ._shard import loss_from_stats, outputs_from_stats, shard_stats

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad"]

# Bytes of the vocabulary chunks through which grad_weight is accumulated where the BLAS
# cannot add into it (NumPy's matmul, 16-bit PyTorch): small enough to stay in cache.
CHUNK_BYTES = 1 << 20


def _tile_kw(
    plan: _Plan, r0: int, r1: int, reduction: str, sample_weight: Optional[np.ndarray]
) -> dict:
    kw = dict(plan.kw, reduction=reduction)
    if reduction == "mean":
        kw["normalizer"] = plan.denominator
    if sample_weight is not None:
        kw["sample_weight"] = sample_weight[r0:r1]
    return kw


def new_stats(plan: _Plan) -> Optional[Dict[str, np.ndarray]]:
    """The (n,) arrays that run_tiles fills with the kernel's per-row outputs for the plan's
    outputs= (argmax for accuracy too), or None without outputs=."""
    if plan.outputs is None:
        return None
    return {
        n: np.empty(plan.n, np.int64 if n == "argmax" else plan.cdt)
        for n in kernel_outputs(plan.outputs)
    }


def row_stats(plan: _Plan, stats: Dict[str, np.ndarray]) -> RowStats:
    """The RowStats of the plan's outputs= (each of the rows' shape), as fastxent.cross_entropy
    builds them (accuracy over the counted rows)."""
    assert plan.outputs is not None
    return _row_stats(plan.outputs, stats, plan.target, plan.kw["ignore_index"], plan.lead)


def run_tiles(
    plan: _Plan,
    be: Any,
    want: Tuple[bool, bool, bool],
    reduction: Optional[str] = None,
    sample_weight: Optional[np.ndarray] = None,
    stats: Optional[Dict[str, np.ndarray]] = None,
    stat_grads: Optional[Dict[str, np.ndarray]] = None,
    loss_grad: bool = True,
) -> Any:
    """The tile loop. `be` (a backend) owns the arrays and the matmuls; `want` says which of
    grad_hidden, grad_weight, grad_bias to compute (none: the loss alone, no gradient
    matmuls). Returns the loss: a float (float64 sum of the tiles' losses) for "sum" and
    "mean", the (n,) row losses for "none". `reduction` and `sample_weight` override the
    plan's (PyTorch's backward of "none" scales the rows by the upstream gradient). `stats`
    (new_stats): filled with each tile's per-row outputs, from the same kernel call (in
    tiles of the vocabulary: from the merged statistics).

    `stat_grads` (a backward through the float statistics of outputs=: name -> (n,) upstream
    gradients): each tile's gradient gets their vector-Jacobian product, from the backend's
    ``stats_vjp`` (computed on the logits before the kernel writes over them, in blocks of
    rows of at most STAT_BLOCK elements) and ``add_rows``; `loss_grad` False: those products
    alone, no loss gradient (the loss's upstream gradient is absent)."""
    grad = any(want)
    if stat_grads is not None and (stats is not None or not grad):
        raise RuntimeError("stat_grads is for a backward sweep (gradients, no outputs=)")
    if plan.cols:  # the backend's buffer is a tile of the vocabulary
        if grad or reduction is not None or sample_weight is not None:
            raise RuntimeError("a plan in tiles of the vocabulary is for a forward pass alone")
        return run_vocab_tiles(plan, be, stats)
    red = plan.reduction if reduction is None else reduction
    sw = plan.sample_weight if sample_weight is None else sample_weight
    total = 0.0
    rows = np.empty(plan.n, plan.cdt) if red == "none" else None
    names = None if stats is None else tuple(stats)
    for r0 in range(0, plan.n, plan.tile):
        r1 = min(plan.n, r0 + plan.tile)
        z = be.logits(r0, r1)
        tgt = plan.probs[r0:r1] if plan.target is None else plan.target[r0:r1]
        kw = _tile_kw(plan, r0, r1, red, sw)
        if names is not None:
            kw["outputs"] = names
        if grad:
            if stat_grads is None:
                res = cross_entropy_with_grad(z, tgt, out=z, **kw)
                loss = res[0]
            else:
                loss = _stat_grad_tile(plan, be, z, tgt, r0, r1, red, sw, stat_grads, loss_grad)
                res = (loss,)
            if want[0]:
                be.grad_hidden(z, r0, r1)
            if want[1]:
                be.grad_weight(z, r0, r1)
            if want[2]:
                be.grad_bias(z, r0)
        else:
            res = cross_entropy(z, tgt, **kw)
            loss = res if names is None else res[0]
        if stats is not None:
            st = res[-1]
            for n in stats:
                stats[n][r0:r1] = getattr(st, n)
        if rows is not None:
            rows[r0:r1] = loss
        else:
            total += float(loss)
    if grad:
        be.finish(want)
    return rows if rows is not None else total


# Elements per block of rows of a tile whose gradient takes the statistics' vector-Jacobian
# product: the product's temporaries (a few of the block's size) stay small beside the tile.
STAT_BLOCK = 1 << 20


def _stat_grad_tile(
    plan: _Plan,
    be: Any,
    z: np.ndarray,
    tgt: np.ndarray,
    r0: int,
    r1: int,
    red: str,
    sw: Optional[np.ndarray],
    stat_grads: Dict[str, np.ndarray],
    loss_grad: bool,
) -> Any:
    """The gradient of the tile of rows [r0, r1) written over its logits z: in blocks of
    rows, the statistics' vector-Jacobian product from the logits, then the kernel's loss
    gradient (if loss_grad) over the block's logits, then their sum. Returns the tile's loss
    as the kernel does (the rows' losses for "none"; 0 without loss_grad)."""
    parts = []
    step = max(1, STAT_BLOCK // max(plan.v, 1))
    for a in range(r0, r1, step):
        b = min(r1, a + step)
        i, j = a - r0, b - r0
        extra = be.stats_vjp(i, j, a, stat_grads)
        if loss_grad:
            zb = z[i:j]
            kw = _tile_kw(plan, a, b, red, sw)
            parts.append(cross_entropy_with_grad(zb, tgt[i:j], out=zb, **kw)[0])
        be.add_rows(extra, i, j, replace=not loss_grad)
    if red == "none":
        return np.concatenate(parts) if parts else np.zeros(r1 - r0, plan.cdt)
    return float(sum(float(p) for p in parts))


def run_vocab_tiles(plan: _Plan, be: Any, stats: Optional[Dict[str, np.ndarray]] = None) -> Any:
    """A forward pass alone in tiles of the vocabulary (plan.cols > 0): per tile of every row
    and classes [v0, v1), ``Z = hidden @ W[v0:v1].T (+ bias[v0:v1])`` by the backend's
    ``logits_cols``, then the tile's shard statistics (fastxent.shard_stats, one SIMD pass),
    merged in float64 in increasing v0; the loss (and outputs=) from the merged statistics.
    Returns what run_tiles returns."""
    kw = plan.kw
    names = None if stats is None else tuple(stats)
    shard_kw = {k: kw[k] for k in ("ignore_index", "label_smoothing", "softcap", "logit_scale")}
    shard_kw["num_threads"] = kw["num_threads"]
    merged: Any = None
    out_merged: Any = None
    for v0 in range(0, plan.v, plan.cols):
        v1 = min(plan.v, v0 + plan.cols)
        z = be.logits_cols(v0, v1)
        tgt = plan.target
        if tgt is None:  # this slice's probabilities (16-bit ones as the logits' dtype)
            tgt = plan.probs[:, v0:v1]
            if _is_half(tgt.dtype):
                tgt = tgt.astype(plan.cdt)
        w = None if kw["weight"] is None else kw["weight"][v0:v1]
        res = shard_stats(
            z, tgt, offset=v0, num_classes=plan.v, weight=w, outputs=names, **shard_kw
        )
        st, ost = res if names is not None else (res, None)
        if merged is None:
            merged, out_merged = st, ost
        else:
            _core.merge_stats(merged, st, merged)
            if ost is not None:
                _core.merge_output_stats(out_merged, ost, out_merged)
    loss = loss_from_stats(
        merged,
        reduction=plan.reduction,
        sample_weight=plan.sample_weight,
        z_loss=kw["z_loss"],
        normalizer=plan.denominator if plan.reduction == "mean" else None,
    )
    if stats is not None:
        rs = outputs_from_stats(
            out_merged,
            plan.target,
            outputs=names,
            num_classes=plan.v,
            ignore_index=kw["ignore_index"],
            dtype=plan.cdt,
        )
        for n in stats:
            stats[n][:] = np.asarray(getattr(rs, n)).reshape(-1)
    if plan.reduction == "none":
        return np.asarray(loss, dtype=plan.cdt).reshape(-1)
    return float(loss)


class _NumpyBackend:
    """NumPy's matmul (its BLAS) for each tile. 16-bit inputs are multiplied in float32
    (NumPy has no 16-bit BLAS): float32 copies of the weight and of its gradient, each
    gradient rounded once to the 16-bit dtype at the end."""

    def __init__(
        self,
        plan: _Plan,
        h2: np.ndarray,
        w: np.ndarray,
        b: Optional[np.ndarray],
        outs: Tuple[Optional[np.ndarray], ...],
    ):
        self.plan, self.half = plan, _is_half(h2.dtype)
        self.h2 = h2
        self.w = w.astype(np.float32) if self.half else w
        self.b = None if b is None else (b.astype(np.float32) if self.half else b)
        self.buf = np.empty(int(np.prod(tile_shape(plan))), plan.cdt)
        # Set when the loop calls for them (None otherwise: never read then).
        self.gh: Any = outs[0]
        self.gw: Any = outs[1]
        self.gb: Any = outs[2]
        self.acc_w: Any = (
            np.zeros(w.shape, np.float32) if self.half and self.gw is not None else self.gw
        )
        self.acc_b: Any = (
            self.gb if self.gb is None or not self.half else np.zeros(plan.v, np.float32)
        )
        self.chunk = max(1, CHUNK_BYTES // max(1, plan.h * plan.cdt.itemsize))
        self.tmp = np.empty((min(self.chunk, plan.v), plan.h), plan.cdt)
        self.first_w = self.first_b = True

    def _x(self, r0: int, r1: int) -> np.ndarray:
        x = self.h2[r0:r1]
        return x.astype(np.float32) if self.half else x

    def logits(self, r0: int, r1: int) -> np.ndarray:
        z = self.buf[: (r1 - r0) * self.plan.v].reshape(r1 - r0, self.plan.v)
        np.matmul(self._x(r0, r1), self.w.T, out=z)
        if self.b is not None:
            np.add(z, self.b, out=z)
        return z

    def logits_cols(self, v0: int, v1: int) -> np.ndarray:
        z = self.buf[: self.plan.n * (v1 - v0)].reshape(self.plan.n, v1 - v0)
        np.matmul(self.h2, self.w[v0:v1].T, out=z)
        if self.b is not None:
            np.add(z, self.b[v0:v1], out=z)
        return z

    def grad_hidden(self, g: np.ndarray, r0: int, r1: int) -> None:
        if self.half:
            self.gh[r0:r1] = np.matmul(g, self.w)
        else:
            np.matmul(g, self.w, out=self.gh[r0:r1])

    def grad_weight(self, g: np.ndarray, r0: int, r1: int) -> None:
        x = self._x(r0, r1)
        if self.first_w:
            np.matmul(g.T, x, out=self.acc_w)
            self.first_w = False
            return
        for v0 in range(0, self.plan.v, self.chunk):
            v1 = min(self.plan.v, v0 + self.chunk)
            t = self.tmp[: v1 - v0]
            np.matmul(g[:, v0:v1].T, x, out=t)
            np.add(self.acc_w[v0:v1], t, out=self.acc_w[v0:v1])

    def grad_bias(self, g: np.ndarray, r0: int) -> None:
        if self.first_b:
            np.sum(g, axis=0, out=self.acc_b)
            self.first_b = False
        else:
            self.acc_b += g.sum(axis=0)

    def finish(self, want: Tuple[bool, bool, bool]) -> None:
        if self.half and want[1]:
            self.gw[...] = self.acc_w
        if self.half and want[2]:
            self.gb[...] = self.acc_b


def _check_outs(
    out: Any,
    h: np.ndarray,
    w: np.ndarray,
    b: Optional[np.ndarray],
    inputs: Tuple[Tuple[str, Any], ...],
) -> Tuple[Optional[np.ndarray], ...]:
    """out=(grad_hidden, grad_weight, grad_bias), each None or a writable C-contiguous array
    of its input's shape and dtype, overlapping no input and no other out buffer."""
    if out is None:
        return (None, None, None)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError(
            "out must be a tuple (grad_hidden, grad_weight, grad_bias) of arrays or None"
        )
    names = ("grad_hidden", "grad_weight", "grad_bias")
    refs = (h, w, b)
    res: list = []
    for name, o, ref in zip(names, out, refs):
        if o is None:
            res.append(None)
            continue
        if ref is None:
            raise ValueError("out has a grad_bias buffer but there is no linear_bias")
        if not isinstance(o, np.ndarray):
            raise TypeError(f"out {name} must be a NumPy array, got {type(o).__name__}")
        if o.dtype != ref.dtype or o.shape != ref.shape:
            raise ValueError(
                f"out {name} has shape {o.shape} and dtype {o.dtype}, expected "
                f"the shape and dtype of its input"
            )
        if not o.flags.c_contiguous or not o.flags.writeable:
            raise ValueError(f"out {name} must be C-contiguous and writable")
        for other, arr in inputs + tuple(zip(names, res)):
            if arr is not None and np.may_share_memory(o, arr):
                raise ValueError(f"out {name} overlaps {other}")
        res.append(o)
    return tuple(res)


def _numpy_call(
    hidden: Any,
    linear_weight: Any,
    target: Any,
    linear_bias: Any,
    reduction: Any,
    options: dict,
    tile: Any,
    want_grad: bool,
    out: Any,
):
    h = np.asarray(hidden)
    w = np.asarray(linear_weight)
    b = None if linear_bias is None else np.asarray(linear_bias)
    t = np.asarray(target)
    probs = t.dtype.kind == "f" or _is_half(t.dtype)
    cdt = np.dtype(np.float64) if h.dtype == np.float64 else np.dtype(np.float32)
    plan = make_plan(
        h.shape,
        h.dtype,
        w.shape,
        w.dtype,
        None if b is None else b.shape,
        None if b is None else b.dtype,
        t,
        t.shape,
        probs,
        reduction,
        options,
        tile,
        cdt.itemsize,
        forward_only=not want_grad,
    )
    h2 = h.reshape(plan.n, plan.h)
    if probs:
        t = t.reshape(plan.n, plan.v)
        plan = plan._replace(probs=t)
    want = (want_grad, want_grad, want_grad and b is not None)
    outs: Tuple[Optional[np.ndarray], ...] = (None, None, None)
    if want_grad:
        inputs = (
            ("hidden", h),
            ("linear_weight", w),
            ("linear_bias", b),
            ("target", t),
            ("weight", options["weight"]),
            ("sample_weight", options["sample_weight"]),
        )
        outs = tuple(
            o if o is not None else (None if ref is None else np.empty(ref.shape, ref.dtype))
            for o, ref in zip(_check_outs(out, h, w, b, inputs), (h, w, b))
        )
        if plan.n == 0:
            for o in outs:
                if o is not None:
                    o[...] = 0
    views = (None if outs[0] is None else outs[0].reshape(plan.n, plan.h),) + outs[1:]
    stats = new_stats(plan)
    loss = run_tiles(plan, _NumpyBackend(plan, h2, w, b, views), want, stats=stats)
    loss = loss.reshape(plan.lead) if reduction == "none" else plan.cdt.type(loss)
    res = (loss,) + outs if want_grad else (loss,)
    if stats is not None:
        res += (row_stats(plan, stats),)
    return res if len(res) > 1 else loss


@LINEAR
def linear_cross_entropy(
    hidden: Any,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    tile_rows: Optional[int] = None,  # noqa: F811 (shadows the re-exported function)
    **kw: Unpack[LinearKeywords],
):
    """The loss of ``fx.cross_entropy(hidden @ linear_weight.T + linear_bias, target, ...)``,
    computed in tiles of rows: the N x V logits never exist.

    hidden has shape (..., H), linear_weight (V, H) as in ``nn.Linear``, linear_bias (V,);
    target class indices of shape hidden.shape[:-1], or probabilities of shape (..., V).
    Every keyword of :func:`fastxent.cross_entropy` (but axis) means what it means there;
    "mean" divides by the whole batch's denominator. tile_rows overrides the rows per tile
    (default: a 64 MiB tile, at most 2/9 of the logits).

    Tiles of the vocabulary: without tile_rows, float32 / float64 inputs, no entropy_coef,
    fewer rows than classes, more rows than one tile of rows holds and at least 512 classes
    in 2/9 of the vocabulary (fastxent._linear_plan.tile_cols), the tiles are every row
    times a slice of the classes instead: each slice of the weight is multiplied once, the
    slices' statistics merge as vocabulary shards do (see fastxent.shard_stats), and loss
    and outputs come from the merged statistics. They match linear_cross_entropy_with_grad's
    to rounding, not bit for bit (with label smoothing, class weights or probability
    targets, the loss's error is a few ulps of Q * max|z|, as for merged shard statistics).

    float16/bfloat16 inputs are multiplied in float32 (float32 copies of the weight: NumPy
    has no 16-bit BLAS), the loss is float32. Returns what fx.cross_entropy returns: with
    ``outputs=``, ``(loss, stats)`` (per-row statistics of each tile's kernel call, or of the
    merged statistics; float32 for 16-bit inputs), and ``entropy_coef`` adds its entropy
    term, as there."""
    opts = LINEAR.bind("linear_cross_entropy", kw)
    reduction = opts.pop("reduction")
    return _numpy_call(
        hidden, linear_weight, target, linear_bias, reduction, opts, tile_rows, False, None
    )


@LINEAR
def linear_cross_entropy_with_grad(
    hidden: Any,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    tile_rows: Optional[int] = None,  # noqa: F811 (shadows the re-exported function)
    out: Any = None,
    **kw: Unpack[LinearKeywords],
):
    """``(loss, grad_hidden, grad_weight, grad_bias)`` of :func:`linear_cross_entropy`
    (grad_bias is None without linear_bias; "none" gives the gradients of the sum of the
    row losses). Per tile: logits by the BLAS, fastxent's in-place kernel, then
    ``grad_hidden[tile] = G @ W`` and ``grad_weight += G.T @ hidden[tile]``.

    out: optional ``(grad_hidden, grad_weight, grad_bias)`` buffers (each None or an array of
    its input's shape and dtype, C-contiguous, writable, overlapping no input). On any error
    nothing is written. 16-bit gradients are accumulated in float32 and rounded once. With
    ``outputs=``: ``(loss, grad_hidden, grad_weight, grad_bias, stats)``; ``entropy_coef``'s
    term is in the loss and every gradient."""
    opts = LINEAR.bind("linear_cross_entropy_with_grad", kw)
    reduction = opts.pop("reduction")
    return _numpy_call(
        hidden, linear_weight, target, linear_bias, reduction, opts, tile_rows, True, out
    )
