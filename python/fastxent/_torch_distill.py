"""fastxent.torch's distillation losses (private; public through fastxent.torch): KL divergence
in either direction and the generalised Jensen-Shannon divergence between a student's and a
teacher's logits, differentiable with respect to both, around fastxent's fused kernel
(fastxent.kl_div_with_logits_with_grad / jsd_with_logits_with_grad)."""

from __future__ import annotations

import math
import operator
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import _distill
from ._torch_common import (
    all_ones,
    autocast_loss_dtype,
    check_cpu,
    has_tangent,
    loss_tensor,
    tensor_of,
    under_func_transform,
    values_under_func,
)
from ._torch_fast import is_compiling
from ._torch_nodata import is_fake

_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float64) + _HALF


class _Spec:
    """The options of one call: divergence 0 forward KL, 1 reverse KL, 2 JSD(beta); kw the
    keywords of fastxent._distill._run (temperature, reduction, labels, ignore_index, mask,
    sample_weight, num_threads)."""

    __slots__ = ("divergence", "beta", "kw")

    def __init__(self, divergence: int, beta: float, kw: Dict[str, Any]) -> None:
        self.divergence, self.beta, self.kw = divergence, beta, kw


# --------------------------------------------------------------------------------------------
# The loss in PyTorch ops: second order, torch.func transforms
# --------------------------------------------------------------------------------------------


def _row_weight(student: Tensor, kw: Dict[str, Any], dt: torch.dtype) -> Optional[Tensor]:
    """The row weights (shape student.shape[:-1], dtype dt) from labels / ignore_index, mask
    and sample_weight in PyTorch ops (traceable, vmap-able), or None when none is given.
    The values are checked elsewhere (the NumPy layer, or _check_nodata for shapes)."""
    w: Optional[Tensor] = None

    def t(v: Any) -> Tensor:
        return v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v))

    if kw["sample_weight"] is not None:
        w = t(kw["sample_weight"]).to(dt)
    if kw["labels"] is not None:
        # compared in int64: an ignore_index outside a narrow label dtype (-100 for uint8)
        # matches nothing, as in the kernel's NumPy comparison (not its wrapped value)
        keep = (t(kw["labels"]).to(torch.int64) != operator.index(kw["ignore_index"])).to(dt)
        w = keep if w is None else w * keep
    if kw["mask"] is not None:
        keep = t(kw["mask"]).to(dt)
        w = keep if w is None else w * keep
    return w


def _kl(la: Tensor, lb: Tensor) -> Tensor:
    """sum_c a_c (log a_c - log b_c) over the last axis from log-probabilities; a term with
    a_c = 0 is 0 (a zero probability times an infinite log-ratio), and so is its derivative
    (the log-ratio is replaced before the product, so no 0 * inf reaches a derivative)."""
    a = la.exp()
    d = torch.where(a == 0, 0.0, la - lb)
    return (a * d).sum(-1)


def reference_loss(student: Tensor, teacher: Tensor, spec: _Spec) -> Tensor:
    """The kernel's loss written in differentiable PyTorch ops without a data-dependent branch
    (materialising rows x C tensors), in the compute dtype (float32 for 16-bit logits): what
    second-order derivatives and torch.func transforms differentiate."""
    s, t = student, teacher
    if s.dtype in _HALF:
        s, t = s.float(), t.float()
    dt = s.dtype
    kw = spec.kw
    T = float(kw["temperature"])
    w = _row_weight(student, kw, dt)
    if w is not None:
        # A row of weight 0 counts for nothing whatever its logits hold (NaN included): they
        # are replaced before any operation, so no 0 * NaN reaches a derivative either.
        keep = (w != 0)[..., None]
        s = torch.where(keep, s, 0.0)
        t = torch.where(keep, t, 0.0)
    ls = torch.log_softmax(s / T, dim=-1)
    lt = torch.log_softmax(t / T, dim=-1)
    div, beta = spec.divergence, spec.beta
    if div == 2 and beta == 0.0:
        div = 0
    elif div == 2 and beta == 1.0:
        div = 1
    if div == 0:
        D = _kl(lt, ls)
    elif div == 1:
        D = _kl(ls, lt)
    else:
        # A class that both give probability 0 has m = 0 too and costs nothing; its log m is
        # taken at 0 so that no -inf - -inf reaches logaddexp's derivative.
        both = torch.isneginf(lt) & torch.isneginf(ls)
        lm = torch.logaddexp(
            torch.where(both, 0.0, lt) + math.log(beta),
            torch.where(both, 0.0, ls) + math.log1p(-beta),
        )
        D = beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)
    rows = (T * T) * D
    if w is not None:
        rows = torch.where(w != 0, w * rows, 0.0)
    red = kw["reduction"]
    if red == "none":
        return rows
    total = rows.sum()
    if red == "sum":
        return total
    den = torch.tensor(float(rows.numel()), dtype=dt) if w is None else w.sum()
    # "mean" over no counted row: 0, with a zero derivative (the kernel's rule).
    return torch.where(den == 0, 0.0, total / torch.where(den == 0, 1.0, den))


