"""Distillation losses (fx.kl_div_with_logits, fx.jsd_with_logits and their _with_grad forms)
against a float64 NumPy reference, finite differences, edge rows, threads and every error path.
PyTorch's F.kl_div comparisons are in test_distill_torch.py."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_bitwise_equal, central_difference_grad, grad_error, loss_error

import fastxent as fx

# Measured worst cases over test_matches_reference's cases, three seeds each (scalar and
# AVX2, logits of scale 3, T in {0.5, 1, 3}): loss (loss_error) 1.0e-6 float32 (sums of
# per-element terms taken in float vectors), 2.7e-15 float64; gradient (grad_error relative
# to grad_terms) 2.3e-8 float32, 9.7e-17 float64. Bounds ~10x.
LOSS_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 3e-14}
GRAD_TOL = {np.dtype(np.float32): 3e-7, np.dtype(np.float64): 1e-15}
# test_long_rows_cross_chunks's rows (40000 logits of scale 4 with a spike of 25 or 30): the
# log-probabilities reach about -80, and the gradients carry their absolute rounding error
# (about eps * 80, times the probability). Measured worst over 150 seeds of that test's inputs,
# scalar / AVX2 / AVX-512 (a Zen 4, 2026-12-07), gradient (grad_error as above): float64
# 3.65e-15 (scalar, forward KL's teacher gradient; AVX-512 1.39e-15, AVX2 1.85e-15), where
# GRAD_TOL's 1e-15 had passed only for the seed the fixture happens to draw; float32 1.02e-7
# (under GRAD_TOL). Loss: float64 7.5e-15, float32 3.1e-7 (under LOSS_TOL). Bound ~8x.
LONG_GRAD_TOL = {np.dtype(np.float32): 3e-7, np.dtype(np.float64): 3e-14}


def _log_softmax(z):
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _xlogy_terms(a, b):
    """a * b, 0 where a == 0 (a zero probability times an infinite log-ratio)."""
    with np.errstate(invalid="ignore"):
        return np.where(a == 0, 0.0, a * b)


def reference(s, t, kind, beta=0.5, T=1.0, reduction="mean", row_weight=None, terms=False):
    """(loss, grad_student, grad_teacher) in float64; kind 'forward', 'reverse' or 'jsd'.
    terms=True adds the sizes of the terms each gradient entry cancels (see grad_terms)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return _reference(s, t, kind, beta, T, reduction, row_weight, terms)


def _reference(s, t, kind, beta, T, reduction, row_weight, terms):
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)
    ls, lt = _log_softmax(s / T), _log_softmax(t / T)
    p, q = np.exp(ls), np.exp(lt)
    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse"
    if kind == "forward":
        D = _xlogy_terms(q, lt - ls).sum(-1)
        gs = T * (p - q)
        gt = T * _xlogy_terms(q, lt - ls - D[..., None])
    elif kind == "reverse":
        D = _xlogy_terms(p, ls - lt).sum(-1)
        gs = T * _xlogy_terms(p, ls - lt - D[..., None])
        gt = T * (q - p)
    else:
        lm = np.log(beta * q + (1 - beta) * p)
        Ks = _xlogy_terms(p, ls - lm).sum(-1)
        Kt = _xlogy_terms(q, lt - lm).sum(-1)
        D = beta * Kt + (1 - beta) * Ks
        gs = T * (1 - beta) * _xlogy_terms(p, ls - lm - Ks[..., None])
        gt = T * beta * _xlogy_terms(q, lt - lm - Kt[..., None])
    if terms:
        return grad_terms(p, q, ls, lt, D, T)
    r = np.ones(D.shape) if row_weight is None else np.asarray(row_weight, np.float64)
    rows = r * T * T * D
    rows = np.where(r == 0, 0.0, rows)
    gs = np.where(r[..., None] == 0, 0.0, gs * r[..., None])
    gt = np.where(r[..., None] == 0, 0.0, gt * r[..., None])
    if reduction == "none":
        return rows, gs, gt
    total = rows.sum()
    if reduction == "sum":
        return total, gs, gt
    den = r.sum()
    return total / den, gs / den, gt / den


