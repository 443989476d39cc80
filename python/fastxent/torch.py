"""PyTorch integration: fastxent's fused cross-entropy as a drop-in for ``F.cross_entropy``.

>>> import torch, fastxent.torch as fxt
>>> logits = torch.randn(8, 5, requires_grad=True)
>>> loss = fxt.cross_entropy(logits, torch.randint(0, 5, (8,)))
>>> loss.backward()          # the gradient was computed by the forward pass; this scales it

How it works: a ``torch.autograd.Function`` whose forward calls
:func:`fastxent.cross_entropy_with_grad` on zero-copy NumPy views of the (CPU) tensors, so the
loss and its gradient with respect to the logits come out of one pass over memory. The
gradient is kept for the backward pass, which only multiplies it by the incoming gradient
(``grad_output``; per row for ``reduction="none"``). When no gradient is needed (no input
requires grad, or grad mode is off) the forward-only kernel :func:`fastxent.cross_entropy` runs
instead and nothing of the logits' size is written.

:func:`vocab_parallel_cross_entropy` is the tensor-parallel variant: each rank of a
``torch.distributed`` process group holds a slice of the vocabulary (Megatron-LM's
vocab-parallel layout), the forward pass merges per-shard statistics with two all-reduces and
the backward pass is local.

Requires the optional extra: ``pip install fastxent[torch]``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

try:
    import torch
except ImportError as _e:  # pragma: no cover - exercised without torch installed
    raise ImportError("fastxent.torch needs PyTorch: pip install 'fastxent[torch]'") from _e
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from . import _api, _core, _shard
from . import _sigmoid as _api_sigmoid

__all__ = ["cross_entropy", "CrossEntropyLoss", "binary_cross_entropy_with_logits",
           "BCEWithLogitsLoss", "vocab_parallel_cross_entropy", "release_buffers",
           "kept_buffer_bytes", "linear_cross_entropy", "LinearCrossEntropyLoss",
           "vocab_parallel_linear_cross_entropy", "patch_causal_lm", "unpatch_causal_lm"]

try:  # bfloat16 as a NumPy dtype: the kernel reads PyTorch's bfloat16 memory through it
    from ml_dtypes import bfloat16 as _ML_BF16
except ImportError:  # pragma: no cover - ml_dtypes comes with the torch extra
    _ML_BF16 = None

# The dtypes the kernel computes in, per input dtype: float32 and float64 are read in place,
# float16 and bfloat16 too (the kernel's 16-bit path converts in registers and computes in
# float32; weights and targets given to it are float32).
_COMPUTE_DTYPE = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}

# fastxent keywords the PyTorch API sets itself (the class axis is PyTorch's dimension 1;
# the gradient buffer is managed here).
_RESERVED = ("axis", "out")


def _check_cpu(t: Optional[Tensor], name: str) -> None:
    if t is not None and t.device.type != "cpu":
        raise TypeError(
            f"fastxent is a CPU kernel: {name} is on device '{t.device}'; move it to the CPU "
            f"(.cpu()) or use torch.nn.functional.cross_entropy for {t.device.type} tensors")


def _readable(t: Tensor) -> Tensor:
    """t detached, with memory holding its values: a lazy negation resolved, an efficient zero
    tensor (which has no memory) materialised."""
    t = t.detach()
    if t.is_neg():
        t = t.resolve_neg()
    if t._is_zerotensor():
        t = torch.zeros(t.shape, dtype=t.dtype)
    return t


def _numpy(t: Tensor, dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """A NumPy view of a CPU tensor (zero-copy when it already has `dtype`)."""
    t = _readable(t)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.numpy()


def _kernel_view(t: Tensor) -> Optional[np.ndarray]:
    """A zero-copy NumPy view of a CPU tensor in a dtype the kernel reads natively (float32,
    float64, float16, and bfloat16 through ml_dtypes), or None (bfloat16 without ml_dtypes)."""
    t = _readable(t)
    if t.dtype == torch.bfloat16:
        if _ML_BF16 is None:
            return None
        return t.view(torch.int16).numpy().view(_ML_BF16)
    return t.numpy()


def _direct_logits(input: Tensor, tgt: np.ndarray) -> Optional[np.ndarray]:
    """The logits as the kernel reads them in place, or None for the float32 route (bfloat16
    without ml_dtypes; 16-bit logits with probabilities of another dtype, which the kernel
    would round to the logits' dtype)."""
    x = _kernel_view(input)
    if x is not None and tgt.dtype.kind not in "iu" and tgt.dtype != x.dtype:
        return None
    return x


def _logits_array(input: Tensor, tgt: np.ndarray, cdt: torch.dtype) -> np.ndarray:
    """The logits as the kernel reads them: in place, or as a float32 copy (_direct_logits)."""
    x = _direct_logits(input, tgt)
    return _numpy(input, cdt) if x is None else x


def _tensor_of(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """The tensor over a NumPy array the kernel wrote (bfloat16 through its int16 bits)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# The NumPy storage of a gradient buffer per tensor dtype (bfloat16 as its int16 bits).
_STORAGE = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
            torch.float16: np.dtype(np.float16), torch.bfloat16: np.dtype(np.int16)}


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
            collections.OrderedDict())
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

    def take(self, shape: Tuple[int, ...], dtype: torch.dtype
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
            t = _tensor_of(buf, dtype)  # now referenced: no other caller gets it
        if dtype == torch.bfloat16:
            assert _ML_BF16 is not None
            return buf.view(_ML_BF16), t
        return buf, t

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()

    def nbytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._bufs.values())


_POOL = _GradPool()


def release_buffers() -> int:
    """Drops the gradient buffers fastxent.torch keeps between calls (see
    :func:`cross_entropy`'s memory note) and returns how many bytes they held; memory still
    referenced by a live tensor is freed when that tensor goes."""
    n = _POOL.nbytes()
    _POOL.clear()
    return n


def kept_buffer_bytes() -> int:
    """Bytes of the gradient buffers fastxent.torch keeps for reuse (0 after
    :func:`release_buffers`)."""
    return _POOL.nbytes()


def _autocast_loss_dtype(input: Tensor) -> torch.dtype:
    """The loss's dtype: float32 for 16-bit logits under CPU autocast (PyTorch runs
    cross-entropy in float32 there), else the input's."""
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled("cpu"):
        return torch.float32
    return input.dtype


def _as_array(v: Any, name: str, dtype: torch.dtype) -> Any:
    """weight / sample_weight: a tensor becomes a NumPy view in the compute dtype; anything
    else goes to fastxent as it is (it validates and converts)."""
    if isinstance(v, Tensor):
        _check_cpu(v, name)
        if v.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                f"fastxent.torch does not differentiate with respect to {name}; this input "
                f"cannot have requires_grad=True (detach it)")
        return _numpy(v, dtype if v.is_floating_point() else None)
    return v


def _compute_dtype(logits: Tensor, target: Tensor, name: str) -> torch.dtype:
    """Checks that the logits (called `name`) and target are CPU tensors and returns the
    dtype fastxent computes in for these logits."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    _check_cpu(logits, name)
    _check_cpu(target, "target")
    cdt = _COMPUTE_DTYPE.get(logits.dtype)
    if cdt is None:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got "
                        f"{logits.dtype}")
    return cdt


def _target_array(target: Tensor, cdt: torch.dtype, differentiable: bool = False
                  ) -> np.ndarray:
    """Class indices as they are, or probability targets in the compute dtype. Only
    cross_entropy differentiates with respect to probability targets (`differentiable`);
    elsewhere one that requires grad is refused."""
    if target.is_floating_point():
        if not differentiable and target.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("vocab_parallel_cross_entropy does not differentiate with "
                               "respect to a probability target; this input cannot have "
                               "requires_grad=True (detach it)")
        if differentiable and target.dtype in (torch.float16, torch.bfloat16):
            v = _kernel_view(target)  # 16-bit probabilities for 16-bit logits: read as they are
            if v is not None:
                return v
        return _numpy(target, cdt)
    if target.is_complex():
        raise TypeError(f"target must hold integer class indices or float class "
                        f"probabilities, got {target.dtype}")
    return _numpy(target)


def _prepare(input: Tensor, target: Tensor, weight: Any, ignore_index: int, reduction: str,
             label_smoothing: float, options: Dict[str, Any]
             ) -> Tuple[torch.dtype, np.ndarray, Dict[str, Any]]:
    """Checks the PyTorch-side contract and returns (compute dtype, NumPy target, fastxent
    keywords); the logits are converted by the caller (in place or not)."""
    cdt = _compute_dtype(input, target, "input")
    if input.ndim == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ..., dk); got a "
                         "0-dimensional tensor")
    for k in _RESERVED:
        if k in options:
            raise TypeError(f"fastxent.torch sets {k!r} itself (the class dimension is "
                            f"PyTorch's: 1, or 0 for an input of shape (C,))")
    tgt = _target_array(target, cdt, differentiable=True)
    kw = dict(options)
    kw["sample_weight"] = _as_array(kw.get("sample_weight"), "sample_weight", cdt)
    kw.update(axis=0 if input.ndim == 1 else 1, reduction=reduction,
              weight=_as_array(weight, "weight", cdt), ignore_index=ignore_index,
              label_smoothing=label_smoothing)
    return cdt, tgt, kw


def _loss_tensor(loss: Any, dtype: torch.dtype) -> Tensor:
    return torch.from_numpy(np.asarray(loss)).to(dtype)


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _under_func_transform(*ts: Any) -> bool:
    """Whether any of ts is a tensor wrapped by a torch.func transform (no storage)."""
    return any(isinstance(t, Tensor) and _is_wrapped(t) for t in ts)


def _refuse_func_transforms(*ts: Any) -> None:
    """torch.func transforms (grad, vmap, jacrev, jvp, ...) hand the wrapper tensors without
    storage, which the kernel cannot read: say so, and what works instead."""
    if _under_func_transform(*ts):
        raise RuntimeError(
            "fastxent.torch does not support torch.func transforms (grad, vmap, jacrev, jvp, "
            "functional_call under them) yet: its kernel reads the tensors' memory. Use "
            "torch.autograd.grad (create_graph=True for higher orders, is_grads_batched=True "
            "for batched gradients), torch.autograd.functional.hessian / hvp / jvp, or "
            "torch.autograd.forward_ad, which are supported")


def _has_tangent(t: Optional[Tensor]) -> bool:
    """Whether t carries a forward-mode tangent (torch.autograd.forward_ad)."""
    return (t is not None and fwAD._current_level >= 0
            and fwAD.unpack_dual(t).tangent is not None)


def _reference_loss(z: Tensor, target: Tensor, kw: Dict[str, Any]) -> Tensor:
    """fastxent's loss (the formula of fastxent.cross_entropy, with the keywords `kw` of
    _prepare) written in differentiable PyTorch ops, without a data-dependent branch, so that
    autograd and every torch.func transform (grad, vmap, jvp, jacrev, jacfwd) can take it
    apart. The fused kernel gives the value and the first derivative; this is what derivatives
    beyond those differentiate: the backward pass under create_graph=True (Hessians, gradient
    penalties, double backward), a probability target's gradient, and calls under torch.func
    transforms. It materialises (rows, C) tensors."""
    ax = kw["axis"]
    zz = torch.movedim(z, ax, -1)
    rshape = zz.shape[:-1]
    C = zz.shape[-1]
    zz = zz.reshape(-1, C)
    if zz.dtype in (torch.float16, torch.bfloat16):
        zz = zz.float()  # the kernel computes 16-bit logits in float32
    dt = zz.dtype
    N = zz.shape[0]

    def vec(v: Any, shape: Tuple[int, ...]) -> Tensor:
        if v is None:
            return torch.ones(shape, dtype=dt)
        v = v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v))
        return v.to(dt).reshape(shape)

    cap, alpha = kw.get("softcap"), float(kw.get("logit_scale", 1.0))
    zp = cap * torch.tanh(alpha * zz / cap) if cap is not None else alpha * zz
    w = vec(kw["weight"], (C,))
    s = vec(kw.get("sample_weight"), (N,))
    eps = float(kw["label_smoothing"])
    if target.is_floating_point():
        q = torch.movedim(target, ax, -1).reshape(-1, C).to(dt)
        u = w * (q * (1.0 - eps) + eps / C)
        counted = torch.ones(N, dtype=torch.bool)
        den = s
    else:
        y = target.reshape(-1).to(torch.int64)
        counted = y != kw["ignore_index"]
        yc = torch.where(counted, y, 0)
        zp = torch.where(counted[:, None], zp, 0.0)  # an ignored row's logits reach nothing
        onehot = (torch.arange(C)[None, :] == yc[:, None]).to(dt)
        wy = w[yc]  # (indexing also refuses a class index out of range, under vmap too)
        u = (eps / C) * w.expand(N, C) + (1.0 - eps) * onehot * wy[:, None]
        den = torch.where(counted, s * wy, 0.0)
    lse = torch.logsumexp(zp, dim=1)
    # 0 * inf := 0 (a class with no target weight at a -inf logit costs nothing).
    terms = torch.where(u == 0, 0.0, u * (lse[:, None] - zp))
    row = torch.where(counted, s * (terms.sum(dim=1) + float(kw.get("z_loss", 0.0)) * lse * lse),
                      0.0)
    red = kw["reduction"]
    if red == "none":
        return row.reshape(rshape)
    total = row.sum()
    if red == "sum":
        return total
    norm = kw.get("normalizer")
    D = den.sum() if norm is None else torch.tensor(float(norm), dtype=dt)
    # "mean" with D = 0 (no row counts) is identically 0, and so is every derivative.
    return torch.where(D == 0, 0.0, total / torch.where(D == 0, 1.0, D))


def _reference_grads(z: Tensor, target: Tensor, kw: Dict[str, Any], grad_output: Tensor,
                     need: Tuple[bool, bool], create_graph: bool
                     ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Vector-Jacobian products of _reference_loss with respect to the logits and/or the
    probability target (need = (logits, target)). With create_graph they are themselves
    differentiable functions of z, the target and grad_output (z and target are then the
    saved inputs, connected to the caller's graph)."""
    with torch.enable_grad():
        zr = z if create_graph else z.detach().requires_grad_(need[0])
        tr = target if (create_graph and target.requires_grad) else target.detach()
        if need[1] and not tr.requires_grad:
            tr = tr.detach().requires_grad_(True)
        loss = _reference_loss(zr, tr, kw)
        wrt = [x for x, n in zip((zr, tr), need) if n]
        if loss.requires_grad:
            got = torch.autograd.grad(loss, wrt, grad_output.to(loss.dtype),
                                      create_graph=create_graph, allow_unused=True)
        else:  # the loss is identically 0 (no row counts): so is every derivative
            got = (None,) * len(wrt)
    out: List[Optional[Tensor]] = []
    it = iter(got)
    for x, n in zip((zr, tr), need):
        if not n:
            out.append(None)
            continue
        g = next(it)
        out.append(torch.zeros_like(x) if g is None else g)  # None: the loss is constant 0
    return out[0], out[1]