def _torch_logits(v: Tensor, name: str) -> Tensor:
    return _distill.check_logits(v, name, v.dtype in _FLOATS)


def _torch_rows(v: Any, name: str) -> Tuple[Tensor, str]:
    a = v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v))
    if a.dtype == torch.bool:
        return a, "b"
    return a, "f" if a.is_floating_point() else "c" if a.is_complex() else "i"


def _check_row_arrays(
    rows: Tuple[int, ...], labels: Any, ignore_index: Any, mask: Any, sample_weight: Any
) -> None:
    _distill.check_row_arrays(rows, labels, ignore_index, mask, sample_weight, _torch_rows)


def _check_nodata(student: Any, teacher: Any, spec: _Spec) -> None:
    """The NumPy layer's checks that need no tensor values (dtypes, shapes, options), for the
    paths that cannot read them (torch.func transforms, torch.compile, fake tensors)."""
    _distill.check_distill_args(
        student, teacher, spec.kw, as_logits=_torch_logits, row_weight=_check_row_arrays
    )


def _check_func_values(spec: _Spec) -> None:
    """Under torch.func (the reference loss, no kernel): the NumPy layer's check of the
    sample_weight values (finite, >= 0), read under the transforms' wrappers (a vmapped
    sample_weight: every row of its batch), after _check_nodata (dtype and shape)."""
    sw = spec.kw["sample_weight"]
    if sw is None:
        return
    if isinstance(sw, Tensor):
        w = values_under_func(sw, torch.float64)
    else:
        w = np.asarray(sw, np.float64)
    _distill.check_sample_weight(w)


# --------------------------------------------------------------------------------------------
# The fused kernel as an autograd Function
# --------------------------------------------------------------------------------------------


def _tensor(a: Optional[np.ndarray]) -> Optional[Tensor]:
    if a is None:
        return None
    if a.dtype.name == "bfloat16":
        return tensor_of(a, torch.bfloat16)
    return torch.from_numpy(a)


def _kernel(
    student: Tensor, teacher: Tensor, spec: _Spec, want_s: bool, want_t: bool
) -> Tuple[Any, Optional[Tensor], Optional[Tensor]]:
    """(loss as NumPy, student gradient, teacher gradient) from fastxent's NumPy layer, which
    checks everything before writing and reads the tensors through DLPack without a copy.
    The kernel computes only the gradients asked for (None for the others): either, both or
    neither (the loss alone)."""
    want = want_s or want_t
    res = _distill._run(
        student, teacher, spec.divergence, spec.beta, spec.kw, want, want_t, None, None, want_s
    )
    if not want:
        return res, None, None
    if want_t:
        loss, gs, gt = res
        return loss, _tensor(gs), _tensor(gt)
    loss, gs = res
    return loss, _tensor(gs), None