def grad_terms(p, q, ls, lt, D, T):
    """The size of the terms a gradient entry is a difference of: p (log p - log m - K) with
    log-probabilities and divergences of size |ls| + |lt| + |D|, each with a float32 rounding
    error relative to itself (x - lse rounds at the ulp of x). Where the terms cancel (peaked
    rows, low temperature) the entry is far smaller than they are, and its error is relative
    to them, not to the entry (as for label smoothing in grad_error)."""
    size = np.abs(ls) + np.abs(lt) + np.abs(D)[..., None] + 1.0
    with np.errstate(invalid="ignore"):
        return (np.nan_to_num(T * p * size), np.nan_to_num(T * q * size))


def call(kind, s, t, grad=False, beta=0.5, **kw):
    if kind == "jsd":
        f = fx.jsd_with_logits_with_grad if grad else fx.jsd_with_logits
        return f(s, t, beta=beta, **kw)
    f = fx.kl_div_with_logits_with_grad if grad else fx.kl_div_with_logits
    return f(s, t, direction=kind, **kw)


KINDS = ["forward", "reverse", "jsd"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 3, 17, 1000, 5003])
@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_matches_reference(isa, rng, kind, dtype, C, T):
    s = (3 * rng.standard_normal((6, C))).astype(dtype)
    t = (3 * rng.standard_normal((6, C))).astype(dtype)
    beta = 0.3
    loss, gs, gt = call(kind, s, t, True, beta=beta, temperature=T, teacher_grad=True)
    rl, rgs, rgt = reference(s, t, kind, beta, T)
    dt = np.dtype(dtype)
    assert loss.dtype == dt and gs.dtype == dt and gt.dtype == dt
    assert loss_error(loss, rl) < LOSS_TOL[dt]
    ts, tt = reference(s, t, kind, beta, T, terms=True)
    assert grad_error(gs, rgs, ts) < GRAD_TOL[dt]
    assert grad_error(gt, rgt, tt) < GRAD_TOL[dt]
    # loss-only and student-only calls give the same bits
    assert_bitwise_equal(call(kind, s, t, beta=beta, temperature=T), loss, "loss only")
    l2, g2 = call(kind, s, t, True, beta=beta, temperature=T)
    assert_bitwise_equal(l2, loss)
    assert_bitwise_equal(g2, gs)