def _fused(input: Tensor, tgt: np.ndarray, cdt: torch.dtype, kw: Dict[str, Any]
           ) -> Tuple[Any, Tensor]:
    """(loss, gradient) by the kernel, the gradient in a kept buffer when it is large."""
    x = _direct_logits(input, tgt)
    if x is None:  # bfloat16 without ml_dtypes, or probabilities of another dtype: float32
        loss, g = _api.cross_entropy_with_grad(_numpy(input, cdt), tgt, **kw)
        return loss, torch.from_numpy(g).to(input.dtype)
    taken = _POOL.take(tuple(input.shape), input.dtype)
    if taken is None:
        loss, g = _api.cross_entropy_with_grad(x, tgt, **kw)
        return loss, _tensor_of(g, input.dtype)
    loss, _ = _api.cross_entropy_with_grad(x, tgt, out=taken[0], **kw)
    return loss, taken[1]


def _first_order(ctx: Any, grad_output: Tensor, recompute: Callable[[], Tensor]) -> Tensor:
    """The fused gradient times grad_output, outside the graph. The gradient computed in the
    forward pass is handed out itself when grad_output is 1 (no pass over it), and is then no
    longer fastxent's: autograd may keep it as a `.grad` that the user changes. A later
    backward through the same graph (retain_graph=True) recomputes it (`recompute`), except
    after inplace=True, whose gradient lives in the logits' memory."""
    go = grad_output
    if ctx.class_dim is not None:
        go = go.unsqueeze(ctx.class_dim)
    grad = ctx.grad
    if ctx.inplace:
        if ctx.scaled_in_place:
            raise RuntimeError(
                "fastxent.torch.cross_entropy(inplace=True): backward ran a second time, but "
                "the first one already scaled the gradient in place in the logits' memory; "
                "use inplace=False to backpropagate several times (retain_graph=True)")
        if _all_ones(go):
            return grad
        ctx.scaled_in_place = True
        return grad.mul_(go.to(grad.dtype))
    if grad is None:  # handed out by an earlier backward: computed again
        grad = recompute()
        ctx.grad = grad
    # The fused gradient is that of the loss itself (of the sum of rows for "none"); the
    # chain rule scales it by grad_output, exactly and per row, since row n's loss depends on
    # row n's logits only.
    if _all_ones(go):
        ctx.grad = None
        return grad
    return grad * go.to(grad.dtype)


