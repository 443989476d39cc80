"""The extended options of fx.cross_entropy / fx.cross_entropy_with_grad: sample_weight,
z_loss, softcap, logit_scale, normalizer and probability targets, each alone and all
combined, on any class axis, for both entry points.

Oracles: the NumPy float64 reference (reference.cross_entropy_full_ref, analytic gradient),
PyTorch float64 (reference.torch_cross_entropy_full: F.cross_entropy on z' plus the z-loss,
sample weights and the denominator by hand, gradient by autograd), and central differences of
fastxent's own loss (so the gradient is the derivative of the loss it returns).

Error measures (reference.scaled_error against the scales cross_entropy_full_ref returns):
the loss relative to sum_n |s_n| max(|row_n / s_n|, 1) (/ D for "mean"; per row for "none"):
float rounding in lse and z' is an absolute error per row; the gradient relative to the
largest |s_n / D| ((Q_n + 2 z_loss |lse_n|) softmax_c + u_c) * logit_scale, the size of the
terms whose difference is the gradient (it cancels where softmax matches the target) times the
largest chain factor (the softcap's 1 - tanh^2 is only known to an absolute error).

Tolerances (u = unit roundoff; see tolerance() below):

* float64: 1e-12 (~9000 u), as tests/test_cross_entropy.py: the kernel works in float64,
  without cancellation in the loss; the vectorised tanh has an absolute error below 2 ULP of 1
  (4 u), i.e. cap * 4e-16 on z', far below. Measured: ~1e-15.

* float32: the base 30 u covers test_cross_entropy.py's 24 u derivation (exp 2.6 u, the
  float32 lane sums of S <= 16 u, log S -> an absolute loss error; the gradient's product
  and difference) plus 4 u for the probability-target / smoothing coefficients
  q1 = fl(1 - eps), q0 = fl(eps / C) and u = fl(fl(p q1 + q0) w) (all positive terms).
  On top of it:
  - logit_scale alone: z' = fl(fl(alpha) z) is within 2 u |z'| of alpha z; lse and z'_y
    move by at most max |dz'| each, so the loss by 4 u max|z'|; softmax_c moves by a factor
    exp(+-2 max|dz'|), i.e. the gradient by 4 u max|z'| relative to its terms.
  - softcap: the kernel takes rho = 1 / fl(1 + E), E = exp(-|v|), v = fl(z fl(2 alpha / cap)),
    then z' = sign(v) fl(2 cap rho - cap) and the chain factor 1 - tanh^2 = 4 fl(rho - rho^2).
    E carries 2.6 u relative (the exp's 1.3 ULP), so fl(1 + E) 1.3 u + u; the reciprocal
    (a division, or AVX-512's 14-bit estimate refined once) adds 1.07 u: rho is within 3.4 u
    relative, so |tanh| = 2 rho - 1 within 6.8 u absolute and 4 rho (1 - rho), whose
    derivative in rho is at most 4 in size, within 4 * 3.4 u + u = 14.6 u. z' is within
    6.8 u cap + u cap (its rounding), plus 3 u relative on the argument, which x tanh'(x)
    <= 0.45 turns into 1.4 u cap: 9.2 u cap absolute. The loss then moves by 2 * 9.2 u cap,
    the softmax as above by that relative; the chain factor's 14.6 u is relative to alpha,
    which the gradient scale already carries. Hence + 19 u cap + 15 u. (The C++ test
    cpp_kernel measures rho 2.1 u (AVX-512; 1.8 u elsewhere), tanh 3.0 u, 1 - tanh^2 5.9 u,
    z' 4.7 u cap.)
  - z_loss: lambda lse^2 turns an absolute error d on lse into 2 lambda |lse| d on the loss,
    and adds 2 lambda lse to Q in the gradient: everything above times 1 + 2 lambda max|lse|.
  Measured on these inputs: at most ~0.25 of the bound.

Anything wrong in a formula (a missing s_n, a z-loss on an ignored row, a chain factor
applied twice, the wrong denominator) moves the result by >= 1e-3 relative: far above both.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastxent as fx
from reference import (
    U32,
    block_classes,
    assert_bitwise_equal,
    central_difference_grad,
    cross_entropy_full_ref,
    cross_entropy_ref,
    make_logits,
    make_target,
    make_weight,
    option_tolerance as tolerance,
    scaled_error,
    torch_cross_entropy_full,
    transform_ref,
)

REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float32, np.float64)
ENTRY_POINTS = ("cross_entropy", "cross_entropy_with_grad")


def _row_shape(shape, axis):
    ax = axis % len(shape)
    return shape[:ax] + shape[ax + 1 :]


# Each option alone, some pairs, and all together. Values: a softcap that bends the randn * 3
# logits (5) and one that saturates them (0.5); scales above and below 1.
OPTION_CASES = {
    "plain": dict(),
    "sample_weight": dict(sample_weight=True),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=5.0),
    "softcap_saturating": dict(softcap=0.5),
    # Above the fixed-shift range of float32 (32; the kernel then shifts by the block max),
    # and above float64's (256) too.
    "softcap_wide": dict(softcap=50.0),
    "softcap_beyond_fixed_shift": dict(softcap=300.0, logit_scale=40.0),
    "logit_scale_up": dict(logit_scale=1.7),
    "logit_scale_down": dict(logit_scale=0.3),
    "normalizer": dict(normalizer=7.5),
    "softcap+logit_scale": dict(softcap=5.0, logit_scale=1.7),
    "z_loss+softcap": dict(z_loss=0.1, softcap=5.0),
    "classic+sample_weight": dict(
        weight=True, label_smoothing=0.2, ignore_frac=0.2, sample_weight=True
    ),
    "all": dict(
        weight=True,
        label_smoothing=0.1,
        ignore_frac=0.2,
        sample_weight=True,
        z_loss=1e-2,
        softcap=5.0,
        logit_scale=1.7,
        normalizer=11.0,
    ),
    "all_ignore_index_0": dict(
        weight=True,
        label_smoothing=0.3,
        ignore_index=0,
        sample_weight=True,
        z_loss=1e-3,
        softcap=30.0,
        logit_scale=0.3,
    ),
}


def make_case(rng, shape, dtype, opts, probs, axis=-1, scale=3.0):
    """(logits, target, fastxent keywords) for one option case. Weights and sample weights
    are drawn in the logits' dtype so that every oracle sees exactly the kernel's values."""
    z = make_logits(rng, shape, scale, dtype)
    C = shape[axis]
    rshape = _row_shape(shape, axis)
    kw = {k: v for k, v in opts.items() if k not in ("weight", "sample_weight", "ignore_frac")}
    if opts.get("weight"):
        kw["weight"] = make_weight(rng, C, dtype)
    if opts.get("sample_weight"):
        sw = rng.uniform(0.0, 2.0, size=rshape).astype(dtype)
        if sw.size > 1:
            sw.reshape(-1)[0] = 0.0  # a row that weighs nothing
        kw["sample_weight"] = sw
    if probs:
        kw.pop("ignore_index", None)
        t = rng.random(shape).astype(dtype)  # need not sum to 1
        if opts.get("ignore_frac") and t.size:
            t = np.moveaxis(t, axis, -1)
            t[..., 0] = 0.0  # some zero probabilities on the way
            t = np.moveaxis(t, -1, axis)
    else:
        ii = opts.get("ignore_index", -100)
        t = make_target(rng, rshape, C, ignore_frac=opts.get("ignore_frac", 0.0), ignore_index=ii)
    return z, np.array(t, order="C"), kw


def check_against_reference(z, t, kw, reduction, tol, what=""):
    """fastxent vs the NumPy reference for both entry points; returns (loss, grad)."""
    loss, grad = fx.cross_entropy_with_grad(z, t, reduction=reduction, **kw)
    loss_only = fx.cross_entropy(z, t, reduction=reduction, **kw)
    assert_bitwise_equal(loss_only, loss, f"{what}: loss-only vs with-grad")
    ref_l, ref_g, lsc, gsc = cross_entropy_full_ref(z, t, reduction=reduction, scales=True, **kw)
    el, eg = scaled_error(loss, ref_l, lsc), scaled_error(grad, ref_g, gsc)
    assert el <= tol, f"{what} {reduction}: loss error {el:.3g} > {tol:.3g} ({loss} vs {ref_l})"
    assert eg <= tol, f"{what} {reduction}: gradient error {eg:.3g} > {tol:.3g}"
    # Types: a NumPy scalar of the logits' dtype, or an array of the rows' shape.
    if reduction == "none":
        assert isinstance(loss, np.ndarray) and loss.dtype == z.dtype
        assert loss.shape == _row_shape(z.shape, kw.get("axis", -1))
    else:
        assert isinstance(loss, z.dtype.type)
    assert grad.dtype == z.dtype and grad.shape == z.shape and grad.flags.c_contiguous
    return loss, grad


# --------------------------------------------------------------------------------------
# the references themselves


@pytest.mark.parametrize("probs", [False, True], ids=["class", "probs"])
@pytest.mark.parametrize("case", ["plain", "softcap", "all", "all_ignore_index_0"])
@pytest.mark.parametrize("shape,axis", [((9, 6), -1), ((4, 5, 3), 1), ((5, 3, 2), 0)], ids=str)
def test_numpy_reference_matches_torch_float64(shape, axis, case, probs):
    """The two float64 oracles agree to a few u (measured ~1e-15): 1e-13."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(sum(shape) * 7 + axis + 100 * probs)
    z, t, kw = make_case(rng, shape, np.float64, OPTION_CASES[case], probs, axis=axis)
    for red in REDUCTIONS:
        rl, rg, lsc, gsc = cross_entropy_full_ref(z, t, axis=axis, reduction=red, scales=True, **kw)
        tl, tg = torch_cross_entropy_full(z, t, axis=axis, reduction=red, **kw)
        assert scaled_error(tl, rl, lsc) <= 1e-13, red
        assert scaled_error(tg, rg, gsc) <= 1e-13, red


