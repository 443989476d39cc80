"""fastxent.torch's autograd drop-in (private): the torch.autograd.Function whose
forward computes the loss and its gradient in one fused pass (the backward scales it),
and the dispatch of a cross_entropy call with options between it, the forward-only
kernel, the torch.func fallback and the custom op."""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from . import _api
from ._torch_common import (
    autocast_loss_dtype,
    direct_logits,
    first_order,
    has_tangent,
    logits_array,
    loss_tensor,
    numpy_of,
    prepare,
    reference_grads,
    reference_loss,
    under_func_transform,
)
from ._torch_fast import fused, is_compiling
from ._torch_nodata import func_transform_loss, is_fake, op_loss


class _FusedCrossEntropy(torch.autograd.Function):
    """Forward: loss and gradient from one fused kernel call. Backward: gradient times
    grad_output (first order, first_order); under create_graph=True, or for a probability
    target's gradient, the vector-Jacobian product of reference_loss instead, so that every
    derivative it returns is one it computed. Forward mode (jvp): the tangent of a row loss is
    <g_n, v_n> with the fused gradient g. Differentiable inputs: the logits and a
    probability target; weight and sample_weight (`extras`, saved for their version check)
    are refused by the wrapper when they require grad."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        target: Tensor,
        tgt: np.ndarray,
        cdt: torch.dtype,
        kw: Dict[str, Any],
        inplace: bool,
        fwd: bool,
        *extras: Tensor,
    ) -> Tensor:
        # fwd: a forward-mode tangent is present (decided by the caller: inside forward the
        # inputs come without their tangents).
        if inplace:
            x = direct_logits(input, tgt)
            if x is not None:
                loss, _ = _api.cross_entropy_with_grad(x, tgt, out=x, **kw)
            else:  # bfloat16 without ml_dtypes: a float32 copy, the gradient written back
                x32 = numpy_of(input, cdt)
                loss, _ = _api.cross_entropy_with_grad(x32, tgt, out=x32, **kw)
                input.detach().copy_(torch.from_numpy(x32))
            grad = input.detach()
            # The logits' memory now holds the gradient, written behind autograd's back:
            # bump the version counter so any other autograd node that saved these values
            # (e.g. a tanh or a softmax producing them) fails loudly in backward instead of
            # silently using the gradient as its saved tensor.
            torch.autograd.graph.increment_version(input)
        else:
            loss, grad = fused(input, tgt, cdt, kw)
            # The logits, target, weights: for the derivatives that read them (second order,
            # target gradient, a recomputed gradient); autograd checks their versions there
            # and frees them after a backward that does not retain the graph. (None after
            # inplace=True: the logits' memory holds the gradient.)
            ctx.save_for_backward(input, target, *extras)
        ctx.grad = grad  # first order: first_order hands it out
        if fwd:
            ctx.save_for_forward(grad)
            ctx.fwd = (input, target)  # for jvp (forward mode: no backward, no graph to free)
        ctx.tgt, ctx.cdt, ctx.kw = tgt, cdt, kw
        ctx.inplace = inplace
        ctx.scaled_in_place = False
        ctx.n_extras = len(extras)
        # "none": grad_output has the rows' shape; it broadcasts over the class dimension.
        ctx.class_dim = 1 if (kw["reduction"] == "none" and input.ndim > 1) else None
        ctx.loss_dtype = autocast_loss_dtype(input)
        return loss_tensor(loss, ctx.loss_dtype)

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
                    "gradient; use inplace=False"
                )
            input, target = ctx.saved_tensors[:2]  # version-checked by autograd
            gz, gt = reference_grads(input, target, ctx.kw, grad_output, need, create_graph)
            if need[0] and not create_graph:
                gz = _FusedCrossEntropy._first(ctx, grad_output)
            return (gz, gt) + rest
        return (_FusedCrossEntropy._first(ctx, grad_output), None) + rest

    @staticmethod
    def _first(ctx: Any, grad_output: Tensor) -> Tensor:
        def recompute() -> Tensor:
            return fused(ctx.saved_tensors[0], ctx.tgt, ctx.cdt, ctx.kw)[1]

        return first_order(ctx, grad_output, recompute)

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
                raise RuntimeError(
                    "fastxent.torch.cross_entropy(inplace=True): a probability "
                    "target's tangent needs the logits, which were overwritten"
                )
            # d loss / d target . v, from the reference loss (linear in v).
            with torch.enable_grad():
                tr = ctx.fwd[1].detach().requires_grad_(True)
                loss = reference_loss(ctx.fwd[0].detach(), tr, ctx.kw)
                (dt,) = torch.autograd.grad(loss, tr, torch.ones_like(loss), allow_unused=True)
            if dt is not None:
                if red == "none":
                    # the reference's "none" gradient is that of the sum; rows are separate
                    tt = (dt * target_t).sum(dim=ctx.class_dim if ctx.class_dim is not None else 0)
                else:
                    tt = (dt * target_t).sum()
                tt = tt.to(grad.dtype)
                out = tt if out is None else out + tt
        if out is None:
            raise RuntimeError("fastxent.torch.cross_entropy: jvp without a tangent")
        return out.to(ctx.loss_dtype)


def general_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    inplace: bool,
    options: Dict[str, Any],
) -> Tensor:
    if is_compiling() or is_fake(input):
        # (torch.func transforms inside a compiled function are not told apart here: Dynamo
        # cannot trace the check; the custom op then refuses them with an error.)
        return op_loss(input, target, weight, ignore_index, reduction, label_smoothing, options)
    if under_func_transform(input, target, weight, options.get("sample_weight")):
        return func_transform_loss(
            input, target, weight, ignore_index, reduction, label_smoothing, options
        )
    cdt, tgt, kw = prepare(input, target, weight, ignore_index, reduction, label_smoothing, options)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    grad_mode = torch.is_grad_enabled()
    reverse = input.requires_grad and grad_mode
    t_diff = target.is_floating_point() and (
        (target.requires_grad and grad_mode) or has_tangent(target)
    )
    if not (reverse or t_diff or has_tangent(input)):
        # No derivative wanted: the forward-only kernel, nothing of the logits' size written.
        return loss_tensor(
            _api.cross_entropy(logits_array(input, tgt, cdt), tgt, **kw), autocast_loss_dtype(input)
        )
    # The logits are overwritten only for a reverse-mode gradient of theirs alone.
    inplace = inplace and reverse and not t_diff
    if inplace:
        base = input if input._base is None else input._base
        if base.is_leaf and base.requires_grad:
            raise ValueError(
                "inplace=True would overwrite a leaf tensor that requires grad (or a view of "
                "one): its values are the parameters being learned; use inplace=False"
            )
        if not input.is_contiguous() or input.is_neg():
            raise ValueError(
                "inplace=True needs a contiguous input without a lazy negation "
                "(the gradient is written over its memory in the same layout); "
                "call .contiguous() / .resolve_neg() or use inplace=False"
            )
    fwd = has_tangent(input) or (t_diff and has_tangent(target))
    # weight and sample_weight tensors ride along for autograd's version check only.
    extras = tuple(v for v in (weight, options.get("sample_weight")) if isinstance(v, Tensor))
    return _FusedCrossEntropy.apply(input, target, tgt, cdt, kw, inplace, fwd, *extras)
