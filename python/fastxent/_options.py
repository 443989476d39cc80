"""The array helpers shared by every front end (fastxent's NumPy functions, the shard, sigmoid
and companion functions, fastxent.dask, .torch and .jax): zero-copy conversion of array-likes
(DLPack, buffer protocol), the (rows, C) and (outer, C, inner) views the kernel reads, target /
weight / ``out=`` checks, and the error naming a bad class index. The scalar options
(LossOptions and its validators) live in _keywords and are re-exported here.

Every check raises before the kernel writes a byte. The error messages are part of the tested
behaviour: change them only together with the tests.
"""

from __future__ import annotations

import operator
from typing import Any, Optional, Tuple

import numpy as np

from ._keywords import (  # noqa: F401 (re-exported: the scalar options live in _keywords)
    REDUCTIONS,
    LossOptions,
    common_options,
    flag,
    index,
    real,
    reduction_code,
    threads,
)

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------- arrays


def half_kind(dt: np.dtype) -> Optional[int]:
    """0 for float16, 1 for bfloat16 (ml_dtypes), None otherwise."""
    if dt == np.float16:
        return 0
    if dt.itemsize == 2 and dt.name == "bfloat16":
        return 1
    return None


_DLPACK_CPU = 1  # kDLCPU


def to_numpy(obj: Any, name: str) -> np.ndarray:
    """A NumPy array over obj's memory without a copy: NumPy arrays as they are, DLPack
    exporters (PyTorch CPU tensors, JAX CPU arrays, ...) through np.from_dlpack, anything
    else (buffer protocol, sequences) through np.asarray. Arrays on another device are a
    TypeError: fastxent is a CPU kernel."""
    if type(obj) is np.ndarray:
        return obj
    if hasattr(obj, "__dlpack__") and not isinstance(obj, np.ndarray):
        dev = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else (_DLPACK_CPU, 0)
        if int(dev[0]) != _DLPACK_CPU:
            raise TypeError(
                f"{name}: fastxent is a CPU kernel, but this array lives on device "
                f"{dev} (move it to the CPU first, e.g. tensor.cpu())"
            )
        if getattr(obj, "requires_grad", False) and hasattr(obj, "detach"):
            obj = obj.detach()  # PyTorch refuses to export a tensor that requires grad
        if callable(getattr(obj, "is_neg", None)) and obj.is_neg():
            obj = obj.resolve_neg()  # a lazily negated PyTorch view: DLPack drops the sign bit
        try:
            return np.from_dlpack(obj)
        except (BufferError, TypeError, RuntimeError):
            # bfloat16 has no DLPack type NumPy knows: read PyTorch's bits as ml_dtypes',
            # and let other exporters (JAX) hand over a NumPy array of their own.
            if type(obj).__module__.startswith("torch") and str(obj.dtype) == "torch.bfloat16":
                import ml_dtypes
                import torch

                return np.from_dlpack(obj.view(torch.int16)).view(ml_dtypes.bfloat16)
            return np.asarray(obj)
    return np.asarray(obj)


def check_axis(axis: Any, ndim: int) -> int:
    try:
        ax = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
    if not -ndim <= ax < ndim:
        raise ValueError(f"axis {ax} is out of bounds for logits with {ndim} dimensions")
    return ax % ndim


def rows_view(x: np.ndarray) -> np.ndarray:
    """A 2-D (rows, C) view of x sharing its memory when the class axis is contiguous and
    the leading axes collapse to one row stride; otherwise a C-contiguous copy (which gives
    bit-identical results, the kernel never sees the difference)."""
    C = x.shape[-1]
    if x.flags.c_contiguous:
        return x if x.ndim == 2 else x.reshape(-1, C)
    isz = x.itemsize
    if C == 1 or x.strides[-1] == isz:
        # Leading axes collapse when each stride equals the next one's stride times its size
        # (axes of length 1 do not matter).
        lead = [(n, s) for n, s in zip(x.shape[:-1], x.strides[:-1]) if n != 1]
        ok = all(s0 == s1 * n1 for (_, s0), (n1, s1) in zip(lead, lead[1:]))
        row_stride = lead[-1][1] if lead else C * isz
        if ok and row_stride >= C * isz and row_stride % isz == 0:
            rows = int(np.prod(x.shape[:-1], dtype=np.int64))
            return np.lib.stride_tricks.as_strided(x, (rows, C), (row_stride, isz), writeable=False)
    return np.ascontiguousarray(x).reshape(-1, C)


