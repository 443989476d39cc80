"""fastxent.torch's shared tensor plumbing (private): zero-copy NumPy views of CPU
tensors and back, the dtype the kernel computes in, target and weight conversion, the
keywords handed to fastxent's NumPy API, torch.func detection, and the reference loss and
gradients in PyTorch ops that the derivative paths (second order, forward mode, torch.func)
differentiate."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

try:  # bfloat16 as a NumPy dtype: the kernel reads PyTorch's bfloat16 memory through it
    from ml_dtypes import bfloat16 as ML_BF16
except ImportError:  # pragma: no cover - ml_dtypes comes with the torch extra
    ML_BF16 = None

# The dtypes the kernel computes in, per input dtype: float32 and float64 are read in place,
# float16 and bfloat16 too (the kernel's 16-bit path converts in registers and computes in
# float32; weights and targets given to it are float32).
COMPUTE_DTYPE = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}

# fastxent keywords the PyTorch API sets itself (the class axis is PyTorch's dimension 1;
# the gradient buffer is managed here).
RESERVED = ("axis", "out")


def check_cpu(t: Optional[Tensor], name: str) -> None:
    if t is not None and t.device.type != "cpu":
        raise TypeError(
            f"fastxent is a CPU kernel: {name} is on device '{t.device}'; move it to the CPU "
            f"(.cpu()) or use torch.nn.functional.cross_entropy for {t.device.type} tensors"
        )


def _readable(t: Tensor) -> Tensor:
    """t detached, with memory holding its values: a lazy negation resolved, an efficient zero
    tensor (which has no memory) materialised."""
    t = t.detach()
    if t.is_neg():
        t = t.resolve_neg()
    if t._is_zerotensor():
        t = torch.zeros(t.shape, dtype=t.dtype)
    return t


_functorch_active = torch._C._are_functorch_transforms_active


def _plain(read: Callable[..., Any]) -> Callable[..., Any]:
    """`read` with functorch's dispatch off inside a torch.func transform: a plain tensor there
    (a constant of the transformed function) is read as it is, where through functorch even
    its detach() returns a tensor without storage. Wrapped tensors are routed elsewhere."""

    def wrapper(*args: Any) -> Any:
        if _functorch_active():
            with torch._C._DisableFuncTorch():
                return read(*args)
        return read(*args)

    wrapper.__doc__ = read.__doc__
    return wrapper


@_plain
def numpy_of(t: Tensor, dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """A NumPy view of a CPU tensor (zero-copy when it already has `dtype`)."""
    t = _readable(t)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.numpy()


@_plain
def kernel_view(t: Tensor) -> Optional[np.ndarray]:
    """A zero-copy NumPy view of a CPU tensor in a dtype the kernel reads natively (float32,
    float64, float16, and bfloat16 through ml_dtypes), or None (bfloat16 without ml_dtypes)."""
    t = _readable(t)
    if t.dtype == torch.bfloat16:
        if ML_BF16 is None:
            return None
        return t.view(torch.int16).numpy().view(ML_BF16)
    return t.numpy()


def direct_logits(input: Tensor, tgt: np.ndarray) -> Optional[np.ndarray]:
    """The logits as the kernel reads them in place, or None for the float32 route (bfloat16
    without ml_dtypes; 16-bit logits with probabilities of another dtype, which the kernel
    would round to the logits' dtype)."""
    x = kernel_view(input)
    if x is not None and tgt.dtype.kind not in "iu" and tgt.dtype != x.dtype:
        return None
    return x


def logits_array(input: Tensor, tgt: np.ndarray, cdt: torch.dtype) -> np.ndarray:
    """The logits as the kernel reads them: in place, or as a float32 copy (direct_logits)."""
    x = direct_logits(input, tgt)
    return numpy_of(input, cdt) if x is None else x


def tensor_of(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """The tensor over a NumPy array the kernel wrote (bfloat16 through its int16 bits)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def autocast_loss_dtype(input: Tensor) -> torch.dtype:
    """The loss's dtype: float32 for 16-bit logits under CPU autocast (PyTorch runs
    cross-entropy in float32 there), else the input's."""
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled("cpu"):
        return torch.float32
    return input.dtype


def as_array(v: Any, name: str, dtype: torch.dtype) -> Any:
    """weight / sample_weight: a tensor becomes a NumPy view in the compute dtype; anything
    else goes to fastxent as it is (it validates and converts)."""
    if isinstance(v, Tensor):
        check_cpu(v, name)
        refuse_derivative(v, name)
        return numpy_of(v, dtype if v.is_floating_point() else None)
    return v


def refuse_derivative(v: Any, name: str, caller: str = "fastxent.torch") -> None:
    """A tensor argument whose derivative is not computed: one that requires grad (reverse
    mode) or carries a forward-mode tangent (torch.autograd.forward_ad) raises RuntimeError
    instead of getting a gradient of None or a tangent of 0 back."""
    if not isinstance(v, Tensor):
        return
    if v.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{caller} does not differentiate with respect to {name}; this input "
            f"cannot have requires_grad=True (detach it)"
        )
    if has_tangent(v):
        raise RuntimeError(
            f"{caller} does not differentiate with respect to {name}; this input "
            f"cannot carry a forward-mode tangent (torch.autograd.forward_ad): pass its primal"
        )


