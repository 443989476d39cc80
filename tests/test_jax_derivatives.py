"""fastxent.jax's derivatives beyond the kernel's first order (the FFI path): second and third
order with respect to the logits (the derivative of the kernel's gradient, through the
reference formula of fastxent._jax_reference), and the gradients with respect to probability
targets, class weights, sample weights and traced label smoothing / normalizer.

The oracles are independent of the reference: optax's own derivatives (plain cross-entropy),
and central differences of fastxent's kernel in float64 (the C++ gradient and loss), whose
error at step h = 1e-5 is about h**2 * |third derivative| + eps / h.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastxent  # noqa: E402
import fastxent.jax as fxj  # noqa: E402
from fastxent import _jax_ffi  # noqa: E402
from test_jax_ffi import OPTIONS as FFI_OPTIONS  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _jax_ffi.enabled(), reason="the XLA FFI path is off (not built, or FASTXENT_JAX_FFI=0)"
)

H = 1e-5  # the central differences' step (float64)
FD_TOL = 1e-8  # measured: at most 1e-10 (Hessian-vector products, 5 seeds x OPTIONS)

# The FFI tests' option sets, and z_loss with the class axis first.
OPTIONS = FFI_OPTIONS + [dict(axis=1, reduction="none", label_smoothing=0.1, z_loss=0.05)]


@pytest.fixture(autouse=True)
def _x64():
    ctx = (
        jax.enable_x64(True)
        if hasattr(jax, "enable_x64")
        else __import__("jax.experimental", fromlist=["enable_x64"]).enable_x64()
    )
    with ctx:
        yield


def _case(rng, opts, shape=(5, 4, 6)):
    opts = dict(opts)
    axis = opts.get("axis", -1)
    C = shape[axis]
    rows = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    z = 2 * rng.standard_normal(shape)
    kw = {k: v for k, v in opts.items() if k not in ("probs", "weight", "ignore", "sample_weight")}
    if opts.get("probs"):
        p = rng.random(shape)
        y = p / p.sum(axis=axis, keepdims=True)
    else:
        y = rng.integers(0, C, rows)
        if opts.get("ignore"):
            y[0, 0] = -100
            y = np.where(rng.random(rows) < 0.3, -100, y)
    if opts.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2.0, C)
    if opts.get("sample_weight"):
        kw["sample_weight"] = rng.uniform(0.0, 2.0, rows)
    return z, y, kw


def _kernel_grad(z, y, kw):
    """fastxent's C++ gradient of the (summed, for "none") loss, float64."""
    return fastxent.cross_entropy_with_grad(z, y, **kw)[1]


def _kernel_sum(z, y, kw):
    return float(np.sum(fastxent.cross_entropy(z, y, **kw)))


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_hessian_vector_product_against_differences_of_the_kernels_gradient(rng, opts):
    z, y, kw = _case(rng, opts)
    v = rng.standard_normal(z.shape)
    total = lambda z: jnp.sum(fxj.cross_entropy(z, jnp.asarray(y), **kw))  # noqa: E731
    hvp = jax.jit(lambda z, v: jax.jvp(jax.grad(total), (z,), (v,))[1])(z, v)
    fd = (_kernel_grad(z + H * v, y, kw) - _kernel_grad(z - H * v, y, kw)) / (2 * H)
    np.testing.assert_allclose(np.asarray(hvp), fd, rtol=0, atol=FD_TOL)
    # Reverse over reverse (the gradient of a gradient penalty) gives the same product.
    rr = jax.grad(lambda z: jnp.vdot(jax.grad(total)(z), v))(z)
    np.testing.assert_allclose(np.asarray(rr), np.asarray(hvp), rtol=1e-12, atol=1e-14)


