"""fastxent.jax: value and gradient against a pure-JAX reference (jax.nn.log_softmax) under
jax.jit(jax.value_and_grad(...)), per-row cotangents for "none", vmap, half precision, and
the errors (at trace time, and from the callback at run time).

float64 runs inside ``jax.enable_x64(True)`` (a context manager: the global flag is left as
it was for the other tests).

Tolerances (loss_error / grad_error of tests/reference.py):
* float64, 1e-12: both sides compute in float64 without cancellation-prone steps; their
  difference is a few u (1.1e-16) times the accumulation lengths (<= a few hundred here).
* float32, 64 u (3.8e-6): fastxent is within 24 u of the exact result (the bound derived in
  tests/test_cross_entropy.py); the jnp reference accumulates log_softmax, the weighted row
  sums and the mean in float32, ~u * (log2 C + log2 N) + a few u for exp/log (<= 15 u for
  these shapes). 64 u bounds their difference with a margin and still catches every formula
  error (>= 1e-3).
"""

from __future__ import annotations

import doctest
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastxent.jax as fxj  # noqa: E402
from fastxent import _jax_ffi  # noqa: E402
from reference import U32, grad_error, loss_error  # noqa: E402

TOL = {np.float64: 1e-12, np.float32: 64 * U32}  # see the module docstring
REDUCTIONS = ("mean", "sum", "none")
OPTION_SETS = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.2),
    dict(weight=True, label_smoothing=0.1, ignore=True),
    dict(ignore=True, ignore_index=2),
    dict(probs=True),
    dict(probs=True, weight=True, label_smoothing=0.3),
]


