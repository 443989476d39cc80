"""fastxent.jax.cross_entropy's per-row outputs (outputs=) and entropy bonus (entropy_coef),
issue #23 section 1, through the XLA FFI (fastxent_ce_stats): bit for bit the NumPy API's
values, loss and gradient under jit, every ISA; the statistics' derivatives (reverse and
forward mode, second order) against jax.numpy formulas in float64; a traced entropy_coef;
vmap, shard_map and row-sharded jit; no (rows, C) temporary when the statistics are only
logged; the error paths."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastxent  # noqa: E402
import fastxent.jax as fxj  # noqa: E402
from fastxent import _jax_ffi  # noqa: E402
from reference import assert_bitwise_equal, run_ok  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _jax_ffi.enabled(), reason="the XLA FFI path is off (not built, or FASTXENT_JAX_FFI=0)"
)

ALL = ("lse", "entropy", "argmax", "target_logprob", "accuracy")
FLOATS = ("lse", "entropy", "target_logprob")

OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.25, entropy_coef=0.5),
    dict(reduction="none", weight=True, ignore=True, entropy_coef=0.1),
    dict(sample_weight=True, z_loss=1e-2, softcap=2.5, logit_scale=1.2, normalizer=5.0),
    dict(ignore=True, weight=True, sample_weight=True, entropy_coef=0.3, softcap=4.0),
]


def _x64():
    return (
        jax.enable_x64(True)
        if hasattr(jax, "enable_x64")
        else __import__("jax.experimental", fromlist=["enable_x64"]).enable_x64()
    )


def _case(rng, dtype, opts, shape=(3, 4, 9)):
    rows, C = shape[:-1], shape[-1]
    z = (2 * rng.standard_normal(shape)).astype(dtype)
    y = rng.integers(0, C, rows)
    if opts.get("ignore"):
        y = np.where(rng.random(rows) < 0.3, -100, y)
    kw = {k: v for k, v in opts.items() if k not in ("weight", "ignore", "sample_weight")}
    if opts.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2.0, C).astype(dtype)
    if opts.get("sample_weight"):
        kw["sample_weight"] = rng.uniform(0.0, 2.0, rows).astype(dtype)
    return z, y, kw


def _jnp(kw):
    return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_bitwise_equal_to_numpy_api(rng, isa, dtype, opts):
    with _x64():
        z, y, kw = _case(rng, dtype, opts)
        l_np, g_np, st_np = fastxent.cross_entropy_with_grad(z, y, outputs=ALL, **kw)
        jkw = _jnp(kw)

        def f(z):
            loss, st = fxj.cross_entropy(z, y, outputs=ALL, **jkw)
            return jnp.sum(loss), (loss, st)

        (_, (loss, st)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(z))
        v, st_f = jax.jit(lambda z: fxj.cross_entropy(z, y, outputs=ALL, **jkw))(jnp.asarray(z))
        l_plain = jax.jit(lambda z: fxj.cross_entropy(z, y, **jkw))(jnp.asarray(z))
    assert_bitwise_equal(g, g_np)
    assert_bitwise_equal(loss, np.asarray(l_np, dtype))
    assert_bitwise_equal(v, np.asarray(l_np, dtype))
    assert_bitwise_equal(l_plain, np.asarray(l_np, dtype))  # outputs= leaves the loss's bits alone
    for s in (st, st_f):
        for n in FLOATS:
            assert_bitwise_equal(getattr(s, n), getattr(st_np, n))
        assert np.array_equal(np.asarray(s.argmax), st_np.argmax)
        assert np.asarray(s.argmax).dtype == np.int64  # x64: int64, as NumPy's
        # hits / counted rounded once to the logits' dtype (half an ulp)
        ulp = float(np.finfo(dtype).eps)
        assert float(s.accuracy) == pytest.approx(st_np.accuracy, rel=ulp, abs=0)
        assert np.asarray(s.accuracy).dtype == dtype


def test_only_requested_fields_int32_argmax_and_probability_targets(rng):
    z = rng.standard_normal((5, 6)).astype(np.float32)
    y = rng.integers(0, 6, 5)
    loss, st = fxj.cross_entropy(jnp.asarray(z), jnp.asarray(y), outputs=("argmax",))
    assert st.lse is None and st.entropy is None and st.target_logprob is None
    assert st.accuracy is None and st.argmax.dtype == jnp.int32  # without x64
    assert np.array_equal(np.asarray(st.argmax), np.argmax(z, -1))
    _, st = fxj.cross_entropy(jnp.asarray(z), jnp.asarray(y), outputs=("accuracy", "lse"))
    assert st.argmax is None and st.entropy is None
    assert float(st.accuracy) == float(np.mean(np.argmax(z, -1) == y))
    # Probability targets: lse, entropy and argmax (no target to score).
    p = rng.random((5, 6)).astype(np.float32)
    p /= p.sum(-1, keepdims=True)
    names = ("lse", "entropy", "argmax")
    l_np, st_np = fastxent.cross_entropy(z, p, outputs=names, entropy_coef=0.2)
    loss, st = jax.jit(lambda z, p: fxj.cross_entropy(z, p, outputs=names, entropy_coef=0.2))(
        jnp.asarray(z), jnp.asarray(p)
    )
    assert_bitwise_equal(loss, l_np)
    for n in ("lse", "entropy"):
        assert_bitwise_equal(getattr(st, n), getattr(st_np, n))
    with pytest.raises(ValueError, match="target_logprob"):
        fxj.cross_entropy(jnp.asarray(z), jnp.asarray(p), outputs=("target_logprob",))
    with pytest.raises(ValueError, match="accuracy"):
        fxj.cross_entropy(jnp.asarray(z), jnp.asarray(p), outputs=("accuracy",))
    # No counted row: accuracy 0 (NumPy's), not NaN.
    _, st = fxj.cross_entropy(jnp.asarray(z), jnp.full(5, -100), outputs=("accuracy",))
    assert float(st.accuracy) == 0.0


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_16_bit_logits(rng, isa, kind):
    """16-bit logits: the NumPy API's values bit for bit (float32 statistics, the gradient
    rounded once, the loss in the logits' dtype); the statistics' derivative computed in
    float32 from the 16-bit values."""
    dt = jnp.dtype(getattr(jnp, kind))
    z = (3 * rng.standard_normal((2, 5, 9))).astype(dt)
    y = np.where(rng.random((2, 5)) < 0.3, -100, rng.integers(0, 9, (2, 5)))
    l_np, g_np, st_np = fastxent.cross_entropy_with_grad(
        np.asarray(z), y, outputs=ALL, entropy_coef=0.3, label_smoothing=0.1
    )
    (loss, st), g = jax.jit(
        jax.value_and_grad(
            lambda z: fxj.cross_entropy(z, y, outputs=ALL, entropy_coef=0.3, label_smoothing=0.1),
            has_aux=True,
        )
    )(jnp.asarray(z))
    assert_bitwise_equal(loss, np.asarray(l_np).astype(dt))
    assert_bitwise_equal(g, g_np)
    for n in FLOATS:
        assert_bitwise_equal(getattr(st, n), getattr(st_np, n))
        assert getattr(st, n).dtype == jnp.float32
    assert np.array_equal(np.asarray(st.argmax), st_np.argmax)
    g_ent = jax.grad(lambda z: fxj.cross_entropy(z, y, outputs=("entropy",))[1].entropy.sum())(
        jnp.asarray(z)
    )
    ref = jax.grad(lambda z: jnp.sum(_ref_stats64(z.astype(jnp.float32), y)["entropy"]))(
        jnp.asarray(z)
    )
    assert g_ent.dtype == dt
    # rounded once to the 16-bit type (half its eps, relative), from float32 formulas that
    # differ in their last bits (1e-6 absolute covers them at these magnitudes)
    err = np.abs(np.asarray(g_ent, np.float32) - np.asarray(ref))
    assert np.all(err <= float(jnp.finfo(dt).eps) / 2 * np.abs(np.asarray(ref)) + 1e-6)


def _ref_stats64(z, y, softcap=None, logit_scale=1.0):
    """lse, entropy, target_logprob of float64 logits in jax.numpy (class axis last)."""
    zp = softcap * jnp.tanh(logit_scale * z / softcap) if softcap else logit_scale * z
    lse = jax.nn.logsumexp(zp, axis=-1)
    logp = zp - lse[..., None]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    counted = y != -100
    tlp = jnp.take_along_axis(logp, jnp.where(counted, y, 0)[..., None], -1)[..., 0]
    return {"lse": lse, "entropy": ent, "target_logprob": jnp.where(counted, tlp, 0.0)}


@pytest.mark.parametrize("cap", [None, 3.0])
def test_statistics_derivatives_reverse_forward_and_second_order(rng, cap):
    """Cotangents on the statistics (with the loss's): jax.grad equals the float64 formula's;
    forward mode (jvp) gives the same directional derivative; the Hessian-vector product of a
    statistic matches the formula's (the tangent rule is the reference's, differentiable)."""
    with _x64():
        z = jnp.asarray(2 * rng.standard_normal((6, 7)))
        y = jnp.asarray(np.where(rng.random(6) < 0.3, -100, rng.integers(0, 7, 6)))
        cot = {n: jnp.asarray(rng.standard_normal(6)) for n in FLOATS}
        dz = jnp.asarray(rng.standard_normal((6, 7)))
        extra = {} if cap is None else {"softcap": cap}

        def ours(z):
            loss, st = fxj.cross_entropy(z, y, outputs=ALL, entropy_coef=0.4, **extra)
            return loss + sum(jnp.sum(cot[n] * getattr(st, n)) for n in FLOATS)

        def ref(z):
            st = _ref_stats64(z, y, cap)
            ce = -st["target_logprob"]
            counted = y != -100
            loss = jnp.sum(jnp.where(counted, ce - 0.4 * st["entropy"], 0)) / jnp.sum(counted)
            return loss + sum(jnp.sum(cot[n] * st[n]) for n in FLOATS)

        g, g_ref = jax.jit(jax.grad(ours))(z), jax.grad(ref)(z)
        assert np.abs(np.asarray(g - g_ref)).max() <= 1e-13
        _, t = jax.jvp(ours, (z,), (dz,))
        _, t_ref = jax.jvp(ref, (z,), (dz,))
        assert abs(float(t - t_ref)) <= 1e-12 * max(1.0, abs(float(t_ref)))
        hvp = jax.jvp(jax.grad(ours), (z,), (dz,))[1]
        hvp_ref = jax.jvp(jax.grad(ref), (z,), (dz,))[1]
        assert np.abs(np.asarray(hvp - hvp_ref)).max() <= 1e-12

        # Reverse over reverse with argmax asked for too (its tangent is a symbolic zero).
        def ours_all(z):
            loss, st = fxj.cross_entropy(z, y, outputs=ALL, entropy_coef=0.4, **extra)
            return loss + sum(jnp.sum(cot[n] * getattr(st, n)) for n in FLOATS)

        gg = jax.grad(lambda z: jnp.sum(jax.grad(ours_all)(z) ** 2))(z)
        gg_ref = jax.grad(lambda z: jnp.sum(jax.grad(ref)(z) ** 2))(z)
        assert np.abs(np.asarray(gg - gg_ref)).max() <= 1e-11
        # Only the loss differentiated, statistics carried along: the kernel's gradient.
        g_loss = jax.grad(lambda z: fxj.cross_entropy(z, y, outputs=ALL, entropy_coef=0.4)[0])(z)
        _, g_np = fastxent.cross_entropy_with_grad(np.asarray(z), np.asarray(y), entropy_coef=0.4)
        assert_bitwise_equal(g_loss, g_np)


def test_statistics_gradients_of_huge_logits_do_not_cancel():
    # p = (1, 0, 0, 0): see tests/test_torch_row_outputs.py (the entropy written as
    # lse - sum p z' lost the lse's derivative to terms of size 3e38).
    z = jnp.asarray([[3e38, -2.5, 6.0, 1.5]], jnp.float32)
    y = jnp.asarray([3])

    def total(z):
        loss, st = fxj.cross_entropy(
            z, y, reduction="none", outputs=("lse", "entropy", "target_logprob")
        )
        return (
            loss.sum()
            + 0.75 * st.lse.sum()
            + 0.5 * st.entropy.sum()
            - 0.25 * st.target_logprob.sum()
        )

    g = np.asarray(jax.grad(total)(z))
    np.testing.assert_array_equal(g, [[2.0, 0.0, 0.0, -1.25]])


def test_rows_the_scale_overflows_have_zero_statistics_derivatives():
    # see tests/test_torch_row_outputs.py: the kernel's all -inf row, derivative 0, not NaN
    z = jnp.asarray([[-3e38, -3e38, -jnp.inf, -3e38], [0.0, 1.0, 2.0, 3.0]], jnp.float32)
    y = jnp.asarray([0, 1])

    def stats(z):
        _, st = fxj.cross_entropy(
            z, y, reduction="none", logit_scale=2.0, outputs=("lse", "entropy")
        )
        return st.lse.sum() + st.entropy.sum()

    g = np.asarray(jax.grad(stats)(z))
    np.testing.assert_array_equal(g[0], np.zeros(4))
    assert np.all(np.isfinite(g))


def test_entropy_coef_traced_and_its_derivative(rng):
    z = rng.standard_normal((8, 5)).astype(np.float32)
    y = np.where(rng.random(8) < 0.3, -100, rng.integers(0, 5, 8))
    sw = rng.uniform(0.5, 2, 8).astype(np.float32)
    traces = []

    def loss(z, beta):
        traces.append(1)
        return fxj.cross_entropy(z, y, sample_weight=jnp.asarray(sw), entropy_coef=beta)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for beta in (0.0, 0.25, 1.5):
        (l, (g, g_beta)) = f(jnp.asarray(z), jnp.float32(beta))
        l_np, g_np, st = fastxent.cross_entropy_with_grad(
            z, y, sample_weight=sw, entropy_coef=beta, outputs=("entropy",)
        )
        assert_bitwise_equal(l, l_np)
        assert_bitwise_equal(g, g_np)
        # d loss / d beta = -sum_n s_n H_n / D over counted rows ("mean").
        c = y != -100
        want = -np.sum(np.where(c, sw * st.entropy, 0)) / np.sum(np.where(c, sw, 0))
        assert float(g_beta) == pytest.approx(want, rel=1e-6)
    assert len(traces) == 1  # one trace for every value
    # (XLA raises INVALID_ARGUMENT from a custom call as ValueError, other errors otherwise)
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match="entropy_coef must be"):
        jax.block_until_ready(f(jnp.asarray(z), jnp.float32(-0.5)))
    # The same traced under vmap: one custom call, each element its own coefficient.
    betas = jnp.asarray([0.0, 0.5, 2.0], jnp.float32)
    ls = jax.vmap(lambda b: fxj.cross_entropy(jnp.asarray(z), y, entropy_coef=b))(betas)
    for b, lb in zip(np.asarray(betas), np.asarray(ls)):
        assert lb == fastxent.cross_entropy(z, y, entropy_coef=float(b))


def test_vmap_is_one_call_with_per_element_statistics(rng):
    zs = jnp.asarray(rng.standard_normal((3, 6, 4)).astype(np.float32))
    ys = jnp.asarray(np.where(rng.random((3, 6)) < 0.3, -100, rng.integers(0, 4, (3, 6))))

    def f(z, y):
        (loss, st), g = jax.value_and_grad(
            lambda z: fxj.cross_entropy(z, y, outputs=ALL, entropy_coef=0.2), has_aux=True
        )(z)
        return loss, g, st

    fv = jax.jit(jax.vmap(f))
    hlo = fv.lower(zs, ys).compile().as_text()
    assert hlo.count('custom_call_target="fastxent_ce_stats"') == 1 and " while(" not in hlo
    loss, g, st = fv(zs, ys)
    for b in range(3):
        l_np, g_np, s_np = fastxent.cross_entropy_with_grad(
            np.asarray(zs[b]), np.asarray(ys[b]), outputs=ALL, entropy_coef=0.2
        )
        assert_bitwise_equal(loss[b], l_np)
        assert_bitwise_equal(g[b], g_np)
        for n in FLOATS:
            assert_bitwise_equal(getattr(st, n)[b], getattr(s_np, n))
        assert np.array_equal(np.asarray(st.argmax[b]), s_np.argmax)
        assert float(st.accuracy[b]) == pytest.approx(s_np.accuracy, rel=1e-7)


def test_logged_statistics_cost_no_rows_by_classes_temporary():
    """Statistics returned for logging (value_and_grad's aux): the compiled step holds no
    temporary of the logits' size (their derivative rule is dropped); differentiated, the
    reference's (rows, C) arrays appear, as documented."""
    N, C = 256, 1000
    z = jnp.ones((N, C), jnp.float32)
    y = jnp.zeros(N, jnp.int32)

    def temp(f):
        return f.lower(z).compile().memory_analysis().temp_size_in_bytes

    plain = jax.jit(jax.value_and_grad(lambda z: fxj.cross_entropy(z * 2.0, y)))
    logged = jax.jit(
        jax.value_and_grad(lambda z: fxj.cross_entropy(z * 2.0, y, outputs=ALL), has_aux=True)
    )
    used = jax.jit(
        jax.grad(lambda z: fxj.cross_entropy(z * 2.0, y, outputs=("entropy",))[1].entropy.sum())
    )
    assert temp(logged) < N * C * 4 // 8 and temp(plain) < N * C * 4 // 8
    assert temp(used) >= N * C * 4


def test_sharded_rows_return_sharded_statistics():
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import PartitionSpec as P, NamedSharding
        import fastxent, fastxent.jax as fxj
        names = ("lse", "entropy", "argmax", "target_logprob", "accuracy")
        mesh = jax.make_mesh((2,), ("d",))
        rng = np.random.default_rng(0)
        z = rng.standard_normal((8, 5)).astype(np.float32)
        y = np.where(np.arange(8) == 3, -100, rng.integers(0, 5, 8))
        l_ref, g_ref, st_ref = fastxent.cross_entropy_with_grad(
            z, y, outputs=names, entropy_coef=0.3)
        zs = jax.device_put(z, NamedSharding(mesh, P("d")))
        ys = jax.device_put(y, NamedSharding(mesh, P("d")))
        f = jax.jit(jax.value_and_grad(
            lambda z, y: fxj.cross_entropy(z, y, outputs=names, entropy_coef=0.3),
            has_aux=True))
        (l, st), g = f(zs, ys)
        assert abs(float(l) - l_ref) <= 1e-6 * abs(l_ref), (float(l), l_ref)
        assert np.abs(np.asarray(g) - g_ref).max() <= 1e-7
        assert g.sharding.spec == P("d", None), g.sharding
        for n in ("lse", "entropy", "target_logprob"):
            assert np.array_equal(np.asarray(getattr(st, n)), getattr(st_ref, n)), n
            assert getattr(st, n).sharding.spec == P("d"), (n, getattr(st, n).sharding)
        assert np.array_equal(np.asarray(st.argmax), st_ref.argmax)
        assert abs(float(st.accuracy) - st_ref.accuracy) <= 1e-7
        assert "all-gather" not in f.lower(zs, ys).compile().as_text()
        # Reverse over reverse with argmax asked for, sharded as unsharded.
        def sq(z, y):
            return jnp.sum(jax.grad(lambda z: fxj.cross_entropy(z, y, outputs=names)[0])(z) ** 2)
        gg = jax.jit(jax.grad(sq))(zs, ys)
        gg1 = jax.grad(sq)(jnp.asarray(z), jnp.asarray(y))
        assert np.abs(np.asarray(gg) - np.asarray(gg1)).max() <= 1e-6
        print("ok")
    """)
    run_ok(script)


def test_errors():
    z = jnp.zeros((4, 6), jnp.float32)
    y = jnp.zeros(4, jnp.int32)
    with pytest.raises(NotImplementedError, match="axis=0"):
        fxj.cross_entropy(z.T, y, axis=0, outputs=("lse",))
    # A class axis followed by length-1 axes only is read as the last one (NumPy's rule).
    _, st = fxj.cross_entropy(z[:, :, None], y[:, None], axis=1, outputs=("lse",))
    assert st.lse.shape == (4, 1)
    with pytest.raises(ValueError, match="unknown output 'logits'"):
        fxj.cross_entropy(z, y, outputs=("logits",))
    with pytest.raises(TypeError, match="outputs must be a tuple"):
        fxj.cross_entropy(z, y, outputs="lse")
    with pytest.raises(ValueError, match="entropy_coef"):
        fxj.cross_entropy(z, y, entropy_coef=-1.0)
    with pytest.raises(ValueError, match="entropy_coef"):  # the value first, as NumPy's
        fxj.cross_entropy(z.T, y, axis=0, entropy_coef=float("nan"))
    # outputs=(): the loss and an empty RowStats, as NumPy's.
    for red in ("mean", "none"):
        loss, st = fxj.cross_entropy(z + jnp.arange(6.0), y, outputs=(), reduction=red)
        assert st == fastxent.RowStats()
        assert_bitwise_equal(loss, fxj.cross_entropy(z + jnp.arange(6.0), y, reduction=red))
    with pytest.raises(TypeError, match="entropy_coef"):
        fxj.cross_entropy(z, y, entropy_coef=None)
    with pytest.raises(TypeError, match="'out'"):
        fxj.cross_entropy(z, y, out=np.zeros((4, 6), np.float32))
    # An entropy_coef of 0 and outputs=None are the plain call.
    assert float(fxj.cross_entropy(z, y, entropy_coef=0.0, outputs=None)) == float(
        fxj.cross_entropy(z, y)
    )


def test_pure_callback_fallback_refuses(monkeypatch):
    monkeypatch.setattr(_jax_ffi, "_state", False)
    z = jnp.zeros((4, 6), jnp.float32)
    y = jnp.zeros(4, jnp.int32)
    for kw in ({"outputs": ("lse",)}, {"entropy_coef": 0.5}):
        with pytest.raises(NotImplementedError, match="XLA FFI"):
            fxj.cross_entropy(z, y, **kw)
    assert float(fxj.cross_entropy(z, y, entropy_coef=0.0)) == pytest.approx(np.log(6))
    with pytest.raises(NotImplementedError, match="XLA FFI"):
        jax.jit(lambda b: fxj.cross_entropy(z, y, entropy_coef=b))(0.5)
