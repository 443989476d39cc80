"""Per-row outputs from the same pass (outputs=: lse, entropy, argmax, target_logprob,
accuracy) and the entropy bonus (entropy_coef) of fastxent.cross_entropy(_with_grad), issue
#23 section 1: against float64 NumPy references, finite differences, every ISA, threads, and
the error paths."""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from reference import (
    assert_bitwise_equal,
    central_difference_grad,
    option_kwargs,
    transform_ref,
)

ALL = ("lse", "entropy", "argmax", "target_logprob", "accuracy")

# Largest errors measured against the float64 reference (every ISA, the cases below), with
# the tolerance a little above:
#   float32: lse 4.8e-7 relative to max(1, |lse|); entropy 6.0e-7 relative to max(1, lse - M
#   + |M|) (its terms); target_logprob 7.2e-7 relative to max(1, |z'_y|, |lse|); the
#   entropy_coef gradient 4.5e-8 relative to max |grad| (C = 5000).
#   float64: all below 2.3e-15 on the same scales.
TOL = {np.float32: 4e-6, np.float64: 1e-13}


def ref_rows(z, y, softcap=None, logit_scale=1.0, ignore_index=-100):
    """float64 lse, entropy, argmax, target_logprob per row (class targets or None)."""
    zt, _ = transform_ref(z, softcap, logit_scale)
    m = zt.max(-1, keepdims=True)
    e = np.exp(zt - m)
    S = e.sum(-1, keepdims=True)
    lse = (m + np.log(S))[..., 0]
    p = e / S
    pz = np.where(p > 0, p * np.where(p > 0, zt - m, 0.0), 0.0).sum(-1)
    ent = np.log(S[..., 0]) - pz
    am = np.argmax(np.asarray(z, np.float64), -1)
    tlp = None
    if y is not None:
        counted = y != ignore_index
        yc = np.where(counted, y, 0)
        tlp = np.where(counted, np.take_along_axis(zt, yc[..., None], -1)[..., 0] - lse, 0.0)
    return lse, ent, am, tlp


def ref_loss(
    z,
    y,
    *,
    beta=0.0,
    reduction="mean",
    weight=None,
    sample_weight=None,
    label_smoothing=0.0,
    softcap=None,
    logit_scale=1.0,
    ignore_index=-100,
    normalizer=None,
):
    """The float64 loss CE - beta * reduce(s_n H_n) for class targets (differentiable by
    central differences)."""
    zt, _ = transform_ref(z, softcap, logit_scale)
    C = zt.shape[-1]
    m = zt.max(-1, keepdims=True)
    lse = m + np.log(np.exp(zt - m).sum(-1, keepdims=True))
    logp = zt - lse
    p = np.exp(logp)
    H = -(p * logp).sum(-1)
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    s = np.ones(y.shape) if sample_weight is None else np.asarray(sample_weight, np.float64)
    counted = y != ignore_index
    yc = np.where(counted, y, 0)
    eps = label_smoothing
    row = (1 - eps) * w[yc] * -np.take_along_axis(logp, yc[..., None], -1)[..., 0]
    row = row + eps / C * (w * -logp).sum(-1)
    row = np.where(counted, s * (row - beta * H), 0.0)
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    D = normalizer if normalizer is not None else (s * w[yc] * counted).sum()
    return row.sum() / D if D != 0 else 0.0


def ref_grad(z, y, **kw):
    """The analytic gradient of ref_loss ("sum" / "mean") in float64."""
    beta = kw.get("beta", 0.0)
    zt, dz = transform_ref(z, kw.get("softcap"), kw.get("logit_scale", 1.0))
    C = zt.shape[-1]
    m = zt.max(-1, keepdims=True)
    p = np.exp(zt - m)
    p /= p.sum(-1, keepdims=True)
    w = np.ones(C) if kw.get("weight") is None else np.asarray(kw["weight"], np.float64)
    s = np.ones(y.shape) if kw.get("sample_weight") is None else kw["sample_weight"]
    s = np.asarray(s, np.float64)
    ii = kw.get("ignore_index", -100)
    counted = y != ii
    yc = np.where(counted, y, 0)
    eps = kw.get("label_smoothing", 0.0)
    q = eps / C * np.broadcast_to(w, zt.shape).copy()
    np.put_along_axis(
        q,
        yc[..., None],
        np.take_along_axis(q, yc[..., None], -1) + ((1 - eps) * w[yc])[..., None],
        -1,
    )
    g = q.sum(-1, keepdims=True) * p - q
    zbar = (p * zt).sum(-1, keepdims=True)
    g = g + beta * p * (zt - zbar)
    g = np.where(counted[..., None], s[..., None] * g * dz, 0.0)
    if kw.get("reduction", "mean") == "mean":
        D = kw.get("normalizer")
        if D is None:
            D = (s * w[yc] * counted).sum()
        g = g / D if D != 0 else 0.0 * g
    return g


