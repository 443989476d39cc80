"""fastxent.linear_cross_entropy(_with_grad) (NumPy): the fused linear + cross-entropy against
a float64 reference (logits materialised, then reference.cross_entropy_full_ref and the
three matmuls), every option and reduction, tiling edge cases, errors before any write, and
the memory bound (no N x V allocation)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import fastxent as fx
from reference import cross_entropy_full_ref

OPTIONS = [
    {},
    {"weight": "w"},
    {"ignore_index": 3},
    {"label_smoothing": 0.2},
    {"sample_weight": "s"},
    {"z_loss": 1e-3},
    {"softcap": 3.0},
    {"logit_scale": 0.7},
    {"normalizer": 17.0},
    {"probs": True},
    {"probs": True, "weight": "w", "label_smoothing": 0.1, "sample_weight": "s"},
    {
        "weight": "w",
        "ignore_index": 3,
        "label_smoothing": 0.1,
        "sample_weight": "s",
        "z_loss": 1e-4,
        "softcap": 5.0,
        "logit_scale": 1.3,
    },
]


def _problem(rng, n, h, v, dtype, opt, bias=True):
    x = rng.standard_normal((n, h)) / np.sqrt(max(h, 1))
    w = rng.standard_normal((v, h))
    b = rng.standard_normal(v) * 0.1 if bias else None
    kw = {}
    for k, val in opt.items():
        if k == "probs":
            continue
        if val == "w":
            val = rng.uniform(0.5, 2.0, v)
        elif val == "s":
            val = rng.uniform(0.0, 2.0, n)
        kw[k] = val
    if opt.get("probs"):
        p = rng.uniform(0, 1, (n, v))
        t = (p / p.sum(1, keepdims=True)).astype(dtype)
    else:
        t = rng.integers(0, v, n)
        t[::4] = kw.get("ignore_index", -100)
    return x.astype(dtype), w.astype(dtype), (None if b is None else b.astype(dtype)), t, kw


def reference(x, w, b, t, reduction, **kw):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    z = x64 @ w64.T + (0 if b is None else b.astype(np.float64))
    t = t.astype(np.float64) if t.dtype.kind == "f" or t.dtype.itemsize == 2 else t
    loss, g = cross_entropy_full_ref(z, t, reduction=reduction, **kw)
    return loss, g @ w64, g.T @ x64, (None if b is None else g.sum(0))


def _close(got, ref, tol):
    if ref is None:
        assert got is None
        return
    got = np.asarray(got, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(ref), initial=0.0)))
    assert np.max(np.abs(got - ref), initial=0.0) <= tol * scale


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-11), (np.float32, 2e-5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_against_reference(dtype, tol, reduction, opt):
    rng = np.random.default_rng(len(opt) + 7)
    x, w, b, t, kw = _problem(rng, 37, 9, 21, dtype, opt)
    ref = reference(x, w, b, t, reduction, **kw)
    got = fx.linear_cross_entropy_with_grad(
        x, w, t, linear_bias=b, reduction=reduction, tile_rows=5, **kw
    )
    for g, r in zip(got, ref):
        _close(g, r, tol)
    assert got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype
    loss = fx.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, tile_rows=8, **kw)
    _close(loss, ref[0], tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tile_size_changes_only_rounding(dtype):
    rng = np.random.default_rng(1)
    x, w, b, t, kw = _problem(rng, 50, 16, 33, dtype, {"weight": "w"})
    runs = [
        fx.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, tile_rows=k, **kw)
        for k in (1, 7, 50, None)
    ]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for r in runs[1:]:
        for a, c in zip(r, runs[0]):
            np.testing.assert_allclose(a, c, rtol=tol, atol=tol)


def test_thread_count_does_not_change_the_kernel_part():
    rng = np.random.default_rng(2)
    x, w, b, t, kw = _problem(rng, 40, 8, 64, np.float32, {"label_smoothing": 0.1})
    a = fx.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, num_threads=1, **kw)
    c = fx.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, num_threads=2, **kw)
    for u, v in zip(a, c):
        np.testing.assert_array_equal(u, v)


def test_no_bias_all_ignored_h1_and_empty():
    rng = np.random.default_rng(3)
    x, w, _, t, _ = _problem(rng, 10, 1, 7, np.float64, {}, bias=False)
    loss, gh, gw, gb = fx.linear_cross_entropy_with_grad(x, w, t, tile_rows=3)
    assert gb is None
    _close(loss, reference(x, w, None, t, "mean")[0], 1e-12)
    ignored = np.full(10, -100)
    loss, gh, gw, _ = fx.linear_cross_entropy_with_grad(x, w, ignored, tile_rows=3)
    assert loss == 0 and not gh.any() and not gw.any()
    loss, gh, gw, gb = fx.linear_cross_entropy_with_grad(
        np.zeros((0, 1)), w, np.zeros(0, np.int64), linear_bias=np.ones(7)
    )
    assert loss == 0 and gh.shape == (0, 1) and not gw.any() and not gb.any()
    rows = fx.linear_cross_entropy(np.zeros((0, 1)), w, np.zeros(0, np.int64), reduction="none")
    assert rows.shape == (0,)


def test_leading_axes_and_single_row():
    rng = np.random.default_rng(4)
    x, w, b, t, _ = _problem(rng, 12, 5, 6, np.float64, {})
    flat = fx.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, reduction="none")
    cube = fx.linear_cross_entropy_with_grad(
        x.reshape(3, 4, 5), w, t.reshape(3, 4), linear_bias=b, reduction="none"
    )
    np.testing.assert_allclose(cube[0], flat[0].reshape(3, 4), rtol=1e-13)
    np.testing.assert_allclose(cube[1], flat[1].reshape(3, 4, 5), rtol=1e-13)
    one = fx.linear_cross_entropy(x[1], w, np.int64(t[1]), linear_bias=b, reduction="none")
    assert one.shape == () and np.isclose(one, flat[0][1])


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_16_bit(half):
    import ml_dtypes

    dt = np.float16 if half == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(5)
    x, w, b, t, kw = _problem(rng, 30, 8, 40, dt, {"label_smoothing": 0.1})
    loss, gh, gw, gb = fx.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, tile_rows=7, **kw)
    assert loss.dtype == np.float32 and gh.dtype == dt and gw.dtype == dt and gb.dtype == dt
    ref = reference(x, w, b, t, "mean", **kw)
    tol = 1e-2 if half == "bfloat16" else 2e-3
    for g, r in zip((loss, gh, gw, gb), ref):
        _close(np.asarray(g, np.float64), r, tol)


def test_out_buffers_are_used():
    rng = np.random.default_rng(6)
    x, w, b, t, _ = _problem(rng, 9, 4, 5, np.float32, {})
    outs = (np.empty_like(x), np.empty_like(w), np.empty_like(b))
    res = fx.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, out=outs)
    assert all(r is o for r, o in zip(res[1:], outs))
    res2 = fx.linear_cross_entropy_with_grad(x, w, t, linear_bias=b, out=(None, outs[1], None))
    assert res2[2] is outs[1] and res2[1] is not outs[0]


@pytest.mark.parametrize(
    "case",
    [
        "bad_target_last_row",
        "w_dtype",
        "w_shape",
        "bias_shape",
        "target_shape",
        "int_hidden",
        "bad_option",
        "out_overlap",
        "out_shape",
        "sample_weight_shape",
        "probs_ignore_index",
    ],
)
def test_errors_write_nothing(case):
    rng = np.random.default_rng(8)
    x, w, b, t, _ = _problem(rng, 11, 4, 6, np.float32, {})
    outs = [np.full_like(x, 7), np.full_like(w, 7), np.full_like(b, 7)]
    args = dict(hidden=x, linear_weight=w, target=t)
    kw: dict = dict(linear_bias=b, tile_rows=2)
    err: type = ValueError
    if case == "bad_target_last_row":
        t = t.copy()
        t[-1] = 6
        args["target"], err = t, IndexError
    elif case == "w_dtype":
        args["linear_weight"], err = w.astype(np.float64), TypeError
    elif case == "w_shape":
        args["linear_weight"] = w[:, :3]
    elif case == "bias_shape":
        kw["linear_bias"] = b[:5]
    elif case == "target_shape":
        args["target"] = t[:5]
    elif case == "int_hidden":
        args["hidden"], err = x.astype(np.int32), TypeError
    elif case == "bad_option":
        kw["label_smoothing"] = 1.5
    elif case == "out_overlap":
        outs[0] = x
    elif case == "out_shape":
        outs[1] = np.full((6, 5), 7, np.float32)
    elif case == "sample_weight_shape":
        kw["sample_weight"] = np.ones(10)
    elif case == "probs_ignore_index":
        args["target"] = np.full((11, 6), 1 / 6, np.float32)
        kw["ignore_index"] = 0
    before = [o.copy() for o in outs]
    x_before = x.copy()
    with pytest.raises(err):
        fx.linear_cross_entropy_with_grad(**args, out=tuple(outs), **kw)
    for o, o0 in zip(outs, before):
        np.testing.assert_array_equal(o, o0)
    np.testing.assert_array_equal(x, x_before)


def test_no_n_by_v_allocation():
    rng = np.random.default_rng(9)
    n, h, v = 2048, 32, 4096
    x = rng.standard_normal((n, h), dtype=np.float32)
    w = rng.standard_normal((v, h), dtype=np.float32) * 0.1
    t = rng.integers(0, v, n)
    outs = (np.empty_like(x), np.empty_like(w), None)
    fx.linear_cross_entropy_with_grad(x[:64], w, t[:64])  # warm-up (imports, caches)
    tracemalloc.start()
    try:
        fx.linear_cross_entropy_with_grad(x, w, t, out=outs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    logits_bytes = n * v * 4
    assert peak <= logits_bytes // 4, (peak, logits_bytes)


# --- A forward pass alone in tiles of the vocabulary (fastxent._linear.run_vocab_tiles) ---


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_vocab_tiles_against_reference(vocab_tiles, dtype, tol, reduction, opt):
    """Every option and reduction, bias or not, V (91) not a multiple of the tile's columns:
    the loss against float64, and against the same forward pass in tiles of rows."""
    rng = np.random.default_rng(len(opt) + 70)
    for bias in (True, False):
        x, w, b, t, kw = _problem(rng, 37, 9, 91, dtype, opt, bias=bias)
        ref = reference(x, w, b, t, reduction, **kw)[0]
        got = fx.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **kw)
        _close(got, ref, tol)
        assert np.asarray(got).dtype == dtype
        assert np.shape(got) == (() if reduction != "none" else (37,))
        rows = fx.linear_cross_entropy(
            x, w, t, linear_bias=b, reduction=reduction, tile_rows=8, **kw
        )
        _close(got, np.asarray(rows, np.float64), tol)
    cols = 5 if dtype == np.float32 else 3
    assert vocab_tiles == [cols, cols]  # the two calls without tile_rows


def test_vocab_tiles_outputs(vocab_tiles):
    """outputs= from the merged statistics: the row kernel's, to rounding; argmax exact."""
    rng = np.random.default_rng(71)
    x, w, b, t, kw = _problem(rng, 37, 9, 91, np.float32, {"label_smoothing": 0.1})
    x[3] *= 40.0  # a peaked row
    names = ("lse", "entropy", "argmax", "target_logprob", "accuracy")
    loss, st = fx.linear_cross_entropy(x, w, t, linear_bias=b, outputs=names, **kw)
    loss_r, st_r = fx.linear_cross_entropy(x, w, t, linear_bias=b, outputs=names, tile_rows=8, **kw)
    assert vocab_tiles == [5]
    _close(loss, np.float64(loss_r), 2e-6)
    for n in ("lse", "entropy", "target_logprob"):
        a, r = getattr(st, n), getattr(st_r, n)
        assert a.dtype == np.float32 and a.shape == (37,)
        np.testing.assert_allclose(a, r, rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(st.argmax, st_r.argmax)
    assert st.accuracy == st_r.accuracy
    z = x.astype(np.float64) @ w.astype(np.float64).T + b
    np.testing.assert_array_equal(st.argmax, z.argmax(1))


def test_vocab_tiles_edge_rows(vocab_tiles):
    """All rows ignored ("mean": 0 as in tiles of rows), non-finite hidden states, leading
    axes."""
    rng = np.random.default_rng(72)
    x, w, b, t, _ = _problem(rng, 37, 9, 91, np.float32, {})
    ignored = np.full(37, -100)
    for red in ("mean", "sum"):
        assert fx.linear_cross_entropy(x, w, ignored, reduction=red) == fx.linear_cross_entropy(
            x, w, ignored, reduction=red, tile_rows=8
        )
    none = fx.linear_cross_entropy(x, w, ignored, reduction="none")
    assert none.shape == (37,) and not none.any()
    bad = x.copy()
    bad[5, 0] = np.nan
    rows = fx.linear_cross_entropy(bad, w, t, linear_bias=b, reduction="none")
    rows_r = fx.linear_cross_entropy(bad, w, t, linear_bias=b, reduction="none", tile_rows=8)
    np.testing.assert_array_equal(np.isnan(rows), np.isnan(rows_r))
    assert np.isnan(rows[5]) and np.isnan(fx.linear_cross_entropy(bad, w, t, linear_bias=b))
    cube = fx.linear_cross_entropy(
        x.reshape(37, 1, 9), w, t.reshape(37, 1), linear_bias=b, reduction="none"
    )
    flat = fx.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none")
    assert cube.shape == (37, 1)
    np.testing.assert_array_equal(cube.reshape(-1), flat)
    assert len(vocab_tiles) == 7


def test_vocab_tiles_only_for_a_default_float_forward(vocab_tiles):
    """Tiles of rows for: gradients, an explicit tile_rows, 16-bit inputs, entropy_coef,
    at least as many rows as classes."""
    import ml_dtypes

    rng = np.random.default_rng(73)
    x, w, b, t, _ = _problem(rng, 37, 9, 91, np.float32, {})
    fx.linear_cross_entropy_with_grad(x, w, t, linear_bias=b)
    fx.linear_cross_entropy(x, w, t, linear_bias=b, tile_rows=8)
    fx.linear_cross_entropy(x.astype(ml_dtypes.bfloat16), w.astype(ml_dtypes.bfloat16), t)
    fx.linear_cross_entropy(x, w, t, entropy_coef=0.1)
    x2, w2, _, t2, _ = _problem(rng, 37, 9, 30, np.float32, {})
    fx.linear_cross_entropy(x2, w2, t2)
    assert vocab_tiles == []
    fx.linear_cross_entropy(x, w, t)
    assert vocab_tiles == [5]


def test_tile_cols_rule():
    from fastxent._linear_plan import _MIN_COLS, _ROUND_COLS, tile_cols

    # The shapes (float32, the forward tile of rows there): 64 MiB tiles.
    assert tile_cols(2048, 128256, 4, 448) == 8192
    assert tile_cols(4096, 32000, 4, 512) == 4096
    assert tile_cols(16384, 32000, 4, 512) == 1024
    assert tile_cols(2048, 128256, 8, 224) == 4096
    assert tile_cols(100, 128256, 4, 100) == 0  # one tile of rows holds them all
    assert tile_cols(32000, 32000, 4, 512) == 0  # as many rows as classes
    assert tile_cols(1000, 2000, 4, 500) == 0  # _MIN_COLS would exceed 2/9 of the classes
    assert tile_cols(4000, 6000, 4, 500) == 1280  # 2/9 of the classes (TILE_BYTES: 4194)
    for n in (33, 1000, 5000, 20000, 70000):
        for v in (1000, 32000, 128256, 256000):
            for size in (4, 8):
                c = tile_cols(n, v, size, 16)
                if c:
                    assert c >= _MIN_COLS and c % _ROUND_COLS == 0
                    assert 9 * c <= 2 * v


def test_vocab_tiles_memory(monkeypatch):
    """The forward pass in tiles of the vocabulary holds one tile (here 1 MiB, 512 classes of
    512 rows) beyond the inputs: far below 1/4 of the 16 MiB logits."""
    from fastxent import _linear_plan

    monkeypatch.setattr(_linear_plan, "TILE_BYTES", 1 << 20)
    rng = np.random.default_rng(74)
    n, h, v = 512, 16, 8192
    x = rng.standard_normal((n, h), dtype=np.float32)
    w = rng.standard_normal((v, h), dtype=np.float32) * 0.1
    t = rng.integers(0, v, n)
    assert _linear_plan.make_plan(
        x.shape, x.dtype, w.shape, w.dtype, None, None, t, t.shape, False, "mean",
        dict(weight=None, ignore_index=-100, label_smoothing=0.0, sample_weight=None,
             z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None, num_threads=None),
        None, 4, forward_only=True,
    ).cols == 512  # fmt: skip
    fx.linear_cross_entropy(x[:64], w, t[:64])  # warm-up (imports, caches)
    tracemalloc.start()
    try:
        loss = fx.linear_cross_entropy(x, w, t)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _close(loss, reference(x, w, None, t, "mean")[0], 2e-6)
    assert peak <= (n * v * 4) // 8, peak


def test_vocab_tiles_16_bit_probabilities_and_refusals(vocab_tiles):
    """bfloat16 / float16 probability targets of float32 hidden states (read as float32 per
    slice); a negative "mean" denominator refused before any tile, on both paths; a plan in
    tiles of the vocabulary refuses to run with gradients."""
    import ml_dtypes

    from fastxent import _linear

    rng = np.random.default_rng(75)
    x, w, b, t, _ = _problem(rng, 37, 9, 91, np.float32, {"probs": True})
    for half in (ml_dtypes.bfloat16, np.float16):
        p16 = t.astype(half)
        got = fx.linear_cross_entropy(x, w, p16, linear_bias=b)
        rows = fx.linear_cross_entropy(x, w, p16, linear_bias=b, tile_rows=8)
        _close(got, np.float64(rows), 2e-6)
        _close(got, reference(x, w, b, p16.astype(np.float64), "mean")[0], 2e-6)
    assert vocab_tiles == [5, 5]
    tc = rng.integers(0, 91, 37)
    for tr in (None, 8):
        with pytest.raises(ValueError, match='"mean" denominator'):
            fx.linear_cross_entropy(x, w, tc, weight=-np.ones(91), tile_rows=tr)
    assert vocab_tiles == [5, 5]
    plan = _linear.make_plan(
        x.shape, x.dtype, w.shape, w.dtype, None, None, tc, tc.shape, False, "sum",
        dict(weight=None, ignore_index=-100, label_smoothing=0.0, sample_weight=None,
             z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None, num_threads=None),
        None, 4, forward_only=True,
    )  # fmt: skip
    assert plan.cols == 5
    with pytest.raises(RuntimeError, match="forward pass alone"):
        _linear.run_tiles(plan, None, (True, False, False))
