"""Per-row outputs (outputs=) and the entropy bonus (entropy_coef) of the fused linear
cross-entropy (issue #23: "when the fused linear cross-entropy exists"), NumPy, PyTorch and
JAX: the statistics and the loss and gradients with the entropy term against the logits
API on the materialised logits; the loss and gradients with outputs bit for bit those
without; the float statistics differentiable as on the logits: in PyTorch (finite differences
too), and in JAX."""

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
    # Logged only (detached use): the loss's backward runs.
    h, w = (torch.from_numpy(a).requires_grad_(True) for a in (h0, w0))
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


# Upstream gradients on the loss and the float statistics, in every combination that
# matters: each statistic alone, all of them with and without the loss's.
_STAT_GRADS = [
    ("loss", "lse", "entropy", "target_logprob"),
    ("lse", "entropy", "target_logprob"),
    ("entropy",),
    ("loss", "target_logprob"),
    ("lse",),
]


def _stat_case(rng, kw, ups, dtype):
    """(hidden, weight, bias, target (class indices or probabilities), the statistics to
    ask for, the outputs with upstream gradients, those gradients, the keywords with NumPy
    arrays) of N=23, H=6, V=40 for the statistics' derivative tests."""
    kw = dict(kw)
    h0, w0, b0, y0 = (a.astype(dtype) if a.dtype.kind == "f" else a for a in _case(rng, 23, 6, 40))
    if kw.pop("weight", False):
        kw["weight"] = rng.uniform(0.5, 2, 40).astype(dtype)
    if kw.pop("sample_weight", False):
        kw["sample_weight"] = rng.uniform(0.5, 2, 23).astype(dtype)
    names = FLOATS
    if kw.pop("probs", False):
        p = rng.random((23, 40))
        y0 = (p / p.sum(1, keepdims=True)).astype(dtype)
        ups = tuple(n for n in ups if n != "target_logprob") or ("lse",)
        names = ("lse", "entropy")
    rows = 23 if kw.get("reduction") == "none" else ()
    up = {n: rng.standard_normal(rows if n == "loss" else 23).astype(dtype) for n in ups}
    return h0, w0, b0, y0, names, ups, up, kw


def _weighted_sum(torch, loss, st, names, ups):
    """sum over `names` of <ups[name], output> (the loss of "none" row by row)."""
    total = 0
    for n in names:
        out = loss if n == "loss" else getattr(st, n)
        total = total + (out.double() * ups[n].reshape(out.shape)).sum()
    return total


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(reduction="none", softcap=6.0),
        dict(reduction="sum", logit_scale=0.7, label_smoothing=0.1, weight=True),
        dict(reduction="mean", entropy_coef=0.3, z_loss=1e-3, sample_weight=True),
        dict(reduction="none", entropy_coef=0.2, sample_weight=True, softcap=4.0),
        dict(reduction="mean", probs=True),
    ],
    ids=[
        "mean",
        "none-softcap",
        "sum-scale-smooth-weight",
        "mean-ec-zloss-sw",
        "none-ec-sw",
        "probs",
    ],
)
@pytest.mark.parametrize("ups", _STAT_GRADS, ids=lambda u: "+".join(u))
def test_torch_statistics_differentiable(rng, monkeypatch, kw, ups):
    """Gradients through lse, entropy and target_logprob (and the loss) of the fused linear
    function, float64, equal those through fastxent.torch.cross_entropy(outputs=...) on the
    materialised logits (their reference formula), with tiles of 7 rows and blocks of 3 rows
    inside a tile (the statistics' product is computed in blocks) and with the default plan;
    with respect to hidden, weight and bias, or a subset of them."""
    torch = pytest.importorskip("torch")
    from fastxent import _linear

    import fastxent.torch as fxt

    h0, w0, b0, y0, names, ups, up0, kw = _stat_case(rng, kw, ups, np.float64)
    kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    y = torch.from_numpy(y0)
    up = {n: torch.from_numpy(np.asarray(u)) for n, u in up0.items()}

    zr0 = torch.from_numpy(h0 @ w0.T + b0)
    zr = zr0.clone().requires_grad_(True)
    l_ref, st_ref = fxt.cross_entropy(zr, y, outputs=names, **kw)
    _weighted_sum(torch, l_ref, st_ref, ups, up).backward()
    gz = zr.grad
    want = {"h": gz @ torch.from_numpy(w0), "w": gz.T @ torch.from_numpy(h0), "b": gz.sum(0)}
    for block, tile, which in (
        (3 * 40, 7, "hwb"),
        (_linear.STAT_BLOCK, None, "hwb"),
        (3 * 40, 7, "w"),
    ):
        monkeypatch.setattr(_linear, "STAT_BLOCK", block)
        ts = {
            k: torch.from_numpy(a.copy()).requires_grad_(k in which)
            for k, a in zip("hwb", (h0, w0, b0))
        }
        loss, st = fxt.linear_cross_entropy(
            ts["h"], ts["w"], y, linear_bias=ts["b"], outputs=names, tile_rows=tile, **kw
        )
        _weighted_sum(torch, loss, st, ups, up).backward()
        for k in "hwb":
            if k not in which:
                assert ts[k].grad is None
                continue
            # float64: tiled matmuls and sums round differently from the whole ones (~1e-15)
            assert torch.allclose(ts[k].grad, want[k], rtol=1e-11, atol=1e-11), (k, block, tile)