def _reference_vjp(
    student: Tensor, teacher: Tensor, spec: _Spec, go: Tensor, need: Tuple[bool, bool]
) -> List[Optional[Tensor]]:
    """Vector-Jacobian products of reference_loss with respect to the student and/or teacher,
    themselves differentiable (create_graph=True): student and teacher are the saved inputs,
    connected to the caller's graph."""
    with torch.enable_grad():
        ins = [
            x if x.requires_grad else x.detach().requires_grad_(n)
            for x, n in zip((student, teacher), need)
        ]
        loss = reference_loss(ins[0], ins[1], spec)
        wrt = [x for x, n in zip(ins, need) if n]
        got = list(
            torch.autograd.grad(loss, wrt, go.to(loss.dtype), create_graph=True, allow_unused=True)
        )
    out: List[Optional[Tensor]] = []
    for x, n in zip(ins, need):
        if not n:
            out.append(None)
            continue
        g = got.pop(0)
        g = torch.zeros_like(x) if g is None else g
        out.append(g if g.dtype == x.dtype else g.to(x.dtype))
    return out


def _scaled(ctx: Any, name: str, go: Tensor) -> Tensor:
    """The fused gradient `name` ("gs" / "gt") times grad_output, outside the graph. Handed
    out itself when grad_output is exactly 1 (no pass over it); a later backward through the
    same graph (retain_graph=True) then computes it again."""
    g = getattr(ctx, name)
    if g is None:
        student, teacher = ctx.saved_tensors
        want_s, want_t = ctx.want_s or name == "gs", ctx.want_t or name == "gt"
        _, ctx.gs, ctx.gt = _kernel(student, teacher, ctx.spec, want_s, want_t)
        g = getattr(ctx, name)
    if ctx.spec.kw["reduction"] == "none":
        go = go.unsqueeze(-1)  # the gradient is that of the sum of the rows; rows are separate
    if all_ones(go):
        setattr(ctx, name, None)
        return g
    return g * go.to(g.dtype)