def _case(rng, N, C, dtype, scale=3.0, ignore=True):
    z = (rng.standard_normal((N, C)) * scale).astype(dtype)
    y = rng.integers(0, C, N)
    if ignore and N > 2:
        y[1] = -100
    return z, y


def _rel(got, ref, scale):
    got = np.asarray(got, np.float64)
    return float(np.max(np.abs(got - ref) / scale)) if got.size else 0.0


OPTION_CASES = [
    {},
    {"logit_scale": 0.7},
    {"softcap": 30.0},  # the fixed shift
    {"softcap": 50.0, "logit_scale": 1.3},  # the softcap with the block max
    {"label_smoothing": 0.1, "reduction": "sum"},
    {"weight": "w", "sample_weight": "s", "reduction": "none"},
    {"weight": "w", "label_smoothing": 0.2, "reduction": "mean", "normalizer": 7.0},
]


def _check_stats(st, z, y, kw, dtype):
    lse, ent, am, tlp = ref_rows(z, y, kw.get("softcap"), kw.get("logit_scale", 1.0))
    tol = TOL[dtype]
    assert st.lse.dtype == dtype and st.entropy.dtype == dtype and st.argmax.dtype == np.int64
    assert _rel(st.lse, lse, np.maximum(1.0, np.abs(lse))) < tol
    zt, _ = transform_ref(z, kw.get("softcap"), kw.get("logit_scale", 1.0))
    M = zt.max(-1)
    assert _rel(st.entropy, ent, np.maximum(1.0, np.abs(lse - M) + np.abs(M))) < tol
    np.testing.assert_array_equal(st.argmax, am)
    zy = np.take_along_axis(zt, np.where(y >= 0, y, 0)[:, None], -1)[:, 0]
    assert _rel(st.target_logprob, tlp, np.maximum(1.0, np.maximum(np.abs(zy), np.abs(lse)))) < tol
    counted = y != -100
    acc = float(np.mean(am[counted] == y[counted]))
    assert st.accuracy == pytest.approx(acc, abs=0, rel=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [7, 100, 5000])
@pytest.mark.parametrize("case", range(len(OPTION_CASES)))
def test_outputs_match_reference_and_leave_loss_and_grad_bitwise(isa, rng, dtype, C, case):
    N = 5
    z, y = _case(rng, N, C, dtype)
    if C >= 100:
        y[0] = int(np.argmax(z[0]))  # one row right, for the accuracy
    kw = option_kwargs(OPTION_CASES[case], rng, N, C, dtype)
    loss0 = fx.cross_entropy(z, y, **kw)
    loss1, st1 = fx.cross_entropy(z, y, outputs=ALL, **kw)
    assert_bitwise_equal(loss1, loss0, "loss with outputs")
    _check_stats(st1, z, y, kw, dtype)
    lg0, g0 = fx.cross_entropy_with_grad(z, y, **kw)
    lg1, g1, st2 = fx.cross_entropy_with_grad(z, y, outputs=ALL, **kw)
    assert_bitwise_equal(lg1, lg0, "loss with grad and outputs")
    assert_bitwise_equal(g1, g0, "grad with outputs")
    for f in ALL:
        assert_bitwise_equal(np.asarray(getattr(st2, f)), np.asarray(getattr(st1, f)), f)
    # The plain loss also matches the float64 reference of the whole formula (beta = 0).
    ref = ref_loss(z.astype(np.float64), y, **{k: v for k, v in kw.items()})
    scale = np.maximum(1.0, np.abs(ref))
    assert np.max(np.abs(np.asarray(loss1, np.float64) - ref) / scale) < 1e3 * TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "bfloat16"])
