"""Numerics of fastxent.cross_entropy / cross_entropy_with_grad: values against the float64
NumPy reference (tests/reference.py), PyTorch (when installed) and finite differences;
reductions, class weights, label smoothing, ignore_index; edge cases (C = 1, N = 0, masked
classes, huge logits, NaN). Every numerical test runs under every ISA (the `isa` fixture).

Tolerances, all in units of the unit roundoff u (U32 = 2**-24 ~ 6.0e-8, U64 = 2**-53 ~ 1.1e-16)
and each measured the way reference.loss_error / reference.grad_error say (loss: relative to
max(|loss|, 1); gradient: relative to the largest gradient entry):

* float64, 1e-12 (~ 9000 u): the kernel works in float64 throughout (exp within 1 ULP, sums of
  positive terms, log and the final products) with no cancellation (every loss term is a sum
  of non-negative parts), so its error is u times the length of its accumulation chains, the
  longest being sequential sums over rows (the "mean" denominator over 3000 rows measures
  1.7e-14 = 150 u here). 1e-12 also absorbs the reference's own few-u error, and is still
  1e9 times smaller than any formula mistake (a wrong weight, scale or smoothing term moves
  the result by >= 1e-3).

* float32, 24 u (1.4e-6): the bound the kernel's documented precision policy gives. The
  loss m - z_y + log S is computed in double from exact float32 inputs except S =
  sum_c exp(z_c - m): each exp is within 1.3 ULP (2.6 u), and the float32 lane accumulators
  take at most 16 additions before their total moves to double (<= 16 u), so S is within
  ~19 u; log S turns that into an absolute error on the loss, plus 0.5 u for the final
  rounding: 20 u on loss_error's scale. The gradient a * e_c - b * w_c carries S's error
  through a = s Q / S, e_c's own 2.6 u and ~1.5 u for the product and difference: 24 u,
  used for both. On these randn inputs the kernels measure ~3 u, so this catches any
  mistake in the formula but not a small precision regression: that is the job of
  test_float32_accuracy_no_worse_than_twice_torch below (the contract: no worse than twice
  PyTorch's float32 error on the same input).
"""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pytest

import fastxent as fx
from reference import (
    U32,
    cross_entropy_ref,
    grad_error,
    loss_error,
    make_logits,
    make_target,
    make_weight,
    torch_cross_entropy,
    assert_bitwise_equal,
)

REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float32, np.float64)
TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 24 * U32}  # see the docstring
# (N, C): every C of the contract; N from 1 to thousands, few rows for the huge C.
SHAPES = [
    (1, 1),
    (6, 1),
    (64, 2),
    (33, 7),
    (3000, 7),
    (100, 15),
    (100, 16),
    (2000, 17),
    (300, 1000),
    (4, 50257),
    (2, 128256),
]
SCALES = (1e-6, 1e-2, 1.0, 30.0, 1e4)
# Option sets run on every (shape, scale): plain, weights, smoothing, and everything together
# with 10% of rows ignored.
OPTION_SETS = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.1),
    dict(weight=True, label_smoothing=0.3, ignore_frac=0.1),
]


def _kwargs(rng, opts, C, dtype):
    kw = {}
    if opts.get("weight"):
        kw["weight"] = make_weight(rng, C, dtype)
    if "label_smoothing" in opts:
        kw["label_smoothing"] = opts["label_smoothing"]
    return kw


def check_against_reference(z, y, *, tol, reductions=REDUCTIONS, **kw):
    """Runs fastxent and the reference for each reduction; checks dtype/shape contract and
    values. Returns the worst errors seen (for messages)."""
    for red in reductions:
        ref_l, ref_g = cross_entropy_ref(z, y, reduction=red, **kw)
        loss, grad = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
        loss_only = fx.cross_entropy(z, y, reduction=red, **kw)
        # Contract of the result types.
        assert grad.dtype == z.dtype and grad.shape == z.shape and grad.flags.c_contiguous
        if red == "none":
            assert isinstance(loss, np.ndarray)
            assert loss.dtype == z.dtype and loss.shape == z.shape[:-1]
        else:
            assert isinstance(loss, z.dtype.type), type(loss)
        # Asking for the gradient does not change the loss (same pass, same arithmetic).
        assert_bitwise_equal(loss_only, loss, f"loss-only vs with-grad ({red})")
        # With label smoothing the target q is spread, and p - q can cancel far below the terms
        # a e_c and b w_c that the kernel rounds (C = 2, smoothing 1, near-equal logits:
        # p - 1/2 ~ 6e-3 while each term is ~ 1/2; hypothesis found it, 3.6e-6 relative to
        # max |p - q|, i.e. 0.8 u of the terms). The unsmoothed gradient, p - onehot, has the
        # terms' size; the error is measured against that.
        terms = None
        if kw.get("label_smoothing"):
            terms = cross_entropy_ref(z, y, reduction=red, **{**kw, "label_smoothing": 0.0})[1]
        el, eg = loss_error(loss, ref_l), grad_error(grad, ref_g, terms)
        assert el <= tol, f"{red}: loss error {el:.3g} > {tol:.3g}"
        assert eg <= tol, f"{red}: grad error {eg:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------------------