class _FusedCrossEntropy(torch.autograd.Function):
    """Forward: loss and gradient from one fused kernel call. Backward: gradient times
    grad_output (first order, _first_order); under create_graph=True, or for a probability
    target's gradient, the vector-Jacobian product of _reference_loss instead, so that every
    derivative it returns is one it computed. Forward mode (jvp): the tangent of a row loss is
    <g_n, v_n> with the fused gradient g. Differentiable inputs: the logits and a
    probability target; weight and sample_weight (`extras`, saved for their version check)
    are refused by the wrapper when they require grad."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, tgt: np.ndarray, cdt: torch.dtype,
                kw: Dict[str, Any], inplace: bool, fwd: bool, *extras: Tensor) -> Tensor:
        # fwd: a forward-mode tangent is present (decided by the caller: inside forward the
        # inputs come without their tangents).
        if inplace:
            x = _direct_logits(input, tgt)
            if x is not None:
                loss, _ = _api.cross_entropy_with_grad(x, tgt, out=x, **kw)
            else:  # bfloat16 without ml_dtypes: a float32 copy, the gradient written back
                x32 = _numpy(input, cdt)
                loss, _ = _api.cross_entropy_with_grad(x32, tgt, out=x32, **kw)
                input.detach().copy_(torch.from_numpy(x32))
            grad = input.detach()
            # The logits' memory now holds the gradient, written behind autograd's back:
            # bump the version counter so any other autograd node that saved these values
            # (e.g. a tanh or a softmax producing them) fails loudly in backward instead of
            # silently using the gradient as its saved tensor.
            torch.autograd.graph.increment_version(input)
        else:
            loss, grad = _fused(input, tgt, cdt, kw)
            # The logits, target, weights: for the derivatives that read them (second order,
            # target gradient, a recomputed gradient); autograd checks their versions there
            # and frees them after a backward that does not retain the graph. (None after
            # inplace=True: the logits' memory holds the gradient.)
            ctx.save_for_backward(input, target, *extras)
        ctx.grad = grad  # first order: _first_order hands it out
        if fwd:
            ctx.save_for_forward(grad)
            ctx.fwd = (input, target)  # for jvp (forward mode: no backward, no graph to free)
        ctx.tgt, ctx.cdt, ctx.kw = tgt, cdt, kw
        ctx.inplace = inplace
        ctx.scaled_in_place = False
        ctx.n_extras = len(extras)
        # "none": grad_output has the rows' shape; it broadcasts over the class dimension.
        ctx.class_dim = 1 if (kw["reduction"] == "none" and input.ndim > 1) else None
        ctx.loss_dtype = _autocast_loss_dtype(input)
        return _loss_tensor(loss, ctx.loss_dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        create_graph = torch.is_grad_enabled()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        rest = (None,) * (5 + ctx.n_extras)
        if create_graph or need[1]:
            if ctx.inplace:
                raise RuntimeError(
                    "fastxent.torch.cross_entropy(inplace=True) overwrote the logits with the "
                    "gradient, so it cannot differentiate the gradient again (create_graph="
                    "True: Hessians, gradient penalties) or give a probability target's "
                    "gradient; use inplace=False")
            input, target = ctx.saved_tensors[:2]  # version-checked by autograd
            gz, gt = _reference_grads(input, target, ctx.kw, grad_output, need, create_graph)
            if need[0] and not create_graph:
                gz = _FusedCrossEntropy._first(ctx, grad_output)
            return (gz, gt) + rest
        return (_FusedCrossEntropy._first(ctx, grad_output), None) + rest

    @staticmethod
    def _first(ctx: Any, grad_output: Tensor) -> Tensor:
        def recompute() -> Tensor:
            return _fused(ctx.saved_tensors[0], ctx.tgt, ctx.cdt, ctx.kw)[1]
        return _first_order(ctx, grad_output, recompute)

    @staticmethod
    def jvp(ctx, input_t: Optional[Tensor], target_t: Optional[Tensor], *_: Any) -> Tensor:
        (grad,) = ctx.saved_tensors
        red = ctx.kw["reduction"]
        out: Optional[Tensor] = None
        if input_t is not None:
            prod = grad * input_t
            if red == "none":
                out = prod.sum(dim=ctx.class_dim) if ctx.class_dim is not None else prod.sum()
            else:
                out = prod.sum()
        if target_t is not None and ctx.fwd[1].is_floating_point():
            if ctx.inplace:
                raise RuntimeError("fastxent.torch.cross_entropy(inplace=True): a probability "
                                   "target's tangent needs the logits, which were overwritten")
            # d loss / d target . v, from the reference loss (linear in v).
            with torch.enable_grad():
                tr = ctx.fwd[1].detach().requires_grad_(True)
                loss = _reference_loss(ctx.fwd[0].detach(), tr, ctx.kw)
                (dt,) = torch.autograd.grad(loss, tr, torch.ones_like(loss), allow_unused=True)
            if dt is not None:
                if red == "none":
                    # the reference's "none" gradient is that of the sum; rows are separate
                    tt = (dt * target_t).sum(dim=ctx.class_dim if ctx.class_dim is not None
                                             else 0)
                else:
                    tt = (dt * target_t).sum()
                tt = tt.to(grad.dtype)
                out = tt if out is None else out + tt
        if out is None:
            raise RuntimeError("fastxent.torch.cross_entropy: jvp without a tangent")
        return out.to(ctx.loss_dtype)


def _all_ones(go: Tensor) -> bool:
    """Whether grad_output is exactly 1 everywhere; False for a batched grad_output
    (autograd.grad(is_grads_batched=True)), whose values cannot be tested in Python."""
    try:
        if go.dim() == 0:
            return go.item() == 1
        return bool(torch.all(go == 1))
    except RuntimeError:
        return False


_DOC_OPTIONS = """
    ``**fastxent_options`` (keyword-only) are those of :func:`fastxent.cross_entropy`:

    * ``sample_weight``: tensor (or array) of the target's shape for class-index targets,
      the rows' shape ``(N, d1, ..., dk)`` in all cases: per-row weights;
    * ``z_loss`` (float >= 0): adds ``z_loss * logsumexp(z)**2`` per counted row;
    * ``softcap`` (float > 0): logits pass through ``softcap * tanh(z / softcap)`` first;
    * ``logit_scale`` (float > 0): logits are multiplied by it first;
    * ``normalizer`` (float >= 0): the denominator of ``"mean"`` instead of the weight sum;
    * ``num_threads`` (int): caps the kernel's OpenMP threads for this call.

    ``inplace`` (bool, default False): write the gradient into the input's own memory (the
    ``out=logits`` mode of :func:`fastxent.cross_entropy_with_grad`), so no second buffer of
    the logits' size is allocated: the Liger-kernel trick for huge vocabularies.
    **Hazard**: after the call ``input`` holds the gradient, not the logits. That is only
    right when nothing else needs the logit values afterwards; e.g. the output of an
    ``nn.Linear`` head (whose backward needs its input and weight, not its output) that you
    do not read again. The version counter of ``input`` is bumped, so an autograd node that
    saved these values (a ``tanh``, ``softmax``, ``exp`` ... that produced them) makes
    ``backward()`` fail with PyTorch's "modified by an inplace operation" error rather than
    compute a wrong gradient; code outside autograd that reads ``input`` again (accuracy from
    the logits, logging) sees the gradient and cannot be protected. The backward pass scales
    the gradient in place as well, so it can run only once (a second ``backward`` with
    ``retain_graph=True`` raises, unless grad_output was exactly 1). ``inplace`` acts only
    when a gradient is computed: without one the input is left untouched. Refused (ValueError)
    for a non-contiguous input, and for a leaf tensor that requires grad or a view of one (a
    parameter: its values would be destroyed).
"""

_DOC_DIFF = """
    Differences from ``F.cross_entropy`` (deliberate, those of fastxent): when no row counts
    (all ignored, zero rows, or a zero weight sum) ``"mean"`` is 0.0 instead of NaN; an
    ignored row's loss and gradient are 0 whatever its logits hold. Class-index targets may
    have any integer dtype (PyTorch wants int64 or uint8). ``input`` and a probability
    ``target`` are differentiable; a ``weight`` or ``sample_weight`` that requires grad is
    refused (PyTorch refuses ``weight`` too). Under ``torch.compile`` the kernel is the
    custom op ``torch.ops.fastxent.cross_entropy`` (no graph break; only the logits are
    differentiable there).

    Derivatives: first order with respect to ``input`` from the fused kernel; second order
    (``create_graph=True``), a probability target's gradient and ``torch.func`` transforms
    (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``hessian``) through the same formula in PyTorch
    ops (materialising, at PyTorch's speed); forward mode (``torch.autograd.forward_ad``) as
    ``<gradient, tangent>`` per row. After ``inplace=True`` a second-order or target
    derivative raises RuntimeError (the logits are gone).
"""


_LEAN_RED = {"none": 0, "sum": 1, "mean": 2}
_LEAN_DTYPES = (torch.float32, torch.float64)
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_LEAN_KW = {r: dict(axis=1, reduction=r, weight=None, ignore_index=-100, label_smoothing=0.0,
                    sample_weight=None) for r in _LEAN_RED}


def _lean_call(input: Tensor, target: Tensor, reduction: Any) -> Optional[Tensor]:
    """The common call without options (2-D float32/float64 logits, int64 class indices),
    through _core.fast_call: about as much Python as F.cross_entropy's call. None when it
    does not apply (anything else, or a bad call: the general path then gives the error)."""
    red = _LEAN_RED.get(reduction) if type(reduction) is str else None
    if (red is None or type(input) is not Tensor or type(target) is not Tensor
            or input.dtype not in _LEAN_DTYPES or target.dtype != torch.int64
            or input.ndim != 2 or input.is_neg() or target.is_neg()
            or not (input.is_cpu and target.is_cpu) or fwAD._current_level >= 0
            or _functorch_active() or _is_wrapped(input) or _is_wrapped(target)
            or input._is_zerotensor() or target._is_zerotensor()):
        return None
    N, C = input.shape
    if (C == 0 or N == 0 or target.shape != (N,) or not input.is_contiguous()
            or not target.is_contiguous()):
        return None
    if not (input.requires_grad and torch.is_grad_enabled()):
        loss = torch.empty((N,) if red == 0 else (), dtype=input.dtype, device="cpu")
        ok = _core.fast_call_raw(input.data_ptr(), N, C, input.element_size(),
                                 target.data_ptr(), red, 0, loss.data_ptr())
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
    on the tensors' addresses. The same derivatives: first order by _first_order, second
    order (create_graph=True) through _reference_grads."""

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
            gz, _ = _reference_grads(input, target, ctx.kw, go, (True, False), True)
            return gz, None, None, None

        def recompute() -> Tensor:
            input, target = ctx.saved_tensors
            return _lean_kernel(input, target, ctx.red)[1]
        return _first_order(ctx, go, recompute), None, None, None


def _lean_kernel(input: Tensor, target: Tensor, red: int) -> Tuple[Tensor, Tensor]:
    """(loss, gradient) of the lean path, on the tensors' memory (checked by _lean_call)."""
    N, C = input.shape
    size = input.element_size()
    taken = _POOL.take(input.shape, input.dtype) if N * C * size >= _POOL.min_bytes else None
    grad = torch.empty((N, C), dtype=input.dtype, device="cpu") if taken is None else taken[1]
    loss = torch.empty((N,) if red == 0 else (), dtype=input.dtype, device="cpu")
    if not _core.fast_call_raw(input.data_ptr(), N, C, size, target.data_ptr(), red,
                               grad.data_ptr(), loss.data_ptr()):
        raise _BadTarget  # the general path gives the error, naming the row
    return loss, grad


_lean_apply = super(torch.autograd.Function, _LeanCrossEntropy).apply


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100,
                  reduce: Optional[bool] = None, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, inplace: bool = False,
                  **fastxent_options: Any) -> Tensor:
    if size_average is not None or reduce is not None:
        # PyTorch's own translation of the deprecated arguments, with its warning.
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if (weight is None and not fastxent_options and ignore_index == -100
            and label_smoothing == 0.0 and inplace is False and not _is_compiling()):
        res = _lean_call(input, target, reduction)
        if res is not None:
            return res
    return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                          inplace, fastxent_options)


