"""fastxent.torch's vocabulary-parallel cross-entropy (private; public through
fastxent.torch): Megatron-LM's vocab-parallel layout over a torch.distributed group."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _shard
from ._keywords import EXTRA, ExtraKeywords, Unpack
from ._options import index
from ._torch_common import (
    all_ones,
    as_array,
    compute_dtype,
    has_tangent,
    loss_tensor,
    numpy_of,
    refuse_func_transforms,
    refuse_option_derivatives,
    target_array,
)

# --------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy (torch.distributed)
# --------------------------------------------------------------------------------------------

_NSTAT = len(_shard.STAT_FIELDS)


def torch_dist() -> Any:
    """torch.distributed, checked to be usable (available in this build, initialized)."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(
            "vocab_parallel_cross_entropy needs torch.distributed, which this "
            "PyTorch build does not provide"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "vocab_parallel_cross_entropy needs an initialized process group: "
            "call torch.distributed.init_process_group (e.g. backend='gloo') "
            "on every rank first"
        )
    return dist


def vp_layout(
    c_local: int, group: Any, offset: Optional[int], num_classes: Optional[int]
) -> Tuple[int, int]:
    """(offset, num_classes) of this rank's slice: as given, or from the slice sizes of every
    rank gathered once (one all_gather of one integer per rank), in rank order."""
    if offset is not None and num_classes is not None:
        return index(offset, "offset"), index(num_classes, "num_classes")
    dist = torch_dist()
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("vocab_parallel_cross_entropy: this process is not a member of `group`")
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([c_local], dtype=torch.int64), group=group)
    n = [int(s.item()) for s in sizes]
    total = sum(n)
    if num_classes is None:
        num_classes = total
    elif index(num_classes, "num_classes") != total:
        raise ValueError(
            f"num_classes = {num_classes}, but the ranks' slices (sizes {n}, in "
            f"rank order) add up to {total}"
        )
    if offset is None:
        offset = sum(n[:rank])
    return index(offset, "offset"), index(num_classes, "num_classes")


