"""PyTorch front end of the fused linear + cross-entropy (fastxent._linear's tile loop with
torch.mm / addmm as the matmuls): :func:`linear_cross_entropy`, the autograd Function behind
it, and :class:`LinearCrossEntropyLoss`.

Invariants:
- The N x V logits never exist: the tile loop of fastxent._linear, one reused tile buffer.
- "mean" / "sum" with gradients: the forward computes the loss and every requested gradient
  in one sweep (the backward multiplies them by the upstream scalar and hands them over,
  keeping no reference: a second backward of a retained graph recomputes them).
- "none": the forward computes the row losses only; the backward recomputes the tiles with
  the rows weighted by the upstream gradient (as sample weights), so per-token upstream
  gradients are exact.
- Gradients reaching the float statistics of outputs= (lse, entropy, target_logprob): their
  vector-Jacobian product is added to each recomputed tile's gradient (in blocks of rows)
  before the gradient matmuls ("none": in the loss's backward sweep; "mean" / "sum": a sweep
  of its own that adds into the loss's gradients).
- No gradient wanted (no_grad, or no input requiring grad): the loss alone, no gradient
  matmuls.
- 16-bit: logits tiles and matmuls in the input's dtype (PyTorch's 16-bit BLAS path,
  float32 accumulation), cross-entropy in float32 inside fastxent, G rounded once to the
  16-bit dtype; grad_bias is summed over tiles in float32 and rounded once; grad_weight is
  accumulated by the BLAS (addmm_, float32 inside) and rounded once per tile (a float32
  accumulator of V x H would cost half the 16-bit logits' size).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import _api, _linear
from ._keywords import FLOAT_OUTPUTS, TORCH_LINEAR, TorchLinearKeywords, Unpack
from ._torch_common import has_tangent, refuse_derivative, refuse_func_transforms

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _np(t: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.resolve_neg().resolve_conj().numpy()


def _np_dtype(dt: torch.dtype) -> np.dtype:
    return _np(torch.empty(0, dtype=dt)).dtype


class _TorchBackend:
    """torch.mm / addmm for each tile (see fastxent._linear for the loop)."""

    def __init__(
        self,
        plan: Any,
        h2: Tensor,
        w: Tensor,
        b: Optional[Tensor],
        outs: Tuple[Optional[Tensor], ...],
        accumulate: bool = False,
    ):
        self.plan, self.h2, self.w, self.b = plan, h2, w, b
        self.accumulate = accumulate  # add to the gradients in outs (they hold values)
        self.half = h2.dtype in (torch.float16, torch.bfloat16)
        rows, cols = _linear.tile_shape(plan)
        self.buf = torch.empty(rows * cols, dtype=h2.dtype)
        self.buf_np = _np(self.buf)
        self.gh: Any = outs[0]  # None where not wanted (then never read)
        self.gw: Any = outs[1]
        self.gb: Any = outs[2]
        self.acc_b: Any = torch.zeros(plan.v) if self.half and self.gb is not None else self.gb
        self.first_w = self.first_b = not accumulate
        self.z: Tensor = self.buf

    def logits(self, r0: int, r1: int) -> np.ndarray:
        k, v = r1 - r0, self.plan.v
        self.z = z = self.buf[: k * v].view(k, v)
        x = self.h2[r0:r1]
        if self.b is None:
            torch.mm(x, self.w.t(), out=z)
        else:
            torch.addmm(self.b, x, self.w.t(), out=z)
        return self.buf_np[: k * v].reshape(k, v)

    def logits_cols(self, v0: int, v1: int) -> np.ndarray:
        n, c = self.plan.n, v1 - v0
        z = self.buf[: n * c].view(n, c)
        w = self.w[v0:v1].t()
        if self.b is None:
            torch.mm(self.h2, w, out=z)
        else:
            torch.addmm(self.b[v0:v1], self.h2, w, out=z)
        return self.buf_np[: n * c].reshape(n, c)

    def stats_vjp(self, i: int, j: int, r: int, stat_grads: Dict[str, np.ndarray]) -> Tensor:
        """The vector-Jacobian product of the float statistics of rows [i, j) of the current
        tile (rows r... of the call), upstream gradients from stat_grads ((n,) each): by
        autograd through reference_stats (float32 for 16-bit logits)."""
        from ._torch_autograd import _stats_vjp

        plan, k = self.plan, j - i
        # (probability targets: no target_logprob; only the target's kind is read)
        tgt = torch.empty(0) if plan.target is None else torch.from_numpy(plan.target[r : r + k])
        kw = plan.kw
        ref_kw = {
            "softcap": kw["softcap"] or None,
            "logit_scale": kw["logit_scale"],
            "ignore_index": kw["ignore_index"],
        }
        grads = {n: torch.from_numpy(g[r : r + k]) for n, g in stat_grads.items()}
        return _stats_vjp(self.z[i:j], tgt, ref_kw, grads)

    def add_rows(self, extra: Tensor, i: int, j: int, replace: bool) -> None:
        """Rows [i, j) of the tile's gradient plus extra (replace: extra alone), rounded to
        the tile's dtype (16-bit: the kernel's gradient was rounded to it once already)."""
        zt = self.z[i:j]
        if replace:
            zt.copy_(extra)
        elif self.half:
            zt.copy_(zt.float() + extra)
        else:
            zt.add_(extra)

    def grad_hidden(self, _g: Any, r0: int, r1: int) -> None:
        if self.accumulate:
            self.gh[r0:r1].addmm_(self.z, self.w)
            return
        torch.mm(self.z, self.w, out=self.gh[r0:r1])

    def grad_weight(self, _g: Any, r0: int, r1: int) -> None:
        g, x = self.z, self.h2[r0:r1]
        if self.first_w:
            torch.mm(g.t(), x, out=self.gw)
        else:  # the BLAS adds into it (beta = 1; 16-bit: float32 inside, rounded per tile)
            self.gw.addmm_(g.t(), x)
        self.first_w = False

    def grad_bias(self, _g: Any, r0: int) -> None:
        if self.half:
            self.acc_b += self.z.sum(0, dtype=torch.float32)
        elif self.first_b:
            torch.sum(self.z, 0, out=self.gb)
        else:
            self.gb += self.z.sum(0)
        self.first_b = False

    def finish(self, want: Tuple[bool, bool, bool]) -> None:
        if want[2] and self.acc_b is not self.gb:
            self.gb.copy_(self.gb.float() + self.acc_b if self.accumulate else self.acc_b)


def _sweep(
    plan: Any,
    h2: Tensor,
    w: Tensor,
    b: Optional[Tensor],
    want: Tuple[bool, bool, bool],
    reduction: Optional[str] = None,
    sample_weight: Optional[np.ndarray] = None,
    stats: Optional[Dict[str, np.ndarray]] = None,
    stat_grads: Optional[Dict[str, np.ndarray]] = None,
    loss_grad: bool = True,
    into: Optional[Tuple[Any, ...]] = None,
) -> Tuple[Any, Tuple[Any, ...]]:
    """Runs the tile loop; returns (loss, (grad_hidden (n, h), grad_weight, grad_bias));
    `stats`, `stat_grads` and `loss_grad` as in run_tiles; `into`: gradients (of a previous
    sweep) to add this sweep's to, instead of new ones."""
    new = torch.empty if plan.n else torch.zeros  # every tile writes what it covers
    outs = into or (
        new(plan.n, plan.h, dtype=h2.dtype) if want[0] else None,
        new(w.shape, dtype=w.dtype) if want[1] else None,
        new(plan.v, dtype=w.dtype) if want[2] else None,
    )
    be = _TorchBackend(plan, h2, w, b, outs, accumulate=into is not None)
    loss = _linear.run_tiles(plan, be, want, reduction, sample_weight, stats, stat_grads, loss_grad)
    return loss, outs


