"""Vocabulary-parallel fused linear + cross-entropy for torch.distributed:
:func:`vocab_parallel_linear_cross_entropy`. Each rank holds rows ``[offset, offset + V_r)``
of the output projection (Megatron's vocab-parallel head) and the same hidden states and
class-index targets, or its columns ``[offset, offset + V_r)`` of probability targets (as
:func:`fastxent.torch.vocab_parallel_cross_entropy`); the result is that of
:func:`fastxent.torch.linear_cross_entropy` with the full weight, without any rank ever
holding logits of more than one tile of its own slice.

Invariants:
- Forward: per row tile, ``Z_r = hidden[tile] @ W_r.T (+ b_r)`` and fastxent's shard
  statistics of Z_r (:func:`fastxent.shard_stats`) into an (N, 7) float64 array; then the two
  all-reduces of fastxent.torch's vocab-parallel loss (MAX of the row maxima, SUM of the
  rest), once for the whole batch, and the loss from the merged statistics.
- Backward: per tile, Z_r again (one more matmul than the one-process path: no logits are
  kept), :func:`fastxent.shard_grad` in place with the global "mean" denominator, then
  ``grad_hidden[tile] = G_r @ W_r``, ``grad_W_r += G_r.T @ hidden[tile]``, ``grad_b_r +=
  G_r.sum(0)``; grad_hidden is summed over the ranks (one all-reduce SUM of N x H, the
  backward of the hidden states' copy to every rank). No logits are exchanged.
- Targets: dtype and shape checked (class indices input.shape[:-1], probabilities
  input.shape[:-1] + (V_r,)) before any collective; the other options (sample_weight,
  class weights, label_smoothing, reduction, class index range) after the one all_gather
  of the slice sizes (skipped when offset and num_classes are given), since they need the
  whole vocabulary's size. An argument bad on one rank only raises on that rank while the
  others wait in a collective, as in any torch.distributed program. Probabilities are read
  per row tile, the tile's rows converted to the input's dtype as the one-process function
  does (16-bit: then to float32 for the kernel); a copy of one tile's rows at most, never of
  N x V_r.
- 16-bit: Z_r is computed in the input dtype and converted to float32 per tile for the
  kernel; G_r is rounded once to the input dtype for the gradient matmuls.
- outputs=: each tile's output statistics come from the same shard_stats pass and merge in the
  same collectives widened (_torch_vocab.all_reduce_with_outputs: three instead of two); every
  rank must pass the same outputs (else the ranks' collectives differ). The float statistics
  are differentiable: in the backward's tile loop, their vector-Jacobian product with
  respect to the rank's logits (from the tile's logits and the merged statistics, as
  fastxent.torch.vocab_parallel_cross_entropy's, no communication) joins the tile's
  gradient before the matmuls; the hidden states' gradient is all-reduced as the loss's.
- entropy_coef: the entropies come from the same widened collectives (asked for internally
  when outputs= does not); the loss gains -ec * reduce(s_n entropy_n) over counted rows (as
  the one-process function), and the backward adds -ec * r_n * upstream to the entropies'
  upstream gradients (r_n: the rows' weights of that sum).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _linear
from ._keywords import EXTRA, FLOAT_OUTPUTS, ExtraKeywords, Unpack, output_names, real
from ._shard import (
    OUTPUT_STAT_FIELDS,
    loss_from_stats,
    outputs_from_stats,
    shard_grad,
    shard_stats,
    stats_denominator,
)
from ._torch_autograd import _row_stats
from ._torch_common import refuse_derivative, refuse_func_transforms, refuse_option_derivatives
from ._torch_linear import no_second_order, refuse_forward_mode

__all__ = ["vocab_parallel_linear_cross_entropy"]


def _logits32(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tuple[Tensor, np.ndarray]:
    z = torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())
    zf = z if z.dtype in (torch.float32, torch.float64) else z.float()
    return zf, zf.numpy()


class _VPLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        input: Tensor,
        w: Tensor,
        b: Optional[Tensor],
        target: Tensor,
        a: dict,
        side: Dict[str, Any],
    ) -> Any:
        from . import _torch_vocab as vocab  # the entropy term's helpers

        ctx.set_materialize_grads(False)
        n, h = a["n"], input.shape[-1]
        h2 = input.reshape(n, h)
        names = a["outputs"]
        ec = a["entropy_coef"]
        # the shards' output statistics: for outputs=, and for the entropy term's entropies
        wide = names
        if ec and "entropy" not in (names or ()):
            wide = tuple(names or ()) + ("entropy",)
        stats = np.empty((n, 7), np.float64)
        ost = None if wide is None else np.empty((n, len(OUTPUT_STAT_FIELDS)), np.float64)
        for r0 in range(0, n, a["tile"]):
            r1 = min(n, r0 + a["tile"])
            _, z = _logits32(h2[r0:r1], w, b)
            res = shard_stats(z, _tile_target(a, r0, r1), **a["stat_kw"], outputs=wide)
            if ost is None:
                stats[r0:r1] = res
            else:
                stats[r0:r1], ost[r0:r1] = res
        if ost is None:
            merged = a["all_reduce"](stats, a["group"]) if n else stats
        else:
            merged, ost = a["all_reduce_outputs"](stats, ost, a["group"]) if n else (stats, ost)
        loss = loss_from_stats(
            merged,
            reduction=a["reduction"],
            sample_weight=a["sw"],
            z_loss=a["z_loss"],
            normalizer=a["normalizer"],
            num_classes=a["stat_kw"]["num_classes"],
        )
        ctx.ent_rows = None
        if ec:  # the entropy term: - ec * reduce(s_n entropy_n) over counted rows
            r = vocab.entropy_weights(
                merged, a["t"], a["stat_kw"]["ignore_index"], a["sw"], a["reduction"],
                a["normalizer"],
            )  # fmt: skip
            loss = vocab.entropy_term(loss, ost, r, ec, a["stat_kw"]["num_classes"])
            ctx.ent_rows = r
        # Backward reads a probability target again: an in-place change before backward fails
        # loudly (its version counter is compared; not saved for backward, so that targets
        # made under inference_mode work). Class indices were copied by the plan.
        ctx.save_for_backward(input, w, b)
        ctx.target = target
        ctx.target_version = (
            None if a["probs"] is None or target.is_inference() else target._version
        )
        ctx.a, ctx.merged, ctx.ost = a, merged, ost
        ctx.float_names = tuple(k for k in FLOAT_OUTPUTS if names is not None and k in names)
        out = torch.from_numpy(np.asarray(loss, np.float64))
        out = (out.reshape(a["lead"]) if a["reduction"] == "none" else out).to(input.dtype)
        if names is None:
            return out
        st = outputs_from_stats(
            ost.reshape(a["lead"] + (len(OUTPUT_STAT_FIELDS),)),
            None if a["t"] is None else a["t"].reshape(a["lead"]),
            outputs=names,
            num_classes=a["stat_kw"]["num_classes"],
            ignore_index=a["stat_kw"]["ignore_index"],
            dtype=np.float64 if input.dtype == torch.float64 else np.float32,
        )
        side["stats"] = st
        return (out,) + tuple(
            torch.from_numpy(np.asarray(getattr(st, k))) for k in FLOAT_OUTPUTS if k in names
        )

    @staticmethod
    def backward(ctx: Any, go: Optional[Tensor], *stat_grads: Optional[Tensor]):
        no_second_order("vocab_parallel_linear_cross_entropy")
        sg = {
            k: g.detach().reshape(-1).to(torch.float64)
            for k, g in zip(ctx.float_names, stat_grads)
            if g is not None
        }
        if go is not None and ctx.ent_rows is not None:
            # the entropy term's gradient: its rows' coefficients times the upstream gradient
            up = go.detach().reshape(-1).to(torch.float64)
            ent = -ctx.a["entropy_coef"] * torch.from_numpy(ctx.ent_rows) * up
            sg["entropy"] = ent + sg["entropy"] if "entropy" in sg else ent
        if go is None and not sg:
            return (None,) * 6
        with torch.no_grad():
            return _VPLinear._backward(ctx, go, sg) + (None,)

    @staticmethod
    def _backward(
        ctx: Any, go: Optional[Tensor], sg: Dict[str, Tensor]
    ) -> Tuple[Optional[Tensor], ...]:
        """The gradients of the loss (upstream go; None: absent) plus those of the float
        statistics (sg: name -> (n,) upstream gradients), whose vector-Jacobian product
        (_torch_vocab._stats_vjp_local: this rank's columns, the merged statistics, no
        communication) joins each tile's gradient in blocks of rows before the matmuls."""
        input, w, b = ctx.saved_tensors
        if ctx.target_version is not None and ctx.target._version != ctx.target_version:
            raise RuntimeError(
                "vocab_parallel_linear_cross_entropy: the probability target was modified in "
                "place between the forward and the backward (the backward reads it again)"
            )
        a, merged = ctx.a, ctx.merged
        n, h = a["n"], input.shape[-1]
        h2 = input.reshape(n, h)
        red, sw, scale, norm = a["reduction"], a["sw"], 1.0, a["normalizer"]
        if go is not None and red == "none":
            g = go.detach().reshape(-1).to(torch.float64).numpy()
            sw = g if sw is None else np.asarray(sw, np.float64) * g
        elif go is not None:
            scale = float(go)
            if red == "mean" and norm is None and n:
                norm = stats_denominator(merged, a["sw"])
        gh = torch.zeros(n, h, dtype=input.dtype)
        gw = torch.zeros_like(w)
        gb = None if b is None else torch.zeros(b.shape, dtype=_kernel_dtype(b))
        for r0 in range(0, n, a["tile"]):
            r1 = min(n, r0 + a["tile"])
            x = h2[r0:r1]
            zf, zn = _logits32(x, w, b)
            if sg:  # the statistics' product, from the logits (before the kernel's gradient)
                extra = _stats_product(a, ctx.ost, zf, r0, r1, sg)
            if go is not None:
                shard_grad(
                    zn,
                    _tile_target(a, r0, r1),
                    merged[r0:r1],
                    **a["stat_kw"],
                    z_loss=a["z_loss"],
                    reduction="sum" if red == "none" else red,
                    normalizer=norm,
                    sample_weight=None if sw is None else sw[r0:r1],
                    scale=scale,
                    out=zn,
                )
                if sg:
                    zf += extra
            else:
                zf.copy_(extra)
            gt = zf.to(input.dtype)  # G_r, rounded once for 16-bit inputs
            torch.mm(gt, w, out=gh[r0:r1])
            gw.addmm_(gt.t(), x)
            if gb is not None:
                gb += zf.sum(0)
        a["dist"].all_reduce(gh, op=a["dist"].ReduceOp.SUM, group=a["group"])
        return (gh.reshape(input.shape), gw, None if gb is None else gb.to(b.dtype), None, None)


