"""softmax, log_softmax, logsumexp, softmax_backward and softmax_jacobian: the same SIMD block
pass as the loss (per-block max and sum merged in double), one elementwise pass after it."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core
from ._options import check_axis, half_kind, rows_view, threads, to_numpy

__all__ = ["softmax", "log_softmax", "logsumexp", "softmax_backward", "softmax_jacobian"]


def _prepare(x: Any, axis: Any, name: str):
    a = to_numpy(x, name)
    half = half_kind(a.dtype) is not None
    if a.dtype not in (np.float32, np.float64) and not half:
        raise TypeError(f"{name}: x must be float32, float64, float16 or bfloat16, got {a.dtype}")
    if a.ndim == 0:
        raise ValueError(f"{name}: x must have at least one dimension")
    ax = check_axis(axis, a.ndim)
    if a.shape[ax] == 0:
        raise ValueError(f"{name}: the axis has length 0")
    work = np.moveaxis(a, ax, -1)  # a view; non-last axes are copied below (documented)
    if half:
        work = work.astype(np.float32)  # float32 math for 16-bit input (a documented copy)
    return a, ax, half, work


def _rowwise(x: Any, axis: Any, which: int, name: str, num_threads: Optional[int]):
    a, ax, half, work = _prepare(x, axis, name)
    nt = threads(num_threads)
    C = work.shape[-1]
    view = rows_view(work)
    if which == 2:
        out = np.empty(view.shape[0], work.dtype)
        _core.companion(view, out, which, nt)
        res = out.reshape(work.shape[:-1])
        return res.astype(a.dtype) if half else res
    out = np.empty(view.shape, work.dtype)
    _core.companion(view, out, which, nt)
    res = np.moveaxis(out.reshape(work.shape[:-1] + (C,)), -1, ax)
    res = np.ascontiguousarray(res) if ax != a.ndim - 1 else res
    return res.astype(a.dtype) if half else res


def softmax(x: Any, axis: int = -1, *, num_threads: Optional[int] = None) -> np.ndarray:
    """Softmax along ``axis``: ``exp(x - lse) `` with ``lse = logsumexp(x, axis)``.

    Stable for any input: -inf entries get 0; a slice of all -inf gives NaN (as PyTorch).
    float32/float64 in SIMD; float16/bfloat16 computed in float32 and rounded back; an axis
    other than the last is moved last first (a copy). Raises TypeError for other dtypes and
    ValueError for a bad axis or an empty one.

    >>> import numpy as np, fastxent as fx
    >>> np.round(fx.softmax(np.array([1.0, 2.0, 3.0])), 4)
    array([0.09  , 0.2447, 0.6652])
    """
    return _rowwise(x, axis, 0, "softmax", num_threads)


def log_softmax(x: Any, axis: int = -1, *, num_threads: Optional[int] = None) -> np.ndarray:
    """``x - logsumexp(x, axis)``, stable (the same single exp pass as the loss).

    >>> import numpy as np, fastxent as fx
    >>> np.round(fx.log_softmax(np.array([1.0, 2.0, 3.0])), 4)
    array([-2.4076, -1.4076, -0.4076])
    """
    return _rowwise(x, axis, 1, "log_softmax", num_threads)


def logsumexp(x: Any, axis: int = -1, *, num_threads: Optional[int] = None) -> np.ndarray:
    """``log(sum(exp(x), axis))`` computed as ``max + log(sum(exp(x - max)))`` (blocks of 16 KiB
    merged in double); -inf for a slice of all -inf, NaN if the slice holds a NaN.

    >>> import numpy as np, fastxent as fx
    >>> float(np.round(fx.logsumexp(np.array([1.0, 2.0, 3.0])), 4))
    3.4076
    """
    return _rowwise(x, axis, 2, "logsumexp", num_threads)


def softmax_backward(
    probs: Any, grad: Any, axis: int = -1, *, num_threads: Optional[int] = None
) -> np.ndarray:
    """Vector-Jacobian product of softmax: ``probs * (grad - sum(probs * grad, axis))``.

    ``probs`` is a softmax output, ``grad`` the upstream gradient d(L)/d(probs) of the same
    shape; the result is d(L)/d(logits), without forming the C x C Jacobian
    ``diag(a) - a a^T``. Raises ValueError on a shape mismatch.

    >>> import numpy as np, fastxent as fx
    >>> a = fx.softmax(np.array([1.0, 2.0, 3.0]))
    >>> np.round(fx.softmax_backward(a, np.array([1.0, 0.0, 0.0])), 4)
    array([ 0.0819, -0.022 , -0.0599])
    """
    p = to_numpy(probs, "probs")
    g = to_numpy(grad, "grad")
    if p.shape != g.shape:
        raise ValueError(f"probs has shape {p.shape} but grad has {g.shape}")
    a, ax, half, work = _prepare(p, axis, "softmax_backward")
    nt = threads(num_threads)
    gw = np.moveaxis(g, ax, -1)
    gw = np.ascontiguousarray(gw, dtype=work.dtype)
    pw = np.ascontiguousarray(work)
    C = pw.shape[-1]
    out = np.empty(pw.shape, pw.dtype)
    _core.companion(pw.reshape(-1, C), out.reshape(-1, C), 3, nt, gw.reshape(-1, C))
    res = np.moveaxis(out, -1, ax)
    res = np.ascontiguousarray(res) if ax != a.ndim - 1 else res
    return res.astype(a.dtype) if half else res


def softmax_jacobian(x: Any) -> np.ndarray:
    """The explicit C x C Jacobian of softmax, ``diag(a) - a a^T`` with ``a = softmax(x)``, for
    a vector (C,) or a stack (..., C) -> (..., C, C). For teaching and for checking the chain
    rule (``g @ J`` equals :func:`softmax_backward`); the fused kernels never form it.

    >>> import numpy as np, fastxent as fx
    >>> J = fx.softmax_jacobian(np.array([0.0, 0.0]))
    >>> J
    array([[ 0.25, -0.25],
           [-0.25,  0.25]])
    """
    a = softmax(x)
    J = -a[..., :, None] * a[..., None, :]
    idx = np.arange(a.shape[-1])
    J[..., idx, idx] += a
    return J