def _loss_tensor(loss: Any, plan: Any, dtype: torch.dtype) -> Tensor:
    if isinstance(loss, np.ndarray):
        return torch.from_numpy(loss).reshape(plan.lead).to(dtype)
    return torch.tensor(loss, dtype=torch.float64).to(dtype)


def no_second_order(fn: str) -> None:
    """Called at the start of a backward whose gradients are computed outside the autograd
    graph: under create_graph=True they would be constants, every derivative of them (a
    Hessian, a gradient penalty) silently 0. Refused instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{fn} has no second-order derivative (backward with create_graph=True: Hessians, "
            f"gradient penalties); its gradients are computed outside the autograd graph. Use "
            f"fastxent.torch.cross_entropy on the logits for those"
        )


def refuse_forward_mode(fn: str, *ts: Optional[Tensor]) -> None:
    """No forward mode (torch.autograd.forward_ad): a tangent would be dropped silently."""
    if any(has_tangent(t) for t in ts):
        raise RuntimeError(
            f"{fn} has no forward-mode derivative (torch.autograd.forward_ad): use reverse "
            f"mode (backward / torch.autograd.grad)"
        )


_FLOAT_STATS = FLOAT_OUTPUTS


def _stat_tensors(plan: Any, stats: Optional[Dict[str, np.ndarray]]) -> Tuple[Tensor, ...]:
    """The float statistics of outputs= as tensors of the rows' shape (_FLOAT_STATS order)."""
    if stats is None:
        return ()
    return tuple(torch.from_numpy(stats[n]).reshape(plan.lead) for n in _FLOAT_STATS if n in stats)


