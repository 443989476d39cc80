"""Distillation from a sparse (top-k) teacher: offline distillation where the teacher is stored
per row as its k most likely class indices and their log-probabilities, k << C.

The teacher distribution, per row, from the k stored pairs (indices K, log-probabilities l):
``t_K = exp(l)`` with mass ``m = sum(t_K) <= 1``, and

* ``residual="renormalize"``: ``t = t_K / m`` on K, 0 elsewhere;
* ``residual="uniform"``: ``t = t_K`` on K and the missing mass ``1 - m`` spread evenly over
  the ``C - k`` other classes (``(1 - m) / (C - k)`` each; nothing when k = C or m = 1).

``log t`` are then the teacher's logits: with a temperature the teacher is
``softmax(log t / T)``, and the losses are those of :func:`fastxent.kl_div_with_logits` /
:func:`fastxent.jsd_with_logits` against that dense teacher (same semantics, reductions, row
weights and ``T**2`` factor).

Implementation (v1, exact by construction): the rows go in tiles; each tile's dense teacher
logits (-inf, or ``log((1 - m) / (C - k))`` per row, with the k log-probabilities scattered in)
are written into one buffer of at most ~8 MiB (or the thread count's rows) that every tile
reuses, and the dense kernel (``_core.distill``, the one under kl_div_with_logits_with_grad)
runs on the tile, writing the student's gradient straight into its rows of ``out=``. The tile
calls take reduction "none" with the row weights pre-scaled by the global "mean" denominator and
float64 row losses; the reduced loss is their sum in a fixed order, so results do not depend
on the tile size or the thread count. No rows x C temporary is made (16-bit students: the
tile of student rows and of their gradient also go through float32 buffers of the tile's size).

Not done: a dedicated student-only kernel (the teacher's log-partition is known; one exp per
student element and a scatter of k terms) would be ~2x faster than filling a dense teacher
tile and running the two-distribution kernel over it.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Tuple

import numpy as np

from . import _core
from ._distill import _as_logits, _beta, _direction, _row_weight, _temperature
from ._options import check_out, half_kind, reduction_code, rows_view, threads, to_numpy

__all__ = [
    "kl_div_with_topk_teacher",
    "kl_div_with_topk_teacher_with_grad",
    "jsd_with_topk_teacher",
    "jsd_with_topk_teacher_with_grad",
]

RESIDUALS = ("renormalize", "uniform")

# The per-call teacher tile's size bound (bytes); a tile holds at least the thread count's
# rows (and one row). Tests shrink it through the private keyword _tile_rows.
_TILE_BYTES = 8 << 20


def check_residual(residual: Any) -> None:
    if not isinstance(residual, str) or residual not in RESIDUALS:
        raise ValueError(f"residual must be 'renormalize' or 'uniform', got {residual!r}")


def _tolerance(dt: np.dtype) -> float:
    """How far above 0 a log-probability (and above 1 the mass m) may be, as rounding."""
    eps = 2.0**-7 if half_kind(dt) == 1 else float(np.finfo(dt).eps)
    return max(1e-5, 4.0 * eps)


def check_teacher_static(rows: Tuple[int, ...], C: int, idx: Any, lp: Any) -> int:
    """k, after the checks that need only the teacher arrays' dtypes and shapes (idx, lp: any
    arrays with .dtype / .shape / .ndim, JAX tracers included)."""
    if np.dtype(idx.dtype).kind not in "iu":
        raise TypeError(f"teacher_indices must be integers, got dtype {idx.dtype}")
    if np.dtype(lp.dtype).kind != "f" and half_kind(lp.dtype) is None:
        raise TypeError(
            f"teacher_logprobs must be float32, float64, float16 or bfloat16, got {lp.dtype}"
        )
    if idx.ndim != len(rows) + 1 or tuple(idx.shape[:-1]) != rows:
        raise ValueError(
            f"teacher_indices has shape {tuple(idx.shape)}, expected {rows + ('k',)} "
            "(the student's rows, then k)"
        )
    if tuple(lp.shape) != tuple(idx.shape):
        raise ValueError(
            f"teacher_logprobs has shape {tuple(lp.shape)}, expected teacher_indices' "
            f"{tuple(idx.shape)}"
        )
    k = int(idx.shape[-1])
    if k == 0:
        raise ValueError("the teacher has k = 0 classes per row (k must be >= 1)")
    if k > C:
        raise ValueError(f"the teacher has k = {k} classes per row, more than the C = {C}")
    return k


def check_teacher_values(C: int, ix: np.ndarray, lg: np.ndarray, tol: float) -> np.ndarray:
    """The mass m per row of the (N, k) int64 indices ix and float64 log-probabilities lg,
    after the checks of their values: range, duplicates, NaN, log-probabilities <= tol and
    m <= 1 + tol."""
    n, k = ix.shape
    if n and (int(ix.min()) < 0 or int(ix.max()) >= C):
        raise ValueError(f"teacher_indices out of range: every index must be in [0, {C})")
    if k > 1 and n:
        srt = np.sort(ix, axis=1)
        dup = np.any(srt[:, 1:] == srt[:, :-1], axis=1)
        if dup.any():
            r = int(np.argmax(dup))
            raise ValueError(f"teacher_indices: row {r} holds an index twice")
    if np.isnan(lg).any():
        raise ValueError("teacher_logprobs holds NaN")
    if n and float(lg.max()) > tol:
        raise ValueError(
            f"teacher_logprobs must be log-probabilities (<= 0), got {float(lg.max())!r}"
        )
    mass = np.exp(lg).sum(axis=1)
    if n and float(mass.max()) > 1.0 + tol:
        r = int(np.argmax(mass))
        raise ValueError(f"teacher_logprobs: row {r}'s probabilities sum to {float(mass[r])!r} > 1")
    return mass


def _check_teacher(
    rows: Tuple[int, ...], C: int, teacher_indices: Any, teacher_logprobs: Any
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices as (N, k) int64, log-probabilities as (N, k) float64, mass m per row), checked:
    shapes, dtypes, range, duplicates, NaN, log-probabilities <= 0 and m <= 1 (up to rounding).
    Only N x k temporaries."""
    idx = to_numpy(teacher_indices, "teacher_indices")
    lp = to_numpy(teacher_logprobs, "teacher_logprobs")
    k = check_teacher_static(rows, C, idx, lp)
    n = int(np.prod(rows, dtype=np.int64))
    ix = np.array(idx, dtype=np.int64).reshape(n, k)
    lg = np.array(lp, dtype=np.float64).reshape(n, k)
    return ix, lg, check_teacher_values(C, ix, lg, _tolerance(lp.dtype))


