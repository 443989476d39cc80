"""fastxent.torch's vocabulary-parallel cross-entropy (private; public through
fastxent.torch): Megatron-LM's vocab-parallel layout over a torch.distributed group."""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _shard
from ._torch_autograd import _row_stats
from ._keywords import EXTRA, FLOAT_OUTPUTS, ExtraKeywords, Unpack, output_names, real
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
    return _all_reduce(st, None, group)[0]


_NOUT = len(_shard.OUTPUT_STAT_FIELDS)
_O = {name: i for i, name in enumerate(_shard.OUTPUT_STAT_FIELDS)}


def all_reduce_with_outputs(
    st: np.ndarray, ost: np.ndarray, group: Any
) -> Tuple[np.ndarray, np.ndarray]:
    """all_reduce_stats for the loss statistics (rows, 7) and the output statistics (rows, 8)
    together, in three all-reduces: the MAX and the SUM widened (the output statistics' max,
    NaN flag and largest logit in the first, their exponential sums rescaled to their own
    global max in the second), and a MIN of the argmax index over the ranks holding the
    winning value (a row holding NaN: those whose slice holds one). The result is
    merge_output_stats' for any rank order: the argmax merges exactly, the sums up to
    rounding."""
    out, oo = _all_reduce(st, ost, group)
    assert oo is not None
    return out, oo


def _rescaled(m: Tensor, s: Tensor, dead: Tensor, M: Tensor) -> Tensor:
    """Each rank's sum s taken with shift m, rescaled to the global max M: exp(m - M) is exactly
    1 at the max (also for M = +inf); a dead rank (a row all -inf, or NaN: flagged instead) adds
    0."""
    factor = torch.where(m == M, torch.ones_like(m), torch.exp(m - M))
    return torch.where(dead, torch.zeros_like(s), s * factor)


