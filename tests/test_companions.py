"""fx.softmax, fx.log_softmax, fx.logsumexp, fx.softmax_backward and fx.softmax_jacobian.

Oracles: PyTorch float64 (torch.softmax, torch.log_softmax, torch.logsumexp, autograd of
softmax for the backward, torch.autograd.functional.jacobian for the Jacobian), and the fused
cross-entropy gradient for the chain rule.

Tolerances (u = unit roundoff, U32 = 2**-24, U64 = 2**-53), elementwise:

* float32 softmax: a = fl(fl(exp(fl(x - m_k))) * fl(exp(m_k - lse))): the difference
  x - m_k is rounded (0.5 u |x - m_k|, an absolute error in the exponent, so a relative one
  on a, and |x - m_k| <= |log a| + log S); exp within 1.3 ULP (2.6 u); lse = m + log S with
  S summed in float32 lanes of <= 16 additions before moving to double (<= 16 u relative on
  S, an absolute 16 u on lse); the factor's rounding and the product's: 0.5 u each.
  Relative error <= 2.6 + 16 + 1 + 1 + 0.5 |x - m_k| < 24 u (1 + |log a|) per entry
  (+ 1e-37 absolute for entries underflowing float32).
* float32 log_softmax = fl(x - fl(lse)): 16 u absolute from S plus 0.5 u |lse| for its
  rounding and 0.5 u |result| for the subtraction: 24 u (1 + |lse| + |result|).
* float32 logsumexp = fl(m + log S): 16 u + 0.5 u |lse|: 24 u max(|lse|, 1).
* float64: the same chains in double, 1e-12 in place of 24 u (as in test_cross_entropy.py,
  ~9000 u: the reference's own few-u error and the sums over C are far below it).
* softmax_backward = fl(p (g - fl(dot))): the dot product over C terms has an absolute error
  <= C u sum_c |p_c g_c| (any summation order), the difference and product 2 u relative:
  err_c <= |p_c| ((C + 2) u sum |p g| + 2 u |g_c|) + u |result_c|; we allow (C + 4) u
  |p_c| (|g_c| + sum |p g|) (float64: at least 1e-12 of that scale).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from reference import U32, assert_bitwise_equal, make_logits, make_target

DTYPES = (np.float32, np.float64)
TOL = {np.dtype(np.float32): 24 * U32, np.dtype(np.float64): 1e-12}


def dname(d):
    return np.dtype(d).name


def _torch():
    return pytest.importorskip("torch")


def torch_ref(x, axis, which):
    torch = _torch()
    xt = torch.from_numpy(np.array(x, dtype=np.float64, copy=True))
    if which == "softmax":
        return torch.softmax(xt, dim=axis).numpy()
    if which == "log_softmax":
        return torch.log_softmax(xt, dim=axis).numpy()
    return torch.logsumexp(xt, dim=axis).numpy()


def torch_softmax_backward(probs_in_x, g, axis):
    """autograd of softmax(x) with upstream g: the vector-Jacobian product, float64."""
    torch = _torch()
    xt = torch.from_numpy(np.array(probs_in_x, dtype=np.float64, copy=True)).requires_grad_(True)
    a = torch.softmax(xt, dim=axis)
    a.backward(torch.from_numpy(np.array(g, dtype=np.float64, copy=True)))
    return a.detach().numpy(), xt.grad.numpy()


def check_softmax(got, ref, dtype):
    tol = TOL[np.dtype(dtype)]
    got = np.asarray(got, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    r = ref[ok]
    err = np.abs(got[ok] - r)
    with np.errstate(divide="ignore"):
        logr = np.where(r > 0, np.abs(np.log(np.where(r > 0, r, 1.0))), 0.0)
    bound = tol * r * (1.0 + logr) + 1e-37
    bad = err > bound
    assert not np.any(bad), f"got {got[ok][bad][:5]}, expected {r[bad][:5]}"


def check_log_softmax(got, ref, lse, axis, dtype):
    tol = TOL[np.dtype(dtype)]
    got = np.asarray(got, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    inf = np.isinf(ref)
    assert np.array_equal(got[inf], ref[inf])
    ok = ~np.isnan(ref) & ~inf
    bound = tol * (1 + np.abs(np.expand_dims(lse, axis)) + np.abs(ref))
    bound = np.broadcast_to(bound, ref.shape)
    assert np.all(np.abs(got[ok] - ref[ok]) <= bound[ok])


def check_logsumexp(got, ref, dtype):
    tol = TOL[np.dtype(dtype)]
    got = np.asarray(got, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    inf = np.isinf(ref)
    assert np.array_equal(got[inf], ref[inf])
    ok = ~np.isnan(ref) & ~inf
    assert np.all(np.abs(got[ok] - ref[ok]) <= tol * np.maximum(np.abs(ref[ok]), 1.0))


def check_backward(got, p, g, ref, axis, dtype):
    C = p.shape[axis]
    p64, g64 = p.astype(np.float64), g.astype(np.float64)
    dot = np.sum(np.abs(p64 * g64), axis=axis, keepdims=True)
    if np.dtype(dtype) == np.float32:
        k = (C + 4) * U32
    else:
        k = max((C + 4) * 2**-53, 1e-12)
    bound = k * np.abs(p64) * (np.abs(g64) + dot)
    err = np.abs(np.asarray(got, np.float64) - ref)
    assert np.all(err <= bound), f"max err/bound {np.max(err / np.maximum(bound, 1e-300)):.3g}"


SHAPES_AXES = [
    ((7,), 0),
    ((5, 9), -1),
    ((5, 9), 0),
    ((3, 4, 6), 1),
    ((3, 4, 6), -1),
    ((3, 4, 6), 0),
    ((2, 3, 4, 5), 2),
    ((4, 9000), -1),
    ((3, 2100, 2), 1),
    ((0, 6), -1),
]


@pytest.mark.parametrize("shape,axis", SHAPES_AXES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_against_torch(isa, dtype, shape, axis, rng):
    """softmax, log_softmax, logsumexp on any axis (C = 9000, above the kernel's blocks of
    4096 float32 and 2048 float64 classes, too; and no
    rows), some -inf entries, scales from tiny to huge."""
    _torch()
    for scale in (1e-3, 3.0, 300.0):
        x = make_logits(rng, shape, scale, dtype)
        if x.size > 4:
            x.reshape(-1)[::5] = -np.inf
        ref_sm = torch_ref(x, axis, "softmax")
        ref_ls = torch_ref(x, axis, "log_softmax")
        ref_lse = torch_ref(x, axis, "logsumexp")
        sm, ls, lse = (
            fx.softmax(x, axis=axis),
            fx.log_softmax(x, axis=axis),
            fx.logsumexp(x, axis=axis),
        )
        for res, sh in ((sm, shape), (ls, shape), (lse, ref_lse.shape)):
            assert isinstance(res, np.ndarray) and res.dtype == dtype and res.shape == sh
        assert sm.flags.c_contiguous and ls.flags.c_contiguous
        check_softmax(sm, ref_sm, dtype)
        check_log_softmax(ls, ref_ls, ref_lse, axis, dtype)
        check_logsumexp(lse, ref_lse, dtype)
        # The axis spelled the other way round gives the same bits.
        other = axis - len(shape) if axis >= 0 else axis + len(shape)
        assert_bitwise_equal(fx.softmax(x, other), sm, "negative/positive axis")


@pytest.mark.parametrize("shape,axis", SHAPES_AXES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_softmax_backward_against_autograd(isa, dtype, shape, axis, rng):
    _torch()
    x = make_logits(rng, shape, 2.0, dtype)
    g = make_logits(rng, shape, 1.0, dtype)
    p = fx.softmax(x, axis=axis)
    got = fx.softmax_backward(p, g, axis=axis)
    assert got.dtype == dtype and got.shape == shape and isinstance(got, np.ndarray)
    # The VJP of softmax at the (exact) probabilities p: p * (g - sum(p g)) in float64. (Also
    # the autograd VJP at x, which differs from it by the rounding of p only.)
    p64, g64 = p.astype(np.float64), g.astype(np.float64)
    ref = p64 * (g64 - np.sum(p64 * g64, axis=axis, keepdims=True))
    check_backward(got, p, g, ref, axis, dtype)
    _, auto = torch_softmax_backward(x, g, axis)
    atol = 100 * TOL[np.dtype(dtype)] * float(np.max(np.abs(g64), initial=1.0))
    np.testing.assert_allclose(got, auto, rtol=0, atol=atol)


def test_all_minus_inf_slice_and_nan(isa):
    """A slice of all -inf: softmax NaN and log_softmax NaN (as PyTorch), logsumexp -inf;
    -inf entries get softmax 0 and log_softmax -inf; a NaN makes its slice NaN only."""
    torch = _torch()
    for dtype in DTYPES:
        x = np.array(
            [[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 1.0], [np.nan, 0.0, 1.0], [1.0, 2.0, 3.0]],
            dtype,
        )
        xt = torch.from_numpy(x.astype(np.float64))
        for axis in (-1, 0):
            sm = fx.softmax(x, axis=axis)
            ls = fx.log_softmax(x, axis=axis)
            lse = fx.logsumexp(x, axis=axis)
            ref = (
                torch.softmax(xt, axis).numpy(),
                torch.log_softmax(xt, axis).numpy(),
                torch.logsumexp(xt, axis).numpy(),
            )
            for got, r in zip((sm, ls, lse), ref):
                assert np.array_equal(np.isnan(got), np.isnan(r)), (axis, got, r)
                assert np.array_equal(np.isinf(got), np.isinf(r)), (axis, got, r)
                fin = np.isfinite(r)
                np.testing.assert_allclose(got[fin], r[fin], rtol=1e-6, atol=1e-7)
        assert fx.logsumexp(x)[0] == -np.inf
        assert np.all(np.isnan(fx.softmax(x)[0])) and np.all(np.isnan(fx.log_softmax(x)[0]))
        assert fx.softmax(x)[1, 1] == 0.0 and fx.log_softmax(x)[1, 1] == -np.inf
        assert np.isnan(fx.logsumexp(x)[2]) and np.all(np.isfinite(fx.softmax(x)[3]))


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_tiny_and_large_logits_are_stable(isa, dtype):
    x = np.array([[1e-30, 0.0, -1e-30], [-1e4, -1e4 - 1, -1e4 - 2], [1e4, 1e4, -1e4]], dtype)
    ref = torch_ref(x, -1, "softmax")
    check_softmax(fx.softmax(x), ref, dtype)
    check_logsumexp(fx.logsumexp(x), torch_ref(x, -1, "logsumexp"), dtype)
    assert np.all(np.isfinite(fx.log_softmax(x)))


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_softmax_of_huge_logits_sums_to_one(isa, dtype):
    """ "Stable for any input": softmax([M, M, -M]) = [1/2, 1/2, 0] for any finite M, and the
    entries of every slice sum to 1 (to rounding). With M = 1e30 the log-sum-exp M + log 2
    rounds to M (its ULP is ~1e14), so exp(x - lse) must not be how the entries are formed."""
    x = np.array(
        [[1e30, 1e30, -1e30], [1e30, 1e30, 1e30], [3e38, 3e38, 0.0], [1e20, 1e20 - 1e5, 0.0]], dtype
    )
    sm = fx.softmax(x)
    ref = torch_ref(x, -1, "softmax")
    np.testing.assert_allclose(np.sum(sm.astype(np.float64), axis=-1), 1.0, rtol=30 * U32)
    check_softmax(sm, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_log_softmax_of_huge_logits(isa, dtype):
    """log_softmax([M, M, -M]) = [-log 2, -log 2, -2M - log 2]: the entries next to the max
    are O(1) and PyTorch gets them right ((x - m) - log S); x - fl(M + log 2) = 0 loses
    them entirely."""
    x = np.array([[1e30, 1e30, -1e30], [1e20, 1e20, 1e20]], dtype)
    ls = fx.log_softmax(x)
    np.testing.assert_allclose(ls[:, :2], [[-np.log(2)] * 2, [-np.log(3)] * 2], rtol=30 * U32)


# --------------------------------------------------------------------------------------
# softmax_jacobian


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 4), (1,)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_softmax_jacobian(isa, dtype, shape, rng):
    """diag(a) - a a^T per slice, (..., C) -> (..., C, C), against PyTorch's Jacobian of
    softmax; symmetric; rows sum to 0 (to rounding)."""
    torch = _torch()
    x = make_logits(rng, shape, 2.0, dtype)
    J = fx.softmax_jacobian(x)
    C = shape[-1]
    assert J.shape == shape + (C,) and J.dtype == dtype and isinstance(J, np.ndarray)
    flat = x.reshape(-1, C).astype(np.float64)
    Jf = J.reshape(-1, C, C)
    tol = TOL[np.dtype(dtype)] * 4
    for i in range(flat.shape[0]):
        ref = torch.autograd.functional.jacobian(
            lambda v: torch.softmax(v, -1), torch.from_numpy(flat[i].copy())
        ).numpy()
        np.testing.assert_allclose(Jf[i], ref, rtol=0, atol=tol)
    np.testing.assert_array_equal(J, np.swapaxes(J, -1, -2))
    np.testing.assert_allclose(np.sum(J.astype(np.float64), axis=-1), 0.0, atol=tol * C)


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_chain_rule(isa, dtype, rng):
    """softmax_backward(softmax(z), dL/da) with L = -sum_c y_c log a_c (dL/da = -y / a) is the
    fused cross-entropy gradient (reduction "sum"; class targets as one-hot y, probability
    targets as y); and g @ softmax_jacobian(z) is softmax_backward(softmax(z), g).

    Tolerance: the chain of two companions on float32 rounds a (24 u), -y/a (1 u), the dot
    and products ((C + 4) u of the terms p |y/a| ~ y): 4 (C + 4) u relative to the largest
    gradient entry; float64 1e-12."""
    N, C = 12, 10
    z = make_logits(rng, (N, C), 2.0, dtype)
    y = make_target(rng, (N,), C)
    onehot = np.eye(C, dtype=dtype)[y]
    q = rng.dirichlet(np.ones(C), size=N).astype(dtype)
    tol = 4 * (C + 4) * U32 if dtype == np.float32 else 1e-12
    a = fx.softmax(z)
    for target, tgt_arg in ((onehot, y), (q, q)):
        upstream = (-target / a).astype(dtype)
        got = fx.softmax_backward(a, upstream)
        _, fused = fx.cross_entropy_with_grad(z, tgt_arg, reduction="sum")
        np.testing.assert_allclose(got, fused, rtol=0, atol=tol * float(np.max(np.abs(fused))))
    g = make_logits(rng, (N, C), 1.0, dtype)
    J = fx.softmax_jacobian(z)
    via_j = np.einsum("nc,ncd->nd", g.astype(np.float64), J.astype(np.float64))
    vjp = fx.softmax_backward(a, g)
    check_backward(
        vjp, a, g, via_j, -1, dtype
    ) if dtype == np.float64 else np.testing.assert_allclose(
        vjp, via_j, rtol=0, atol=tol * float(np.max(np.abs(via_j)))
    )
    # A stack, class axis not last.
    z3 = make_logits(rng, (3, C, 4), 1.0, dtype)
    g3 = make_logits(rng, (3, C, 4), 1.0, dtype)
    a3 = fx.softmax(z3, axis=1)
    J3 = fx.softmax_jacobian(np.moveaxis(z3, 1, -1))
    via_j3 = np.moveaxis(
        np.einsum(
            "...c,...cd->...d", np.moveaxis(g3, 1, -1).astype(np.float64), J3.astype(np.float64)
        ),
        -1,
        1,
    )
    np.testing.assert_allclose(
        fx.softmax_backward(a3, g3, axis=1),
        via_j3,
        rtol=0,
        atol=tol * float(np.max(np.abs(via_j3))),
    )


# --------------------------------------------------------------------------------------
# 16-bit inputs: computed in float32, result in the input dtype


ml_dtypes = pytest.importorskip("ml_dtypes")
HALVES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


@pytest.mark.parametrize(
    "shape,axis", [((6, 9), -1), ((3, 5, 4), 1), ((2, 3000), -1), ((5, 4), 0)], ids=str
)
@pytest.mark.parametrize("half", HALVES, ids=dname)
def test_half_is_float32_rounded_once(isa, half, shape, axis, rng):
    x = make_logits(rng, shape, 3.0, half)
    x.reshape(-1)[::7] = -np.inf
    x32 = x.astype(np.float32)
    for f in (fx.softmax, fx.log_softmax, fx.logsumexp):
        got = f(x, axis=axis)
        assert got.dtype == half
        assert_bitwise_equal(got, f(x32, axis=axis).astype(half), f.__name__)
    p = fx.softmax(x, axis=axis)
    g = make_logits(rng, shape, 1.0, half)
    got = fx.softmax_backward(p, g, axis=axis)
    assert got.dtype == half
    ref = fx.softmax_backward(p.astype(np.float32), g.astype(np.float32), axis=axis)
    assert_bitwise_equal(got, ref.astype(half), "softmax_backward")
    # The Jacobian of 16-bit input: its dtype, and within the 16-bit rounding of float32's.
    J = fx.softmax_jacobian(np.moveaxis(x, axis, -1)[..., :40])
    assert J.dtype == half
    J32 = fx.softmax_jacobian(np.moveaxis(x32, axis, -1)[..., :40])
    eps = float(ml_dtypes.finfo(half).eps)
    np.testing.assert_allclose(
        J.astype(np.float32), J32, rtol=0, atol=4 * eps * float(np.max(np.abs(J32)))
    )


# --------------------------------------------------------------------------------------
# threads, layouts, errors


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_bitwise_for_every_thread_count_and_layout(isa, dtype, rng):
    """Rows across threads (300 x 1000): identical bits for num_threads 1, 2, 3, None; a
    strided / Fortran input gives the bits of its contiguous copy."""
    x = make_logits(rng, (300, 1000), 3.0, dtype)
    g = make_logits(rng, (300, 1000), 1.0, dtype)
    p = fx.softmax(x, num_threads=1)
    ref = {f.__name__: f(x, num_threads=1) for f in (fx.softmax, fx.log_softmax, fx.logsumexp)}
    ref_b = fx.softmax_backward(p, g, num_threads=1)
    for nt in (2, 3, None):
        for f in (fx.softmax, fx.log_softmax, fx.logsumexp):
            assert_bitwise_equal(f(x, num_threads=nt), ref[f.__name__], f"{f.__name__} {nt}")
        assert_bitwise_equal(fx.softmax_backward(p, g, num_threads=nt), ref_b, f"bwd {nt}")
    for view in (x[:, ::2], np.asfortranarray(x), x[::3, 7:900]):
        for f in (fx.softmax, fx.log_softmax, fx.logsumexp):
            assert_bitwise_equal(f(view), f(np.ascontiguousarray(view)), f.__name__)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(3, np.int32),
        np.zeros(3, np.int64),
        np.zeros(3, np.complex64),
        np.zeros(3, bool),
        np.array(["a", "b"]),
    ],
    ids=lambda a: a.dtype.name,
)
def test_bad_dtype_is_type_error(bad):
    for f in (fx.softmax, fx.log_softmax, fx.logsumexp, fx.softmax_jacobian):
        with pytest.raises(TypeError):
            f(bad)
    with pytest.raises(TypeError):
        fx.softmax_backward(bad, bad)


def test_bad_axis_and_empty_axis_are_value_errors():
    x = np.zeros((2, 3))
    for f in (fx.softmax, fx.log_softmax, fx.logsumexp):
        for axis in (2, -3, 100):
            with pytest.raises(ValueError, match="axis"):
                f(x, axis=axis)
        with pytest.raises(TypeError):
            f(x, axis=1.0)
        with pytest.raises(ValueError):
            f(np.zeros((2, 0)))
        with pytest.raises(ValueError):
            f(np.zeros((0, 3)), axis=0)
        with pytest.raises(ValueError):
            f(np.float64(1.0))
    for axis in (2, -3):
        with pytest.raises(ValueError, match="axis"):
            fx.softmax_backward(x, x, axis=axis)
    with pytest.raises(ValueError):
        fx.softmax_backward(np.zeros((2, 0)), np.zeros((2, 0)))
    with pytest.raises(ValueError):
        fx.softmax_jacobian(np.zeros((2, 0)))


@pytest.mark.parametrize("gshape", [(3, 2), (2, 4), (2, 3, 1), (6,)], ids=str)
def test_softmax_backward_shape_mismatch(gshape):
    p = fx.softmax(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        fx.softmax_backward(p, np.zeros(gshape))


def test_bad_num_threads():
    for nt in (0, -1, 1.5, "2"):
        with pytest.raises((ValueError, TypeError)):
            fx.softmax(np.zeros((2, 3)), num_threads=nt)
    for f in (fx.softmax, fx.log_softmax, fx.logsumexp):
        with pytest.raises(ValueError, match="num_threads must be at most 2147483647"):
            f(np.zeros((2, 3)), num_threads=2**40)


def test_docstring_examples():
    import doctest

    import fastxent._companions as mod

    res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted > 0
