"""Per-row outputs (outputs=) and the entropy bonus (entropy_coef) of the fused linear
cross-entropy (issue #23: "when the fused linear cross-entropy exists"), NumPy, PyTorch and
JAX: the statistics and the loss and gradients with the entropy term against the logits
API on the materialised logits; the loss and gradients with outputs bit for bit those
without; statistics not differentiable there (a clear error, never a silent zero)."""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from reference import assert_bitwise_equal

ALL = ("lse", "entropy", "argmax", "target_logprob", "accuracy")
FLOATS = ("lse", "entropy", "target_logprob")


def _case(rng, N=45, H=12, V=300, dtype=np.float64):
    h = rng.standard_normal((N, H)).astype(dtype)
    w = (0.4 * rng.standard_normal((V, H))).astype(dtype)
    b = rng.standard_normal(V).astype(dtype)
    y = rng.integers(0, V, N)
    y[[3, N - 1]] = -100
    # a few rows whose argmax is the target (accuracy neither 0 nor 1)
    y[:5] = np.argmax(h[:5] @ w.T + b, -1)
    y[3] = -100
    return h, w, b, y


def _check_stats(st, ref, tol):
    for n in FLOATS:
        got, want = getattr(st, n), getattr(ref, n)
        assert np.abs(np.asarray(got, np.float64) - want).max() <= tol * max(
            1.0, np.abs(want).max()
        )
    assert np.array_equal(np.asarray(st.argmax), ref.argmax)
    assert float(st.accuracy) == pytest.approx(ref.accuracy, abs=1e-7)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(entropy_coef=0.3, label_smoothing=0.1),
        dict(entropy_coef=0.5, reduction="none", sample_weight=True),
        dict(entropy_coef=0.2, reduction="sum", softcap=6.0, z_loss=1e-3),
    ],
    ids=["plain", "smooth", "none", "sum-softcap"],
)
def test_numpy_against_the_materialised_logits(rng, kw):
    h, w, b, y = _case(rng)
    kw = dict(kw)
    if kw.pop("sample_weight", False):
        kw["sample_weight"] = rng.uniform(0.5, 2, len(y))
    z = h @ w.T + b
    l_ref, g_ref, st_ref = fx.cross_entropy_with_grad(z, y, outputs=ALL, **kw)
    assert 0 < st_ref.accuracy < 1
    for tile in (7, 16, None):
        loss, gh, gw, gb, st = fx.linear_cross_entropy_with_grad(
            h, w, y, linear_bias=b, outputs=ALL, tile_rows=tile, **kw
        )
        # float64: the tiles' matmuls round like the whole one's to about 1e-15
        assert np.abs(np.asarray(loss) - l_ref).max() <= 1e-12 * max(1.0, np.abs(l_ref).max())
        assert np.abs(gh - g_ref @ w).max() <= 1e-12
        assert np.abs(gw - g_ref.T @ h).max() <= 1e-12
        assert np.abs(gb - g_ref.sum(0)).max() <= 1e-12
        _check_stats(st, st_ref, 1e-12)
        # The forward alone: the same statistics, the same loss bits as with gradients.
        l2, st2 = fx.linear_cross_entropy(h, w, y, linear_bias=b, outputs=ALL, tile_rows=tile, **kw)
        assert_bitwise_equal(l2, loss)
        for n in ("lse", "entropy", "argmax", "target_logprob"):
            assert_bitwise_equal(getattr(st2, n), getattr(st, n), n)
        assert st2.accuracy == st.accuracy
        # outputs= leaves the loss and gradients alone.
        if tile is not None:
            plain = fx.linear_cross_entropy_with_grad(h, w, y, linear_bias=b, tile_rows=tile, **kw)
            for a, c in zip(plain, (loss, gh, gw, gb)):
                assert_bitwise_equal(a, c)


def test_numpy_shapes_names_and_errors(rng):
    h, w, b, y = _case(rng, N=12, dtype=np.float32)
    h3, y3 = h.reshape(3, 4, -1), y.reshape(3, 4)
    loss, st = fx.linear_cross_entropy(h3, w, y3, outputs=("argmax", "lse"))
    assert st.lse.shape == (3, 4) and st.argmax.dtype == np.int64 and st.entropy is None
    assert st.lse.dtype == np.float32 and st.accuracy is None
    p = rng.random((12, w.shape[0])).astype(np.float32)
    p /= p.sum(-1, keepdims=True)
    with pytest.raises(ValueError, match="target_logprob"):
        fx.linear_cross_entropy(h, w, p, outputs=("target_logprob",))
    with pytest.raises(ValueError, match="unknown output"):
        fx.linear_cross_entropy(h, w, y, outputs=("logits",))
    with pytest.raises(ValueError, match="entropy_coef"):
        fx.linear_cross_entropy(h, w, y, entropy_coef=-0.1)
    gh = np.full(h.shape, 7.0, np.float32)
    with pytest.raises(ValueError, match="entropy_coef"):
        fx.linear_cross_entropy_with_grad(h, w, y, entropy_coef=float("nan"), out=(gh, None, None))
    assert np.all(gh == 7.0)
    # 16-bit inputs: float32 statistics.
    ml = pytest.importorskip("ml_dtypes")
    _, st = fx.linear_cross_entropy(
        h.astype(ml.bfloat16), w.astype(ml.bfloat16), y, outputs=("entropy",), entropy_coef=0.1
    )
    assert st.entropy.dtype == np.float32


