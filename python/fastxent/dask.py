"""Dask integration: cross-entropy of a Dask array of logits chunked along rows *and* classes.

>>> import dask.array as da, numpy as np, fastxent.dask as fxd
>>> x = da.random.default_rng(0).standard_normal((1000, 50000), chunks=(250, 10000))
>>> y = np.random.default_rng(1).integers(0, 50000, 1000)
>>> loss, grad = fxd.cross_entropy_with_grad(x.astype(np.float32), y)   # both lazy
>>> float(loss.compute())  # doctest: +SKIP

How it works (the vocabulary-sharded statistics of :func:`fastxent.shard_stats`):

1. every block ``(i, j)`` of the logits gives the ``(rows_i, 7)`` statistics of its columns
   (one SIMD pass over the block);
2. a tree reduction over the column blocks of each row chunk merges them
   (:func:`fastxent.merge_stats`): only these small statistics travel, never a row;
3. the loss is the sum over row chunks of :func:`fastxent.loss_from_stats` ("none": the
   row losses, a Dask array chunked like the rows);
4. each gradient block is :func:`fastxent.shard_grad` of its logits block and the merged
   statistics of its row chunk: computed where the block is, in one pass, lazily.

The "mean" denominator ``D = sum_n s_n w[y_n]`` over counted rows depends on the targets and
weights only, so it is computed from them (a small reduction over the row chunks), not from
the statistics: a gradient block then waits only for the statistics of its own row chunk,
and the logits of the other row chunks need not be held in memory meanwhile. No task holds
more than one logits block plus the statistics of its rows, so logits larger than any
worker's memory (or the whole cluster's) are fine when they are produced lazily (read from
storage, or computed upstream).

Results match :func:`fastxent.cross_entropy_with_grad` on the whole array up to rounding (the
row statistics are merged in another order). Every option of the one-machine kernel is
supported except ``axis`` (the classes are the last of two axes) and ``out``.

Requires the optional extra: ``pip install 'fastxent[dask]'`` (Dask itself is imported when a
function is called, not with this module). Works with any Dask scheduler, including
``dask.distributed`` (the worker processes import fastxent).

This module owns the public functions, their documentation and the checks of their
arguments (``_prepare``); the block tasks and the graph that wires them live in
``_dask_graph``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from ._dask_graph import (  # noqa: F401 (the tasks and helpers are re-exported)
    _STATS,
    _compute_block,
    _denominator,
    _fastxent_denominator,
    _fastxent_loss,
    _fastxent_merge_stats,
    _fastxent_shard_grad,
    _fastxent_shard_stats,
    _grad,
    _graph,
    _loss,
    _merge_keep,
    _outputs,
    _target_block,
)
from ._keywords import LOSS, LossKeywords, Unpack, output_names
from ._options import (
    FLOAT_DTYPES,
    as_target,
    as_vector,
    common_options,
    half_kind,
    raise_bad_target,
    real,
    to_numpy,
)

__all__ = ["cross_entropy", "cross_entropy_with_grad"]


def _import_dask() -> Any:
    try:
        import dask.array as da
    except ImportError as e:  # pragma: no cover - exercised without dask installed
        raise ImportError(
            "fastxent.dask needs Dask: pip install 'fastxent[dask]' (Dask arrays; "
            "add dask.distributed for a cluster)"
        ) from e
    return da


# ----------------------------------------------------------------------------- arguments


def _dask_or_numpy(da: Any, v: Any, name: str) -> Any:
    return v if isinstance(v, da.Array) else to_numpy(v, name)


def _prepare(
    x: Any, target: Any, opts: Dict[str, Any], fn: str, outputs: Any = None
) -> Dict[str, Any]:
    """Checks every argument before building a graph; returns the aligned pieces."""
    names = None if outputs is None else output_names(outputs)
    da = _import_dask()
    if not isinstance(x, da.Array):
        raise TypeError(
            f"fastxent.dask.{fn} takes a Dask array of logits (rows, C), got "
            f"{type(x).__module__}.{type(x).__name__}; for an in-memory array use "
            f"fastxent.{fn}, or wrap it with dask.array.from_array"
        )
    if x.ndim != 2:
        raise ValueError(
            f"logits must be a 2-D Dask array (rows, C), classes last; got "
            f"{x.ndim} dimensions (reshape to 2-D first)"
        )
    if any(np.isnan(c) for cs in x.chunks for c in cs):
        raise ValueError("logits have unknown chunk sizes: call x.compute_chunk_sizes() first")
    dt = np.dtype(x.dtype)
    half = half_kind(dt)
    if dt not in FLOAT_DTYPES and half is None:
        raise TypeError(f"logits must be float32, float64, float16 or bfloat16, got {dt}")
    cdt = np.dtype(np.float32) if half is not None else dt
    N, C = (int(n) for n in x.shape)
    if C == 0:
        raise ValueError("the class axis has no classes (C = 0)")
    rchunks, cchunks = x.chunks

    _, ii, eps, nt = common_options(
        opts["reduction"], opts["ignore_index"], opts["label_smoothing"], opts["num_threads"]
    )
    z_loss = real(opts["z_loss"], "z_loss", 0.0, False)
    softcap = opts["softcap"]
    if softcap is not None:
        softcap = real(softcap, "softcap", 0.0, True)
    alpha = real(opts["logit_scale"], "logit_scale", 0.0, True)
    norm = opts["normalizer"]
    if norm is not None:
        norm = real(norm, "normalizer", 0.0, False)

    tgt = _dask_or_numpy(da, target, "target")
    tdt = np.dtype(tgt.dtype)
    probs = (tdt.kind == "f" or half_kind(tdt) is not None) and tgt.ndim == 2
    if probs:
        if tuple(tgt.shape) != (N, C):
            raise ValueError(
                f"probability target has shape {tuple(tgt.shape)}, expected the "
                f"logits' shape {(N, C)}"
            )
        if ii != -100:
            raise ValueError(
                "ignore_index applies to class-index targets only; probability "
                "targets weight rows with sample_weight instead"
            )
        bad = [n for n in names or () if n in ("target_logprob", "accuracy")]
        if bad:
            raise ValueError(f"outputs {bad} need class-index targets, not probabilities")
        tgt_d = (
            tgt.rechunk(x.chunks)
            if isinstance(tgt, da.Array)
            else da.from_array(tgt, chunks=x.chunks)
        )
    else:
        if tdt.kind not in "iu":
            raise TypeError(
                f"target must hold integer class indices (shape {(N,)}) or float "
                f"class probabilities (shape {(N, C)}), got dtype {tdt}"
            )
        if tuple(tgt.shape) != (N,):
            raise ValueError(
                f"target has shape {tuple(tgt.shape)}, expected {(N,)} (one class "
                f"index per row of the logits)"
            )
        if isinstance(tgt, da.Array):
            tgt_d = tgt.astype(np.int64).rechunk((rchunks,))
        else:
            t64 = as_target(tgt, (N,), C, ii)  # uint64 above int64: IndexError here
            if np.any((t64 != ii) & ((t64 < 0) | (t64 >= C))):
                raise_bad_target(tgt, C, ii)
            tgt_d = da.from_array(t64, chunks=(rchunks,))

    w = opts["weight"]
    if w is not None:  # (C,): small, held as NumPy and sliced per column chunk
        w = as_vector(
            w.compute() if isinstance(w, da.Array) else w, cdt, (C,), "weight", "one per class"
        )
    sw = opts["sample_weight"]
    sw_d = None
    if sw is not None:
        sw = _dask_or_numpy(da, sw, "sample_weight")
        if tuple(sw.shape) != (N,):
            raise ValueError(
                f"sample_weight has shape {tuple(sw.shape)}, expected {(N,)} (one per row)"
            )
        if np.dtype(sw.dtype).kind not in "fiu" and half_kind(np.dtype(sw.dtype)) is None:
            raise TypeError(f"sample_weight must be numeric, got dtype {sw.dtype}")
        sw_d = (
            sw.astype(cdt).rechunk((rchunks,))
            if isinstance(sw, da.Array)
            else da.from_array(np.ascontiguousarray(sw, dtype=cdt), chunks=(rchunks,))
        )

    shard_opts = dict(
        num_classes=C,
        ignore_index=ii,
        label_smoothing=eps,
        softcap=softcap,
        logit_scale=alpha,
        num_threads=nt or None,
    )
    return dict(
        da=da,
        x=x,
        N=N,
        C=C,
        cdt=cdt,
        probs=probs,
        tgt=tgt_d,
        w=w,
        sw=sw_d,
        reduction=opts["reduction"],
        ii=ii,
        z_loss=z_loss,
        norm=norm,
        shard_opts=shard_opts,
        outputs=names,
    )


_DOC_PARAMS = """
    Parameters
    ----------
    x : dask.array.Array (N, C)
        Logits, float32, float64, float16 or bfloat16 (16-bit blocks compute in float32),
        chunked along rows, classes or both. The chunk sizes must be known.
    target : int array (N,) or float array (N, C), NumPy or Dask
        Class indices (aligned to x's row chunks: rechunked to them), or probability targets
        (rechunked to x's chunks).
    weight : array (C,), optional
        Class weights (small: converted to NumPy and sliced per column chunk).
    sample_weight : array (N,), NumPy or Dask, optional
        Per-row weights (rechunked to x's row chunks).
    reduction, ignore_index, label_smoothing, z_loss, softcap, logit_scale, normalizer,
    num_threads
        As :func:`fastxent.cross_entropy` (``num_threads`` per task; Dask's workers set
        OMP_NUM_THREADS=1, which the kernel follows by default).
    outputs : tuple of names, optional
        Per-row outputs of the whole rows, as :func:`fastxent.cross_entropy`'s ``outputs=``
        (``"lse"``, ``"entropy"``, ``"argmax"``, ``"target_logprob"``, ``"accuracy"``; the
        last two need class targets): from the same pass over each block
        (:func:`fastxent.shard_stats` with ``outputs``), merged with the statistics
        (:func:`fastxent.merge_output_stats`). Adds a :class:`fastxent.RowStats` of lazy Dask
        arrays to the result: the rows' outputs chunked like x's rows (floats in x's compute
        dtype, argmax int64), accuracy a 0-d array.
"""

_DOC_RAISES = """
    Raises
    ------
    ImportError
        Dask is not installed (``pip install 'fastxent[dask]'``).
    TypeError
        x is not a Dask array (use :func:`fastxent.cross_entropy`), or a dtype is wrong.
    ValueError
        Shapes that do not match, unknown chunk sizes, or a bad option. A class index out of
        range is an IndexError: at once for a NumPy target, when computed for a Dask one.
"""


def _loss_stats(p: Dict[str, Any], merged: Any) -> Any:
    """The loss's statistics of the merged ones (the first 7 fields with outputs=)."""
    return merged if p["outputs"] is None else merged[:, :_STATS]


@LOSS
def cross_entropy(
    x: Any, target: Any, *, outputs: Optional[Sequence[str]] = None, **kw: Unpack[LossKeywords]
) -> Any:
    p = _prepare(x, target, LOSS.bind("cross_entropy", kw), "cross_entropy", outputs)
    merged, _, _, D = _graph(p)
    loss = _loss(p, _loss_stats(p, merged), D)
    return loss if p["outputs"] is None else (loss, _outputs(p, merged))


cross_entropy.__doc__ = (
    """Softmax cross-entropy of a Dask array of logits, lazily: the
    statistics of each block, a tree reduction over the column blocks of each row chunk, and
    the loss from the merged statistics (no task holds more than one block of logits).
"""
    + _DOC_PARAMS
    + """
    Returns
    -------
    A 0-d Dask array (the loss, in x's compute dtype) for "mean"/"sum", or a Dask array (N,)
    of row losses chunked like x's rows for "none"; with ``outputs``, ``(loss, RowStats)``.
"""
    + _DOC_RAISES
)


@LOSS
def cross_entropy_with_grad(
    x: Any, target: Any, *, outputs: Optional[Sequence[str]] = None, **kw: Unpack[LossKeywords]
) -> Any:
    p = _prepare(
        x, target, LOSS.bind("cross_entropy_with_grad", kw), "cross_entropy_with_grad", outputs
    )
    merged, cols, w_d, D = _graph(p)
    st = _loss_stats(p, merged)
    res = (_loss(p, st, D), _grad(p, st, cols, w_d, D))
    return res if p["outputs"] is None else res + (_outputs(p, merged),)


cross_entropy_with_grad.__doc__ = (
    """Loss and gradient d(loss)/d(x) of a Dask array of
    logits, both lazy. The loss is that of :func:`cross_entropy`; the gradient is a Dask
    array with x's shape, chunks and dtype, each block computed from its logits block and
    the merged statistics of its row chunk ("none": the gradient of the sum of the row
    losses). Computing both together (``dask.compute(loss, grad)``) shares the statistics.
"""
    + _DOC_PARAMS
    + """
    Returns
    -------
    (loss, grad): lazy Dask arrays; with ``outputs``, ``(loss, grad, RowStats)``.
"""
    + _DOC_RAISES
)