def check_massless(residual: str, k: int, C: int, mass: np.ndarray, counted: np.ndarray) -> None:
    """A counted row without mass has no teacher under "renormalize", or with k = C."""
    # no mass at all: renormalising divides by 0, and with k = C nothing is left to spread
    # (both residuals are then the same teacher)
    if (residual == "renormalize" or k == C) and np.any(counted & (mass == 0)):
        r = int(np.argmax(counted & (mass == 0)))
        why = "residual='renormalize'" if residual == "renormalize" else "k = C (no other class)"
        raise ValueError(
            f"row {r}'s teacher has no mass (every log-probability is -inf): with "
            f"{why} its distribution is undefined"
        )


def reverse_what(divergence: int, beta: float) -> Optional[str]:
    """How the call names the reverse KL when it computes it (direction="reverse", or the JSD
    at beta = 1: its end point, the same divergence), else None."""
    if divergence == 1:
        return "direction='reverse'"
    if divergence == 2 and beta == 1.0:
        return "beta=1 (the reverse KL)"
    return None


def check_reverse_renormalize(what: Optional[str], residual: str, k: int, C: int) -> None:
    """The reverse KL against a renormalised teacher with k < C is infinite (static)."""
    if what is not None and residual == "renormalize" and k < C:
        raise ValueError(
            f"{what} with residual='renormalize' and k < C is infinite (the "
            "teacher is 0 outside its top k, the student is not): residual='uniform' is "
            "finite where a row's top-k mass m is below 1 (it gives the other classes "
            "(1 - m) / (C - k) each; a row with m = 1 stays infinite and is refused there too)"
        )


