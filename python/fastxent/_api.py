"""User-facing argument handling around the compiled kernel (fastxent._core).

Everything is checked here, or in the C++ core, before the kernel writes a byte, so a bad
call leaves ``out=`` and the logits exactly as they were.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Union

import numpy as np

from . import _core
from ._keywords import (
    DEFAULTS,
    STATS,
    RowStatsKeywords,
    Unpack,
    kernel_outputs,
    keyword_docs,
    output_names,
)
from ._options import (
    FLOAT_DTYPES,
    REDUCTIONS,
    LossOptions,
    as_target,
    as_vector,
    check_axis,
    check_out,
    cols_view,
    half_kind,
    raise_bad_target,
    rows_view,
)
from ._options import to_numpy as _to_numpy  # (tests read arrays through fastxent._api)

__all__ = ["cross_entropy", "cross_entropy_with_grad", "RowStats"]


class RowStats(NamedTuple):
    """The per-row outputs asked for with ``outputs=`` (the others None): lse, entropy and
    target_logprob in the logits' dtype (float32 for 16-bit logits, as the loss) and argmax
    int64, each of the target's shape
    (``logits.shape`` without the class axis); accuracy a float. See
    :func:`fastxent.cross_entropy`."""

    lse: Optional[np.ndarray] = None
    entropy: Optional[np.ndarray] = None
    argmax: Optional[np.ndarray] = None
    target_logprob: Optional[np.ndarray] = None
    accuracy: Optional[float] = None


def _as_logits(logits: Any) -> np.ndarray:
    x = _to_numpy(logits, "logits")
    if x.dtype not in FLOAT_DTYPES and half_kind(x.dtype) is None:
        raise TypeError(f"logits must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError("logits must have at least one dimension (the class axis)")
    return x


def _run(logits: Any, target: Any, kw: dict, want_grad: bool, out: Any):
    x = _as_logits(logits)
    ax = check_axis(kw["axis"], x.ndim)
    opts = LossOptions.from_keywords(
        kw["reduction"],
        kw["ignore_index"],
        kw["label_smoothing"],
        kw["z_loss"],
        kw["softcap"],
        kw["logit_scale"],
        kw["normalizer"],
        kw["num_threads"],
        kw["entropy_coef"],
    )
    names = None if kw["outputs"] is None else output_names(kw["outputs"])
    extras = names is not None or opts.entropy_coef > 0.0
    ii = opts.ignore_index
    C = x.shape[ax]
    if C == 0:
        raise ValueError("the class axis has no classes (C = 0)")
    t_shape = x.shape[:ax] + x.shape[ax + 1 :]
    last = ax == x.ndim - 1
    squeeze = not last and all(d == 1 for d in x.shape[ax + 1 :])
    if squeeze:
        last = True  # only length-1 axes follow the class axis: read it as the last one

    def rows_or_cols(a: np.ndarray) -> np.ndarray:
        if squeeze:
            a = a.reshape(a.shape[: ax + 1])
        return rows_view(a) if last else cols_view(a, ax)

    half = half_kind(x.dtype)
    cdt = np.dtype(np.float32) if half is not None else x.dtype  # compute / weight dtype
    if extras and not last:
        raise NotImplementedError(
            "outputs= and entropy_coef are implemented with the class axis last (axis=-1) "
            f"only, not axis={kw['axis']}"
        )
    tgt = _to_numpy(target, "target")
    probs = None
    t = None
    if (tgt.dtype.kind == "f" or half_kind(tgt.dtype) is not None) and tgt.ndim == x.ndim:
        if tgt.shape != x.shape:
            raise ValueError(
                f"probability target has shape {tgt.shape}, expected the logits' shape {x.shape}"
            )
        if ii != -100:
            raise ValueError(
                "ignore_index applies to class-index targets only; probability "
                "targets weight rows with sample_weight instead"
            )
        # Another dtype than the logits' is converted (a copy); the logits' dtype is read in place.
        pr = tgt if tgt.dtype == x.dtype else tgt.astype(x.dtype)
        if half is not None:
            pr = pr.view(np.uint16)
        probs = rows_or_cols(pr)
    else:
        t = as_target(tgt, t_shape, C, ii, -1 if ax == x.ndim - 1 else ax)
    if names is not None and probs is not None:
        bad = [n for n in ("target_logprob", "accuracy") if n in names]
        if bad:
            raise ValueError(f"outputs {bad} need class-index targets, not probabilities")
    w = as_vector(kw["weight"], cdt, (C,), "weight", "one per class")
    sw = as_vector(kw["sample_weight"], cdt, t_shape, "sample_weight", "one per row")
    grad = None
    if want_grad:
        if out is None:
            grad = np.empty(x.shape, x.dtype)
        else:
            grad = check_out(out, x, (("target", tgt), ("weight", w), ("sample_weight", sw)))
    xv = x if half is None else x.view(np.uint16)
    view = rows_or_cols(xv)
    rows = view.shape[0] if last else view.shape[0] * view.shape[2]
    row_losses = np.empty(rows, cdt) if opts.reduction == 0 else None
    outs: "dict[str, np.ndarray]" = {}
    if names is not None:
        for n in kernel_outputs(names):
            outs[n] = np.empty(rows, np.int64 if n == "argmax" else cdt)
    g2 = None
    if grad is not None:
        g2 = (grad if half is None else grad.view(np.uint16)).reshape(view.shape)
    try:
        if x.size == 0:
            # No rows (a zero-size axis besides the class axis): nothing to read or write;
            # "sum" and "mean" are 0 (no row counts: the D = 0 rule), "none" is empty.
            total = 0.0
        elif half is None:
            total = _core.cross_entropy(view, t, probs, w, sw, opts.core(), g2, row_losses, **outs)
        else:
            total = _core.cross_entropy_half(
                view, half, t, probs, w, sw, opts.core(), g2, row_losses, **outs
            )
    except IndexError:
        raise_bad_target(np.asarray(target), C, ii)
        raise
    if row_losses is not None:
        loss: Union[np.ndarray, np.floating] = row_losses.reshape(t_shape)
    else:
        loss = cdt.type(total)
    if names is None:
        return (loss, grad) if want_grad else loss
    stats = _row_stats(names, outs, t, ii, t_shape)
    return (loss, grad, stats) if want_grad else (loss, stats)


def _row_stats(
    names: tuple, outs: dict, t: Optional[np.ndarray], ii: int, shape: tuple
) -> RowStats:
    """The RowStats of the names asked for, from the kernel's per-row arrays."""
    fields: "dict[str, Any]" = {
        n: outs[n].reshape(shape) for n in ("lse", "entropy", "target_logprob") if n in outs
    }
    if "argmax" in names:
        fields["argmax"] = outs["argmax"].reshape(shape)
    if "accuracy" in names:
        am = outs["argmax"]
        counted = t != ii
        nc = int(np.count_nonzero(counted))
        fields["accuracy"] = float(np.count_nonzero((am == t) & counted)) / nc if nc else 0.0
    return RowStats(**fields)


