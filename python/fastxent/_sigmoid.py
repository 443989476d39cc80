"""Sigmoid (binary / multi-label) cross-entropy with logits around the compiled kernel.

Everything is checked here, or in the C++ core, before the kernel writes a byte, so a bad
call leaves ``out=`` and the logits exactly as they were.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _core
from ._options import FLOAT_DTYPES, LossOptions, check_out, reduction_code, threads

__all__ = ["sigmoid_cross_entropy", "sigmoid_cross_entropy_with_grad"]


def _as_logits(logits: Any) -> np.ndarray:
    x = logits if type(logits) is np.ndarray else np.asarray(logits)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32 or float64, got {x.dtype}")
    return x


def _as_target(target: Any, x: np.ndarray) -> np.ndarray:
    if isinstance(target, (np.ndarray, np.generic)):
        t = np.asarray(target)
        if t.dtype != x.dtype:
            raise TypeError(f"target must have the logits' dtype {x.dtype}, got {t.dtype}")
    else:  # a list or a scalar: read as the logits' dtype
        try:
            t = np.asarray(target, dtype=x.dtype)
        except (TypeError, ValueError):
            raise TypeError(
                f"target must be an array of {x.dtype}, got {type(target).__name__}"
            ) from None
    if t.shape != x.shape:
        raise ValueError(f"target has shape {t.shape}, expected the logits' shape {x.shape}")
    return np.ascontiguousarray(t)


def check_broadcast(shape: Tuple[int, ...], to: Tuple[int, ...], name: str, whose: str) -> None:
    """ValueError unless an operand of `shape` broadcasts to `to` (weight, pos_weight)."""
    try:
        ok = np.broadcast_shapes(tuple(shape), tuple(to)) == tuple(to)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} has shape {tuple(shape)}, which does not broadcast to the "
            f"{whose} shape {tuple(to)}"
        )


def _as_operand(v: Any, x: np.ndarray, name: str) -> Tuple[Optional[np.ndarray], int]:
    """(array, mode) for the kernel: mode 0 absent, 1 one value per position of the last
    axis (shape (C,)), 2 one value per element (the logits' shape)."""
    if v is None:
        return None, 0
    a = np.asarray(v)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be numeric, got dtype {a.dtype}")
    check_broadcast(a.shape, x.shape, name, "logits'")
    if x.size == 0:
        return None, 0
    if all(d == 1 for d in a.shape[:-1]):
        C = x.shape[-1] if x.ndim else 1
        col = a.reshape(a.shape[-1:] if a.ndim else (1,))
        return np.ascontiguousarray(np.broadcast_to(col, (C,)), dtype=x.dtype), 1
    return np.ascontiguousarray(np.broadcast_to(a, x.shape), dtype=x.dtype), 2


# The sigmoid loss reads only the reduction and the thread count: one shared _core.Options per
# pair (integer keys, so a cached object is exactly the one that would be built; never
# modified), which keeps the small call's cost where it was before options were objects.
_CORE_OPTIONS: Dict[Tuple[int, int], Any] = {}


def _core_options(red: int, nt: int) -> Any:
    opt = _CORE_OPTIONS.get((red, nt))
    if opt is None:
        if len(_CORE_OPTIONS) > 64:
            _CORE_OPTIONS.clear()
        opt = _CORE_OPTIONS[(red, nt)] = LossOptions(reduction=red, num_threads=nt).core()
    return opt


def _run(
    logits: Any,
    target: Any,
    reduction: Any,
    weight: Any,
    pos_weight: Any,
    num_threads: Any,
    want_grad: bool,
    out: Any,
):
    red = reduction_code(reduction)
    nt = threads(num_threads)
    x = _as_logits(logits)
    t = _as_target(target, x)
    pw, pw_mode = _as_operand(pos_weight, x, "pos_weight")
    w, w_mode = _as_operand(weight, x, "weight")
    grad = None
    if want_grad:
        if out is None:
            grad = np.empty(x.shape, x.dtype)
        else:
            grad = check_out(
                out,
                x,
                (
                    ("target", target),
                    ("target", t),
                    ("weight", weight),
                    ("weight", w),
                    ("pos_weight", pos_weight),
                    ("pos_weight", pw),
                ),
            )
    xc = x if grad is x else np.ascontiguousarray(x)
    losses = np.empty(x.shape, x.dtype) if red == 0 else None
    last = x.shape[-1] if x.ndim and x.size else 1
    total = _core.sigmoid_cross_entropy(
        xc, t, pw, pw_mode, w, w_mode, last, _core_options(red, nt), grad, losses
    )
    with np.errstate(over="ignore"):  # a float64 sum beyond float32's range is inf
        loss = losses if red == 0 else x.dtype.type(total)
    return (loss, grad) if want_grad else loss


_DOC = """
    Binary / multi-label cross-entropy with logits (PyTorch's
    ``F.binary_cross_entropy_with_logits``): every element is an independent binary
    problem. With logits ``x``, targets ``y`` (probabilities, usually in [0, 1]), ``p =
    pos_weight`` and ``w = weight`` (ones when absent), each element costs::

        loss = w * ((1 - y) * x + (1 + (p - 1) * y) * softplus(-x))

    ``"mean"`` divides the sum by the number of elements, ``"sum"`` adds them, ``"none"``
    returns them (the logits' shape). The gradient is::

        grad = s * w * ((1 + (p - 1) * y) * sigmoid(x) - p * y)

    with ``s = 1 / n`` for "mean" and 1 otherwise ("none": the gradient of the sum).

    Any shape; only ``pos_weight`` and ``weight`` see the last axis. Computed stably for any
    finite logit (no overflow, never NaN); a logit of +-inf gives a finite gradient and a loss
    of +inf, or 0 where its factor is 0. NaN propagates. float32 or float64 (float32 results
    within a few ULP of the exact ones; sums accumulated in float64, bitwise identical for
    every ``num_threads``).

    Parameters
    ----------
    logits : array_like, float32 or float64, any shape
    target : array_like, the logits' shape
        A NumPy array or scalar must have the logits' dtype; a list or a Python number
        is read as that dtype.
    reduction : {"mean", "sum", "none"}
    weight : array_like, optional
        Broadcastable to the logits' shape: shape ``(C,)`` (the last axis), the full shape, or
        anything NumPy broadcasts (e.g. ``(N, 1)``).
    pos_weight : array_like, optional
        Weight of the positive term, broadcast the same way (usually shape ``(C,)``).
    num_threads : int, optional
        Caps the OpenMP threads of this call (default: OpenMP's).
"""

_DOC_TAIL = """
    Differences from PyTorch (deliberate): "mean" of zero elements is 0.0, not NaN; a zero
    factor times an infinite logit is 0, not NaN (e.g. ``x = +inf, y = 1`` costs 0 with a
    gradient of 0; a zero weight zeroes an infinite loss).

    Raises
    ------
    TypeError
        non-float logits; a target array of another dtype; a non-numeric weight/pos_weight.
    ValueError
        shape mismatch (target, weight, pos_weight), unknown reduction, bad num_threads.
"""


def sigmoid_cross_entropy(
    logits: Any,
    target: Any,
    *,
    reduction: str = "mean",
    weight: Any = None,
    pos_weight: Any = None,
    num_threads: Optional[int] = None,
):
    return _run(logits, target, reduction, weight, pos_weight, num_threads, False, None)


sigmoid_cross_entropy.__doc__ = (
    """Sigmoid cross-entropy loss (nothing of the input's size
    is written: the inputs are read once).
"""
    + _DOC
    + _DOC_TAIL
    + """
    Returns
    -------
    A NumPy scalar of the logits' dtype for "mean"/"sum", or an array of the logits' shape
    for "none".

    Example
    -------
    >>> import numpy as np, fastxent as fx
    >>> x = np.array([[2.0, -1.0], [0.5, 3.0]], dtype=np.float32)
    >>> y = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    >>> round(float(fx.sigmoid_cross_entropy(x, y)), 4)
    0.3657
"""
)


def sigmoid_cross_entropy_with_grad(
    logits: Any,
    target: Any,
    *,
    reduction: str = "mean",
    weight: Any = None,
    pos_weight: Any = None,
    num_threads: Optional[int] = None,
    out: Optional[np.ndarray] = None,
):
    return _run(logits, target, reduction, weight, pos_weight, num_threads, True, out)


sigmoid_cross_entropy_with_grad.__doc__ = (
    """Sigmoid cross-entropy loss and its gradient
    d(loss)/d(logits) in one pass.
"""
    + _DOC
    + """    out : ndarray, optional
        Where to write the gradient: the logits' shape and dtype, C-contiguous and writable.
        ``out=logits`` is the in-place mode (the logits are overwritten by the gradient).
"""
    + _DOC_TAIL
    + """    ValueError
        also for an ``out`` of the wrong shape, dtype or layout, read-only, or overlapping an
        input other than being the logits themselves. Nothing is written on any error.

    Returns
    -------
    (loss, grad): the loss as in :func:`sigmoid_cross_entropy`; grad has the logits' shape
    and dtype (it is ``out`` when given).
"""
)