def cols_view(x: np.ndarray, ax: int) -> np.ndarray:
    """The (outer, C, inner) view of a class axis that is not the last one: no transposed
    copy (a C-contiguous copy only when x is not C-contiguous itself)."""
    outer = int(np.prod(x.shape[:ax], dtype=np.int64))
    inner = int(np.prod(x.shape[ax + 1 :], dtype=np.int64))
    return np.ascontiguousarray(x).reshape(outer, x.shape[ax], inner)


def as_target(
    target: Any, shape: Tuple[int, ...], C: int, ignore_index: int, axis: int = -1
) -> np.ndarray:
    """Class indices of the given rows shape as a flat C-contiguous int64 array."""
    t = target if type(target) is np.ndarray else np.asarray(target)
    if t.dtype == np.int64 and t.shape == shape and t.flags.c_contiguous:
        return t.reshape(-1)  # the common case, without a copy
    if t.dtype.kind not in "iu":
        raise TypeError(
            f"target must hold integer class indices (shape {shape}) or float "
            f"class probabilities (shape {shape + (C,)}), got dtype {t.dtype}"
        )
    if t.shape != shape:
        where = "the class axis" if axis == -1 else f"the class axis {axis}"
        raise ValueError(
            f"target has shape {t.shape}, expected {shape} (the logits' shape without {where})"
        )
    if t.dtype == np.uint64 and t.size and int(t.max()) > np.iinfo(np.int64).max:
        raise_bad_target(t, C, ignore_index)
    return np.ascontiguousarray(t, dtype=np.int64).reshape(-1)


def raise_bad_target(t: np.ndarray, C: int, ignore_index: int) -> None:
    """IndexError naming the first class index outside [0, C) that is not ignore_index."""
    tt = t.astype(object) if t.dtype == np.uint64 else t
    bad = (tt != ignore_index) & ((tt < 0) | (tt >= C))
    flat = int(np.flatnonzero(np.asarray(bad).reshape(-1))[0])
    idx = np.unravel_index(flat, t.shape)
    where = f"target[{', '.join(str(int(i)) for i in idx)}]" if t.ndim != 1 else f"target[{flat}]"
    raise IndexError(
        f"{where} = {t.reshape(-1)[flat]} is out of range: class indices must be "
        f"in [0, {C}) or equal ignore_index ({ignore_index})"
    )


def as_vector(
    v: Any, dtype: np.dtype, shape: Tuple[int, ...], name: str, what: str
) -> Optional[np.ndarray]:
    """None, or v (numeric, of the given shape) as a flat C-contiguous array of dtype."""
    if v is None:
        return None
    w = to_numpy(v, name)
    if w.dtype.kind not in "fiu" and half_kind(w.dtype) is None:
        raise TypeError(f"{name} must be numeric, got dtype {w.dtype}")
    if w.shape != shape:
        raise ValueError(f"{name} has shape {w.shape}, expected {shape} ({what})")
    return np.ascontiguousarray(w, dtype=dtype).reshape(-1)


def check_out(
    out: Any, x: np.ndarray, inputs: Any = (), name: str = "out", x_name: str = "logits"
) -> np.ndarray:
    """An output buffer (the argument `name`: out=, or e.g. teacher_out=) as a NumPy array over
    its memory, checked against the array x it holds the gradient of (the argument `x_name`):
    dtype, shape, C-contiguous, writable, not partly overlapping x (x itself is the in-place
    mode), and not overlapping any of the (name, array) pairs in inputs. Every message names
    `name`."""
    of = "the logits" if x_name == "logits" else f"the {x_name}"
    whose = of + ("'" if of.endswith("s") else "'s")
    if not isinstance(out, np.ndarray):
        if not hasattr(out, "__dlpack__"):
            raise TypeError(
                f"{name} must be a NumPy array or a CPU DLPack array, got {type(out).__name__}"
            )
        out = to_numpy(out, name)
    if out.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {out.dtype}, expected {x.dtype} ({whose} dtype)")
    if out.shape != x.shape:
        raise ValueError(f"{name} has shape {out.shape}, expected {x.shape} ({whose} shape)")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if out is not x and np.may_share_memory(out, x):
        same = out.ctypes.data == x.ctypes.data and out.strides == x.strides
        if not same:
            raise ValueError(
                f"{name} overlaps {of} without being the same array: "
                f"pass {name}={x_name} itself for the in-place mode"
            )
    for other, arr in inputs:
        if isinstance(arr, np.ndarray) and np.may_share_memory(out, arr):
            raise ValueError(f"{name} overlaps {other}")
    return out