@pytest.mark.parametrize("C", [7, 100, 5000])
@pytest.mark.parametrize("case", [0, 3, 5])
def test_every_subset_of_outputs_gives_the_values_of_all(isa, rng, dtype, C, case):
    """Each output does not depend on which others are asked for: every subset of names, by
    the forward and the fused kernel, gives the bits of outputs=ALL (which the test above
    checks against float64). Regression: lse and target_logprob asked for without entropy
    once came out as the row max (log S was only kept for the entropy) on rows longer than
    the short-row path's."""
    import itertools

    import ml_dtypes

    N = 6
    z, y = _case(rng, N, C, np.float32)
    kw = option_kwargs(OPTION_CASES[case], rng, N, C, np.float32)
    if dtype == "bfloat16":
        z = z.astype(ml_dtypes.bfloat16)
    else:
        z = z.astype(dtype)
        kw = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    _, full = fx.cross_entropy(z, y, outputs=ALL, **kw)
    for k in range(1, len(ALL)):
        for names in itertools.combinations(ALL, k):
            for grad in (False, True):
                res = (fx.cross_entropy_with_grad if grad else fx.cross_entropy)(
                    z, y, outputs=names, **kw
                )
                st = res[-1]
                for f in ALL:
                    got = getattr(st, f)
                    if f not in names:
                        assert got is None, (names, f)
                        continue
                    assert_bitwise_equal(
                        np.asarray(got), np.asarray(getattr(full, f)), f"{f} of {names}"
                    )


def test_only_requested_fields_and_shapes():
    z = np.random.default_rng(0).standard_normal((2, 3, 11)).astype(np.float32)
    y = np.zeros((2, 3), np.int64)
    loss, st = fx.cross_entropy(z, y, outputs=("entropy",))
    assert isinstance(st, fx.RowStats)
    assert st.entropy.shape == (2, 3) and st.lse is None and st.argmax is None
    assert st.target_logprob is None and st.accuracy is None
    _, st = fx.cross_entropy(z, y, outputs=("accuracy",))
    assert isinstance(st.accuracy, float) and st.argmax is None
    _, _, st = fx.cross_entropy_with_grad(z, y, outputs=())
    assert st == fx.RowStats()
    # Zero rows: empty outputs, accuracy 0.
    _, st = fx.cross_entropy(z[:0], y[:0], outputs=ALL)
    assert st.lse.shape == (0, 3) and st.argmax.shape == (0, 3) and st.accuracy == 0.0


def test_probability_targets(isa, rng):
    z, _ = _case(rng, 6, 300, np.float64)
    pt = rng.uniform(0, 1, z.shape)
    pt /= pt.sum(-1, keepdims=True)
    l0, g0 = fx.cross_entropy_with_grad(z, pt)
    l1, g1, st = fx.cross_entropy_with_grad(z, pt, outputs=("lse", "entropy", "argmax"))
    assert_bitwise_equal(l1, l0)
    assert_bitwise_equal(g1, g0)
    lse, ent, am, _ = ref_rows(z, None)
    assert _rel(st.lse, lse, 1.0) < 1e-13 and _rel(st.entropy, ent, 1.0) < 1e-13
    np.testing.assert_array_equal(st.argmax, am)
    # The entropy term with probability targets: the plain gradient plus beta s p (z' - zbar).
    beta = 0.3
    l2, g2 = fx.cross_entropy_with_grad(z, pt, entropy_coef=beta, reduction="sum")
    l3, g3 = fx.cross_entropy_with_grad(z, pt, reduction="sum")
    p = np.exp(z - lse[:, None])
    want = g3 + beta * p * (z - (p * z).sum(-1, keepdims=True))
    assert np.max(np.abs(g2 - want)) < 1e-14  # measured 1.2e-15
    assert abs(l2 - (l3 - beta * ent.sum())) < 1e-12 * abs(l3)
    with pytest.raises(ValueError, match="class-index targets"):
        fx.cross_entropy(z, pt, outputs=("target_logprob",))