_DOC_FORMULA = """
    With ``z'`` the transformed logits (``softcap * tanh(logit_scale * z / softcap)``, or
    ``logit_scale * z`` without a softcap), ``lse_n = logsumexp(z'_n)``, class weights ``w``
    (ones when ``weight`` is None), sample weights ``s`` (ones when ``sample_weight`` is None),
    smoothing ``eps`` and ``C`` classes, a counted row (``target[n] != ignore_index``) costs::

        row_n = s_n * [(1 - eps) * w[y_n] * (lse_n - z'[n, y_n])
                       + (eps / C) * sum_c w_c * (lse_n - z'[n, c]) + z_loss * lse_n**2]

    and an ignored row 0. With probability targets ``p`` (a float ``target`` of the logits'
    shape; they need not sum to 1), ``q = p * (1 - eps) + eps / C`` and::

        row_n = s_n * [sum_c w_c * q[n, c] * (lse_n - z'[n, c]) + z_loss * lse_n**2]

    ``"sum"`` adds the rows; ``"mean"`` divides the sum by ``D``: ``normalizer`` when given,
    else ``sum_n s_n * w[y_n]`` over counted rows (PyTorch's denominator), or ``sum_n s_n``
    for probability targets. ``"none"`` returns ``row_n`` per row. If ``D = 0`` the loss and
    the gradient are 0. With no options this is PyTorch's ``F.cross_entropy``.
"""