def _row_stats(plan: Any, stats: Dict[str, np.ndarray], floats: Tuple[Tensor, ...]) -> Any:
    """fastxent.RowStats of tensors: the float statistics given (autograd outputs, or plain
    tensors), argmax an int64 tensor, accuracy a float."""
    st = _linear.row_stats(plan, stats)
    fields: Dict[str, Any] = dict(zip([n for n in _FLOAT_STATS if n in stats], floats))
    fields = {n: fields[n] for n in _FLOAT_STATS if n in plan.outputs}
    if "argmax" in plan.outputs:
        fields["argmax"] = torch.from_numpy(st.argmax)
    if "accuracy" in plan.outputs:
        fields["accuracy"] = st.accuracy
    return _api.RowStats(**fields)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, input: Tensor, lw: Tensor, lb: Optional[Tensor], plan: Any, side: Dict[str, Any]
    ) -> Any:
        ctx.set_materialize_grads(False)
        h2 = input.reshape(plan.n, plan.h)
        want = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            lb is not None and ctx.needs_input_grad[2],
        )
        ctx.plan, ctx.want, ctx.shape = plan, want, input.shape
        ctx.save_for_backward(input, lw, lb)
        stats = _linear.new_stats(plan)
        ctx.float_names = tuple(n for n in _FLOAT_STATS if stats is not None and n in stats)
        if plan.reduction == "none":
            be = _TorchBackend(plan, h2, lw, lb, (None, None, None))
            loss = _linear.run_tiles(plan, be, (False, False, False), stats=stats)
            ctx.grads = None
        else:
            loss, ctx.grads = _sweep(plan, h2, lw, lb, want, stats=stats)
        side["stats"] = stats
        out = _loss_tensor(loss, plan, input.dtype)
        floats = _stat_tensors(plan, stats)
        return (out,) + floats if stats is not None else out

    @staticmethod
    def backward(ctx: Any, go: Optional[Tensor], *stat_grads: Optional[Tensor]):
        no_second_order("linear_cross_entropy")
        sg = {
            n: g.detach().reshape(-1).to(torch.float64).numpy()
            for n, g in zip(ctx.float_names, stat_grads)
            if g is not None
        }
        if go is None and not sg:
            return (None,) * 5
        with torch.no_grad():
            return _LinearCrossEntropy._backward(ctx, go, sg or None) + (None,)

    @staticmethod
    def _backward(
        ctx: Any, go: Optional[Tensor], sg: Optional[Dict[str, np.ndarray]]
    ) -> Tuple[Optional[Tensor], ...]:
        """The gradients of the loss (upstream go) plus, with sg (the float statistics'
        upstream gradients, (n,) each), those of the statistics: their vector-Jacobian
        product is added to each tile's gradient before the gradient matmuls."""
        plan, want = ctx.plan, ctx.want
        grads, ctx.grads = ctx.grads, None
        input, lw, lb = ctx.saved_tensors
        h2 = input.reshape(plan.n, plan.h)
        if go is None:  # the statistics alone
            _, grads = _sweep(plan, h2, lw, lb, want, stat_grads=sg, loss_grad=False)
        elif plan.reduction == "none":  # one sweep: rows weighted by go, plus the statistics
            s = go.detach().reshape(-1).to(torch.float64).numpy()
            if plan.sample_weight is not None:
                s = s * plan.sample_weight
            s = np.ascontiguousarray(s, dtype=plan.cdt)
            _, grads = _sweep(plan, h2, lw, lb, want, "sum", s, stat_grads=sg)
        else:
            if grads is None:  # a second backward of a retained graph
                _, grads = _sweep(plan, h2, lw, lb, want)
            if bool(go != 1):
                scale = float(go)  # the gradients are this call's own: scaled in place
                grads = tuple(None if g is None else g.mul_(scale) for g in grads)
            if sg is not None:  # the statistics' sweep adds to them
                _, grads = _sweep(
                    plan, h2, lw, lb, want, stat_grads=sg, loss_grad=False, into=grads
                )
        gh, gw, gb = grads
        return (None if gh is None else gh.reshape(ctx.shape), gw, gb, None)