_FUNC_OPTIONS = ("sample_weight", "z_loss", "softcap", "logit_scale", "normalizer",
                 "num_threads")


def _validate_options(options: Dict[str, Any], caller: str) -> Dict[str, Any]:
    """fastxent's extra keywords: names (TypeError naming `caller`) and scalar values
    (ValueError), without tensors."""
    for k in options:
        if k not in _FUNC_OPTIONS:
            raise TypeError(f"{caller}() got an unexpected keyword argument {k!r} (fastxent's "
                            f"options: {', '.join(_FUNC_OPTIONS)})")
    z_loss = _api._real(options.get("z_loss", 0.0), "z_loss", 0.0, False)
    cap = options.get("softcap")
    cap = None if cap is None else _api._real(cap, "softcap", 0.0, True)
    alpha = _api._real(options.get("logit_scale", 1.0), "logit_scale", 0.0, True)
    norm = options.get("normalizer")
    norm = None if norm is None else _api._real(norm, "normalizer", 0.0, False)
    return dict(z_loss=z_loss, softcap=cap, logit_scale=alpha, normalizer=norm)


def _checked_options(input: Tensor, target: Tensor, weight: Any, ignore_index: int,
                     reduction: str, label_smoothing: float, options: Dict[str, Any],
                     caller: str = "cross_entropy") -> Dict[str, Any]:
    """The checks that need no tensor values (shapes, dtypes, option names and ranges), for
    the paths that cannot read the values up front (torch.func transforms, torch.compile,
    fake and meta tensors); returns the keywords of _reference_loss."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dtype not in _COMPUTE_DTYPE:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, got "
                        f"{input.dtype}")
    if input.ndim == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ..., dk); got a "
                         "0-dimensional tensor")
    scalars = _validate_options(options, caller)
    _, ii, eps, _ = _api._options(reduction, ignore_index, label_smoothing,
                                  options.get("num_threads"))
    ax = 0 if input.ndim == 1 else 1
    C = input.shape[ax]
    rows = tuple(input.shape[:ax]) + tuple(input.shape[ax + 1:])
    if target.is_floating_point():
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(f"probability target has shape {tuple(target.shape)}, expected "
                             f"the input's shape {tuple(input.shape)}")
        if ii != -100:
            raise ValueError("ignore_index applies to class-index targets only")
    elif target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices or float class "
                        f"probabilities, got {target.dtype}")
    elif tuple(target.shape) != rows:
        raise ValueError(f"target has shape {tuple(target.shape)}, expected {rows} (the "
                         f"input's shape without its class dimension {ax})")
    for name, v, shape in (("weight", weight, (C,)),
                           ("sample_weight", options.get("sample_weight"), rows)):
        if v is not None and tuple(np.shape(v)) != shape:
            raise ValueError(f"{name} has shape {tuple(np.shape(v))}, expected {shape}")
    return dict(axis=ax, reduction=reduction, weight=weight, ignore_index=ii,
                label_smoothing=eps, sample_weight=options.get("sample_weight"), **scalars)


def _func_transform_loss(input: Tensor, target: Tensor, weight: Any, ignore_index: int,
                         reduction: str, label_smoothing: float,
                         options: Dict[str, Any]) -> Tensor:
    """cross_entropy under a torch.func transform (grad, vmap, jvp, jacrev, jacfwd, hessian):
    the transforms hand over tensors without storage, which the kernel cannot read, so the
    loss is _reference_loss, in PyTorch ops that every transform composes with; the same
    checks as the kernel's path, except those that need the values (a class index out of
    range raises PyTorch's indexing error rather than fastxent's IndexError naming the row)."""
    kw = _checked_options(input, target, weight, ignore_index, reduction, label_smoothing,
                          options)
    return _reference_loss(input, target, kw).to(input.dtype)


# --- torch.library: the kernel as a custom op, for torch.compile, FakeTensor and meta ------

@torch.library.custom_op("fastxent::cross_entropy", mutates_args=())
def _op_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor],
                      sample_weight: Optional[Tensor], reduction: str, ignore_index: int,
                      label_smoothing: float, z_loss: float, softcap: Optional[float],
                      logit_scale: float, normalizer: Optional[float],
                      want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(loss, gradient) by the fused kernel; the gradient is empty without want_grad. What
    torch.compile puts in its graph (an opaque node, no graph break), with a fake
    implementation for shape inference and an autograd formula."""
    opts: Dict[str, Any] = dict(z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
                                normalizer=normalizer, sample_weight=sample_weight)
    cdt, tgt, kw = _prepare(input, target, weight, ignore_index, reduction, label_smoothing,
                            opts)
    if not want_grad:
        loss = _api.cross_entropy(_logits_array(input, tgt, cdt), tgt, **kw)
        return _loss_tensor(loss, input.dtype), input.new_empty((0,))
    loss, grad = _fused(input, tgt, cdt, kw)
    return _loss_tensor(loss, input.dtype), grad


@_op_cross_entropy.register_fake
def _(input, target, weight, sample_weight, reduction, ignore_index, label_smoothing, z_loss,
      softcap, logit_scale, normalizer, want_grad):
    ax = 0 if input.ndim == 1 else 1
    rows = tuple(input.shape[:ax]) + tuple(input.shape[ax + 1:])
    loss = input.new_empty(rows if reduction == "none" else ())
    grad = input.new_empty(input.shape) if want_grad else input.new_empty((0,))
    return loss, grad


def _op_setup_context(ctx, inputs, output):
    (input, target, weight, sample_weight, reduction, ignore_index, label_smoothing, z_loss,
     softcap, logit_scale, normalizer, _) = inputs
    ctx.reduction = reduction
    ctx.ndim = input.ndim
    # The gradient for first order; the logits and target for a second-order backward
    # (create_graph=True: differentiated through _reference_loss, as in eager mode).
    ctx.save_for_backward(output[1], input, target)
    ctx.kw = dict(axis=0 if input.ndim == 1 else 1, reduction=reduction, weight=weight,
                  ignore_index=ignore_index, label_smoothing=label_smoothing,
                  sample_weight=sample_weight, z_loss=z_loss, softcap=softcap,
                  logit_scale=logit_scale, normalizer=normalizer)
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, grad_loss, grad_grad):
    if any(ctx.needs_input_grad[1:4]):
        raise RuntimeError(
            "fastxent.torch.cross_entropy under torch.compile (or on fake / meta tensors) "
            "differentiates the logits only: a probability target, weight or sample_weight "
            "that requires grad needs the eager call")
    g, input, target = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
        gz, _ = _reference_grads(input, target, ctx.kw, grad_loss, (True, False), True)
        return (gz,) + (None,) * 11
    go = grad_loss
    if ctx.reduction == "none" and ctx.ndim > 1:
        go = go.unsqueeze(1)
    return (g * go.to(g.dtype),) + (None,) * 11


_op_cross_entropy.register_autograd(_op_backward, setup_context=_op_setup_context)


def _is_fake(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.device.type == "meta" or _fake_check(t))


