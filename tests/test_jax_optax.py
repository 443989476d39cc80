"""fastxent.jax's optax-shaped drop-ins against optax itself: per-example values and
gradients (of a random cotangent) in float64 and float32, with and without ``where`` (per
example and per class), class axis last or not; the documented differences (-100 ignored,
other out-of-range labels raise). Tolerances as in tests/test_jax.py."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import fastxent.jax as fxj  # noqa: E402
from reference import U32, grad_error, loss_error  # noqa: E402

TOL = {np.float64: 1e-12, np.float32: 64 * U32}


def _x64():
    return (
        jax.enable_x64(True)
        if hasattr(jax, "enable_x64")
        else __import__("jax.experimental", fromlist=["enable_x64"]).enable_x64()
    )


def _grid(test):
    """The cases of both comparisons: dtype, ``where`` (none, a mask of the examples or of the
    classes) and the layout (class axis last, or 1)."""
    for mark in (
        pytest.mark.parametrize("shape,axis", [((7, 5), -1), ((3, 5, 4), 1)], ids=["2d", "axis1"]),
        pytest.mark.parametrize("where", [None, "rows", "classes"]),
        pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"]),
    ):
        test = mark(test)
    return test


def _cotangent_and_where(rng, dtype, where, shape, rows):
    """A random cotangent of the per-example losses, and optax's ``where`` for the case."""
    ct = jnp.asarray(rng.uniform(-2, 2, rows).astype(dtype))
    w = None
    if where == "rows":
        w = jnp.asarray(rng.random(rows) < 0.7)
    elif where == "classes":
        w = jnp.asarray(rng.random(shape) < 0.8)
    return ct, w


def _compare(ours, theirs, z, ct, dtype):
    l1, vjp1 = jax.vjp(ours, z)
    l2, vjp2 = jax.vjp(theirs, z)
    assert l1.shape == l2.shape and l1.dtype == l2.dtype
    assert loss_error(l1, l2) <= TOL[dtype]
    assert grad_error(vjp1(ct)[0], vjp2(ct)[0]) <= TOL[dtype]


@_grid
def test_integer_labels(rng, dtype, where, shape, axis):
    with _x64():
        C = shape[axis]
        rows = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
        z = jnp.asarray(rng.standard_normal(shape).astype(dtype))
        y = jnp.asarray(rng.integers(0, C, rows))
        ct, w = _cotangent_and_where(rng, dtype, where, shape, rows)
        if where == "classes":
            w = w | jax.nn.one_hot(y, C, axis=axis, dtype=bool)  # optax needs the label kept
        _compare(
            lambda z: fxj.softmax_cross_entropy_with_integer_labels(z, y, axis, w),
            lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y, axis, w),
            z,
            ct,
            dtype,
        )


@_grid
def test_probability_labels(rng, dtype, where, shape, axis):
    with _x64():
        rows = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
        z = jnp.asarray(rng.standard_normal(shape).astype(dtype))
        p = rng.random(shape)
        p = jnp.asarray((p / p.sum(axis=axis, keepdims=True)).astype(dtype))
        ct, w = _cotangent_and_where(rng, dtype, where, shape, rows)
        _compare(
            lambda z: fxj.softmax_cross_entropy(z, p, axis, w),
            lambda z: optax.softmax_cross_entropy(z, p, axis, w),
            z,
            ct,
            dtype,
        )


def test_jit_bf16_and_differences(rng):
    z = jnp.asarray(rng.standard_normal((6, 4)), jnp.bfloat16)
    y = jnp.array([0, 1, -100, 3, 2, 1])
    out = jax.jit(fxj.softmax_cross_entropy_with_integer_labels)(z, y)
    assert out.shape == (6,) and out.dtype == jnp.bfloat16 and float(out[2]) == 0.0
    with pytest.raises(Exception, match=r"target\[1\] = 4 is out of range"):
        jax.block_until_ready(
            jax.jit(fxj.softmax_cross_entropy_with_integer_labels)(z, jnp.array([0, 4, 0, 0, 0, 0]))
        )
    with pytest.raises(TypeError, match="axis must be an int"):
        fxj.softmax_cross_entropy(z, jax.nn.softmax(z), axis=(0, 1))


def test_bench_jax_smoke():
    """python -m fastxent bench-jax: one tiny case of each kind, both contestants timed."""
    from fastxent import bench_jax

    lines = []
    rows = bench_jax.run([(32, 10)], ["float32"], budget=0.0, out=lines.append)
    assert [r["kind"] for r in rows] == ["value_and_grad", "forward"]
    assert all(r["fastxent_s"] > 0 and r["optax_s"] > 0 and r["rounds"] >= 5 for r in rows)
    assert "XLA FFI" in lines[0] or "pure_callback" in lines[0]


def test_softmax_cross_entropy_label_gradient():
    """The labels' gradient was silently 0 (stop_gradient): it is optax's through the FFI,
    and a TypeError naming the target on the pure_callback fallback."""
    from fastxent import _jax_ffi

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    z = jax.random.normal(k1, (4, 6))
    p = jax.nn.softmax(jax.random.normal(k2, (4, 6)))
    rows = jnp.array([True, False, True, True])
    for where in (None, rows):

        def f(p, fn, where=where):
            return fn(z, p, where=where).sum()

        if _jax_ffi.enabled():
            got = jax.grad(f)(p, fxj.softmax_cross_entropy)
            want = jax.grad(f)(p, optax.softmax_cross_entropy)
            keep = rows if where is not None else jnp.ones(4, bool)
            # A row left out: loss 0 whatever the labels, so gradient 0 (optax: NaN there).
            np.testing.assert_allclose(got[keep], want[keep], rtol=1e-5, atol=1e-6)
            assert not jnp.any(got[~keep])
            assert float(jnp.abs(got).max()) > 0.1
        else:
            with pytest.raises(TypeError, match="target"):
                jax.grad(f)(p, fxj.softmax_cross_entropy)
