"""fastxent.torch's sigmoid (binary / multi-label) cross-entropy (private; public through
fastxent.torch): F.binary_cross_entropy_with_logits and nn.BCEWithLogitsLoss."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import _sigmoid as _api_sigmoid
from ._torch_common import (
    COMPUTE_DTYPE,
    autocast_loss_dtype,
    check_cpu,
    first_order,
    has_tangent,
    loss_tensor,
    numpy_of,
    under_func_transform,
)

# --------------------------------------------------------------------------------------------
# Sigmoid (binary / multi-label) cross-entropy: F.binary_cross_entropy_with_logits
# --------------------------------------------------------------------------------------------


def _sigmoid_reference(
    x: Tensor, y: Tensor, w: Optional[Tensor], pw: Optional[Tensor], reduction: str
) -> Tensor:
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
    gradient times grad_output (first_order); under create_graph=True, or for target /
    weight / pos_weight gradients, the vector-Jacobian product of _sigmoid_reference. jvp:
    <g, v> per element."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        target: Tensor,
        weight: Optional[Tensor],
        pos_weight: Optional[Tensor],
        cdt: torch.dtype,
        reduction: str,
        fwd: bool,
    ) -> Tensor:
        inputs = (input, target, weight, pos_weight)
        ctx.grad = _FusedSigmoidCrossEntropy._kernel(inputs, cdt, reduction, ctx)
        # For the derivatives that read them (version-checked by autograd, freed after a
        # backward that does not retain the graph).
        ctx.save_for_backward(*inputs)
        if fwd:  # a forward-mode tangent (decided by the caller, as in _FusedCrossEntropy)
            ctx.save_for_forward(ctx.grad)
            ctx.fwd = inputs  # for jvp (forward mode: no backward, no graph to free)
        ctx.cdt, ctx.reduction = cdt, reduction
        ctx.inplace, ctx.class_dim = False, None  # for first_order
        ctx.loss_dtype = autocast_loss_dtype(input)
        return loss_tensor(ctx.loss, ctx.loss_dtype)

    @staticmethod
    def _kernel(
        inputs: Tuple[Optional[Tensor], ...], cdt: torch.dtype, reduction: str, ctx: Any = None
    ) -> Tensor:
        def arr(t: Optional[Tensor]) -> Optional[np.ndarray]:
            return None if t is None else numpy_of(t, cdt)

        x, y, w, pw = inputs
        loss, g = _api_sigmoid.sigmoid_cross_entropy_with_grad(
            arr(x), arr(y), reduction=reduction, weight=arr(w), pos_weight=arr(pw)
        )
        if ctx is not None:
            ctx.loss = loss
        grad = torch.from_numpy(g)
        return grad if grad.dtype == x.dtype else grad.to(x.dtype)

    @staticmethod
    def _reference_vjp(
        ctx: Any,
        inputs: Tuple[Optional[Tensor], ...],
        grad_output: Tensor,
        need: Tuple[bool, ...],
        create_graph: bool,
    ) -> List[Optional[Tensor]]:
        with torch.enable_grad():
            ins = [
                t if (t is None or create_graph) else t.detach().requires_grad_(n)
                for t, n in zip(inputs, need)
            ]
            loss = _sigmoid_reference(ins[0], ins[1], ins[2], ins[3], ctx.reduction)
            wrt = [t for t, n in zip(ins, need) if n]
            got = list(
                torch.autograd.grad(
                    loss,
                    wrt,
                    grad_output.to(loss.dtype),
                    create_graph=create_graph,
                    allow_unused=True,
                )
            )
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
                ctx, tuple(ctx.saved_tensors), grad_output, need, create_graph
            )
        else:
            grads = [None] * 4
        if need[0] and not create_graph:
            grads[0] = first_order(
                ctx,
                grad_output,
                lambda: _FusedSigmoidCrossEntropy._kernel(
                    tuple(ctx.saved_tensors), ctx.cdt, ctx.reduction
                ),
            )
        return (*grads, None, None, None)

    @staticmethod
    def jvp(
        ctx,
        x_t: Optional[Tensor],
        y_t: Optional[Tensor],
        w_t: Optional[Tensor],
        pw_t: Optional[Tensor],
        *_: Any,
    ) -> Tensor:
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
    check_cpu(v, name)
    _api_sigmoid.check_broadcast(v.shape, input.shape, name, "input's")
    return v


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
) -> Tensor:
    if size_average is not None or reduce is not None:
        # PyTorch's own translation, with its deprecation warning.
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_cpu(input, "input")
    check_cpu(target, "target")
    cdt = COMPUTE_DTYPE.get(input.dtype)
    if cdt is None:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"target has shape {tuple(target.shape)}, expected the input's shape "
            f"{tuple(input.shape)} (as F.binary_cross_entropy_with_logits)"
        )
    if not (target.is_floating_point() or target.dtype == torch.bool or not (target.is_complex())):
        raise TypeError(f"target must be real, got {target.dtype}")
    w = _bce_operand(weight, "weight", input)
    pw = _bce_operand(pos_weight, "pos_weight", input)
    if under_func_transform(input, target, w, pw):
        return _sigmoid_reference(input, target, w, pw, reduction).to(autocast_loss_dtype(input))
    tensors = (input, target, w, pw)
    grad_mode = torch.is_grad_enabled()
    wants = any(
        t is not None and ((t.requires_grad and grad_mode) or has_tangent(t)) for t in tensors
    )
    if not wants:

        def arr(t: Optional[Tensor]) -> Optional[np.ndarray]:
            return None if t is None else numpy_of(t, cdt)

        loss = _api_sigmoid.sigmoid_cross_entropy(
            numpy_of(input, cdt),
            numpy_of(target, cdt),
            reduction=reduction,
            weight=arr(w),
            pos_weight=arr(pw),
        )
        return loss_tensor(loss, autocast_loss_dtype(input))
    fwd = any(t is not None and has_tangent(t) for t in tensors)
    return _FusedSigmoidCrossEntropy.apply(input, target, w, pw, cdt, reduction, fwd)


binary_cross_entropy_with_logits.__doc__ = """
    ``torch.nn.functional.binary_cross_entropy_with_logits`` computed by fastxent's fused
    sigmoid kernel (:func:`fastxent.sigmoid_cross_entropy_with_grad`): the same signature
    (``size_average`` and ``reduce`` are translated with PyTorch's own deprecation warning)
    and the same values::

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

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average: Optional[bool] = None,
        reduce: Optional[bool] = None,
        reduction: str = "mean",
        pos_weight: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