class _FusedDistill(torch.autograd.Function):
    """Forward: loss and the gradient(s) autograd needs (the student's, the teacher's or
    both) from one call of the fused kernel. Backward: the gradients times grad_output;
    under create_graph=True, the vector-Jacobian product of reference_loss
    (differentiable). jvp: <gradient, tangent> (per row for "none")."""

    @staticmethod
    def forward(
        ctx, student: Tensor, teacher: Tensor, spec: _Spec, want_s: bool, want_t: bool, fwd: bool
    ) -> Tensor:
        loss, ctx.gs, ctx.gt = _kernel(student, teacher, spec, want_s, want_t)
        ctx.spec, ctx.want_s, ctx.want_t = spec, want_s, want_t
        ctx.rows = tuple(student.shape[:-1])
        ctx.save_for_backward(student, teacher)
        if fwd:  # forward mode: jvp may need a gradient not computed here after all (see there)
            ctx.fwd = (student.detach(), teacher.detach())
        ctx.loss_dtype = autocast_loss_dtype(student)
        return loss_tensor(loss, ctx.loss_dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients
            student, teacher = ctx.saved_tensors
            gs, gt = _reference_vjp(student, teacher, ctx.spec, grad_output, need)
            return gs, gt, None, None, None, None
        gs = _scaled(ctx, "gs", grad_output) if need[0] else None
        gt = _scaled(ctx, "gt", grad_output) if need[1] else None
        return gs, gt, None, None, None, None

    @staticmethod
    def jvp(ctx, s_t: Optional[Tensor], t_t: Optional[Tensor], *_: Any) -> Tensor:
        none = ctx.spec.kw["reduction"] == "none"
        out: Optional[Tensor] = None
        for g, tan, name in ((ctx.gs, s_t, "gs"), (ctx.gt, t_t, "gt")):
            # A tensor without a tangent of its own gets a zero one (an efficient zero tensor,
            # or materialised): skipped. Any other tangent gets its tensor's gradient,
            # computed now if the forward pass did not.
            if tan is None or tan._is_zerotensor():
                continue
            if g is None:
                if not bool(tan.any()):
                    continue
                _, ctx.gs, ctx.gt = _kernel(*ctx.fwd, ctx.spec, True, True)
                g = getattr(ctx, name)
            e = g * tan.to(g.dtype)
            e = e.sum(-1) if none else e.sum()
            out = e if out is None else out + e
        if out is None:  # every tangent is zero
            shape = ctx.rows if none else ()
            out = torch.zeros(shape, dtype=ctx.loss_dtype)
        return out.to(ctx.loss_dtype)


# --------------------------------------------------------------------------------------------
# torch.compile, FakeTensor and meta: the kernel as a custom op
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastxent::distill", mutates_args=())
def _op_distill(
    student: Tensor,
    teacher: Tensor,
    row_weight: Optional[Tensor],
    divergence: int,
    beta: float,
    temperature: float,
    reduction: str,
    num_threads: Optional[int],
    student_grad: bool,
    teacher_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, student gradient, teacher gradient) by the fused kernel; a gradient not asked
    for is empty. The row weights (labels, mask and sample_weight combined) come as one
    sample_weight, which the NumPy layer checks (finite, >= 0)."""
    kw = dict(_distill._COMMON)
    kw.update(
        temperature=temperature,
        reduction=reduction,
        sample_weight=row_weight,
        num_threads=num_threads,
    )
    spec = _Spec(divergence, beta, kw)
    loss, gs, gt = _kernel(student, teacher, spec, student_grad, teacher_grad)
    empty = student.new_empty((0,))
    return (
        loss_tensor(loss, student.dtype),
        empty if gs is None else gs,
        empty.clone() if gt is None else gt,
    )


@_op_distill.register_fake
def _(student, teacher, row_weight, divergence, beta, temperature, reduction, nt, sg, tg):
    loss = student.new_empty(tuple(student.shape[:-1]) if reduction == "none" else ())
    gs = student.new_empty(student.shape) if sg else student.new_empty((0,))
    gt = student.new_empty(student.shape) if tg else student.new_empty((0,))
    return loss, gs, gt


def _op_setup_context(ctx, inputs, output):
    student, teacher, row_weight, divergence, beta, temperature, reduction, nt, _, tg = inputs
    kw = dict(_distill._COMMON)
    kw.update(temperature=temperature, reduction=reduction, sample_weight=row_weight)
    ctx.spec = _Spec(divergence, beta, kw)
    ctx.save_for_backward(output[1], output[2], student, teacher)
    ctx.mark_non_differentiable(output[1], output[2])


def _op_backward(ctx, grad_loss, _gs, _gt):
    gs, gt, student, teacher = ctx.saved_tensors
    need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
    if torch.is_grad_enabled():  # create_graph=True
        a, b = _reference_vjp(student, teacher, ctx.spec, grad_loss, need)
        return (a, b) + (None,) * 8
    go = grad_loss.unsqueeze(-1) if ctx.spec.kw["reduction"] == "none" else grad_loss
    a = gs * go.to(gs.dtype) if need[0] else None
    b = gt * go.to(gt.dtype) if need[1] else None
    return (a, b) + (None,) * 8


_op_distill.register_autograd(_op_backward, setup_context=_op_setup_context)


def _op_loss(student: Tensor, teacher: Tensor, spec: _Spec) -> Tensor:
    """The loss through the custom op (traced as one node by torch.compile)."""
    _check_nodata(student, teacher, spec)
    kw = spec.kw
    grad_mode = torch.is_grad_enabled()
    want_s = student.requires_grad and grad_mode
    want_t = teacher.requires_grad and grad_mode
    rw = _row_weight(student, kw, torch.float64)
    nt = kw["num_threads"]
    loss, _, _ = _op_distill(
        student,
        teacher,
        rw,
        spec.divergence,
        spec.beta,
        float(kw["temperature"]),
        kw["reduction"],
        None if nt is None else operator.index(nt),
        want_s,
        want_t,
    )
    return loss.to(autocast_loss_dtype(student))


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _distill_loss(student: Any, teacher: Any, spec: _Spec) -> Tensor:
    for name, v in (("student", student), ("teacher", teacher)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    kw = spec.kw
    sw = kw["sample_weight"]
    if isinstance(sw, Tensor) and sw.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "fastxent.torch does not differentiate with respect to sample_weight; this input "
            "cannot have requires_grad=True (detach it)"
        )
    if is_compiling() or is_fake(student) or is_fake(teacher):
        return _op_loss(student, teacher, spec)
    check_cpu(student, "student")
    check_cpu(teacher, "teacher")
    for name in ("labels", "mask", "sample_weight"):
        v = kw[name]
        if isinstance(v, Tensor):
            check_cpu(v, name)
    if under_func_transform(student, teacher, kw["labels"], kw["mask"], sw):
        # torch.func (grad, vmap, jvp, jacrev, hessian) hands over tensors without storage:
        # the loss in PyTorch ops, which every transform composes with.
        _check_nodata(student, teacher, spec)
        _check_func_values(spec)
        return reference_loss(student, teacher, spec).to(autocast_loss_dtype(student))
    if has_tangent(sw):
        raise RuntimeError(
            "fastxent.torch does not differentiate with respect to sample_weight; this input "
            "cannot carry a forward-mode tangent (torch.autograd.forward_ad): pass its primal"
        )
    grad_mode = torch.is_grad_enabled()
    s_want = (student.requires_grad and grad_mode) or has_tangent(student)
    t_want = (teacher.requires_grad and grad_mode) or has_tangent(teacher)
    if not (s_want or t_want):
        loss, _, _ = _kernel(student, teacher, spec, False, False)
        return loss_tensor(loss, autocast_loss_dtype(student))
    fwd = has_tangent(student) or has_tangent(teacher)
    return _FusedDistill.apply(student, teacher, spec, s_want, t_want, fwd)


def _spec_kw(
    temperature: Any,
    reduction: Any,
    labels: Any,
    ignore_index: Any,
    mask: Any,
    sample_weight: Any,
    num_threads: Any,
) -> Dict[str, Any]:
    return dict(
        temperature=temperature,
        reduction=reduction,
        labels=labels,
        ignore_index=ignore_index,
        mask=mask,
        sample_weight=sample_weight,
        num_threads=num_threads,
    )


def kl_div_with_logits(
    student: Tensor,
    teacher: Tensor,
    *,
    direction: str = "forward",
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
    num_threads: Optional[int] = None,
) -> Tensor:
    kw = _spec_kw(temperature, reduction, labels, ignore_index, mask, sample_weight, num_threads)
    return _distill_loss(student, teacher, _Spec(_distill._direction(direction), 0.5, kw))


def jsd_with_logits(
    student: Tensor,
    teacher: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    mask: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
    num_threads: Optional[int] = None,
) -> Tensor:
    kw = _spec_kw(temperature, reduction, labels, ignore_index, mask, sample_weight, num_threads)
    return _distill_loss(student, teacher, _Spec(2, _distill._beta(beta), kw))


_COMMON_DOC = """
    The loss and its gradient(s) come out of one call of fastxent's fused CPU kernel
    (:func:`fastxent.{np_name}_with_grad`, reading the tensors in place) whenever a gradient
    is wanted, and only the gradients autograd needs: with respect to ``student`` when it
    requires grad, with respect to ``teacher`` when it does (the usual detached teacher costs
    no teacher gradient, a detached student no student gradient). Backward multiplies the
    saved gradient(s) by ``grad_output`` (per row for "none"). Without a gradient only the
    loss is computed.

    Parameters
    ----------
    student, teacher : Tensor, the same shape (..., C) and dtype, on the CPU
        Logits, classes on the last dimension; every leading position is a row. float32,
        float64, float16 or bfloat16 (16-bit rows computed in float32, gradients rounded once
        to the input's dtype).
    {extra}    temperature : float in [1e-30, 100]
        Both distributions are ``softmax(logits / temperature)``; each row loss is multiplied by
        ``temperature**2``.
    reduction : {{"mean", "sum", "none"}}
        "mean": the sum of the row losses divided by the sum of the row weights (the number
        of counted rows without ``sample_weight``): ``F.kl_div``'s "batchmean", *not* its
        "mean" (which also divides by C). "none": one loss per row, shape
        ``student.shape[:-1]``.
    labels : integer Tensor of shape ``student.shape[:-1]``, optional
        Rows whose label equals ``ignore_index`` count for nothing (not otherwise used).
    ignore_index : int
        See ``labels`` (default -100).
    mask : bool Tensor of shape ``student.shape[:-1]``, optional
        False: the row counts for nothing.
    sample_weight : Tensor of shape ``student.shape[:-1]``, optional
        Per-row weights (finite, >= 0; not differentiable: one that requires grad is refused).
    num_threads : int, optional
        Caps the kernel's OpenMP threads for this call (results are bitwise identical).

    Returns
    -------
    Tensor on the CPU: a scalar, or shape ``student.shape[:-1]`` for "none". Its dtype is the
    student's (16-bit: rounded from the kernel's float32), float32 for 16-bit logits under
    ``torch.autocast("cpu")``, as :func:`cross_entropy`.

    Notes
    -----
    A row of weight 0 (ignored, masked or weighted 0) has loss 0 and gradient exactly 0
    whatever its logits hold. "mean" over no counted row is 0 with a zero gradient (as
    fastxent.torch.cross_entropy; PyTorch's F.kl_div gives NaN there). A zero
    probability times an infinite log-ratio counts 0 (``-inf`` logits are fine where the other
    distribution is 0 too), in the second-order and ``torch.func`` paths as well.

    Derivatives: first order with respect to ``student`` and ``teacher`` from the fused
    kernel; forward mode (``torch.autograd.forward_ad``) as ``<gradient, tangent>``; second
    order (``create_graph=True``: double backward, Hessian-vector products) and ``torch.func``
    transforms (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``hessian``) through the same loss in
    PyTorch ops (``log_softmax`` based, materialising rows x C tensors, at PyTorch's speed).

    torch.compile, FakeTensor and ``meta``: the kernel is the custom op
    ``torch.ops.fastxent.distill`` (fake implementation and autograd formula registered),
    traced as one node without a graph break (``fullgraph=True`` works); student and teacher
    are differentiable there.

    Raises
    ------
    TypeError
        student or teacher not a Tensor, or on a device other than the CPU; logits not
        floating point; mismatched dtypes; labels not integer, mask not boolean; a
        non-numeric temperature{beta_t}.
    ValueError
        mismatched shapes; C = 0; a temperature outside [1e-30, 100] (NaN, inf and <= 0
        included){beta_v}; an unknown reduction; row tensors of the wrong shape; a negative
        or non-finite sample_weight. Nothing is computed or written before these checks.
    RuntimeError
        a ``sample_weight`` that requires grad.
"""

kl_div_with_logits.__doc__ = (
    """KL divergence between the teacher's and the student's softmax, from logits
    (``fastxent.kl_div_with_logits`` for PyTorch, differentiable with respect to both).

    With ``p = softmax(student / T)`` and ``q = softmax(teacher / T)`` per row::

        direction="forward":  loss_n = T**2 * sum_c q_c (log q_c - log p_c)   # KL(q || p)
        direction="reverse":  loss_n = T**2 * sum_c p_c (log p_c - log q_c)   # KL(p || q)

    times the row weight, then reduced. For a 2-D (N, C) input with no row ignored, masked or
    weighted, "forward" equals::

        F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1),
                 log_target=True, reduction="batchmean") * T**2

    and "reverse" the same with student and teacher swapped; "sum" is ``reduction="sum"``
    there, and "none" is ``reduction="none"`` summed over the last dimension (any number of
    leading dimensions).
"""
    + _COMMON_DOC.format(
        np_name="kl_div_with_logits",
        extra='direction : {"forward", "reverse"}\n        "forward": KL(teacher || student), '
        'the usual distillation loss;\n        "reverse": KL(student || teacher).\n',
        beta_t="",
        beta_v="; an unknown direction",
    )
    + """
    Example
    -------
    >>> import torch, torch.nn.functional as F, fastxent.torch as fxt
    >>> s = torch.randn(4, 10, requires_grad=True)
    >>> t = torch.randn(4, 10)
    >>> loss = fxt.kl_div_with_logits(s, t, temperature=2.0)
    >>> loss.backward()
    >>> ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True,
    ...                reduction="batchmean") * 4
    >>> torch.allclose(loss, ref)
    True