# Options that may arrive as 0-d tensors and are read as Python numbers (constants).
SCALAR_OPTIONS = (
    "label_smoothing",
    "normalizer",
    "z_loss",
    "softcap",
    "logit_scale",
    "entropy_coef",
)


def refuse_option_derivatives(options: Dict[str, Any], caller: str = "fastxent.torch") -> None:
    """Scalar options given as tensors are read as numbers: a derivative with respect to
    them would be silently missing, so one that is asked for raises (requires_grad, a
    forward-mode tangent, or a torch.func transform's tensor: refuse_func_options)."""
    refuse_func_options(options, caller)
    for k in SCALAR_OPTIONS:
        refuse_derivative(options.get(k), k, caller)


def transformed(v: Tensor) -> bool:
    """Whether a torch.func transform differentiates or maps over v: batched at some level,
    tracked for a gradient at some level (grad / jacrev, nested ones included), or carrying
    a forward tangent (jvp). A constant made inside the transform (torch.tensor(5.0), a
    count of the targets, a detached value) is wrapped too, but none of these."""
    t = v
    with torch._C._DisableFuncTorch():
        while is_wrapped(t):
            if torch._C._functorch.is_batchedtensor(t):
                return True
            if torch._C._functorch.is_gradtrackingtensor(t) and t.requires_grad:
                return True
            t = torch._C._functorch.get_unwrapped(t)
    return v.requires_grad or has_tangent(v)


def refuse_func_options(options: Dict[str, Any], caller: str = "fastxent.torch") -> None:
    """A scalar option that is a torch.func transform's tensor (differentiated by grad /
    jacrev / jvp / hessian, or mapped over by vmap) raises RuntimeError saying what is
    supported: options are read as constant numbers, so its derivative would be silently 0
    (grad with respect to both the input and normalizer gave 0 for normalizer) and a vmapped
    one cannot be read at all (the transforms' tensors have no storage)."""
    for k in SCALAR_OPTIONS:
        v = options.get(k)
        if isinstance(v, Tensor) and is_wrapped(v) and transformed(v):
            raise RuntimeError(
                f"{caller} reads {k} as a constant number: it cannot be a tensor that a "
                "torch.func transform differentiates or maps over (grad, jacrev, jvp or "
                f"hessian with respect to {k}, vmap over it). Pass a Python float, or a "
                "tensor made outside the transform (a constant there). Under torch.func the "
                "loss is differentiable, and vmap-able, with respect to the input (logits) and "
                "a probability target"
            )


