"""fx.linear_kl_div / linear_jsd (and _with_grad) and fastxent.torch.linear_kl_div /
linear_jsd: distillation from hidden states and head weights, on row tiles, against a float64
reference that materialises the logits (fx.kl_div_with_logits_with_grad, and PyTorch's
F.kl_div with autograd, in test_distill_linear_torch.py). This file needs no PyTorch."""

import numpy as np
import pytest

import fastxent as fx

N, V, HS, HT = 11, 37, 6, 9


def _inputs(dt=np.float64, lead=(N,), seed=0, bias=True):
    r = np.random.default_rng(seed)
    hs = r.normal(size=lead + (HS,)).astype(dt)
    ws = r.normal(size=(V, HS)).astype(dt)
    ht = r.normal(size=lead + (HT,)).astype(dt)
    wt = r.normal(size=(V, HT)).astype(dt)
    bs = r.normal(size=V).astype(dt) if bias else None
    bt = r.normal(size=V).astype(dt) if bias else None
    return hs, ws, ht, wt, bs, bt


def _reference(hs, ws, ht, wt, bs, bt, jsd=False, **kw):
    """float64, materialising the logits."""
    f = [np.asarray(x, np.float64) if x is not None else None for x in (hs, ws, ht, wt, bs, bt)]
    hs, ws, ht, wt, bs, bt = f
    zs = hs @ ws.T + (0 if bs is None else bs)
    zt = ht @ wt.T + (0 if bt is None else bt)
    fn = fx.jsd_with_logits_with_grad if jsd else fx.kl_div_with_logits_with_grad
    loss, gz = fn(zs, zt, **kw)
    g2 = gz.reshape(-1, V)
    gh = (g2 @ ws).reshape(hs.shape)
    gw = g2.T @ hs.reshape(-1, hs.shape[-1])
    gb = None if bs is None else g2.sum(0)
    return loss, gh, gw, gb


def reference_up(args, jsd, up, **kw):
    """float64 (loss, grad_hs, grad_Ws, grad_bs) of the given (possibly 16-bit, rounded)
    inputs, the gradients of sum(up * loss) ("none": up per row)."""
    f = [None if x is None else np.asarray(x, np.float64) for x in args]
    hs, ws, ht, wt, bs, bt = f
    zs = hs @ ws.T + (0 if bs is None else bs)
    zt = ht @ wt.T + (0 if bt is None else bt)
    fn = fx.jsd_with_logits_with_grad if jsd else fx.kl_div_with_logits_with_grad
    loss, gz = fn(zs, zt, **kw)
    gz = gz * (np.asarray(up)[..., None] if np.ndim(up) else up)
    return loss, gz @ ws, gz.T @ hs, None if bs is None else gz.sum(0)


# (kl or jsd, reduction) cases of the 16-bit tests (half_kw, half_inputs), and their measured
# worst errors (largest absolute error over the largest entry of the float64 result of the
# same rounded inputs, 6 seeds x these cases): NumPy (float32 tiles) bfloat16 3.1e-3, float16
# 4.3e-4; PyTorch (16-bit tiles) bfloat16 1.25e-2, float16 2.0e-3; JAX (float32 tiles)
# bfloat16 8.0e-3, float16 8.4e-4. The bounds below are about 3x those.
HALF_CASES = [(False, "mean"), (True, "none"), (False, "sum")]
HALF_TOL = {
    ("numpy", "bfloat16"): 1e-2,
    ("numpy", "float16"): 1.5e-3,
    ("torch", "bfloat16"): 4e-2,
    ("torch", "float16"): 6e-3,
    ("jax", "bfloat16"): 2.5e-2,
    ("jax", "float16"): 2.5e-3,
}


def half_kw(jsd, reduction):
    """The 16-bit cases' keywords (NumPy arrays): "mean" with labels and an ignore_index,
    "none" with a mask and sample weights, "sum" plain (and without biases: half_inputs)."""
    kw = dict(reduction=reduction, temperature=2.0, **({"beta": 0.3} if jsd else {}))
    r = np.random.default_rng(5)
    if reduction == "mean":
        lab = r.integers(0, V, N)
        lab[::4] = 7
        kw.update(labels=lab, ignore_index=7)
    if reduction == "none":
        kw.update(mask=np.arange(N) % 3 != 1, sample_weight=r.uniform(0.2, 2.0, N))
    return kw


def half_inputs(reduction):
    return _inputs(bias=reduction != "sum")