def _plan_for(
    input: Tensor,
    lw: Tensor,
    target: Tensor,
    lb: Optional[Tensor],
    reduction: Any,
    opts: dict,
    tile_rows: Any,
    forward_only: bool = False,
) -> Any:
    for name, t in (
        ("input", input),
        ("linear_weight", lw),
        ("target", target),
        ("linear_bias", lb),
    ):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise TypeError(
                f"{name}: fastxent is a CPU kernel, but this tensor is on "
                f"{t.device} (move it to the CPU first)"
            )
    if input.dtype not in _DTYPES:
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    cdt = torch.float64 if input.dtype == torch.float64 else torch.float32
    for k in ("weight", "sample_weight"):
        if isinstance(opts[k], Tensor):
            opts[k] = opts[k].detach().to(cdt).numpy()
    probs = target.is_floating_point()
    tgt: Any = (
        _np(target.to(input.dtype) if probs and target.dtype != input.dtype else target)
        if probs
        else target.detach().numpy()
    )
    plan = _linear.make_plan(
        tuple(input.shape),
        _np_dtype(input.dtype),
        tuple(lw.shape),
        _np_dtype(lw.dtype),
        None if lb is None else tuple(lb.shape),
        None if lb is None else _np_dtype(lb.dtype),
        tgt,
        tuple(target.shape),
        probs,
        reduction,
        opts,
        tile_rows,
        input.element_size(),
        forward_only=forward_only,
    )
    if probs:
        plan = plan._replace(probs=tgt.reshape(plan.n, plan.v))
    return plan