def _stats_product(
    a: dict, ost: np.ndarray, zf: Tensor, r0: int, r1: int, sg: Dict[str, Tensor]
) -> Tensor:
    """The vector-Jacobian product of the float statistics of rows [r0, r1) with respect
    to this rank's logits zf (the tile's), in the tile's dtype: _stats_vjp_local in blocks
    of at most _linear.STAT_BLOCK logits (its float64 temporaries stay small)."""
    from . import _torch_vocab as vocab

    kw = a["stat_kw"]
    tgt = None if a["t"] is None else a["t"].reshape(-1)
    out = torch.empty(zf.shape, dtype=zf.dtype)
    step = max(1, _linear.STAT_BLOCK // max(zf.shape[1], 1))
    for i in range(0, r1 - r0, step):
        j = min(r1 - r0, i + step)
        rows = slice(r0 + i, r0 + j)
        grads = {k: g[rows] for k, g in sg.items()}
        out[i:j] = vocab._stats_vjp_local(
            zf[i:j],
            None if tgt is None else tgt[rows],
            kw["offset"],
            kw["ignore_index"],
            kw["softcap"],
            kw["logit_scale"],
            ost[rows],
            grads,
        )
    return out


@EXTRA
def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    group: Any = None,
    *,
    linear_bias: Optional[Tensor] = None,
    offset: Optional[int] = None,
    num_classes: Optional[int] = None,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    outputs: Optional[Sequence[str]] = None,
    entropy_coef: Any = 0.0,
    tile_rows: Optional[int] = None,
    **kw: Unpack[ExtraKeywords],
) -> Any:
    """:func:`fastxent.torch.linear_cross_entropy` with the weight's rows (the vocabulary)
    split across the ranks of ``group``: ``linear_weight`` is this rank's (V_r, H) slice,
    rows ``[offset, offset + V_r)`` of the full (V, H) weight (by default the slices are in
    rank order, sizes gathered once), ``linear_bias`` its (V_r,) slice, ``weight`` (class
    weights) this rank's slice or the full vector. ``input`` (..., H) is the same on every
    rank; ``target`` is either class indices of shape input.shape[:-1] (an integer tensor,
    the same on every rank) or probabilities: a float tensor of shape input.shape[:-1] +
    (V_r,), this rank's columns ``[offset, offset + V_r)`` of the full (..., V) probability
    target (the convention of :func:`fastxent.torch.vocab_parallel_cross_entropy`), read one
    row tile at a time in the input's dtype, as the one-process function does. The loss is
    the same on every rank; backward gives each rank its weight (and bias) slice's gradient
    and the full gradient of ``input`` (summed over the ranks by one all-reduce). Other
    keywords as :func:`fastxent.torch.linear_cross_entropy`, ``entropy_coef`` included (the
    entropy term from the merged statistics, its gradient through the entropies' derivative
    in the backward's tile loop; every rank must pass the same value); with probability
    targets ``ignore_index`` is refused (ValueError, as there) and the target is not
    differentiated:
    one that requires grad is refused (RuntimeError; detach it). The arguments' shapes and
    dtypes, the target's included, are checked before any collective.

    ``outputs`` (a tuple of names, as :func:`fastxent.torch.linear_cross_entropy`'s): the call
    returns ``(loss, fastxent.RowStats)`` of the whole rows (all ranks' slices), the same on
    every rank, from the forward's own statistics (their collectives widened, no extra pass;
    every rank must pass the same ``outputs``); float32 for 16-bit input. lse, entropy and
    target_logprob are differentiable with respect to input, the weight slice and the bias
    slice (in the backward's tile loop, without more communication than the loss's).
    target_logprob and accuracy need class-index targets (ValueError before any
    collective)."""
    extra = EXTRA.bind("vocab_parallel_linear_cross_entropy", kw)
    sample_weight = extra["sample_weight"]
    from . import _torch_vocab as vocab  # the layout and the statistics' all-reduce

    lb = linear_bias
    for name, t in (
        ("input", input),
        ("linear_weight", linear_weight),
        ("target", target),
        ("linear_bias", lb),
    ):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    fn = "vocab_parallel_linear_cross_entropy"
    refuse_func_transforms(input, linear_weight, target, linear_bias, weight, sample_weight)
    # The tensors' shapes and dtypes and the target are checked before the first collective
    # (the layout's all_gather): such a bad argument raises before any rank waits on it.
    _linear.shape_checks(
        tuple(input.shape),
        _np_dt(input.dtype),
        tuple(linear_weight.shape),
        _np_dt(linear_weight.dtype),
        None if lb is None else tuple(lb.shape),
        None if lb is None else _np_dt(lb.dtype),
    )
    lead = tuple(input.shape[:-1])
    v_local = int(linear_weight.shape[0])
    probs = _target_kind(target, lead, v_local, ignore_index)
    names = None if outputs is None else output_names(outputs)
    if names is not None and probs:
        bad = [k for k in names if k in ("target_logprob", "accuracy")]
        if bad:
            raise ValueError(f"outputs {bad} need class-index targets, not probabilities")
    # Class weights, sample weights and scalar options are read as constants: a derivative
    # asked of them raises rather than coming back None (or a tangent of 0).
    refuse_derivative(weight, "weight", fn)
    refuse_derivative(sample_weight, "sample_weight", fn)
    refuse_option_derivatives(
        dict(extra, label_smoothing=label_smoothing, entropy_coef=entropy_coef), fn
    )
    ec = real(entropy_coef, "entropy_coef", 0.0, False)
    refuse_forward_mode(fn, input, linear_weight, linear_bias)
    if probs:
        refuse_derivative(target, "a probability target", fn)
    dist = vocab.torch_dist()
    off, V = vocab.vp_layout(v_local, group, offset, num_classes)
    cw = (
        None
        if weight is None
        else np.asarray(
            weight.detach().double() if isinstance(weight, Tensor) else weight, np.float64
        )
    )
    if cw is not None and cw.shape == (V,) and V != v_local:
        cw = cw[off : off + v_local]
    if isinstance(sample_weight, Tensor):
        sample_weight = sample_weight.detach().double().numpy()
    opts = {
        "weight": cw,
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
        **extra,
        "sample_weight": sample_weight,
    }
    # The shapes, dtypes and options are checked as for the one-process function, on this
    # rank's slice; class indices are checked against the whole vocabulary.
    plan = _linear.make_plan(
        tuple(input.shape),
        _np_dt(input.dtype),
        tuple(linear_weight.shape),
        _np_dt(linear_weight.dtype),
        None if lb is None else tuple(lb.shape),
        None if lb is None else _np_dt(lb.dtype),
        None if probs else np.full(lead, ignore_index, np.int64),
        tuple(target.shape),
        probs,
        reduction,
        opts,
        tile_rows,
        4,
    )
    tgt = None
    if not probs:  # a copy (N integers): the backward never sees a later in-place change
        tgt = np.array(_linear.class_targets(target.detach().numpy(), lead, V, ignore_index))
    pt = None
    if probs:  # rows of the probabilities, sliced per tile (_tile_target)
        pt = target.detach()
        if pt.ndim != 2:
            try:
                pt = pt.view(plan.n, v_local)
            except RuntimeError:  # not viewable as rows: gathered per tile instead
                pass
    cdt = np.float64 if input.dtype == torch.float64 else np.float32
    a = {
        "n": plan.n,
        "lead": plan.lead,
        "tile": plan.tile,
        "t": tgt,
        "probs": pt,
        "dtype": input.dtype,
        "group": group,
        "dist": dist,
        "all_reduce": vocab.all_reduce_stats,
        "all_reduce_outputs": vocab.all_reduce_with_outputs,
        "outputs": names,
        "entropy_coef": ec,
        "reduction": reduction,
        "sw": plan.sample_weight,
        "z_loss": extra["z_loss"],
        "normalizer": extra["normalizer"],
        "stat_kw": {
            "offset": off,
            "num_classes": V,
            "weight": None if cw is None else cw.astype(cdt),
            "ignore_index": ignore_index,
            "label_smoothing": label_smoothing,
            "softcap": extra["softcap"],
            "logit_scale": extra["logit_scale"],
            "num_threads": extra["num_threads"],
        },
    }
    side: Dict[str, Any] = {}
    if torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (input, linear_weight, lb)
    ):
        res = _VPLinear.apply(input, linear_weight, lb, target, a, side)
    else:
        with torch.no_grad():
            res = _VPLinear.forward(_NoCtx(), input, linear_weight, lb, target, a, side)
    if names is None:
        return res
    return _row_stats(res[0], list(res[1:]), side["stats"], names, a["lead"])