def test_full_reference_without_options_is_the_plain_reference():
    rng = np.random.default_rng(3)
    z = make_logits(rng, (20, 7), 2.0, np.float64)
    y = make_target(rng, (20,), 7, ignore_frac=0.2)
    w = make_weight(rng, 7, np.float64)
    for red in REDUCTIONS:
        a = cross_entropy_full_ref(z, y, reduction=red, weight=w, label_smoothing=0.2)
        b = cross_entropy_ref(z, y, reduction=red, weight=w, label_smoothing=0.2)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------
# every option alone and combined, against the references


@pytest.mark.parametrize("probs", [False, True], ids=["class", "probs"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_options_match_reference(isa, dtype, case, probs, rng):
    """(37, 11): many rows; (3, B + 4): C above the kernel's block of B classes (statistics
    of several blocks merged, per-block weight sums)."""
    for shape in ((37, 11), (3, block_classes(dtype) + 4)):
        z, t, kw = make_case(rng, shape, dtype, OPTION_CASES[case], probs)
        tol = tolerance(dtype, z, kw)
        for red in REDUCTIONS:
            check_against_reference(z, t, kw, red, tol, f"[{isa}] {case} {shape}")


@pytest.mark.parametrize("probs", [False, True], ids=["class", "probs"])
@pytest.mark.parametrize(
    "case",
    [
        "z_loss",
        "softcap",
        "logit_scale_up",
        "normalizer",
        "classic+sample_weight",
        "all",
        "all_ignore_index_0",
    ],
)
def test_options_match_torch_float64(isa, case, probs, rng):
    """fastxent float64 against PyTorch float64 directly (not only through the NumPy
    reference): 1e-12, and float32 fastxent against PyTorch float64 with the float32 bound."""
    pytest.importorskip("torch")
    for dtype in DTYPES:
        z, t, kw = make_case(rng, (23, 9), dtype, OPTION_CASES[case], probs)
        tol = tolerance(dtype, z, kw)
        for red in REDUCTIONS:
            loss, grad = fx.cross_entropy_with_grad(z, t, reduction=red, **kw)
            _, _, lsc, gsc = cross_entropy_full_ref(z, t, reduction=red, scales=True, **kw)
            tl, tg = torch_cross_entropy_full(z, t, reduction=red, **kw)
            assert scaled_error(loss, tl, lsc) <= tol, (red, np.dtype(dtype).name)
            assert scaled_error(grad, tg, gsc) <= tol, (red, np.dtype(dtype).name)


# --------------------------------------------------------------------------------------
# any class axis


AXIS_SHAPES = [
    ((6, 5), 0),
    ((4, 7, 3), 0),
    ((4, 7, 3), 1),
    ((4, 7, 3), -1),
    ((3, 2, 6, 5), 1),
    ((3, 2, 6, 5), 2),
    ((2, 3000, 3), 1),
    ((7,), 0),
]


@pytest.mark.parametrize("probs", [False, True], ids=["class", "probs"])
@pytest.mark.parametrize("shape,axis", AXIS_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_any_axis_with_all_options(isa, dtype, shape, axis, probs, rng):
    """Every option on, class axis anywhere: the same as the reference on that axis, and
    bitwise the same as fastxent on the moved-last copy (the column path and the row path
    compute identically)."""
    for case in ("all", "softcap+logit_scale"):
        z, t, kw = make_case(rng, shape, dtype, OPTION_CASES[case], probs, axis=axis)
        kw["axis"] = axis
        tol = tolerance(dtype, z, kw)
        for red in REDUCTIONS:
            loss, grad = check_against_reference(z, t, kw, red, tol, f"[{isa}] axis {axis}")
            # The same problem with the class axis moved last.
            zl = np.ascontiguousarray(np.moveaxis(z, axis, -1))
            tl = np.ascontiguousarray(np.moveaxis(t, axis, -1)) if probs else t
            kl = dict(kw, axis=-1)
            l2, g2 = fx.cross_entropy_with_grad(zl, tl, reduction=red, **kl)
            _, _, lsc, gsc = cross_entropy_full_ref(z, t, reduction=red, scales=True, **kw)
            # Both are within tol of the reference: within 2 tol of each other.
            assert scaled_error(loss, np.reshape(l2, np.shape(loss)), lsc) <= 2 * tol
            assert scaled_error(grad, np.moveaxis(g2, -1, axis), gsc) <= 2 * tol


@pytest.mark.parametrize("shape", [(5, 4, 6), (3, 6, 4, 5), (4, 3000, 3)], ids=str)
@pytest.mark.parametrize("probs", [False, True], ids=["class", "probs"])
def test_axis_one_against_torch_layout(isa, shape, probs, rng):
    """PyTorch's own (N, C, d1, ..., dk) layout with class dimension 1, given to
    F.cross_entropy as it is: fastxent axis=1 with every option agrees (float64: 1e-12;
    float32 with the float32 bound)."""
    pytest.importorskip("torch")
    for dtype in DTYPES:
        for case in ("all", "z_loss+softcap", "normalizer"):
            z, t, kw = make_case(rng, shape, dtype, OPTION_CASES[case], probs, axis=1)
            kw["axis"] = 1
            tol = tolerance(dtype, z, kw)
            for red in REDUCTIONS:
                loss, grad = fx.cross_entropy_with_grad(z, t, reduction=red, **kw)
                _, _, lsc, gsc = cross_entropy_full_ref(z, t, reduction=red, scales=True, **kw)
                tl, tg = torch_cross_entropy_full(z, t, reduction=red, torch_layout=True, **kw)
                assert scaled_error(loss, tl, lsc) <= tol, (case, red)
                assert scaled_error(grad, tg, gsc) <= tol, (case, red)


def test_class_axis_before_trailing_size_one_axes(isa):
    """(N, C, 1): PyTorch's layout with one spatial position, class axis 1 (and (C, 1) with
    axis 0): the same as the (N, C) problem."""
    rng = np.random.default_rng(11)
    for shape, axis in (((4, 3, 1), 1), ((3, 1), 0), ((2, 5, 1, 1), 1)):
        z = make_logits(rng, shape, 2.0, np.float64)
        C = shape[axis]
        rshape = _row_shape(shape, axis)
        y = make_target(rng, rshape, C)
        z2 = np.moveaxis(z, axis, -1).reshape(-1, C)
        for red in REDUCTIONS:
            l1, g1 = fx.cross_entropy_with_grad(z, y, axis=axis, reduction=red)
            l2, g2 = fx.cross_entropy_with_grad(z2, y.reshape(-1), reduction=red)
            np.testing.assert_allclose(np.reshape(l1, -1), np.reshape(l2, -1), rtol=1e-14)
            np.testing.assert_allclose(np.moveaxis(g1, axis, -1).reshape(-1, C), g2, atol=1e-15)


# --------------------------------------------------------------------------------------
# property-based: random combinations of every option, shape and axis

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is optional: only this test needs it
    st = None


def _option_problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    ax = axis % ndim
    if ax != ndim - 1 and int(np.prod(shape[ax + 1 :])) == 1:
        axis = -1  # (..., C, 1, ...) with the class axis first: see the dedicated test
    probs = draw(st.booleans())
    opts = dict(ignore_frac=draw(st.sampled_from([0.0, 0.3])))
    for key, values in (
        ("weight", [False, True]),
        ("sample_weight", [False, True]),
        ("label_smoothing", [0.0, 0.1, 1.0]),
        ("z_loss", [0.0, 1e-4, 0.1]),
        ("softcap", [None, 0.5, 5.0, 30.0]),
        ("logit_scale", [1.0, 0.3, 1.7]),
        ("normalizer", [None, 0.0, 7.0]),
        ("ignore_index", [-100, 0]),
    ):
        v = draw(st.sampled_from(values))
        if v is not None and v is not False:
            opts[key] = v
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 3.0, 20.0]))
    z, t, kw = make_case(
        np.random.default_rng(seed), shape, dtype, opts, probs, axis=axis, scale=scale
    )
    kw["axis"] = axis
    return z, t, kw