@TORCH_LINEAR
def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    options: Any = None,
    tile_rows: Optional[int] = None,
    **kw: Unpack[TorchLinearKeywords],
) -> Any:
    """PyTorch 2.13's ``F.linear_cross_entropy(input, linear_weight, target, ...)`` (the
    loss of ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``),
    differentiable with respect to input, linear_weight and linear_bias, computed in tiles
    of rows without ever materialising the logits.

    input is (..., H) (PyTorch's: (H,) or (N, H)), linear_weight (V, H), target class
    indices of shape input.shape[:-1] or probabilities (..., V). ``options`` (PyTorch's
    LinearCrossEntropyOptions) is accepted and ignored: the tiling is always on.
    fastxent's extra keywords (sample_weight, z_loss, softcap, logit_scale, normalizer,
    num_threads) mean what they mean in :func:`fastxent.cross_entropy`; tile_rows overrides
    the rows per tile. Without it, a forward pass alone (no gradient wanted) in float32 or
    float64, without entropy_coef, with fewer rows than classes and more than one tile of
    rows, takes tiles of the vocabulary instead (each slice of the weight multiplied once,
    loss and outputs from merged statistics; the conditions and rounding are in
    :func:`fastxent.linear_cross_entropy`). When every row is ignored, "mean" is 0
    (PyTorch: NaN).

    ``entropy_coef`` and ``outputs`` are those of :func:`fastxent.cross_entropy`, from each
    tile's kernel call (or the merged statistics): the entropy term is in the loss and every
    gradient; with
    ``outputs`` the call returns ``(loss, fastxent.RowStats)`` of tensors (argmax int64,
    accuracy a float; float32 for 16-bit input). lse, entropy and target_logprob are
    differentiable with respect to input, linear_weight and linear_bias: the backward
    recomputes each tile's logits and adds the statistics' vector-Jacobian product (their
    formula in PyTorch ops, in blocks of at most 2^20 logits) to the tile's loss gradient
    before the gradient matmuls; with "mean" / "sum" that is a second sweep (one more
    logits matmul), with "none" the loss's own. No second order, no forward mode."""
    opts = dict(
        weight=weight,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing,
        **TORCH_LINEAR.bind("linear_cross_entropy", kw),
    )
    refuse_func_transforms(input, linear_weight, target, linear_bias, weight)
    # The gradients of a probability target, class weights, sample weights and scalar options
    # are not computed: a tensor among them that requires grad (or carries a forward-mode
    # tangent) raises rather than getting None (or a tangent of 0) back. Checked before the
    # plan reads the options as numbers.
    for name, v in (
        ("a probability target", target if isinstance(target, Tensor) else None),
        ("weight", weight),
        ("sample_weight", kw.get("sample_weight")),
        ("label_smoothing", label_smoothing),
        ("normalizer", kw.get("normalizer")),
        ("z_loss", kw.get("z_loss")),
        ("softcap", kw.get("softcap")),
        ("logit_scale", kw.get("logit_scale")),
        ("entropy_coef", kw.get("entropy_coef")),
    ):
        refuse_derivative(v, name, "linear_cross_entropy")
    if isinstance(opts["entropy_coef"], Tensor):
        opts["entropy_coef"] = float(opts["entropy_coef"])
    refuse_forward_mode("linear_cross_entropy", input, linear_weight, linear_bias)
    # (Not a tensor: _plan_for raises.)
    grads = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (input, linear_weight, linear_bias)
    )
    plan = _plan_for(
        input, linear_weight, target, linear_bias, reduction, opts, tile_rows, not grads
    )
    if grads:
        side: Dict[str, Any] = {}
        res = _LinearCrossEntropy.apply(input, linear_weight, linear_bias, plan, side)
        if plan.outputs is None:
            return res
        return res[0], _row_stats(plan, side["stats"], tuple(res[1:]))
    with torch.no_grad():
        h2 = input.reshape(plan.n, plan.h)
        be = _TorchBackend(plan, h2, linear_weight, linear_bias, (None, None, None))
        stats = _linear.new_stats(plan)
        loss = _loss_tensor(
            _linear.run_tiles(plan, be, (False, False, False), stats=stats), plan, input.dtype
        )
    if stats is None:
        return loss
    return loss, _row_stats(plan, stats, _stat_tensors(plan, stats))


class LinearCrossEntropyLoss(nn.Module):
    """``torch.nn.LinearCrossEntropyLoss`` computed by :func:`linear_cross_entropy`: holds
    the ``nn.Linear(in_features, num_classes, bias=bias)`` head as ``self.linear``.
    fastxent's extra keywords are given to the constructor."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device: Any = None,
        dtype: Any = None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options: Any = None,
        **fastxent_options: Any,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction, self.ignore_index = reduction, ignore_index
        self.label_smoothing, self.options = label_smoothing, options
        self.fastxent_options = fastxent_options

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,  # type: ignore[arg-type]  # a buffer: a Tensor or None
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            **self.fastxent_options,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction}"
        )