def test_hessian_and_third_order_equal_optaxs(rng):
    optax = pytest.importorskip("optax")
    z = jnp.asarray(rng.standard_normal((4, 6)))
    y = jnp.asarray(rng.integers(0, 6, 4))
    f = lambda z: fxj.cross_entropy(z, y)  # noqa: E731
    g = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()  # noqa: E731
    np.testing.assert_allclose(jax.hessian(f)(z), jax.hessian(g)(z), rtol=0, atol=1e-15)
    np.testing.assert_allclose(
        jax.jacfwd(jax.hessian(f))(z), jax.jacfwd(jax.hessian(g))(z), rtol=0, atol=1e-15
    )
    # Under jit and vmap (one custom call for the batch's first order).
    zs = jnp.stack([z, 2 * z])
    hs = jax.jit(jax.vmap(jax.hessian(f)))(zs)
    np.testing.assert_allclose(hs[1], jax.hessian(g)(2 * z), rtol=0, atol=1e-15)


def test_first_order_is_still_the_kernels_bit_for_bit(rng):
    z, y, kw = _case(rng, OPTIONS[3])
    g = jax.jit(jax.grad(lambda z: fxj.cross_entropy(z, jnp.asarray(y), **kw)))(z)
    assert np.array_equal(np.asarray(g), _kernel_grad(z, y, kw))


@pytest.mark.parametrize("opts", [OPTIONS[4], dict(probs=True, reduction="none")], ids=str)
def test_gradient_with_respect_to_probability_targets(rng, opts):
    z, p, kw = _case(rng, opts)
    d = rng.standard_normal(p.shape)
    f = lambda p: jnp.sum(fxj.cross_entropy(jnp.asarray(z), p, **kw))  # noqa: E731
    got = float(jnp.vdot(jax.jit(jax.grad(f))(p), d))
    fd = (_kernel_sum(z, p + H * d, kw) - _kernel_sum(z, p - H * d, kw)) / (2 * H)
    assert abs(got - fd) <= FD_TOL


def test_gradients_with_respect_to_weights_and_traced_scalars(rng):
    z, y, kw = _case(rng, dict(reduction="mean", weight=True, sample_weight=True, ignore=True))
    w, sw = kw.pop("weight"), kw.pop("sample_weight")
    dw, dsw = rng.standard_normal(w.shape), rng.standard_normal(sw.shape)

    def f(w, sw, eps):
        return fxj.cross_entropy(z, y, weight=w, sample_weight=sw, label_smoothing=eps, **kw)

    gw, gsw, geps = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(w, sw, 0.2)

    def k(w, sw, eps):
        return _kernel_sum(z, y, dict(kw, weight=w, sample_weight=sw, label_smoothing=eps))

    fd_w = (k(w + H * dw, sw, 0.2) - k(w - H * dw, sw, 0.2)) / (2 * H)
    fd_sw = (k(w, sw + H * dsw, 0.2) - k(w, sw - H * dsw, 0.2)) / (2 * H)
    fd_eps = (k(w, sw, 0.2 + H) - k(w, sw, 0.2 - H)) / (2 * H)
    assert abs(float(jnp.vdot(gw, dw)) - fd_w) <= FD_TOL
    assert abs(float(jnp.vdot(gsw, dsw)) - fd_sw) <= FD_TOL
    assert abs(float(geps) - fd_eps) <= FD_TOL
    # A traced normalizer (a token count computed in the graph).
    gn = jax.grad(lambda n: fxj.cross_entropy(z, y, normalizer=n, **kw))(7.0)
    fd_n = (
        _kernel_sum(z, y, dict(kw, normalizer=7.0 + H))
        - _kernel_sum(z, y, dict(kw, normalizer=7.0 - H))
    ) / (2 * H)
    assert abs(float(gn) - fd_n) <= FD_TOL


def test_ignored_rows_holding_nan_get_a_zero_hessian(rng):
    z = rng.standard_normal((4, 5))
    z[1] = np.nan
    y = jnp.asarray([0, -100, 3, 4])
    for kw in (dict(), dict(softcap=3.0, logit_scale=0.7)):
        h = jax.hessian(functools.partial(fxj.cross_entropy, target=y, **kw))(jnp.asarray(z))
        h = np.asarray(h)
        assert np.isfinite(h).all()
        assert (h[1] == 0).all() and (h[:, :, 1] == 0).all()