def rel_error(got, want):
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("jsd, reduction", HALF_CASES)
def test_16bit_inputs(dtype, jsd, reduction):
    """float16 / bfloat16 inputs (multiplied in float32: NumPy has no 16-bit BLAS): the
    loss float32, the gradients in the input dtype, against the float64 result of the same
    rounded inputs; the loss alone equal to the _with_grad loss."""
    dt = np.float16 if dtype == "float16" else pytest.importorskip("ml_dtypes").bfloat16
    args = tuple(None if x is None else x.astype(dt) for x in half_inputs(reduction))
    kw = half_kw(jsd, reduction)
    loss, gh, gw, gb = _call(args, jsd, True, tile_rows=4, **kw)
    assert loss.dtype == np.float32 and gh.dtype == gw.dtype == np.dtype(dt)
    want = reference_up(args, jsd, 1.0, **kw)
    assert (gb is None) == (want[3] is None) == (reduction == "sum")
    for got, w in zip((loss, gh, gw, gb), want):
        if w is not None:
            assert got.dtype in (np.float32, np.dtype(dt))
            assert rel_error(got, w) <= HALF_TOL["numpy", dtype]
    np.testing.assert_array_equal(_call(args, jsd, False, tile_rows=4, **kw), loss)


def _call(args, jsd, grad, **kw):
    hs, ws, ht, wt, bs, bt = args
    if jsd:
        fn = fx.linear_jsd_with_grad if grad else fx.linear_jsd
    else:
        fn = fx.linear_kl_div_with_grad if grad else fx.linear_kl_div
    return fn(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, **kw)


def _close(got, want, rtol=1e-12, atol=1e-13):
    assert (got is None) == (want is None)
    if want is not None:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


VARIANTS = [
    ({"direction": "forward"}, False),
    ({"direction": "reverse"}, False),
    ({"beta": 0.5}, True),
    ({"beta": 0.2}, True),
    ({"beta": 1.0}, True),
]


