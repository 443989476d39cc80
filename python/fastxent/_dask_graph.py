"""The Dask graph of fastxent.dask: the block tasks (statistics of one logits block, their
merge over column blocks, the "mean" denominator of a row chunk, the loss of a row chunk,
the gradient of one block) and the builders that wire them with ``da.blockwise`` and
``da.reduction`` over the arguments checked by fastxent.dask's ``_prepare``. The tasks are
module-level functions: Dask pickles them by reference, so worker processes import this
module. Imported by fastxent.dask.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _api, _shard
from ._options import half_kind, raise_bad_target

_STATS = len(_shard.STAT_FIELDS)
_OUTS = len(_shard.OUTPUT_STAT_FIELDS)


# ----------------------------------------------------------------------------- block tasks
# Module-level functions: tasks are pickled by reference, so worker processes import them.


def _compute_block(xb: np.ndarray) -> np.ndarray:
    """16-bit logits blocks are computed in float32 (as the one-machine kernel does)."""
    return xb.astype(np.float32) if half_kind(xb.dtype) is not None else xb


def _target_block(tb: np.ndarray, probs: bool, cdt: np.dtype) -> np.ndarray:
    return tb.astype(cdt) if probs and tb.dtype != cdt else tb


def _fastxent_shard_stats(
    xb: np.ndarray,
    tb: np.ndarray,
    cols: np.ndarray,
    wb: Optional[np.ndarray],
    *,
    probs: bool,
    opts: Dict[str, Any],
    outputs: Optional[Tuple[str, ...]] = None,
) -> np.ndarray:
    """(rows, 1, 7) statistics of one logits block (axis 1: its column block); with outputs,
    (rows, 1, 15): the output statistics after them, from the same pass."""
    x = _compute_block(xb)
    st = _shard.shard_stats(
        x,
        _target_block(tb, probs, x.dtype),
        offset=int(cols[0]),
        weight=wb,
        outputs=outputs,
        **opts,
    )
    if outputs is not None:
        st = np.concatenate(st, axis=-1)
    return st[:, None, :]


def _merge_keep(a: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    return a


def _fastxent_merge_stats(a: np.ndarray, axis: Any = None, keepdims: bool = True) -> np.ndarray:
    """Merges statistics (rows, k, 7) of k column blocks of the same rows; (rows, k, 15):
    the loss statistics and the output statistics after them, each by its own merge."""
    m = _shard.merge_stats(*[a[:, j, :_STATS] for j in range(a.shape[1])])
    if a.shape[-1] > _STATS:
        mo = _shard.merge_output_stats(*[a[:, j, _STATS:] for j in range(a.shape[1])])
        m = np.concatenate([m, mo], axis=-1)
    return m[:, None, :] if keepdims else m


def _fastxent_output(
    mb: np.ndarray,
    tb: Optional[np.ndarray],
    *,
    field: str,
    num_classes: int,
    ignore_index: int,
    out_dtype: np.dtype,
) -> np.ndarray:
    """One per-row output (lse, entropy, target_logprob, argmax) of a row chunk from its
    merged statistics (rows, 15); "accuracy": [hits, counted rows] of the chunk."""
    ost = np.ascontiguousarray(mb[:, _STATS:])
    if field == "accuracy":
        st = _shard.outputs_from_stats(
            ost, tb, outputs=("argmax",), num_classes=num_classes, ignore_index=ignore_index
        )
        counted = np.asarray(tb) != ignore_index
        hits = np.count_nonzero(counted & (st.argmax == np.asarray(tb)))
        return np.array([float(hits), float(np.count_nonzero(counted))])
    st = _shard.outputs_from_stats(
        ost,
        tb,
        outputs=(field,),
        num_classes=num_classes,
        ignore_index=ignore_index,
        dtype=out_dtype if field != "argmax" else np.float64,
    )
    return np.asarray(getattr(st, field))


def _fastxent_denominator(
    tb: Optional[np.ndarray],
    swb: Optional[np.ndarray],
    w: Optional[np.ndarray],
    *,
    ignore_index: int,
    num_classes: int,
) -> np.ndarray:
    """The "mean" denominator of one row chunk, from its targets and weights alone (what
    fastxent.stats_denominator gives from the merged statistics): the sum over counted rows
    of s_n * w[y_n]; every row counts, with w = 1, for probability targets (tb None)."""
    s = None if swb is None else swb.astype(np.float64)
    if tb is None:  # probability targets (with sample weights): every row counts, w = 1
        assert s is not None
        return np.array([float(np.sum(s))])
    t = np.asarray(tb)
    counted = t != ignore_index
    tc = t[counted]
    if tc.size and (int(tc.min()) < 0 or int(tc.max()) >= num_classes):
        raise_bad_target(t, num_classes, ignore_index)
    wy = np.ones(tc.shape) if w is None else np.asarray(w, np.float64)[tc]
    if s is not None:
        wy = wy * s[counted]
    return np.array([float(np.sum(wy))])


def _fastxent_loss(
    mb: np.ndarray,
    swb: Optional[np.ndarray],
    norm: Any,
    *,
    reduction: str,
    z_loss: float,
    num_classes: int,
    out_dtype: np.dtype,
) -> np.ndarray:
    """The loss of one row chunk from its merged statistics: row losses ("none"), or a
    length-1 array holding the chunk's share of the total."""
    if reduction == "none":
        rl = _shard.loss_from_stats(
            mb, reduction="none", sample_weight=swb, z_loss=z_loss, num_classes=num_classes
        )
        return np.asarray(rl).astype(out_dtype)
    part = _shard.loss_from_stats(
        mb,
        reduction=reduction,
        sample_weight=swb,
        z_loss=z_loss,
        normalizer=None if norm is None else float(norm),
        num_classes=num_classes,
    )
    return np.array([float(part)])