def test_torch_statistics_gradcheck(rng):
    """Finite differences (torch.autograd.gradcheck, float64) of the loss and every float
    statistic of the fused linear function with respect to hidden, weight and bias: with
    the entropy term, label smoothing and a softcap, "none" and "mean"; gradcheck also
    backpropagates through each output alone (the others' gradients absent)."""
    torch = pytest.importorskip("torch")
    import fastxent.torch as fxt

    h0, w0, b0, y0 = _case(rng, N=6, H=4, V=9)
    y = torch.from_numpy(y0)
    for kw in (
        dict(reduction="none", softcap=3.0, entropy_coef=0.2),
        dict(reduction="mean", label_smoothing=0.1, logit_scale=1.3),
    ):

        def f(h, w, b, kw=kw):
            loss, st = fxt.linear_cross_entropy(
                h, w, y, linear_bias=b, outputs=FLOATS + ("argmax",), tile_rows=4, **kw
            )
            return loss, st.lse, st.entropy, st.target_logprob

        args = tuple(torch.from_numpy(a.copy()).requires_grad_(True) for a in (h0, w0, b0))
        assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_statistics_differentiable_lower_precision(rng, dtype, reduction):
    """16-bit and float32 inputs: the statistics' gradients (with the loss's) against the
    float64 ones of the same (rounded) inputs, every reduction ("mean" / "sum": the
    statistics' sweep adds into the forward's gradients). Errors measured (max error over
    the largest entry, this case, 8 seeds, worst reduction): float32 1.3e-6, float16 1.2e-3,
    bfloat16 8.2e-3; the loss's gradient alone ("none"): 7.8e-7, 1.0e-3, 6.5e-3 (the 16-bit
    logits tiles and gradient round to the 16-bit dtype). Asserted with about 3x margin."""
    torch = pytest.importorskip("torch")
    import fastxent.torch as fxt

    dt = getattr(torch, dtype)
    h0, w0, b0, y0 = _case(rng)
    h0, w0, b0 = (torch.from_numpy(a).to(dt).double().numpy() for a in (h0, w0, b0))
    y = torch.from_numpy(y0)
    ups = {n: torch.from_numpy(rng.standard_normal(45)) for n in ("loss",) + FLOATS}
    if reduction != "none":  # ("mean" / "sum": the loss's gradients from the forward, then
        ups["loss"] = ups["loss"][:1]  # the statistics' sweep adding into them)
    grads = {}
    for cast in (dt, torch.float64):
        ts = [torch.from_numpy(a).to(cast).requires_grad_(True) for a in (h0, w0, b0)]
        loss, st = fxt.linear_cross_entropy(
            ts[0], ts[1], y, linear_bias=ts[2], outputs=FLOATS, reduction=reduction, tile_rows=16
        )
        assert st.lse.dtype == (torch.float64 if cast == torch.float64 else torch.float32)
        _weighted_sum(torch, loss, st, ("loss",) + FLOATS, ups).backward()
        grads[cast] = [t.grad.double() for t in ts]
        assert all(t.grad.dtype == cast for t in ts)
    tol = {"float32": 4e-6, "float16": 4e-3, "bfloat16": 2.5e-2}[dtype]
    for g, r in zip(grads[dt], grads[torch.float64]):
        assert ((g - r).abs().max() / r.abs().max()).item() <= tol


