"""Vocabulary-sharded cross-entropy: per-shard statistics, their merge, the loss from merged
statistics, and each shard's gradient (the C++ core, fastxent/shard.hpp).

A shard is columns ``[offset, offset + C_shard)`` of a vocabulary of ``num_classes`` classes,
for every row. The three steps reproduce the one-machine kernel::

    st = [shard_stats(x_r, target, offset=o_r, num_classes=C) for each shard r]
    merged = merge_stats(*st)                      # or an all-reduce (see below)
    loss = loss_from_stats(merged)                 # no logits needed
    g_r = shard_grad(x_r, target, merged, offset=o_r, num_classes=C)   # local, one pass

Statistics are float64 arrays of shape ``rows_shape + (7,)``, fields :data:`STAT_FIELDS`:
``max`` (of the shard's transformed logits z'; with a softcap of at most 32 in float32 or 256
in float64 it is 0 instead, a reference point the kernel shifts by since z' is bounded by the
cap: any reference point merges the same way), ``sumexp`` (sum of exp(z' - max)), ``q`` (sum
of the soft target u over the shard's columns), ``qz`` (sum of u z'), ``wy`` (the row's share
of the "mean" denominator, from the shard owning its target), ``count`` (1 in the shard that
counts the row), ``columns`` (how many columns the statistics cover). An all-reduce merges
them as: M = max over shards of ``max``; then the sum over shards of
``sumexp * exp(max - M)`` and of the five other fields (Megatron's scheme).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from . import _core
from ._keywords import LOSS, SHARD, LossKeywords, ShardKeywords, Unpack
from ._options import (
    LossOptions,
    as_target,
    as_vector,
    check_out,
    index,
    raise_bad_target,
    real,
    reduction_code,
    rows_view,
    to_numpy,
)

__all__ = [
    "STAT_FIELDS",
    "shard_stats",
    "merge_stats",
    "loss_from_stats",
    "shard_grad",
    "stats_denominator",
]

#: The fields of the last axis of shard statistics, in order.
STAT_FIELDS: Tuple[str, ...] = ("max", "sumexp", "q", "qz", "wy", "count", "columns")
assert len(STAT_FIELDS) == _core.STAT_FIELDS


def _shard_args(logits: Any, target: Any, offset: Any, num_classes: Any, o: Dict[str, Any]):
    """The checked arguments of a shard function; o: its bound keywords (SHARD's or LOSS's:
    "mean" without a reduction)."""
    x = to_numpy(logits, "logits")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"shard logits must be float32 or float64, got {x.dtype} (convert "
            f"16-bit shards to float32 first)"
        )
    if x.ndim == 0:
        raise ValueError("logits must have at least one dimension (the class axis, last)")
    Cs = x.shape[-1]
    if Cs == 0:
        raise ValueError("the shard has no classes (C_shard = 0)")
    off = index(offset, "offset")
    C = index(num_classes, "num_classes")
    if off < 0 or C < 1 or off + Cs > C:
        raise ValueError(
            f"the shard [offset, offset + C_shard) = [{off}, {off + Cs}) does not "
            f"fit in num_classes = {C}"
        )
    # The checks in LossOptions.from_keywords's order; z_loss and normalizer act on merged
    # statistics (shard_grad adds them).
    opts = LossOptions.from_keywords(
        o.get("reduction", "mean"),
        o["ignore_index"],
        o["label_smoothing"],
        softcap=o["softcap"],
        logit_scale=o["logit_scale"],
        num_threads=o["num_threads"],
    )
    ii = opts.ignore_index
    rows_shape = x.shape[:-1]
    tgt = to_numpy(target, "target")
    t = probs = None
    if tgt.dtype.kind == "f" and tgt.ndim == x.ndim:
        if tgt.shape != x.shape:
            raise ValueError(
                f"probability target has shape {tgt.shape}, expected the shard "
                f"logits' shape {x.shape}"
            )
        if ii != -100:
            raise ValueError("ignore_index applies to class-index targets only")
        probs = rows_view(tgt if tgt.dtype == x.dtype else tgt.astype(x.dtype))
    else:
        t = as_target(tgt, rows_shape, C, ii)
    w = as_vector(o["weight"], x.dtype, (Cs,), "weight", "the shard's classes")
    return dict(
        x=x,
        view=rows_view(x),
        t=t,
        probs=probs,
        w=w,
        off=off,
        C=C,
        ii=ii,
        opts=opts,
        rows_shape=rows_shape,
        tgt=tgt,
    )


def _call(fn, a, *args):
    try:
        return fn(*args)
    except IndexError:
        if a["t"] is not None:
            raise_bad_target(a["tgt"], a["C"], a["ii"])
        raise


@SHARD
def shard_stats(
    logits: Any, target: Any, *, offset: int, num_classes: int, **kw: Unpack[ShardKeywords]
) -> np.ndarray:
    """Per-row statistics of one vocabulary shard, in one SIMD pass over its logits.

    Parameters
    ----------
    logits : array (..., C_shard), float32 or float64
        Columns ``[offset, offset + C_shard)`` of the full logits (class axis last).
    target : int array (...) of global class indices, or float array (..., C_shard)
        The class targets (the same full array on every shard), or this shard's columns of
        probability targets.
    offset, num_classes : int
        Where the shard starts in the vocabulary, and the vocabulary's size C (label
        smoothing uses eps / C of the whole vocabulary).
    weight : array (C_shard,), optional
        This shard's slice of the class weights.
    ignore_index, label_smoothing, softcap, logit_scale, num_threads
        As :func:`fastxent.cross_entropy` (the other options, z_loss, sample_weight,
        reduction and normalizer, act on merged statistics).

    Returns
    -------
    float64 array of shape ``logits.shape[:-1] + (7,)``; fields :data:`STAT_FIELDS`.
    """
    o = SHARD.bind("shard_stats", kw)
    a = _shard_args(logits, target, offset, num_classes, o)
    out = np.empty((a["view"].shape[0], len(STAT_FIELDS)), np.float64)
    _call(
        _core.shard_stats,
        a,
        a["view"],
        a["t"],
        a["probs"],
        a["w"],
        a["off"],
        a["C"],
        a["opts"].core(),
        out,
    )
    return out.reshape(a["rows_shape"] + (len(STAT_FIELDS),))


def _as_stats(s: Any, name: str) -> np.ndarray:
    a = to_numpy(s, name)
    if a.ndim == 0 or a.shape[-1] != len(STAT_FIELDS):
        raise ValueError(
            f"{name} must have shape (..., {len(STAT_FIELDS)}) (shard statistics), got {a.shape}"
        )
    if a.dtype != np.float64:  # float32 would round max and qz, float16 overflow them
        raise TypeError(f"{name} must be a float64 array of shard statistics, got {a.dtype}")
    return a


def merge_stats(*stats: Any) -> np.ndarray:
    """Merges the statistics of shards of the same rows (any number, any order): the row max
    (reference point) is the max, the exponential sums are rescaled to it and added, the other
    fields added.
    Commutative bit for bit; associative up to rounding. Returns a new float64 array."""
    if not stats:
        raise TypeError("merge_stats needs at least one array of statistics")
    arrs = [_as_stats(s, f"stats[{i}]") for i, s in enumerate(stats)]
    shape = arrs[0].shape
    for i, s in enumerate(arrs[1:], 1):
        if s.shape != shape:
            raise ValueError(f"stats[{i}] has shape {s.shape}, expected {shape} (the same rows)")
    flat = [np.ascontiguousarray(s, dtype=np.float64).reshape(-1, len(STAT_FIELDS)) for s in arrs]
    out = flat[0].copy()
    for s in flat[1:]:
        _core.merge_stats(out, s, out)
    return out.reshape(shape)


def _merged(stats: Any) -> Tuple[np.ndarray, Tuple[int, ...]]:
    st = _as_stats(stats, "stats")
    return (np.ascontiguousarray(st, dtype=np.float64).reshape(-1, len(STAT_FIELDS)), st.shape[:-1])


def stats_denominator(stats: Any, sample_weight: Any = None) -> float:
    """The "mean" denominator of merged statistics: the sum over counted rows of
    ``sample_weight * w[y]`` (``sample_weight`` for probability targets). Across row blocks
    (e.g. Dask chunks of rows) these add up."""
    st, rows_shape = _merged(stats)
    sw = as_vector(sample_weight, np.dtype(np.float64), rows_shape, "sample_weight", "one per row")
    return float(_core.stats_denominator(st, sw))


def loss_from_stats(
    stats: Any,
    *,
    reduction: str = "mean",
    sample_weight: Any = None,
    z_loss: float = 0.0,
    normalizer: Optional[float] = None,
    num_classes: Optional[int] = None,
) -> Union[np.ndarray, np.float64]:
    """The loss from merged statistics (no logits needed): per counted row
    ``s_n * (q * lse - qz + z_loss * lse**2)``, ``lse = max + log(sumexp)``, reduced as
    :func:`fastxent.cross_entropy` ("mean" divides by ``normalizer`` or by
    :func:`stats_denominator`). Given ``num_classes``, checks that every row's statistics cover
    exactly that many columns (every shard merged once). Returns a float64 scalar, or an array
    of the rows' shape for "none"."""
    red = reduction_code(reduction)
    st, rows_shape = _merged(stats)
    sw = as_vector(sample_weight, np.dtype(np.float64), rows_shape, "sample_weight", "one per row")
    lam = real(z_loss, "z_loss", 0.0, False)
    norm = None if normalizer is None else real(normalizer, "normalizer", 0.0, False)
    C = 0 if num_classes is None else index(num_classes, "num_classes")
    if num_classes is not None and C < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    rl = np.empty(st.shape[0], np.float64) if red == 0 else None
    opts = LossOptions(reduction=red, z_loss=lam, normalizer=norm)
    total = _core.stats_loss(st, sw, opts.core(), C, rl)
    return rl.reshape(rows_shape) if rl is not None else np.float64(total)