def check_reverse_uniform(
    what: Optional[str], residual: str, k: int, C: int, mass: np.ndarray, fill: np.ndarray,
    counted: np.ndarray,
) -> None:  # fmt: skip
    """The reverse KL against a "uniform" teacher is infinite at a counted row of mass 1."""
    # "uniform" with m = 1 (or above by rounding): the other C - k classes get probability 0,
    # where the student's is not: the reverse KL is infinite (the forward KL and the JSD at
    # beta < 1 are finite, the teacher's zeros cost nothing there)
    zero = counted & np.isneginf(fill)
    if what is not None and residual == "uniform" and k < C and zero.any():
        r = int(np.argmax(zero))
        raise ValueError(
            f"{what} with residual='uniform' is infinite at row {r}: its top-k probabilities "
            f"sum to {float(mass[r])!r} (1 up to rounding), which leaves the other C - k "
            "classes probability 0 where the student's is not (the forward KL and the JSD at "
            "beta < 1 are finite there; or keep m below 1)"
        )


def _fill(residual: str, mass: np.ndarray, C: int, k: int) -> np.ndarray:
    """The teacher's logit per row outside its top k (float64): -inf (renormalize, or
    nothing missing), else log((1 - m) / (C - k))."""
    if residual == "uniform" and C > k:
        with np.errstate(divide="ignore"):
            return np.log(np.maximum(1.0 - mass, 0.0) / (C - k))
    return np.full(mass.shape, -np.inf)


def dense_teacher(
    rows: Tuple[int, ...], C: int, teacher_indices: Any, teacher_logprobs: Any, residual: str
) -> np.ndarray:
    """The teacher's logits ``log t`` as a dense float64 array of shape rows + (C,): exactly
    what _run fills its tiles with (cast to the kernel's dtype there). Materialises rows x C:
    for the torch wrapper's second-order path only."""
    idx, lg, mass = _check_teacher(rows, C, teacher_indices, teacher_logprobs)
    t = np.repeat(_fill(residual, mass, C, idx.shape[1])[:, None], C, axis=1)
    np.put_along_axis(t, idx, lg, axis=1)
    return t.reshape(rows + (C,))