if st is not None:

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(st.composite(_option_problems)())
    def test_random_option_combinations_match_reference(isa, prob):
        z, t, kw = prob
        tol = tolerance(z.dtype, z, kw)
        for red in REDUCTIONS:
            check_against_reference(z, t, kw, red, tol, f"[{isa}] {z.shape} {sorted(kw)}")
else:

    def test_random_option_combinations_match_reference():
        pytest.skip("hypothesis is not installed")


# --------------------------------------------------------------------------------------
# gradient by central differences


FD_CASES = {
    "all-class": dict(
        weight=True,
        label_smoothing=0.2,
        ignore_frac=0.25,
        sample_weight=True,
        z_loss=0.05,
        softcap=2.5,
        logit_scale=1.3,
        normalizer=3.5,
    ),
    "all-class-no-normalizer": dict(
        weight=True,
        label_smoothing=0.2,
        ignore_frac=0.25,
        sample_weight=True,
        z_loss=0.05,
        softcap=2.5,
        logit_scale=0.7,
    ),
    "all-probs": dict(
        weight=True,
        label_smoothing=0.2,
        sample_weight=True,
        z_loss=0.05,
        softcap=2.5,
        logit_scale=1.3,
    ),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(FD_CASES))
@pytest.mark.parametrize("shape,axis", [((4, 5), -1), ((2, 4, 3), 1)], ids=str)
def test_gradient_matches_central_differences(isa, case, shape, axis, reduction):
    """float64, every option on (softcap too). h = 1e-5: truncation h^2/6 |f'''| with
    |f'''| <= ~(alpha (1 + 2 z_loss lse))^3 ~ 10 gives ~2e-10; rounding of the loss
    (~1e2 u |f| plus the vectorised tanh's 4 u cap on z') over 2h gives ~1e-10. So 1e-8 times
    the gradient's scale is 50x above the method's error and far below any formula mistake
    (>= 1e-3). Both fastxent's gradient and the reference's are checked against the
    differences of fastxent's loss ("none": of the sum of the rows)."""
    rng = np.random.default_rng(len(case) * 31 + len(shape) + len(reduction))
    probs = case.endswith("probs")
    z, t, kw = make_case(rng, shape, np.float64, FD_CASES[case], probs, axis=axis, scale=1.5)
    kw = dict(kw, axis=axis, reduction=reduction)

    def f(x):
        return float(np.sum(fx.cross_entropy(x, t, **kw)))

    fd = central_difference_grad(f, z, h=1e-5)
    _, grad = fx.cross_entropy_with_grad(z, t, **kw)
    _, ref_g, _, gsc = cross_entropy_full_ref(z, t, scales=True, **kw)
    atol = 1e-8 * max(gsc, 1e-3)
    np.testing.assert_allclose(grad, fd, rtol=0, atol=atol)
    np.testing.assert_allclose(ref_g, fd, rtol=0, atol=atol)
    if not probs:
        ignored = np.moveaxis(np.broadcast_to(np.expand_dims(t == -100, axis), z.shape), axis, -1)
        assert np.all(np.moveaxis(grad, axis, -1)[ignored] == 0.0)


