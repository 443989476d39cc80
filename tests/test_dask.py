"""fastxent.dask on a dask.distributed LocalCluster (2 worker processes on 127.0.0.1): loss for
every reduction and the gradient against the one-machine kernel (fx.cross_entropy_with_grad on
the computed full array), for logits chunked along rows, classes and both (uneven), every
option, float32 / float64 / float16; the graph's shape (no task result holds a full row,
everything lazy); the errors; and logits larger than one worker's memory limit (and than the
whole cluster's), generated lazily on the workers and checked against a reference computed
row chunk by row chunk in the client.

Tolerances (loss_error / grad_error of tests/reference.py): both sides are fastxent kernels
over the same values; they differ only in how the per-row statistics are combined (block
statistics merged in another order, sums in another order), a few u of float64 times the
accumulation lengths, and, for float32, the final rounding of the loss and of each gradient
entry to float32 (a few u32). 1e-12 (float64) and 64 u32 (float32) bound that with a margin
and catch any formula error (>= 1e-3).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
import dask  # noqa: E402
from dask.callbacks import Callback  # noqa: E402

import fastxent as fx  # noqa: E402
import fastxent.dask as fxd  # noqa: E402
from reference import U32, grad_error, loss_error  # noqa: E402

REDUCTIONS = ("mean", "sum", "none")
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 64 * U32, np.dtype(np.float16): 64 * U32}
WORKER_LIMIT = 400 * 2**20  # bytes per worker; the big case's logits are 1 GiB


def _restore_environ(saved):
    for k in set(os.environ) - set(saved):
        del os.environ[k]
    os.environ.update(saved)


@pytest.fixture(scope="module")
def client():
    # The nanny sets distributed.nanny.pre-spawn-environ (OMP_NUM_THREADS=1, ...) in this
    # process's os.environ to pass it to the workers, and leaves it there: restored after, so
    # the thread-count tests that run later see the environment they were started with.
    saved = dict(os.environ)
    try:
        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=WORKER_LIMIT,
        )
        c = distributed.Client(cluster)
        try:
            yield c
        finally:
            c.close()
            cluster.close()
    finally:
        _restore_environ(saved)


def _compute(client, *arrays):
    return client.gather(client.compute(list(arrays)))


# ----------------------------------------------------------------------------- the cases
N, C = 37, 23
CHUNKINGS = {
    "rows": ((10, 10, 10, 7), (C,)),
    "classes": ((N,), (8, 8, 7)),
    "both-uneven": ((10, 20, 7), (9, 1, 13)),
}
CASES = {
    "plain": dict(),
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.2),
    "weight-smoothing-ignore": dict(weight=True, label_smoothing=0.1, ignore=True),
    "ignore_index=2": dict(ignore=True, ignore_index=2),
    "all-ignored": dict(ignore=1.0),
    "sample_weight": dict(sample_weight=True, ignore=True),
    "z_loss": dict(z_loss=1e-2, weight=True),
    "softcap-scale": dict(softcap=4.0, logit_scale=0.7, label_smoothing=0.05),
    "normalizer": dict(normalizer=11.5, ignore=True),
    "probs": dict(probs=True),
    "probs-all": dict(
        probs=True, label_smoothing=0.1, sample_weight=True, weight=True, z_loss=1e-3, softcap=5.0
    ),
}


def _make(rng, case, dtype, dask_targets):
    """(logits, target, one-machine options, dask options)."""
    spec = dict(CASES[case])
    x = (3.0 * rng.standard_normal((N, C))).astype(dtype)
    kw = {
        k: spec.pop(k)
        for k in (
            "label_smoothing",
            "z_loss",
            "softcap",
            "logit_scale",
            "normalizer",
            "ignore_index",
        )
        if k in spec
    }
    if spec.pop("weight", False):
        kw["weight"] = rng.uniform(0.25, 2.0, C)
    if spec.pop("sample_weight", False):
        kw["sample_weight"] = rng.uniform(0.0, 1.5, N)
    ignore = spec.pop("ignore", 0.0)
    if spec.pop("probs", False):
        t = rng.dirichlet(np.full(C, 0.5), N).astype(dtype)
    else:
        t = rng.integers(0, C, N)
        if ignore:
            t = np.where(
                rng.random(N) < (0.3 if ignore is True else ignore), kw.get("ignore_index", -100), t
            )
    assert not spec, spec
    dkw = dict(kw)
    if dask_targets and "sample_weight" in kw:
        dkw["sample_weight"] = da.from_array(kw["sample_weight"], chunks=7)
    return x, t, kw, dkw


# Every case on uneven chunks along both axes; rows-only and classes-only chunks on a few.
MATRIX = [("both-uneven", case) for case in CASES] + [
    (ch, case)
    for ch in ("rows", "classes")
    for case in ("plain", "weight-smoothing-ignore", "probs-all")
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunking,case", MATRIX)
def test_matches_one_machine(client, rng, chunking, case, dtype):
    dask_targets = chunking != "rows"  # NumPy targets / weights for one chunking, Dask else
    x, t, kw, dkw = _make(rng, case, dtype, dask_targets)
    xd = da.from_array(x, chunks=CHUNKINGS[chunking])
    td = da.from_array(t, chunks=5 if t.ndim == 1 else (5, 6)) if dask_targets else t
    lazy = []
    for red in REDUCTIONS:
        lazy += fxd.cross_entropy_with_grad(xd, td, reduction=red, **dkw)
        lazy.append(fxd.cross_entropy(xd, td, reduction=red, **dkw))
    got = _compute(client, *lazy)
    tol = TOL[np.dtype(dtype)]
    for k, red in enumerate(REDUCTIONS):
        loss, grad, loss_only = got[3 * k : 3 * k + 3]
        ref_loss, ref_grad = fx.cross_entropy_with_grad(x, t, reduction=red, **kw)
        assert np.asarray(loss).dtype == np.asarray(ref_loss).dtype == dtype, red
        assert np.shape(loss) == np.shape(ref_loss), red
        assert loss_error(loss, ref_loss) <= tol, (red, loss, ref_loss)
        np.testing.assert_array_equal(loss_only, loss)  # the same graph, the same numbers
        assert grad.dtype == dtype and grad.shape == x.shape
        assert grad_error(grad, ref_grad) <= tol, red
        if case == "all-ignored":
            assert not np.any(grad) and not np.any(loss)


def test_float16_logits_compute_in_float32(client, rng):
    x = (2.0 * rng.standard_normal((N, C))).astype(np.float16)
    t = rng.integers(0, C, N)
    xd = da.from_array(x, chunks=(10, 8))
    for red in REDUCTIONS:
        loss, grad = _compute(
            client, *fxd.cross_entropy_with_grad(xd, t, reduction=red, label_smoothing=0.1)
        )
        ref_loss, ref_grad = fx.cross_entropy_with_grad(x, t, reduction=red, label_smoothing=0.1)
        assert np.asarray(loss).dtype == np.float32 and grad.dtype == np.float16
        assert loss_error(loss, ref_loss) <= 64 * U32
        # both round the same float32 gradient to float16: at most one half-ULP apart
        assert grad_error(grad, ref_grad) <= 2.0**-10


# ----------------------------------------------------------------------------- the graph
class _ResultShapes(Callback):
    """Records the shape of every array a task returns (local synchronous scheduler)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def _posttask(self, key, result, dsk, state, worker_id):
        name = key[0] if isinstance(key, tuple) else key
        # the finalize task assembles the computed collection itself (the client's result)
        if isinstance(result, np.ndarray) and not str(name).startswith("finalize"):
            self.shapes.append((name, result.shape))