BETA_CASES = [
    {"reduction": "sum"},
    {"reduction": "mean"},
    {"reduction": "mean", "logit_scale": 0.6},
    {"reduction": "sum", "softcap": 2.5},
    {"reduction": "mean", "softcap": 40.0, "logit_scale": 2.0},
    {"reduction": "mean", "weight": "w", "sample_weight": "s", "label_smoothing": 0.15},
    {"reduction": "sum", "weight": "w", "label_smoothing": 0.3, "normalizer": 3.0},
]


@pytest.mark.parametrize("case", range(len(BETA_CASES)))
def test_entropy_coef_gradient_by_central_differences(isa, rng, case):
    N, C, beta = 4, 9, 0.37
    z, y = _case(rng, N, C, np.float64, scale=1.5)
    kw = option_kwargs(BETA_CASES[case], rng, N, C, np.float64)
    loss, g = fx.cross_entropy_with_grad(z, y, entropy_coef=beta, **kw)
    f = lambda zz: ref_loss(zz, y, beta=beta, **kw)  # noqa: E731
    assert abs(loss - f(z)) < 1e-14 * max(1.0, abs(f(z)))
    fd = central_difference_grad(f, z)
    # central differences with h = 1e-5: measured 3e-10 at most (truncation and rounding).
    assert np.max(np.abs(g - fd)) < 2e-9
    # and the analytic formula: measured 1.1e-16.
    assert np.max(np.abs(g - ref_grad(z, y, beta=beta, **kw))) < 1e-14
    # "none": each row's gradient is that of the sum.
    if kw["reduction"] == "sum" and "normalizer" not in kw:
        rows, g2 = fx.cross_entropy_with_grad(
            z, y, entropy_coef=beta, **{**kw, "reduction": "none"}
        )
        assert_bitwise_equal(g2, g)
        np.testing.assert_allclose(
            rows, ref_loss(z, y, beta=beta, **{**kw, "reduction": "none"}), rtol=1e-14, atol=1e-14
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", [{}, {"softcap": 20.0}, {"softcap": 60.0}, {"logit_scale": 1.7}])
def test_entropy_coef_long_rows_against_formula(isa, rng, dtype, opts):
    N, C, beta = 3, 5000, 0.8
    z, y = _case(rng, N, C, dtype, scale=4.0)
    loss, g, st = fx.cross_entropy_with_grad(z, y, entropy_coef=beta, outputs=("entropy",), **opts)
    want = ref_grad(z.astype(np.float64), y, beta=beta, **opts)
    err = _rel(g, want, np.abs(want).max())
    # The float32 error is that of the plain call's z' (the softcap's tanh in float32):
    # measured at most 4.1e-6 with beta (softcap 60) where the plain call on the same rows
    # gives 1.8e-6; float64 at most 1.4e-14 (logit_scale 1.7; the plain call 6.5e-16).
    _, g0 = fx.cross_entropy_with_grad(z, y, **opts)
    want0 = ref_grad(z.astype(np.float64), y, **opts)
    err0 = _rel(g0, want0, np.abs(want0).max())
    assert err < (3 * err0 + 1e-6 if dtype == np.float32 else 1e-13)
    ref = ref_loss(z.astype(np.float64), y, beta=beta, **opts)
    assert abs(float(loss) - ref) < (1e-5 if dtype == np.float32 else 1e-13) * max(1.0, abs(ref))
    # The reported entropy is the one the loss subtracts.
    l0 = fx.cross_entropy(z, y, **opts)
    D = float(np.count_nonzero(y != -100))
    assert abs(
        float(loss)
        - (float(l0) - beta * float(np.sum(st.entropy[y != -100], dtype=np.float64)) / D)
    ) < (1e-5 if dtype == np.float32 else 1e-13) * max(1.0, abs(ref))


def test_argmax_ties_and_nan_rows(isa):
    z = np.array(
        [
            [1.0, 3.0, 3.0, 2.0],
            [5.0, 5.0, 5.0, 5.0],
            [0.0, np.nan, 9.0, np.nan],
            [-np.inf, -np.inf, -np.inf, -np.inf],
            [-np.inf, 2.0, -np.inf, 2.0],
            [np.inf, 1.0, np.inf, 0.0],
        ],
        dtype=np.float32,
    )
    y = np.array([2, 0, 0, 1, 3, 0])
    _, st = fx.cross_entropy(z, y, reduction="none", outputs=ALL)
    np.testing.assert_array_equal(st.argmax, [1, 0, 1, 0, 1, 0])
    assert np.isnan(st.lse[2]) and np.isnan(st.entropy[2]) and np.isnan(st.target_logprob[2])
    # All -inf: lse -inf, target_logprob -inf, entropy log C.
    assert st.lse[3] == -np.inf and st.target_logprob[3] == -np.inf
    assert st.entropy[3] == np.float32(np.log(4.0))
    np.testing.assert_allclose(st.entropy[4], np.log(2.0), rtol=1e-6)
    assert st.target_logprob[4] == np.float32(-np.log(2.0))
    assert st.accuracy == pytest.approx(2 / 6)
    # A long row: the first of equal maxima in a later block, and ties across blocks.
    for dtype in (np.float32, np.float64):
        B = fx._core.block_classes(np.dtype(dtype).itemsize)
        zz = np.zeros((3, 3 * B + 5), dtype)
        zz[0, B + 17] = zz[0, 2 * B + 3] = 4.0
        zz[1, 5] = zz[1, 3 * B + 2] = 1.0
        zz[2, 2 * B + 1] = np.nan
        _, st = fx.cross_entropy(zz, np.zeros(3, np.int64), outputs=("argmax",), softcap=10.0)
        np.testing.assert_array_equal(st.argmax, [B + 17, 5, 2 * B + 1])
        _, st = fx.cross_entropy(zz, np.zeros(3, np.int64), outputs=("argmax",))
        np.testing.assert_array_equal(st.argmax, [B + 17, 5, 2 * B + 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_rows(isa, dtype):
    big = 3e38 if dtype == np.float32 else 1e300
    z = np.array([[big, -big, 0.0, big], [-big, -big, -big, 0.0]], dtype)
    y = np.array([0, 3])
    loss, g, st = fx.cross_entropy_with_grad(z, y, reduction="none", outputs=ALL, entropy_coef=0.5)
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(loss))
    np.testing.assert_array_equal(st.argmax, [0, 3])
    np.testing.assert_allclose(st.lse, [big + np.log(2.0), 0.0], rtol=1e-6)
    np.testing.assert_allclose(st.entropy, [np.log(2.0), 0.0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st.target_logprob, [-np.log(2.0), 0.0], rtol=1e-6, atol=1e-6)
    # Row 0: p = (1/2, 0, 0, 1/2), the entropy term p (z' - zbar) is 0 everywhere.
    np.testing.assert_allclose(g[0], [-0.5, 0.0, 0.0, 0.5], atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_in_place_and_layouts_bitwise(rng, dtype):
    B = fx._core.block_classes(np.dtype(dtype).itemsize)
    z, y = _case(rng, 9, 2 * B + 300, dtype)
    kw = dict(outputs=ALL, entropy_coef=0.25, softcap=45.0, label_smoothing=0.05, reduction="sum")
    l1, g1, s1 = fx.cross_entropy_with_grad(z, y, num_threads=1, **kw)
    l2, g2, s2 = fx.cross_entropy_with_grad(z, y, num_threads=2, **kw)
    # Fewer rows than threads (the plain call would split the rows by blocks).
    l3, g3, s3 = fx.cross_entropy_with_grad(z[:1], y[:1], num_threads=2, **kw)
    assert_bitwise_equal(l1, l2)
    assert_bitwise_equal(g1, g2)
    assert_bitwise_equal(g3, g1[:1])
    zi = z.copy()
    l4, g4, s4 = fx.cross_entropy_with_grad(zi, y, out=zi, **kw)  # in place
    assert g4 is zi
    assert_bitwise_equal(l4, l1)
    assert_bitwise_equal(g4, g1)
    zs = np.zeros((9, 2 * (2 * B + 300)), dtype)[:, ::2]  # strided logits
    zs[...] = z
    l5, g5, s5 = fx.cross_entropy_with_grad(zs, y, **kw)
    assert_bitwise_equal(g5, g1)
    for f in ("lse", "entropy", "argmax", "target_logprob"):
        for s in (s2, s4, s5):
            assert_bitwise_equal(getattr(s, f), getattr(s1, f), f)
        assert_bitwise_equal(getattr(s3, f), getattr(s1, f)[:1], f)


def test_short_rows(isa, rng):
    # C <= 32 goes through the column kernel: with outputs it keeps its bits (the outputs from
    # a pass of their own), in place too; the entropy term takes the row kernel.
    z, y = _case(rng, 40, 20, np.float32)
    l0, g0 = fx.cross_entropy_with_grad(z, y)
    l1, g1, st = fx.cross_entropy_with_grad(z, y, outputs=ALL)
    assert_bitwise_equal(l1, l0)
    assert_bitwise_equal(g1, g0)
    _check_stats(st, z, y, {}, np.float32)
    zi = z.copy()
    l2, g2, st2 = fx.cross_entropy_with_grad(zi, y, out=zi, outputs=ALL)
    assert_bitwise_equal(g2, g0)
    assert_bitwise_equal(st2.argmax, st.argmax)
    assert_bitwise_equal(st2.entropy, st.entropy)
    l3, g3 = fx.cross_entropy_with_grad(z, y, entropy_coef=0.4, softcap=3.0)
    want = ref_grad(z.astype(np.float64), y, beta=0.4, softcap=3.0)
    assert _rel(g3, want, np.abs(want).max()) < 1e-6


def test_zero_denominator_rows_keep_their_target_logprob(isa):
    z = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    y = np.array([1, -100])
    w = np.array([1.0, 0.0, 1.0])  # D = 0: no row counts, the loss is 0
    loss, st = fx.cross_entropy(z, y, weight=w, outputs=ALL)
    assert loss == 0.0
    lse, _, _, tlp = ref_rows(z, y)
    np.testing.assert_allclose(st.target_logprob, tlp, rtol=1e-15)
    assert st.target_logprob[1] == 0.0 and st.accuracy == 1.0


def test_errors_leave_out_untouched():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4, 10)).astype(np.float32)
    y = np.array([1, 2, 3, 4])
    out = np.full_like(z, 7.0)
    keep = z.copy()
    cases = [
        (dict(outputs=("lse", "entopy")), ValueError, "unknown output 'entopy'"),
        (dict(outputs="lse"), TypeError, "tuple of names"),
        (dict(outputs=("lse", "lse")), ValueError, "repeated"),
        (dict(entropy_coef=-0.1), ValueError, "entropy_coef"),
        (dict(entropy_coef=float("nan")), ValueError, "entropy_coef"),
        (dict(entropy_coef="x"), TypeError, "entropy_coef"),
        (dict(outputs=("lse",), axis=0), NotImplementedError, "axis"),
        (dict(entropy_coef=0.1, axis=0), NotImplementedError, "axis"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fx.cross_entropy_with_grad(
                z, y if kw.get("axis") != 0 else np.zeros(10, np.int64), out=out, **kw
            )
        assert np.all(out == 7.0), kw
        with pytest.raises(exc, match=msg):
            fx.cross_entropy_with_grad(
                z, y if kw.get("axis") != 0 else np.zeros(10, np.int64), out=z, **kw
            )
        assert_bitwise_equal(z, keep, "in-place logits after an error")
    # A bad label with outputs: nothing written either.
    with pytest.raises(IndexError):
        fx.cross_entropy_with_grad(
            z, np.array([1, 2, 30, 4]), out=out, outputs=ALL, entropy_coef=1.0
        )
    assert np.all(out == 7.0)


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
@pytest.mark.parametrize("C", [7, 1000, 5000])
def test_16_bit_logits_are_the_float32_call_on_their_values(isa, rng, kind, C):
    """16-bit logits (the chunked float32 path): statistics, loss and gradient are those of the
    float32 call on the converted logits bit for bit (the gradient rounded once), and the loss
    and gradient those of the call without outputs; threads, in place, probability targets."""
    ml = pytest.importorskip("ml_dtypes")
    dt = np.dtype(getattr(ml, kind) if kind == "bfloat16" else np.float16)
    N = 37
    z = (3 * rng.standard_normal((N, C))).astype(dt)
    y = rng.integers(0, C, N)
    y[[1, 20]] = -100
    cases = [
        {},
        dict(entropy_coef=0.3, sample_weight=rng.uniform(0, 2, N).astype(np.float32)),
        dict(label_smoothing=0.1, softcap=5.0, reduction="none", weight=rng.uniform(0.5, 2, C)),
    ]
    for kw in cases:
        if "weight" in kw:
            kw["weight"] = kw["weight"].astype(np.float32)
        l1, g1, s1 = fx.cross_entropy_with_grad(z, y, outputs=ALL, num_threads=1, **kw)
        l32, g32, s32 = fx.cross_entropy_with_grad(z.astype(np.float32), y, outputs=ALL, **kw)
        assert_bitwise_equal(l1, np.asarray(l32, np.float32), "loss")
        assert_bitwise_equal(g1, g32.astype(dt), "grad")
        for f in ("lse", "entropy", "argmax", "target_logprob"):
            assert_bitwise_equal(getattr(s1, f), getattr(s32, f), f)
        assert s1.accuracy == s32.accuracy
        if "entropy_coef" not in kw:
            l0, g0 = fx.cross_entropy_with_grad(z, y, **kw)
            assert_bitwise_equal(l1, l0, "loss without outputs")
            assert_bitwise_equal(g1, g0, "grad without outputs")
        l2, g2, s2 = fx.cross_entropy_with_grad(z, y, outputs=ALL, num_threads=3, **kw)
        zi = z.copy()
        l3, g3, s3 = fx.cross_entropy_with_grad(zi, y, outputs=ALL, out=zi, **kw)
        assert g3 is zi
        for got in ((l2, g2, s2), (l3, g3, s3)):
            assert_bitwise_equal(got[0], l1)
            assert_bitwise_equal(got[1], g1)
            for f in ("lse", "entropy", "argmax", "target_logprob"):
                assert_bitwise_equal(getattr(got[2], f), getattr(s1, f), f)
    p = rng.random((N, C))
    p = (p / p.sum(-1, keepdims=True)).astype(dt)
    names = ("lse", "entropy", "argmax")
    l1, g1, s1 = fx.cross_entropy_with_grad(z, p, outputs=names, entropy_coef=0.2)
    l32, g32, s32 = fx.cross_entropy_with_grad(
        z.astype(np.float32), p.astype(np.float32), outputs=names, entropy_coef=0.2
    )
    assert_bitwise_equal(l1, np.asarray(l32, np.float32))
    assert_bitwise_equal(g1, g32.astype(dt))
    for f in names:
        assert_bitwise_equal(getattr(s1, f), getattr(s32, f), f)


def test_16_bit_logits_other_axes_refuse():
    ml = pytest.importorskip("ml_dtypes")
    z = np.zeros((2, 5, 3), ml.bfloat16)
    with pytest.raises(NotImplementedError, match="axis=1"):
        fx.cross_entropy(z, np.zeros((2, 3), np.int64), axis=1, outputs=("lse",))
    with pytest.raises(NotImplementedError, match="axis=1"):
        fx.cross_entropy_with_grad(
            z.astype(np.float16), np.zeros((2, 3), np.int64), axis=1, entropy_coef=0.5
        )


def test_other_front_ends_do_not_take_the_keywords():
    z = np.zeros((4, 6), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(TypeError, match="unexpected keyword argument 'entropy_coef'"):
        fx.shard_stats(z, y, offset=0, num_classes=6, entropy_coef=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'entropy_coef'"):
        fx.shard_grad(z, y, np.zeros((4, 7)), offset=0, num_classes=6, entropy_coef=0.1)
    # fastxent.torch and fastxent.jax take them (tests/test_torch_row_outputs.py,
    # tests/test_jax_row_outputs.py), and the fused linear functions (tests/test_linear_stats.py);
    # shard_stats takes outputs= (tests/test_shard_outputs.py).


def test_in_place_entropy_with_minus_inf_logits(isa):
    # In place, outputs=("entropy",) alone: the block pass's e overwrote the logits that the
    # entropy's redo of a block holding -inf reads again (wrong entropies; review finding).
    for dt in (np.float32, np.float64):
        z = np.random.default_rng(0).standard_normal((2, 50)).astype(dt)
        z[:, 7] = -np.inf
        y = np.array([1, 2])
        _, _, want = fx.cross_entropy_with_grad(z, y, outputs=("entropy",))
        zi = z.copy()
        _, _, got = fx.cross_entropy_with_grad(zi, y, out=zi, outputs=("entropy",))
        np.testing.assert_array_equal(got.entropy, want.entropy)


def test_entropy_of_float64_logits_near_the_maximum(isa):
    # Blocks far below the row maximum: (m - M) * s overflowed to -inf and met a rescale of 0
    # (NaN entropy, and a NaN gradient with entropy_coef) where the loss is finite.
    big = 0.9 * np.finfo(np.float64).max
    z = np.zeros((1, 4100))
    z[0, :2048] = -big
    z[0, 2048:] = big
    y = np.array([3000])
    loss, g, st = fx.cross_entropy_with_grad(z, y, outputs=("entropy",), entropy_coef=0.5)
    np.testing.assert_allclose(st.entropy, [np.log(2052)], rtol=1e-12)
    assert np.isfinite(loss) and np.all(np.isfinite(g))


def test_the_fast_path_is_kept_for_plain_calls(monkeypatch):
    from fastxent import _api

    assert _api._fast_ok({"entropy_coef": 0.0, "outputs": None})
    assert not _api._fast_ok({"outputs": ("lse",)})
    assert not _api._fast_ok({"entropy_coef": 0.5})


def test_streamed_gradients_keep_their_bits_with_outputs():
    # FASTXENT_STREAM_BYTES=1 streams every gradient (the pipelined rows); with outputs the
    # rows go one at a time with plain stores: the same bits.
    import os
    import subprocess
    import sys

    code = """
import numpy as np, fastxent as fx
rng = np.random.default_rng(3)
z = rng.standard_normal((6, 9000)).astype(np.float32)
y = rng.integers(0, 9000, 6); y[2] = -100
for kw in ({}, {"softcap": 40.0, "label_smoothing": 0.1}):
    l0, g0 = fx.cross_entropy_with_grad(z, y, **kw)
    l1, g1, st = fx.cross_entropy_with_grad(z, y, outputs=("entropy", "argmax"), **kw)
    assert l0.tobytes() == l1.tobytes() and g0.tobytes() == g1.tobytes(), kw
    assert fx._core.stream_bytes() == 1
print("ok")
"""
    env = dict(os.environ, FASTXENT_STREAM_BYTES="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", [{}, {"logit_scale": 1.5}])
def test_masked_logits_with_entropy(isa, rng, dtype, opts):
    # -inf logits (masked actions) count 0 in the entropy and its gradient term (0 * -inf):
    # the entropy sum of such a block is summed again with the masked entries skipped.
    N, C, beta = 4, 5000, 0.6
    z, y = _case(rng, N, C, dtype, ignore=False)
    mask = rng.uniform(size=z.shape) < 0.3
    mask[np.arange(N), y] = False
    z[mask] = -np.inf
    loss, g, st = fx.cross_entropy_with_grad(
        z, y, entropy_coef=beta, outputs=("entropy", "lse"), reduction="sum", **opts
    )
    zr = np.where(mask, -1e30, z.astype(np.float64))  # exp underflows to exactly 0
    want = ref_grad(zr, y, beta=beta, reduction="sum", **opts)
    assert np.all(g[mask] == 0)
    # Measured (5 seeds, both ISAs): float32 gradient 3.5e-7, entropy 7.2e-7 (logit_scale
    # 1.5: z' rounded to float32), loss 5.8e-8; float64 2.2e-15, 3.9e-16, 3.3e-16.
    tol = 2e-6 if dtype == np.float32 else 1e-14
    assert _rel(g, want, np.abs(want).max()) < tol
    _, ent, _, _ = ref_rows(zr, y, None, opts.get("logit_scale", 1.0))
    assert _rel(st.entropy, ent, np.maximum(1.0, np.abs(ent))) < tol
    ref = ref_loss(zr, y, beta=beta, reduction="sum", **opts)
    assert abs(float(loss) - ref) < tol * max(1.0, abs(ref))