def _run(
    student: Any,
    teacher_indices: Any,
    teacher_logprobs: Any,
    divergence: int,
    beta: float,
    residual: Any,
    temperature: Any,
    reduction: Any,
    labels: Any,
    ignore_index: Any,
    mask: Any,
    sample_weight: Any,
    num_threads: Any,
    want_grad: bool,
    out: Any,
    tile_rows: Optional[int] = None,
):
    # --- every check before anything is written
    s = _as_logits(student, "student")
    C = s.shape[-1]
    if C == 0:
        raise ValueError("the class axis has no classes (C = 0)")
    check_residual(residual)
    tau = _temperature(temperature)  # the dense losses' check and range
    red = reduction_code(reduction)
    nt = threads(num_threads)
    rows = s.shape[:-1]
    rw = _row_weight(rows, labels, ignore_index, mask, sample_weight)
    idx, lg, mass = _check_teacher(rows, C, teacher_indices, teacher_logprobs)
    n_rows, k = idx.shape
    counted = np.ones(n_rows, bool) if rw is None else rw > 0
    check_massless(residual, k, C, mass, counted)
    what = reverse_what(divergence, beta)
    check_reverse_renormalize(what, residual, k, C)
    fill = _fill(residual, mass, C, k)
    check_reverse_uniform(what, residual, k, C, mass, fill, counted)
    hk = half_kind(s.dtype)
    gs: Optional[np.ndarray] = None
    if want_grad:
        if out is None:
            gs = np.empty(s.shape, s.dtype)
        else:
            gs = check_out(
                out,
                s,
                [
                    ("teacher_indices", to_numpy(teacher_indices, "teacher_indices")),
                    ("teacher_logprobs", to_numpy(teacher_logprobs, "teacher_logprobs")),
                ],
            )
    elif out is not None:
        raise ValueError("out= belongs to the _with_grad form")
    if tile_rows is not None:
        tile_rows = operator.index(tile_rows)
        if tile_rows < 1:
            raise ValueError("_tile_rows must be >= 1")

    # --- row weights: "mean" is "none" with the weights divided by the denominator
    w = np.ones(n_rows, np.float64) if rw is None else rw
    if red == 2:
        den = float(w.sum())
        w = w / den if den > 0 else np.zeros(n_rows, np.float64)

    cdt = np.dtype(np.float32) if hk is not None else s.dtype  # the kernel's dtype here
    sv = rows_view(s)
    gv = gs.reshape(-1, C) if gs is not None else None
    losses = np.zeros(n_rows, np.float64)
    if n_rows:
        nthr = nt if nt > 0 else max(1, int(_core.default_num_threads()))
        tr = tile_rows or max(1, _TILE_BYTES // (C * cdt.itemsize), nthr)
        tr = min(tr, n_rows)
        tbuf = np.empty((tr, C), cdt)
        sbuf = np.empty((tr, C), cdt) if hk is not None else None
        gbuf = np.empty((tr, C), cdt) if (hk is not None and gv is not None) else None
        lpc = lg.astype(cdt)
        for a in range(0, n_rows, tr):
            b = min(a + tr, n_rows)
            n = b - a
            t = tbuf[:n]
            t[...] = fill[a:b, None]
            np.put_along_axis(t, idx[a:b], lpc[a:b], axis=1)
            if sbuf is not None:
                st = sbuf[:n]
                st[...] = sv[a:b]
            else:
                st = sv[a:b]
            if gv is None:
                g = None
            elif gbuf is not None:
                g = gbuf[:n].reshape(-1)
            else:
                g = gv[a:b].reshape(-1)
            _core.distill(st, t, divergence, beta, tau, 0, w[a:b], nt, -1, g, None, losses[a:b])
            if gbuf is not None and gv is not None:
                gv[a:b] = gbuf[:n]
    ldt = np.float32 if hk is not None else s.dtype
    if red == 0:
        loss = losses.astype(ldt).reshape(rows)
    else:
        loss = np.dtype(ldt).type(losses.sum())
    return (loss, gs) if want_grad else loss


def kl_div_with_topk_teacher(
    student: Any,
    teacher_indices: Any,
    teacher_logprobs: Any,
    *,
    residual: str = "renormalize",
    direction: str = "forward",
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    _tile_rows: Optional[int] = None,
):
    return _run(
        student,
        teacher_indices,
        teacher_logprobs,
        _direction(direction),
        0.5,
        residual,
        temperature,
        reduction,
        labels,
        ignore_index,
        mask,
        sample_weight,
        num_threads,
        False,
        None,
        _tile_rows,
    )


def kl_div_with_topk_teacher_with_grad(
    student: Any,
    teacher_indices: Any,
    teacher_logprobs: Any,
    *,
    residual: str = "renormalize",
    direction: str = "forward",
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    out: Any = None,
    _tile_rows: Optional[int] = None,
):
    return _run(
        student,
        teacher_indices,
        teacher_logprobs,
        _direction(direction),
        0.5,
        residual,
        temperature,
        reduction,
        labels,
        ignore_index,
        mask,
        sample_weight,
        num_threads,
        True,
        out,
        _tile_rows,
    )


def jsd_with_topk_teacher(
    student: Any,
    teacher_indices: Any,
    teacher_logprobs: Any,
    *,
    residual: str = "renormalize",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    _tile_rows: Optional[int] = None,
):
    return _run(
        student,
        teacher_indices,
        teacher_logprobs,
        2,
        _beta(beta),
        residual,
        temperature,
        reduction,
        labels,
        ignore_index,
        mask,
        sample_weight,
        num_threads,
        False,
        None,
        _tile_rows,
    )


def jsd_with_topk_teacher_with_grad(
    student: Any,
    teacher_indices: Any,
    teacher_logprobs: Any,
    *,
    residual: str = "renormalize",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    out: Any = None,
    _tile_rows: Optional[int] = None,
):
    return _run(
        student,
        teacher_indices,
        teacher_logprobs,
        2,
        _beta(beta),
        residual,
        temperature,
        reduction,
        labels,
        ignore_index,
        mask,
        sample_weight,
        num_threads,
        True,
        out,
        _tile_rows,
    )


_DOC = """{what} a sparse (top-k) teacher given by its class indices and log-probabilities.

    The teacher of each row is built from its k pairs (indices K, log-probabilities l)::

        t_K = exp(l),  m = sum(t_K) <= 1
        residual="renormalize":  t = t_K / m on K, 0 elsewhere
        residual="uniform":      t = t_K on K, (1 - m) / (C - k) on each of the C - k others

    ``log t`` are the teacher's logits: at temperature T the teacher is ``softmax(log t / T)``
    (= t at T = 1). The loss is then exactly {dense} with ``teacher = log t`` (a dense
    rows x C teacher is never built: rows go in tiles through one reused buffer of at most
    ~8 MiB).

    Parameters
    ----------
    student : array_like, shape (..., C)
        The student's logits (float32, float64, float16 or bfloat16), classes on the last axis.
        16-bit students are computed in float32 (their tile is copied to float32 and the
        teacher tile is float32; the gradient is rounded once to the student's dtype).
    teacher_indices : array_like of integers, shape (..., k)
        The teacher's k classes per row (the student's rows, 1 <= k <= C): each in [0, C),
        no index twice in a row.
    teacher_logprobs : array_like, shape (..., k)
        Their log-probabilities (float; -inf is a probability of 0): no NaN, each <= 0 and
        per row ``sum(exp(l)) <= 1``, up to rounding (1e-5, or 4 ulp of 16-bit). m may be
        below 1; under "renormalize", and under "uniform" when k = C, a counted row needs
        m > 0.
    residual : {{"renormalize", "uniform"}}
        What becomes of the mass 1 - m outside the top k (see above). Both are the same when
        k = C or m = 1 (m above 1 by rounding counts as 1: nothing is left for the others).
{extra}    temperature, reduction, labels, ignore_index, mask, sample_weight, num_threads
        As in :func:`fastxent.kl_div_with_logits` ("mean" is PyTorch's "batchmean": the sum
        over the sum of the row weights; the loss is times ``T**2``). Results are bitwise
        identical for every thread count and tile size.
{grad}
    Raises
    ------
    TypeError, ValueError
        For bad logits or options (as the dense functions), and for teacher arrays of the
        wrong shape or dtype, indices out of range or repeated in a row, NaN or positive
        log-probabilities, a row whose probabilities sum to more than 1, a counted row
        with no mass under "renormalize" (or with k = C), and the reverse KL
        (direction="reverse", or the JSD at beta=1, the same divergence) where it is
        infinite: with "renormalize" and k < C (the teacher is 0 outside its top k, the
        student is not), and with "uniform" and k < C at a counted row of mass m = 1 (or
        above by rounding), whose C - k other classes get probability 0 (the forward KL and
        the JSD at beta < 1 stay finite and accept it).
        Everything is checked before anything is written.
"""

_KL_EXTRA = """    direction : {"forward", "reverse"}
        "forward": KL(teacher || student) (the usual distillation loss); "reverse":
        KL(student || teacher).
"""
_JSD_EXTRA = """    beta : float in [0, 1]
        The teacher's weight in the mixture, as in :func:`fastxent.jsd_with_logits`.
"""
_NOGRAD = """
    Returns
    -------
    The loss: a scalar, or per-row losses for "none" (the student's dtype; float32 for 16-bit).
"""
_GRAD = """    out : ndarray, optional
        Where to write the student's gradient: its shape and dtype, C-contiguous, writable
        (``out=student`` is the in-place mode).

    Returns
    -------
    (loss, grad_student): the gradient of the reduced loss ("none": of the sum of the row
    losses) with respect to the student's logits, in its dtype. The teacher is data: no
    gradient with respect to it.
"""

for _f, _what, _dense, _extra, _grad in (
    (kl_div_with_topk_teacher, "KL divergence between", "kl_div_with_logits", _KL_EXTRA, _NOGRAD),
    (
        kl_div_with_topk_teacher_with_grad,
        "KL divergence and its gradient between",
        "kl_div_with_logits_with_grad",
        _KL_EXTRA,
        _GRAD,
    ),
    (jsd_with_topk_teacher, "Generalised JSD between", "jsd_with_logits", _JSD_EXTRA, _NOGRAD),
    (
        jsd_with_topk_teacher_with_grad,
        "Generalised JSD and its gradient between",
        "jsd_with_logits_with_grad",
        _JSD_EXTRA,
        _GRAD,
    ),
):
    _f.__doc__ = _DOC.format(
        what=_what + " the student's softmax and",
        dense=f":func:`fastxent.{_dense}`",
        extra=_extra,
        grad=_grad,
    )