@pytest.mark.parametrize("var,jsd", VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense_reference(var, jsd, reduction, temperature, bias):
    args = _inputs(bias=bias)
    kw = dict(var, reduction=reduction, temperature=temperature)
    want = _reference(*args, jsd=jsd, **kw)
    for tile in (None, 1, 4, N):  # N = 11 is no multiple of 4
        got = _call(args, jsd, True, tile_rows=tile, **kw)
        for g, w in zip(got, want):
            _close(g, w)
        _close(_call(args, jsd, False, tile_rows=tile, **kw), want[0])


ROW_WEIGHTS = [
    {"labels": np.array([0, -100, 3, 4, -100, 1, 2, 2, 0, 5, -100])},
    {"labels": np.array([0, 7, 3, 4, 7, 1, 2, 2, 0, 5, 7]), "ignore_index": 7},
    {"mask": np.array([True, False] * 5 + [True])},
    {"sample_weight": np.linspace(0.0, 2.0, N)},
    {"sample_weight": np.linspace(0.5, 2.0, N), "mask": np.arange(N) % 3 != 0},
    {"mask": np.zeros(N, bool)},  # "mean" over nothing: 0
]


@pytest.mark.parametrize("rows", ROW_WEIGHTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("jsd", [False, True])
def test_row_weights(rows, reduction, jsd):
    args = _inputs()
    kw = dict(rows, reduction=reduction, temperature=2.0)
    want = _reference(*args, jsd=jsd, **kw)
    got = _call(args, jsd, True, tile_rows=3, **kw)
    for g, w in zip(got, want):
        _close(g, w)


def test_leading_axes():
    lead = (2, 3, 4)
    args = _inputs(lead=lead)
    mask = np.random.default_rng(1).random(lead) > 0.3
    for red in ("mean", "none"):
        kw = dict(reduction=red, mask=mask, direction="reverse", temperature=1.5)
        want = _reference(*args, **kw)
        got = _call(args, False, True, tile_rows=5, **kw)
        assert got[1].shape == args[0].shape
        if red == "none":
            assert got[0].shape == lead
        for g, w in zip(got, want):
            _close(g, w)


def test_float32_tolerance():
    # measured (seeds 0-4, T = 1 and 4, every direction and JSD, tile_rows=4) against float64:
    # loss up to 4.5e-7 relative, gradients up to 9.3e-7 of their largest entry; bounds ~10x
    worst = 0.0
    for seed in range(3):
        a64 = _inputs(seed=seed)
        a32 = tuple(None if x is None else x.astype(np.float32) for x in a64)
        for var, jsd in VARIANTS:
            for t in (1.0, 4.0):
                kw = dict(var, temperature=t, reduction="sum")
                want = _reference(*a32, jsd=jsd, **kw)
                got = _call(a32, jsd, True, tile_rows=4, **kw)
                assert got[0].dtype == np.float32
                assert all(g.dtype == np.float32 for g in got[1:])
                assert abs(got[0] - want[0]) <= 5e-6 * abs(want[0])
                for g, w in zip(got[1:], want[1:]):
                    err = float(np.abs(g - w).max() / np.abs(w).max())
                    worst = max(worst, err)
                    assert err < 1e-5
    assert worst > 0  # float32 really ran in float32


def test_deterministic_across_threads():
    a = tuple(None if x is None else x.astype(np.float32) for x in _inputs(lead=(40,)))
    ref = _call(a, True, True, tile_rows=7, num_threads=1, beta=0.3)
    for nt in (2, 4):
        got = _call(a, True, True, tile_rows=7, num_threads=nt, beta=0.3)
        for g, w in zip(got, ref):
            assert np.array_equal(g, w)
    # Nor does the loss depend on the tile size (float64 row losses, summed in order), beyond
    # the BLAS's own rounding: a tile's logits come from its matmul, and OpenBLAS on a Zen 4
    # rounds a 1-row product (GEMV) differently from a many-row one (the loss then moved by 1
    # ulp under the scalar kernel). So this part uses inputs whose products are exact (quarters
    # of at most 4 in magnitude, H <= 9: every partial sum is a multiple of 1/16 below 2^10),
    # giving the same logits in any order, and checks fastxent's part bit for bit.
    q = tuple(
        None if x is None else np.round(np.clip(x, -4, 4) * 4).astype(np.float32) / 4 for x in a
    )
    want = _call(q, True, False, tile_rows=7, beta=0.3)
    for tile in (1, 5, 40):
        assert _call(q, True, False, tile_rows=tile, beta=0.3) == want


def test_empty_rows():
    args = _inputs(lead=(0,))
    loss, gh, gw, gb = _call(args, False, True)
    assert loss == 0 and gh.shape == (0, HS)
    assert not gw.any() and not gb.any()
    assert _call(args, False, False, reduction="none").shape == (0,)


def _bad_cases():
    hs, ws, ht, wt, bs, bt = _inputs()
    f32 = np.float32
    return [
        ((hs.astype(f32), ws, ht, wt, bs, bt), {}, TypeError, "dtype"),
        ((hs, ws, ht.astype(f32), wt, bs, bt), {}, TypeError, "teacher_hidden"),
        ((hs, ws, ht, wt, bs, bt.astype(f32)), {}, TypeError, "teacher_bias"),
        ((hs.astype(np.int64), ws, ht, wt, bs, bt), {}, TypeError, "float16 or bfloat16"),
        (
            (hs.astype(np.float16), ws.astype(np.float16), ht, wt, bs, bt),
            {},
            TypeError,
            "teacher_hidden has dtype",
        ),  # fmt: skip
        ((hs[:-1], ws, ht, wt, bs, bt), {}, ValueError, "leading shapes"),
        ((hs, ws[:-1], ht, wt, bs[:-1], bt), {}, ValueError, "vocabulary"),
        ((hs, ws[:, :-1], ht, wt, bs, bt), {}, ValueError, "student_weight"),
        ((hs, ws, ht, wt[:, :-1], bs, bt), {}, ValueError, "teacher_weight"),
        ((hs, ws, ht, wt, bs[:-1], bt), {}, ValueError, "student_bias"),
        ((hs, ws[:0], ht, wt[:0], None, None), {}, ValueError, "V = 0"),
        ((hs[0, 0], ws, ht, wt, bs, bt), {}, ValueError, "at least one dimension"),
        ((hs, ws, ht, wt, bs, bt), {"direction": "both"}, ValueError, "direction"),
        ((hs, ws, ht, wt, bs, bt), {"temperature": 0.0}, ValueError, "temperature"),
        ((hs, ws, ht, wt, bs, bt), {"temperature": 1e3}, ValueError, "temperature"),
        ((hs, ws, ht, wt, bs, bt), {"reduction": "avg"}, ValueError, "reduction"),
        ((hs, ws, ht, wt, bs, bt), {"mask": np.ones(N - 1, bool)}, ValueError, "mask"),
        ((hs, ws, ht, wt, bs, bt), {"labels": np.ones(N)}, TypeError, "labels"),
        ((hs, ws, ht, wt, bs, bt), {"sample_weight": -np.ones(N)}, ValueError, "sample_w"),
        ((hs, ws, ht, wt, bs, bt), {"tile_rows": 0}, ValueError, "tile_rows"),
        ((hs, ws, ht, wt, bs, bt), {"num_threads": 0}, ValueError, "num_threads"),
        ((hs, ws, ht, wt, bs, bt), {"num_threads": 2**40}, ValueError, "at most 2147483647"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
@pytest.mark.parametrize("grad", [False, True])
def test_errors_before_anything(case, grad):
    args, kw, exc, msg = _bad_cases()[case]
    before = [None if a is None else a.copy() for a in args]
    with pytest.raises(exc, match=msg):
        _call(args, False, grad, **kw)
    for a, b in zip(args, before):
        assert (a is None) or np.array_equal(a, b)


def test_jsd_beta_checked():
    with pytest.raises(ValueError, match="beta"):
        _call(_inputs(), True, True, beta=1.5)