def _x64():
    """A context enabling float64 for its duration only (the global flag is untouched)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX

    return enable_x64()


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    if request.param == np.float64:
        with _x64():
            yield np.float64
    else:
        yield np.float32


def _rows(z, y, w, eps, ignore_index, axis):
    """PyTorch's F.cross_entropy in plain jnp (log_softmax based): (row losses, the "mean"
    denominator)."""
    z = jnp.moveaxis(z, axis, -1)
    C = z.shape[-1]
    logp = jax.nn.log_softmax(z, axis=-1)
    if jnp.issubdtype(y.dtype, jnp.floating):  # probabilities
        q = jnp.moveaxis(y, axis, -1) * (1 - eps) + eps / C
        return -jnp.sum(w * q * logp, axis=-1), jnp.asarray(y.size // C, z.dtype)
    counted = y != ignore_index
    yy = jnp.where(counted, y, 0)
    onehot = jax.nn.one_hot(yy, C, dtype=z.dtype)  # (a gather compiles much slower)
    nll = -jnp.sum(onehot * logp, axis=-1)
    wy = jnp.where(counted, jnp.sum(onehot * w, axis=-1), 0.0)
    smooth = -jnp.sum(w * logp, axis=-1)
    return jnp.where(counted, (1 - eps) * wy * nll + (eps / C) * smooth, 0.0), jnp.sum(wy)


@functools.partial(jax.jit, static_argnames="axis")
def _reference_jit(z, y, w, eps, ignore_index, ct, coef, axis):
    # Everything but the axis is traced (the reduction picked by the coefficients coef), so
    # one compilation serves every option set of a shape: compiling a reference per test
    # would dominate the runtime of this file.
    def total(z):
        rows, denom = _rows(z, y, w, eps, ignore_index, axis)
        s = jnp.sum(rows)
        mean = s / jnp.where(denom == 0, 1, denom)
        return coef[0] * jnp.sum(ct * rows) + coef[1] * s + coef[2] * mean, (rows, s, mean)

    (_, aux), g = jax.value_and_grad(total, has_aux=True)(z)
    return aux, g


def reference(
    z, y, *, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean", axis=-1, ct=None
):
    """(loss, d(sum(ct * loss))/dz) of F.cross_entropy's semantics in plain jnp; ct = 1 when
    None."""
    dt = z.dtype
    C = z.shape[axis]
    rows_shape = tuple(n for i, n in enumerate(z.shape) if i != axis % z.ndim)
    w = jnp.ones(C, dt) if weight is None else jnp.asarray(weight, dt)
    ct = jnp.ones(rows_shape, dt) if ct is None else jnp.broadcast_to(ct, rows_shape)
    k = REDUCTIONS.index(reduction)
    coef = jnp.asarray([k == 2, k == 1, k == 0], dt)  # none, sum, mean
    (rows, s, mean), g = _reference_jit(
        z,
        y,
        w,
        jnp.asarray(label_smoothing, dt),
        jnp.asarray(ignore_index),
        ct,
        coef,
        axis % z.ndim,
    )
    return (rows, s, mean)[2 - k], g


def _inputs(
    rng,
    shape,
    dtype,
    axis=-1,
    probs=False,
    weight=False,
    ignore=False,
    ignore_index=-100,
    label_smoothing=0.0,
):
    C = shape[axis]
    rows = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    z = jnp.asarray((2.0 * rng.standard_normal(shape)).astype(dtype))
    if probs:
        p = rng.random(shape)
        y = jnp.asarray((p / p.sum(axis=axis, keepdims=True)).astype(dtype))
    else:
        yy = rng.integers(0, C, size=rows)
        if ignore:
            yy = np.where(rng.random(rows) < 0.25, ignore_index, yy)
            yy.reshape(-1)[0] = 0
        y = jnp.asarray(yy)
    kw = dict(label_smoothing=label_smoothing)
    if ignore:
        kw["ignore_index"] = ignore_index
    if weight:
        kw["weight"] = jnp.asarray(rng.uniform(0.25, 2.0, C).astype(dtype))
    return z, y, kw


def _fused(z, y, ct=None, **kw):
    """jit(value_and_grad) of fastxent: (loss, d(sum(ct * loss))/dz), ct = 1 when None."""

    def f(z):
        loss = fxj.cross_entropy(z, y, **kw)
        return jnp.sum(loss if ct is None else ct * loss), loss

    (_, loss), g = jax.jit(jax.value_and_grad(f, has_aux=True))(z)
    return loss, g


@pytest.mark.parametrize("shape,axis", [((9, 5), -1), ((3, 5, 4), 1)], ids=["2d", "axis1"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
def test_value_and_grad_match_reference(rng, dtype, shape, axis, reduction, opts):
    z, y, kw = _inputs(rng, shape, dtype, axis, **opts)
    kw.update(reduction=reduction, axis=axis)
    rows = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    # A random cotangent per row for "none": tests the per-row scaling of the fused gradient.
    ct = jnp.asarray(rng.uniform(-2, 2, rows).astype(dtype)) if reduction == "none" else None
    # Value and gradient under jit(value_and_grad): the fused forward rule.
    l1, g1 = _fused(z, y, ct, **kw)
    l2, g2 = reference(z, y, ct=ct, **kw)
    assert l1.dtype == dtype and l1.shape == l2.shape
    assert g1.dtype == dtype and g1.shape == z.shape
    assert loss_error(l1, l2) <= TOL[dtype]
    assert grad_error(g1, g2) <= TOL[dtype]
    # The primal alone (the forward-only kernel), jitted.
    v1 = jax.jit(lambda z: fxj.cross_entropy(z, y, **kw))(z)
    assert v1.dtype == dtype and v1.shape == l2.shape
    assert loss_error(v1, l2) <= TOL[dtype]


@functools.partial(jax.jit, static_argnames="axis")
def _options_reference(z, y, w, sw, normalizer, ct, coef, axis=-1):
    """Row losses with sample_weight, z_loss = 1e-2, softcap = 2.5, logit_scale = 1.2."""

    def total(z):
        zz = 2.5 * jnp.tanh(1.2 * z / 2.5)
        lse = jax.nn.logsumexp(zz, axis=-1)
        onehot = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
        wy = jnp.sum(onehot * w, axis=-1)
        rows = sw * (wy * (lse - jnp.sum(onehot * zz, axis=-1)) + 1e-2 * lse**2)
        s = jnp.sum(rows)
        mean = s / jnp.where(jnp.isnan(normalizer), jnp.sum(sw * wy), normalizer)
        return coef[0] * jnp.sum(ct * rows) + coef[1] * s + coef[2] * mean, (rows, s, mean)

    (_, aux), g = jax.value_and_grad(total, has_aux=True)(z)
    return aux, g


def test_fastxent_options(rng, dtype):
    """sample_weight, z_loss, softcap, logit_scale, normalizer against explicit jnp."""
    z = jnp.asarray(rng.standard_normal((6, 7)).astype(dtype))
    y = jnp.asarray(rng.integers(0, 7, 6))
    sw = jnp.asarray(rng.uniform(0.0, 2.0, 6).astype(dtype))
    w = jnp.asarray(rng.uniform(0.5, 2.0, 7).astype(dtype))
    ct = jnp.asarray(rng.uniform(-2, 2, 6).astype(dtype))
    for k, reduction in enumerate(REDUCTIONS):
        for normalizer in (None, 4.0):
            kw = dict(
                reduction=reduction,
                weight=w,
                sample_weight=sw,
                z_loss=1e-2,
                softcap=2.5,
                logit_scale=1.2,
                normalizer=normalizer,
            )
            l1, g1 = _fused(z, y, ct if reduction == "none" else None, **kw)
            coef = jnp.asarray([k == 2, k == 1, k == 0], dtype)
            nrm = jnp.asarray(np.nan if normalizer is None else normalizer, dtype)
            aux, g2 = _options_reference(z, y, w, sw, nrm, ct, coef)
            l2 = aux[2 - k]
            assert loss_error(l1, l2) <= TOL[dtype] and grad_error(g1, g2) <= TOL[dtype]


def test_weight_is_a_traced_operand(rng):
    """weight and sample_weight may be traced (jit arguments): new values, same compiled
    function, right results."""
    z, y, _ = _inputs(rng, (8, 5), np.float32)
    traces = []

    def loss(z, w, sw):
        traces.append(1)
        return fxj.cross_entropy(z, y, weight=w, sample_weight=sw)

    f = jax.jit(jax.value_and_grad(loss))
    for _ in range(2):
        w = jnp.asarray(rng.uniform(0.5, 2.0, 5).astype(np.float32))
        l1, g1 = f(z, w, jnp.ones(8))
        l2, g2 = reference(z, y, weight=w)
        assert loss_error(l1, l2) <= TOL[np.float32] and grad_error(g1, g2) <= TOL[np.float32]
    assert len(traces) == 1


def test_vmap(rng):
    """Under vmap each batch element is its own call (its own "mean" denominator)."""
    zs = jnp.asarray(rng.standard_normal((3, 6, 4)).astype(np.float32))
    ys = jnp.asarray(rng.integers(0, 4, (3, 6)))
    for reduction in REDUCTIONS:
        f = jax.jit(
            jax.vmap(
                jax.value_and_grad(
                    lambda z, y, r=reduction: jnp.sum(fxj.cross_entropy(z, y, reduction=r))
                )
            )
        )
        l1, g1 = f(zs, ys)
        for b in range(3):
            l2, g2 = reference(zs[b], ys[b], reduction=reduction)
            assert loss_error(l1[b], jnp.sum(l2)) <= TOL[np.float32]
            assert grad_error(g1[b], g2) <= TOL[np.float32]


@pytest.mark.parametrize("half", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_half_precision_via_float32(rng, half):
    """Half logits are computed in float32: the result is the float32 computation on the
    same values, rounded once to the half type."""
    z = jnp.asarray(rng.standard_normal((9, 5)).astype(np.float32)).astype(half)
    y = jnp.asarray(rng.integers(0, 5, 9))
    l1, g1 = _fused(z, y)
    l2, g2 = reference(z.astype(jnp.float32), y)
    assert l1.dtype == half and g1.dtype == half
    ulp = float(jnp.finfo(half).eps)
    np.testing.assert_allclose(np.float32(l1), np.float32(l2), rtol=ulp)
    np.testing.assert_allclose(
        np.asarray(g1, np.float32),
        np.asarray(g2.astype(half), np.float32),
        rtol=0,
        atol=ulp * float(jnp.max(jnp.abs(g2))),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_leading_axes_are_rows(rng, reduction):
    """(B, T, C) logits with the class axis last: B * T rows."""
    z, y, kw = _inputs(rng, (3, 4, 6), np.float32, weight=True, ignore=True)
    ct = jnp.asarray(rng.uniform(-2, 2, (3, 4)).astype(np.float32)) if reduction == "none" else None
    l1, g1 = _fused(z, y, ct, reduction=reduction, **kw)
    l2, g2 = reference(z, y, ct=ct, reduction=reduction, **kw)
    assert l1.shape == l2.shape and g1.shape == z.shape
    assert loss_error(l1, l2) <= TOL[np.float32] and grad_error(g1, g2) <= TOL[np.float32]


def test_reduction_none_only_rows_with_cotangent(rng):
    """jax.grad of one row's loss is that row's gradient and zeros elsewhere."""
    z, y, _ = _inputs(rng, (9, 5), np.float32)
    g = jax.grad(lambda z: fxj.cross_entropy(z, y, reduction="none")[2])(z)
    _, g_ref = reference(z, y, reduction="none", ct=jnp.zeros(9).at[2].set(1.0))
    assert grad_error(g, g_ref) <= TOL[np.float32]
    assert not np.asarray(g)[[0, 1, 3, 4, 5, 6, 7, 8]].any()


def test_unused_loss_has_zero_gradient(rng):
    """A loss that does not reach the output: symbolic-zero cotangent, zero gradient."""
    z, y, _ = _inputs(rng, (5, 4), np.float32)
    g = jax.grad(
        lambda z: jnp.sum(z) + 0.0 * jnp.sum(jax.lax.stop_gradient(fxj.cross_entropy(z, y)))
    )(z)
    assert np.array_equal(np.asarray(g), np.ones((5, 4), np.float32))
    _, vjp = jax.vjp(lambda z: (fxj.cross_entropy(z, y), jnp.sum(z)), z)
    (g2,) = vjp((jnp.float32(0.0), jnp.float32(1.0)))
    assert np.array_equal(np.asarray(g2), np.ones((5, 4), np.float32))


def test_trace_time_errors(rng):
    z, y, _ = _inputs(rng, (4, 3), np.float32)
    with pytest.raises(ValueError, match="reduction"):
        fxj.cross_entropy(z, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        jax.jit(lambda z: fxj.cross_entropy(z, y, label_smoothing=2.0))(z)
    with pytest.raises(ValueError, match="softcap"):
        fxj.cross_entropy(z, y, softcap=0.0)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda z, s: fxj.cross_entropy(z, y, z_loss=s))(z, 0.1)
    with pytest.raises(TypeError):
        fxj.cross_entropy(z, y, no_such_option=1)
    with pytest.raises(TypeError, match="out"):
        fxj.cross_entropy(z, y, out=z)
    with pytest.raises(TypeError, match="floating-point"):
        fxj.cross_entropy(jnp.ones((4, 3), jnp.int32), y)
    with pytest.raises(TypeError, match="target"):
        fxj.cross_entropy(z, y.astype(bool))
    with pytest.raises(ValueError, match="target has shape"):
        fxj.cross_entropy(z, y[:2])
    with pytest.raises(ValueError, match="weight has shape"):
        fxj.cross_entropy(z, y, weight=jnp.ones(4))
    with pytest.raises(ValueError, match="sample_weight has shape"):
        fxj.cross_entropy(z, y, sample_weight=jnp.ones(3))
    with pytest.raises(ValueError, match="ignore_index"):
        fxj.cross_entropy(z, jax.nn.softmax(z), ignore_index=0)
    with pytest.raises(ValueError, match="out of bounds"):
        fxj.cross_entropy(z, y, axis=2)
    with pytest.raises(ValueError, match="C = 0"):
        fxj.cross_entropy(jnp.ones((4, 0)), y)
    p = jax.nn.softmax(z)
    if _jax_ffi.enabled():
        # Differentiable through the reference formula (tests/test_jax_derivatives.py checks
        # the values against differences of the kernel's loss).
        assert bool(jnp.isfinite(jax.grad(lambda p: fxj.cross_entropy(z, p))(p)).all())
    else:  # the pure_callback fallback differentiates the logits only
        with pytest.raises(TypeError, match="target is being differentiated"):
            jax.grad(lambda p: fxj.cross_entropy(z, p))(p)
        with pytest.raises(TypeError, match="weight is being differentiated"):
            jax.grad(lambda w: fxj.cross_entropy(z, y, weight=w))(jnp.ones(3))


def test_bad_class_index_raises_at_run_time(rng):
    z, _, _ = _inputs(rng, (4, 3), np.float32)
    bad = jnp.array([0, 1, 7, 0])
    with pytest.raises(Exception, match=r"target\[2\] = 7 is out of range"):
        jax.block_until_ready(jax.jit(lambda z: fxj.cross_entropy(z, bad))(z))


def test_docstring_examples():
    res = doctest.testmod(fxj, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
