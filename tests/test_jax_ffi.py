"""fastxent.jax through XLA's FFI (fastxent._core.xla_ffi): the custom call is the default
path, it matches the NumPy API bit for bit in every dtype (bfloat16 and float16 without a
float32 round trip) and under every ISA, vmap is one call, label_smoothing and normalizer may
be traced, a bad label's error names it on its first line, two Python threads calling a
jitted function do not hang, and shard_map computes each shard's rows locally.

The handlers are built when jaxlib's headers are found at build time; without them these tests
skip (tests/test_jax.py covers fastxent.jax either way).
"""

from __future__ import annotations

import functools
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastxent  # noqa: E402
import fastxent.jax as fxj  # noqa: E402
from fastxent import _jax_ffi  # noqa: E402
from reference import run_ok  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _jax_ffi.enabled(), reason="the XLA FFI path is off (not built, or FASTXENT_JAX_FFI=0)"
)

OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.25),
    dict(reduction="none", weight=True, ignore=True),
    dict(sample_weight=True, z_loss=1e-2, softcap=2.5, logit_scale=1.2, normalizer=5.0),
    dict(probs=True, weight=True, label_smoothing=0.1),
    dict(axis=1, reduction="none", label_smoothing=0.1),
]


def _x64():
    return (
        jax.enable_x64(True)
        if hasattr(jax, "enable_x64")
        else __import__("jax.experimental", fromlist=["enable_x64"]).enable_x64()
    )


def _case(rng, dtype, opts, shape=(6, 5, 7)):
    opts = dict(opts)
    axis = opts.get("axis", -1)
    C = shape[axis]
    rows = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    z = (2 * rng.standard_normal(shape)).astype(np.float32).astype(dtype)
    kw = {k: v for k, v in opts.items() if k not in ("probs", "weight", "ignore", "sample_weight")}
    if opts.get("probs"):
        p = rng.random(shape)
        y = (p / p.sum(axis=axis, keepdims=True)).astype(dtype)
    else:
        y = rng.integers(0, C, rows)
        if opts.get("ignore"):
            y = np.where(rng.random(rows) < 0.3, -100, y)
    cdt = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    if opts.get("weight"):
        kw["weight"] = rng.uniform(0.5, 2.0, C).astype(cdt)
    if opts.get("sample_weight"):
        kw["sample_weight"] = rng.uniform(0.0, 2.0, rows).astype(cdt)
    return z, y, kw