@pytest.mark.parametrize("kind", KINDS)
def test_long_rows_cross_chunks(isa, rng, kind):
    # Rows longer than the statistics pass's chunk (2048 floats / 1024 doubles), with the
    # maxima in different chunks and a stretch of -inf on both sides (whole chunks of it).
    for dtype in (np.float32, np.float64):
        s = (4 * rng.standard_normal((3, 40000))).astype(dtype)
        t = (4 * rng.standard_normal((3, 40000))).astype(dtype)
        s[0, 30000] = 25
        t[1, 5] = 30
        s[2, 100:9000] = -np.inf
        t[2, 100:9000] = -np.inf
        loss, gs, gt = call(kind, s, t, True, teacher_grad=True, reduction="none")
        rl, rgs, rgt = reference(s, t, kind, reduction="none")
        dt = np.dtype(dtype)
        ts, tt = reference(s, t, kind, terms=True)
        assert loss_error(loss, rl) < LOSS_TOL[dt]
        assert grad_error(gs, rgs, ts) < LONG_GRAD_TOL[dt]
        assert grad_error(gt, rgt, tt) < LONG_GRAD_TOL[dt]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_finite_differences(isa, rng, kind, reduction):
    s = rng.standard_normal((3, 5))
    t = rng.standard_normal((3, 5))
    sw = np.array([0.5, 2.0, 1.0])
    kw = dict(temperature=1.7, sample_weight=sw, reduction=reduction, beta=0.35)

    # "none": the gradient is that of the sum of the row losses
    def f_s(z):
        return float(np.sum(call(kind, z, t, **kw)))

    def f_t(z):
        return float(np.sum(call(kind, s, z, **kw)))

    _, gs, gt = call(kind, s, t, True, teacher_grad=True, **kw)
    np.testing.assert_allclose(gs, central_difference_grad(f_s, s), atol=1e-8)
    np.testing.assert_allclose(gt, central_difference_grad(f_t, t), atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jsd_end_points_are_the_kls(isa, rng, dtype):
    s = rng.standard_normal((4, 50)).astype(dtype)
    t = rng.standard_normal((4, 50)).astype(dtype)
    for beta, direction in ((0.0, "forward"), (1.0, "reverse")):
        a = fx.jsd_with_logits_with_grad(s, t, beta=beta, temperature=2.0, teacher_grad=True)
        b = fx.kl_div_with_logits_with_grad(
            s, t, direction=direction, temperature=2.0, teacher_grad=True
        )
        for x, y in zip(a, b):
            assert_bitwise_equal(x, y, f"beta={beta}")


def test_symmetries(rng):
    # KL_forward(s, t) = KL_reverse(t, s) and JSD_beta(s, t) = JSD_(1-beta)(t, s).
    s = rng.standard_normal((5, 30))
    t = rng.standard_normal((5, 30))
    a = fx.kl_div_with_logits(s, t, reduction="none")
    b = fx.kl_div_with_logits(t, s, direction="reverse", reduction="none")
    np.testing.assert_allclose(a, b, rtol=1e-13)
    a = fx.jsd_with_logits(s, t, beta=0.2, reduction="none")
    b = fx.jsd_with_logits(t, s, beta=0.8, reduction="none")
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert np.all(a >= -1e-15)  # >= 0 up to the rounding of a sum of O(1) terms
    # identical distributions: the KLs are 0 exactly (their sums cancel term by term), the
    # JSD to rounding (log m = log(beta q + (1 - beta) q) is q's log-probability rounded)
    for kind in KINDS:
        loss, g = call(kind, s, s, True)
        if kind == "jsd":
            assert abs(float(loss)) < 1e-15 and np.max(np.abs(g)) < 1e-15
        else:
            assert float(loss) == 0.0 and not np.any(g)


@pytest.mark.parametrize("kind", KINDS)
def test_row_weights_labels_mask(isa, rng, kind):
    s = rng.standard_normal((2, 3, 20)).astype(np.float32)
    t = rng.standard_normal((2, 3, 20)).astype(np.float32)
    labels = np.array([[1, -100, 4], [7, 2, -100]])
    mask = np.array([[True, True, False], [True, True, True]])
    sw = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, 4.0]], np.float32)
    r = (labels != -100) * mask * sw
    s[0, 1] = np.nan  # an ignored row's contents do not matter
    t[1, 2] = np.inf
    for red in ("mean", "sum", "none"):
        loss, gs, gt = call(
            kind,
            s,
            t,
            True,
            labels=labels,
            mask=mask,
            sample_weight=sw,
            reduction=red,
            teacher_grad=True,
        )
        rl, rgs, rgt = reference(
            np.nan_to_num(s), np.nan_to_num(t, posinf=0), kind, reduction=red, row_weight=r
        )
        assert loss_error(loss, rl) < 1e-5
        assert grad_error(gs, rgs) < 2e-5 and grad_error(gt, rgt) < 2e-5
        zero = r == 0
        assert np.all(gs[zero] == 0) and np.all(gt[zero] == 0)
        if red == "none":
            assert np.all(loss[zero] == 0)
    # ignore_index other than the default
    a = call(kind, s[1:], t[:1], labels=np.array([[5, 5, 0]]), ignore_index=5, mask=None)
    b = call(kind, s[1:], t[:1], mask=np.array([[False, False, True]]))
    assert_bitwise_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_mean_over_nothing(kind):
    s = np.zeros((2, 4))
    # 0 and a zero gradient, as fastxent's cross-entropy (PyTorch's mean over nothing: NaN)
    loss, g = call(kind, s, s + 1, True, mask=np.array([False, False]))
    assert loss == 0.0 and not np.any(g)
    loss, g = call(kind, np.zeros((0, 4)), np.zeros((0, 4)), True)
    assert loss == 0.0 and g.shape == (0, 4)
    assert call(kind, np.zeros((0, 4)), np.zeros((0, 4)), reduction="sum") == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_edge_rows(isa, kind):
    inf, nan = np.inf, np.nan
    for dtype in (np.float32, np.float64):
        big = np.finfo(dtype).max * 0.9  # ~3e38 for float32
        s = np.array(
            [
                [-inf, -inf, -inf],  # all -inf: NaN
                [0.0, nan, 1.0],  # NaN: NaN
                [big, -big, 0.0],  # huge but finite, the same in both: divergence 0
                [-inf, 0.0, 1.0],  # a zero probability on both sides
                [-inf, 0.0, 1.0],
            ],
            dtype,
        )
        t = s.copy()
        t[3] = [-inf, 1.0, 0.0]
        t[4] = [-inf, 0.0, 1.0]
        loss, gs, gt = call(kind, s, t, True, teacher_grad=True, reduction="none")
        assert np.isnan(loss[0]) and np.all(np.isnan(gs[0]))
        assert np.isnan(loss[1]) and np.all(np.isnan(gs[1]))
        assert loss[2] == 0 and not np.any(gs[2]) and not np.any(gt[2])
        rl, rgs, rgt = reference(s[3:], t[3:], kind, reduction="none")
        assert np.all(np.isfinite(loss[3:])) and np.all(np.isfinite(gs[3:]))
        assert np.all(gs[3:, 0] == 0) and np.all(gt[3:, 0] == 0)
        np.testing.assert_allclose(loss[3:], rl, atol=1e-6)
        np.testing.assert_allclose(gs[3:], rgs, atol=1e-6)
        np.testing.assert_allclose(gt[3:], rgt, atol=1e-6)
        # identical rows: the KLs cancel exactly, the JSD to rounding (see test_symmetries)
        assert loss[4] == 0 if kind != "jsd" else abs(loss[4]) < 2 * np.finfo(dtype).eps