def _fake_check(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return bool(is_fake(t))


def _op_loss(input: Tensor, target: Tensor, weight: Any, ignore_index: int, reduction: str,
             label_smoothing: float, options: Dict[str, Any]) -> Tensor:
    """cross_entropy through the custom op: under torch.compile (traced as one node) and for
    fake or meta tensors (shape inference). Only the logits are differentiable here."""
    kw = _checked_options(input, target, weight, ignore_index, reduction, label_smoothing,
                          options)
    want_grad = input.requires_grad and torch.is_grad_enabled()
    w = kw["weight"]
    sw = kw["sample_weight"]
    loss, _ = _op_cross_entropy(
        input, target, w if (w is None or isinstance(w, Tensor)) else torch.as_tensor(w),
        sw if (sw is None or isinstance(sw, Tensor)) else torch.as_tensor(sw),
        reduction, kw["ignore_index"], kw["label_smoothing"], kw["z_loss"], kw["softcap"],
        kw["logit_scale"], kw["normalizer"], want_grad)
    return loss.to(_autocast_loss_dtype(input))


def _cross_entropy(input: Tensor, target: Tensor, weight: Any, ignore_index: int,
                   reduction: str, label_smoothing: float, inplace: bool,
                   options: Dict[str, Any]) -> Tensor:
    if _is_compiling() or _is_fake(input):
        # (torch.func transforms inside a compiled function are not told apart here: Dynamo
        # cannot trace the check; the custom op then refuses them with an error.)
        return _op_loss(input, target, weight, ignore_index, reduction, label_smoothing,
                        options)
    if _under_func_transform(input, target, weight, options.get("sample_weight")):
        return _func_transform_loss(input, target, weight, ignore_index, reduction,
                                    label_smoothing, options)
    cdt, tgt, kw = _prepare(input, target, weight, ignore_index, reduction, label_smoothing,
                            options)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    grad_mode = torch.is_grad_enabled()
    reverse = input.requires_grad and grad_mode
    t_diff = target.is_floating_point() and (
        (target.requires_grad and grad_mode) or _has_tangent(target))
    if not (reverse or t_diff or _has_tangent(input)):
        # No derivative wanted: the forward-only kernel, nothing of the logits' size written.
        return _loss_tensor(_api.cross_entropy(_logits_array(input, tgt, cdt), tgt, **kw),
                            _autocast_loss_dtype(input))
    # The logits are overwritten only for a reverse-mode gradient of theirs alone.
    inplace = inplace and reverse and not t_diff
    if inplace:
        base = input if input._base is None else input._base
        if base.is_leaf and base.requires_grad:
            raise ValueError(
                "inplace=True would overwrite a leaf tensor that requires grad (or a view of "
                "one): its values are the parameters being learned; use inplace=False")
        if not input.is_contiguous() or input.is_neg():
            raise ValueError("inplace=True needs a contiguous input without a lazy negation "
                             "(the gradient is written over its memory in the same layout); "
                             "call .contiguous() / .resolve_neg() or use inplace=False")
    fwd = _has_tangent(input) or (t_diff and _has_tangent(target))
    # weight and sample_weight tensors ride along for autograd's version check only.
    extras = tuple(v for v in (weight, options.get("sample_weight")) if isinstance(v, Tensor))
    return _FusedCrossEntropy.apply(input, target, tgt, cdt, kw, inplace, fwd, *extras)


cross_entropy.__doc__ = """Cross-entropy loss with the signature and semantics of
    ``torch.nn.functional.cross_entropy``, computed by fastxent's fused CPU kernel.

    For logits ``z`` (class dimension 1 of ``input``, or 0 for an unbatched ``(C,)`` input),
    class weights ``w`` and smoothing ``eps``, a counted row n (``target[n] !=
    ignore_index``) costs::

        row_n = (1 - eps) * w[y_n] * (lse_n - z[n, y_n]) + (eps / C) * sum_c w_c * (lse_n - z[n, c])

    with ``lse_n = logsumexp(z_n)``; ``"sum"`` adds the rows, ``"mean"`` divides the sum by
    ``sum_n w[y_n]`` over counted rows, ``"none"`` returns them (ignored rows: 0). With
    probability targets ``p`` (a float target of the input's shape) the row is
    ``sum_c w_c q[n, c] (lse_n - z[n, c])`` with ``q = (1 - eps) p + eps / C`` and ``"mean"``
    divides by the number of rows. The full formula with the fastxent options (sample
    weights, z-loss, softcap, logit scale, normalizer) is in :func:`fastxent.cross_entropy`.

    The gradient with respect to ``input`` is computed by the forward pass, in the same
    kernel call, whenever ``input`` requires grad (and grad mode is on); the backward pass
    only multiplies it by ``grad_output``. Otherwise only the loss is computed.

    Parameters
    ----------
    input : Tensor, shape (C,), (N, C) or (N, C, d1, ..., dk), on the CPU
        float32 and float64 are read in place (zero-copy); float16 and bfloat16 are computed
        via a float32 copy, and the loss and gradient cast back to the input's dtype. The
        class dimension 1 of a (N, C, d1, ..., dk) input is read in place by fastxent's
        ``axis=1`` support (no transposed copy); a non-contiguous input is copied first.
    target : Tensor
        Class indices (any integer dtype) of shape (), (N,) or (N, d1, ..., dk), in
        ``[0, C)`` or equal to ``ignore_index``; or class probabilities, a float tensor of
        the input's shape.
    weight : Tensor of shape (C,), optional
        Class weights.
    size_average, reduce : bool, optional
        PyTorch's deprecated arguments, in PyTorch's positions: translated to ``reduction``
        by PyTorch's own helper, with its deprecation warning.
    ignore_index : int
        Class-index rows equal to it count for nothing (default -100).
    reduction : {"mean", "sum", "none"}
    label_smoothing : float in [0, 1]
""" + _DOC_OPTIONS + """
    The positional order is ``F.cross_entropy``'s; ``inplace`` and fastxent's options are
    keyword-only.

    Memory: the default (``inplace=False``) path writes the gradient into a buffer it keeps
    between calls (at most two, of 1 MiB or more each), handed out again only once no tensor
    references it any more (the gradient autograd passed on, a ``.grad`` that kept it, any
    view): a training loop then pays no page faults for a fresh logits-sized array each step.
    :func:`kept_buffer_bytes` says how much is kept, :func:`release_buffers` frees it.

    Mixed precision: float16 / bfloat16 logits are read in place by the kernel's 16-bit path
    (float32 arithmetic, the gradient rounded once to the input's dtype; bfloat16 needs
    ml_dtypes, part of the ``torch`` extra, else a float32 copy is made). Under
    ``torch.autocast("cpu")`` the loss of 16-bit logits is float32, as PyTorch's.

    torch.compile, FakeTensor and ``meta``: the kernel is the custom op
    ``torch.ops.fastxent.cross_entropy`` (with a fake implementation and an autograd formula),
    so ``torch.compile(fullgraph=True)`` traces it as one node, and fake or meta logits get
    shape inference. There, only the logits are differentiable and ``inplace`` is ignored.

    Returns
    -------
    Tensor of the input's dtype: a scalar for ``"mean"`` / ``"sum"``, the target's (rows')
    shape for ``"none"``.
""" + _DOC_DIFF + """
    Raises
    ------
    ValueError
        the shape, range and option errors of :func:`fastxent.cross_entropy`;
        ``inplace=True`` on a leaf that requires grad or on a non-contiguous input.
    TypeError
        a tensor on a device other than the CPU (fastxent is a CPU kernel; ``meta`` and fake
        logits get shape inference instead); an input dtype other than
        float32/float64/float16/bfloat16; a target that is neither integer nor float;
        ``axis=`` or ``out=`` given (they are set here).
    IndexError
        a class index outside ``[0, C)`` that is not ``ignore_index``.
    RuntimeError
        ``weight`` or ``sample_weight`` that requires grad; a second backward through an
        ``inplace=True`` call that scaled the gradient in place; a second-order or target
        derivative after ``inplace=True``, or after the logits were changed in place.

    Example
    -------
    >>> import torch, fastxent.torch as fxt
    >>> z = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]], requires_grad=True)
    >>> loss = fxt.cross_entropy(z, torch.tensor([0, 1]), label_smoothing=0.1)
    >>> loss.backward()
    >>> torch.allclose(loss, torch.nn.functional.cross_entropy(
    ...     z, torch.tensor([0, 1]), label_smoothing=0.1))
    True
"""


class CrossEntropyLoss(nn.Module):
    def __init__(self, weight: Optional[Tensor] = None, size_average: Optional[bool] = None,
                 ignore_index: int = -100, reduce: Optional[bool] = None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 inplace: bool = False, **fastxent_options: Any) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        # Every option is checked here, not at the first forward.
        _validate_options(fastxent_options, "CrossEntropyLoss")
        _api._options(reduction, ignore_index, label_smoothing,
                      fastxent_options.get("num_threads"))
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        if weight is not None and not isinstance(weight, Tensor):
            weight = torch.as_tensor(weight)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.inplace = inplace
        self.fastxent_options = dict(fastxent_options)

    def forward(self, input: Tensor, target: Tensor, **fastxent_options: Any) -> Tensor:
        opts = self.fastxent_options
        if fastxent_options:
            opts = {**opts, **fastxent_options}
        return _cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                              self.label_smoothing, self.inplace, opts)

    def extra_repr(self) -> str:
        s = (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
             f"label_smoothing={self.label_smoothing}")
        if self.inplace:
            s += ", inplace=True"
        for k, v in self.fastxent_options.items():
            s += f", {k}={v!r}"
        return s