def _dtypes():
    import ml_dtypes

    return [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("dt", range(4), ids=["f32", "f64", "f16", "bf16"])
def test_bitwise_equal_to_numpy_api(rng, isa, dt, opts):
    pytest.importorskip("ml_dtypes")
    dtype = _dtypes()[dt]
    with _x64():
        z, y, kw = _case(rng, dtype, opts)
        l_np, g_np = fastxent.cross_entropy_with_grad(z, y, **kw)
        jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        f = jax.jit(jax.value_and_grad(lambda z: jnp.sum(fxj.cross_entropy(z, y, **jkw))))
        l_j, g_j = f(jnp.asarray(z))
        v_j = jax.jit(lambda z: fxj.cross_entropy(z, y, **jkw))(jnp.asarray(z))
    assert g_j.dtype == z.dtype and v_j.dtype == z.dtype
    assert np.asarray(g_j).tobytes() == np.asarray(g_np).tobytes()
    assert np.asarray(v_j).tobytes() == np.asarray(l_np).astype(z.dtype).tobytes()


def test_default_path_is_the_custom_call():
    z = jnp.ones((4, 3), jnp.bfloat16)
    y = jnp.array([0, 1, 2, 0])
    f = jax.jit(jax.value_and_grad(lambda z: fxj.cross_entropy(z, y)))
    hlo = f.lower(z).compile().as_text()
    assert "fastxent_ce_grad" in hlo and "callback" not in hlo.lower()
    # bfloat16 goes in and comes out as itself: no float32 copy of the logits or gradient.
    assert "f32[4,3]" not in hlo


def test_vmap_is_one_call(rng):
    zs = jnp.asarray(rng.standard_normal((3, 6, 4)).astype(np.float32))
    ys = jnp.asarray(rng.integers(0, 4, (3, 6)))
    for reduction in ("mean", "sum", "none"):
        f = jax.jit(
            jax.vmap(
                jax.value_and_grad(
                    lambda z, y, r=reduction: jnp.sum(fxj.cross_entropy(z, y, reduction=r))
                )
            )
        )
        hlo = f.lower(zs, ys).compile().as_text()
        assert hlo.count('custom_call_target="fastxent_ce_grad"') == 1 and " while(" not in hlo
        l1, g1 = f(zs, ys)
        for b in range(3):
            l2, g2 = fastxent.cross_entropy_with_grad(
                np.asarray(zs[b]), np.asarray(ys[b]), reduction=reduction
            )
            assert np.float32(l1[b]) == np.float32(np.sum(l2))
            assert np.array_equal(np.asarray(g1[b]), g2)
    # A shared (unbatched) target and weights under vmap of the logits only.
    w = jnp.asarray(rng.uniform(0.5, 2, 4).astype(np.float32))
    l1 = jax.vmap(lambda z: fxj.cross_entropy(z, ys[0], weight=w))(zs)
    for b in range(3):
        assert np.float32(l1[b]) == fastxent.cross_entropy(
            np.asarray(zs[b]), np.asarray(ys[0]), weight=np.asarray(w)
        )


def test_traced_label_smoothing_and_normalizer(rng):
    z = jnp.asarray(rng.standard_normal((8, 5)).astype(np.float32))
    y = jnp.asarray(np.where(rng.random(8) < 0.3, -100, rng.integers(0, 5, 8)))
    traces = []

    def loss(z, eps):
        traces.append(1)
        count = jnp.sum(y != -100).astype(jnp.float32)  # a normalizer computed in the graph
        return fxj.cross_entropy(z, y, label_smoothing=eps, normalizer=count)

    f = jax.jit(jax.value_and_grad(loss))
    for eps in (0.0, 0.25, 0.5):
        l1, g1 = f(z, jnp.float32(eps))
        n = float(np.sum(np.asarray(y) != -100))
        l2, g2 = fastxent.cross_entropy_with_grad(
            np.asarray(z), np.asarray(y), label_smoothing=eps, normalizer=n
        )
        assert np.float32(l1) == l2 and np.array_equal(np.asarray(g1), g2)
    assert len(traces) == 1
    with pytest.raises(Exception, match="label_smoothing must be in"):
        jax.block_until_ready(f(z, jnp.float32(1.5)))
    # Differentiable too, through the reference formula: d loss / d eps, checked against
    # differences of the kernel's loss (float32: a step of 1e-2 on a loss that is linear in
    # eps, so the difference is exact up to the loss's rounding, about 1e-6).
    d_eps = float(jax.grad(loss, argnums=1)(z, jnp.float32(0.1)))
    n = float(np.sum(np.asarray(y) != -100))
    lo, hi = (
        float(fastxent.cross_entropy(np.asarray(z), np.asarray(y), label_smoothing=e, normalizer=n))
        for e in (0.09, 0.11)
    )
    assert abs(d_eps - (hi - lo) / 0.02) <= 1e-4


def test_bad_label_error_first_line(rng):
    z = jnp.asarray(rng.standard_normal((2, 3, 4)).astype(np.float32))
    y = jnp.array([[0, 1, 2], [3, 9, 0]])
    with pytest.raises(Exception) as info:
        jax.block_until_ready(jax.jit(lambda z: fxj.cross_entropy(z, y))(z))
    first = str(info.value).splitlines()[0]
    assert "target[1, 1] = 9 is out of range" in first and "[0, 4)" in first


def test_two_threads_do_not_hang():
    """Two Python threads calling one jitted function (pure_callback hung here)."""
    script = textwrap.dedent("""
        import threading, numpy as np, jax, jax.numpy as jnp, fastxent.jax as fxj
        from fastxent import _jax_ffi
        assert _jax_ffi.enabled()
        z = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1000)), jnp.float32)
        y = jnp.arange(1024) % 1000
        f = jax.jit(jax.value_and_grad(lambda z: fxj.cross_entropy(z, y)))
        out = []
        def work():
            for _ in range(20):
                out.append(float(jax.block_until_ready(f(z))[0]))
        ts = [threading.Thread(target=work) for _ in range(2)]
        [t.start() for t in ts]; [t.join() for t in ts]
        assert len(out) == 40 and len(set(out)) == 1, out
        print("ok")
    """)
    run_ok(script)


def test_shard_map_and_named_sharding_on_two_host_devices():
    """Row-sharded logits on 2 forced host devices: under shard_map each shard's call computes
    its own rows (the user combines the sums with psum); under plain jit with NamedSharding
    inputs fastxent does that itself. The gradient keeps the logits' sharding either way."""
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import PartitionSpec as P, NamedSharding
        import fastxent, fastxent.jax as fxj
        mesh = jax.make_mesh((2,), ("d",))
        rng = np.random.default_rng(0)
        z = rng.standard_normal((8, 5)).astype(np.float32)
        y = rng.integers(0, 5, 8)
        l_ref, g_ref = fastxent.cross_entropy_with_grad(z, y)
        zs = jax.device_put(z, NamedSharding(mesh, P("d")))
        ys = jax.device_put(y, NamedSharding(mesh, P("d")))
        def local(z, y):
            return jax.lax.psum(fxj.cross_entropy(z, y, reduction="sum"), "d") / 8
        f = jax.jit(jax.value_and_grad(jax.shard_map(
            local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P())))
        l, g = f(zs, ys)
        assert abs(float(l) - l_ref) <= 1e-6 and np.abs(np.asarray(g) - g_ref).max() <= 1e-7
        assert g.sharding.spec == P("d", None), g.sharding
        hlo = f.lower(zs, ys).compile().as_text()
        assert "all-gather" not in hlo and hlo.count("fastxent_ce_grad") >= 1
        def inner(z, y):
            l, g = jax.value_and_grad(lambda z: fxj.cross_entropy(z, y, reduction="sum"))(z)
            return jax.lax.psum(l, "d") / 8, g / 8
        l, g = jax.jit(jax.shard_map(inner, mesh=mesh, in_specs=(P("d"), P("d")),
                                     out_specs=(P(), P("d"))))(zs, ys)
        assert abs(float(l) - l_ref) <= 1e-6 and np.abs(np.asarray(g) - g_ref).max() <= 1e-7
        # Plain jit on row-sharded inputs (explicit mesh axes): computed shard by shard, the
        # mean's denominator combined across shards, the gradient sharded like the logits.
        y = np.where(np.arange(8) == 3, -100, y)  # a new array (JAX may cache the old one's)
        ys = jax.device_put(y, NamedSharding(mesh, P("d")))
        w = rng.uniform(0.5, 2, 5).astype(np.float32)
        for red in ("mean", "sum", "none"):
            l_ref, g_ref = fastxent.cross_entropy_with_grad(z, y, weight=w, reduction=red)
            f = jax.jit(jax.value_and_grad(lambda z, y: jnp.sum(fxj.cross_entropy(
                z, y, weight=jnp.asarray(w), reduction=red))))
            l, g = f(zs, ys)
            assert abs(float(l) - float(np.sum(l_ref))) <= 1e-6 * abs(float(np.sum(l_ref))), (
                red, float(l), l_ref)
            assert np.abs(np.asarray(g) - g_ref).max() <= 1e-7, red
            assert g.sharding.spec == P("d", None), (red, g.sharding)
            assert "all-gather" not in f.lower(zs, ys).compile().as_text()
        rows = jax.jit(lambda z, y: fxj.cross_entropy(z, y, reduction="none"))(zs, ys)
        assert rows.sharding.spec == P("d"), rows.sharding
        # Eager calls (no jit) with a NumPy target: computed shard by shard as under jit
        # (before, resharding the target needed a mesh context); eager differentiation of
        # explicitly sharded arrays needs jax.set_mesh, as JAX's own ops do.
        l_ref = fastxent.cross_entropy(z, y)
        assert abs(float(fxj.cross_entropy(zs, y)) - l_ref) <= 1e-6 * abs(l_ref)
        rows = fxj.cross_entropy(zs, y, reduction="none")
        assert rows.sharding.spec == P("d"), rows.sharding
        # A uint8 target cannot hold ignore_index -100: class 156 (-100 wrapped) counts.
        zw = rng.standard_normal((8, 300)).astype(np.float32)
        t8 = np.array([156, 1, 2, 3, 200, 5, 6, 156], np.uint8)
        zws = jax.device_put(zw, NamedSharding(mesh, P("d")))
        l8 = jax.jit(lambda z: fxj.cross_entropy(z, t8))(zws)
        l_ref = fastxent.cross_entropy(zw, t8.astype(np.int64))
        assert abs(float(l8) - l_ref) <= 1e-6 * abs(l_ref), (float(l8), l_ref)
        with jax.set_mesh(mesh):
            l, g = jax.value_and_grad(lambda z: fxj.cross_entropy(z, y))(zs)
        _, g_ref = fastxent.cross_entropy_with_grad(z, y)
        assert np.abs(np.asarray(g) - g_ref).max() <= 1e-7 and g.sharding.spec == P("d", None)
        print("ok")
    """)
    run_ok(script)


def test_forward_mode_scan_and_checkpoint(rng):
    """custom_jvp: jax.jvp gives <grad, dz>, jacfwd equals jacrev (per-row losses), and the
    function composes with lax.scan and jax.checkpoint."""
    z = jnp.asarray(rng.standard_normal((6, 5)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 5, 6))
    dz = jnp.asarray(rng.standard_normal((6, 5)).astype(np.float32))
    f = functools.partial(fxj.cross_entropy, target=y, label_smoothing=0.1)
    _, g = fastxent.cross_entropy_with_grad(np.asarray(z), np.asarray(y), label_smoothing=0.1)
    _, tangent = jax.jit(lambda z, dz: jax.jvp(f, (z,), (dz,)))(z, dz)
    assert abs(float(tangent) - float(np.sum(g * np.asarray(dz)))) <= 1e-6
    rows = functools.partial(fxj.cross_entropy, target=y, reduction="none")
    assert np.array_equal(np.asarray(jax.jacfwd(rows)(z)), np.asarray(jax.jacrev(rows)(z)))

    def step(carry, zi):
        return carry + fxj.cross_entropy(zi, y), None

    zs = jnp.stack([z, 2 * z])
    g_scan = jax.grad(lambda zs: jax.lax.scan(step, 0.0, zs)[0])(zs)
    g_ckpt = jax.grad(jax.checkpoint(lambda z: fxj.cross_entropy(z, y)))(2 * z)
    _, g2 = fastxent.cross_entropy_with_grad(np.asarray(2 * z), np.asarray(y))
    assert np.array_equal(np.asarray(g_scan[1]), g2) and np.array_equal(np.asarray(g_ckpt), g2)


def test_gradient_takes_the_logits_buffer_and_never_corrupts_an_input(rng):
    """The gradient output aliases the logits operand (the kernel runs in place): where the
    logits are an intermediate (a head's matmul output) XLA needs no fresh N x C buffer for
    it; a jit parameter that is not donated is copied first and stays intact."""
    z = jnp.asarray(rng.standard_normal((8, 5)).astype(np.float32))
    z0 = np.array(z)
    y = jnp.asarray(rng.integers(0, 5, 8))
    head = jax.jit(jax.grad(lambda z: fxj.cross_entropy(z * 2.0, y)))
    call = [ln for ln in head.lower(z).compile().as_text().splitlines() if "fastxent_ce_grad" in ln]
    assert call and "output_to_operand_aliasing={{1}: (0, {})}" in call[0], call
    g = jax.jit(jax.grad(lambda z: fxj.cross_entropy(z, y)))(z)
    assert np.array_equal(np.asarray(z), z0)  # the parameter is untouched
    _, g_np = fastxent.cross_entropy_with_grad(z0, np.asarray(y))
    assert np.array_equal(np.asarray(g), g_np)
    assert np.array_equal(
        np.asarray(head(z)), 2 * fastxent.cross_entropy_with_grad(2 * z0, np.asarray(y))[1]
    )
    # Donated, the parameter's buffer itself may be reused.
    donated = jax.jit(jax.grad(lambda z: fxj.cross_entropy(z, y)), donate_argnums=0)
    assert np.array_equal(np.asarray(donated(jnp.asarray(z0))), g_np)


def test_zero_weight_at_minus_inf_under_daz(isa):
    """A probability target of 0 on a -inf logit counts 0 (0 * inf := 0) inside jax.jit too,
    where XLA's threads read denormals as zero (DAZ): the kernel's test was |u| < denorm_min,
    false for u = 0 under DAZ, and the loss came out NaN on the scalar and AVX2 builds."""
    z = np.array([[0.0, -np.inf, 1.0, 2.0, 0.5]] * 3, np.float32)
    q = np.array([[0.5, 0.0, 0.25, 0.25, 0.0]] * 3, np.float32)
    want = fastxent.cross_entropy(z, q)
    assert np.isfinite(want)
    got = jax.jit(fxj.cross_entropy)(jnp.asarray(z), jnp.asarray(q))
    assert float(got) == float(want)
    loss, g = jax.jit(jax.value_and_grad(fxj.cross_entropy))(jnp.asarray(z), jnp.asarray(q))
    _, g_np = fastxent.cross_entropy_with_grad(z, q)
    assert float(loss) == float(want)
    np.testing.assert_array_equal(np.asarray(g), g_np)
