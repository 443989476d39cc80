"""fastxent.torch's paths that cannot read tensor values (private): the option checks
made without them, the torch.func fallback to the reference loss, and the kernel as a
torch.library custom op for torch.compile, FakeTensor and meta tensors."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _api
from ._keywords import EXTRA
from ._options import common_options, real
from ._torch_common import (
    COMPUTE_DTYPE,
    autocast_loss_dtype,
    logits_array,
    loss_tensor,
    prepare,
    reference_grads,
    reference_loss,
    refuse_func_options,
)
from ._torch_fast import fused

_FUNC_OPTIONS = tuple(EXTRA.defaults)  # fastxent's keywords beyond PyTorch's


def validate_options(options: Dict[str, Any], caller: str) -> Dict[str, Any]:
    """fastxent's extra keywords: names (TypeError naming `caller`) and scalar values
    (ValueError), without tensors."""
    for k in options:
        if k not in _FUNC_OPTIONS:
            raise TypeError(
                f"{caller}() got an unexpected keyword argument {k!r} (fastxent's "
                f"options: {', '.join(_FUNC_OPTIONS)})"
            )
    z_loss = real(options.get("z_loss", 0.0), "z_loss", 0.0, False)
    cap = options.get("softcap")
    cap = None if cap is None else real(cap, "softcap", 0.0, True)
    alpha = real(options.get("logit_scale", 1.0), "logit_scale", 0.0, True)
    norm = options.get("normalizer")
    norm = None if norm is None else real(norm, "normalizer", 0.0, False)
    return dict(z_loss=z_loss, softcap=cap, logit_scale=alpha, normalizer=norm)


def checked_options(
    input: Tensor,
    target: Tensor,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    options: Dict[str, Any],
    caller: str = "cross_entropy",
) -> Dict[str, Any]:
    """The checks that need no tensor values (shapes, dtypes, option names and ranges), for
    the paths that cannot read the values up front (torch.func transforms, torch.compile,
    fake and meta tensors); returns the keywords of reference_loss."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dtype not in COMPUTE_DTYPE:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if input.ndim == 0:
        raise ValueError(
            "input must have shape (C,), (N, C) or (N, C, d1, ..., dk); got a 0-dimensional tensor"
        )
    scalars = validate_options(options, caller)
    _, ii, eps, _ = common_options(
        reduction, ignore_index, label_smoothing, options.get("num_threads")
    )
    ax = 0 if input.ndim == 1 else 1
    C = input.shape[ax]
    rows = tuple(input.shape[:ax]) + tuple(input.shape[ax + 1 :])
    if target.is_floating_point():
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(
                f"probability target has shape {tuple(target.shape)}, expected "
                f"the input's shape {tuple(input.shape)}"
            )
        if ii != -100:
            raise ValueError("ignore_index applies to class-index targets only")
    elif target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices or float class "
            f"probabilities, got {target.dtype}"
        )
    elif tuple(target.shape) != rows:
        raise ValueError(
            f"target has shape {tuple(target.shape)}, expected {rows} (the "
            f"input's shape without its class dimension {ax})"
        )
    for name, v, shape in (
        ("weight", weight, (C,)),
        ("sample_weight", options.get("sample_weight"), rows),
    ):
        if v is not None and tuple(np.shape(v)) != shape:
            raise ValueError(f"{name} has shape {tuple(np.shape(v))}, expected {shape}")
    return dict(
        axis=ax,
        reduction=reduction,
        weight=weight,
        ignore_index=ii,
        label_smoothing=eps,
        sample_weight=options.get("sample_weight"),
        **scalars,
    )


def func_transform_loss(
    input: Tensor,
    target: Tensor,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    options: Dict[str, Any],
) -> Tensor:
    """cross_entropy under a torch.func transform (grad, vmap, jvp, jacrev, jacfwd, hessian):
    the transforms hand over tensors without storage, which the kernel cannot read, so the
    loss is reference_loss, in PyTorch ops that every transform composes with; the same
    checks as the kernel's path, except those that need the values (a class index out of
    range raises PyTorch's indexing error rather than fastxent's IndexError naming the row)."""
    refuse_func_options(dict(options, label_smoothing=label_smoothing), "fastxent.torch")
    kw = checked_options(input, target, weight, ignore_index, reduction, label_smoothing, options)
    return reference_loss(input, target, kw).to(input.dtype)