def test_shapes_and_layouts(rng):
    s = rng.standard_normal((4, 6, 33))
    t = rng.standard_normal((4, 6, 33))
    loss, g = fx.kl_div_with_logits_with_grad(s, t, reduction="none")
    assert loss.shape == (4, 6) and g.shape == s.shape
    rl, rg, _ = reference(s, t, "forward", reduction="none")
    np.testing.assert_allclose(loss, rl, rtol=1e-12, atol=1e-14)
    # a single row (1-D) gives a 0-d "none" result
    l1 = fx.kl_div_with_logits(s[0, 0], t[0, 0], reduction="none")
    assert l1.shape == () and l1 == loss[0, 0]
    # strided rows and non-contiguous inputs give the same bits as contiguous copies
    big_s = rng.standard_normal((8, 50))
    big_t = rng.standard_normal((50, 8)).T  # class axis not contiguous: copied
    a = fx.jsd_with_logits_with_grad(big_s[::2, :40], big_t[::2, :40], teacher_grad=True)
    b = fx.jsd_with_logits_with_grad(
        np.ascontiguousarray(big_s[::2, :40]),
        np.ascontiguousarray(big_t[::2, :40]),
        teacher_grad=True,
    )
    for x, y in zip(a, b):
        assert_bitwise_equal(x, y)
    # lists work
    assert fx.kl_div_with_logits([[0.0, 1.0]], [[1.0, 0.0]]) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_in_place_and_out(isa, rng, kind):
    s = rng.standard_normal((5, 300)).astype(np.float32)
    t = rng.standard_normal((5, 300)).astype(np.float32)
    ref = call(kind, s, t, True, teacher_grad=True)
    s2, t2 = s.copy(), t.copy()
    got = call(kind, s2, t2, True, teacher_grad=True, out=s2, teacher_out=t2)
    assert got[1] is s2 and got[2] is t2
    for x, y in zip(got, ref):
        assert_bitwise_equal(x, y, "in place")
    o1, o2 = np.empty_like(s), np.empty_like(t)
    got = call(kind, s, t, True, teacher_grad=True, out=o1, teacher_out=o2)
    assert got[1] is o1 and got[2] is o2
    for x, y in zip(got, ref):
        assert_bitwise_equal(x, y, "out=")


