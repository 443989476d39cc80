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

Per-row outputs of whole rows (``outputs=`` of :func:`fastxent.cross_entropy`) come from the
same pass: ``shard_stats(..., outputs=names)`` also returns output statistics (rows_shape +
(8,), fields :data:`OUTPUT_STAT_FIELDS`), merged by :func:`merge_output_stats` and finished by
:func:`outputs_from_stats` (lse, entropy, argmax, target_logprob, accuracy).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._api import RowStats, _row_stats
from ._keywords import LOSS, SHARD, LossKeywords, ShardKeywords, Unpack, output_names
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
    "OUTPUT_STAT_FIELDS",
    "merge_output_stats",
    "outputs_from_stats",
]

#: The fields of the last axis of shard statistics, in order.
STAT_FIELDS: Tuple[str, ...] = ("max", "sumexp", "q", "qz", "wy", "count", "columns")
assert len(STAT_FIELDS) == _core.STAT_FIELDS

#: The fields of the last axis of output statistics (``shard_stats(..., outputs=...)``).
OUTPUT_STAT_FIELDS: Tuple[str, ...] = (
    "max",
    "sumexp",
    "h",
    "nan",
    "argval",
    "argidx",
    "zy",
    "columns",
)
assert len(OUTPUT_STAT_FIELDS) == _core.OUT_FIELDS


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
    logits: Any,
    target: Any,
    *,
    offset: int,
    num_classes: int,
    outputs: Optional[Sequence[str]] = None,
    **kw: Unpack[ShardKeywords],
) -> Any:
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
    outputs : tuple of names, optional
        Per-row outputs of the whole row, as :func:`fastxent.cross_entropy`'s ``outputs=``
        (``"lse"``, ``"entropy"``, ``"argmax"``, ``"target_logprob"``, ``"accuracy"``):
        also return this shard's output statistics, from the same pass. Merge them with
        :func:`merge_output_stats` and finish with :func:`outputs_from_stats`.

    Returns
    -------
    float64 array of shape ``logits.shape[:-1] + (7,)``; fields :data:`STAT_FIELDS`. With
    ``outputs``: ``(stats, output_stats)``, the second of shape ``logits.shape[:-1] + (8,)``,
    fields :data:`OUTPUT_STAT_FIELDS` (computed for every row, ignored ones too).
    """
    o = SHARD.bind("shard_stats", kw)
    names = None if outputs is None else output_names(outputs)
    a = _shard_args(logits, target, offset, num_classes, o)
    if names is not None and a["probs"] is not None:
        bad = [n for n in names if n in ("target_logprob", "accuracy")]
        if bad:
            raise ValueError(f"outputs {bad} need class-index targets, not probabilities")
    rows = a["view"].shape[0]
    out = np.empty((rows, len(STAT_FIELDS)), np.float64)
    outs = None if names is None else np.empty((rows, len(OUTPUT_STAT_FIELDS)), np.float64)
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
        outs,
    )
    st = out.reshape(a["rows_shape"] + (len(STAT_FIELDS),))
    if outs is None:
        return st
    return st, outs.reshape(a["rows_shape"] + (len(OUTPUT_STAT_FIELDS),))


def _as_output_stats(s: Any, name: str) -> np.ndarray:
    a = to_numpy(s, name)
    if a.ndim == 0 or a.shape[-1] != len(OUTPUT_STAT_FIELDS):
        raise ValueError(
            f"{name} must have shape (..., {len(OUTPUT_STAT_FIELDS)}) (output statistics of "
            f"shard_stats(..., outputs=...)), got {a.shape}"
        )
    if a.dtype != np.float64:
        raise TypeError(f"{name} must be a float64 array of output statistics, got {a.dtype}")
    return a


def merge_output_stats(*stats: Any) -> np.ndarray:
    """Merges the output statistics of shards of the same rows (any number, any order): the
    exponential sums as :func:`merge_stats`, the argmax by the larger value then the smaller
    index (a NaN row: its first NaN's index), the target logit and the column counts added.
    Commutative bit for bit; associative up to rounding of the sums (the argmax exactly).
    Returns a new float64 array."""
    if not stats:
        raise TypeError("merge_output_stats needs at least one array of output statistics")
    arrs = [_as_output_stats(s, f"stats[{i}]") for i, s in enumerate(stats)]
    return _merge(arrs, _core.merge_output_stats)


def _merge(arrs: List[np.ndarray], merge: Callable[[Any, Any, Any], None]) -> np.ndarray:
    """The checked arrays of statistics (one width) merged left to right by merge."""
    shape = arrs[0].shape
    for i, s in enumerate(arrs[1:], 1):
        if s.shape != shape:
            raise ValueError(f"stats[{i}] has shape {s.shape}, expected {shape} (the same rows)")
    flat = [np.ascontiguousarray(s).reshape(-1, shape[-1]) for s in arrs]
    out = flat[0].copy()
    for s in flat[1:]:
        merge(out, s, out)
    return out.reshape(shape)


def outputs_from_stats(
    stats: Any,
    target: Any = None,
    *,
    outputs: Sequence[str] = ("lse", "entropy", "argmax", "target_logprob", "accuracy"),
    num_classes: Optional[int] = None,
    ignore_index: int = -100,
    dtype: Any = np.float64,
) -> RowStats:
    """The per-row outputs of whole rows from merged output statistics (no logits needed), as
    :func:`fastxent.cross_entropy`'s ``outputs=`` returns them: ``lse = max + log(sumexp)``,
    ``entropy = log(sumexp) - h / sumexp``, ``target_logprob = (zy - max) - log(sumexp)``
    (0 for an ignored row), the argmax (int64) and the accuracy over counted rows. A row of
    all -inf gives lse -inf, entropy log C, target_logprob -inf and argmax 0; a NaN row NaN.

    ``target`` (the class targets, global indices) is needed for target_logprob and
    accuracy, with the ``ignore_index`` the shards were given (a row whose target equals it
    counts nowhere). Given ``num_classes``, checks that every row's statistics cover exactly
    that many columns (every shard merged once). Merged across processes without
    merge_output_stats (an all-reduce), the argmax needs its own rule: the largest
    ``argval`` (a row holding NaN, ``nan`` = 1, wins), then the smallest ``argidx``, as
    fastxent.torch.vocab_parallel_cross_entropy does. ``dtype``: float64 (default) or float32, the
    type of lse, entropy and target_logprob (the one-machine call returns the logits')."""
    names = output_names(outputs)
    ii = index(ignore_index, "ignore_index")
    st = _as_output_stats(stats, "stats")
    rows_shape = st.shape[:-1]
    f = {n: st[..., i] for i, n in enumerate(OUTPUT_STAT_FIELDS)}
    if num_classes is not None:
        C = index(num_classes, "num_classes")
        if C < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        bad = np.flatnonzero(f["columns"].reshape(-1) != C)
        if bad.size:
            raise ValueError(
                f"output statistics of row {int(bad[0])} cover {f['columns'].reshape(-1)[bad[0]]}"
                f" columns, not num_classes = {C}: merge those of every shard, once each"
            )
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    if "argmax" in names or "accuracy" in names:
        idx = f["argidx"]
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(~((idx >= 0) & (idx < f["columns"]) & (idx == np.floor(idx))))
        if bad.size:
            raise ValueError(
                f"output statistics of row {int(bad[0])} hold the argmax index "
                f"{idx.reshape(-1)[bad[0]]}, not a class index in [0, columns): merge the "
                f"output statistics of shard_stats of every shard, once each"
            )
    t = None
    if "target_logprob" in names or "accuracy" in names:
        if target is None:
            raise ValueError("outputs target_logprob and accuracy need the class targets")
        C_t = int(np.max(f["columns"], initial=0)) if num_classes is None else C
        tg = to_numpy(target, "target")
        t = as_target(tg, rows_shape, C_t, ii)
        if np.any((t != ii) & ((t < 0) | (t >= C_t))):
            raise_bad_target(tg, C_t, ii)
    M, S, H = f["max"], f["sumexp"], f["h"]
    with np.errstate(divide="ignore", invalid="ignore"):
        nan = np.isnan(M) | np.isnan(S)
        degen = ~nan & (M == -np.inf)
        logS = np.log(np.where(degen, 1.0, S))
        outs: Dict[str, np.ndarray] = {}
        if "lse" in names:
            outs["lse"] = np.where(nan, np.nan, np.where(degen, -np.inf, M + logS))
        if "entropy" in names:
            ent = logS - H / np.where(degen, 1.0, S)
            outs["entropy"] = np.where(nan, np.nan, np.where(degen, np.log(f["columns"]), ent))
        if "target_logprob" in names:
            tl = np.where(nan, np.nan, np.where(degen, -np.inf, (f["zy"] - M) - logS))
            outs["target_logprob"] = np.where(t.reshape(rows_shape) == ii, 0.0, tl)
    with np.errstate(over="ignore"):  # float32: beyond its range is +-inf, as the kernel's
        outs = {n: v.astype(dt).reshape(-1) for n, v in outs.items()}
    if "argmax" in names or "accuracy" in names:
        outs["argmax"] = f["argidx"].reshape(-1).astype(np.int64)
    return _row_stats(names, outs, t, ii, rows_shape)


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
    return _merge(arrs, _core.merge_stats)


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
