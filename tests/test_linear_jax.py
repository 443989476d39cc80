"""fastxent.jax.linear_cross_entropy: jit, value_and_grad and vjp against the NumPy API
(fastxent.linear_cross_entropy_with_grad, itself tested against float64 references), every
reduction with random cotangents, options, a remainder tile, 16-bit."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastxent as fx  # noqa: E402
import fastxent.jax as fxj  # noqa: E402


def _x64():
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX

    return enable_x64()


def _problem(seed=0, n=23, h=5, v=11):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h))
    w = rng.standard_normal((v, h))
    b = rng.standard_normal(v)
    t = rng.integers(0, v, n)
    t[::4] = -100
    return rng, x, w, b, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "opt",
    [
        {},
        {
            "label_smoothing": 0.1,
            "z_loss": 1e-3,
            "weight": True,
            "sample_weight": True,
            "softcap": 4.0,
        },
    ],
    ids=["plain", "options"],
)
def test_vjp_against_numpy_api(reduction, opt):
    rng, x, w, b, t = _problem()
    kw = {k: v for k, v in opt.items() if k not in ("weight", "sample_weight")}
    cw = rng.uniform(0.5, 2, 11) if opt.get("weight") else None
    sw = rng.uniform(0, 2, 23) if opt.get("sample_weight") else None
    with _x64():

        def f(x_, w_, b_):
            return fxj.linear_cross_entropy(
                x_,
                w_,
                t,
                linear_bias=b_,
                weight=cw,
                sample_weight=sw,
                reduction=reduction,
                tile_rows=4,
                **kw,
            )

        # (not jitted: a jitted backward that runs a callback loses x64 inside this context
        # manager; test_jit_none covers jit)
        loss, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
        ct = rng.standard_normal(loss.shape)
        grads = vjp(jnp.asarray(ct))
    ref_loss = fx.linear_cross_entropy(
        x, w, t, linear_bias=b, weight=cw, sample_weight=sw, reduction=reduction, **kw
    )
    if reduction == "none":
        s = ct if sw is None else ct * sw
        ref = fx.linear_cross_entropy_with_grad(
            x, w, t, linear_bias=b, weight=cw, sample_weight=s, reduction="sum", **kw
        )[1:]
    else:
        ref = [
            g * ct
            for g in fx.linear_cross_entropy_with_grad(
                x, w, t, linear_bias=b, weight=cw, sample_weight=sw, reduction=reduction, **kw
            )[1:]
        ]
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-12, atol=1e-13)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_value_and_grad_low_precision(dtype, tol):
    _, x, w, b, t = _problem(1)
    xs, ws = jnp.asarray(x, dtype), jnp.asarray(w, dtype)

    def f(x_, w_):
        return fxj.linear_cross_entropy(x_, w_, t, tile_rows=5)

    loss, (gx, gw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(xs, ws)
    assert loss.dtype == xs.dtype and gx.dtype == xs.dtype and gw.dtype == ws.dtype
    x64, w64 = np.asarray(xs, np.float64), np.asarray(ws, np.float64)
    ref = fx.linear_cross_entropy_with_grad(x64, w64, t)
    np.testing.assert_allclose(float(loss), ref[0], rtol=tol)
    for g, r in zip((gx, gw), ref[1:3]):
        assert np.max(np.abs(np.asarray(g, np.float64) - r)) <= tol * max(1, np.abs(r).max())


def test_probability_targets_and_errors():
    rng, x, w, _, _ = _problem(2)
    p = rng.uniform(0, 1, (23, 11))
    p /= p.sum(1, keepdims=True)
    with _x64():
        got = fxj.linear_cross_entropy(jnp.asarray(x), jnp.asarray(w), jnp.asarray(p))
    np.testing.assert_allclose(float(got), fx.linear_cross_entropy(x, w, p), rtol=1e-12)
    with pytest.raises(ValueError):
        fxj.linear_cross_entropy(x.astype(np.float32), w[:, :3].astype(np.float32), p)
    with pytest.raises(ValueError):
        fxj.linear_cross_entropy(
            x.astype(np.float32), w.astype(np.float32), np.zeros(23, np.int32), label_smoothing=2.0
        )


def test_jit_none():
    rng, x, w, b, t = _problem(3)
    xs, ws = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    ct = rng.standard_normal(23)

    def f(x_, w_):
        return jnp.vdot(
            fxj.linear_cross_entropy(x_, w_, t, reduction="none", tile_rows=6),
            jnp.asarray(ct, jnp.float32),
        )

    gx, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(xs, ws)
    ref = fx.linear_cross_entropy_with_grad(
        np.asarray(xs, np.float64), np.asarray(ws, np.float64), t, reduction="sum", sample_weight=ct
    )
    np.testing.assert_allclose(np.asarray(gx), ref[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), ref[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,value",
    [("label_smoothing", 0.1), ("normalizer", 3.0), ("z_loss", 1e-3), ("softcap", 4.0),
     ("logit_scale", 1.5), ("ignore_index", -100)],
)  # fmt: skip
def test_traced_option_is_a_clear_error(name, value):
    # Every option is static here (a traced label_smoothing, which fastxent.jax.cross_entropy
    # takes through its custom call, raised JAX's ConcretizationTypeError from float()). A
    # concrete JAX or NumPy scalar is read as its Python number (a JAX one was unhashable).
    _, x, w, _, t = _problem(4)
    x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    msg = f"{name} must be a static Python number .* got a traced value"
    with pytest.raises(TypeError, match=msg):
        jax.jit(lambda o: fxj.linear_cross_entropy(x, w, t, **{name: o}))(value)
    with pytest.raises(TypeError, match=msg):
        jax.vmap(lambda o: fxj.linear_cross_entropy(x, w, t, **{name: o}))(jnp.asarray([value]))
    want = fxj.linear_cross_entropy(x, w, t, **{name: value})
    static = jax.jit(lambda o: fxj.linear_cross_entropy(x, w, t, **{name: o}), static_argnums=0)
    assert float(static(value)) == float(want)
    for concrete in (jnp.asarray(value), np.asarray(value)[()]):
        assert float(fxj.linear_cross_entropy(x, w, t, **{name: concrete})) == float(want)


@pytest.mark.parametrize("wrt", ["target", "weight", "sample_weight", "normalizer"])
def test_differentiating_a_non_differentiable_input_raises(wrt):
    # The target's, class weights', sample weights' and normalizer's gradients are not
    # computed: asking for one must raise, never return zeros (it did before).
    rng, x, w, _, _ = _problem(2)
    x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    n, v = x.shape[0], w.shape[0]
    p = jnp.asarray(rng.uniform(0.1, 1, (n, v)), jnp.float32)
    p = p / p.sum(1, keepdims=True)
    y = jnp.asarray(rng.integers(0, v, n))
    cw = jnp.asarray(rng.uniform(0.5, 1.5, v), jnp.float32)
    sw = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)

    def loss(a):
        if wrt == "target":
            return fxj.linear_cross_entropy(x, w, a)
        if wrt == "weight":
            return fxj.linear_cross_entropy(x, w, y, weight=a)
        if wrt == "sample_weight":
            return fxj.linear_cross_entropy(x, w, y, sample_weight=a)
        return fxj.linear_cross_entropy(x, w, y, reduction="sum", normalizer=a)

    arg = {"target": p, "weight": cw, "sample_weight": sw, "normalizer": jnp.float32(7.0)}[wrt]
    with pytest.raises(TypeError, match=wrt):
        jax.grad(loss)(arg)
    loss(arg)  # the forward alone is fine
    # Differentiating the hidden states with that input held constant still works.
    g = jax.grad(
        lambda h: {
            "target": lambda: fxj.linear_cross_entropy(h, w, p),
            "weight": lambda: fxj.linear_cross_entropy(h, w, y, weight=cw),
            "sample_weight": lambda: fxj.linear_cross_entropy(h, w, y, sample_weight=sw),
            "normalizer": lambda: fxj.linear_cross_entropy(
                h, w, y, reduction="sum", normalizer=jnp.float32(7.0)
            ),
        }[wrt]()
    )(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0))


def test_zero_width_hidden():
    """A hidden size of 0 (the logits are the bias): as NumPy's, not ZeroDivisionError from
    reshape(-1, 0); the bias gradient under jit."""
    rng = np.random.default_rng(3)
    h, w = np.zeros((6, 0)), np.zeros((9, 0))
    b, y = rng.standard_normal(9), rng.integers(0, 9, 6)
    with _x64():
        want = fx.linear_cross_entropy_with_grad(h, w, y, linear_bias=b)
        got = fxj.linear_cross_entropy(h, w, y, linear_bias=b)
        gb = jax.jit(jax.grad(lambda b: fxj.linear_cross_entropy(h, w, y, linear_bias=b)))(b)
    np.testing.assert_allclose(got, want[0], rtol=1e-12)
    np.testing.assert_allclose(gb, want[-1], rtol=1e-12, atol=1e-15)