def test_torch(rng):
    torch = pytest.importorskip("torch")
    import fastxent.torch as fxt

    h0, w0, b0, y0 = _case(rng)
    y = torch.from_numpy(y0)
    for red in ("mean", "none"):
        h, w, b = (torch.from_numpy(a).requires_grad_(True) for a in (h0, w0, b0))
        loss, st = fxt.linear_cross_entropy(
            h, w, y, linear_bias=b, outputs=ALL, entropy_coef=0.3, reduction=red, tile_rows=16
        )
        loss.sum().backward()
        zr = (h @ w.T + b).detach().requires_grad_(True)
        l_ref, st_ref = fxt.cross_entropy(zr, y, outputs=ALL, entropy_coef=0.3, reduction=red)
        l_ref.sum().backward()
        assert torch.allclose(loss, l_ref, rtol=1e-12, atol=1e-12)
        assert torch.allclose(h.grad, zr.grad @ w.detach(), atol=1e-12)
        assert torch.allclose(w.grad, zr.grad.T @ h.detach(), atol=1e-12)
        assert torch.allclose(b.grad, zr.grad.sum(0), atol=1e-12)
        for n in FLOATS:
            assert torch.allclose(getattr(st, n), getattr(st_ref, n), rtol=1e-12, atol=1e-12)
        assert torch.equal(st.argmax, st_ref.argmax) and st.accuracy == st_ref.accuracy
    # A statistic in the loss: its derivative is not computed here, and says so.
    h, w = (torch.from_numpy(a).requires_grad_(True) for a in (h0, w0))
    loss, st = fxt.linear_cross_entropy(h, w, y, outputs=("entropy", "argmax"))
    with pytest.raises(NotImplementedError, match="not differentiable here"):
        (loss + st.entropy.mean()).backward()
    # Logged only (detached use): the loss's backward runs.
    loss, st = fxt.linear_cross_entropy(h, w, y, outputs=("entropy",))
    loss.backward()
    assert h.grad is not None and float(st.entropy.detach().mean()) > 0
    with torch.no_grad():
        loss2, st2 = fxt.linear_cross_entropy(h, w, y, outputs=("entropy",))
    assert not loss2.requires_grad and torch.equal(st2.entropy, st.entropy.detach())
    # The module, and an entropy_coef tensor that would need a derivative.
    crit = fxt.LinearCrossEntropyLoss(12, 300, outputs=("lse",), entropy_coef=0.1)
    loss, st = crit(torch.randn(5, 12), torch.randint(0, 300, (5,)))
    assert st.lse.shape == (5,)
    with pytest.raises(RuntimeError, match="entropy_coef"):
        fxt.linear_cross_entropy(h, w, y, entropy_coef=torch.tensor(0.1, requires_grad=True))


def test_jax(rng):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import fastxent.jax as fxj

    h, w, b, y = (a.astype(np.float32) if a.dtype.kind == "f" else a for a in _case(rng))
    for red in ("mean", "none"):
        kw = dict(outputs=ALL, entropy_coef=0.3, reduction=red, tile_rows=16)
        l_np, gh, gw, gb, st_np = fx.linear_cross_entropy_with_grad(h, w, y, linear_bias=b, **kw)

        def f(h, w, b, kw=kw):
            loss, st = fxj.linear_cross_entropy(h, w, jnp.asarray(y), linear_bias=b, **kw)
            return jnp.sum(loss), st

        (loss, st), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(h, w, b)
        # jnp.dot against NumPy's matmul: float32 rounding of the logits (about 1e-6)
        assert abs(float(loss) - float(np.sum(l_np))) <= 1e-5 * abs(float(np.sum(l_np)))
        for a, c in zip(g, (gh, gw, gb)):
            assert np.abs(np.asarray(a) - c).max() <= 1e-5
        _check_stats(st, st_np, 2e-6)
        assert st.argmax.dtype == jnp.int32
    with pytest.raises(NotImplementedError, match="not differentiable here"):
        jax.grad(lambda h: fxj.linear_cross_entropy(h, w, y, outputs=("lse",))[1].lse.sum())(h)
    # outputs=() and a list of names, as NumPy's.
    for red in ("none", "mean"):
        loss, st = fxj.linear_cross_entropy(h, w, y, reduction=red, outputs=())
        assert st == fx.RowStats()
        assert_bitwise_equal(loss, fxj.linear_cross_entropy(h, w, y, reduction=red))
    _, st = fxj.linear_cross_entropy(h, w, y, outputs=["lse"])
    assert st.lse.shape == y.shape
    # A uint8 target cannot hold ignore_index -100: nothing is ignored, and class 156 (which
    # -100 wraps to as a uint8) counts in the "mean" denominator.
    t8 = np.array([156, 1, 2, 3, 200], np.uint8)
    l8 = fxj.linear_cross_entropy(h[:5], w, t8)
    l64 = fx.linear_cross_entropy(h[:5], w, t8.astype(np.int64))
    assert float(l8) == pytest.approx(float(l64), rel=1e-5)
    with pytest.raises(ValueError, match="entropy_coef"):
        fxj.linear_cross_entropy(h, w, y, entropy_coef=-1.0)