# --------------------------------------------------------------------------------------
# semantics, exactly


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_denominator_zero_gives_zero_loss_and_gradient(isa, dtype, rng):
    """D = 0 for "mean": normalizer=0, all sample weights 0, every row ignored (with options
    on), or probability targets with zero sample weights: loss 0.0 and gradient exactly 0."""
    z = make_logits(rng, (9, 6), 2.0, dtype)
    y = make_target(rng, (9,), 6)
    p = rng.random((9, 6)).astype(dtype)
    opts = dict(
        z_loss=0.1,
        softcap=4.0,
        logit_scale=1.5,
        label_smoothing=0.1,
        weight=make_weight(rng, 6, dtype),
    )
    cases = [
        (y, dict(normalizer=0.0)),
        (y, dict(opts, normalizer=0.0, sample_weight=np.ones(9, dtype))),
        (y, dict(opts, sample_weight=np.zeros(9, dtype))),
        (np.full(9, -100), dict(opts, sample_weight=np.ones(9, dtype))),
        (p, dict(opts, sample_weight=np.zeros(9, dtype))),
        (p, dict(opts, normalizer=0.0)),
    ]
    for t, kw in cases:
        for f in ENTRY_POINTS:
            res = getattr(fx, f)(z, t, reduction="mean", **kw)
            loss = res[0] if isinstance(res, tuple) else res
            assert float(loss) == 0.0, (sorted(kw), f)
            if isinstance(res, tuple):
                assert np.all(res[1] == 0.0), (sorted(kw), f)
    # With all sample weights 0, "sum" and "none" are 0 too (every row is multiplied by 0).
    for t in (y, p):
        kw = dict(opts, sample_weight=np.zeros(9, dtype))
        loss, g = fx.cross_entropy_with_grad(z, t, reduction="none", **kw)
        assert np.all(loss == 0.0) and np.all(g == 0.0)
        loss, g = fx.cross_entropy_with_grad(z, t, reduction="sum", **kw)
        assert float(loss) == 0.0 and np.all(g == 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_normalizer_only_changes_mean(isa, dtype, rng):
    """normalizer replaces D in "mean" and nothing else: "sum" and "none" are bitwise those
    without it; "mean" with normalizer K is "sum" / K (to rounding: 2 u relative, float64
    1e-15), and with K = the natural D it is the plain "mean" (to rounding)."""
    z = make_logits(rng, (40, 7), 2.0, dtype)
    y = make_target(rng, (40,), 7, ignore_frac=0.2)
    sw = rng.uniform(0.5, 2.0, 40).astype(dtype)
    w = make_weight(rng, 7, dtype)
    base = dict(weight=w, sample_weight=sw, z_loss=1e-2, softcap=5.0, label_smoothing=0.1)
    rtol = 1e-14 if dtype == np.float64 else 4 * U32
    for red in ("sum", "none"):
        a = fx.cross_entropy_with_grad(z, y, reduction=red, **base)
        b = fx.cross_entropy_with_grad(z, y, reduction=red, normalizer=3.25, **base)
        assert_bitwise_equal(a[0], b[0], f"{red} loss with a normalizer")
        assert_bitwise_equal(a[1], b[1], f"{red} grad with a normalizer")
    ls, gs = fx.cross_entropy_with_grad(z, y, reduction="sum", **base)
    lm, gm = fx.cross_entropy_with_grad(z, y, reduction="mean", normalizer=3.25, **base)
    # Gradient entries are a e_c - b u_c with the row's a and b: rounding is relative to the
    # row's largest entries, so the comparison is absolute at rtol * max |g|.
    np.testing.assert_allclose(float(lm), float(ls) / 3.25, rtol=rtol)
    np.testing.assert_allclose(gm, gs / dtype(3.25), rtol=0, atol=rtol * float(np.max(np.abs(gm))))
    D = float(
        np.sum(np.where(y != -100, sw.astype(np.float64) * w[np.where(y != -100, y, 0)], 0.0))
    )
    l1, g1 = fx.cross_entropy_with_grad(z, y, reduction="mean", **base)
    l2, g2 = fx.cross_entropy_with_grad(z, y, reduction="mean", normalizer=D, **base)
    np.testing.assert_allclose(float(l2), float(l1), rtol=rtol)
    np.testing.assert_allclose(g2, g1, rtol=0, atol=rtol * float(np.max(np.abs(g1))))


@pytest.mark.parametrize("probs", [False, True], ids=["class", "probs"])
def test_defaults_spelled_out_are_bitwise_the_defaults(isa, probs, rng):
    """sample_weight=ones, z_loss=0, softcap=None, logit_scale=1, normalizer=None (spelled
    out, in any numeric type) give exactly the bits of the call without them."""
    for dtype in DTYPES:
        z, t, kw = make_case(rng, (30, 9), dtype, OPTION_CASES["classic+sample_weight"], probs)
        kw.pop("sample_weight")
        spelled = [
            dict(sample_weight=np.ones(30, dtype)),
            dict(sample_weight=[1] * 30),
            dict(z_loss=0.0),
            dict(z_loss=0),
            dict(softcap=None),
            dict(logit_scale=1.0),
            dict(logit_scale=np.float32(1)),
            dict(normalizer=None),
        ]
        for red in REDUCTIONS:
            ref = fx.cross_entropy_with_grad(z, t, reduction=red, **kw)
            for extra in spelled:
                got = fx.cross_entropy_with_grad(z, t, reduction=red, **kw, **extra)
                assert_bitwise_equal(got[0], ref[0], f"loss with {extra}")
                assert_bitwise_equal(got[1], ref[1], f"grad with {extra}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_one_hot_probabilities_equal_class_targets(isa, dtype, rng):
    """One-hot probability targets are the class targets, with every option but
    ignore_index (and D = sum s_n w[y_n] there against sum s_n: "sum"/"none" only, and
    "mean" without class weights)."""
    N, C = 25, 8
    z = make_logits(rng, (N, C), 3.0, dtype)
    y = make_target(rng, (N,), C)
    onehot = np.eye(C, dtype=dtype)[y]
    sw = rng.uniform(0.5, 2.0, N).astype(dtype)
    tol = 4e-15 if dtype == np.float64 else 40 * U32
    for kw in (
        dict(
            weight=make_weight(rng, C, dtype),
            label_smoothing=0.2,
            sample_weight=sw,
            z_loss=0.01,
            softcap=6.0,
            logit_scale=1.2,
        ),
        dict(label_smoothing=0.1, sample_weight=sw, z_loss=0.01, logit_scale=0.8),
    ):
        reds = REDUCTIONS if "weight" not in kw else ("sum", "none")
        for red in reds:
            la, ga = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
            lb, gb = fx.cross_entropy_with_grad(z, onehot, reduction=red, **kw)
            np.testing.assert_allclose(
                np.asarray(lb, np.float64), np.asarray(la, np.float64), rtol=tol, atol=tol
            )
            np.testing.assert_allclose(gb, ga, rtol=0, atol=tol * float(np.max(np.abs(ga))))


def test_sample_weight_scales_rows(isa, rng):
    """row_n(s) = s_n row_n(1) exactly in "none" (one multiplication in float64, then the
    row's rounding), and the gradient rows scale the same way (to 2 u)."""
    for dtype in DTYPES:
        z = make_logits(rng, (12, 5), 2.0, dtype)
        y = make_target(rng, (12,), 5)
        kw = dict(z_loss=0.05, softcap=3.0, logit_scale=1.1, label_smoothing=0.1)
        s = np.array([0, 0.5, 1, 2, 4, 0.25] * 2, dtype)
        l1, g1 = fx.cross_entropy_with_grad(z, y, reduction="none", **kw)
        ls, gs = fx.cross_entropy_with_grad(z, y, reduction="none", sample_weight=s, **kw)
        # Powers of two and 0: exact scalings.
        np.testing.assert_array_equal(ls, (l1 * s).astype(dtype))
        np.testing.assert_array_equal(gs, (g1 * s[:, None]).astype(dtype))


def test_sample_weight_multi_dim_rows(isa, rng):
    """sample_weight has the rows' shape: logits.shape without the class axis."""
    z = make_logits(rng, (3, 6, 4), 2.0, np.float64)
    for axis in (0, 1, 2, -1):
        rshape = _row_shape(z.shape, axis)
        y = make_target(rng, rshape, z.shape[axis])
        sw = rng.uniform(0.5, 2.0, rshape)
        for red in REDUCTIONS:
            loss, g = fx.cross_entropy_with_grad(z, y, axis=axis, reduction=red, sample_weight=sw)
            rl, rg, lsc, gsc = cross_entropy_full_ref(
                z, y, axis=axis, reduction=red, sample_weight=sw, scales=True
            )
            assert scaled_error(loss, rl, lsc) <= 1e-12
            assert scaled_error(g, rg, gsc) <= 1e-12


def test_logit_scale_is_a_scaling_of_the_logits(isa, rng):
    """logit_scale = a is the problem on a * z, with the gradient times a (float64, powers of
    two: exact scalings, so bitwise)."""
    z = make_logits(rng, (20, 9), 2.0, np.float64)
    y = make_target(rng, (20,), 9, ignore_frac=0.1)
    for a in (0.5, 2.0, 4.0):
        for red in REDUCTIONS:
            l1, g1 = fx.cross_entropy_with_grad(z, y, reduction=red, logit_scale=a)
            l2, g2 = fx.cross_entropy_with_grad(a * z, y, reduction=red)
            np.testing.assert_allclose(l1, l2, rtol=1e-14)
            np.testing.assert_allclose(g1, a * g2, rtol=0, atol=1e-15 * a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logit_scale_overflowing_a_finite_logit_acts_as_minus_inf(isa, dtype):
    """A finite logit that logit_scale takes beyond the dtype's range (alpha z = -inf in the
    dtype) is a -inf logit, in a one-block row, a long row (a block of them alone shifted by
    -inf gave NaN), the class axis 1 layout and shards; its raw value stays the argmax's."""
    big = -3e38 if dtype == np.float32 else -1.7e308
    B = fx._core.block_classes(np.dtype(dtype).itemsize)
    y = None
    for C in (3, B + 7, 3 * B):
        z = np.full((3, C), -np.inf, dtype)
        z[:, 0] = big
        z[:2, C - 1] = 100.0
        z[2, C - 1] = big  # row 2: every logit overflows (an all -inf row)
        y = np.array([C - 1, 0, 0])
        loss, g, st = fx.cross_entropy_with_grad(
            z, y, logit_scale=2.0, reduction="none", outputs=("lse", "argmax", "entropy")
        )
        np.testing.assert_array_equal(loss, [0.0, np.inf, np.inf])
        np.testing.assert_array_equal(st.lse, [200.0, 200.0, -np.inf])
        np.testing.assert_array_equal(st.argmax, [C - 1, C - 1, 0])
        assert np.all(np.isfinite(g)) and np.all(np.isfinite(st.entropy))
        # row 2: the uniform limit of an all -inf row, times the scale
        np.testing.assert_allclose(g[2], 2.0 * (1.0 / C - (np.arange(C) == 0)), rtol=1e-6)
        l1 = fx.cross_entropy(
            np.ascontiguousarray(z.T)[None], y[None], logit_scale=2.0, axis=1, reduction="none"
        )
        np.testing.assert_array_equal(l1[0], loss)
        st0, ost0 = fx.shard_stats(
            z[:, :1], y, offset=0, num_classes=C, logit_scale=2.0, outputs=("lse",)
        )
        st1, ost1 = fx.shard_stats(
            z[:, 1:], y, offset=1, num_classes=C, logit_scale=2.0, outputs=("lse",)
        )
        ls = fx.loss_from_stats(fx.merge_stats(st0, st1), reduction="none", num_classes=C)
        # (float64 loss statistics: 6e38 for row 1 in float32, which rounds to inf)
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(ls.astype(dtype), loss)
        o = fx.outputs_from_stats(fx.merge_output_stats(ost0, ost1), y, num_classes=C)
        np.testing.assert_array_equal(o.lse, st.lse)
        np.testing.assert_array_equal(o.argmax, st.argmax)


def test_huge_softcap_is_no_softcap(isa, rng):
    """softcap -> inf is the identity: with softcap = 1e6 and |z| < 10, z' = z (1 - O(1e-11))
    and the chain factor is 1 - O(1e-10)."""
    z = make_logits(rng, (10, 6), 2.0, np.float64)
    y = make_target(rng, (10,), 6)
    for red in REDUCTIONS:
        l1, g1 = fx.cross_entropy_with_grad(z, y, reduction=red, softcap=1e6)
        l2, g2 = fx.cross_entropy_with_grad(z, y, reduction=red)
        np.testing.assert_allclose(l1, l2, rtol=1e-9)
        np.testing.assert_allclose(g1, g2, atol=1e-9)


def test_z_loss_adds_lse_squared(isa, rng):
    """z_loss only adds lambda lse^2 per counted row, with the gradient 2 lambda lse softmax
    (ignored rows still 0)."""
    z = make_logits(rng, (15, 7), 2.0, np.float64)
    y = make_target(rng, (15,), 7, ignore_frac=0.3)
    lam = 0.25
    l0, g0 = fx.cross_entropy_with_grad(z, y, reduction="none")
    l1, g1 = fx.cross_entropy_with_grad(z, y, reduction="none", z_loss=lam)
    lse = np.log(np.sum(np.exp(z), axis=1))
    counted = y != -100
    np.testing.assert_allclose(l1 - l0, np.where(counted, lam * lse**2, 0.0), atol=1e-13)
    sm = np.exp(z - lse[:, None])
    np.testing.assert_allclose(
        g1 - g0, np.where(counted[:, None], 2 * lam * lse[:, None] * sm, 0.0), atol=1e-14
    )
    assert np.all(l1[~counted] == 0.0) and np.all(g1[~counted] == 0.0)


def test_ignored_rows_are_zero_with_every_option(isa, rng):
    for dtype in DTYPES:
        z, t, kw = make_case(rng, (30, 6), dtype, OPTION_CASES["all"], False)
        t[::3] = -100
        z[::3] = np.nan  # whatever an ignored row holds
        loss, g = fx.cross_entropy_with_grad(z, t, reduction="none", **kw)
        assert np.all(loss[::3] == 0.0) and np.all(g[::3] == 0.0)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g))


def test_softcap_with_minus_inf_entries_matches_torch(isa):
    """A -inf logit goes through the softcap like any other: cap * tanh(-inf) = -cap (what
    PyTorch computes for z' = cap * tanh(z / cap)); its gradient is 0 (tanh' = 0 there)."""
    torch = pytest.importorskip("torch")  # noqa: F841
    z = np.array([[0.0, -np.inf, 1.0, 2.0], [-np.inf, 3.0, -np.inf, 0.5]])
    y = np.array([0, 1])
    for dtype in DTYPES:
        zz = z.astype(dtype)
        for red in REDUCTIONS:
            kw = dict(softcap=4.0, z_loss=0.01, logit_scale=1.5)
            loss, g = fx.cross_entropy_with_grad(zz, y, reduction=red, **kw)
            tl, tg = torch_cross_entropy_full(z, y, reduction=red, **kw)
            tol = 1e-12 if dtype == np.float64 else 30 * U32 + 19 * U32 * 4.0 + 15 * U32
            np.testing.assert_allclose(np.asarray(loss, np.float64), tl, rtol=tol)
            np.testing.assert_allclose(g, tg, rtol=0, atol=tol)
            assert np.all(g[np.isneginf(z)] == 0.0)


# Where the softcap's fixed shift (the kernel shifts exp by 0, not the row max, for cap <= 32
# in float32 and <= 256 in float64) meets extreme row scales: the gradient factor
# a = s (Q + z-loss term) / sum exp(z') then falls outside the range of the storage type
# (too large when every z' is near -cap, subnormal when every z' is near +cap) and the kernel
# must take its double path instead of T(a) e. (cap, z' centre, log10 of the a to aim at)
# per dtype; each row's sample weight is chosen to give it that a. "zero": a rounds to 0 even
# in double (the path then forms a e as s Q (e / S)).
_EXTREME = {
    (np.float32, "large"): (30.0, -28.0, 39.0),
    (np.float32, "small"): (30.0, 28.0, -44.0),
    (np.float32, "zero"): (30.0, 28.0, -50.0),
    (np.float64, "large"): (200.0, -180.0, 307.7),
    (np.float64, "small"): (200.0, 180.0, -320.0),
    (np.float64, "zero"): (200.0, 180.0, -330.0),
}


@pytest.mark.parametrize("side", ["large", "small", "zero"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "layout", ["short", "row", "blocks", "axis1", "in_place", "probs", "shard"]
)
def test_softcap_extreme_row_scales(isa, dtype, layout, side, rng):
    cap, centre, a_log10 = _EXTREME[(dtype, side)]
    C = {"short": 7, "axis1": 40, "blocks": block_classes(dtype) + 4}.get(layout, 300)
    shape = (3, C, 5) if layout == "axis1" else (4, C)
    axis = 1 if layout == "axis1" else -1
    # z' = centre + U(-1.5, 1.5): every class far from 0 (and inside (-cap, cap)), the row's
    # softmax still spread.
    zp = centre + rng.uniform(-1.5, 1.5, shape)
    z = (cap * np.arctanh(zp / cap)).astype(dtype)
    rshape = _row_shape(shape, axis)
    if layout == "probs":
        t = rng.random(shape).astype(dtype)
    else:
        t = make_target(rng, rshape, C)
    eps, w = 0.1, make_weight(rng, C, dtype)
    # Q, the row's soft-target mass, and S = sum exp(z'): s = a Q / S gives the row factor a.
    w64 = np.moveaxis(np.broadcast_to(w.astype(np.float64), (*rshape, C)), -1, axis % len(shape))
    if layout == "probs":
        Q = np.sum(w64 * ((1 - eps) * t.astype(np.float64) + eps / C), axis=axis)
    else:
        Q = (1 - eps) * w.astype(np.float64)[t] + eps / C * np.sum(w.astype(np.float64))
    zt, _ = transform_ref(z.astype(np.float64), cap)
    S = np.sum(np.exp(zt), axis=axis)
    # (times a random factor: a itself off the subnormal grid, where T(a) has to round)
    sw = (
        S / Q * rng.uniform(1.0, 1.3, S.shape) * 10.0 ** (a_log10 / 2) * 10.0 ** (a_log10 / 2)
    ).astype(dtype)
    kw = dict(softcap=cap, sample_weight=sw, axis=axis, label_smoothing=eps, weight=w)
    # The premise: a = s Q / S leaves [min normal, max / 8] of the dtype for every row.
    a = sw.astype(np.float64) * Q / S
    fi = np.finfo(dtype)
    assert np.all(((a > float(fi.max) / 8) | (a < float(fi.tiny))) & np.isfinite(a)), a
    ref_l, ref_g, lsc, gsc = cross_entropy_full_ref(z, t, reduction="sum", scales=True, **kw)
    if layout == "in_place":
        work = z.copy()
        loss, g = fx.cross_entropy_with_grad(work, t, reduction="sum", out=work, **kw)
        assert g is work or np.shares_memory(g, work)
    elif layout == "shard":
        # Two vocabulary shards: statistics merged, each shard's gradient from them.
        bounds = ((0, C // 3), (C // 3, C))
        st = fx.merge_stats(
            *[
                fx.shard_stats(
                    z[:, a:b],
                    t,
                    offset=a,
                    num_classes=C,
                    softcap=cap,
                    label_smoothing=eps,
                    weight=w[a:b],
                )
                for a, b in bounds
            ]
        )
        loss = fx.loss_from_stats(st, num_classes=C, reduction="sum", sample_weight=sw)
        g = np.concatenate(
            [
                fx.shard_grad(
                    z[:, a:b],
                    t,
                    st,
                    offset=a,
                    num_classes=C,
                    reduction="sum",
                    sample_weight=sw,
                    softcap=cap,
                    label_smoothing=eps,
                    weight=w[a:b],
                )
                for a, b in bounds
            ],
            axis=1,
        )
    else:
        loss, g = fx.cross_entropy_with_grad(z, t, reduction="sum", **kw)
    assert np.all(np.isfinite(g)) and np.isfinite(loss)
    tol = tolerance(dtype, z, kw)
    assert scaled_error(loss, ref_l, lsc) <= tol
    assert scaled_error(g, ref_g, gsc) <= tol
    # Entry by entry too (gsc is the row's largest term, here the target's, which the kernel
    # computes in double anyway): each entry against its own terms s (Q softmax_c + u_c), the
    # derivation's scale per entry. A subnormal T(a) would be off by percents here.
    ax = axis % len(shape)
    sm = np.exp(zt - np.log(S)[(slice(None),) * ax + (None,)])
    if layout == "probs":
        u = w64 * ((1 - eps) * t.astype(np.float64) + eps / C)
    else:
        u = eps / C * w64 + (1 - eps) * np.moveaxis(
            np.eye(C)[t] * w.astype(np.float64)[t][..., None], -1, ax
        )
    expand = (slice(None),) * ax + (None,)
    entry_scale = sw.astype(np.float64)[expand] * (Q[expand] * sm + u)
    assert scaled_error(g, ref_g, entry_scale) <= tol


@pytest.mark.parametrize("layout", ["rows", "short", "axis1", "axis1_streamed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nan_row_gradient_is_one_quiet_nan(isa, dtype, layout, monkeypatch):
    """A row with a NaN logit has a NaN loss and a gradient of one quiet NaN (the bits of
    dtype(nan)) in every entry, whatever path computed it: the SIMD passes would otherwise
    propagate whichever NaN each instruction picks (the logit's own, sign and payload
    included), which differs between paths."""
    rng = np.random.default_rng(5)
    shape = {"rows": (5, 1000), "short": (5, 10)}.get(layout, (2, 7, 640))
    axis = -1 if layout in ("rows", "short") else 1
    x = rng.standard_normal(shape).astype(dtype)
    neg_nan = np.frombuffer(np.array([np.nan], dtype).view(np.uint8).copy(), dtype).copy()
    neg_nan.view({4: np.uint32, 8: np.uint64}[np.dtype(dtype).itemsize])[0] |= {
        4: np.uint32(1 << 31),
        8: np.uint64(1 << 63),
    }[np.dtype(dtype).itemsize]
    if axis == 1:
        x[1, 3, 17] = neg_nan[0]  # a NaN with its sign bit set, at position (1, 17)
        y = rng.integers(0, shape[1], (shape[0], shape[2]))
        sel, lsel = (1, slice(None), 17), (1, 17)
    else:
        x[2, 4] = neg_nan[0]
        y = rng.integers(0, shape[1], shape[0])
        sel, lsel = (2, slice(None)), (2,)
    code = "1" if layout == "axis1_streamed" else "0"
    out = np.empty_like(x)
    res = (
        subprocess_run_with_env({"FASTXENT_STREAM_BYTES": code}, x, y, axis, isa)
        if layout == "axis1_streamed"
        else fx.cross_entropy_with_grad(
            x, y, axis=axis, out=out, reduction="none", label_smoothing=0.1
        )
    )
    loss, g = res
    want = np.array([np.nan], dtype).tobytes()
    assert np.isnan(loss[lsel])
    assert all(v.tobytes() == want for v in np.ravel(g[sel])), g[sel]


def subprocess_run_with_env(env_vars, x, y, axis, isa):
    """(loss, grad) of cross_entropy_with_grad(x, y, axis=axis, reduction="none",
    label_smoothing=0.1) computed in a subprocess with extra environment variables (read once
    at import by the library) under ISA isa."""
    import os
    import pickle
    import subprocess
    import sys

    env = dict(os.environ)
    env.update(env_vars)
    code = (
        "import pickle, sys, numpy as np, fastxent as fx\n"
        "from fastxent import _core\n"
        "x, y, axis, isa = pickle.loads(sys.stdin.buffer.read())\n"
        "_core.set_isa(isa)\n"
        "out = np.empty_like(x)\n"
        "r = fx.cross_entropy_with_grad(x, y, axis=axis, out=out, reduction='none',"
        " label_smoothing=0.1)\n"
        "sys.stdout.buffer.write(pickle.dumps(r))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps((x, y, axis, isa)),
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr.decode()
    return pickle.loads(res.stdout)


@pytest.mark.parametrize(
    "entry", ["cross_entropy", "cross_entropy_with_grad", "bfloat16", "shard_stats", "shard_grad"]
)
def test_softcap_below_float32_range_is_refused(entry):
    """A softcap that rounds to 0 in float32 (the math of float32 and 16-bit logits) would run
    the kernel without its transform: ValueError, nothing written. float64 takes it."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    t = np.array([1, 2, 3, 4])
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="rounds to 0 in float32"):
        if entry == "cross_entropy":
            fx.cross_entropy(x, t, softcap=1e-50)
        elif entry == "cross_entropy_with_grad":
            fx.cross_entropy_with_grad(x, t, softcap=1e-50, out=out)
        elif entry == "bfloat16":
            ml_dtypes = pytest.importorskip("ml_dtypes")
            xb = x.astype(ml_dtypes.bfloat16)
            ob = np.full_like(xb, 7.0)
            fx.cross_entropy_with_grad(xb, t, softcap=1e-50, out=ob)
            assert np.all(ob.astype(np.float32) == 7.0)
        elif entry == "shard_stats":
            fx.shard_stats(x, t, offset=0, num_classes=10, softcap=1e-50)
        else:
            st = fx.shard_stats(x, t, offset=0, num_classes=10)
            fx.shard_grad(x, t, st, offset=0, num_classes=10, softcap=1e-50, out=out)
    assert np.all(out == 7.0)
    loss = fx.cross_entropy(x.astype(np.float64), t, softcap=1e-50)
    assert np.isfinite(loss)


def test_softcap_row_of_all_minus_inf(isa):
    """A row of all -inf logits through a softcap: the chain factor d z'/d z = 1 - tanh^2 is 0
    at z = -inf, so whatever the convention for the loss (the formula and PyTorch: z' = -cap
    everywhere, loss log C; the documented "all -inf row" rule: +inf), the gradient of every
    entry must be 0, and must sum to 0 over the row in any case."""
    z = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]])
    y = np.array([1, 2])
    for dtype in DTYPES:
        for red in REDUCTIONS:
            loss, g = fx.cross_entropy_with_grad(z.astype(dtype), y, reduction=red, softcap=5.0)
            assert np.all(g[0] == 0.0), f"{np.dtype(dtype).name} {red}: gradient {g[0]}"


def test_softcap_row_of_all_minus_inf_loss_follows_formula(isa):
    """The loss of that row by the formula (and PyTorch): z' = -cap for every class, so
    log C, the same as for the row [-inf, -inf, x] with x -> -inf, which fastxent computes
    finite (test_softcap_with_minus_inf_entries_matches_torch)."""
    z = np.array([[-np.inf, -np.inf, -np.inf]])
    for dtype in DTYPES:
        loss = fx.cross_entropy(z.astype(dtype), np.array([1]), reduction="sum", softcap=5.0)
        assert float(loss) == pytest.approx(math.log(3), rel=1e-6)


# --------------------------------------------------------------------------------------
# bad values: ValueError / TypeError before anything is written


N, C = 6, 5


def _base(dtype=np.float32):
    rng = np.random.default_rng(0)
    return make_logits(rng, (N, C), 1.0, dtype), make_target(rng, (N,), C)


BAD_VALUES = [
    ("softcap", -1.0),
    ("softcap", 0.0),
    ("softcap", -0.0),
    ("softcap", float("nan")),
    ("softcap", float("inf")),
    ("softcap", -float("inf")),
    ("logit_scale", 0.0),
    ("logit_scale", -1.0),
    ("logit_scale", float("nan")),
    ("logit_scale", float("inf")),
    ("logit_scale", -float("inf")),
    ("z_loss", -1e-3),
    ("z_loss", float("nan")),
    ("z_loss", float("inf")),
    ("z_loss", -float("inf")),
    ("normalizer", -1.0),
    ("normalizer", -1e-300),
    ("normalizer", float("nan")),
    ("normalizer", float("inf")),
    ("sample_weight", np.ones(N + 1)),
    ("sample_weight", np.ones((N, 1))),
    ("sample_weight", np.ones((1, N))),
    ("sample_weight", np.float64(1.0)),
    ("sample_weight", np.ones(C)),
    ("sample_weight", np.ones((N, C))),
    ("weight", np.ones(C + 1)),
    ("weight", np.ones((1, C))),
    ("weight", np.ones(N)),
    ("weight", np.float64(1.0)),
]


def _bad_id(v):
    if isinstance(v, np.ndarray) or isinstance(v, np.generic):
        return f"shape{np.shape(v)}"
    return repr(v)


def assert_rejected_without_writes(exc, z, t, match=None, **kw):
    """Both entry points raise exc; a with-grad call into a pre-filled out= buffer and an
    in-place call (out=logits) leave every byte of out and of the logits as they were."""
    z_before = z.copy()
    with pytest.raises(exc, match=match):
        fx.cross_entropy(z, t, **kw)
    with pytest.raises(exc, match=match):
        fx.cross_entropy_with_grad(z, t, **kw)
    out = np.full_like(z, 1234.5)
    with pytest.raises(exc, match=match):
        fx.cross_entropy_with_grad(z, t, out=out, **kw)
    assert np.all(out == z.dtype.type(1234.5)), "out= was written before the error"
    assert_bitwise_equal(z, z_before, "logits after a rejected call")
    zi = z.copy()
    with pytest.raises(exc, match=match):
        fx.cross_entropy_with_grad(zi, t, out=zi, **kw)
    assert_bitwise_equal(zi, z_before, "in-place logits after a rejected call")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,value", BAD_VALUES, ids=[f"{n}={_bad_id(v)}" for n, v in BAD_VALUES])
def test_bad_option_value_raises_value_error_and_writes_nothing(dtype, name, value):
    z, y = _base(dtype)
    match = name if name not in ("sample_weight", "weight") else f"{name}.*shape"
    for red in REDUCTIONS:
        assert_rejected_without_writes(
            ValueError, z, y, match=match, reduction=red, **{name: value}
        )
    # The same with probability targets where the option applies to them.
    p = np.full((N, C), 0.2, dtype)
    assert_rejected_without_writes(ValueError, z, p, match=match, **{name: value})
    # And with the class axis not last (the column path).
    zt = np.ascontiguousarray(z.T)
    if name in ("sample_weight", "weight"):
        return
    assert_rejected_without_writes(ValueError, zt, y, match=match, axis=0, **{name: value})


@pytest.mark.parametrize(
    "value",
    [np.array(["a"] * N), np.array([None] * N, dtype=object), np.ones(N, dtype=complex), ["x"] * N],
    ids=["str", "object", "complex", "list-of-str"],
)
def test_non_numeric_sample_weight_raises_type_error(value):
    z, y = _base()
    assert_rejected_without_writes(TypeError, z, y, match="sample_weight", sample_weight=value)


@pytest.mark.parametrize("ii", [0, -1, 3, 2**40])
def test_probability_targets_refuse_ignore_index(ii):
    z, _ = _base()
    p = np.full((N, C), 0.2, np.float32)
    assert_rejected_without_writes(ValueError, z, p, match="ignore_index", ignore_index=ii)
    # The default, spelled out, is fine.
    fx.cross_entropy_with_grad(z, p, ignore_index=-100)


@pytest.mark.parametrize("pshape", [(N, C + 1), (N + 1, C), (C, N), (1, C)], ids=str)
def test_probability_target_of_wrong_shape(pshape):
    z, _ = _base()
    assert_rejected_without_writes(ValueError, z, np.full(pshape, 0.1, np.float32), match="shape")
    z3 = make_logits(np.random.default_rng(1), (2, C, 3), 1.0, np.float32)
    assert_rejected_without_writes(
        ValueError, z3, np.full((2, C, 4), 0.1, np.float32), axis=1, match="shape"
    )


def test_float_target_of_another_rank_is_refused():
    """A float target whose rank is not the logits' is neither class indices nor
    probabilities: refused (TypeError: not integer class indices) before writing."""
    z, _ = _base()
    for t in (np.full((N,), 1.0, np.float32), np.full((N, C, 1), 0.1, np.float32)):
        assert_rejected_without_writes((TypeError, ValueError), z, t)


def test_bad_option_types():
    z, y = _base()
    for name, value in (
        ("softcap", "abc"),
        ("logit_scale", None),
        ("z_loss", [0.1]),
        ("normalizer", object()),
    ):
        assert_rejected_without_writes((TypeError, ValueError), z, y, **{name: value})


def test_good_edge_values_are_accepted(rng):
    """The boundaries the contract allows: z_loss = 0, normalizer = 0 (D = 0), tiny and huge
    positive softcap and logit_scale, a sample weight of 0."""
    z, y = _base(np.float64)
    for kw in (
        dict(z_loss=0.0),
        dict(normalizer=0.0),
        dict(softcap=1e-300),
        dict(softcap=1e300),
        dict(logit_scale=1e-300),
        dict(logit_scale=1e10),
        dict(sample_weight=np.zeros(N)),
        dict(normalizer=1e-300),
    ):
        loss, g = fx.cross_entropy_with_grad(z, y, **kw)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(g)), kw


# --------------------------------------------------------------------------------------
# determinism: bitwise identical for every thread count, in place, loss-only


DET_OPTIONS = {
    "off": dict(),
    "on": dict(
        weight=True,
        label_smoothing=0.1,
        ignore_frac=0.1,
        sample_weight=True,
        z_loss=1e-3,
        softcap=10.0,
        logit_scale=1.3,
        normalizer=50.0,
    ),
}
# (dtype, shape, axis, options, probability targets): each shape with options on and off,
# class and probability targets, both dtypes, without the full product (runtime).
DET_CASES = [
    (np.float32, (2, 300000), -1, "off", False),
    (np.float64, (2, 300000), -1, "on", False),
    (np.float32, (2, 300000), -1, "on", True),
    (np.float64, (80, 1200), -1, "off", True),
    (np.float32, (80, 1200), -1, "on", False),
    (np.float64, (8, 50, 100), 1, "on", False),
    (np.float32, (8, 50, 100), 1, "off", True),
    (np.float64, (3, 40000), 0, "on", True),
    (np.float32, (3, 40000), 0, "on", False),
]


@pytest.mark.parametrize(
    "dtype,shape,axis,opts,probs",
    DET_CASES,
    ids=[
        f"{np.dtype(d).name}-{s}-axis{a}-{o}-{'probs' if p else 'class'}"
        for d, s, a, o, p in DET_CASES
    ],
)
def test_bitwise_deterministic(isa, dtype, shape, axis, opts, probs, rng):
    """num_threads 1, 2, 3, None; in place (out=logits) vs out of place; loss-only vs the
    with-grad loss: all the same bits. (2, 300000): few rows, the class axis split across
    threads; (80, 1200): rows across threads; (8, 50, 100) axis=1 and (3, 40000) axis=0:
    the column path above the 32768-logit parallel threshold."""
    z, t, kw = make_case(rng, shape, dtype, DET_OPTIONS[opts], probs, axis=axis)
    kw["axis"] = axis
    for red in REDUCTIONS:
        ref_l, ref_g = fx.cross_entropy_with_grad(z, t, reduction=red, num_threads=1, **kw)
        for nt in (2, 3, None):
            what = f"{red} num_threads={nt}"
            l, g = fx.cross_entropy_with_grad(z, t, reduction=red, num_threads=nt, **kw)
            assert_bitwise_equal(l, ref_l, f"{what} loss")
            assert_bitwise_equal(g, ref_g, f"{what} grad")
        for nt in (1, 3):
            assert_bitwise_equal(
                fx.cross_entropy(z, t, reduction=red, num_threads=nt, **kw),
                ref_l,
                f"{red} num_threads={nt} loss-only",
            )
        zi = z.copy()
        l, g = fx.cross_entropy_with_grad(zi, t, reduction=red, out=zi, **kw)
        assert g is zi
        assert_bitwise_equal(l, ref_l, f"{red} in-place loss")
        assert_bitwise_equal(zi, ref_g, f"{red} in-place grad")


@pytest.mark.parametrize("C", [10, 300, 5000])
@pytest.mark.parametrize("kind", ["rows", "columns", "bfloat16", "in place", "shard"])
def test_weight_of_an_untargeted_class_does_not_matter_without_smoothing(isa, C, kind):
    """With class targets and no label smoothing, a class no row targets has no say in the
    loss or the gradient, even an infinite or NaN weight (PyTorch's F.cross_entropy: finite
    there). Regression: its weight entered every row's soft-target sum as 0 * inf = NaN (NaN
    gradient column, NaN lse), and the gradient's u = w term as 0 * inf at that class."""
    import ml_dtypes

    rng = np.random.default_rng(C)
    z = rng.standard_normal((6, C)).astype(np.float32)
    t = np.array([0, 2, 3, -100, 4, 2])
    for red in ("mean", "sum", "none"):
        res = []
        for w1 in (7.0, np.inf, np.nan):
            w = np.linspace(0.5, 2.0, C).astype(np.float32)
            w[1] = w1
            kw = dict(weight=w, reduction=red)
            if kind == "rows":
                out = fx.cross_entropy_with_grad(z, t, outputs=("lse", "target_logprob"), **kw)
                out = out[:2] + (out[2].lse, out[2].target_logprob)
            elif kind == "columns":
                zc = np.ascontiguousarray(z.T)[None]  # (1, C, 6), class axis 1
                out = fx.cross_entropy_with_grad(zc, t[None], axis=1, **kw)
            elif kind == "bfloat16":
                out = fx.cross_entropy_with_grad(z.astype(ml_dtypes.bfloat16), t, **kw)
            elif kind == "in place":
                zz = z.copy()
                out = fx.cross_entropy_with_grad(zz, t, out=zz, **kw)
            else:
                st = fx.shard_stats(z, t, offset=0, num_classes=C, weight=w)
                out = (fx.loss_from_stats(st, reduction=red), fx.shard_grad(z, t, st, **kw,
                       offset=0, num_classes=C))  # fmt: skip
            res.append(out)
        for other in res[1:]:
            for a, b in zip(res[0], other):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