def _all_reduce(
    st: np.ndarray, ost: Optional[np.ndarray], group: Any
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    dist = torch_dist()
    s = torch.from_numpy(st)
    ninf = torch.tensor(-np.inf, dtype=torch.float64)
    mx, se = s[:, 0], s[:, 1]
    nan = torch.isnan(mx) | torch.isnan(se)
    hi_cols = [torch.where(nan, ninf, mx)]
    if ost is not None:
        o = torch.from_numpy(ost)
        om, os_, oh = o[:, _O["max"]], o[:, _O["sumexp"]], o[:, _O["h"]]
        onan = torch.isnan(om) | torch.isnan(os_)
        lnan = o[:, _O["nan"]] > 0  # this rank's slice holds a NaN logit
        hi_cols += [
            torch.where(onan, ninf, om),
            o[:, _O["nan"]],
            torch.where(lnan, ninf, o[:, _O["argval"]]),
        ]
    hi = torch.stack(hi_cols, dim=1)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    m = hi[:, 0]
    packed = torch.empty((s.shape[0], _NSTAT + (0 if ost is None else 5)), dtype=torch.float64)
    packed[:, 0] = _rescaled(mx, se, nan | (mx == -np.inf), m)
    packed[:, 1 : _NSTAT - 1] = s[:, 2:]
    packed[:, _NSTAT - 1] = nan.to(torch.float64)
    if ost is not None:
        M, gnan, gval = hi[:, 1], hi[:, 2] > 0, hi[:, 3]
        dead = onan | (om == -np.inf)
        packed[:, _NSTAT] = _rescaled(om, os_, dead, M)
        # (as merge_output_stats: a rank whose rescale is 0 adds nothing to h, where
        # (m - M) S may be -inf)
        f = torch.where(om == M, torch.ones_like(om), torch.exp(om - M))
        live = ~dead & (f != 0)
        packed[:, _NSTAT + 1] = torch.where(live, (oh + (om - M) * os_) * f, torch.zeros_like(oh))
        packed[:, _NSTAT + 2] = onan.to(torch.float64)
        packed[:, _NSTAT + 3] = o[:, _O["zy"]]
        packed[:, _NSTAT + 4] = o[:, _O["columns"]]
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    out = torch.empty(s.shape, dtype=torch.float64)
    out[:, 0] = m
    out[:, 1:] = packed[:, : _NSTAT - 1]
    out[packed[:, _NSTAT - 1] > 0, :2] = np.nan
    if ost is None:
        return out.numpy(), None
    mine = torch.where(gnan, lnan, ~lnan & (o[:, _O["argval"]] == gval))
    idx = torch.where(mine, o[:, _O["argidx"]], torch.full_like(om, np.inf))
    dist.all_reduce(idx, op=dist.ReduceOp.MIN, group=group)
    oo = torch.empty(o.shape, dtype=torch.float64)
    oo[:, _O["max"]] = M
    oo[:, _O["sumexp"]] = packed[:, _NSTAT]
    oo[:, _O["h"]] = packed[:, _NSTAT + 1]
    oo[packed[:, _NSTAT + 2] > 0, : _O["h"] + 1] = np.nan
    oo[:, _O["nan"]] = gnan.to(torch.float64)
    oo[:, _O["argval"]] = torch.where(gnan, torch.full_like(gval, np.nan), gval)
    oo[:, _O["argidx"]] = idx
    oo[:, _O["zy"]] = packed[:, _NSTAT + 3]
    oo[:, _O["columns"]] = packed[:, _NSTAT + 4]
    return out.numpy(), oo.numpy()


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
    entropy_coef: float = 0.0


def entropy_weights(
    merged: np.ndarray,
    tgt: Optional[np.ndarray],
    ignore_index: int,
    sample_weight: Any,
    reduction: str,
    normalizer: Optional[float],
) -> np.ndarray:
    """The rows' weights r_n of the entropy bonus (fastxent.cross_entropy's entropy_coef:
    CE - ec * reduce(s_n entropy_n) over counted rows, sample weights s_n, no class weights,
    the loss's reduction and "mean" denominator D): r_n = s_n / D for "mean", s_n otherwise,
    0 on ignored rows; d loss / d entropy_n = -ec * r_n (times the upstream gradient). tgt:
    the class targets (None for probabilities: every row counts)."""
    n = merged.reshape(-1, _NSTAT).shape[0]
    r = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    r = r.reshape(-1)
    if tgt is not None:
        r = np.where(np.asarray(tgt).reshape(-1) != ignore_index, r, 0.0)
    if reduction == "mean":
        d = normalizer
        if d is None:
            d = _shard.stats_denominator(merged.reshape(-1, _NSTAT), sample_weight)
        r = r / d if d > 0 else np.zeros(n)
    return r


def entropy_term(loss: Any, mo: np.ndarray, r: np.ndarray, ec: float, num_classes: int) -> Any:
    """The loss with the entropy bonus: loss - ec * (r_n entropy_n) per row ("none": loss
    holds the rows) or summed, the entropies from merged output statistics mo."""
    ent = _shard.outputs_from_stats(
        mo.reshape(-1, _NOUT), outputs=("entropy",), num_classes=num_classes
    ).entropy
    term = np.where(r != 0, r * np.asarray(ent, np.float64), 0.0)  # (all -inf: log C, finite)
    if np.ndim(loss):
        rows = np.asarray(loss, np.float64)
        return rows - ec * term.reshape(rows.shape)
    return np.float64(loss) - ec * float(term.sum())


def _vp_stats_loss(
    x: np.ndarray, a: _VPArgs, names: Optional[Tuple[str, ...]] = None
) -> Tuple[Any, np.ndarray, Optional[np.ndarray]]:
    """(loss, merged statistics, merged output statistics or None without names); with
    a.entropy_coef the output statistics always (the entropies asked for internally) and the
    loss with the entropy bonus."""
    if a.entropy_coef and "entropy" not in (names or ()):
        names = tuple(names or ()) + ("entropy",)
    res = _shard.shard_stats(
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
        outputs=names,
    )
    st, ost = (res, None) if names is None else res
    rows_shape = st.shape[:-1]
    mo = None
    if ost is None:
        merged = all_reduce_stats(st.reshape(-1, _NSTAT), a.group).reshape(st.shape)
    else:
        m2, mo = all_reduce_with_outputs(st.reshape(-1, _NSTAT), ost.reshape(-1, _NOUT), a.group)
        merged = m2.reshape(st.shape)
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
    if a.entropy_coef and mo is not None:
        r = _entropy_weights_of(a, merged)
        loss = entropy_term(loss, mo, r, a.entropy_coef, a.num_classes)
    return loss, merged, mo


def _entropy_weights_of(a: _VPArgs, merged: np.ndarray) -> np.ndarray:
    tgt = None if a.tgt.dtype.kind == "f" else a.tgt
    return entropy_weights(merged, tgt, a.ignore_index, a.sample_weight, a.reduction, a.normalizer)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: shard statistics, two all-reduces, the loss; backward: this rank's gradient
    from its logits and the merged statistics (fastxent.shard_grad), no communication."""

    @staticmethod
    def forward(ctx, input: Tensor, a: _VPArgs, *saved: Tensor) -> Tensor:
        loss, merged, _ = _vp_stats_loss(numpy_of(input, a.cdt), a)
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
    def _backward(ctx, grad_output: Tensor, cast: bool = True):
        """(the gradient of the logits, None, ...); cast=False: in the compute dtype (float32
        for 16-bit logits), to be summed with another before one rounding."""
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
        if cast and grad.dtype != input.dtype:
            grad = grad.to(input.dtype)
        if post is not None:
            grad = grad * post
        return (grad, None) + (None,) * (len(ctx.saved_tensors) - 1)


_FLOATS = FLOAT_OUTPUTS  # differentiable with respect to local_logits; argmax, accuracy not


def _stats_vjp_local(
    x: Tensor,
    tgt: Any,
    offset: int,
    ignore_index: int,
    softcap: Optional[float],
    logit_scale: float,
    mo: np.ndarray,
    grads: Dict[str, Tensor],
) -> Tensor:
    """sum_k <grads[k], d stat_k / d local_logits> for the float statistics of whole rows,
    from this rank's logits and the merged output statistics, without communication: with
    p = exp(z' - lse) (this rank's columns of the row's softmax) and zbar = lse - entropy,
    d lse / dz'_c = p_c, d entropy / dz'_c = -p_c (z'_c - zbar) (0 where p_c = 0),
    d target_logprob / dz'_c = [c == y] - p_c (counted rows), times dz'/dz. Rows of all -inf
    and ignored rows' target_logprob have derivative 0 (the values are limits / constants),
    as fastxent.torch.cross_entropy's. float64 over tiles of rows (no (rows, C) temporary
    beyond the result). tgt: the rows' class targets (global indices; read for
    target_logprob only), offset: this rank's first class; softcap, logit_scale: the
    call's."""
    C_loc = x.shape[-1]
    z2 = x.detach().reshape(-1, C_loc)
    rows = z2.shape[0]
    mo_t = torch.from_numpy(mo.reshape(rows, _NOUT))
    M, S, H = mo_t[:, _O["max"]], mo_t[:, _O["sumexp"]], mo_t[:, _O["h"]]
    lse = M + torch.log(S)
    zbar = M + H / S  # sum_c p_c z'_c
    g = {k: v.reshape(-1).to(torch.float64) for k, v in grads.items()}
    y = None
    if "target_logprob" in g:
        y = torch.from_numpy(np.asarray(tgt).reshape(-1)) - offset
        counted = torch.from_numpy(np.asarray(tgt).reshape(-1) != ignore_index)
        g["target_logprob"] = torch.where(counted, g["target_logprob"], 0.0)
    dead = M == -np.inf  # a row of all -inf
    cap, alpha = softcap, float(logit_scale)
    out = torch.empty(z2.shape, dtype=torch.float64)
    tile = max(1, (1 << 20) // C_loc)
    for r0 in range(0, rows, tile):
        r1 = min(rows, r0 + tile)
        z = z2[r0:r1].to(torch.float64)
        if cap is not None:
            th = torch.tanh(alpha * z / cap)
            zp, dz = cap * th, alpha * (1.0 - th * th)
        else:
            zp, dz = alpha * z, (alpha if alpha != 1.0 else None)
        p = torch.exp(zp - lse[r0:r1, None])
        live = p > 0
        coef = torch.zeros(r1 - r0, dtype=torch.float64)
        if "lse" in g:
            coef = coef + g["lse"][r0:r1]
        if "target_logprob" in g:
            coef = coef - g["target_logprob"][r0:r1]
        gz = p * coef[:, None]
        if "entropy" in g:
            dev = torch.where(live, zp - zbar[r0:r1, None], 0.0)
            gz = gz - g["entropy"][r0:r1, None] * torch.where(live, p * dev, 0.0)
        if y is not None:
            yt = y[r0:r1]
            mine = (yt >= 0) & (yt < C_loc)
            idx = torch.nonzero(mine)[:, 0]
            gz[idx, yt[idx]] += g["target_logprob"][r0:r1][idx]
        if dz is not None:
            gz = gz * dz
        out[r0:r1] = torch.where(dead[r0:r1, None], 0.0, gz)
    return out.reshape(x.shape)


class _VocabParallelStats(torch.autograd.Function):
    """vocab_parallel_cross_entropy with outputs=: the loss and the float statistics of whole
    rows (three collectives in forward). Backward: the loss's gradient as
    _VocabParallelCrossEntropy's, plus the statistics' (_stats_vjp_local), both local: no
    communication. No second order, no forward mode."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, input: Tensor, a: _VPArgs, names: Tuple[str, ...], side: Dict[str, Any], *saved
    ):
        ctx.set_materialize_grads(False)
        loss, merged, mo = _vp_stats_loss(numpy_of(input, a.cdt), a, names)
        ctx.save_for_backward(input, *saved)
        ctx.a, ctx.merged, ctx.mo = a, merged, mo
        ctx.float_names = tuple(n for n in _FLOATS if n in names)
        st = _row_stats_of(mo, a, names, input.shape[:-1])
        side["stats"] = st
        outs = [torch.from_numpy(np.asarray(getattr(st, n))) for n in ctx.float_names]
        return (loss_tensor(loss, input.dtype), *outs)

    @staticmethod
    def backward(ctx, grad_loss: Optional[Tensor], *grad_stats: Optional[Tensor]):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "vocab_parallel_cross_entropy(outputs=...) has no second-order derivative "
                "(backward with create_graph=True); its gradients are computed outside the "
                "autograd graph"
            )
        input = ctx.saved_tensors[0]
        rest = (None, None, None) + (None,) * (len(ctx.saved_tensors) - 1)
        gz: Optional[Tensor] = None
        with torch.no_grad():
            if grad_loss is not None:
                gz = _VocabParallelCrossEntropy._backward(ctx, grad_loss, cast=False)[0]
            gs = {n: g for n, g in zip(ctx.float_names, grad_stats) if g is not None}
            a = ctx.a
            if a.entropy_coef and grad_loss is not None:
                # the entropy bonus: d loss / d entropy_n = -ec * r_n, times the upstream
                r = torch.from_numpy(_entropy_weights_of(a, ctx.merged))
                go = grad_loss.detach().to(torch.float64).reshape(-1)
                ent = -a.entropy_coef * r * go
                gs["entropy"] = ent + gs["entropy"].reshape(-1) if "entropy" in gs else ent
            if gs:
                gv = _stats_vjp_local(
                    input, a.tgt, a.offset, a.ignore_index, a.softcap, a.logit_scale, ctx.mo, gs
                )
                gz = gv if gz is None else gv + gz.to(torch.float64)
            if gz is not None:
                gz = gz.to(input.dtype)  # one rounding (16-bit logits: of the float32 sum)
        return (gz,) + rest

    @staticmethod
    def jvp(ctx, *_: Any) -> Any:
        raise NotImplementedError(
            "vocab_parallel_cross_entropy(outputs=...) has no forward-mode derivative"
        )


def _row_stats_of(mo: np.ndarray, a: _VPArgs, names: Tuple[str, ...], rows: Any):
    """The RowStats (NumPy) of merged output statistics, floats in the compute dtype."""
    return _shard.outputs_from_stats(
        mo.reshape(tuple(rows) + (_NOUT,)),
        None if a.tgt.dtype.kind == "f" else a.tgt,
        outputs=names,
        num_classes=a.num_classes,
        ignore_index=a.ignore_index,
        dtype=np.float64 if a.cdt == torch.float64 else np.float32,
    )


def _vp_with_outputs(x: Tensor, a: _VPArgs, names: Tuple[str, ...], saved: List[Tensor]):
    """(loss, RowStats of tensors): lse, entropy and target_logprob differentiable with
    respect to x where it requires grad."""
    if x.requires_grad and torch.is_grad_enabled():
        side: Dict[str, Any] = {}
        res = _VocabParallelStats.apply(x, a, names, side, *saved)
        loss, floats, st = res[0], list(res[1:]), side["stats"]
    else:
        lv, _, mo = _vp_stats_loss(numpy_of(x, a.cdt), a, names)
        st = _row_stats_of(mo, a, names, x.shape[:-1])
        loss = loss_tensor(lv, x.dtype)
        floats = [torch.from_numpy(np.asarray(getattr(st, n))) for n in _FLOATS if n in names]
    return _row_stats(loss, floats, st, names, tuple(x.shape[:-1]))


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
    outputs: Optional[Sequence[str]] = None,
    entropy_coef: Any = 0.0,
    **kw: Unpack[ExtraKeywords],
) -> Any:
    extra = EXTRA.bind("vocab_parallel_cross_entropy", kw)
    refuse_option_derivatives({"entropy_coef": entropy_coef}, "vocab_parallel_cross_entropy")
    ec = real(entropy_coef, "entropy_coef", 0.0, False)
    names = None if outputs is None else output_names(outputs)
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
        entropy_coef=ec,
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
    saved = [t for t in (target, weight, sample_weight) if isinstance(t, Tensor)]
    if names is not None:
        if tgt.dtype.kind == "f":
            bad = [n for n in names if n in ("target_logprob", "accuracy")]
            if bad:  # (also raised by shard_stats; here before any collective)
                raise ValueError(f"outputs {bad} need class-index targets, not probabilities")
        return _vp_with_outputs(local_logits, a, names, saved)
    if a.entropy_coef:  # the statistics' path, with no outputs returned
        return _vp_with_outputs(local_logits, a, (), saved)[0]
    if not (local_logits.requires_grad and torch.is_grad_enabled()):
        loss, _, _ = _vp_stats_loss(numpy_of(local_logits, cdt), a)
        return loss_tensor(loss, local_logits.dtype)
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
    outputs : tuple of names, keyword-only, optional
        Per-row outputs of the whole rows, as :func:`cross_entropy`'s ``outputs=``
        (``"lse"``, ``"entropy"``, ``"argmax"``, ``"target_logprob"``, ``"accuracy"``;
        the last two need class targets), from the same pass over the slice
        (:func:`fastxent.shard_stats` with ``outputs``) and one more collective (an
        ``all_reduce`` MIN of the argmax index; the row maxima, NaN flags and sums ride in the
        loss's two). The same on every rank. lse, entropy and target_logprob (the rows'
        shape, float64 for float64 logits, else float32) are differentiable with respect to
        ``local_logits``: backward computes their derivative from this rank's slice and the
        merged statistics, with no communication. argmax (global class indices, int64) and
        accuracy (a float) are not differentiable.
    entropy_coef : float >= 0, keyword-only
        The entropy bonus of :func:`cross_entropy`: the loss becomes ``CE - entropy_coef *
        reduce(s_n entropy_n)`` over counted rows (sample weights, no class weights; the
        loss's reduction and denominator), the entropies from the same collectives as
        ``outputs`` (asked for internally), the gradient through the entropies' derivative
        (no more communication). Every rank must pass the same value.

    Returns
    -------
    Tensor of ``local_logits``' dtype, the same on every rank: a scalar, or the rows' shape
    for ``"none"``; with ``outputs``, ``(loss, RowStats)`` (the fields not asked for None).
    Differentiable with respect to ``local_logits`` only (as :func:`cross_entropy`); call
    ``backward`` on every rank (no collective runs in it, so ranks may also backpropagate at
    different times).

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
