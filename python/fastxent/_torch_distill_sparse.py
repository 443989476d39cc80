"""fastxent.torch's distillation from a sparse (top-k) teacher (private; public through
fastxent.torch): kl_div_with_topk_teacher and jsd_with_topk_teacher, differentiable with
respect to the student's logits, around fastxent.kl_div_with_topk_teacher_with_grad /
jsd_with_topk_teacher_with_grad (see fastxent._distill_sparse for the teacher's definition).

The teacher's indices and log-probabilities are data: a teacher_logprobs that requires grad is
refused (no gradient flows to it, and a silent None would hide that). First-order gradients
come from the kernel; second order (create_graph=True: double backward, Hessian-vector
products, torch.autograd.functional.hvp / jvp / hessian, gradient penalties) differentiates
the dense wrappers' loss in PyTorch ops (fastxent._torch_distill.reference_loss) on the dense
teacher logits, built exactly as the kernel's tiles are (rows x C, at PyTorch's speed), as
fastxent.torch.kl_div_with_logits does. No forward mode (forward_ad) and no torch.func
transforms (an error, not a silent result). Under torch.compile the call is a graph break
(torch.compiler.disable: run eagerly, the rest compiled; fullgraph=True refuses it).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from . import _distill, _distill_sparse
from ._torch_common import autocast_loss_dtype, check_cpu, loss_tensor, refuse_func_transforms
from ._torch_distill import _reference_vjp, _Spec, _tensor

__all__ = ["kl_div_with_topk_teacher", "jsd_with_topk_teacher"]


class _TopkDistill(torch.autograd.Function):
    """Forward: the loss and (when the student requires grad) its gradient from one call of
    the NumPy layer. Backward: that gradient times grad_output; under create_graph=True
    (double backward, Hessian-vector products, gradient penalties), the vector-Jacobian
    product of the dense wrappers' loss in PyTorch ops on the dense teacher logits (built
    exactly as the tiles are: differentiable, materialising rows x C)."""

    @staticmethod
    def forward(ctx, student: Tensor, indices: Any, logprobs: Any, kw: Dict[str, Any]) -> Tensor:
        want = bool(ctx.needs_input_grad[0])
        res = _distill_sparse._run(student, indices, logprobs, **kw, want_grad=want, out=None)
        if want:
            loss, gs = res
            ctx.gs = _tensor(gs)
            ctx.save_for_backward(student)  # for the second-order path
            ctx.teacher, ctx.kw = (indices, logprobs), kw
        else:
            loss, ctx.gs = res, None
        ctx.none = kw["reduction"] == "none"
        return loss_tensor(loss, autocast_loss_dtype(student))

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            (student,) = ctx.saved_tensors
            kw = ctx.kw
            cdt = torch.float32 if student.dtype in (torch.float16, torch.bfloat16) else None
            lt = _distill_sparse.dense_teacher(
                tuple(student.shape[:-1]), student.shape[-1], *ctx.teacher, kw["residual"]
            )
            lt = torch.from_numpy(lt).to(cdt or student.dtype)
            dense_kw = {k: kw[k] for k in _DENSE_KEYS}
            spec = _Spec(kw["divergence"], kw["beta"], dense_kw)
            gs, _ = _reference_vjp(student, lt, spec, grad_output, (True, False))
            return gs, None, None, None
        g = ctx.gs
        go = grad_output.unsqueeze(-1) if ctx.none else grad_output
        return g * go.to(g.dtype), None, None, None


_DENSE_KEYS = (
    "temperature",
    "reduction",
    "labels",
    "ignore_index",
    "mask",
    "sample_weight",
    "num_threads",
)


def _options(
    residual: Any,
    temperature: Any,
    reduction: Any,
    labels: Any,
    ignore_index: Any,
    mask: Any,
    sample_weight: Any,
    num_threads: Any,
) -> Dict[str, Any]:
    return dict(
        residual=residual,
        temperature=temperature,
        reduction=reduction,
        labels=labels,
        ignore_index=ignore_index,
        mask=mask,
        sample_weight=sample_weight,
        num_threads=num_threads,
    )


# torch.compile cannot trace the NumPy layer (DLPack, NumPy checks): a graph break, so compiled
# code runs this call eagerly around the rest of the graph (fullgraph=True is refused).
@torch.compiler.disable(reason="fastxent top-k teacher: runs eagerly (NumPy layer)")
def _apply(
    student: Tensor, teacher_indices: Any, teacher_logprobs: Any, kw: Dict[str, Any]
) -> Tensor:
    if not isinstance(student, Tensor):
        raise TypeError(f"student must be a torch.Tensor, got {type(student).__name__}")
    check_cpu(student, "student")
    for name, v in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        if isinstance(v, Tensor):
            check_cpu(v, name)
            if v.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but the top-k teacher is data: no gradient flows "
                    f"to it (detach it, e.g. {name}.detach())"
                )
    sw = kw["sample_weight"]
    # tensors without storage: the library's error (PyTorch's was about setup_context)
    refuse_func_transforms(student, teacher_indices, teacher_logprobs, kw["labels"], kw["mask"], sw)
    if isinstance(sw, Tensor) and sw.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "fastxent.torch does not differentiate with respect to sample_weight; this input "
            "cannot have requires_grad=True (detach it)"
        )
    return _TopkDistill.apply(student, teacher_indices, teacher_logprobs, kw)


def kl_div_with_topk_teacher(
    student: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    *,
    residual: str = "renormalize",
    direction: str = "forward",
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
    num_threads: Optional[int] = None,
) -> Tensor:
    """KL divergence between a sparse (top-k) teacher and the student's softmax, differentiable
    with respect to the student: :func:`fastxent.kl_div_with_topk_teacher` on tensors. With a
    dense teacher ``lt`` (its log-probabilities, built as that function describes), "forward" is
    ``F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(lt / T, -1), log_target=True,
    reduction="batchmean") * T**2``. teacher_indices / teacher_logprobs are data: one that
    requires grad is a ValueError; so is (RuntimeError) a sample_weight that requires grad (no
    gradient flows to it either). First-order gradients from the kernel; second order
    (create_graph=True: Hessian-vector products, gradient penalties) through the loss in
    PyTorch ops on the dense teacher (rows x C), as :func:`kl_div_with_logits`."""
    kw: Dict[str, Any] = dict(divergence=_distill._direction(direction), beta=0.5)
    kw.update(_options(residual, temperature, reduction, labels, ignore_index, mask,
                       sample_weight, num_threads))  # fmt: skip
    return _apply(student, teacher_indices, teacher_logprobs, kw)


def jsd_with_topk_teacher(
    student: Tensor,
    teacher_indices: Tensor,
    teacher_logprobs: Tensor,
    *,
    residual: str = "renormalize",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
    num_threads: Optional[int] = None,
) -> Tensor:
    """Generalised JSD between a sparse (top-k) teacher and the student's softmax,
    differentiable with respect to the student: :func:`fastxent.jsd_with_topk_teacher` on
    tensors. teacher_indices / teacher_logprobs are data: one that requires grad is a
    ValueError; so is (RuntimeError) a sample_weight that requires grad. First-order gradients
    from the kernel; second order (create_graph=True) through the loss in PyTorch ops on the
    dense teacher (rows x C), as :func:`jsd_with_logits`."""
    kw: Dict[str, Any] = dict(divergence=2, beta=_distill._beta(beta))
    kw.update(_options(residual, temperature, reduction, labels, ignore_index, mask,
                       sample_weight, num_threads))  # fmt: skip
    return _apply(student, teacher_indices, teacher_logprobs, kw)