@LOSS
def shard_grad(
    logits: Any,
    target: Any,
    stats: Any,
    *,
    offset: int,
    num_classes: int,
    scale: float = 1.0,
    out: Any = None,
    **kw: Unpack[LossKeywords],
) -> np.ndarray:
    """The gradient of one shard's logits, from the merged statistics of the same rows: one
    local pass, no communication. The options must be those given to :func:`shard_stats`,
    plus the loss's ``z_loss``, ``reduction``, ``sample_weight`` and ``normalizer``. "mean"
    divides by ``normalizer``, or by :func:`stats_denominator` of ``stats`` (pass the global
    denominator as ``normalizer`` when ``stats`` holds only some of the rows). ``scale``
    multiplies the whole gradient (an upstream gradient). ``out=logits`` overwrites the shard
    in place. Returns the gradient (the logits' shape and dtype)."""
    o = LOSS.bind("shard_grad", kw)
    a = _shard_args(logits, target, offset, num_classes, o)
    x = a["x"]
    lam = real(o["z_loss"], "z_loss", 0.0, False)
    norm = None if o["normalizer"] is None else real(o["normalizer"], "normalizer", 0.0, False)
    try:
        sc = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}") from None
    if not np.isfinite(sc):
        raise ValueError(f"scale must be finite, got {scale!r}")
    st = _as_stats(stats, "stats")
    if st.shape[:-1] != a["rows_shape"]:
        raise ValueError(
            f"stats has shape {st.shape}, expected {a['rows_shape'] + (7,)} "
            f"(one row of statistics per row of logits)"
        )
    st2 = np.ascontiguousarray(st, dtype=np.float64).reshape(-1, len(STAT_FIELDS))
    sw = as_vector(o["sample_weight"], x.dtype, a["rows_shape"], "sample_weight", "one per row")
    if out is None:
        grad = np.empty(x.shape, x.dtype)
    else:
        grad = check_out(
            out, x, (("target", a["tgt"]), ("stats", st), ("weight", a["w"]), ("sample_weight", sw))
        )
    g2 = grad.reshape(a["view"].shape)
    opts = a["opts"]._replace(z_loss=lam, normalizer=norm)
    _call(
        _core.shard_grad,
        a,
        a["view"],
        a["t"],
        a["probs"],
        a["w"],
        st2,
        sw,
        a["off"],
        a["C"],
        opts.core(),
        sc,
        g2,
    )
    return grad