@pytest.mark.parametrize("probs", [False, True])
def test_no_task_result_holds_a_full_row(rng, probs):
    """Every task returns at most one logits block, (rows, 1 or k, 7) or (rows, 7) statistics,
    row losses, or a scalar: never the C columns of a row."""
    n, c, cc = 64, 90, 16
    x = rng.standard_normal((n, c))
    t = rng.dirichlet(np.ones(c), n) if probs else rng.integers(0, c, n)
    # inline_array: the source arrays live in the slicing tasks, not in a task of their own
    xd = da.from_array(x, chunks=(16, cc), inline_array=True)
    td = da.from_array(t, chunks=xd.chunks if probs else 16, inline_array=True)
    loss, grad = fxd.cross_entropy_with_grad(
        xd,
        td,
        label_smoothing=0.1,
        weight=np.linspace(0.5, 1.5, c),
        sample_weight=np.linspace(0, 1, n),
    )
    with _ResultShapes() as rec:
        got_loss, got_grad = dask.compute(loss, grad, scheduler="sync")
    assert rec.shapes
    for name, shape in rec.shapes:
        assert len(shape) <= 3 and (len(shape) < 2 or shape[1] <= cc), (name, shape)
    assert sum(name.startswith("fastxent_shard_grad") for name, _ in rec.shapes) == 4 * 6
    # 6 column blocks: a tree of merges (partial merges, then the aggregate), not one task
    names = {name.rsplit("-", 1)[0] for name, _ in rec.shapes}
    assert {"fastxent-merge-stats-partial", "fastxent-merge-stats-aggregate"} <= names
    ref_loss, ref_grad = fx.cross_entropy_with_grad(
        x,
        t,
        label_smoothing=0.1,
        weight=np.linspace(0.5, 1.5, c),
        sample_weight=np.linspace(0, 1, n),
    )
    assert loss_error(got_loss, ref_loss) <= 1e-12 and grad_error(got_grad, ref_grad) <= 1e-12