CrossEntropyLoss.__doc__ = """``torch.nn.CrossEntropyLoss`` computed by fastxent's fused CPU
    kernel: ``CrossEntropyLoss(...)(input, target)`` is :func:`cross_entropy` with the
    constructor's options.

    Constructor: PyTorch's signature and positions, ``weight`` (class weights, a registered
    buffer as in PyTorch, so ``.to()``, ``.double()`` and ``state_dict()`` carry it),
    ``size_average``, ``ignore_index``, ``reduce``, ``reduction``, ``label_smoothing`` (the
    deprecated ``size_average`` and ``reduce`` translated with PyTorch's warning), then
    keyword-only ``inplace`` and the ``**fastxent_options`` of :func:`cross_entropy`
    (``z_loss``, ``softcap``, ``logit_scale``, ``normalizer``, ``num_threads``).
    ``forward(input, target, **fastxent_options)`` takes per-batch options (``sample_weight``,
    a per-call ``normalizer``), which override the constructor's.

    The formula, the gradient (computed in the forward pass, scaled in backward), the
    ``inplace`` hazard, the half-precision handling and the errors are those of
    :func:`cross_entropy`; the constructor checks every option itself (TypeError for an
    unknown keyword, ValueError for a bad value), so a typo fails where it was written.

    Example
    -------
    >>> import torch, fastxent.torch as fxt
    >>> head = torch.nn.Linear(16, 10)
    >>> crit = fxt.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
    >>> loss = crit(head(torch.randn(32, 16)), torch.randint(0, 10, (32,)))
    >>> loss.backward()
    >>> head.weight.grad.shape
    torch.Size([10, 16])
"""


# --------------------------------------------------------------------------------------------
# Sigmoid (binary / multi-label) cross-entropy: F.binary_cross_entropy_with_logits
# --------------------------------------------------------------------------------------------

def _sigmoid_reference(x: Tensor, y: Tensor, w: Optional[Tensor], pw: Optional[Tensor],
                       reduction: str) -> Tensor:
    """fastxent.sigmoid_cross_entropy's formula in differentiable PyTorch ops (no
    data-dependent branch): what second-order derivatives, the derivatives with respect to
    target / weight / pos_weight, and torch.func transforms differentiate."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    y = y.to(x.dtype)
    sp = torch.nn.functional.softplus(-x)
    coef = 1.0 + (pw.to(x.dtype) - 1.0) * y if pw is not None else torch.ones_like(y)
    loss = (1.0 - y) * x + coef * sp
    if w is not None:
        loss = w.to(x.dtype) * loss
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    n = x.numel()
    return total / n if n else total * 0.0  # "mean" of no element is 0 (fastxent's rule)


class _FusedSigmoidCrossEntropy(torch.autograd.Function):
    """Forward: loss and gradient from fastxent.sigmoid_cross_entropy_with_grad. Backward:
    gradient times grad_output (_first_order); under create_graph=True, or for target /
    weight / pos_weight gradients, the vector-Jacobian product of _sigmoid_reference. jvp:
    <g, v> per element."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Optional[Tensor],
                pos_weight: Optional[Tensor], cdt: torch.dtype, reduction: str,
                fwd: bool) -> Tensor:
        inputs = (input, target, weight, pos_weight)
        ctx.grad = _FusedSigmoidCrossEntropy._kernel(inputs, cdt, reduction, ctx)
        # For the derivatives that read them (version-checked by autograd, freed after a
        # backward that does not retain the graph).
        ctx.save_for_backward(*inputs)
        if fwd:  # a forward-mode tangent (decided by the caller, as in _FusedCrossEntropy)
            ctx.save_for_forward(ctx.grad)
            ctx.fwd = inputs  # for jvp (forward mode: no backward, no graph to free)
        ctx.cdt, ctx.reduction = cdt, reduction
        ctx.inplace, ctx.class_dim = False, None  # for _first_order
        ctx.loss_dtype = _autocast_loss_dtype(input)
        return _loss_tensor(ctx.loss, ctx.loss_dtype)

    @staticmethod
    def _kernel(inputs: Tuple[Optional[Tensor], ...], cdt: torch.dtype, reduction: str,
                ctx: Any = None) -> Tensor:
        def arr(t: Optional[Tensor]) -> Optional[np.ndarray]:
            return None if t is None else _numpy(t, cdt)
        x, y, w, pw = inputs
        loss, g = _api_sigmoid.sigmoid_cross_entropy_with_grad(
            arr(x), arr(y), reduction=reduction, weight=arr(w), pos_weight=arr(pw))
        if ctx is not None:
            ctx.loss = loss
        grad = torch.from_numpy(g)
        return grad if grad.dtype == x.dtype else grad.to(x.dtype)

    @staticmethod
    def _reference_vjp(ctx: Any, inputs: Tuple[Optional[Tensor], ...], grad_output: Tensor,
                       need: Tuple[bool, ...], create_graph: bool) -> List[Optional[Tensor]]:
        with torch.enable_grad():
            ins = [t if (t is None or create_graph) else t.detach().requires_grad_(n)
                   for t, n in zip(inputs, need)]
            loss = _sigmoid_reference(ins[0], ins[1], ins[2], ins[3], ctx.reduction)
            wrt = [t for t, n in zip(ins, need) if n]
            got = list(torch.autograd.grad(loss, wrt, grad_output.to(loss.dtype),
                                           create_graph=create_graph, allow_unused=True))
        out: List[Optional[Tensor]] = []
        for t, n in zip(ins, need):
            if not n:
                out.append(None)
                continue
            g = got.pop(0)
            out.append(torch.zeros_like(t) if g is None else g)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        need = tuple(ctx.needs_input_grad[:4])
        create_graph = torch.is_grad_enabled()
        if create_graph or any(need[1:]):
            grads = _FusedSigmoidCrossEntropy._reference_vjp(
                ctx, tuple(ctx.saved_tensors), grad_output, need, create_graph)
        else:
            grads = [None] * 4
        if need[0] and not create_graph:
            grads[0] = _first_order(ctx, grad_output, lambda: _FusedSigmoidCrossEntropy._kernel(
                tuple(ctx.saved_tensors), ctx.cdt, ctx.reduction))
        return (*grads, None, None, None)

    @staticmethod
    def jvp(ctx, x_t: Optional[Tensor], y_t: Optional[Tensor], w_t: Optional[Tensor],
            pw_t: Optional[Tensor], *_: Any) -> Tensor:
        (grad,) = ctx.saved_tensors
        none = ctx.reduction == "none"
        out = torch.zeros_like(grad) if none else torch.zeros((), dtype=grad.dtype)
        if x_t is not None:
            out = out + (grad * x_t if none else (grad * x_t).sum())
        if y_t is not None or w_t is not None or pw_t is not None:
            # Tangents of target / weight / pos_weight, from the formula's partial derivatives
            # per element (weight and pos_weight may be broadcast):
            # d/dy = w (-x + (p - 1) sp), d/dw = (1 - y) x + (1 + (p - 1) y) sp, d/dp = w y sp
            # with sp = softplus(-x).
            x, y, w, pw = (None if t is None else t.detach() for t in ctx.fwd)
            dt = grad.dtype if grad.dtype in (torch.float32, torch.float64) else torch.float32
            x, y = x.to(dt), y.to(dt)
            sp = torch.nn.functional.softplus(-x)
            wv = torch.ones((), dtype=dt) if w is None else w.to(dt)
            pv = torch.ones((), dtype=dt) if pw is None else pw.to(dt)
            e = torch.zeros_like(x)
            if y_t is not None:
                e = e + wv * (-x + (pv - 1.0) * sp) * y_t.to(dt)
            if w_t is not None:
                e = e + ((1.0 - y) * x + (1.0 + (pv - 1.0) * y) * sp) * w_t.to(dt)
            if pw_t is not None:
                e = e + wv * y * sp * pw_t.to(dt)
            if none:
                out = out + e.to(out.dtype)
            else:
                tot = e.sum()
                if ctx.reduction == "mean":
                    tot = tot / max(e.numel(), 1)
                out = out + tot.to(out.dtype)
        return out.to(ctx.loss_dtype)


def _bce_operand(v: Any, name: str, input: Tensor) -> Optional[Tensor]:
    if v is None:
        return None
    if not isinstance(v, Tensor):
        v = torch.as_tensor(np.asarray(v))
    _check_cpu(v, name)
    _api_sigmoid.check_broadcast(v.shape, input.shape, name, "input's")
    return v


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor,
                                     weight: Optional[Tensor] = None,
                                     size_average: Optional[bool] = None,
                                     reduce: Optional[bool] = None, reduction: str = "mean",
                                     pos_weight: Optional[Tensor] = None) -> Tensor:
    if size_average is not None or reduce is not None:
        # PyTorch's own translation, with its deprecation warning.
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check_cpu(input, "input")
    _check_cpu(target, "target")
    cdt = _COMPUTE_DTYPE.get(input.dtype)
    if cdt is None:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, got "
                        f"{input.dtype}")
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(f"target has shape {tuple(target.shape)}, expected the input's shape "
                         f"{tuple(input.shape)} (as F.binary_cross_entropy_with_logits)")
    if not (target.is_floating_point() or target.dtype == torch.bool or
            not (target.is_complex())):
        raise TypeError(f"target must be real, got {target.dtype}")
    w = _bce_operand(weight, "weight", input)
    pw = _bce_operand(pos_weight, "pos_weight", input)
    if _under_func_transform(input, target, w, pw):
        return _sigmoid_reference(input, target, w, pw, reduction).to(
            _autocast_loss_dtype(input))
    tensors = (input, target, w, pw)
    grad_mode = torch.is_grad_enabled()
    wants = any(t is not None and ((t.requires_grad and grad_mode) or _has_tangent(t))
                for t in tensors)
    if not wants:
        def arr(t: Optional[Tensor]) -> Optional[np.ndarray]:
            return None if t is None else _numpy(t, cdt)
        loss = _api_sigmoid.sigmoid_cross_entropy(_numpy(input, cdt), _numpy(target, cdt),
                                                  reduction=reduction, weight=arr(w),
                                                  pos_weight=arr(pw))
        return _loss_tensor(loss, _autocast_loss_dtype(input))
    fwd = any(t is not None and _has_tangent(t) for t in tensors)
    return _FusedSigmoidCrossEntropy.apply(input, target, w, pw, cdt, reduction, fwd)