def compute_dtype(logits: Tensor, target: Tensor, name: str) -> torch.dtype:
    """Checks that the logits (called `name`) and target are CPU tensors and returns the
    dtype fastxent computes in for these logits."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    check_cpu(logits, name)
    check_cpu(target, "target")
    cdt = COMPUTE_DTYPE.get(logits.dtype)
    if cdt is None:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {logits.dtype}")
    return cdt


def target_array(target: Tensor, cdt: torch.dtype, differentiable: bool = False) -> np.ndarray:
    """Class indices as they are, or probability targets in the compute dtype. Only
    cross_entropy differentiates with respect to probability targets (`differentiable`);
    elsewhere one that requires grad is refused."""
    if target.is_floating_point():
        if not differentiable:
            refuse_derivative(target, "a probability target", "vocab_parallel_cross_entropy")
        if differentiable and target.dtype in (torch.float16, torch.bfloat16):
            v = kernel_view(target)  # 16-bit probabilities for 16-bit logits: read as they are
            if v is not None:
                return v
        return numpy_of(target, cdt)
    if target.is_complex():
        raise TypeError(
            f"target must hold integer class indices or float class "
            f"probabilities, got {target.dtype}"
        )
    return numpy_of(target)


def prepare(
    input: Tensor,
    target: Tensor,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    options: Dict[str, Any],
) -> Tuple[torch.dtype, np.ndarray, Dict[str, Any]]:
    """Checks the PyTorch-side contract and returns (compute dtype, NumPy target, fastxent
    keywords); the logits are converted by the caller (in place or not)."""
    cdt = compute_dtype(input, target, "input")
    # before any tensor is read: inside a torch.func transform, reading one fails unclearly
    refuse_option_derivatives(dict(options, label_smoothing=label_smoothing))
    if input.ndim == 0:
        raise ValueError(
            "input must have shape (C,), (N, C) or (N, C, d1, ..., dk); got a 0-dimensional tensor"
        )
    for k in RESERVED:
        if k in options:
            raise TypeError(
                f"fastxent.torch sets {k!r} itself (the class dimension is "
                f"PyTorch's: 1, or 0 for an input of shape (C,))"
            )
    tgt = target_array(target, cdt, differentiable=True)
    kw = dict(options)
    kw["sample_weight"] = as_array(kw.get("sample_weight"), "sample_weight", cdt)
    kw.update(
        axis=0 if input.ndim == 1 else 1,
        reduction=reduction,
        weight=as_array(weight, "weight", cdt),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    return cdt, tgt, kw


def loss_tensor(loss: Any, dtype: torch.dtype) -> Tensor:
    return torch.from_numpy(np.asarray(loss)).to(dtype)


is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def under_func_transform(*ts: Any) -> bool:
    """Whether any of ts is a tensor wrapped by a torch.func transform (no storage)."""
    return any(isinstance(t, Tensor) and is_wrapped(t) for t in ts)


def values_under_func(t: Tensor, dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """t's values as a NumPy array (numpy_of), also inside torch.func transforms, whose
    tensors have no storage: read from the plain tensor under every wrapper (a vmapped tensor:
    its whole batch) with functorch's dispatch off, so that no operation here is lifted into
    the transform. For checks of values only (nothing is connected to the transform)."""
    with torch._C._DisableFuncTorch():
        while is_wrapped(t):
            t = torch._C._functorch.get_unwrapped(t)
        return numpy_of(t, dtype)


def refuse_func_transforms(*ts: Any) -> None:
    """torch.func transforms (grad, vmap, jacrev, jvp, ...) hand the wrapper tensors without
    storage, which the kernel cannot read: say so, and what works instead."""
    if under_func_transform(*ts):
        raise RuntimeError(
            "fastxent.torch does not support torch.func transforms (grad, vmap, jacrev, jvp, "
            "functional_call under them) yet: its kernel reads the tensors' memory. Use "
            "torch.autograd.grad (create_graph=True for higher orders, is_grads_batched=True "
            "for batched gradients), torch.autograd.functional.hessian / hvp / jvp, or "
            "torch.autograd.forward_ad, which are supported"
        )


def has_tangent(t: Optional[Tensor]) -> bool:
    """Whether t carries a forward-mode tangent (torch.autograd.forward_ad)."""
    return t is not None and fwAD._current_level >= 0 and fwAD.unpack_dual(t).tangent is not None


def reference_loss(z: Tensor, target: Tensor, kw: Dict[str, Any]) -> Tensor:
    """fastxent's loss (the formula of fastxent.cross_entropy, with the keywords `kw` of
    prepare) written in differentiable PyTorch ops, without a data-dependent branch, so that
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
        # An ignored row's logits reach nothing, not even as 0 * NaN in a derivative: they are
        # replaced before any operation on them.
        zz = torch.where(counted[:, None], zz, 0.0)
        onehot = (torch.arange(C)[None, :] == yc[:, None]).to(dt)
        wy = w[yc]  # (indexing also refuses a class index out of range, under vmap too)
        u = (1.0 - eps) * onehot * wy[:, None]
        if eps > 0.0:  # (without smoothing the class weights are not in u: 0 * inf = NaN)
            u = u + (eps / C) * w.expand(N, C)
        den = torch.where(counted, s * wy, 0.0)
    zp = cap * torch.tanh(alpha * zz / cap) if cap is not None else alpha * zz
    lse = torch.logsumexp(zp, dim=1)
    # 0 * inf := 0: a class with no target weight at a -inf logit costs nothing, and its
    # derivative with respect to that weight is taken as 0 (the loss is +inf on one side of
    # u = 0 there). Only that case is masked: where u is 0 and the logit finite, the
    # derivative with respect to u (a soft label, a class weight, the smoothing) is lse - z'.
    d = lse[:, None] - zp
    terms = u * torch.where((u == 0) & torch.isinf(d), 0.0, d)
    extra = float(kw.get("z_loss", 0.0)) * lse * lse
    beta = float(kw.get("entropy_coef") or 0.0)
    if beta != 0.0:  # the entropy bonus: - beta * s_n * H_n on counted rows
        extra = extra - beta * row_entropy(zp, lse)
    row = torch.where(counted, s * (terms.sum(dim=1) + extra), 0.0)
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


