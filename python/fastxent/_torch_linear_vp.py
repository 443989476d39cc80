"""Vocabulary-parallel fused linear + cross-entropy for torch.distributed:
:func:`vocab_parallel_linear_cross_entropy`. Each rank holds rows ``[offset, offset + V_r)``
of the output projection (Megatron's vocab-parallel head) and the same hidden states and
targets; the result is that of :func:`fastxent.torch.linear_cross_entropy` with the full
weight, without any rank ever holding logits of more than one tile of its own slice.

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
- 16-bit: Z_r is computed in the input dtype and converted to float32 per tile for the
  kernel; G_r is rounded once to the input dtype for the gradient matmuls.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _linear
from ._keywords import EXTRA, ExtraKeywords, Unpack
from ._shard import loss_from_stats, shard_grad, shard_stats, stats_denominator
from ._torch_common import refuse_derivative, refuse_func_transforms, refuse_option_derivatives
from ._torch_linear import no_second_order, refuse_forward_mode

__all__ = ["vocab_parallel_linear_cross_entropy"]


def _logits32(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tuple[Tensor, np.ndarray]:
    z = torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())
    zf = z if z.dtype in (torch.float32, torch.float64) else z.float()
    return zf, zf.numpy()


class _VPLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, w: Tensor, b: Optional[Tensor], a: dict) -> Tensor:
        n, h = a["n"], input.shape[-1]
        h2 = input.reshape(n, h)
        stats = np.empty((n, 7), np.float64)
        for r0 in range(0, n, a["tile"]):
            r1 = min(n, r0 + a["tile"])
            _, z = _logits32(h2[r0:r1], w, b)
            stats[r0:r1] = shard_stats(z, a["t"][r0:r1], **a["stat_kw"])
        merged = a["all_reduce"](stats, a["group"]) if n else stats
        loss = loss_from_stats(
            merged,
            reduction=a["reduction"],
            sample_weight=a["sw"],
            z_loss=a["z_loss"],
            normalizer=a["normalizer"],
            num_classes=a["stat_kw"]["num_classes"],
        )
        ctx.save_for_backward(input, w, b)
        ctx.a, ctx.merged = a, merged
        out = torch.from_numpy(np.asarray(loss, np.float64))
        return (out.reshape(a["lead"]) if a["reduction"] == "none" else out).to(input.dtype)

    @staticmethod
    def backward(ctx: Any, go: Tensor) -> Tuple[Optional[Tensor], ...]:
        no_second_order("vocab_parallel_linear_cross_entropy")
        with torch.no_grad():
            return _VPLinear._backward(ctx, go)

    @staticmethod
    def _backward(ctx: Any, go: Tensor) -> Tuple[Optional[Tensor], ...]:
        input, w, b = ctx.saved_tensors
        a, merged = ctx.a, ctx.merged
        n, h = a["n"], input.shape[-1]
        h2 = input.reshape(n, h)
        red, sw, scale, norm = a["reduction"], a["sw"], 1.0, a["normalizer"]
        if red == "none":
            g = go.detach().reshape(-1).to(torch.float64).numpy()
            sw = g if sw is None else np.asarray(sw, np.float64) * g
        else:
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
            shard_grad(
                zn,
                a["t"][r0:r1],
                merged[r0:r1],
                **a["stat_kw"],
                z_loss=a["z_loss"],
                reduction="sum" if red == "none" else red,
                normalizer=norm,
                sample_weight=None if sw is None else sw[r0:r1],
                scale=scale,
                out=zn,
            )
            gt = zf.to(input.dtype)  # G_r, rounded once for 16-bit inputs
            torch.mm(gt, w, out=gh[r0:r1])
            gw.addmm_(gt.t(), x)
            if gb is not None:
                gb += zf.sum(0)
        a["dist"].all_reduce(gh, op=a["dist"].ReduceOp.SUM, group=a["group"])
        return (gh.reshape(input.shape), gw, None if gb is None else gb.to(b.dtype), None)


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
    tile_rows: Optional[int] = None,
    **kw: Unpack[ExtraKeywords],
) -> Tensor:
    """:func:`fastxent.torch.linear_cross_entropy` with the weight's rows (the vocabulary)
    split across the ranks of ``group``: ``linear_weight`` is this rank's (V_r, H) slice,
    rows ``[offset, offset + V_r)`` of the full (V, H) weight (by default the slices are in
    rank order, sizes gathered once), ``linear_bias`` its (V_r,) slice, ``weight`` (class
    weights) this rank's slice or the full vector. ``input`` (..., H) and ``target`` (class
    indices of shape input.shape[:-1]) are the same on every rank. The loss is the same on
    every rank; backward gives each rank its weight (and bias) slice's gradient and the full
    gradient of ``input`` (summed over the ranks by one all-reduce). Other keywords as
    :func:`fastxent.torch.linear_cross_entropy`; probability targets are not supported."""
    extra = EXTRA.bind("vocab_parallel_linear_cross_entropy", kw)
    sample_weight = extra["sample_weight"]
    from . import _torch_vocab as vocab  # the layout and the statistics' all-reduce

    dist = vocab.torch_dist()
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if target.is_floating_point():
        raise TypeError("vocab_parallel_linear_cross_entropy takes class indices only")
    fn = "vocab_parallel_linear_cross_entropy"
    refuse_func_transforms(input, linear_weight, target, linear_bias, weight, sample_weight)
    # Class weights, sample weights and scalar options are read as constants: a derivative
    # asked of them raises rather than coming back None (or a tangent of 0).
    refuse_derivative(weight, "weight", fn)
    refuse_derivative(sample_weight, "sample_weight", fn)
    refuse_option_derivatives(dict(extra, label_smoothing=label_smoothing), fn)
    refuse_forward_mode(fn, input, linear_weight, linear_bias)
    v_local = int(linear_weight.shape[0]) if linear_weight.ndim == 2 else 0
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
    lb = linear_bias
    lead = tuple(input.shape[:-1])
    plan = _linear.make_plan(
        tuple(input.shape),
        _np_dt(input.dtype),
        tuple(linear_weight.shape),
        _np_dt(linear_weight.dtype),
        None if lb is None else tuple(lb.shape),
        None if lb is None else _np_dt(lb.dtype),
        np.full(lead, ignore_index, np.int64),
        lead,
        False,
        reduction,
        opts,
        tile_rows,
        4,
    )
    tgt = _linear.class_targets(target.detach().numpy(), plan.lead, V, ignore_index)
    cdt = np.float64 if input.dtype == torch.float64 else np.float32
    a = {
        "n": plan.n,
        "lead": plan.lead,
        "tile": plan.tile,
        "t": tgt,
        "group": group,
        "dist": dist,
        "all_reduce": vocab.all_reduce_stats,
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
    if torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (input, linear_weight, lb)
    ):
        return _VPLinear.apply(input, linear_weight, lb, a)
    with torch.no_grad():
        return _VPLinear.forward(_NoCtx(), input, linear_weight, lb, a)


class _NoCtx:
    def save_for_backward(self, *a: Any) -> None:
        pass


def _kernel_dtype(b: Tensor) -> torch.dtype:
    """The dtype of the kernel's tiles (and of the bias gradient's sum) for b's dtype."""
    return torch.float64 if b.dtype == torch.float64 else torch.float32


def _np_dt(dt: torch.dtype) -> np.dtype:
    return _bf16() if dt == torch.bfloat16 else np.dtype(str(dt).split(".")[-1])


def _bf16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