def test_torch_statistics_retained_graph_and_errors(rng):
    """A retained graph backpropagates twice with the same result (the second recomputes the
    tiles); create_graph=True through a statistic raises as through the loss."""
    torch = pytest.importorskip("torch")
    import fastxent.torch as fxt

    h0, w0, b0, y0 = _case(rng)
    y = torch.from_numpy(y0)
    h = torch.from_numpy(h0).requires_grad_(True)
    w = torch.from_numpy(w0)
    loss, st = fxt.linear_cross_entropy(h, w, y, outputs=("entropy", "lse"), tile_rows=16)
    total = 2 * loss + st.entropy.sum() - 0.5 * st.lse.mean()
    (g1,) = torch.autograd.grad(total, h, retain_graph=True)
    (g2,) = torch.autograd.grad(total, h)
    assert torch.equal(g1, g2)
    zr = torch.from_numpy(h0 @ w0.T).requires_grad_(True)
    l_ref, st_ref = fxt.cross_entropy(zr, y, outputs=("entropy", "lse"))
    (2 * l_ref + st_ref.entropy.sum() - 0.5 * st_ref.lse.mean()).backward()
    assert torch.allclose(g1, zr.grad @ w, rtol=1e-11, atol=1e-11)
    loss, st = fxt.linear_cross_entropy(h, w, y, outputs=("entropy",))
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(st.entropy.sum(), h, create_graph=True)


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


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(reduction="none", softcap=6.0, entropy_coef=0.2),
        dict(reduction="sum", logit_scale=0.7, label_smoothing=0.1, sample_weight=True),
        dict(reduction="mean", probs=True),
    ],
    ids=["mean", "none-softcap-ec", "sum-scale-smooth-sw", "probs"],
)
@pytest.mark.parametrize("ups", _STAT_GRADS, ids=lambda u: "+".join(u))
def test_jax_statistics_differentiable(rng, monkeypatch, kw, ups):
    """jax.grad through lse, entropy and target_logprob (and the loss) of
    fastxent.jax.linear_cross_entropy under jit equals jax.grad through
    fastxent.jax.cross_entropy(outputs=...) on the same float32 logits (jnp.dot), with
    respect to hidden, weight and bias; tiles of 7 rows. float32 (the fused function's
    kernel runs in a host callback, which does not see a jax.enable_x64 context): measured
    worst error over the largest gradient entry 8.3e-7 (these cases, 4 seeds); bound 3e-6.
    The statistics' product in blocks of 3 rows (two per tile, then a remainder)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import fastxent.jax as fxj
    from fastxent import _linear

    monkeypatch.setattr(_linear, "STAT_BLOCK", 3 * 40)

    h0, w0, b0, y0, names, ups, up0, kw = _stat_case(rng, kw, ups, np.float32)
    y = jnp.asarray(y0)
    up = {n: jnp.asarray(u) for n, u in up0.items()}

    def total(loss, st):
        return sum(jnp.sum((loss if n == "loss" else getattr(st, n)) * up[n]) for n in ups)

    def fused(h, w, b):
        return total(
            *fxj.linear_cross_entropy(
                h, w, y, linear_bias=b, outputs=names + ("argmax",), tile_rows=7, **kw
            )
        )

    def on_logits(h, w, b):
        return total(*fxj.cross_entropy(jnp.dot(h, w.T) + b, y, outputs=names, **kw))

    got = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(h0, w0, b0)
    want = jax.grad(on_logits, argnums=(0, 1, 2))(h0, w0, b0)
    for a, c in zip(got, want):
        c = np.asarray(c, np.float64)
        assert np.abs(np.asarray(a, np.float64) - c).max() <= 3e-6 * np.abs(c).max()
    # with respect to the weight alone
    (gw,) = jax.grad(fused, argnums=(1,))(h0, w0, b0)
    assert np.abs(np.asarray(gw) - np.asarray(want[1])).max() <= 3e-6 * np.abs(want[1]).max()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_jax_statistics_differentiable_bfloat16(rng, reduction):
    """bfloat16 inputs: the statistics' gradients (with the loss's) against the float32
    ones of the same rounded inputs, every reduction; measured worst error over the largest
    entry (8 seeds, worst reduction) 7.3e-3, the loss's gradient alone ("none") 6.5e-3 (the
    bfloat16 gradient tile and matmuls); bound 2.5e-2."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import fastxent.jax as fxj

    h0, w0, b0, y0 = (a.astype(jnp.bfloat16) if a.dtype.kind == "f" else a for a in _case(rng))
    ups = {n: jnp.asarray(rng.standard_normal(45), jnp.float32) for n in ("loss",) + FLOATS}
    if reduction != "none":
        ups["loss"] = ups["loss"][0]
    grads = {}
    for dt in (jnp.bfloat16, jnp.float32):

        def f(h, w, b):
            loss, st = fxj.linear_cross_entropy(
                h,
                w,
                jnp.asarray(y0),
                linear_bias=b,
                outputs=FLOATS,
                reduction=reduction,
                tile_rows=16,
            )
            assert st.lse.dtype == jnp.float32
            return sum(
                jnp.sum((loss if n == "loss" else getattr(st, n)).astype(jnp.float32) * u)
                for n, u in ups.items()
            )

        args = tuple(jnp.asarray(a).astype(dt) for a in (h0, w0, b0))
        grads[dt] = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args)
        assert all(g.dtype == dt for g in grads[dt])
    for g, r in zip(grads[jnp.bfloat16], grads[jnp.float32]):
        r = np.asarray(r, np.float64)
        assert np.abs(np.asarray(g, np.float64) - r).max() <= 2.5e-2 * np.abs(r).max()
