"""The plan of the fused linear + cross-entropy (fastxent._linear): the argument checks
shared by the NumPy, PyTorch and JAX front ends (:func:`make_plan`, :func:`shape_checks`,
:func:`class_targets`, :func:`check_options`: everything, every class index included, is
checked before the first byte of an out= buffer is written), the global "mean" denominator
and the rows per logits tile (:func:`tile_rows`), or the classes per tile of a forward pass
alone in tiles of the vocabulary (:func:`tile_cols`). Re-exported by fastxent._linear, whose
tile loop runs the plan.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

from ._api import cross_entropy

# Bytes of the reused logits tile (and at most 1/6 of the whole logits, 2/9 where it is the
# only tile (_FORWARD_SHARE), so that the memory beyond inputs and gradients stays under 1/4
# of the logits); the tile has at least _MIN_ROWS rows so that the matmuls keep the BLAS
# efficient. Larger tiles read the weight
# fewer times (once per tile per matmul).
TILE_BYTES = 64 << 20
_MIN_ROWS = 16
# Rows per tile are rounded down to a multiple of this: oneDNN's bfloat16 GEMM (PyTorch on a
# Zen 4, 2 threads) took 25-50% longer for a tile of 682 rows (the byte budget's count at
# 4096 x 32000) than for 672 or 683 rows, for X.W^T and for G.W; multiples of 32 were never
# slow in that scan (256 to 4096 rows).
_ROUND_ROWS = 32
# Where TILE_BYTES holds fewer rows than this (long rows: V * itemsize > 128 KiB), the tile
# grows towards this many rows within the 1/6-of-the-logits bound: each tile's product makes
# the BLAS pack the whole weight again. Measured (PyTorch 2.13 on a Zen 4, 2 threads, X.W^T
# at 2048 x 2048 x 128256 float32, in tiles): 128 rows 9.2-9.7 s, 320 rows 7.1 s, 512 rows
# 6.3 s, the whole product 6.2 s.
_GROW_ROWS = 512
# A forward pass alone (no gradient: nothing but the logits tile and O(n) beyond the inputs)
# grows its tile within 2/9 (1/4.5) of the logits instead of 1/6: at 2048 x 128256 float32,
# 448 rows instead of 320, fewer repacks of the weight (see _GROW_ROWS) while staying under
# 1/4. Measured there (the forward pass, PyTorch 2.13 on a Zen 4, 2 threads, one process):
# 320 rows 6.77 s, 448 rows 6.56 s, 512 rows 6.32 s, the whole product alone 5.72 s.
# So does a forward and backward pass of float32 / float64 inputs, whose gradient tile is the
# logits tile itself (overwritten in place, fed to both gradient matmuls: no second tile, as
# 16-bit inputs have in their rounded copy). Measured there (fastxent.torch's forward and
# backward, same machine, 3 interleaved rounds, medians, over the three matmuls alone):
# 320 rows 1.12x, 448 rows 1.07x.
_FORWARD_SHARE = (2, 9)
# A forward pass alone over fewer rows than classes (float32 / float64 inputs, default tile)
# takes tiles of the vocabulary instead: all the rows times a slice of the classes, each
# slice's statistics merged as the vocabulary-sharded path merges shards (fastxent._shard).
# Each tile's product then packs the hidden states again instead of the weight: with tiles
# of the same bytes, the number of repacks is the same, and the hidden states (n x h) are
# the smaller of the two when n < v. Measured (PyTorch 2.13 on a Zen 4, 2 threads, the
# products alone, medians of 5): 2048 x 2048 x 128256 whole 5.8 s, 448 rows 6.9 s, 8192
# columns 5.8-6.0 s; 4096 x 1024 x 32000 whole 1.87 s, 512 rows 2.17 s, 4096 columns 1.76 s;
# 16384 x 512 x 32000 whole 3.6 s, 512 rows 4.3 s, 1024 columns 3.8 s. Columns per tile:
# TILE_BYTES over the rows, at least _MIN_COLS (the tile grows for that, within 2/9 of the
# logits; beyond that, rows), rounded down to a multiple of _ROUND_COLS.
_MIN_COLS = 512
_ROUND_COLS = 128

_OPTION_NAMES = (
    "weight",
    "ignore_index",
    "label_smoothing",
    "sample_weight",
    "z_loss",
    "softcap",
    "logit_scale",
    "normalizer",
    "num_threads",
)


def _is_half(dt: np.dtype) -> bool:
    return dt == np.float16 or (dt.itemsize == 2 and dt.name == "bfloat16")


class _Plan(NamedTuple):
    lead: Tuple[int, ...]  # hidden.shape[:-1]: the rows' shape
    n: int  # rows
    h: int  # hidden size
    v: int  # vocabulary (classes)
    cdt: np.dtype  # dtype of the losses and kernel weights
    target: Optional[np.ndarray]  # (n,) int64 class indices, or None
    probs: Any  # (n, v) probability targets (any array fastxent reads)
    sample_weight: Optional[np.ndarray]  # (n,) in cdt, or None
    kw: dict  # fastxent keywords shared by every tile
    reduction: str
    denominator: float  # D of "mean" (1.0 otherwise)
    tile: int
    outputs: Optional[Tuple[str, ...]] = None  # outputs= (checked names), or None
    cols: int = 0  # > 0: a forward pass alone in tiles of all rows x `cols` classes


def tile_shape(plan: _Plan) -> Tuple[int, int]:
    """The shape of the plan's reused logits tile: (n, cols) for tiles of the vocabulary,
    else (rows per tile, v)."""
    return (plan.n, plan.cols) if plan.cols else (plan.tile, plan.v)


def tile_cols(n: int, v: int, itemsize: int, rows: int) -> int:
    """Classes per tile of a forward pass alone in tiles of the vocabulary (see _MIN_COLS):
    TILE_BYTES over the rows, at least _MIN_COLS, at most 2/9 of the classes, rounded down to
    a multiple of _ROUND_COLS. 0 (tiles of rows) where the row tiles (`rows` rows each) hold
    every row already, where there are at least as many rows as classes, or where 2/9 of
    the classes are fewer than _MIN_COLS."""
    if rows >= n or n >= v:
        return 0
    num, den = _FORWARD_SHARE
    cols = min(max(_MIN_COLS, TILE_BYTES // (n * itemsize)), v * num // den)
    if cols < _MIN_COLS:
        return 0
    return cols - cols % _ROUND_COLS if cols > _ROUND_COLS else cols


def tile_rows(
    n: int,
    v: int,
    itemsize: int,
    tile: Optional[int] = None,
    forward_only: bool = False,
    one_tile: bool = False,
) -> int:
    """Rows per logits tile: `tile` when given, else TILE_BYTES (at most 1/6 of the
    logits; 2/9 for a forward pass alone, or `one_tile`: float32 / float64 inputs, whose
    gradient tile is the logits tile; at least _MIN_ROWS rows; up to _GROW_ROWS rows for
    long rows) divided by a row's bytes, rounded down to a multiple of _ROUND_ROWS."""
    if tile is not None:
        try:
            t = operator.index(tile)
        except TypeError:
            raise TypeError("tile_rows must be None or a positive integer") from None
        if t < 1:
            raise ValueError(f"tile_rows must be >= 1, got {tile}")
        return max(1, min(t, n))
    row = max(1, v * itemsize)
    # TILE_BYTES, or up to _GROW_ROWS rows where that holds fewer (long rows), at most 1/6
    # (forward only, or one tile: 2/9) of the logits either way.
    num, den = _FORWARD_SHARE if forward_only or one_tile else (1, 6)
    budget = min(max(TILE_BYTES, _GROW_ROWS * row), max(row, n * row * num // den))
    rows = budget // row
    if rows > _ROUND_ROWS:
        rows -= rows % _ROUND_ROWS
    return max(1, min(n, max(_MIN_ROWS, rows)))


def shape_checks(
    hshape: Tuple[int, ...],
    hdt: np.dtype,
    wshape: Tuple[int, ...],
    wdt: np.dtype,
    bshape: Optional[Tuple[int, ...]],
    bdt: Optional[np.dtype],
) -> None:
    if hdt not in (np.float32, np.float64) and not _is_half(hdt):
        raise TypeError(f"hidden must be float32, float64, float16 or bfloat16, got {hdt}")
    if len(hshape) == 0:
        raise ValueError("hidden must have at least one dimension (the hidden axis)")
    if len(wshape) != 2:
        raise ValueError(f"linear_weight must have shape (V, H), got {wshape}")
    if wdt != hdt:
        raise TypeError(f"linear_weight has dtype {wdt}, expected {hdt} (hidden's dtype)")
    if wshape[1] != hshape[-1]:
        raise ValueError(
            f"linear_weight has shape {wshape}, expected (V, {hshape[-1]}) "
            f"(hidden's last axis is H = {hshape[-1]})"
        )
    if wshape[0] == 0:
        raise ValueError("linear_weight has no rows (V = 0 classes)")
    if bshape is not None:
        if bdt != hdt:
            raise TypeError(f"linear_bias has dtype {bdt}, expected {hdt} (hidden's dtype)")
        if bshape != (wshape[0],):
            raise ValueError(f"linear_bias has shape {bshape}, expected ({wshape[0]},)")


def class_targets(t: np.ndarray, lead: Tuple[int, ...], v: int, ii: int) -> np.ndarray:
    if t.dtype.kind not in "iu":
        raise TypeError(
            f"target must hold integer class indices (shape {lead}) or float "
            f"class probabilities (shape {lead + (v,)}), got dtype {t.dtype}"
        )
    if t.shape != lead:
        raise ValueError(
            f"target has shape {t.shape}, expected {lead} (hidden's shape without its last axis)"
        )
    flat = t.reshape(-1)
    big = t.dtype == np.uint64 and flat.size and int(flat.max()) > np.iinfo(np.int64).max
    ti = flat.astype(object) if big else flat.astype(np.int64, copy=False)
    bad = np.flatnonzero((ti != ii) & ((ti < 0) | (ti >= v)))
    if bad.size:
        i = int(bad[0])
        raise IndexError(
            f"target[{i}] (flattened) = {flat[i]} is out of range: class "
            f"indices must be in [0, {v}) or equal ignore_index ({ii})"
        )
    return np.ascontiguousarray(ti, dtype=np.int64)


def check_options(
    v: int,
    cdt: np.dtype,
    target_is_probs: bool,
    reduction: Any,
    kw: dict,
    has_sample_weight: bool,
    outputs: Any = None,
) -> None:
    """fastxent checks every option (and the class weights' shape) on an empty stand-in;
    kw holds the keywords of _OPTION_NAMES but sample_weight (and entropy_coef where given);
    outputs, the outputs= names (None: none)."""
    stand_in = np.zeros((0, v), cdt)
    cross_entropy(
        stand_in,
        stand_in if target_is_probs else np.zeros(0, np.int64),
        reduction=reduction,
        sample_weight=np.zeros(0, cdt) if has_sample_weight else None,
        **({} if outputs is None else {"outputs": outputs}),
        **kw,
    )


def make_plan(
    hshape: Tuple[int, ...],
    hdt: np.dtype,
    wshape: Tuple[int, ...],
    wdt: np.dtype,
    bshape: Optional[Tuple[int, ...]],
    bdt: Optional[np.dtype],
    target: Any,
    target_shape: Tuple[int, ...],
    target_is_probs: bool,
    reduction: Any,
    options: dict,
    tile: Optional[int],
    tile_itemsize: int,
    forward_only: bool = False,
) -> _Plan:
    """Checks everything and returns the plan. `target` is a NumPy array of class indices,
    or (probabilities) any array fastxent accepts as a target, of shape `target_shape`;
    forward_only: no gradient will be computed (a larger default tile, see tile_rows)."""
    shape_checks(hshape, hdt, wshape, wdt, bshape, bdt)
    lead, h, v = tuple(hshape[:-1]), hshape[-1], wshape[0]
    n = math.prod(lead)
    cdt = np.dtype(np.float64) if hdt == np.float64 else np.dtype(np.float32)
    kw = {k: options[k] for k in _OPTION_NAMES}
    # entropy_coef (the front ends that take it): passed to every tile unless a plain 0.
    ec = options.get("entropy_coef", 0.0)
    if not (type(ec) in (int, float) and ec == 0):
        kw["entropy_coef"] = ec
    outputs = options.get("outputs")
    ii = kw["ignore_index"]
    sw = kw.pop("sample_weight")
    if sw is not None:
        sw = np.asarray(sw)
        if sw.dtype.kind not in "fiu" and not _is_half(sw.dtype):
            raise TypeError(f"sample_weight must be numeric, got dtype {sw.dtype}")
        if sw.shape != lead:
            raise ValueError(f"sample_weight has shape {sw.shape}, expected {lead} (one per row)")
        sw = np.ascontiguousarray(sw, dtype=cdt).reshape(-1)
    if target_is_probs:
        if tuple(target_shape) != lead + (v,):
            raise ValueError(
                f"probability target has shape {tuple(target_shape)}, expected {lead + (v,)}"
            )
    check_options(v, cdt, target_is_probs, reduction, kw, sw is not None, outputs)
    if outputs is not None:
        outputs = tuple(outputs)
    tgt = None if target_is_probs else class_targets(np.asarray(target), lead, v, ii)
    if kw["weight"] is not None:
        kw["weight"] = np.ascontiguousarray(np.asarray(kw["weight"]), dtype=cdt)
    one_tile = hdt in (np.float32, np.float64)
    tile_r = tile_rows(max(n, 1), v, tile_itemsize, tile, forward_only, one_tile)
    # Tiles of the vocabulary: a forward pass alone at the default tile, float32 / float64
    # (16-bit logits tiles are read in place by the kernel, which the shard statistics do
    # not take), and no entropy_coef (its entropy term comes from the row kernel).
    vocab = forward_only and tile is None and not _is_half(hdt) and "entropy_coef" not in kw
    cols = tile_cols(n, v, tile_itemsize, tile_r) if vocab else 0
    d = 1.0
    if reduction == "mean":
        if kw["normalizer"] is not None:
            d = float(kw["normalizer"])
        elif tgt is not None:
            counted = tgt != ii
            per_row = np.ones(n) if sw is None else sw.astype(np.float64)
            if kw["weight"] is not None:
                per_row = per_row * kw["weight"].astype(np.float64)[np.where(counted, tgt, 0)]
            d = float(np.sum(per_row, where=counted))
        else:
            d = float(n) if sw is None else float(np.sum(sw, dtype=np.float64))
        if not (math.isfinite(d) and d >= 0.0):  # before any tile (each tile would refuse it)
            raise ValueError(
                f'the "mean" denominator of this batch (the counted rows\' sample weights times '
                f"their class weights) is {d}, but it must be finite and >= 0: pass normalizer= "
                f'or use reduction="sum"'
            )
    return _Plan(
        lead,
        n,
        h,
        v,
        cdt,
        tgt,
        target if target_is_probs else None,
        sw,
        kw,
        reduction,
        d,
        tile_r,
        outputs,
        cols,
    )