def row_entropy(zp: Tensor, lse: Tensor) -> Tensor:
    """H_n = -sum_c p_nc (z'_nc - lse_n) (= lse_n - sum_c p_nc z'_nc) for (rows, C)
    transformed logits, in differentiable ops, relative to lse so that no derivative passes
    through a term of the size of the logits (with logits near 1e38, lse - sum p z' cancelled
    the other statistics' derivatives away); a class of probability 0 (a -inf logit)
    contributes 0, value and derivative."""
    d = zp - lse[:, None]
    p = torch.exp(d)
    live = p > 0
    return -torch.where(live, p * torch.where(live, d, 0.0), 0.0).sum(dim=1)


def reference_stats(z: Tensor, target: Tensor, kw: Dict[str, Any]) -> Dict[str, Tensor]:
    """The differentiable per-row outputs of outputs= (lse, entropy, target_logprob; see
    fastxent.cross_entropy) of logits whose class axis is the last, as (rows,) tensors: what
    the derivatives of the kernel's statistics differentiate. target_logprob only for class
    targets (0 on ignored rows, whose logits reach nothing)."""
    C = z.shape[-1]
    zz = z.reshape(-1, C)
    if zz.dtype in (torch.float16, torch.bfloat16):
        zz = zz.float()  # the kernel computes 16-bit logits in float32
    cap, alpha = kw.get("softcap"), float(kw.get("logit_scale", 1.0))
    # A row of all -inf (values: the kernel's limits, e.g. entropy log C) has derivative 0,
    # not the NaN of -inf - (-inf), which a zero upstream weight would not cancel; without a
    # softcap, also a row of finite logits that the scale takes to -inf (as the kernel).
    with torch.no_grad():
        dead = ((zz if cap is not None else alpha * zz) == float("-inf")).all(dim=1, keepdim=True)
    zz = torch.where(dead, 0.0, zz)
    out: Dict[str, Tensor] = {}
    zp = cap * torch.tanh(alpha * zz / cap) if cap is not None else alpha * zz
    lse = torch.logsumexp(zp, dim=1)
    out["lse"] = lse
    out["entropy"] = row_entropy(zp, lse)
    if not target.is_floating_point():
        y = target.reshape(-1).to(torch.int64)
        counted = y != kw["ignore_index"]
        yc = torch.where(counted, y, 0)
        zc = torch.where(counted[:, None], zz, 0.0)
        zpc = cap * torch.tanh(alpha * zc / cap) if cap is not None else alpha * zc
        picked = zpc.gather(1, yc[:, None])[:, 0] - torch.logsumexp(zpc, dim=1)
        out["target_logprob"] = torch.where(counted, picked, 0.0)
    return out


def reference_grads(
    z: Tensor,
    target: Tensor,
    kw: Dict[str, Any],
    grad_output: Tensor,
    need: Tuple[bool, bool],
    create_graph: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Vector-Jacobian products of reference_loss with respect to the logits and/or the
    probability target (need = (logits, target)). With create_graph they are themselves
    differentiable functions of z, the target and grad_output (z and target are then the
    saved inputs, connected to the caller's graph)."""
    with torch.enable_grad():
        zr = z if create_graph else z.detach().requires_grad_(need[0])
        tr = target if (create_graph and target.requires_grad) else target.detach()
        if need[1] and not tr.requires_grad:
            tr = tr.detach().requires_grad_(True)
        loss = reference_loss(zr, tr, kw)
        wrt = [x for x, n in zip((zr, tr), need) if n]
        if loss.requires_grad:
            got = torch.autograd.grad(
                loss, wrt, grad_output.to(loss.dtype), create_graph=create_graph, allow_unused=True
            )
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


def first_order(ctx: Any, grad_output: Tensor, recompute: Callable[[], Tensor]) -> Tensor:
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
                "use inplace=False to backpropagate several times (retain_graph=True)"
            )
        if all_ones(go):
            return grad
        ctx.scaled_in_place = True
        return grad.mul_(go.to(grad.dtype))
    if grad is None:  # handed out by an earlier backward: computed again
        grad = recompute()
        ctx.grad = grad
    # The fused gradient is that of the loss itself (of the sum of rows for "none"); the
    # chain rule scales it by grad_output, exactly and per row, since row n's loss depends on
    # row n's logits only.
    if all_ones(go):
        ctx.grad = None
        return grad
    return grad * go.to(grad.dtype)


def all_ones(go: Tensor) -> bool:
    """Whether grad_output is exactly 1 everywhere; False for a batched grad_output
    (autograd.grad(is_grads_batched=True)), whose values cannot be tested in Python."""
    try:
        if go.dim() == 0:
            return go.item() == 1
        return bool(torch.all(go == 1))
    except RuntimeError:
        return False