def test_16_bit_logits_second_order_dtype(rng):
    import ml_dtypes

    z = rng.standard_normal((3, 7)).astype(ml_dtypes.bfloat16)
    y = jnp.asarray([0, 6, 2])
    f = lambda z: fxj.cross_entropy(z, y)  # noqa: E731
    v = jnp.ones(z.shape, z.dtype)
    hvp = jax.jvp(jax.grad(f), (jnp.asarray(z),), (v,))[1]
    assert hvp.dtype == z.dtype
    ref = jax.jvp(jax.grad(f), (jnp.asarray(z, jnp.float32),), (v.astype(jnp.float32),))[1]
    # bfloat16 keeps 8 bits: the product of a float32 computation rounded once.
    np.testing.assert_allclose(np.asarray(hvp, np.float32), np.asarray(ref), rtol=2**-7, atol=1e-3)


def test_integer_targets_are_not_differentiable(rng):
    z = jnp.asarray(rng.standard_normal((3, 4)))
    y = jnp.asarray([0, 1, 2])
    with pytest.raises(TypeError):
        jax.grad(lambda y: fxj.cross_entropy(z, y))(y)


def test_zero_target_weights_still_have_a_derivative(rng):
    """Where a soft label, a class weight or the smoothing is 0, the loss is still linear in
    it with slope lse - z' (only 0 * inf is taken as 0): one-hot labels, a zero class weight
    and label_smoothing = 0 against forward differences of the kernel's loss (linear in each,
    so exact up to rounding) and optax's label gradient."""
    z = rng.standard_normal((3, 5))
    y = np.array([1, 2, 4])
    onehot = np.eye(5)[[0, 2, 4]]
    d = rng.standard_normal(onehot.shape)
    got = float(jnp.vdot(jax.grad(lambda p: fxj.cross_entropy(z, p))(onehot), d))
    fd = (_kernel_sum(z, onehot + H * d, {}) - _kernel_sum(z, onehot, {})) / H
    assert abs(got - fd) <= FD_TOL
    optax = pytest.importorskip("optax")
    g_optax = jax.grad(lambda p: optax.softmax_cross_entropy(z, p).mean())(onehot)
    np.testing.assert_allclose(
        jax.grad(lambda p: fxj.cross_entropy(z, p))(onehot), g_optax, atol=1e-15
    )
    w = np.array([1.0, 0.0, 1.0, 1.0, 1.0])
    gw = jax.grad(lambda w: fxj.cross_entropy(z, y, weight=w, reduction="sum"))(w)
    e1 = np.eye(5)[1]
    fd_w = (
        _kernel_sum(z, y, dict(weight=w + H * e1, reduction="sum"))
        - _kernel_sum(z, y, dict(weight=w, reduction="sum"))
    ) / H
    assert abs(float(gw[1]) - fd_w) <= FD_TOL and abs(fd_w) > 0.1
    geps = jax.grad(lambda e: fxj.cross_entropy(z, y, label_smoothing=e))(0.0)
    fd_eps = (_kernel_sum(z, y, dict(label_smoothing=H)) - _kernel_sum(z, y, {})) / H
    assert abs(float(geps) - fd_eps) <= FD_TOL


def test_an_ignore_index_outside_the_targets_type_matches_nothing(rng):
    z = jnp.asarray(rng.standard_normal((3, 4)))
    y = jnp.asarray(np.array([0, 1, 3], np.int32))
    f = lambda z: fxj.cross_entropy(z, y, ignore_index=2**40)  # noqa: E731
    h = jax.hessian(f)(z)
    np.testing.assert_allclose(h, jax.hessian(lambda z: fxj.cross_entropy(z, y))(z), atol=1e-15)