_DOC_PARAMS = """
    Parameters
    ----------
    logits : array_like, float32, float64, float16 or bfloat16 (ml_dtypes), shape (..., C)
        Leading axes are rows. Strided, sliced or Fortran-ordered input is accepted and gives
        bit-identical results to its contiguous copy. 16-bit logits are computed in float32
        (converted in fixed chunks of rows, never as a whole N x C copy); their loss is float32
        and their gradient is rounded once to the 16-bit type.
    target : array_like
        Class indices of any integer dtype, shape ``logits.shape[:-1]``, in ``[0, C)`` or
        equal to ``ignore_index``; or class probabilities, a float array of the logits' shape.
""" + keyword_docs(STATS)


_DOC_DIFF = """
    Differences from PyTorch (deliberate): when no row counts (all ignored, zero rows, or
    ``D = 0``) "mean" is 0.0 instead of NaN; an ignored row's loss and gradient are 0 whatever
    its logits hold (NaN and inf included); a row of all ``-inf`` logits has loss ``+inf``
    and the gradient of equal logits, not NaN.
"""

_DOC_RAISES = """
    Raises
    ------
    TypeError
        non-float logits; a target that is neither integer nor float.
    ValueError
        shape mismatch (target, weight, sample_weight), unknown reduction, C = 0,
        label_smoothing outside [0, 1], negative z_loss or normalizer, softcap or logit_scale
        not > 0, bad num_threads, ignore_index with probability targets.
    IndexError
        a class target outside [0, C) that is not ignore_index (the message names row and
        value).
    NotImplementedError
        ``outputs`` or ``entropy_coef`` with a class axis other than the last.
"""


_FAST_KEYWORDS = frozenset(("reduction", "num_threads"))


def _fast_ok(kw: Mapping[str, Any]) -> bool:
    """Every keyword but reduction at its default (spelled out or not: ignore_index=-100 is
    common) and num_threads None or a plain positive int: the condition of the fast path."""
    if not kw:
        return True
    if not _FAST_KEYWORDS.issuperset(kw):
        for k, v in kw.items():
            if k in _FAST_KEYWORDS:
                continue
            if k not in DEFAULTS:
                return False  # the general path raises
            d = DEFAULTS[k]
            if d is None:
                if v is not None:
                    return False
            elif not (type(v) in (int, float) and v == d):
                return False
    nt = kw.get("num_threads")
    return nt is None or (type(nt) is int and 0 < nt < 2**31)


_MEAN = REDUCTIONS["mean"]


def _fast(kw: Mapping[str, Any], logits: Any, target: Any, out: Any, want_grad: bool) -> Any:
    """The common small call in about a microsecond of overhead: no keyword but reduction and
    num_threads away from its default (:func:`_fast_ok`). Every other check is in
    _core.fast_call (exact ndarrays, C-contiguous 2-D float32/float64 logits, int64 targets,
    out= absent, the logits, or a separate array), which returns None when the call needs
    the general path (which also produces every error message)."""
    if not kw:
        return _core.fast_call(logits, target, _MEAN, want_grad, out, 0)
    if len(kw) == 1:
        # One keyword, the commonest ones checked here (a quarter of a microsecond less than
        # _fast_ok and the lookups below, on a call of two or three).
        nt = kw.get("num_threads")
        if type(nt) is int:
            if 0 < nt < 2**31:
                return _core.fast_call(logits, target, _MEAN, want_grad, out, nt)
            return None
        reduction = kw.get("reduction")
        if type(reduction) is str and reduction in REDUCTIONS:
            return _core.fast_call(logits, target, REDUCTIONS[reduction], want_grad, out, 0)
    if not _fast_ok(kw):
        return None
    reduction = kw.get("reduction", "mean")
    red = REDUCTIONS.get(reduction) if type(reduction) is str else None
    if red is None:
        return None
    return _core.fast_call(logits, target, red, want_grad, out, kw.get("num_threads") or 0)