"""
)

jsd_with_logits.__doc__ = """Generalised Jensen-Shannon divergence between the teacher's and the
    student's softmax (``fastxent.jsd_with_logits`` for PyTorch, differentiable with respect to
    both).

    With ``p = softmax(student / T)``, ``q = softmax(teacher / T)`` and
    ``m = beta q + (1 - beta) p`` per row::

        loss_n = T**2 * (beta KL(q || m) + (1 - beta) KL(p || m))

    times the row weight, then reduced: Liger-Kernel's ``LigerJSD`` (beta weighs the teacher).
    As Liger defines its end points, ``beta=0`` is the forward KL(q || p) and ``beta=1`` the
    reverse KL(p || q) (:func:`kl_div_with_logits`). For 0 < beta < 1 and a 2-D input with no
    row ignored it equals, in PyTorch ops::

        lp, lq = F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1)
        lm = torch.log(beta * lq.exp() + (1 - beta) * lp.exp())
        (beta * F.kl_div(lm, lq, log_target=True, reduction="batchmean")
         + (1 - beta) * F.kl_div(lm, lp, log_target=True, reduction="batchmean")) * T**2
""" + _COMMON_DOC.format(
    np_name="jsd_with_logits",
    extra="beta : float in [0, 1]\n        The teacher's weight in the mixture m "
    "(default 0.5, the symmetric JSD).\n",
    beta_t=" or beta",
    beta_v="; beta outside [0, 1]",
)


class _DistillLoss(nn.Module):
    _fn: Any = None

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self._options = options

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        labels: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        sample_weight: Optional[Tensor] = None,
    ) -> Tensor:
        return type(self)._fn(
            student, teacher, labels=labels, mask=mask, sample_weight=sample_weight, **self._options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options.items())


def _check_module_options(spec: _Spec) -> None:
    _distill.check_options(spec.kw)
    _distill._ignore_index(spec.kw["ignore_index"])


class KLDivWithLogitsLoss(_DistillLoss):
    """:func:`kl_div_with_logits` as a module: ``KLDivWithLogitsLoss(direction="forward",
    temperature=1.0, reduction="mean", ignore_index=-100, num_threads=None)``; then
    ``forward(student, teacher, *, labels=None, mask=None, sample_weight=None)`` (the per-batch
    row tensors). The constructor checks its options (ValueError / TypeError).

    Example
    -------
    >>> import torch, fastxent.torch as fxt
    >>> crit = fxt.KLDivWithLogitsLoss(temperature=2.0)
    >>> loss = crit(torch.randn(8, 5, requires_grad=True), torch.randn(8, 5))
    >>> loss.backward()
    """

    _fn = staticmethod(kl_div_with_logits)

    def __init__(
        self,
        direction: str = "forward",
        temperature: float = 1.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        num_threads: Optional[int] = None,
    ) -> None:
        div = _distill._direction(direction)
        kw = _spec_kw(temperature, reduction, None, ignore_index, None, None, num_threads)
        _check_module_options(_Spec(div, 0.5, kw))
        super().__init__(
            direction=direction,
            temperature=temperature,
            reduction=reduction,
            ignore_index=ignore_index,
            num_threads=num_threads,
        )


class JSDWithLogitsLoss(_DistillLoss):
    """:func:`jsd_with_logits` as a module: ``JSDWithLogitsLoss(beta=0.5, temperature=1.0,
    reduction="mean", ignore_index=-100, num_threads=None)``; then ``forward(student, teacher,
    *, labels=None, mask=None, sample_weight=None)``. The constructor checks its options."""

    _fn = staticmethod(jsd_with_logits)

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "mean",
        ignore_index: int = -100,
        num_threads: Optional[int] = None,
    ) -> None:
        b = _distill._beta(beta)
        kw = _spec_kw(temperature, reduction, None, ignore_index, None, None, num_threads)
        _check_module_options(_Spec(2, b, kw))
        super().__init__(
            beta=beta,
            temperature=temperature,
            reduction=reduction,
            ignore_index=ignore_index,
            num_threads=num_threads,
        )