def _target_kind(target: Tensor, lead: Tuple[int, ...], v_local: int, ignore_index: int) -> bool:
    """True for probability targets, False for class indices; checks the target's dtype and
    shape (class indices: lead; probabilities: lead + (V_r,), this rank's columns) and what
    probability targets exclude, before anything is computed or exchanged."""
    shape, pshape = tuple(target.shape), lead + (v_local,)
    if target.is_floating_point():
        if shape != pshape:
            raise ValueError(
                f"probability target has shape {shape}, expected {pshape} (input.shape[:-1] + "
                f"(V_r,): this rank's columns of the probabilities)"
                + (" (class indices must be an integer tensor)" if shape == lead else "")
            )
        if ignore_index != -100:
            raise ValueError(
                "ignore_index applies to class-index targets only; probability "
                "targets weight rows with sample_weight instead"
            )
        if target.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "vocab_parallel_linear_cross_entropy does not differentiate with respect to "
                "a probability target; this input cannot have requires_grad=True (detach it)"
            )
        return True
    if target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices (shape {lead}) or float class "
            f"probabilities (shape {pshape}), got dtype {target.dtype}"
        )
    if shape != lead:
        raise ValueError(
            f"target has shape {shape}, expected {lead} (class indices: input.shape[:-1])"
            + (" (probability targets must be a float tensor)" if shape == pshape else "")
        )
    return False


def _tile_target(a: dict, r0: int, r1: int) -> np.ndarray:
    """The target of rows [r0, r1) for the kernel: class indices, or the probabilities in the
    input's dtype (the one-process function's conversion), 16-bit ones in float32 (the
    tile's logits are float32 there); a copy of the tile's rows at most."""
    p = a["probs"]
    if p is None:
        return a["t"][r0:r1]
    if p.ndim == 2:
        rows = p[r0:r1]
    else:  # a target not viewable as (N, V_r): this tile's rows gathered
        idx = np.unravel_index(np.arange(r0, r1), a["lead"])
        rows = p[tuple(torch.from_numpy(i) for i in idx)]
    if rows.dtype != a["dtype"]:
        rows = rows.to(a["dtype"])
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    return rows.resolve_neg().numpy()


class _NoCtx:
    def save_for_backward(self, *a: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def _kernel_dtype(b: Tensor) -> torch.dtype:
    """The dtype of the kernel's tiles (and of the bias gradient's sum) for b's dtype."""
    return torch.float64 if b.dtype == torch.float64 else torch.float32


def _np_dt(dt: torch.dtype) -> np.dtype:
    return _bf16() if dt == torch.bfloat16 else np.dtype(str(dt).split(".")[-1])


def _bf16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