# --- torch.library: the kernel as a custom op, for torch.compile, FakeTensor and meta ------


@torch.library.custom_op("fastxent::cross_entropy", mutates_args=())
def _op_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    sample_weight: Optional[Tensor],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    normalizer: Optional[float],
    want_grad: bool,
) -> Tuple[Tensor, Tensor]:
    """(loss, gradient) by the fused kernel; the gradient is empty without want_grad. What
    torch.compile puts in its graph (an opaque node, no graph break), with a fake
    implementation for shape inference and an autograd formula."""
    opts: Dict[str, Any] = dict(
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        normalizer=normalizer,
        sample_weight=sample_weight,
    )
    cdt, tgt, kw = prepare(input, target, weight, ignore_index, reduction, label_smoothing, opts)
    if not want_grad:
        loss = _api.cross_entropy(logits_array(input, tgt, cdt), tgt, **kw)
        return loss_tensor(loss, input.dtype), input.new_empty((0,))
    loss, grad = fused(input, tgt, cdt, kw)
    return loss_tensor(loss, input.dtype), grad


@_op_cross_entropy.register_fake
def _(
    input,
    target,
    weight,
    sample_weight,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    normalizer,
    want_grad,
):
    ax = 0 if input.ndim == 1 else 1
    rows = tuple(input.shape[:ax]) + tuple(input.shape[ax + 1 :])
    loss = input.new_empty(rows if reduction == "none" else ())
    grad = input.new_empty(input.shape) if want_grad else input.new_empty((0,))
    return loss, grad


def _op_setup_context(ctx, inputs, output):
    (
        input,
        target,
        weight,
        sample_weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        normalizer,
        _,
    ) = inputs
    ctx.reduction = reduction
    ctx.ndim = input.ndim
    # The gradient for first order; the logits and target for a second-order backward
    # (create_graph=True: differentiated through reference_loss, as in eager mode).
    ctx.save_for_backward(output[1], input, target)
    ctx.kw = dict(
        axis=0 if input.ndim == 1 else 1,
        reduction=reduction,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        sample_weight=sample_weight,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        normalizer=normalizer,
    )
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, grad_loss, grad_grad):
    if any(ctx.needs_input_grad[1:4]):
        raise RuntimeError(
            "fastxent.torch.cross_entropy under torch.compile (or on fake / meta tensors) "
            "differentiates the logits only: a probability target, weight or sample_weight "
            "that requires grad needs the eager call"
        )
    g, input, target = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
        gz, _ = reference_grads(input, target, ctx.kw, grad_loss, (True, False), True)
        return (gz,) + (None,) * 11
    go = grad_loss
    if ctx.reduction == "none" and ctx.ndim > 1:
        go = go.unsqueeze(1)
    return (g * go.to(g.dtype),) + (None,) * 11


_op_cross_entropy.register_autograd(_op_backward, setup_context=_op_setup_context)


def is_fake(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.device.type == "meta" or _fake_check(t))


def _fake_check(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(t))


def op_loss(
    input: Tensor,
    target: Tensor,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    options: Dict[str, Any],
) -> Tensor:
    """cross_entropy through the custom op: under torch.compile (traced as one node) and for
    fake or meta tensors (shape inference). Only the logits are differentiable here."""
    kw = checked_options(input, target, weight, ignore_index, reduction, label_smoothing, options)
    want_grad = input.requires_grad and torch.is_grad_enabled()
    w = kw["weight"]
    sw = kw["sample_weight"]
    loss, _ = _op_cross_entropy(
        input,
        target,
        w if (w is None or isinstance(w, Tensor)) else torch.as_tensor(w),
        sw if (sw is None or isinstance(sw, Tensor)) else torch.as_tensor(sw),
        reduction,
        kw["ignore_index"],
        kw["label_smoothing"],
        kw["z_loss"],
        kw["softcap"],
        kw["logit_scale"],
        kw["normalizer"],
        want_grad,
    )
    return loss.to(autocast_loss_dtype(input))