binary_cross_entropy_with_logits.__doc__ = """``torch.nn.functional.binary_cross_entropy_with_logits``
    computed by fastxent's fused sigmoid kernel (:func:`fastxent.sigmoid_cross_entropy_with_grad`):
    the same signature (``size_average`` and ``reduce`` are translated with PyTorch's own
    deprecation warning) and the same values::

        loss = weight * ((1 - y) * x + (1 + (pos_weight - 1) * y) * softplus(-x))

    reduced by ``reduction`` ("mean" over all elements). ``weight`` and ``pos_weight``
    broadcast to the input's shape (``pos_weight`` usually ``(C,)``, the last dimension).

    The gradient with respect to ``input`` comes from the forward pass (one pass over memory);
    backward multiplies it by ``grad_output``. Every other derivative is computed too, never
    returned as zeros or None: with respect to ``target``, ``weight`` and ``pos_weight`` when
    they require grad, second order (``create_graph=True``) and forward mode
    (``torch.autograd.forward_ad``), through the same formula in PyTorch ops; under
    ``torch.func`` transforms (grad, vmap, jvp, hessian) the loss itself is computed in PyTorch
    ops. float16 / bfloat16 inputs are computed via float32 and cast back.

    Differences from PyTorch (deliberate, fastxent's): "mean" of zero elements is 0.0, not NaN;
    a zero factor times an infinite logit is 0, not NaN.

    Raises: ValueError for a tensor not on the CPU, mismatched or non-broadcasting shapes and
    an unknown reduction; TypeError for non-tensor input/target or an unsupported dtype.

    Example
    -------
    >>> import torch, fastxent.torch as fxt
    >>> x = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    >>> y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> loss = fxt.binary_cross_entropy_with_logits(x, y, pos_weight=torch.tensor([2.0, 1.0]))
    >>> loss.backward()
    >>> torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(
    ...     x, y, pos_weight=torch.tensor([2.0, 1.0])))
    True
"""


class BCEWithLogitsLoss(nn.Module):
    """``torch.nn.BCEWithLogitsLoss`` computed by fastxent's fused sigmoid kernel:
    ``BCEWithLogitsLoss(weight, size_average, reduce, reduction, pos_weight)(input, target)``
    is :func:`binary_cross_entropy_with_logits` with the constructor's arguments (PyTorch's
    signature; ``weight`` and ``pos_weight`` registered as buffers, as in PyTorch). The
    constructor checks ``reduction`` (ValueError) and translates the deprecated
    ``size_average`` / ``reduce`` with PyTorch's warning."""

    def __init__(self, weight: Optional[Tensor] = None, size_average: Optional[bool] = None,
                 reduce: Optional[bool] = None, reduction: str = "mean",
                 pos_weight: Optional[Tensor] = None) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(input, target, self.weight,
                                                reduction=self.reduction,
                                                pos_weight=self.pos_weight)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


# --------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy (torch.distributed)
# --------------------------------------------------------------------------------------------

_NSTAT = len(_shard.STAT_FIELDS)


def _dist() -> Any:
    """torch.distributed, checked to be usable (available in this build, initialized)."""
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError("vocab_parallel_cross_entropy needs torch.distributed, which this "
                           "PyTorch build does not provide")
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy needs an initialized process group: "
                           "call torch.distributed.init_process_group (e.g. backend='gloo') "
                           "on every rank first")
    return dist


def _vp_layout(c_local: int, group: Any, offset: Optional[int],
               num_classes: Optional[int]) -> Tuple[int, int]:
    """(offset, num_classes) of this rank's slice: as given, or from the slice sizes of every
    rank gathered once (one all_gather of one integer per rank), in rank order."""
    if offset is not None and num_classes is not None:
        return _shard._index(offset, "offset"), _shard._index(num_classes, "num_classes")
    dist = _dist()
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("vocab_parallel_cross_entropy: this process is not a member of "
                           "`group`")
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([c_local], dtype=torch.int64), group=group)
    n = [int(s.item()) for s in sizes]
    total = sum(n)
    if num_classes is None:
        num_classes = total
    elif _shard._index(num_classes, "num_classes") != total:
        raise ValueError(f"num_classes = {num_classes}, but the ranks' slices (sizes {n}, in "
                         f"rank order) add up to {total}")
    if offset is None:
        offset = sum(n[:rank])
    return _shard._index(offset, "offset"), _shard._index(num_classes, "num_classes")