def all_reduce_stats(st: np.ndarray, group: Any) -> np.ndarray:
    """Merges every rank's shard statistics (rows, 7) with two all-reduces: MAX of the row
    maxima, then SUM of the other fields packed in one tensor, the exponential sums rescaled
    to the global max first (Megatron's scheme). NaN does not rely on the backend: a rank's NaN
    max (some logit NaN) enters the MAX as -inf and a NaN flag rides in the SUM, so a row with
    a NaN on any rank gets a NaN max and sum on every rank, as on one machine."""
    dist = torch_dist()
    s = torch.from_numpy(st)
    mx, se = s[:, 0], s[:, 1]
    nan = torch.isnan(mx) | torch.isnan(se)
    m = torch.where(nan, torch.full_like(mx, -np.inf), mx)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # exp(max_r - M): exactly 1 at the max (also for M = +inf), 0 for a rank whose row is all
    # -inf (nothing to add) or NaN (flagged instead).
    factor = torch.where(mx == m, torch.ones_like(mx), torch.exp(mx - m))
    packed = torch.empty(s.shape, dtype=torch.float64)
    packed[:, 0] = torch.where(nan | (mx == -np.inf), torch.zeros_like(se), se * factor)
    packed[:, 1 : _NSTAT - 1] = s[:, 2:]
    packed[:, _NSTAT - 1] = nan.to(torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    out = torch.empty(s.shape, dtype=torch.float64)
    out[:, 0] = m
    out[:, 1:] = packed[:, : _NSTAT - 1]
    out[packed[:, _NSTAT - 1] > 0, :2] = np.nan
    return out.numpy()


class _VPArgs(NamedTuple):
    """The checked arguments of one vocab_parallel_cross_entropy call (NumPy views)."""

    cdt: torch.dtype
    tgt: np.ndarray
    group: Any
    offset: int
    num_classes: int
    weight: Optional[np.ndarray]
    ignore_index: int
    label_smoothing: float
    reduction: str
    sample_weight: Any
    z_loss: float
    softcap: Optional[float]
    logit_scale: float
    normalizer: Optional[float]
    num_threads: Optional[int]


def _vp_stats_loss(x: np.ndarray, a: _VPArgs) -> Tuple[Any, np.ndarray]:
    st = _shard.shard_stats(
        x,
        a.tgt,
        offset=a.offset,
        num_classes=a.num_classes,
        weight=a.weight,
        ignore_index=a.ignore_index,
        label_smoothing=a.label_smoothing,
        softcap=a.softcap,
        logit_scale=a.logit_scale,
        num_threads=a.num_threads,
    )
    rows_shape = st.shape[:-1]
    merged = all_reduce_stats(st.reshape(-1, _NSTAT), a.group).reshape(st.shape)
    loss = _shard.loss_from_stats(
        merged,
        reduction=a.reduction,
        sample_weight=a.sample_weight,
        z_loss=a.z_loss,
        normalizer=a.normalizer,
        num_classes=a.num_classes,
    )
    if a.reduction == "none":
        loss = np.asarray(loss).reshape(rows_shape)
    return loss, merged


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: shard statistics, two all-reduces, the loss; backward: this rank's gradient
    from its logits and the merged statistics (fastxent.shard_grad), no communication."""

    @staticmethod
    def forward(ctx, input: Tensor, a: _VPArgs, *saved: Tensor) -> Tensor:
        loss, merged = _vp_stats_loss(numpy_of(input, a.cdt), a)
        # The logits (and any tensor whose NumPy view backward reads) are saved so that an
        # in-place change before backward fails loudly (version counter) instead of giving a
        # wrong gradient. A 16-bit shard is converted to float32 again in backward rather than
        # keeping a float32 copy alive in between.
        ctx.save_for_backward(input, *saved)
        ctx.a = a
        ctx.merged = merged
        return loss_tensor(loss, input.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if torch.is_grad_enabled():
            # create_graph=True: the gradient would be returned as a constant, and every
            # derivative of it silently 0. Refuse instead.
            raise RuntimeError(
                "vocab_parallel_cross_entropy has no second-order derivative (backward with "
                "create_graph=True: Hessians, gradient penalties); its gradient is computed "
                "outside the autograd graph. Use fastxent.torch.cross_entropy on gathered "
                "logits for those"
            )
        with torch.no_grad():
            return _VocabParallelCrossEntropy._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output: Tensor):
        input = ctx.saved_tensors[0]
        a, merged = ctx.a, ctx.merged
        x = numpy_of(input, a.cdt)
        sw, scale, post = a.sample_weight, 1.0, None
        if a.reduction == "none":
            # Row n's loss depends on row n's logits only, so the upstream gradient of the
            # rows is a per-row factor of row n's gradient: it is folded into the sample
            # weights of the sum's gradient, which shard_grad applies per row in its one pass
            # (the same factor as scaling afterwards; only the rounding order differs: the
            # product s_n * go_n is rounded to the compute dtype).
            if not all_ones(grad_output):
                go = numpy_of(grad_output, torch.float64)
                sw = go if sw is None else np.asarray(sw, np.float64) * go
        else:
            scale = float(grad_output)
            if not np.isfinite(scale):  # shard_grad takes finite scales; inf/NaN propagate
                scale, post = 1.0, grad_output
        g = _shard.shard_grad(
            x,
            a.tgt,
            merged,
            offset=a.offset,
            num_classes=a.num_classes,
            weight=a.weight,
            ignore_index=a.ignore_index,
            label_smoothing=a.label_smoothing,
            softcap=a.softcap,
            logit_scale=a.logit_scale,
            z_loss=a.z_loss,
            reduction="sum" if a.reduction == "none" else a.reduction,
            sample_weight=sw,
            normalizer=a.normalizer,
            scale=scale,
            num_threads=a.num_threads,
        )
        grad = torch.from_numpy(g)
        if grad.dtype != input.dtype:
            grad = grad.to(input.dtype)
        if post is not None:
            grad = grad * post
        return (grad, None) + (None,) * (len(ctx.saved_tensors) - 1)


@EXTRA
def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    group: Any = None,
    *,
    offset: Optional[int] = None,
    num_classes: Optional[int] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    **kw: Unpack[ExtraKeywords],
) -> Tensor:
    extra = EXTRA.bind("vocab_parallel_cross_entropy", kw)
    sample_weight = extra["sample_weight"]
    cdt = compute_dtype(local_logits, target, "local_logits")
    refuse_func_transforms(local_logits, target, weight, sample_weight)
    if local_logits.ndim == 0:
        raise ValueError(
            "local_logits must have shape (..., C_local): the vocabulary slice "
            "is the last dimension"
        )
    if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    c_local = int(local_logits.shape[-1])
    if c_local == 0:
        raise ValueError("local_logits has an empty vocabulary slice (last dimension 0)")
    tgt = target_array(target, cdt)
    w = as_array(weight, "weight", cdt)
    sw = as_array(sample_weight, "sample_weight", cdt)
    torch_dist()
    off, C = vp_layout(c_local, group, offset, num_classes)
    if w is not None:
        w = np.asarray(w)
        if w.shape == (C,) and C != c_local:  # the full class-weight vector: this rank's part
            if not 0 <= off <= C - c_local:
                raise ValueError(
                    f"the slice [offset, offset + C_local) = [{off}, "
                    f"{off + c_local}) does not fit in num_classes = {C}"
                )
            w = w[off : off + c_local]
        elif w.shape != (c_local,):
            raise ValueError(
                f"weight has shape {w.shape}; expected ({c_local},) (this rank's "
                f"slice) or ({C},) (the full vocabulary)"
            )
    a = _VPArgs(
        cdt=cdt,
        tgt=tgt,
        group=group,
        offset=off,
        num_classes=C,
        weight=w,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
        sample_weight=sw,
        z_loss=extra["z_loss"],
        softcap=extra["softcap"],
        logit_scale=extra["logit_scale"],
        normalizer=extra["normalizer"],
        num_threads=extra["num_threads"],
    )
    # No forward mode: a tangent would be dropped (the no-grad path) or meet the Function's
    # missing jvp; scalar options given as tensors are read as numbers.
    refuse_option_derivatives(
        dict(extra, label_smoothing=label_smoothing), "vocab_parallel_cross_entropy"
    )
    if has_tangent(local_logits):
        raise RuntimeError(
            "vocab_parallel_cross_entropy has no forward-mode derivative "
            "(torch.autograd.forward_ad): use reverse mode (backward / torch.autograd.grad)"
        )
    if not (local_logits.requires_grad and torch.is_grad_enabled()):
        loss, _ = _vp_stats_loss(numpy_of(local_logits, cdt), a)
        return loss_tensor(loss, local_logits.dtype)
    saved = [t for t in (target, weight, sample_weight) if isinstance(t, Tensor)]
    return _VocabParallelCrossEntropy.apply(local_logits, a, *saved)


vocab_parallel_cross_entropy.__doc__ = """Cross-entropy over a vocabulary split across the
    ranks of a ``torch.distributed`` process group (tensor / vocabulary parallelism, the layout
    of Megatron-LM's ``vocab_parallel_cross_entropy``): the loss and gradient are those of
    :func:`cross_entropy` on the full logits, without ever gathering them.

    Every rank of ``group`` calls it with the same rows and targets and its own slice of the
    classes. Forward: fastxent's per-shard statistics (:func:`fastxent.shard_stats`, one SIMD
    pass over the slice), then exactly two collectives: an ``all_reduce`` MAX of the row maxima
    and an ``all_reduce`` SUM of the other statistics packed in one float64 tensor of shape
    ``(rows, 7)``; the loss comes from the merged statistics and is the same on every rank.
    Backward: each rank's gradient from its own slice and the merged statistics
    (:func:`fastxent.shard_grad`), with no communication. Label smoothing spreads ``eps / C``
    over the whole vocabulary ``C = num_classes``, not over a rank's slice (the mistake of
    Megatron-LM #737); a NaN logit on any rank makes its row's loss NaN on every rank, whatever
    the backend's MAX does with NaN.

    Parameters
    ----------
    local_logits : Tensor (..., C_local), on the CPU
        This rank's slice of the logits: columns ``[offset, offset + C_local)`` of the full
        ``(..., C)`` logits; the class dimension is the **last** one (Megatron's layout, not
        ``F.cross_entropy``'s dimension 1), any leading dimensions are rows. float32 and
        float64 are read in place; float16 and bfloat16 are computed via a float32 copy and
        the loss and gradient cast back to the input's dtype.
    target : Tensor
        Global class indices (any integer dtype, in ``[0, C)`` or ``ignore_index``) of shape
        ``local_logits.shape[:-1]``, the same on every rank; or this rank's columns of class
        probabilities (a float tensor of ``local_logits``' shape).
    group : ProcessGroup, optional
        The ranks sharing the vocabulary (default: the world). Any backend that all-reduces
        CPU float64 tensors with MAX and SUM (``gloo``; ``mpi``).
    offset, num_classes : int, keyword-only, optional
        Where this rank's slice starts and the vocabulary size ``C``. By default the slices
        are laid out in rank order and their sizes (each rank's ``C_local``, which may differ)
        are gathered with one ``all_gather`` of one integer per rank; pass both to skip that
        collective (or for another layout: the slices must partition ``[0, C)``, which is
        checked after the merge).
    weight : Tensor, keyword-only, optional
        Class weights: either this rank's slice, shape ``(C_local,)``, or the full vector,
        shape ``(C,)``, of which this rank uses ``weight[offset:offset + C_local]`` (the two
        cannot be confused: ``C_local == C`` only for a rank holding the whole vocabulary).
    ignore_index, label_smoothing, reduction
        As :func:`cross_entropy` (``reduction`` in ``{"mean", "sum", "none"}``; ``"none"``
        returns ``local_logits.shape[:-1]``).
    sample_weight : Tensor, keyword-only, optional
        Per-row weights, shape ``local_logits.shape[:-1]`` (the same on every rank).
    z_loss, softcap, logit_scale, normalizer, num_threads
        fastxent's options, as :func:`cross_entropy` (``num_threads`` caps this rank's
        OpenMP threads).

    Returns
    -------
    Tensor of ``local_logits``' dtype, the same on every rank: a scalar, or the rows' shape
    for ``"none"``. Differentiable with respect to ``local_logits`` only (as
    :func:`cross_entropy`); call ``backward`` on every rank (no collective runs in it, so ranks
    may also backpropagate at different times).

    Raises
    ------
    RuntimeError
        ``torch.distributed`` unavailable or not initialized; ``weight``, ``sample_weight`` or
        a probability target that requires grad; ``create_graph=True`` in backward (no
        second-order derivative) or a ``torch.func`` transform.
    ValueError
        a tensor not on the CPU; a bad shape, option or layout (slices that overlap or leave
        classes out are detected after the merge, on every rank alike).
    TypeError, IndexError
        as :func:`cross_entropy`.

    Errors found before the collectives (a bad argument on one rank only) leave the other
    ranks waiting in the collective, as with any ``torch.distributed`` code; the process
    group's timeout ends the wait.

    Example
    -------
    On each of the ``world`` ranks (``torch.distributed.init_process_group("gloo", ...)``
    done), with ``logits_full`` of shape ``(B, T, V)``::

        rank, world = dist.get_rank(), dist.get_world_size()
        local = logits_full.tensor_split(world, dim=-1)[rank].requires_grad_()
        loss = fxt.vocab_parallel_cross_entropy(local, target, label_smoothing=0.1)
        loss.backward()      # local.grad: this rank's slice of the full gradient
"""
