"""Sigmoid (binary / multi-label) cross-entropy: fastxent.sigmoid_cross_entropy[_with_grad].

- against PyTorch's F.binary_cross_entropy_with_logits (float64, autograd) and a float64 NumPy
  reference, for every reduction, weight and pos_weight layout and their combinations;
- extreme logits (|x| up to the largest float, +-inf) and NaN;
- central finite differences of the gradient;
- the float32 error bound against the float64 reference;
- bitwise determinism across num_threads, layouts, out= and the in-place mode;
- every error path, with nothing written.
Every numerical test runs under every ISA (the `isa` fixture of conftest.py).
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import fastxent as fx
from fastxent import _sigmoid
from fastxent._sigmoid import sigmoid_cross_entropy as sce
from fastxent._sigmoid import sigmoid_cross_entropy_with_grad as sce_grad
from reference import U32, U64, assert_bitwise_equal

REDUCTIONS = ("none", "sum", "mean")
DTYPES = (np.float32, np.float64)
TINY32 = float(np.finfo(np.float32).tiny)


# --------------------------------------------------------------------------------------
# references


def _mul0(a, b):
    """a * b with 0 * inf = 0 (the library's limit convention); NaN stays NaN."""
    with np.errstate(invalid="ignore", over="ignore"):
        prod = a * b
    return np.where((a == 0) & ~np.isnan(b), 0.0, prod)


def sig_ref(x, y, *, weight=None, pos_weight=None, reduction="mean"):
    """(loss, grad) in float64. The loss (1 - y) x + (1 + (p - 1) y) softplus(-x) is written
    as P x + (1 + (p - 1) y) log1p(exp(-|x|)), P = 1 - y for x >= 0 and -p y for x < 0 (the
    same value, without the cancellation of the textbook form for large |x|); the gradient
    as (1 - y) sigmoid(x) - p y sigmoid(-x)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    p = np.broadcast_to(
        np.ones(()) if pos_weight is None else np.asarray(pos_weight, np.float64), x.shape
    )
    w = np.broadcast_to(np.ones(()) if weight is None else np.asarray(weight, np.float64), x.shape)
    with np.errstate(all="ignore"):
        A, B = 1.0 - y, p * y
        P = np.where(x >= 0, A, -B)
        loss = _mul0(P, x) + (A + B) * np.log1p(np.exp(-np.abs(x)))
        loss = _mul0(w, loss)
        sp = np.where(x >= 0, 1.0 / (1.0 + np.exp(-x)), np.exp(x) / (1.0 + np.exp(x)))
        sm = np.where(x >= 0, np.exp(-x) / (1.0 + np.exp(-x)), 1.0 / (1.0 + np.exp(x)))
        grad = w * (A * sp - B * sm)
        if reduction == "none":
            return loss, grad
        total = float(np.sum(loss))
        if reduction == "sum":
            return total, grad
        n = x.size
        return (total / n if n else 0.0), grad / max(n, 1)


def torch_ref(x, y, *, weight=None, pos_weight=None, reduction="mean"):
    """(loss, grad) from PyTorch in float64 ("none": gradient of the sum)."""
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(np.array(x, np.float64, copy=True)).requires_grad_(True)
    yt = torch.from_numpy(np.array(y, np.float64, copy=True))
    wt = None if weight is None else torch.from_numpy(np.array(weight, np.float64, copy=True))
    pt = (
        None
        if pos_weight is None
        else torch.from_numpy(np.array(pos_weight, np.float64, copy=True))
    )
    loss = F.binary_cross_entropy_with_logits(xt, yt, weight=wt, pos_weight=pt, reduction=reduction)
    loss.sum().backward()
    lo = loss.detach().numpy()
    return (lo if reduction == "none" else float(lo)), xt.grad.numpy()


def make_case(rng, shape, dtype, scale=3.0):
    x = (scale * rng.standard_normal(shape)).astype(dtype)
    y = rng.uniform(0.0, 1.0, shape)
    hard = rng.uniform(size=shape) < 0.5
    y = np.where(hard, np.round(y), y).astype(dtype)
    return x, y


def make_operand(rng, kind, shape, dtype):
    C = shape[-1]
    if kind is None:
        return None
    if kind == "last":
        return rng.uniform(0.2, 3.0, C).astype(dtype)
    if kind == "full":
        return rng.uniform(0.2, 3.0, shape).astype(dtype)
    if kind == "rows":  # (..., 1): broadcast along the last axis the other way
        return rng.uniform(0.2, 3.0, shape[:-1] + (1,)).astype(dtype)
    raise AssertionError(kind)


def close(got, ref, rtol, atol=0.0):
    g = np.asarray(got, np.float64)
    r = np.asarray(ref, np.float64)
    assert g.shape == r.shape
    same_nan = np.isnan(g) == np.isnan(r)
    assert same_nan.all(), f"NaN where the reference has none (or the reverse): {g} vs {r}"
    fin = np.isfinite(r)
    assert np.array_equal(g[~fin & ~np.isnan(r)], r[~fin & ~np.isnan(r)]), "infinities differ"
    err = np.abs(g[fin] - r[fin])
    bound = rtol * np.abs(r[fin]) + atol
    assert (err <= bound).all(), f"max excess {np.max(err - bound)} (max err {np.max(err)})"


def grad_close(got, ref, rtol):
    """The gradient (1 - y) s - p y (1 - s) cancels: its error is relative to its scale."""
    r = np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    close(got, r, 0.0, rtol * max(scale, 1e-300))


# --------------------------------------------------------------------------------------
# against PyTorch and the reference


OPERANDS = (None, "last", "full", "rows")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("wkind", OPERANDS)
@pytest.mark.parametrize("pkind", (None, "last", "full"))
def test_matches_torch_float64(isa, rng, reduction, wkind, pkind):
    pytest.importorskip("torch")
    shape = (6, 4, 7)
    x, y = make_case(rng, shape, np.float64)
    w = make_operand(rng, wkind, shape, np.float64)
    p = make_operand(rng, pkind, shape, np.float64)
    loss, grad = sce_grad(x, y, reduction=reduction, weight=w, pos_weight=p)
    tl, tg = torch_ref(x, y, weight=w, pos_weight=p, reduction=reduction)
    close(loss, tl, 64 * U64, 1e-13)  # PyTorch's softplus form cancels for x << 0
    grad_close(grad, tg, 64 * U64)
    assert_bitwise_equal(
        sce(x, y, reduction=reduction, weight=w, pos_weight=p), loss, "loss-only vs with-grad"
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(), (1,), (5,), (33,), (3, 1), (2, 3, 17), (4, 1000), (0,), (3, 0), (0, 4)]
)
def test_matches_reference_any_shape(isa, rng, dtype, shape):
    x, y = make_case(rng, shape, dtype)
    C = shape[-1] if shape else 1
    p = rng.uniform(0.5, 2.0, (C,) if shape else ()).astype(dtype)
    w = rng.uniform(0.5, 2.0, shape).astype(dtype)
    tol = 16 * (U32 if dtype == np.float32 else U64)
    for red in REDUCTIONS:
        loss, grad = sce_grad(x, y, reduction=red, weight=w, pos_weight=p)
        rl, rg = sig_ref(x, y, weight=w, pos_weight=p, reduction=red)
        assert grad.shape == x.shape and grad.dtype == x.dtype
        if red == "none":
            assert loss.shape == x.shape and loss.dtype == x.dtype
        else:
            assert isinstance(loss, np.generic) and loss.dtype == x.dtype
        close(loss, rl, 2 * tol, TINY32)
        grad_close(grad, rg, tol)


def test_empty_mean_is_zero(isa):
    for red, want in (("mean", 0.0), ("sum", 0.0)):
        loss, grad = sce_grad(np.zeros((0, 3)), np.zeros((0, 3)), reduction=red)
        assert loss == want and grad.shape == (0, 3)
    assert sce(
        np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32), reduction="none"
    ).shape == (2, 0)


def test_list_inputs_and_scalar(isa):
    loss = sce([[2.0, -1.0]], [[1, 0]])  # a list target is read as the logits' dtype
    ref, _ = sig_ref([[2.0, -1.0]], [[1.0, 0.0]])
    assert isinstance(loss, np.float64) and abs(loss - ref) <= 4 * U64 * ref
    l0, g0 = sce_grad(np.float32(0.5), np.float32(1.0), reduction="none")
    assert l0.shape == () and g0.shape == ()
    np.testing.assert_allclose(l0, np.log1p(np.exp(-0.5)), rtol=4 * U32)


def test_docstring_examples(monkeypatch):
    for name in _sigmoid.__all__:
        if not hasattr(fx, name):  # until __init__.py exports them
            monkeypatch.setattr(fx, name, getattr(_sigmoid, name), raising=False)
    res = doctest.testmod(_sigmoid, report=True, verbose=False)
    assert res.failed == 0


def test_exported():
    assert fx.sigmoid_cross_entropy is sce
    assert fx.sigmoid_cross_entropy_with_grad is sce_grad


# --------------------------------------------------------------------------------------
# extremes, infinities, NaN


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_never_nan(isa, rng, dtype):
    big = float(np.finfo(dtype).max)
    mags = np.array([1e-30, 1.0, 20.0, 87.0, 88.0, 104.0, 700.0, 710.0, 1e4, 1e30, 3e38, big])
    mags = mags[mags <= big]
    x = np.concatenate([mags, -mags]).astype(dtype)
    x = np.repeat(x, 4)
    y = np.tile(np.array([0.0, 1.0, 0.25, 1.0], dtype), x.size // 4)
    # P = 1 - y or p y stays <= 1, so no element loss exceeds |x| (see test_overflow).
    p = np.tile(np.array([1.0, 1.0, 0.5, 0.0], dtype), x.size // 4)[None, :]
    x, y = x[None, :], y[None, :]
    for red in REDUCTIONS:
        loss, grad = sce_grad(x, y, reduction=red, pos_weight=p[0])
        assert not np.isnan(loss).any() and np.isfinite(grad).all()
        rl, rg = sig_ref(x, y, pos_weight=p[0], reduction=red)
        with np.errstate(over="ignore"):  # a sum beyond the dtype's range is inf
            rl = np.asarray(rl).astype(dtype)
        tol = 16 * (U32 if dtype == np.float32 else U64)
        close(loss, rl, tol, 8 * float(np.finfo(dtype).tiny))
        grad_close(grad, rg, tol)


def test_overflow(isa):
    """An element loss beyond the dtype's range is inf (its correct rounding); the gradient
    stays finite."""
    x = np.array([-3e38, 3e38], np.float32)
    y = np.array([1.0, 0.0], np.float32)
    loss, grad = sce_grad(x, y, reduction="none", pos_weight=np.float32(2.0))
    np.testing.assert_array_equal(loss, [np.inf, np.float32(3e38)])
    np.testing.assert_array_equal(grad, [-2.0, 1.0])
    # Element losses near the largest float: their float32 sum overflows, their mean does not.
    x = np.full((3, 700), -3e38, np.float32)
    y = np.ones((3, 700), np.float32)
    assert sce(x, y, reduction="sum") == np.inf
    mean = sce(x, y, reduction="mean")
    assert mean.dtype == np.float32 and abs(float(mean) / float(np.float32(3e38)) - 1) < 8 * U32


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_logits(isa, dtype):
    inf = np.inf
    x = np.array([inf, inf, inf, -inf, -inf, -inf], dtype)
    y = np.array([1.0, 0.0, 0.5, 0.0, 1.0, 0.5], dtype)
    loss, grad = sce_grad(x, y, reduction="none", pos_weight=np.array([2.0], dtype))
    np.testing.assert_array_equal(loss, [0.0, inf, inf, 0.0, inf, inf])
    np.testing.assert_array_equal(grad, [0.0, 1.0, 0.5, 0.0, -2.0, -1.0])
    # A zero weight zeroes an infinite loss.
    w = np.array([1, 0, 1, 1, 0, 1], dtype)
    loss, grad = sce_grad(x, y, reduction="none", weight=w, pos_weight=np.array([2.0], dtype))
    np.testing.assert_array_equal(loss, [0.0, 0.0, inf, 0.0, 0.0, inf])
    np.testing.assert_array_equal(grad, [0.0, 0.0, 0.5, 0.0, 0.0, -1.0])
    # pos_weight = 0: the positive term vanishes, at x = -inf too (its limit is 0).
    loss, grad = sce_grad(x, y, reduction="none", pos_weight=np.zeros(1, dtype))
    np.testing.assert_array_equal(loss, [0.0, inf, inf, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(grad, [0.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    assert sce(x[:3], y[:3], reduction="sum") == inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["x", "y", "p", "w"])
def test_nan_propagates(isa, dtype, where):
    shape = (3, 40)
    x = np.linspace(-5, 5, 120).reshape(shape).astype(dtype)
    y = np.full(shape, 0.3, dtype)
    p = np.ones(40, dtype)
    w = np.zeros(shape, dtype)  # zero weights must not hide the NaN
    if where == "x":
        x[1, 7] = np.nan
    elif where == "y":
        y[1, 7] = np.nan
    elif where == "w":
        w[1, 7] = np.nan
    else:
        p[7] = np.nan
    loss, grad = sce_grad(x, y, reduction="none", weight=w, pos_weight=p)
    nan_l = np.isnan(loss)
    if where == "p":  # the whole column
        assert nan_l[:, 7].all() and nan_l.sum() == 3
    else:
        assert nan_l[1, 7] and nan_l.sum() == 1
    assert np.isnan(sce(x, y, reduction="mean", weight=w, pos_weight=p))
    w1 = np.ones(shape, dtype) if where != "w" else w + 1
    _, g1 = sce_grad(x, y, reduction="sum", weight=w1, pos_weight=p)
    assert np.isnan(g1[1, 7]) and np.isnan(g1).sum() == (3 if where == "p" else 1)


# --------------------------------------------------------------------------------------
# finite differences and float32 accuracy


@pytest.mark.parametrize("reduction", ("sum", "mean"))
def test_finite_differences(isa, rng, reduction):
    shape = (3, 5)
    x, y = make_case(rng, shape, np.float64, scale=2.0)
    w = make_operand(rng, "full", shape, np.float64)
    p = make_operand(rng, "last", shape, np.float64)
    _, g = sce_grad(x, y, reduction=reduction, weight=w, pos_weight=p)
    h = 1e-6
    num = np.empty_like(x)
    for i in np.ndindex(shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fp = float(sce(xp, y, reduction=reduction, weight=w, pos_weight=p))
        fm = float(sce(xm, y, reduction=reduction, weight=w, pos_weight=p))
        num[i] = (fp - fm) / (2 * h)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("wkind", (None, "last", "full"))
@pytest.mark.parametrize("pkind", (None, "last"))
def test_float32_error_bound(isa, rng, wkind, pkind):
    """float32 against the float64 reference on the same (float32) inputs. Measured by
    tests/cpp/test_sigmoid.cpp: <= 3.5 ULP per element (loss, relative; gradient, relative to
    its scale). Here: 12 u per element (a ULP is 2 u), plus the weight's rounding."""
    shape = (37, 129)
    x, y = make_case(rng, shape, np.float32, scale=8.0)
    w = make_operand(rng, wkind, shape, np.float32)
    p = make_operand(rng, pkind, shape, np.float32)
    tol = (12 if wkind is None else 14) * U32
    for red in REDUCTIONS:
        loss, grad = sce_grad(x, y, reduction=red, weight=w, pos_weight=p)
        rl, rg = sig_ref(x, y, weight=w, pos_weight=p, reduction=red)
        # Sums of non-negative terms: the accumulation (16 float additions per lane before
        # each move into float64) adds at most 16 u.
        close(loss, rl, tol + (0 if red == "none" else 16 * U32), 8 * TINY32)
        if red == "none":
            g = np.asarray(grad, np.float64)
            pw = 1.0 if p is None else p.astype(np.float64)
            ww = 1.0 if w is None else np.abs(w.astype(np.float64))
            s = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
            scale = ww * ((1 - y) * s + pw * y * (1 - s))  # the gradient's two terms
            assert (np.abs(g - rg) <= tol * scale + 8 * TINY32).all()
        else:
            grad_close(grad, rg, tol + 4 * U32)


# --------------------------------------------------------------------------------------
# bitwise: threads, layouts, out=, in place


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pkind", (None, "last"))
def test_threads_bitwise(isa, rng, dtype, pkind):
    shape = (300, 257)  # 77100 elements: parallel above 32768
    x, y = make_case(rng, shape, dtype)
    p = make_operand(rng, pkind, shape, dtype)
    w = make_operand(rng, "full", shape, dtype)
    base = {
        red: sce_grad(x, y, reduction=red, weight=w, pos_weight=p, num_threads=1)
        for red in REDUCTIONS
    }
    for nt in (2, 3, 4, 7, None):
        for red in REDUCTIONS:
            loss, grad = sce_grad(x, y, reduction=red, weight=w, pos_weight=p, num_threads=nt)
            assert_bitwise_equal(loss, base[red][0], f"loss, {red}, {nt} threads")
            assert_bitwise_equal(grad, base[red][1], f"grad, {red}, {nt} threads")
            assert_bitwise_equal(
                sce(x, y, reduction=red, weight=w, pos_weight=p, num_threads=nt),
                base[red][0],
                f"loss-only, {nt}",
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_out_and_in_place_bitwise(isa, rng, dtype):
    big_x, big_y = make_case(rng, (40, 2, 90), dtype)
    x = big_x[:, 0, ::2]  # strided
    y = np.asfortranarray(big_y[:, 1, 1::2])
    xc, yc = np.ascontiguousarray(x), np.ascontiguousarray(y)
    w = make_operand(rng, "rows", x.shape, dtype)
    p = make_operand(rng, "last", x.shape, dtype)
    for red in REDUCTIONS:
        ref = sce_grad(xc, yc, reduction=red, weight=w, pos_weight=p)
        got = sce_grad(x, y, reduction=red, weight=w, pos_weight=p)
        for a, b in zip(got, ref):
            assert_bitwise_equal(a, b, f"strided, {red}")
        out = np.full(x.shape, 7.0, dtype)
        lo, g = sce_grad(x, y, reduction=red, weight=w, pos_weight=p, out=out)
        assert g is out
        assert_bitwise_equal(lo, ref[0], "out=")
        assert_bitwise_equal(out, ref[1], "out=")
        z = xc.copy()
        lo, g = sce_grad(z, yc, reduction=red, weight=w, pos_weight=p, out=z)
        assert g is z
        assert_bitwise_equal(lo, ref[0], "in place")
        assert_bitwise_equal(z, ref[1], "in place")
        # pos_weight as (C,) vs the same values spelled out in full: the same element bits
        # (the sums may differ in the last bit: the runs between broadcast periods differ)
        pf = np.ascontiguousarray(np.broadcast_to(p, x.shape))
        lf, gf = sce_grad(xc, yc, reduction=red, weight=w, pos_weight=pf)
        assert_bitwise_equal(gf, ref[1], f"full pos_weight, {red}")
        if red == "none":
            assert_bitwise_equal(lf, ref[0], "full pos_weight")
        else:
            close(lf, ref[0], 8 * float(np.finfo(dtype).eps))


# --------------------------------------------------------------------------------------
# errors: raised before anything is written


def _expect(exc, x, y, match=None, **kw):
    x = np.asarray(x) if not isinstance(x, np.ndarray) else x
    before = x.copy()
    with pytest.raises(exc, match=match):
        sce(x, y, **kw)
    with pytest.raises(exc, match=match):
        sce_grad(x, y, **kw)
    assert_bitwise_equal(x, before, "logits after a failed call")
    if x.dtype in DTYPES:
        out = np.full(x.shape, 12345.0, x.dtype)
        with pytest.raises(exc, match=match):
            sce_grad(x, y, out=out, **kw)
        assert (out == 12345.0).all()
        if x.flags.c_contiguous:
            with pytest.raises(exc, match=match):
                sce_grad(x, y, out=x, **kw)
            assert_bitwise_equal(x, before, "logits after a failed in-place call")


def _xy(dtype=np.float32, shape=(4, 3)):
    return np.linspace(-2, 2, int(np.prod(shape))).reshape(shape).astype(dtype), np.full(
        shape, 0.5, dtype
    )


@pytest.mark.parametrize("ldtype", [np.int64, np.float16, np.bool_, np.complex64, np.object_])
def test_non_float_logits(ldtype):
    _, y = _xy()
    _expect(TypeError, np.zeros((4, 3), ldtype), y, match="logits")


@pytest.mark.parametrize("tdtype", [np.float64, np.int64, np.float16, np.bool_])
def test_target_dtype_mismatch(tdtype):
    x, y = _xy(np.float32)
    _expect(TypeError, x, y.astype(tdtype), match="target")


@pytest.mark.parametrize("tshape", [(4,), (3, 4), (4, 3, 1), (1, 3), ()])
def test_target_shape_mismatch(tshape):
    x, _ = _xy()
    _expect(ValueError, x, np.zeros(tshape, np.float32), match="target")


@pytest.mark.parametrize("name", ["weight", "pos_weight"])
@pytest.mark.parametrize("shape", [(4,), (2,), (4, 3, 1), (3, 4), (5, 3)])
def test_operand_shape_mismatch(name, shape):
    x, y = _xy()
    _expect(ValueError, x, y, match=name, **{name: np.ones(shape, np.float32)})


@pytest.mark.parametrize("name", ["weight", "pos_weight"])
def test_operand_not_numeric(name):
    x, y = _xy()
    _expect(TypeError, x, y, match=name, **{name: np.array(["a", "b", "c"])})


@pytest.mark.parametrize("reduction", ["avg", "", None, 1, "MEAN"])
def test_bad_reduction(reduction):
    x, y = _xy()
    _expect(ValueError, x, y, match="reduction", reduction=reduction)


def test_bad_num_threads():
    x, y = _xy()
    _expect(ValueError, x, y, match="num_threads", num_threads=0)
    _expect(TypeError, x, y, match="num_threads", num_threads="2")
    _expect(TypeError, x, y, match="num_threads", num_threads=1.5)


def _bad_out(out, x, y, exc=ValueError, match=None, **kw):
    before = x.copy()
    out_before = out.copy() if isinstance(out, np.ndarray) else None
    with pytest.raises(exc, match=match):
        sce_grad(x, y, out=out, **kw)
    assert_bitwise_equal(x, before, "logits")
    if out_before is not None:
        assert_bitwise_equal(out, out_before, "out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_out(dtype):
    x, y = _xy(dtype)
    other = np.float64 if dtype == np.float32 else np.float32
    _bad_out(np.zeros((4, 3), other), x, y, match="dtype")
    _bad_out(np.zeros((3, 4), dtype), x, y, match="shape")
    _bad_out(np.zeros((12,), dtype), x, y, match="shape")
    _bad_out(np.zeros((4, 6), dtype)[:, ::2], x, y, match="contiguous")
    ro = np.zeros((4, 3), dtype)
    ro.flags.writeable = False
    _bad_out(ro, x, y, match="read-only")
    _bad_out([[0.0] * 3] * 4, x, y, exc=TypeError, match="out")
    # partial overlap with the logits, overlap with the target or the weights
    buf = np.zeros(13, dtype)
    xs = buf[:12].reshape(4, 3)
    xs[...] = x
    _bad_out(buf[1:].reshape(4, 3), xs, y, match="overlaps the logits")
    _bad_out(y, x, y, match="overlaps target")
    w = np.ones((4, 3), dtype)
    _bad_out(w, x, y, match="overlaps weight", weight=w)
    pw = np.ones((4, 3), dtype)
    _bad_out(pw, x, y, match="overlaps pos_weight", pos_weight=pw)


def test_core_rejects_overlap_and_bad_modes():
    """The C++ layer checks again (for C++ callers and direct _core use)."""
    from fastxent import _core

    def opt(reduction):
        o = _core.Options()
        o.reduction = reduction
        return o

    x, y = _xy(np.float64)
    g = np.zeros_like(x)
    with pytest.raises(ValueError, match="overlaps"):
        _core.sigmoid_cross_entropy(x, y, None, 0, None, 0, 3, opt(1), y, None)
    with pytest.raises(ValueError):
        _core.sigmoid_cross_entropy(x, y, np.ones(3), 1, None, 0, 5, opt(1), g, None)
    with pytest.raises(ValueError):
        _core.sigmoid_cross_entropy(x, y, np.ones(3), 0, None, 0, 3, opt(1), g, None)
    with pytest.raises(ValueError, match="reduction"):
        _core.sigmoid_cross_entropy(x, y, None, 0, None, 0, 3, opt(7), g, None)
    with pytest.raises(ValueError, match="losses"):
        _core.sigmoid_cross_entropy(x, y, None, 0, None, 0, 3, opt(0), g, None)
    with pytest.raises(TypeError):
        _core.sigmoid_cross_entropy(x.astype(np.int64), y, None, 0, None, 0, 3, opt(1), None, None)
    assert (g == 0).all()