def _fastxent_shard_grad(
    xb: np.ndarray,
    tb: np.ndarray,
    cols: np.ndarray,
    wb: Optional[np.ndarray],
    mb: np.ndarray,
    swb: Optional[np.ndarray],
    norm: Any,
    *,
    probs: bool,
    opts: Dict[str, Any],
    grad_opts: Dict[str, Any],
) -> np.ndarray:
    """The gradient of one logits block from the merged statistics of its row chunk."""
    x = _compute_block(xb)
    half = x is not xb
    g = _shard.shard_grad(
        x,
        _target_block(tb, probs, x.dtype),
        mb,
        offset=int(cols[0]),
        weight=wb,
        sample_weight=swb,
        normalizer=None if norm is None else float(norm),
        out=x if half else None,  # x is then this task's own float32 copy
        **opts,
        **grad_opts,
    )
    return g.astype(xb.dtype) if half else g


# ----------------------------------------------------------------------------- graph
def _graph(p: Dict[str, Any]) -> Tuple[Any, Any, Any, Any]:
    """(merged statistics (N, 7) chunked like the rows, column-offset array, weight blocks,
    mean denominator or None); with p["outputs"], (N, 15): the merged output statistics
    after the loss's (the loss and the gradient read the first 7)."""
    da = p["da"]
    x = p["x"]
    rchunks, cchunks = x.chunks
    t_ind = "ij" if p["probs"] else "i"
    # Each block of `cols` holds the global indices of a column block: its first is the offset.
    cols = da.arange(p["C"], chunks=(cchunks,))
    w_d = None if p["w"] is None else da.from_array(p["w"], chunks=(cchunks,))
    stats = da.blockwise(
        _fastxent_shard_stats,
        "ijk",
        x,
        "ij",
        p["tgt"],
        t_ind,
        cols,
        "j",
        *((w_d, "j") if w_d is not None else (None, None)),
        new_axes={"k": _STATS + (0 if p["outputs"] is None else _OUTS)},
        adjust_chunks={"j": 1},
        dtype=np.float64,
        meta=np.empty((0, 0, 0), np.float64),
        probs=p["probs"],
        opts=p["shard_opts"],
        outputs=p["outputs"],
    )
    merged = da.reduction(
        stats,
        _merge_keep,
        _fastxent_merge_stats,
        combine=_fastxent_merge_stats,
        axis=1,
        keepdims=False,
        dtype=np.float64,
        concatenate=True,
        meta=np.empty((0, 0), np.float64),
        name="fastxent-merge-stats",
    )
    D: Any = p["norm"]
    if p["reduction"] == "mean" and D is None:
        D = _denominator(p)
    return merged, cols, w_d, D


