"""fastxent.torch's fast paths (private): the pool of gradient buffers reused across
calls, the fused kernel call writing into it, and the lean path (a plain call without
options: checks on the tensors and one kernel call by address)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _api, _core
from ._torch_common import (
    ML_BF16,
    direct_logits,
    first_order,
    is_wrapped,
    numpy_of,
    reference_grads,
    tensor_of,
)

# The NumPy storage of a gradient buffer per tensor dtype (bfloat16 as its int16 bits).
_STORAGE = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(np.int16),
}


class _GradPool:
    """Gradient buffers kept between calls, so that a training loop's default (non-inplace)
    path does not map and fault in a fresh logits-sized array every step (50-700 ms per step
    for 400 MB on cloud VMs). A buffer is handed out again only when nothing else references
    its memory: every tensor over it (the gradient autograd passed on, any view of it, a
    `.grad` that kept it) holds its storage, and the storage holds the NumPy array, so the
    array's reference count says whether any of them is alive. Buffers under `min_bytes` are
    not kept (a small allocation is cheap and reuses the heap); at most `max_buffers` are
    (the least recently used goes first). Thread-safe: a buffer is handed out and wrapped in
    its tensor under one lock."""

    def __init__(self, max_buffers: int = 2, min_bytes: int = 1 << 20) -> None:
        import collections
        import threading

        self.max_buffers = max_buffers
        self.min_bytes = min_bytes
        self._bufs: "collections.OrderedDict[Tuple[Any, ...], np.ndarray]" = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        # The reference count of a buffer nobody else holds, as _refs reads it: measured on
        # a probe rather than assumed, since what getrefcount sees of the interpreter's own
        # temporaries differs between Python versions.
        self._bufs[("probe",)] = np.empty(0)
        self._free = self._refs(("probe",))
        del self._bufs[("probe",)]

    def _refs(self, key: Tuple[Any, ...]) -> int:
        import sys

        return sys.getrefcount(self._bufs[key])

    def take(
        self, shape: Tuple[int, ...], dtype: torch.dtype
    ) -> Optional[Tuple[np.ndarray, Tensor]]:
        """(array, tensor over it) to write a gradient of `shape` and `dtype` into, or None
        (a small gradient: let the kernel allocate it)."""
        n = _STORAGE[dtype].itemsize
        for d in shape:
            n *= d
        if n < self.min_bytes or self.max_buffers <= 0:
            return None
        key = (tuple(int(d) for d in shape), dtype)
        with self._lock:
            if key not in self._bufs or self._refs(key) > self._free:
                # (a busy buffer is dropped here: it stays with whoever holds it)
                self._bufs[key] = np.empty(key[0], _STORAGE[dtype])
                while len(self._bufs) > self.max_buffers:
                    self._bufs.popitem(last=False)
            self._bufs.move_to_end(key)
            buf = self._bufs[key]
            t = tensor_of(buf, dtype)  # now referenced: no other caller gets it
        if dtype == torch.bfloat16:
            assert ML_BF16 is not None
            return buf.view(ML_BF16), t
        return buf, t

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()

    def nbytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._bufs.values())


POOL = _GradPool()


def release_buffers() -> int:
    """Drops the gradient buffers fastxent.torch keeps between calls (see
    :func:`cross_entropy`'s memory note) and returns how many bytes they held; memory still
    referenced by a live tensor is freed when that tensor goes."""
    n = POOL.nbytes()
    POOL.clear()
    return n


def kept_buffer_bytes() -> int:
    """Bytes of the gradient buffers fastxent.torch keeps for reuse (0 after
    :func:`release_buffers`)."""
    return POOL.nbytes()


def fused(
    input: Tensor,
    tgt: np.ndarray,
    cdt: torch.dtype,
    kw: Dict[str, Any],
    outputs: Optional[Tuple[str, ...]] = None,
) -> Any:
    """(loss, gradient) by the kernel, the gradient in a kept buffer when it is large; with
    `outputs` (the per-row statistics' names), (loss, gradient, RowStats)."""
    if outputs is not None:
        kw = dict(kw, outputs=outputs)
    x = direct_logits(input, tgt)
    if x is None:  # bfloat16 without ml_dtypes, or probabilities of another dtype: float32
        res = _api.cross_entropy_with_grad(numpy_of(input, cdt), tgt, **kw)
        return (res[0], torch.from_numpy(res[1]).to(input.dtype)) + tuple(res[2:])
    taken = POOL.take(tuple(input.shape), input.dtype)
    if taken is None:
        res = _api.cross_entropy_with_grad(x, tgt, **kw)
        return (res[0], tensor_of(res[1], input.dtype)) + tuple(res[2:])
    res = _api.cross_entropy_with_grad(x, tgt, out=taken[0], **kw)
    return (res[0], taken[1]) + tuple(res[2:])


_LEAN_RED = {"none": 0, "sum": 1, "mean": 2}
_LEAN_DTYPES = (torch.float32, torch.float64)
_ITEMSIZE = {torch.float32: 4, torch.float64: 8}
_SCALAR = {dt: torch.empty((), dtype=dt) for dt in _LEAN_DTYPES}  # templates for empty_like
_empty_like = torch.empty_like
is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_LEAN_KW = {
    r: dict(
        axis=1, reduction=r, weight=None, ignore_index=-100, label_smoothing=0.0, sample_weight=None
    )
    for r in _LEAN_RED
}


def lean_call(input: Tensor, target: Tensor, reduction: Any) -> Optional[Tensor]:
    """The common call without options (2-D float32/float64 logits, int64 class indices),
    through _core.fast_call: about as much Python as F.cross_entropy's call. None when it
    does not apply (anything else, or a bad call: the general path then gives the error)."""
    red = _LEAN_RED.get(reduction) if type(reduction) is str else None
    if (
        red is None
        or type(input) is not Tensor
        or type(target) is not Tensor
        or input.dtype not in _LEAN_DTYPES
        or target.dtype != torch.int64
        or input.ndim != 2
        or input.is_neg()
        or target.is_neg()
        or not (input.is_cpu and target.is_cpu)
        or fwAD._current_level >= 0
        or _functorch_active()
        or is_wrapped(input)
        or is_wrapped(target)
        or input._is_zerotensor()
        or target._is_zerotensor()
    ):
        return None
    N, C = input.shape
    if (
        C == 0
        or N == 0
        or target.shape != (N,)
        or not input.is_contiguous()
        or not target.is_contiguous()
    ):
        return None
    if not (input.requires_grad and torch.is_grad_enabled()):
        loss = _lean_loss(input, target, red)
        ok = _core.fast_call_raw(
            input.data_ptr(),
            N,
            C,
            _ITEMSIZE[input.dtype],
            target.data_ptr(),
            red,
            0,
            loss.data_ptr(),
        )
        return loss if ok else None
    try:
        # autograd.Function.apply's C part directly: its Python part only binds default
        # arguments (there are none) and unwraps functorch tensors (ruled out above).
        return _lean_apply(input, target, reduction, red)
    except _BadTarget:
        return None


class _BadTarget(Exception):
    """A class index out of range met by the lean path (nothing written that anyone sees)."""


class _LeanCrossEntropy(torch.autograd.Function):
    """_FusedCrossEntropy for the lean path (no options, 2-D logits, int64 class indices, no
    forward-mode tangent), with the per-call Python kept to a minimum: the kernel is called
    on the tensors' addresses. The same derivatives: first order by first_order, second
    order (create_graph=True) through reference_grads."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, reduction: str, red: int) -> Tensor:
        loss, grad = _lean_kernel(input, target, red)
        ctx.save_for_backward(input, target)  # read (version-checked) by second order only
        ctx.grad = grad
        ctx.red = red
        ctx.kw = _LEAN_KW[reduction]
        ctx.inplace = False
        ctx.class_dim = 1 if red == 0 else None
        return loss

    @staticmethod
    def backward(ctx, go: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiable, by the formula
            input, target = ctx.saved_tensors
            gz, _ = reference_grads(input, target, ctx.kw, go, (True, False), True)
            return gz, None, None, None

        def recompute() -> Tensor:
            input, target = ctx.saved_tensors
            return _lean_kernel(input, target, ctx.red)[1]

        return first_order(ctx, go, recompute), None, None, None


def _lean_loss(input: Tensor, target: Tensor, red: int) -> Tensor:
    """A fresh loss tensor of the lean path: N row losses, or a 0-d tensor (empty_like of a
    template: about half the time of torch.empty with a shape and dtype)."""
    if red == 0:
        return _empty_like(target, dtype=input.dtype)
    return _empty_like(_SCALAR[input.dtype])


def _lean_kernel(input: Tensor, target: Tensor, red: int) -> Tuple[Tensor, Tensor]:
    """(loss, gradient) of the lean path, on the tensors' memory (checked by lean_call)."""
    N, C = input.shape
    size = _ITEMSIZE[input.dtype]
    taken = POOL.take(input.shape, input.dtype) if N * C * size >= POOL.min_bytes else None
    # (input is contiguous: empty_like gives a contiguous gradient)
    grad = _empty_like(input) if taken is None else taken[1]
    loss = _lean_loss(input, target, red)
    if not _core.fast_call_raw(
        input.data_ptr(), N, C, size, target.data_ptr(), red, grad.data_ptr(), loss.data_ptr()
    ):
        raise _BadTarget  # the general path gives the error, naming the row
    return loss, grad


_lean_apply = super(torch.autograd.Function, _LeanCrossEntropy).apply
