"""fastxent.torch's distillation losses from hidden states and head weights (private; public
through fastxent.torch): linear_kl_div and linear_jsd, differentiable with respect to the
student's hidden states, head weight and bias, around fastxent._distill_linear's tile loop
with torch.mm as its matmuls (the N x V logits never exist).

- The teacher's head is frozen: a teacher tensor (hidden, weight, bias) that requires grad is
  a RuntimeError while gradients are recorded (no gradient flows to it; a silent None would
  hide that; detach it).
- "mean" / "sum": the forward computes the loss and the student's gradients in one sweep; the
  backward hands them out, scaled in place by the upstream scalar (no second copy of the
  V x H weight gradient; none at all for an upstream 1), and keeps no reference to them. A
  later backward through the same graph (retain_graph=True) computes them again from the
  inputs (refused if one was modified in place since the forward); a batch of upstream
  gradients (is_grads_batched=True) scales them out of place. "none": the forward computes
  the row losses only; the backward reruns the tiles with the row weights multiplied by the
  upstream gradient (exact per-row upstream gradients).
- First order only: a backward under create_graph=True (double backward, Hessian-vector
  products, gradient penalties) is a RuntimeError, never silent zeros.
- float32, float64, float16 and bfloat16 CPU tensors; 16-bit ones multiplied natively by
  torch.mm (see fastxent._distill_linear), the loss in the input's dtype.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _distill, _distill_linear
from ._options import reduction_code
from ._torch_common import check_cpu, refuse_func_transforms

__all__ = ["linear_kl_div", "linear_jsd"]


def _t(a: np.ndarray) -> Tensor:
    """A tensor over a NumPy array's memory (bfloat16: ml_dtypes' as torch.bfloat16)."""
    if a.dtype.itemsize == 2 and a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class TorchOps:
    """The tile loop's matmuls by torch.mm on tensors over the NumPy arrays' memory; 16-bit
    ones natively (PyTorch's 16-bit matmul accumulates in float32 and rounds once)."""

    half = True

    @staticmethod
    def mm(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        torch.mm(_t(a), _t(b), out=_t(out))

    @staticmethod
    def mm_add(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        _t(out).addmm_(_t(a), _t(b))

    @staticmethod
    def mm_bias(a: np.ndarray, b: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
        torch.addmm(_t(bias), _t(a), _t(b), out=_t(out))

    @staticmethod
    def col_sum(g: np.ndarray, acc: np.ndarray) -> None:
        _t(acc).add_(_t(g).sum(0, dtype=_t(acc).dtype))


def _np(t: Any) -> Any:
    if isinstance(t, Tensor):
        t = t.detach().resolve_neg().resolve_conj()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return t


def _version(t: Any) -> Optional[int]:
    if not isinstance(t, Tensor) or t.is_inference():
        return None
    return int(t._version)


def _want(ctx: Any) -> Tuple[bool, bool, bool]:
    n = ctx.needs_input_grad
    return bool(n[0]), bool(n[1]), bool(n[2])


def _keep_inputs(ctx: Any, inputs: tuple, kw: Dict[str, Any]) -> None:
    """What a backward that recomputes needs: the inputs kept on ctx, not saved for backward
    (tensors made under inference_mode, the usual frozen teacher, cannot be saved), their
    version counters (an in-place change is caught) and copies of the row arrays."""
    ctx.inputs = inputs
    ctx.versions = tuple(_version(x) for x in inputs)
    ctx.kw = {
        k: (v.clone() if isinstance(v, Tensor) else np.array(v))
        if k in ("labels", "mask", "sample_weight") and v is not None
        else v
        for k, v in kw.items()
    }


def _inputs_again(ctx: Any) -> tuple:
    """The kept inputs as the tile loop's arrays, refused if one changed in place."""
    if tuple(_version(x) for x in ctx.inputs) != ctx.versions:
        raise RuntimeError(
            "fastxent.torch.linear_kl_div / linear_jsd: an input was modified in place "
            "between the forward and the backward (this backward reads them again)"
        )
    hs, ws, bs, ht, wt, bt = ctx.inputs
    return tuple(_np(x) for x in (hs, ws, ht, wt, bs, bt))


def _grads(ctx: Any, arrays: tuple, row_scale: Optional[np.ndarray]) -> tuple:
    want = _want(ctx)
    _, gh, gw, gb = _distill_linear.run(
        arrays, ctx.divergence, ctx.beta, **ctx.kw, want=want, ops=TorchOps, row_scale=row_scale
    )
    return tuple(None if g is None else _t(g) for g in (gh, gw, gb))


class _LinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, divergence, beta, kw):  # type: ignore[override]
        arrays = tuple(_np(x) for x in (hs, ws, ht, wt, bs, bt))
        want = _want(ctx)
        ctx.divergence, ctx.beta, ctx.kw, ctx.dtype = divergence, beta, kw, hs.dtype
        ctx.none = reduction_code(kw["reduction"]) == 0
        if ctx.none or not any(want):
            loss, *_ = _distill_linear.run(
                arrays, divergence, beta, **kw, want=(False, False, False), ops=TorchOps
            )
            ctx.grads = None
            if ctx.none and any(want):
                _keep_inputs(ctx, (hs, ws, bs, ht, wt, bt), kw)  # every backward reruns
        else:
            loss, gh, gw, gb = _distill_linear.run(
                arrays, divergence, beta, **kw, want=want, ops=TorchOps
            )
            ctx.grads = tuple(None if g is None else _t(g) for g in (gh, gw, gb))
            _keep_inputs(ctx, (hs, ws, bs, ht, wt, bt), kw)  # for a second backward
        return torch.from_numpy(np.asarray(loss)).to(hs.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fastxent.torch.linear_kl_div / linear_jsd have first-order gradients only: "
                "backward with create_graph=True (double backward, Hessian-vector products, "
                "gradient penalties) is not supported"
            )
        tail = (None,) * 6
        if ctx.none:
            scale = grad_output.detach().to(torch.float64).contiguous().numpy().reshape(-1)
            return _grads(ctx, _inputs_again(ctx), scale) + tail
        grads = ctx.grads
        if grads is None:  # handed out by an earlier backward (retain_graph=True)
            grads = _grads(ctx, _inputs_again(ctx), None)
        go = grad_output.to(ctx.dtype)
        try:
            one = go.item() == 1
        except RuntimeError:
            # A batch of upstream gradients (autograd.grad(is_grads_batched=True): vmap over
            # this backward, values not readable): one product per entry, out of place, the
            # saved gradients kept as they are for the next entries and backwards.
            ctx.grads = grads
            return tuple(None if g is None else g * go for g in grads) + tail
        # Handed out: no reference kept (autograd may keep one as a .grad, without a copy,
        # and the user change it), so they are scaled in place, each once: three distinct
        # arrays, none of them an input's memory.
        ctx.grads = None
        if not one:
            for g in grads:
                if g is not None:
                    g.mul_(go)
        return tuple(grads) + tail


def _apply(
    hs: Tensor,
    ws: Tensor,
    ht: Tensor,
    wt: Tensor,
    bs: Optional[Tensor],
    bt: Optional[Tensor],
    divergence: int,
    beta: float,
    kw: Dict[str, Any],
) -> Tensor:
    named = (("student_hidden", hs), ("student_weight", ws), ("teacher_hidden", ht),
             ("teacher_weight", wt), ("student_bias", bs), ("teacher_bias", bt))  # fmt: skip
    for name, t in named:
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_cpu(t, name)
    refuse_func_transforms(hs, ws, ht, wt, bs, bt)  # tensors without storage: a clear error
    if torch.is_grad_enabled():
        for name, t in named[2:]:
            if name.startswith("teacher") and t is not None and t.requires_grad:
                raise RuntimeError(
                    f"{name} requires grad, but the teacher's head is frozen: no gradient "
                    f"flows to it (detach it, e.g. {name}.detach())"
                )
        for name in ("sample_weight",):
            v = kw[name]
            if isinstance(v, Tensor) and v.requires_grad:
                raise RuntimeError(
                    f"fastxent.torch does not differentiate with respect to {name}; this "
                    "input cannot have requires_grad=True (detach it)"
                )
    # every check of the NumPy layer before autograd records anything
    _distill_linear.check_inputs(*(_np(t) for t in (hs, ws, ht, wt, bs, bt)))
    if not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (hs, ws, bs) if t is not None)
    ):
        # No graph: the loss alone (no gradient matmuls, no V x H gradient).
        arrays = tuple(_np(x) for x in (hs, ws, ht, wt, bs, bt))
        loss, *_ = _distill_linear.run(
            arrays, divergence, beta, **kw, want=(False, False, False), ops=TorchOps
        )
        return torch.from_numpy(np.asarray(loss)).to(hs.dtype)
    return _LinearDistill.apply(hs, ws, bs, ht, wt, bt, divergence, beta, kw)


def linear_kl_div(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    direction: str = "forward",
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
    num_threads: Optional[int] = None,
    tile_rows: Optional[int] = None,
) -> Tensor:
    """:func:`fastxent.torch.kl_div_with_logits` of ``F.linear(student_hidden, student_weight,
    student_bias)`` and ``F.linear(teacher_hidden, teacher_weight, teacher_bias)`` without the
    N x V logits (:func:`fastxent.linear_kl_div` with torch.mm per tile). Differentiable with
    respect to the student's hidden states, weight and bias; the teacher's head is frozen (a
    teacher tensor that requires grad is a RuntimeError). First order only (create_graph=True
    is a RuntimeError in backward)."""
    kw = _distill_linear.call_kw(temperature, reduction, labels, ignore_index, mask,
                                 sample_weight, num_threads, tile_rows)  # fmt: skip
    return _apply(student_hidden, student_weight, teacher_hidden, teacher_weight,
                  student_bias, teacher_bias, _distill._direction(direction), 0.5, kw)  # fmt: skip


def linear_jsd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
    num_threads: Optional[int] = None,
    tile_rows: Optional[int] = None,
) -> Tensor:
    """:func:`fastxent.torch.jsd_with_logits` (generalised JSD) of the student's and the
    teacher's logits from their hidden states and heads, without the N x V logits (see
    :func:`linear_kl_div`: same gradients, frozen teacher, first order only)."""
    kw = _distill_linear.call_kw(temperature, reduction, labels, ignore_index, mask,
                                 sample_weight, num_threads, tile_rows)  # fmt: skip
    return _apply(student_hidden, student_weight, teacher_hidden, teacher_weight,
                  student_bias, teacher_bias, 2, _distill._beta(beta), kw)  # fmt: skip