@pytest.mark.parametrize("kind", KINDS)
def test_threads_bitwise(rng, kind):
    s = rng.standard_normal((64, 3000)).astype(np.float32)
    t = rng.standard_normal((64, 3000)).astype(np.float32)
    one = call(kind, s, t, True, teacher_grad=True, num_threads=1)
    two = call(kind, s, t, True, teacher_grad=True, num_threads=2)
    for x, y in zip(one, two):
        assert_bitwise_equal(x, y, "threads")


def test_16_bit(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for half in (np.float16, ml_dtypes.bfloat16):
        s = (2 * rng.standard_normal((7, 1000))).astype(half)
        t = (2 * rng.standard_normal((7, 1000))).astype(half)
        for kind in KINDS:
            loss, gs, gt = call(kind, s, t, True, teacher_grad=True, temperature=2.0)
            assert loss.dtype == np.float32 and gs.dtype == half and gt.dtype == half
            # the float32 kernel on the same values, rounded once to 16 bits
            l32, g32, t32 = call(
                kind,
                s.astype(np.float32),
                t.astype(np.float32),
                True,
                teacher_grad=True,
                temperature=2.0,
            )
            assert_bitwise_equal(loss, l32)
            assert_bitwise_equal(gs, g32.astype(half))
            assert_bitwise_equal(gt, t32.astype(half))


BAD_CALLS = [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(temperature=100.5), ValueError, r"temperature must be in \[1e-30, 100\]"),
    (dict(temperature=1e200), ValueError, r"temperature must be in \[1e-30, 100\]"),
    (dict(temperature=0.99e-30), ValueError, r"temperature must be in \[1e-30, 100\]"),
    (dict(temperature=1e-40), ValueError, r"temperature must be in \[1e-30, 100\]"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(labels=np.zeros(3)), TypeError, "labels"),
    (dict(labels=np.zeros(2, int)), ValueError, "labels"),
    (dict(labels=np.zeros(3, int), ignore_index=1.5), TypeError, "ignore_index"),
    (dict(mask=np.ones(3, int)), TypeError, "mask"),
    (dict(mask=np.ones(4, bool)), ValueError, "mask"),
    (dict(sample_weight=np.array([1.0, -1.0, 1.0])), ValueError, "sample_weight"),
    (dict(sample_weight=np.array([1.0, np.nan, 1.0])), ValueError, "sample_weight"),
    (dict(sample_weight=np.ones((3, 1))), ValueError, "sample_weight"),
    (dict(sample_weight=np.array(["a", "b", "c"])), TypeError, "sample_weight"),
    (dict(num_threads=0), ValueError, "num_threads"),
    # beyond the kernel's C int: the library's error, not pybind11's argument TypeError
    (dict(num_threads=2**31), ValueError, "num_threads must be at most 2147483647"),
    (dict(num_threads=2**40), ValueError, "num_threads must be at most 2147483647"),
    (dict(bogus=1), TypeError, "bogus"),
    # teacher_grad is a bool: not read by its truth value ("no" would be True)
    (dict(teacher_grad="yes"), TypeError, "teacher_grad must be a bool"),
    (dict(teacher_grad="no"), TypeError, "teacher_grad must be a bool"),
    (dict(teacher_grad=1), TypeError, "teacher_grad must be a bool"),
    (dict(teacher_grad=None), TypeError, "teacher_grad must be a bool"),
    (dict(teacher_grad=np.array([True])), TypeError, "teacher_grad must be a bool"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kw,exc,match", BAD_CALLS)
def test_bad_arguments_touch_nothing(kind, kw, exc, match):
    s = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = s[::-1].copy()
    s0, t0 = s.copy(), t.copy()
    out = np.full_like(s, 7.0)
    with pytest.raises(exc, match=match):
        call(kind, s, t, True, out=out, **kw)
    with pytest.raises(exc, match=match):
        call(kind, s, s, True, out=s, **kw)  # in place
    assert_bitwise_equal(s, s0)
    assert_bitwise_equal(t, t0)
    assert np.all(out == 7.0)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_grad_numpy_bool(kind):
    # numpy.bool_ is a bool: the same results as Python's True / False
    s = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = s[::-1].copy()
    for v in (True, False):
        want = call(kind, s, t, True, teacher_grad=v)
        got = call(kind, s, t, True, teacher_grad=np.bool_(v))
        assert len(got) == len(want) == (3 if v else 2)
        for a, b in zip(got, want):
            assert_bitwise_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_temperature_range_ends_accepted(rng, kind, dtype):
    # The ends of [1e-30, 100] are accepted with finite results, and at T = 100 the float32
    # loss is still within 3e-3 of float64's (measured up to 1.4e-3 at 8 x 32000 over 7
    # seeds: the rounding of the log-probabilities times T**2; above 100 it grows as T**2,
    # hence the bound).
    s = (3 * rng.standard_normal((4, 7))).astype(dtype)
    t = (3 * rng.standard_normal((4, 7))).astype(dtype)
    for T in (1e-30, 100.0):
        loss, gs, gt = call(kind, s, t, True, temperature=T, teacher_grad=True)
        assert np.isfinite(loss) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
    s = rng.standard_normal((8, 32000))
    t = rng.standard_normal((8, 32000))
    want = call(kind, s, t, False, temperature=100.0, reduction="sum")
    got = call(kind, s.astype(dtype), t.astype(dtype), False, temperature=100.0, reduction="sum")
    assert abs(float(got) / float(want) - 1) < 3e-3


def test_bad_logits_and_outputs():
    s = np.zeros((3, 4), np.float32)
    t = np.ones((3, 4), np.float32)
    cases = [
        (lambda: fx.kl_div_with_logits(s, t[:, :3]), ValueError, "shape"),
        (lambda: fx.kl_div_with_logits(s, t.astype(np.float64)), TypeError, "dtype"),
        (lambda: fx.kl_div_with_logits(s.astype(int), t.astype(int)), TypeError, "float"),
        (lambda: fx.kl_div_with_logits(np.float32(1), np.float32(1)), ValueError, "dimension"),
        (lambda: fx.kl_div_with_logits(s[:, :0], t[:, :0]), ValueError, "C = 0"),
        (lambda: fx.kl_div_with_logits(s, t, direction="both"), ValueError, "direction"),
        (lambda: fx.jsd_with_logits(s, t, beta=1.5), ValueError, "beta"),
        (lambda: fx.jsd_with_logits(s, t, beta=-0.1), ValueError, "beta"),
        (lambda: fx.jsd_with_logits(s, t, beta=float("nan")), ValueError, "beta"),
        (lambda: fx.jsd_with_logits(s, t, beta=None), TypeError, "beta"),
        (lambda: fx.kl_div_with_logits_with_grad(s, t, out=np.zeros((3, 4))), ValueError, "dtype"),
        (
            lambda: fx.kl_div_with_logits_with_grad(s, t, out=np.zeros((4, 3), np.float32)),
            ValueError,
            "shape",
        ),
        (lambda: fx.kl_div_with_logits_with_grad(s, t, out=t), ValueError, "^out overlaps"),
        (
            lambda: fx.kl_div_with_logits_with_grad(s, t, teacher_grad=True, teacher_out=s),
            ValueError,
            "^teacher_out overlaps student",
        ),
        (
            lambda: fx.kl_div_with_logits_with_grad(s, t, teacher_out=np.zeros_like(t)),
            ValueError,
            "teacher_grad",
        ),
        (lambda: fx.jsd_with_logits(s, t, out=np.zeros_like(s)), TypeError, "out"),
    ]
    ro = np.zeros_like(s)
    ro.flags.writeable = False
    cases.append((lambda: fx.kl_div_with_logits_with_grad(s, t, out=ro), ValueError, "writ|read"))
    shared = np.zeros((2, 3, 4), np.float32)
    cases.append(
        (
            lambda: fx.kl_div_with_logits_with_grad(
                s, t, teacher_grad=True, out=shared[0], teacher_out=shared[0]
            ),
            ValueError,
            "overlap",
        )
    )
    for f, exc, match in cases:
        before = (s.copy(), t.copy(), shared.copy())
        with pytest.raises(exc, match=match):
            f()
        np.testing.assert_array_equal(s, before[0])
        np.testing.assert_array_equal(t, before[1])
        np.testing.assert_array_equal(shared, before[2])


def _bad_buffers(s0, t0):
    """(argument, buffer, the error's text after the argument's name) for every way an output
    buffer can be wrong, for the student s0[:12] and the teacher t0[:12] as (3, 4) float32."""
    s, t = s0[:12].reshape(3, 4), t0[:12].reshape(3, 4)
    ro = np.zeros_like(s)
    ro.flags.writeable = False
    return [
        ("out", np.zeros(s.shape), r"has dtype float64, expected float32 \(the student's"),
        ("teacher_out", np.zeros(t.shape), r"has dtype float64, expected float32 \(the teacher's"),
        ("out", np.zeros((4, 3), s.dtype), "has shape"),
        ("teacher_out", np.zeros((4, 3), t.dtype), "has shape"),
        ("out", np.zeros((4, 3), s.dtype).T, "must be C-contiguous"),
        ("teacher_out", np.zeros((4, 3), t.dtype).T, "must be C-contiguous"),
        ("out", ro, "is read-only"),
        ("teacher_out", ro, "is read-only"),
        ("out", [[0.0] * 4] * 3, "must be a NumPy array"),
        ("teacher_out", [[0.0] * 4] * 3, "must be a NumPy array"),
        ("out", t, "overlaps teacher"),
        ("teacher_out", s, "overlaps student"),
        # part of the array it holds the gradient of (not the in-place mode)
        (
            "out",
            s0[1:].reshape(3, 4),
            "overlaps the student without being the same array: pass out=student",
        ),
        (
            "teacher_out",
            t0[1:].reshape(3, 4),
            "overlaps the teacher without being the same array: pass teacher_out=teacher",
        ),
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", range(14))
def test_output_errors_name_their_argument(kind, case):
    # Each of out= and teacher_out= is named in its own errors (teacher_out's said "out").
    s0 = np.arange(13, dtype=np.float32)
    t0 = s0[::-1].copy()
    cases = _bad_buffers(s0, t0)
    assert len(cases) == 14
    name, buf, msg = cases[case]
    before = (s0.copy(), t0.copy())
    with pytest.raises((ValueError, TypeError), match="^" + name + " " + msg):
        call(kind, s0[:12].reshape(3, 4), t0[:12].reshape(3, 4), True, teacher_grad=True,
             **{name: buf})  # fmt: skip
    assert_bitwise_equal(s0, before[0])
    assert_bitwise_equal(t0, before[1])


def test_core_refuses_bad_layouts():
    from fastxent import _core

    s = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="contiguous class axis"):
        _core.distill(s[:, ::2], s[:, ::2], 0, 0.5, 1.0, 2, None, 0, -1, None, None, None)
    with pytest.raises(ValueError, match="same shape"):
        _core.distill(s, s[:2], 0, 0.5, 1.0, 2, None, 0, -1, None, None, None)
    with pytest.raises(TypeError, match="same dtype"):
        _core.distill(s, s.astype(np.float64), 0, 0.5, 1.0, 2, None, 0, -1, None, None, None)
    with pytest.raises(ValueError, match="divergence"):
        _core.distill(s, s, 3, 0.5, 1.0, 2, None, 0, -1, None, None, None)
    with pytest.raises(ValueError, match="row weights"):
        _core.distill(s, s, 0, 0.5, 1.0, 2, np.array([1.0, -1, 1]), 0, -1, None, None, None)
    with pytest.raises(ValueError, match="half"):
        _core.distill(s, s, 0, 0.5, 1.0, 2, None, 0, 2, None, None, None)
    with pytest.raises(TypeError, match="uint16"):
        _core.distill(s, s, 0, 0.5, 1.0, 2, None, 0, 0, None, None, None)
    g = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="grad_teacher overlaps"):
        _core.distill(s, s.copy(), 0, 0.5, 1.0, 2, None, 0, -1, g, g, None)


def test_jsd_student_minus_inf_where_teacher_is_not(isa):
    # lx = -inf where q > 0: ly - lm must stay finite (it was formed as (lx - lm) - lx + ly,
    # -inf - -inf = NaN: loss and teacher gradient NaN).
    for dtype in (np.float32, np.float64):
        s = np.array([[0.0, -np.inf, 1.0]], dtype)
        t = np.array([[0.0, 1.0, 2.0]], dtype)
        loss, gs, gt = fx.jsd_with_logits_with_grad(s, t, teacher_grad=True)
        rl, rgs, rgt = reference(s, t, "jsd")
        assert np.isfinite(loss) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
        np.testing.assert_allclose(loss, rl, rtol=1e-6)  # 0.1089
        np.testing.assert_allclose(gs, rgs, atol=1e-7)
        np.testing.assert_allclose(gt, rgt, atol=1e-7)


def test_jsd_probabilities_too_small_for_the_mixture(isa):
    # p > 0 but beta q and (1 - beta) p both round to 0: the mixture's ratio was 0 / 0 = NaN
    # (a subnormal chunk factor, or a beta too small for the float type).
    C = 2049  # the last class alone in the second float chunk
    s = np.full((1, C), -1000.0, np.float32)
    s[0, 0] = 0
    s[0, 2048] = -103.5
    t = np.zeros((1, C), np.float32)
    t[0, 2048] = -1000
    loss = fx.jsd_with_logits(s, t)
    np.testing.assert_allclose(loss, fx.jsd_with_logits(s[:, :2048], t[:, :2048]), rtol=1e-6)
    np.testing.assert_allclose(loss, reference(s, t, "jsd")[0], rtol=1e-6)
    s = np.array([[0.0, -200.0, 1.0]], np.float32)
    t = np.array([[0.0, 1.0, 2.0]], np.float32)
    loss, g = fx.jsd_with_logits_with_grad(s, t, beta=1e-50)
    assert np.isfinite(loss) and np.all(np.isfinite(g))


@pytest.mark.parametrize("kind", KINDS)
def test_shift_invariance(isa, rng, kind):
    # A constant added to a row's logits changes neither softmax: the log-probabilities are
    # formed as (v - max) - log S per element, not v - lse (which rounded lse at |v|'s ulp:
    # errors of 1e-3 at a shift of 1e5 before). The same bounds as unshifted logits hold.
    s = rng.standard_normal((4, 3000)).astype(np.float32)
    t = rng.standard_normal((4, 3000)).astype(np.float32)
    f32 = np.dtype(np.float32)
    for c in (1e3, 1e5):
        xs, xt = s + np.float32(c), t - np.float32(c)  # rounded to float32: the reference's too
        loss, gs, gt = call(kind, xs, xt, True, teacher_grad=True)
        rl, rgs, rgt = reference(xs, xt, kind)
        ts, tt = reference(xs, xt, kind, terms=True)
        assert loss_error(loss, rl) < LOSS_TOL[f32]
        assert grad_error(gs, rgs, ts) < GRAD_TOL[f32] and grad_error(gt, rgt, tt) < GRAD_TOL[f32]
    # huge logits, equal on both sides: the divergence is a sum of small per-element terms
    s = np.array([[-3e38, -3e38, -3e38]], np.float32)
    t = np.array([[-3e38, 0.0, 1.0]], np.float32)
    np.testing.assert_allclose(call(kind, s, t), reference(s, t, kind)[0], rtol=1e-6)
    big = np.full((1, 4), 1e17)  # float64: the chunk factor keeps log S (exp(h - M) / S)
    loss, g = call(kind, big, np.zeros((1, 4)), True)
    assert loss == 0 or abs(loss) < 1e-15
    assert np.max(np.abs(g)) < 1e-15