def test_lazy_and_shaped_like_the_logits(rng):
    def boom(b):
        raise AssertionError("a block was computed while building the graph")

    x = da.from_array(rng.standard_normal((30, 40)), chunks=(7, 11)).map_blocks(
        boom, dtype=np.float64, meta=np.empty((0, 0))
    )
    t = da.from_array(rng.integers(0, 40, 30), chunks=30)
    loss, grad = fxd.cross_entropy_with_grad(x, t, sample_weight=da.ones(30, chunks=10))
    rows = fxd.cross_entropy(x, t, reduction="none")
    assert loss.shape == () and loss.dtype == np.float64
    assert grad.chunks == x.chunks and grad.dtype == x.dtype
    assert rows.chunks == (x.chunks[0],) and rows.dtype == np.float64
    # the two calls share the graph of the statistics
    assert set(fxd.cross_entropy(x, t).dask.keys()) & set(loss.dask.keys())


# ----------------------------------------------------------------------------- errors
def test_errors(rng):
    x = rng.standard_normal((6, 5))
    xd = da.from_array(x, chunks=(3, 2))
    t = np.array([0, 1, 2, 3, 4, 0])
    with pytest.raises(TypeError, match=r"fastxent\.cross_entropy\b"):
        fxd.cross_entropy(x, t)
    with pytest.raises(TypeError, match=r"fastxent\.cross_entropy_with_grad"):
        fxd.cross_entropy_with_grad(x, t)
    with pytest.raises(ValueError, match="2-D"):
        fxd.cross_entropy(xd.reshape(6, 5, 1), t)
    with pytest.raises(TypeError, match="float32"):
        fxd.cross_entropy(xd.astype(np.int32), t)
    with pytest.raises(ValueError, match="unknown chunk"):
        fxd.cross_entropy(xd[xd[:, 0] > -np.inf], t)
    with pytest.raises(ValueError, match=r"target has shape \(5,\)"):
        fxd.cross_entropy(xd, t[:5])
    with pytest.raises(ValueError, match="probability target has shape"):
        fxd.cross_entropy(xd, da.ones((6, 4), chunks=2))
    with pytest.raises(TypeError, match="class indices"):
        fxd.cross_entropy(xd, np.array(["a"] * 6))
    with pytest.raises(ValueError, match="weight has shape"):
        fxd.cross_entropy(xd, t, weight=np.ones(4))
    with pytest.raises(ValueError, match="sample_weight has shape"):
        fxd.cross_entropy(xd, t, sample_weight=da.ones(5, chunks=2))
    with pytest.raises(ValueError, match="reduction"):
        fxd.cross_entropy(xd, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fxd.cross_entropy_with_grad(xd, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        fxd.cross_entropy(xd, t, softcap=0.0)
    with pytest.raises(ValueError, match="ignore_index applies to class-index"):
        fxd.cross_entropy(xd, np.full((6, 5), 0.2), ignore_index=0)
    # a NumPy target is checked at once, a Dask one when its block is computed
    with pytest.raises(IndexError, match=r"target\[2\] = 7 is out of range"):
        fxd.cross_entropy(xd, np.array([0, 1, 7, 3, 4, 0]))
    lazy = fxd.cross_entropy(xd, da.from_array(np.array([0, 1, 7, 3, 4, 0]), chunks=3))
    with pytest.raises(IndexError, match="out of range"):
        lazy.compute(scheduler="sync")


def test_import_error_names_the_extra(monkeypatch, rng):
    xd = da.from_array(rng.standard_normal((4, 3)), chunks=2)
    monkeypatch.setitem(sys.modules, "dask.array", None)  # import dask.array fails
    with pytest.raises(ImportError, match=r"pip install 'fastxent\[dask\]'"):
        fxd.cross_entropy(xd, np.zeros(4, np.int64))


# ----------------------------------------------------------------------------- bigger than a worker
def _worker_memory(dask_worker):
    from fastxent.dask_bench import peak_bytes

    m = peak_bytes(dask_worker)
    return m["pid"], m["peak"], m["spilled"]


def _block_sum_and_norm(g):
    return np.array(
        [[[g.sum(dtype=np.float64), np.sqrt(np.einsum("ij,ij->", g, g, dtype=np.float64))]]]
    )


def test_logits_larger_than_a_worker(client):
    """1 GiB of float32 logits (16384 x 16384) on workers limited to 400 MiB each (800 MiB
    together): generated lazily on the workers from a seed (uniform in [0, 1), logit_scale=8
    spreads them over [0, 8)), never in the client. The loss and the gradient's per-block sums
    and norms (not the gradient itself) come back; the reference is the one-machine kernel on
    each row chunk in turn, in the client ("mean" over the whole array = each chunk with the
    whole array's denominator as normalizer, summed)."""
    n = c = 16384
    rows, cols = 1024, 4096
    assert n * c * 4 > 2 * WORKER_LIMIT
    x = da.random.default_rng(1234).random((n, c), dtype=np.float32, chunks=(rows, cols))
    g_rng = np.random.default_rng(5)
    t = np.where(g_rng.random(n) < 0.05, -100, g_rng.integers(0, c, n))
    w = g_rng.uniform(0.5, 1.5, c)
    opts = dict(weight=w, label_smoothing=0.05, logit_scale=8.0)

    before = client.run(_worker_memory)
    loss, grad = fxd.cross_entropy_with_grad(x, t, **opts)
    gstats = grad.map_blocks(_block_sum_and_norm, chunks=(1, 1, 2), new_axis=2, dtype=np.float64)
    got_loss, got_gstats = _compute(client, loss, gstats)
    after = client.run(_worker_memory)

    # the same two workers (none restarted for memory), each below its limit
    assert sorted(p for p, _, _ in before.values()) == sorted(p for p, _, _ in after.values())
    for addr, (_, peak, _) in after.items():
        assert peak < WORKER_LIMIT, (addr, peak)

    D = float(np.sum(w[t[t != -100]]))
    ref_loss = 0.0
    ref_gstats = np.empty(got_gstats.shape)
    for i in range(n // rows):
        sl = slice(i * rows, (i + 1) * rows)
        xi = x[sl].compute(scheduler="sync")  # one row chunk (64 MiB) at a time
        li, gi = fx.cross_entropy_with_grad(xi, t[sl], normalizer=D, out=xi, **opts)
        ref_loss += float(li)
        ref_gstats[i] = np.concatenate(
            [_block_sum_and_norm(gi[:, j * cols : (j + 1) * cols]) for j in range(c // cols)],
            axis=1,
        )[0]
        del xi, gi
    assert loss_error(got_loss, ref_loss) <= 64 * U32
    # norms: relative to themselves; sums (near 0): |sum of errors| <= sqrt(size) * norm * tol
    norms, ref_norms = got_gstats[..., 1], ref_gstats[..., 1]
    assert np.max(np.abs(norms - ref_norms) / ref_norms) <= 64 * U32
    bound = 64 * U32 * np.sqrt(rows * cols) * ref_norms
    assert np.all(np.abs(got_gstats[..., 0] - ref_gstats[..., 0]) <= bound)


# ----------------------------------------------------------------------------- the benchmark
def test_dask_bench_report_and_plot(tmp_path):
    """python -m fastxent.dask_bench: the one-machine child on a small problem, then the
    report and the figure from it and from made-up Dask numbers (the cluster part is what
    the tests above exercise)."""
    pytest.importorskip("matplotlib")
    from fastxent import dask_bench

    cfg = dict(
        rows=256,
        cols=512,
        workers=2,
        repeats=1,
        chunks=[128, 256],
        seed=0,
        worker_limit=300 * dask_bench.MiB,
        load_start="0 0 0",
    )
    one = dask_bench.run_one_machine(cfg)
    assert one["loss"]["value"] == one["grad"]["value"] == one["grad_new"]["value"]
    peak = [100 * dask_bench.MiB, 110 * dask_bench.MiB]
    dk = {
        k: dict(time=1.0, times=[1.0], peak=peak, spilled=0, value=one["loss"]["value"])
        for k in ("generate", "loss", "grad")
    }
    dk.update(base=peak, grad_norm=one["grad_norm"], restarted=False)
    text = dask_bench.report(cfg, one, dk, "info")
    assert "rel. diff 0.0e+00" in text and "workers restarted: False" in text
    dask_bench.plot(cfg, one, dk, str(tmp_path / "dask.png"))
    assert (tmp_path / "dask.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------
# outputs=: per-row outputs of whole rows (issue #23), merged with the statistics.
# Tolerance: tests/test_row_outputs.py's against the float64 reference (4e-6 float32, 1e-13
# float64), which both the one-machine call and the sharded one meet (tests/test_shard_outputs.py);
# argmax and accuracy exactly.

ALL_OUTPUTS = ("lse", "entropy", "argmax", "target_logprob", "accuracy")
OUT_TOL = {np.dtype(np.float32): 4e-6, np.dtype(np.float64): 1e-13}


def _check_outputs(st, ref, dtype):
    for name in ("lse", "entropy", "target_logprob"):
        a, b = getattr(st, name), getattr(ref, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        fin = np.isfinite(b)
        np.testing.assert_array_equal(a[~fin], b[~fin], err_msg=name)
        a64, b64 = a[fin].astype(np.float64), b[fin].astype(np.float64)
        err = np.max(np.abs(a64 - b64) / np.maximum(1.0, np.abs(b64)), initial=0.0)
        assert err <= OUT_TOL[np.dtype(dtype)], (name, err)
    if ref.argmax is not None:
        assert st.argmax.dtype == np.int64
        np.testing.assert_array_equal(st.argmax, ref.argmax)
    if ref.accuracy is not None:
        assert float(st.accuracy) == ref.accuracy


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", ["plain", "weight-smoothing-ignore", "softcap-scale"])
def test_outputs_match_one_machine(rng, case, dtype):
    x, t, kw, dkw = _make(rng, case, dtype, True)
    x[3, :] = -np.inf
    x[4, 7] = np.nan
    x[5, 2] = x[5, 20] = 9.0  # equal maxima in two column chunks
    xd = da.from_array(x, chunks=CHUNKINGS["both-uneven"])
    td = da.from_array(t, chunks=5)
    loss, grad, st = fxd.cross_entropy_with_grad(xd, td, outputs=ALL_OUTPUTS, **dkw)
    loss2, st2 = fxd.cross_entropy(xd, td, outputs=("entropy", "accuracy"), **dkw)
    plain_loss, plain_grad = fxd.cross_entropy_with_grad(xd, td, **dkw)
    got = dask.compute(loss, grad, st, loss2, st2, plain_loss, plain_grad, scheduler="sync")
    loss, grad, st, loss2, st2, plain_loss, plain_grad = got
    _, ref = fx.cross_entropy(x, t, outputs=ALL_OUTPUTS, **kw)
    _check_outputs(st, ref, dtype)
    assert st2.lse is None and st2.argmax is None
    _check_outputs(st2, fx.RowStats(entropy=ref.entropy, accuracy=ref.accuracy), dtype)
    # The loss and gradient are those of the call without outputs=, bit for bit.
    assert np.asarray(loss).tobytes() == np.asarray(plain_loss).tobytes()
    assert np.asarray(loss2).tobytes() == np.asarray(plain_loss).tobytes()
    assert grad.tobytes() == plain_grad.tobytes()


def test_outputs_on_the_cluster_and_probability_targets(client, rng):
    x = (3.0 * rng.standard_normal((N, C))).astype(np.float32)
    p = rng.dirichlet(np.ones(C), N).astype(np.float32)
    xd = da.from_array(x, chunks=CHUNKINGS["both-uneven"])
    names = ("lse", "entropy", "argmax")
    loss, st = fxd.cross_entropy(xd, p, outputs=names)
    (st,) = _compute(client, st)
    _, ref = fx.cross_entropy(x, p, outputs=names)
    _check_outputs(st, ref, np.float32)
    for bad in ("target_logprob", "accuracy"):
        with pytest.raises(ValueError, match="class-index targets"):
            fxd.cross_entropy(xd, p, outputs=(bad,))


def test_outputs_errors(rng):
    xd = da.from_array(np.zeros((4, 6), np.float32), chunks=(2, 3))
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="unknown output"):
        fxd.cross_entropy(xd, y, outputs=("nope",))
    with pytest.raises(TypeError, match="tuple of names"):
        fxd.cross_entropy_with_grad(xd, y, outputs="lse")
    # every row ignored: accuracy 0 (no counted row), as the one-machine call
    yi = np.full(4, -100)
    _, st = fxd.cross_entropy(xd, yi, outputs=("accuracy", "target_logprob"))
    acc, tl = dask.compute(st.accuracy, st.target_logprob, scheduler="sync")
    assert float(acc) == 0.0 and not np.any(tl)