def _all_reduce_stats(st: np.ndarray, group: Any) -> np.ndarray:
    """Merges every rank's shard statistics (rows, 7) with two all-reduces: MAX of the row
    maxima, then SUM of the other fields packed in one tensor, the exponential sums rescaled
    to the global max first (Megatron's scheme). NaN does not rely on the backend: a rank's NaN
    max (some logit NaN) enters the MAX as -inf and a NaN flag rides in the SUM, so a row with
    a NaN on any rank gets a NaN max and sum on every rank, as on one machine."""
    dist = _dist()
    s = torch.from_numpy(st)
    mx, se = s[:, 0], s[:, 1]
    nan = torch.isnan(mx) | torch.isnan(se)
    m = torch.where(nan, torch.full_like(mx, -np.inf), mx)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # exp(max_r - M): exactly 1 at the max (also for M = +inf), 0 for a rank whose row is all
    # -inf (nothing to add) or NaN (flagged instead).
    factor = torch.where(mx == m, torch.ones_like(mx), torch.exp(mx - m))
    packed = torch.empty(s.shape, dtype=torch.float64)
    packed[:, 0] = torch.where(nan | (mx == -np.inf), torch.zeros_like(se), se * factor)
    packed[:, 1:_NSTAT - 1] = s[:, 2:]
    packed[:, _NSTAT - 1] = nan.to(torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    out = torch.empty(s.shape, dtype=torch.float64)
    out[:, 0] = m
    out[:, 1:] = packed[:, :_NSTAT - 1]
    out[packed[:, _NSTAT - 1] > 0, :2] = np.nan
    return out.numpy()


class _VPArgs(NamedTuple):
    """The checked arguments of one vocab_parallel_cross_entropy call (NumPy views)."""
    cdt: torch.dtype
    tgt: np.ndarray
    group: Any
    offset: int
    num_classes: int
    weight: Optional[np.ndarray]
    ignore_index: int
    label_smoothing: float
    reduction: str
    sample_weight: Any
    z_loss: float
    softcap: Optional[float]
    logit_scale: float
    normalizer: Optional[float]
    num_threads: Optional[int]


def _vp_stats_loss(x: np.ndarray, a: _VPArgs) -> Tuple[Any, np.ndarray]:
    st = _shard.shard_stats(x, a.tgt, offset=a.offset, num_classes=a.num_classes,
                            weight=a.weight, ignore_index=a.ignore_index,
                            label_smoothing=a.label_smoothing, softcap=a.softcap,
                            logit_scale=a.logit_scale, num_threads=a.num_threads)
    rows_shape = st.shape[:-1]
    merged = _all_reduce_stats(st.reshape(-1, _NSTAT), a.group).reshape(st.shape)
    loss = _shard.loss_from_stats(merged, reduction=a.reduction, sample_weight=a.sample_weight,
                                  z_loss=a.z_loss, normalizer=a.normalizer,
                                  num_classes=a.num_classes)
    if a.reduction == "none":
        loss = np.asarray(loss).reshape(rows_shape)
    return loss, merged


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: shard statistics, two all-reduces, the loss; backward: this rank's gradient
    from its logits and the merged statistics (fastxent.shard_grad), no communication."""

    @staticmethod
    def forward(ctx, input: Tensor, a: _VPArgs, *saved: Tensor) -> Tensor:
        loss, merged = _vp_stats_loss(_numpy(input, a.cdt), a)
        # The logits (and any tensor whose NumPy view backward reads) are saved so that an
        # in-place change before backward fails loudly (version counter) instead of giving a
        # wrong gradient. A 16-bit shard is converted to float32 again in backward rather than
        # keeping a float32 copy alive in between.
        ctx.save_for_backward(input, *saved)
        ctx.a = a
        ctx.merged = merged
        return _loss_tensor(loss, input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():
            # create_graph=True: the gradient would be returned as a constant, and every
            # derivative of it silently 0. Refuse instead.
            raise RuntimeError(
                "vocab_parallel_cross_entropy has no second-order derivative (backward with "
                "create_graph=True: Hessians, gradient penalties); its gradient is computed "
                "outside the autograd graph. Use fastxent.torch.cross_entropy on gathered "
                "logits for those")
        with torch.no_grad():
            return _VocabParallelCrossEntropy._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output: Tensor):
        input = ctx.saved_tensors[0]
        a, merged = ctx.a, ctx.merged
        x = _numpy(input, a.cdt)
        sw, scale, post = a.sample_weight, 1.0, None
        if a.reduction == "none":
            # Row n's loss depends on row n's logits only, so the upstream gradient of the
            # rows is a per-row factor of row n's gradient: it is folded into the sample
            # weights of the sum's gradient, which shard_grad applies per row in its one pass
            # (the same factor as scaling afterwards; only the rounding order differs: the
            # product s_n * go_n is rounded to the compute dtype).
            if not _all_ones(grad_output):
                go = _numpy(grad_output, torch.float64)
                sw = go if sw is None else np.asarray(sw, np.float64) * go
        else:
            scale = float(grad_output)
            if not np.isfinite(scale):  # shard_grad takes finite scales; inf/NaN propagate
                scale, post = 1.0, grad_output
        g = _shard.shard_grad(x, a.tgt, merged, offset=a.offset, num_classes=a.num_classes,
                              weight=a.weight, ignore_index=a.ignore_index,
                              label_smoothing=a.label_smoothing, softcap=a.softcap,
                              logit_scale=a.logit_scale, z_loss=a.z_loss,
                              reduction="sum" if a.reduction == "none" else a.reduction,
                              sample_weight=sw, normalizer=a.normalizer, scale=scale,
                              num_threads=a.num_threads)
        grad = torch.from_numpy(g)
        if grad.dtype != input.dtype:
            grad = grad.to(input.dtype)
        if post is not None:
            grad = grad * post
        return (grad, None) + (None,) * (len(ctx.saved_tensors) - 1)


def vocab_parallel_cross_entropy(local_logits: Tensor, target: Tensor, group: Any = None, *,
                                 offset: Optional[int] = None,
                                 num_classes: Optional[int] = None,
                                 weight: Optional[Tensor] = None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, reduction: str = "mean",
                                 sample_weight: Optional[Tensor] = None, z_loss: float = 0.0,
                                 softcap: Optional[float] = None, logit_scale: float = 1.0,
                                 normalizer: Optional[float] = None,
                                 num_threads: Optional[int] = None) -> Tensor:
    cdt = _compute_dtype(local_logits, target, "local_logits")
    _refuse_func_transforms(local_logits, target, weight, sample_weight)
    if local_logits.ndim == 0:
        raise ValueError("local_logits must have shape (..., C_local): the vocabulary slice "
                         "is the last dimension")
    if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    c_local = int(local_logits.shape[-1])
    if c_local == 0:
        raise ValueError("local_logits has an empty vocabulary slice (last dimension 0)")
    tgt = _target_array(target, cdt)
    w = _as_array(weight, "weight", cdt)
    sw = _as_array(sample_weight, "sample_weight", cdt)
    _dist()
    off, C = _vp_layout(c_local, group, offset, num_classes)
    if w is not None:
        w = np.asarray(w)
        if w.shape == (C,) and C != c_local:  # the full class-weight vector: this rank's part
            if not 0 <= off <= C - c_local:
                raise ValueError(f"the slice [offset, offset + C_local) = [{off}, "
                                 f"{off + c_local}) does not fit in num_classes = {C}")
            w = w[off:off + c_local]
        elif w.shape != (c_local,):
            raise ValueError(f"weight has shape {w.shape}; expected ({c_local},) (this rank's "
                             f"slice) or ({C},) (the full vocabulary)")
    a = _VPArgs(cdt=cdt, tgt=tgt, group=group, offset=off, num_classes=C, weight=w,
                ignore_index=ignore_index, label_smoothing=label_smoothing,
                reduction=reduction, sample_weight=sw, z_loss=z_loss, softcap=softcap,
                logit_scale=logit_scale, normalizer=normalizer, num_threads=num_threads)
    if not (local_logits.requires_grad and torch.is_grad_enabled()):
        loss, _ = _vp_stats_loss(_numpy(local_logits, cdt), a)
        return _loss_tensor(loss, local_logits.dtype)
    saved = [t for t in (target, weight, sample_weight) if isinstance(t, Tensor)]
    return _VocabParallelCrossEntropy.apply(local_logits, a, *saved)


vocab_parallel_cross_entropy.__doc__ = """Cross-entropy over a vocabulary split across the
    ranks of a ``torch.distributed`` process group (tensor / vocabulary parallelism, the layout
    of Megatron-LM's ``vocab_parallel_cross_entropy``): the loss and gradient are those of
    :func:`cross_entropy` on the full logits, without ever gathering them.

    Every rank of ``group`` calls it with the same rows and targets and its own slice of the
    classes. Forward: fastxent's per-shard statistics (:func:`fastxent.shard_stats`, one SIMD
    pass over the slice), then exactly two collectives: an ``all_reduce`` MAX of the row maxima
    and an ``all_reduce`` SUM of the other statistics packed in one float64 tensor of shape
    ``(rows, 7)``; the loss comes from the merged statistics and is the same on every rank.
    Backward: each rank's gradient from its own slice and the merged statistics
    (:func:`fastxent.shard_grad`), with no communication. Label smoothing spreads ``eps / C``
    over the whole vocabulary ``C = num_classes``, not over a rank's slice (the mistake of
    Megatron-LM #737); a NaN logit on any rank makes its row's loss NaN on every rank, whatever
    the backend's MAX does with NaN.

    Parameters
    ----------
    local_logits : Tensor (..., C_local), on the CPU
        This rank's slice of the logits: columns ``[offset, offset + C_local)`` of the full
        ``(..., C)`` logits; the class dimension is the **last** one (Megatron's layout, not
        ``F.cross_entropy``'s dimension 1), any leading dimensions are rows. float32 and
        float64 are read in place; float16 and bfloat16 are computed via a float32 copy and
        the loss and gradient cast back to the input's dtype.
    target : Tensor
        Global class indices (any integer dtype, in ``[0, C)`` or ``ignore_index``) of shape
        ``local_logits.shape[:-1]``, the same on every rank; or this rank's columns of class
        probabilities (a float tensor of ``local_logits``' shape).
    group : ProcessGroup, optional
        The ranks sharing the vocabulary (default: the world). Any backend that all-reduces
        CPU float64 tensors with MAX and SUM (``gloo``; ``mpi``).
    offset, num_classes : int, keyword-only, optional
        Where this rank's slice starts and the vocabulary size ``C``. By default the slices
        are laid out in rank order and their sizes (each rank's ``C_local``, which may differ)
        are gathered with one ``all_gather`` of one integer per rank; pass both to skip that
        collective (or for another layout: the slices must partition ``[0, C)``, which is
        checked after the merge).
    weight : Tensor, keyword-only, optional
        Class weights: either this rank's slice, shape ``(C_local,)``, or the full vector,
        shape ``(C,)``, of which this rank uses ``weight[offset:offset + C_local]`` (the two
        cannot be confused: ``C_local == C`` only for a rank holding the whole vocabulary).
    ignore_index, label_smoothing, reduction
        As :func:`cross_entropy` (``reduction`` in ``{"mean", "sum", "none"}``; ``"none"``
        returns ``local_logits.shape[:-1]``).
    sample_weight : Tensor, keyword-only, optional
        Per-row weights, shape ``local_logits.shape[:-1]`` (the same on every rank).
    z_loss, softcap, logit_scale, normalizer, num_threads
        fastxent's options, as :func:`cross_entropy` (``num_threads`` caps this rank's
        OpenMP threads).

    Returns
    -------
    Tensor of ``local_logits``' dtype, the same on every rank: a scalar, or the rows' shape
    for ``"none"``. Differentiable with respect to ``local_logits`` only (as
    :func:`cross_entropy`); call ``backward`` on every rank (no collective runs in it, so ranks
    may also backpropagate at different times).

    Raises
    ------
    RuntimeError
        ``torch.distributed`` unavailable or not initialized; ``weight``, ``sample_weight`` or
        a probability target that requires grad; ``create_graph=True`` in backward (no
        second-order derivative) or a ``torch.func`` transform.
    ValueError
        a tensor not on the CPU; a bad shape, option or layout (slices that overlap or leave
        classes out are detected after the merge, on every rank alike).
    TypeError, IndexError
        as :func:`cross_entropy`.

    Errors found before the collectives (a bad argument on one rank only) leave the other
    ranks waiting in the collective, as with any ``torch.distributed`` code; the process
    group's timeout ends the wait.

    Example
    -------
    On each of the ``world`` ranks (``torch.distributed.init_process_group("gloo", ...)``
    done), with ``logits_full`` of shape ``(B, T, V)``::

        rank, world = dist.get_rank(), dist.get_world_size()
        local = logits_full.tensor_split(world, dim=-1)[rank].requires_grad_()
        loss = fxt.vocab_parallel_cross_entropy(local, target, label_smoothing=0.1)
        loss.backward()      # local.grad: this rank's slice of the full gradient
"""


from ._torch_linear import LinearCrossEntropyLoss, linear_cross_entropy  # noqa: E402
from ._torch_linear_vp import vocab_parallel_linear_cross_entropy  # noqa: E402
from ._torch_linear_hf import patch_causal_lm, unpatch_causal_lm  # noqa: E402