def _denominator(p: Dict[str, Any]) -> Any:
    """The "mean" denominator over all rows: N for unweighted probability targets, else the
    sum of the row chunks' denominators (from targets and weights: no logits needed)."""
    da = p["da"]
    if p["probs"] and p["sw"] is None:
        return float(p["N"])
    w_all = None if p["w"] is None else da.from_array(p["w"], chunks=-1)
    return _sum_of_chunks(
        da,
        _fastxent_denominator,
        *((None, None) if p["probs"] else (p["tgt"], "i")),
        *((p["sw"], "i") if p["sw"] is not None else (None, None)),
        *((w_all, "c") if w_all is not None else (None, None)),
        ignore_index=p["ii"],
        num_classes=p["C"],
    )


def _sum_of_chunks(da: Any, fn: Any, *args: Any, **kw: Any) -> Any:
    """The sum of fn's float64 partials, one per row chunk: blockwise fn over "i" with the
    arguments args (array, index) and the keywords kw, each chunk's inputs concatenated."""
    parts = da.blockwise(
        fn,
        "i",
        *args,
        adjust_chunks={"i": 1},
        dtype=np.float64,
        meta=np.empty((0,), np.float64),
        concatenate=True,
        **kw,
    )
    return parts.sum()


def _loss(p: Dict[str, Any], merged: Any, D: Any) -> Any:
    da = p["da"]
    red = p["reduction"]
    dargs = (D, ()) if isinstance(D, da.Array) else (D, None)
    swargs = (p["sw"], "i") if p["sw"] is not None else (None, None)
    kw = dict(reduction=red, z_loss=p["z_loss"], num_classes=p["C"], out_dtype=p["cdt"])
    if red == "none":
        return da.blockwise(
            _fastxent_loss,
            "i",
            merged,
            "ik",
            *swargs,
            *dargs,
            dtype=p["cdt"],
            meta=np.empty((0,), p["cdt"]),
            concatenate=True,
            **kw,
        )
    return _sum_of_chunks(da, _fastxent_loss, merged, "ik", *swargs, *dargs, **kw).astype(p["cdt"])


def _outputs(p: Dict[str, Any], merged: Any) -> Any:
    """The RowStats of lazy Dask arrays (rows chunked like x's) of p["outputs"]; accuracy a
    0-d Dask array (counted rows summed over the row chunks)."""
    da = p["da"]
    names = p["outputs"]
    targs = (None, None) if p["probs"] else (p["tgt"], "i")
    kw = dict(num_classes=p["C"], ignore_index=p["ii"], out_dtype=p["cdt"])
    fields: Dict[str, Any] = {}
    for name in names:
        if name == "accuracy":
            parts = da.blockwise(
                _fastxent_output,
                "i",
                merged,
                "ik",
                *targs,
                adjust_chunks={"i": 2},
                dtype=np.float64,
                meta=np.empty((0,), np.float64),
                concatenate=True,
                **dict(kw, field=name),
            )
            hits, counted = parts.reshape((-1, 2)).sum(axis=0)
            fields[name] = da.where(counted > 0, hits / da.maximum(counted, 1.0), 0.0)
            continue
        dt = np.dtype(np.int64) if name == "argmax" else p["cdt"]
        fields[name] = da.blockwise(
            _fastxent_output,
            "i",
            merged,
            "ik",
            *targs,
            dtype=dt,
            meta=np.empty((0,), dt),
            concatenate=True,
            **dict(kw, field=name),
        )
    return _api.RowStats(**fields)


def _grad(p: Dict[str, Any], merged: Any, cols: Any, w_d: Any, D: Any) -> Any:
    da = p["da"]
    x = p["x"]
    dargs = (D, ()) if isinstance(D, da.Array) else (D, None)
    return da.blockwise(
        _fastxent_shard_grad,
        "ij",
        x,
        "ij",
        p["tgt"],
        "ij" if p["probs"] else "i",
        cols,
        "j",
        *((w_d, "j") if w_d is not None else (None, None)),
        merged,
        "ik",
        *((p["sw"], "i") if p["sw"] is not None else (None, None)),
        *dargs,
        dtype=x.dtype,
        meta=np.empty((0, 0), x.dtype),
        concatenate=True,
        probs=p["probs"],
        opts=p["shard_opts"],
        grad_opts=dict(z_loss=p["z_loss"], reduction=p["reduction"]),
    )