# values against the reference


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("N,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(isa, dtype, N, C, scale):
    rng = np.random.default_rng([N, C, int(math.log10(scale) + 10)])
    z = make_logits(rng, (N, C), scale, dtype)
    for opts in OPTION_SETS:
        kw = _kwargs(rng, opts, C, dtype)
        y = make_target(rng, (N,), C, ignore_frac=opts.get("ignore_frac", 0.0))
        check_against_reference(z, y, tol=TOL[np.dtype(dtype)], **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_multi_leading_dims(isa, dtype, rng):
    z = make_logits(rng, (3, 4, 5, 17), 3.0, dtype)
    y = make_target(rng, (3, 4, 5), 17, ignore_frac=0.2)
    check_against_reference(
        z, y, tol=TOL[np.dtype(dtype)], weight=make_weight(rng, 17, dtype), label_smoothing=0.2
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_dimensional_logits_are_one_row(isa, dtype):
    z = np.array([0.5, -1.0, 2.0, 0.25], dtype)
    for y in (2, np.int64(0), np.array(3, np.int32)):
        check_against_reference(z, y, tol=TOL[np.dtype(dtype)], label_smoothing=0.1)
        loss = fx.cross_entropy(z, y, reduction="none")
        assert loss.shape == () and loss.dtype == dtype


AXIS_CASES = [
    ((6, 9, 5), 1),
    ((6, 9, 5), 0),
    ((6, 9, 5), -2),
    ((4, 17, 3, 10), 1),
    ((4, 17, 3, 10), 2),
    ((300, 7, 40), 1),
    ((2, 1000, 50), 1),
    ((3, 2100, 9), 1),
    ((5, 8), 0),
    ((16,), 0),
    ((7, 1, 4), 1),
]


@pytest.mark.parametrize("shape,axis", AXIS_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_axis_matches_reference(isa, dtype, shape, axis, rng):
    """A class axis other than the last (commit c17fbcd; PyTorch's (N, C, d1, ...) layout with
    axis=1): the same function as with that axis moved last -- the target has the logits'
    shape without the class axis, the gradient the logits' shape."""
    z = make_logits(rng, shape, 2.0, dtype)
    ax = axis % z.ndim
    C = shape[ax]
    tshape = shape[:ax] + shape[ax + 1 :]
    y = make_target(rng, tshape, C, ignore_frac=0.1)
    w = make_weight(rng, C, dtype)
    tol = TOL[np.dtype(dtype)]
    for kw in (dict(), dict(weight=w, label_smoothing=0.2)):
        for red in REDUCTIONS:
            ref_l, ref_g = cross_entropy_ref(np.moveaxis(z, ax, -1), y, reduction=red, **kw)
            ref_g = np.moveaxis(ref_g, -1, ax)
            loss, g = fx.cross_entropy_with_grad(z, y, axis=axis, reduction=red, **kw)
            assert g.shape == z.shape and g.dtype == z.dtype and g.flags.c_contiguous
            if red == "none":
                assert loss.shape == tshape and loss.dtype == z.dtype
            else:
                assert isinstance(loss, z.dtype.type)
            assert loss_error(loss, ref_l) <= tol, (red, sorted(kw))
            assert grad_error(g, ref_g) <= tol, (red, sorted(kw))
            assert_bitwise_equal(
                fx.cross_entropy(z, y, axis=axis, reduction=red, **kw),
                loss,
                "loss-only vs with-grad",
            )
            other = axis - z.ndim if axis >= 0 else axis + z.ndim
            assert_bitwise_equal(
                fx.cross_entropy(z, y, axis=other, reduction=red, **kw),
                loss,
                f"axis {axis} spelled {other}",
            )


@pytest.mark.parametrize("shape", [(8, 7, 30), (4, 1000, 20), (3, 5, 4, 6)], ids=str)
def test_axis_one_matches_torch_layout(isa, shape):
    """PyTorch takes (N, C, d1, ...) natively: axis=1 must agree with it directly."""
    pytest.importorskip("torch")
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(len(shape) * 1000 + shape[1])
    z = make_logits(rng, shape, 2.0, np.float64)
    C = shape[1]
    y = make_target(rng, shape[:1] + shape[2:], C, ignore_frac=0.1)
    w = make_weight(rng, C, np.float64)
    for kw in (dict(), dict(weight=w, label_smoothing=0.1)):
        for red in REDUCTIONS:
            zt = torch.from_numpy(z.copy()).requires_grad_(True)
            tl = F.cross_entropy(
                zt,
                torch.from_numpy(y.copy()),
                reduction=red,
                weight=None if "weight" not in kw else torch.from_numpy(w.copy()),
                label_smoothing=kw.get("label_smoothing", 0.0),
            )
            tl.sum().backward()
            loss, g = fx.cross_entropy_with_grad(z, y, axis=1, reduction=red, **kw)
            assert loss_error(loss, tl.detach().numpy()) <= 1e-12
            assert grad_error(g, zt.grad.numpy()) <= 1e-12


def test_known_values(isa):
    # Hand-computed: row 0: log(e^2 + e + e^0.1) - 2, row 1: log(e^0.5 + e^2.5 + e^0.3) - 2.5.
    z = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
    r0 = math.log(math.exp(2) + math.exp(1) + math.exp(0.1)) - 2
    r1 = math.log(math.exp(0.5) + math.exp(2.5) + math.exp(0.3)) - 2.5
    assert fx.cross_entropy(z, [0, 1]) == pytest.approx((r0 + r1) / 2, rel=1e-14)
    assert fx.cross_entropy(z, [0, 1], reduction="sum") == pytest.approx(r0 + r1, rel=1e-14)
    np.testing.assert_allclose(fx.cross_entropy(z, [0, 1], reduction="none"), [r0, r1], rtol=1e-14)
    z32 = z.astype(np.float32)
    assert float(fx.cross_entropy(z32, [0, 1])) == pytest.approx(0.3185397696491856, rel=4 * U32)
    _, g = fx.cross_entropy_with_grad(z32[:1], [0])
    p = np.exp(z[0]) / np.exp(z[0]).sum()
    np.testing.assert_allclose(g[0], p - [1, 0, 0], rtol=0, atol=4 * U32)


def test_docstring_examples():
    """The examples in the public docstrings are what users copy: they must be right."""
    import fastxent._api as api

    for mod in (fx, api):
        res = doctest.testmod(
            mod,
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
            report=True,
            verbose=False,
        )
        assert res.failed == 0, f"{res.failed} docstring example(s) of {mod.__name__} fail"


# --------------------------------------------------------------------------------------
# PyTorch


torch_params = pytest.mark.parametrize(
    "N,C,scale",
    [
        (50, 7, 1.0),
        (64, 16, 1e-6),
        (40, 17, 1e4),
        (128, 1000, 3.0),
        (3, 50257, 1.0),
        (2, 128256, 10.0),
    ],
)


@torch_params
def test_float64_matches_torch_float64(isa, N, C, scale):
    pytest.importorskip("torch")
    rng = np.random.default_rng([N, C])
    z = make_logits(rng, (N, C), scale, np.float64)
    w = make_weight(rng, C, np.float64)
    y = make_target(rng, (N,), C, ignore_frac=0.15)
    for kw in (
        dict(),
        dict(weight=w),
        dict(label_smoothing=0.15),
        dict(weight=w, label_smoothing=0.6),
        dict(weight=w, label_smoothing=1.0),
    ):
        for red in REDUCTIONS:
            tl, tg = torch_cross_entropy(z, y, reduction=red, **kw)
            loss, grad = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
            # Both are float64 computations of the same formula: 1e-12 as for the reference
            # (PyTorch's float64 error is of the same few-u order).
            assert loss_error(loss, tl) <= 1e-12, (kw.keys(), red)
            assert grad_error(grad, tg) <= 1e-12, (kw.keys(), red)


@torch_params
def test_reference_matches_torch_float64(N, C, scale):
    """The NumPy reference, which every other test trusts, is PyTorch's F.cross_entropy."""
    pytest.importorskip("torch")
    rng = np.random.default_rng([N, C, 1])
    z = make_logits(rng, (N, C), scale, np.float64)
    w = make_weight(rng, C, np.float64)
    y = make_target(rng, (N,), C, ignore_frac=0.15)
    y_cls = np.where(y == -100, 0, y)  # ignore_index naming a real class: no -100 left
    for yy, kw in (
        (y, dict()),
        (y, dict(weight=w, label_smoothing=0.3)),
        (y_cls, dict(ignore_index=int(y_cls[-1]), weight=w, label_smoothing=0.1)),
    ):
        for red in REDUCTIONS:
            tl, tg = torch_cross_entropy(z, yy, reduction=red, **kw)
            rl, rg = cross_entropy_ref(z, yy, reduction=red, **kw)
            assert loss_error(rl, tl) <= 1e-12 and grad_error(rg, tg) <= 1e-12, (sorted(kw), red)


@pytest.mark.parametrize("ignore_index", [0, 3, -1, 6])
def test_ignore_index_equal_to_a_class_matches_torch(isa, ignore_index):
    """ignore_index naming a real class drops the rows with that target and nothing else: the
    class still takes part in every softmax and in the smoothing term."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(ignore_index + 10)
    z = make_logits(rng, (40, 7), 2.0, np.float64)
    y = make_target(rng, (40,), 7)
    w = make_weight(rng, 7, np.float64)
    for kw in (dict(), dict(weight=w, label_smoothing=0.2)):
        for red in REDUCTIONS:
            tl, tg = torch_cross_entropy(z, y, reduction=red, ignore_index=ignore_index, **kw)
            loss, grad = fx.cross_entropy_with_grad(
                z, y, reduction=red, ignore_index=ignore_index, **kw
            )
            assert loss_error(loss, tl) <= 1e-12
            assert grad_error(grad, tg) <= 1e-12


def _peaked(rng, N, C, boost, on_target=True):
    """A trained classifier's logits: randn * 2 with one class boosted by `boost` (the
    target, or its neighbour): softmax mass ~1 on one class and thousands of tiny terms."""
    z = 2.0 * rng.standard_normal((N, C))
    y = rng.integers(0, C, N)
    z[np.arange(N), y if on_target else (y + 1) % C] += boost
    return z.astype(np.float32), y


def _accuracy_cases():
    cases = []
    for C, N in ((7, 256), (1000, 256), (50257, 8), (128256, 4)):
        for scale in (1e-6, 1e-3, 1.0, 10.0, 1e4):
            cases.append(pytest.param(("randn", N, C, scale), id=f"randn-{N}x{C}-s{scale:g}"))
    for C, N in ((1000, 64), (50257, 8), (128256, 4)):
        cases.append(pytest.param(("peaked", N, C, 15.0), id=f"peaked-{N}x{C}"))
        cases.append(pytest.param(("peaked-off", N, C, 20.0), id=f"peaked-off-{N}x{C}"))
    z = np.full((4, 1000), -17.0, np.float32)  # one logit 0, 999 at -17: exp(-17) < u/2
    z[:, 0] = 0.0
    cases.append(pytest.param(("fixed", z, np.array([0, 1, 2, 3])), id="flat-minus17-4x1000"))
    return cases


@pytest.mark.parametrize("case", _accuracy_cases())
@pytest.mark.parametrize("opts", ["plain", "weight+smoothing"])
def test_float32_accuracy_no_worse_than_twice_torch(isa, case, opts):
    """Contract: float32 loss and gradient errors (vs a float64 computation on the same float32
    inputs) are no worse than twice PyTorch float32's error on the same input.

    Floor: a float32 result is only ever known to within its own rounding (<= 0.5 ULP); when
    PyTorch happens to land within a hair of the exact value, twice its error can be below
    that. The allowance is therefore max(2 * torch_error, 1 ULP of 1 = 2 u), in the units of
    loss_error / grad_error."""
    pytest.importorskip("torch")
    kind = case[0]
    if kind == "fixed":
        z, y = case[1], case[2]
    else:
        _, N, C, param = case
        rng = np.random.default_rng([N, C, 7])
        if kind == "randn":
            z = make_logits(rng, (N, C), param, np.float32)
            y = rng.integers(0, C, N)
        else:
            z, y = _peaked(rng, N, C, param, on_target=(kind == "peaked"))
    C = z.shape[1]
    kw = {}
    if opts != "plain":
        kw = dict(weight=make_weight(np.random.default_rng(C), C, np.float32), label_smoothing=0.1)
    failures = []
    for red in ("none", "mean"):
        ref_l, ref_g = torch_cross_entropy(z, y, reduction=red, dtype=np.float64, **kw)
        t_l, t_g = torch_cross_entropy(z, y, reduction=red, dtype=np.float32, **kw)
        loss, grad = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
        for what, mine, theirs in (
            ("loss", loss_error(loss, ref_l), loss_error(t_l, ref_l)),
            ("grad", grad_error(grad, ref_g), grad_error(t_g, ref_g)),
        ):
            allowed = max(2.0 * theirs, 2.0 * U32)
            if mine > allowed:
                failures.append(
                    f"{red} {what}: fastxent error {mine:.3g} > 2 x torch "
                    f"{theirs:.3g} ({mine / max(theirs, 1e-300):.1f}x torch)"
                )
    assert not failures, f"[{isa}] " + "; ".join(failures)


# --------------------------------------------------------------------------------------
# gradient by finite differences


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.3, 1.0])
def test_gradient_matches_central_differences(isa, reduction, smoothing):
    """3x5 float64 with weights (+ a 4th, ignored row). Central differences with h = 1e-5:
    truncation h^2/6 * |f'''| ~ 2e-11, rounding ~u * |f| / h ~ 1e-11, so 1e-8 absolute is
    1000x above the method's error and 1e5x below any formula mistake."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((4, 5))
    y = np.array([1, 4, 0, -100])
    w = np.array([0.5, 1.5, 1.0, 2.0, 0.75])
    kw = dict(weight=w, label_smoothing=smoothing, reduction=reduction)

    def f(x):
        loss = fx.cross_entropy(x, y, **kw)
        return float(np.sum(loss))  # "none": the gradient is that of the sum of the rows

    h = 1e-5
    fd = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        fd[idx] = (f(zp) - f(zm)) / (2 * h)
    _, grad = fx.cross_entropy_with_grad(z, y, **kw)
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-8)
    assert np.all(grad[3] == 0.0)  # the ignored row: exactly zero
    # The reference's own gradient agrees (it is what all the other tests trust).
    _, ref_g = cross_entropy_ref(z, y, **kw)
    np.testing.assert_allclose(ref_g, fd, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------------------
# reductions, weights, smoothing, ignore_index


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_are_consistent(isa, dtype, rng):
    z = make_logits(rng, (200, 33), 2.0, dtype)
    y = make_target(rng, (200,), 33, ignore_frac=0.25)
    w = make_weight(rng, 33, dtype)
    kw = dict(weight=w, label_smoothing=0.1)
    rows, g_none = fx.cross_entropy_with_grad(z, y, reduction="none", **kw)
    total, g_sum = fx.cross_entropy_with_grad(z, y, reduction="sum", **kw)
    mean, g_mean = fx.cross_entropy_with_grad(z, y, reduction="mean", **kw)
    counted = y != -100
    D = float(np.sum(w[y[counted]].astype(np.float64)))
    tol = TOL[np.dtype(dtype)]
    assert np.all(rows[~counted] == 0)
    assert float(total) == pytest.approx(float(np.sum(rows.astype(np.float64))), rel=tol)
    assert float(mean) == pytest.approx(float(total) / D, rel=tol)
    # "none" differentiates the sum of the rows; "mean" is "sum" scaled by 1/D.
    np.testing.assert_allclose(g_none, g_sum, rtol=0, atol=tol * np.max(np.abs(g_sum)))
    np.testing.assert_allclose(g_mean * D, g_sum, rtol=0, atol=4 * tol * np.max(np.abs(g_sum)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_array_likes(isa, dtype, rng):
    """Weights as a list, as integers, or in the other float dtype give the same result as
    the same values in the logits' dtype."""
    z = make_logits(rng, (20, 4), 1.0, dtype)
    y = make_target(rng, (20,), 4)
    w_int = np.array([1, 2, 3, 4])
    base = fx.cross_entropy_with_grad(z, y, weight=w_int.astype(dtype))
    for w in (
        w_int,
        [1, 2, 3, 4],
        [1.0, 2.0, 3.0, 4.0],
        w_int.astype(np.float32),
        w_int.astype(np.float64),
        w_int.astype(np.uint8),
    ):
        got = fx.cross_entropy_with_grad(z, y, weight=w)
        assert_bitwise_equal(got[0], base[0], f"loss, weight {w!r}")
        assert_bitwise_equal(got[1], base[1], f"grad, weight {w!r}")


def test_unit_weights_equal_no_weights(isa, rng):
    z = make_logits(rng, (50, 9), 2.0, np.float64)
    y = make_target(rng, (50,), 9, ignore_frac=0.1)
    for red in REDUCTIONS:
        for eps in (0.0, 0.2):
            a = fx.cross_entropy_with_grad(z, y, reduction=red, label_smoothing=eps)
            b = fx.cross_entropy_with_grad(
                z, y, reduction=red, label_smoothing=eps, weight=np.ones(9)
            )
            np.testing.assert_allclose(a[0], b[0], rtol=1e-14)
            np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-15)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.1, 0.5, 0.999, 1.0])
def test_label_smoothing_range(isa, eps, rng):
    z = make_logits(rng, (30, 11), 3.0, np.float64)
    y = make_target(rng, (30,), 11, ignore_frac=0.1)
    check_against_reference(
        z, y, tol=1e-12, label_smoothing=eps, weight=make_weight(rng, 11, np.float64)
    )


def test_label_smoothing_one_ignores_target(isa, rng):
    """eps = 1: only the uniform smoothing term is left, so the target value of a counted row
    does not matter (but ignore_index still does)."""
    z = make_logits(rng, (16, 6), 2.0, np.float64)
    y1 = make_target(rng, (16,), 6)
    y2 = (y1 + 1) % 6
    for red in ("none", "sum"):
        a = fx.cross_entropy_with_grad(z, y1, reduction=red, label_smoothing=1.0)
        b = fx.cross_entropy_with_grad(z, y2, reduction=red, label_smoothing=1.0)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-14)
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-15)


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 5, 2**40])
def test_ignore_index_drops_rows(isa, ignore_index, rng):
    """A row whose target is ignore_index contributes 0 to every reduction, and the other rows
    give exactly what they give without it (same losses; "sum" over the same rows)."""
    C = 8
    z = make_logits(rng, (60, C), 2.0, np.float64)
    y = make_target(rng, (60,), C)
    ign = rng.random(60) < 0.3
    y[ign] = ignore_index
    keep = y != ignore_index
    w = make_weight(rng, C, np.float64)
    kw = dict(weight=w, label_smoothing=0.1, ignore_index=ignore_index)
    rows, g = fx.cross_entropy_with_grad(z, y, reduction="none", **kw)
    assert np.all(rows[~keep] == 0) and np.all(g[~keep] == 0)
    rows_kept, g_kept = fx.cross_entropy_with_grad(z[keep], y[keep], reduction="none", **kw)
    assert_bitwise_equal(rows[keep], rows_kept, "row losses of counted rows")
    assert_bitwise_equal(g[keep], g_kept, "gradient of counted rows")
    s_all = fx.cross_entropy(z, y, reduction="sum", **kw)
    s_kept = fx.cross_entropy(z[keep], y[keep], reduction="sum", **kw)
    assert_bitwise_equal(s_all, s_kept, "sum")
    check_against_reference(z, y, tol=1e-12, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_all_rows_ignored(isa, dtype, weighted, rng):
    """No counted row: "mean" is 0.0 with a zero gradient (PyTorch: NaN), "sum" 0, "none"
    zeros; the logits can hold anything (NaN, inf) since ignored rows are never read for the
    result."""
    z = make_logits(rng, (10, 5), 1.0, dtype)
    z[0, 0], z[1, :] = np.nan, np.inf
    y = np.full(10, -100)
    kw = dict(weight=make_weight(rng, 5, dtype)) if weighted else {}
    for red, expect in (("mean", 0.0), ("sum", 0.0)):
        loss, g = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
        assert isinstance(loss, dtype) and loss == expect
        assert np.all(g == 0) and g.dtype == dtype
    rows, g = fx.cross_entropy_with_grad(z, y, reduction="none", **kw)
    assert np.all(rows == 0) and np.all(g == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_weight_sum_mean_is_zero(isa, dtype):
    """Documented: with counted rows whose target weights are all 0, "mean" is 0.0 with a
    zero gradient (the 0/0 of PyTorch, which gives NaN)."""
    z = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype)
    w = np.array([0.0, 1.0, 0.0], dtype)
    loss, g = fx.cross_entropy_with_grad(z, [0, 2], weight=w)
    assert loss == 0.0 and np.all(g == 0)


# --------------------------------------------------------------------------------------
# small and empty shapes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 7, 40000])
def test_single_class_has_zero_loss(isa, dtype, N):
    """C = 1: log_softmax is identically 0, so every loss and gradient is exactly 0 (smoothing
    or weights change nothing)."""
    z = np.linspace(-50, 50, N).astype(dtype).reshape(N, 1)
    y = np.zeros(N, np.int64)
    for kw in (dict(), dict(label_smoothing=0.5, weight=[2.0]), dict(label_smoothing=1.0)):
        for red in REDUCTIONS:
            loss, g = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
            assert np.all(np.asarray(loss) == 0), (kw, red)
            assert np.all(g == 0) and g.shape == (N, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 1), (0, 5), (0, 1000), (3, 0, 7), (0, 4, 2)])
def test_zero_rows(isa, dtype, shape):
    """N = 0: "mean" and "sum" are 0.0 (PyTorch's "mean" is NaN), "none" is empty, and the
    gradient is an empty array of the logits' shape."""
    z = np.zeros(shape, dtype)
    y = np.zeros(shape[:-1], np.int64)
    for red in ("mean", "sum"):
        assert fx.cross_entropy(z, y, reduction=red) == 0.0
        loss, g = fx.cross_entropy_with_grad(z, y, reduction=red)
        assert isinstance(loss, dtype) and loss == 0.0
        assert g.shape == shape and g.dtype == dtype
    rows, g = fx.cross_entropy_with_grad(z, y, reduction="none")
    assert rows.shape == shape[:-1] and rows.dtype == dtype and g.shape == shape
    out = np.empty(shape, dtype)
    assert fx.cross_entropy_with_grad(z, y, out=out)[1] is out


# --------------------------------------------------------------------------------------
# non-finite and extreme logits

NINF = -np.inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_masked_classes_contribute_nothing(isa, dtype, weighted, rng):
    """-inf logits (masked classes), no smoothing: the loss equals that of the same rows with
    the masked columns removed, the gradient there is exactly 0, and nothing is NaN."""
    N, C = 300, 40
    z = make_logits(rng, (N, C), 2.0, dtype)
    masked = np.zeros(C, bool)
    masked[[0, 7, 8, 9, 31, 39]] = True
    z[:, masked] = NINF
    keep = np.flatnonzero(~masked)
    y = rng.choice(keep, N)
    w = make_weight(rng, C, dtype) if weighted else None
    remap = {c: i for i, c in enumerate(keep)}
    y_small = np.array([remap[v] for v in y])
    for red in REDUCTIONS:
        loss, g = fx.cross_entropy_with_grad(z, y, reduction=red, weight=w)
        ref_l, ref_g = fx.cross_entropy_with_grad(
            np.ascontiguousarray(z[:, keep]),
            y_small,
            reduction=red,
            weight=None if w is None else w[keep],
        )
        assert not np.any(np.isnan(loss)) and not np.any(np.isnan(g))
        assert np.all(g[:, masked] == 0)
        tol = TOL[np.dtype(dtype)]
        assert loss_error(loss, ref_l) <= tol
        assert grad_error(g[:, keep], ref_g) <= tol
        check_against_reference(z, y, tol=tol, weight=w, reductions=(red,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_classes_with_smoothing(isa, dtype):
    """With label smoothing every class gets eps/C of the target mass, so a masked class with
    a positive weight makes the loss +inf (as PyTorch): never NaN, and the gradient stays
    finite (it is -s * eps/C * w_c on the masked class)."""
    z = np.array([[0.0, NINF, 1.0, NINF, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0]], dtype)
    y = np.array([0, 1])
    for red in REDUCTIONS:
        loss, g = fx.cross_entropy_with_grad(z, y, reduction=red, label_smoothing=0.1)
        ref_l, ref_g = cross_entropy_ref(z, y, reduction=red, label_smoothing=0.1)
        if red == "none":
            assert loss[0] == np.inf and np.isfinite(loss[1])
        else:
            assert loss == np.inf
        assert np.all(np.isfinite(g))
        assert grad_error(g, ref_g) <= TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_class_with_zero_weight_and_smoothing_is_not_nan(isa, dtype):
    """A masked class (-inf) that also has weight 0 -- the usual way to take a class out of
    the problem entirely -- with label smoothing: its term w_c * (lse - z_c) = 0 * inf must
    count as 0 (the limit), not NaN. Contract: -inf logits produce no NaN in loss or grad.
    (PyTorch returns NaN here; fastxent promises no NaN from -inf logits.)"""
    z = np.array([[0.0, NINF, 1.0, 2.0], [0.5, NINF, -1.0, 0.0]], dtype)
    w = np.array([1.0, 0.0, 1.0, 2.0], dtype)
    y = np.array([0, 3])
    for red in REDUCTIONS:
        loss, g = fx.cross_entropy_with_grad(z, y, reduction=red, weight=w, label_smoothing=0.1)
        ref_l, ref_g = cross_entropy_ref(z, y, reduction=red, weight=w, label_smoothing=0.1)
        assert np.all(np.isfinite(ref_l))
        assert not np.any(np.isnan(loss)), f"{red}: loss {loss!r} (expected {ref_l!r})"
        assert not np.any(np.isnan(g))
        assert loss_error(loss, ref_l) <= TOL[np.dtype(dtype)]
        assert grad_error(g, ref_g) <= TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [3, 17, 1000])
def test_target_on_masked_class_is_inf_not_nan(isa, dtype, C, rng):
    """A target on a -inf class: that row's loss is +inf (not NaN), the other rows are finite
    (without smoothing), every gradient is finite and right (softmax_y = 0: g_y = -s q_y)."""
    z = make_logits(rng, (4, C), 1.0, dtype)
    z[:, 1] = NINF
    y = np.array([1, 0, 1, 2])
    w = make_weight(rng, C, dtype)
    tol = TOL[np.dtype(dtype)]
    for kw in (dict(), dict(weight=w), dict(weight=w, label_smoothing=0.2)):
        rows, g = fx.cross_entropy_with_grad(z, y, reduction="none", **kw)
        ref_l, ref_g = cross_entropy_ref(z, y, reduction="none", **kw)
        assert rows[0] == np.inf and rows[2] == np.inf
        if "label_smoothing" in kw:  # the smoothing term sees the masked class: +inf (PyTorch too)
            assert np.all(rows == np.inf)
        else:
            assert loss_error(rows[[1, 3]], ref_l[[1, 3]]) <= tol
        assert np.all(np.isfinite(g))
        assert grad_error(g, ref_g) <= tol
        for red in ("sum", "mean"):
            loss, g2 = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
            assert loss == np.inf and np.all(np.isfinite(g2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 2, 16, 1000])
def test_row_of_all_minus_inf(isa, dtype, C):
    """A row of all -inf: loss +inf, no crash, no NaN; the other rows are unaffected."""
    z = np.zeros((3, C), dtype)
    z[1] = NINF
    z[2] = np.arange(C, dtype=dtype)
    y = np.array([0, C - 1, 0])
    for kw in (dict(), dict(label_smoothing=0.1, weight=np.linspace(1, 2, C))):
        rows, g = fx.cross_entropy_with_grad(z, y, reduction="none", **kw)
        assert rows[1] == np.inf  # C = 1 included: the contract says +inf for such a row
        assert not np.any(np.isnan(rows)) and not np.any(np.isnan(g))
        alone_rows, alone_g = fx.cross_entropy_with_grad(
            z[[0, 2]], y[[0, 2]], reduction="none", **kw
        )
        assert_bitwise_equal(rows[[0, 2]], alone_rows, "other rows' losses")
        assert_bitwise_equal(g[[0, 2]], alone_g, "other rows' gradients")
        for red in ("sum", "mean"):
            loss, g2 = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
            assert loss == np.inf
            assert not np.any(np.isnan(g2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_huge_logits_never_nan(isa, dtype, eps):
    """Logits near +-max of the dtype (3e38 for float32): z - max overflows to -inf inside the
    kernel; the loss may be +inf (the true value exceeds the float32 range) but never NaN,
    and the gradient is finite (and right: softmax is one-hot on the max)."""
    big = float(np.finfo(dtype).max) * 0.9
    z = np.array([[big, -big, 0.0, 1.0], [-big, -big, big, big], [big, 0.0, 0.0, 0.0]], dtype)
    y = np.array([1, 0, 0])
    for red in REDUCTIONS:
        with warnings.catch_warnings():
            # A float32 overflow warning is test_float32_loss_overflowing_to_inf_is_silent's
            # business; here: values only.
            warnings.simplefilter("ignore", RuntimeWarning)
            loss, g = fx.cross_entropy_with_grad(z, y, reduction=red, label_smoothing=eps)
            only = fx.cross_entropy(z, y, reduction=red, label_smoothing=eps)
        assert not np.any(np.isnan(loss)), (red, loss)
        assert np.all(np.isfinite(g)), (red, g)
        assert np.all(np.asarray(loss) >= 0)
        _, ref_g = cross_entropy_ref(z, y, reduction=red, label_smoothing=eps)
        assert grad_error(g, ref_g) <= TOL[np.dtype(dtype)]
        assert not np.any(np.isnan(only))
    # Where the exact loss is representable the result is right: row 2 with y = 0 has loss ~0.
    rows = fx.cross_entropy(z[2:], y[2:], reduction="none")
    assert rows[0] == 0.0


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_float32_loss_overflowing_to_inf_is_silent(isa, reduction):
    """The float32 "sum"/"mean" loss is accumulated in double; when the exact value exceeds
    the float32 range the documented result is inf -- returned quietly, like the "none" rows
    (a RuntimeWarning here becomes an exception under -W error, as in this project's pytest
    configuration)."""
    z = np.array([[3e38, -3e38, 0.0, 1.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = fx.cross_entropy(z, [1], reduction=reduction)
        loss2, g = fx.cross_entropy_with_grad(z, [1], reduction=reduction)
    assert loss == np.inf and loss2 == np.inf
    np.testing.assert_array_equal(g, [[1.0, -1.0, 0.0, 0.0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [5, 17, 1000])
def test_nan_stays_in_its_row(isa, dtype, C, rng):
    """NaN in a counted row: that row's loss and whole gradient row are NaN; other rows'
    losses ("none") and gradients are exactly what they are without the NaN (for "mean" the
    scale 1/D does not depend on the logits)."""
    N = 12
    z = make_logits(rng, (N, C), 1.0, dtype)
    y = make_target(rng, (N,), C)
    bad = [2, 9]
    z_nan = z.copy()
    z_nan[2, C // 2] = np.nan
    z_nan[9, :] = np.nan
    others = [n for n in range(N) if n not in bad]
    w = make_weight(rng, C, dtype)
    for kw in (dict(), dict(weight=w, label_smoothing=0.1)):
        for red in REDUCTIONS:
            loss, g = fx.cross_entropy_with_grad(z_nan, y, reduction=red, **kw)
            clean_l, clean_g = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
            assert np.all(np.isnan(g[bad])), red
            assert_bitwise_equal(g[others], clean_g[others], f"{red}: other rows' gradient")
            if red == "none":
                assert np.all(np.isnan(loss[bad]))
                assert_bitwise_equal(loss[others], clean_l[others], "other rows' losses")
            else:
                assert np.isnan(loss)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ignored_rows_are_exactly_zero_whatever_they_hold(isa, dtype, rng):
    """An ignored row's loss and gradient are exactly 0 even when its logits are NaN or +-inf
    (PyTorch gives NaN gradients there); the other rows do not see it."""
    z = make_logits(rng, (6, 9), 1.0, dtype)
    z[1] = np.nan
    z[3] = np.inf
    z[4] = NINF
    z[5, ::2] = np.inf
    y = np.array([0, -100, 2, -100, -100, -100])
    for kw in (dict(), dict(weight=make_weight(rng, 9, dtype), label_smoothing=0.3)):
        for red in REDUCTIONS:
            loss, g = fx.cross_entropy_with_grad(z, y, reduction=red, **kw)
            assert np.all(g[1:2] == 0) and np.all(g[3:] == 0)
            assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g))
            clean = fx.cross_entropy_with_grad(z[[0, 2]], y[[0, 2]], reduction=red, **kw)
            if red == "none":
                assert np.all(loss[[1, 3, 4, 5]] == 0)
                assert_bitwise_equal(loss[[0, 2]], clean[0], "counted rows")
            else:
                assert_bitwise_equal(loss, clean[0], red)
            assert_bitwise_equal(g[[0, 2]], clean[1], "counted rows' gradient")


# --------------------------------------------------------------------------------------
# property-based: small random problems against the reference

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis is optional: only this test needs it
    st = None


def _problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    N = draw(st.integers(1, 12))
    C = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = 10.0 ** draw(st.integers(-6, 4))
    z = make_logits(rng, (N, C), scale, dtype)
    ignore_index = draw(st.sampled_from([-100, -1, 0, C - 1, C + 3]))
    y = make_target(
        rng, (N,), C, ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])), ignore_index=ignore_index
    )
    kw = dict(
        ignore_index=ignore_index, label_smoothing=draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    )
    if draw(st.booleans()):
        kw["weight"] = make_weight(rng, C, dtype)
    return z, y, kw


if st is not None:

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(st.composite(_problems)())
    def test_random_small_problems_match_reference(isa, prob):
        z, y, kw = prob
        check_against_reference(z, y, tol=TOL[z.dtype], **kw)
else:

    def test_random_small_problems_match_reference():
        pytest.skip("hypothesis is not installed")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("axis", [1, -1])
def test_zero_size_row_dimension(dtype, probs, axis):
    # A zero-size dimension besides the class axis (PyTorch's (N, C, 0, 7) spatial case, or
    # no rows at all): 0 for "sum" and "mean" (no row counts), an empty "none", an empty
    # gradient; out= is accepted and left as it is (it has no element).
    shape = (2, 3, 0, 7) if axis == 1 else (2, 0, 7, 3)
    x = np.zeros(shape, dtype)
    ax = axis % x.ndim
    rows = x.shape[:ax] + x.shape[ax + 1 :]
    t = np.zeros(shape, dtype) if probs else np.zeros(rows, np.int64)
    for red in ("sum", "mean"):
        assert fx.cross_entropy(x, t, axis=axis, reduction=red) == 0.0
        loss, g = fx.cross_entropy_with_grad(
            x, t, axis=axis, reduction=red, z_loss=1e-3, label_smoothing=0.1
        )
        assert loss == 0.0 and g.shape == shape and g.dtype == dtype
    none = fx.cross_entropy(x, t, axis=axis, reduction="none")
    assert none.shape == rows
    out = np.empty(shape, dtype)
    loss, g = fx.cross_entropy_with_grad(x, t, axis=axis, reduction="none", out=out)
    assert g is out and loss.shape == rows
    with pytest.raises(ValueError, match="target has shape"):
        fx.cross_entropy(x, np.zeros((2, 1, 7), np.int64), axis=axis)