@STATS
def cross_entropy(logits: Any, target: Any, **kw: Unpack[RowStatsKeywords]):
    res = (
        _core.fast_call(logits, target, _MEAN, False, None, 0)
        if not kw
        else _fast(kw, logits, target, None, False)
    )
    if res is not None:
        return res
    return _run(logits, target, STATS.bind("cross_entropy", kw), False, None)


cross_entropy.__doc__ = (
    """Softmax cross-entropy loss of a batch of logits (the loss alone: nothing N x C is
    written, the logits are read once).
"""
    + _DOC_FORMULA
    + _DOC_PARAMS
    + """
    Returns
    -------
    A NumPy scalar of the logits' dtype for "mean"/"sum" (rows accumulated in float64), or an
    array of shape ``logits.shape[:-1]`` for "none". With ``outputs=``: ``(loss, stats)``,
    ``stats`` a :class:`fastxent.RowStats`.
"""
    + _DOC_DIFF
    + _DOC_RAISES
    + """
    Example
    -------
    >>> import numpy as np, fastxent as fx
    >>> z = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]], dtype=np.float32)
    >>> float(fx.cross_entropy(z, np.array([0, 1])))  # doctest: +ELLIPSIS
    0.3185...
"""
)


@STATS
def cross_entropy_with_grad(
    logits: Any, target: Any, *, out: Optional[np.ndarray] = None, **kw: Unpack[RowStatsKeywords]
):
    # The commonest call (no keyword) without the frame of _fast: a tenth of a microsecond of
    # a call of about two and a half at 32 x 10.
    res = (
        _core.fast_call(logits, target, _MEAN, True, out, 0)
        if not kw
        else _fast(kw, logits, target, out, True)
    )
    if res is not None:
        return res
    return _run(logits, target, STATS.bind("cross_entropy_with_grad", kw), True, out)


cross_entropy_with_grad.__doc__ = (
    """Loss and its gradient d(loss)/d(logits) in one fused pass over memory.

    The loss is that of :func:`cross_entropy`."""
    + _DOC_FORMULA
    + """
    The gradient of row n (before the chain rule through the softcap and scale) is::

        grad[n, c] = (s_n / D) * ((Q_n + 2 * z_loss * lse_n) * softmax(z'_n)_c - u[n, c])

    with ``u[n, c] = (1 - eps) * w[y_n] * [c == y_n] + (eps / C) * w_c`` (class targets) or
    ``w_c * q[n, c]`` (probability targets), ``Q_n = sum_c u[n, c]``, and ``D = 1`` for "sum"
    and "none" ("none" gives the gradient of the sum of the row losses). The softcap
    multiplies it by ``logit_scale * (1 - (z'/softcap)**2)``, the scale alone by
    ``logit_scale``. Ignored rows get a gradient of exactly 0.
"""
    + _DOC_PARAMS
    + """    out : ndarray, optional
        Where to write the gradient: the logits' shape and dtype, C-contiguous and writable.
        ``out=logits`` is the in-place mode: the logits are overwritten by the gradient and no
        second N x C buffer is needed.

    Returns
    -------
    (loss, grad): the loss as in :func:`cross_entropy`; grad has the logits' shape and dtype
    and is C-contiguous (it is ``out`` when given). With ``outputs=``: ``(loss, grad, stats)``,
    ``stats`` a :class:`fastxent.RowStats`; with ``entropy_coef`` the loss and gradient are those
    of ``CE - entropy_coef * reduce(s_n * entropy_n)``.
"""
    + _DOC_DIFF
    + _DOC_RAISES
    + """    ValueError
        also for an ``out`` of the wrong shape, dtype or layout, read-only, or partly
        overlapping the logits. On any error nothing is written: an in-place call with one
        bad label leaves the logits intact.

    Example
    -------
    >>> import numpy as np, fastxent as fx
    >>> z = np.array([[2.0, 1.0, 0.1]], dtype=np.float32)
    >>> loss, g = fx.cross_entropy_with_grad(z, np.array([0]))
    >>> np.round(g, 4)
    array([[-0.341 ,  0.2424,  0.0986]], dtype=float32)
"""
)
