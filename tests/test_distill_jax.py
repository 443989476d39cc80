"""fastxent.jax.kl_div_with_logits / jsd_with_logits: values and gradients (student and
teacher) against a float64 JAX-ops reference (jax.nn.log_softmax) and optax, bitwise equality
with the NumPy API, the custom call in the compiled HLO, forward mode and second order, the
pure_callback fallback, vmap, buffer aliasing and the error paths.

Tolerances (loss_error / grad_error of tests/reference.py, the gradient error relative to
the largest entry), from the measured worst cases over every test here that calls _check
(logits of scale 3, T in {0.7, 1, 1.7, 2.5}):
* float32: loss 2.3e-7, gradient 8.0e-6 (the teacher's gradient q (log q - log p - KL) is a
  difference of terms larger than its largest entry, log-ratios of up to |s - t| / T, each
  with a float32 rounding error: test_distill.py measures 1.6e-7 relative to those terms, not
  to the entry). Bounds 2e-6 / 3e-5.
* float64: loss 2.4e-15, gradient 5.4e-15. Bounds 3e-14 / 5e-14.
* bfloat16 logits (the reference on the same bfloat16 values in float64): the loss is float32,
  1.8e-7; the gradients are rounded once to bfloat16, whose half ulp is up to 2**-8 = 3.9e-3
  of an entry: 3.1e-3 measured. Bounds 2e-6 / 5e-3.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastxent  # noqa: E402
import fastxent.jax as fxj  # noqa: E402
from fastxent import _jax_ffi  # noqa: E402
from reference import check_weight_derivative, grad_error, loss_error  # noqa: E402

needs_ffi = pytest.mark.skipif(
    not _jax_ffi.enabled(), reason="the XLA FFI path is off (not built, or FASTXENT_JAX_FFI=0)"
)

KINDS = [("forward", None), ("reverse", None), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]
KIND_IDS = ["fwd", "rev", "jsd0", "jsd0.3", "jsd1"]
REDUCTIONS = ("mean", "sum", "none")
OPTION_SETS = [
    dict(),
    dict(temperature=2.5, labels=True),
    dict(temperature=0.7, mask=True, sample_weight=True),
    dict(shape=(3, 4, 9), labels=True, sample_weight=True, ignore_index=3),
]
OPT_IDS = ["plain", "T2.5,labels", "T0.7,mask,sw", "3d,labels,sw"]

TOL = {  # (loss, gradient): see the module docstring
    "float32": (2e-6, 3e-5),
    "float64": (3e-14, 5e-14),
    "bfloat16": (2e-6, 5e-3),
}


def _x64():
    return (
        jax.enable_x64(True)
        if hasattr(jax, "enable_x64")
        else __import__("jax.experimental", fromlist=["enable_x64"]).enable_x64()
    )


def _bf16():
    return np.dtype(jnp.bfloat16)


def _case(rng, dtype, opts):
    """(student, teacher, keyword arguments with NumPy arrays, row weights float64)."""
    opts = dict(opts)
    shape = opts.pop("shape", (7, 11))
    rows = shape[:-1]
    s = (3 * rng.standard_normal(shape)).astype(np.float32).astype(dtype)
    t = (3 * rng.standard_normal(shape)).astype(np.float32).astype(dtype)
    kw = {k: v for k, v in opts.items() if k in ("temperature", "ignore_index")}
    r = np.ones(rows)
    if opts.get("labels"):
        ii = opts.get("ignore_index", -100)
        lab = rng.integers(0, shape[-1], rows)
        lab = np.where(rng.random(rows) < 0.3, ii, lab)
        kw["labels"] = lab
        r = r * (lab != ii)
    if opts.get("mask"):
        m = rng.random(rows) > 0.3
        kw["mask"] = m
        r = r * m
    if opts.get("sample_weight"):
        sw = rng.uniform(0.0, 2.0, rows).astype(np.float32)
        kw["sample_weight"] = sw
        r = r * sw.astype(np.float64)
    return s, t, kw, r


def jax_reference(s, t, kind, beta, T, reduction, r):
    """The loss in float64 jax.numpy ops (run under x64): jax.nn.log_softmax based."""
    s = jnp.asarray(s, jnp.float64)
    t = jnp.asarray(t, jnp.float64)
    ls, lt = jax.nn.log_softmax(s / T), jax.nn.log_softmax(t / T)
    p, q = jnp.exp(ls), jnp.exp(lt)
    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse"
    if kind == "forward":
        D = jnp.sum(q * (lt - ls), -1)
    elif kind == "reverse":
        D = jnp.sum(p * (ls - lt), -1)
    else:
        lm = jnp.log(beta * q + (1 - beta) * p)
        D = beta * jnp.sum(q * (lt - lm), -1) + (1 - beta) * jnp.sum(p * (ls - lm), -1)
    rows = jnp.asarray(r, jnp.float64) * T * T * D
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / jnp.sum(jnp.asarray(r, jnp.float64))


def _reference_all(s, t, kind, beta, T, reduction, r):
    """(loss, d sum(loss) / d student, d sum(loss) / d teacher), float64 NumPy."""
    with _x64():
        f = lambda a, b: jnp.sum(jax_reference(a, b, kind, beta, T, reduction, r))  # noqa: E731
        s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
        loss = jax_reference(s64, t64, kind, beta, T, reduction, r)
        gs, gt = jax.grad(f, argnums=(0, 1))(s64, t64)
        return np.asarray(loss), np.asarray(gs), np.asarray(gt)


def _fn(kind, beta, kw):
    def f(s, t):
        if kind == "jsd":
            return fxj.jsd_with_logits(s, t, beta=beta, **kw)
        return fxj.kl_div_with_logits(s, t, direction=kind, **kw)

    return f


def _value_and_grads(f, s, t, jit):
    """loss (as returned), and the gradients of sum(loss) with respect to student and teacher,
    with the loss from the same value_and_grad call."""

    def g(s, t):
        out = f(s, t)
        return jnp.sum(out), out

    vg = jax.value_and_grad(g, argnums=(0, 1), has_aux=True)
    if jit:
        vg = jax.jit(vg)
    (_, loss), (gs, gt) = vg(jnp.asarray(s), jnp.asarray(t))
    return loss, gs, gt


def _check(loss, gs, gt, ref, dtname, reduction, shape):
    lt, gtol = TOL[dtname]
    rows = shape[:-1]
    assert loss.shape == (rows if reduction == "none" else ())
    assert gs.shape == shape and gt.shape == shape
    assert loss_error(loss, ref[0]) < lt
    assert grad_error(gs, ref[1]) < gtol
    assert grad_error(gt, ref[2]) < gtol


@pytest.mark.parametrize("opts", OPTION_SETS, ids=OPT_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kb", KINDS, ids=KIND_IDS)
def test_matches_reference_float32_jit(rng, kb, reduction, opts):
    kind, beta = kb
    s, t, kw, r = _case(rng, np.float32, opts)
    kw = dict(kw, reduction=reduction)
    loss, gs, gt = _value_and_grads(_fn(kind, beta, kw), s, t, jit=True)
    assert loss.dtype == jnp.float32 and gs.dtype == jnp.float32 and gt.dtype == jnp.float32
    T = kw.get("temperature", 1.0)
    ref = _reference_all(s, t, kind, beta, T, reduction, r)
    _check(loss, gs, gt, ref, "float32", reduction, s.shape)
    # The loss alone (the forward-only custom call) gives the same value.
    v = jax.jit(_fn(kind, beta, kw))(jnp.asarray(s), jnp.asarray(t))
    assert np.array_equal(np.asarray(v), np.asarray(loss))


@pytest.mark.parametrize("dtname", ["float64", "bfloat16", "float32"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kb", KINDS, ids=KIND_IDS)
def test_matches_reference_dtypes_eager(rng, kb, reduction, dtname):
    """Eager (no jit) value_and_grad, float64 (x64, float64 row weights), bfloat16."""
    kind, beta = kb
    dtype = {"float64": np.float64, "float32": np.float32, "bfloat16": _bf16()}[dtname]
    opts = OPTION_SETS[(len(reduction) + KINDS.index(kb)) % len(OPTION_SETS)]
    s, t, kw, r = _case(rng, dtype, opts)
    kw = dict(kw, reduction=reduction)
    if dtname == "float64":
        with _x64():
            loss, gs, gt = _value_and_grads(_fn(kind, beta, kw), s, t, jit=False)
    else:
        loss, gs, gt = _value_and_grads(_fn(kind, beta, kw), s, t, jit=False)
    want = np.float64 if dtname == "float64" else np.float32
    assert loss.dtype == want and gs.dtype == dtype and gt.dtype == dtype
    T = kw.get("temperature", 1.0)
    ref = _reference_all(s, t, kind, beta, T, reduction, r)
    _check(loss, gs, gt, ref, dtname, reduction, s.shape)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_matches_optax(rng, direction, reduction):
    optax = pytest.importorskip("optax")
    kl = getattr(getattr(optax, "losses", optax), "kl_divergence_with_log_targets", None)
    if kl is None:
        pytest.skip("this optax has no kl_divergence_with_log_targets")
    s, t, kw, r = _case(rng, np.float32, dict(shape=(2, 5, 13), mask=True))
    T = 1.7
    m = jnp.asarray(kw["mask"])

    def ref(s, t):
        ls, lt = jax.nn.log_softmax(s / T), jax.nn.log_softmax(t / T)
        rows = kl(ls, lt) if direction == "forward" else kl(lt, ls)
        rows = jnp.where(m, rows * T * T, 0.0)
        if reduction == "none":
            return rows
        return rows.sum() if reduction == "sum" else rows.sum() / m.sum()

    f = _fn(direction, None, dict(kw, temperature=T, reduction=reduction))
    got = _value_and_grads(f, s, t, jit=True)
    with _x64():
        want = _value_and_grads(ref, s.astype(np.float64), t.astype(np.float64), jit=True)
    _check(*got, [np.asarray(w) for w in want], "float32", reduction, s.shape)


@pytest.mark.parametrize("kb", [KINDS[0], KINDS[1], KINDS[3]], ids=["fwd", "rev", "jsd0.3"])
def test_bitwise_equal_to_numpy_api(rng, isa, kb):
    kind, beta = kb
    for dtype in (np.float32, np.float16, _bf16()):
        s, t, kw, _ = _case(rng, dtype, OPTION_SETS[3])
        kw = dict(kw, reduction="mean", temperature=1.3)
        if kind == "jsd":
            l_np, gs_np, gt_np = fastxent.jsd_with_logits_with_grad(
                s, t, beta=beta, teacher_grad=True, **kw
            )
        else:
            l_np, gs_np, gt_np = fastxent.kl_div_with_logits_with_grad(
                s, t, direction=kind, teacher_grad=True, **kw
            )
        jkw = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        f = _fn(kind, beta, jkw)
        l_j, g_s, g_t = _value_and_grads(f, s, t, jit=True)
        assert np.asarray(l_j).tobytes() == np.asarray(l_np).tobytes()
        assert np.asarray(g_s).tobytes() == gs_np.tobytes()
        assert np.asarray(g_t).tobytes() == gt_np.tobytes()


@needs_ffi
def test_jit_is_one_custom_call():
    s = jnp.ones((4, 6), jnp.float32)
    t = jnp.zeros((4, 6), jnp.float32)
    both = jax.jit(jax.value_and_grad(lambda s, t: fxj.jsd_with_logits(s, t), argnums=(0, 1)))
    hlo = both.lower(s, t).compile().as_text()
    assert hlo.count('custom_call_target="fastxent_distill_grad"') == 1
    assert 'custom_call_target="fastxent_distill"' not in hlo and "callback" not in hlo.lower()
    # Student only: the teacher's gradient is not computed (a 0-element result).
    stu = jax.jit(jax.value_and_grad(lambda s, t: fxj.kl_div_with_logits(s, t)))
    call = [ln for ln in stu.lower(s, t).compile().as_text().splitlines() if "distill_grad" in ln]
    assert len(call) == 1 and "f32[0]" in call[0]
    loss_only = jax.jit(lambda s, t: fxj.kl_div_with_logits(s, t, reduction="none"))
    hlo = loss_only.lower(s, t).compile().as_text()
    assert 'custom_call_target="fastxent_distill"' in hlo and "distill_grad" not in hlo
    # bfloat16 goes in and its gradients come out as themselves: no float32 copy of the logits.
    sb, tb = s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
    hlo = both.lower(sb, tb).compile().as_text()
    assert "fastxent_distill_grad" in hlo and "f32[4,6]" not in hlo


@needs_ffi
@pytest.mark.parametrize("kb", [KINDS[0], KINDS[1], KINDS[3]], ids=["fwd", "rev", "jsd0.3"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_order_and_forward_mode(rng, kb, reduction):
    """Forward mode from the kernel's gradients; second order (the Hessian, with respect to
    student and teacher) and the derivative with respect to sample_weight through the
    jax.numpy reference: against the float64 JAX reference's own derivatives."""
    kind, beta = kb
    with _x64():
        s, t, kw, _ = _case(rng, np.float64, dict(shape=(3, 5), sample_weight=True))
        sw = jnp.asarray(kw.pop("sample_weight"), jnp.float64)
        T = 1.4

        def f(s, t, sw):
            return jnp.sum(
                _fn(kind, beta, dict(temperature=T, reduction=reduction, sample_weight=sw))(s, t)
            )

        def ref(s, t, sw):
            return jnp.sum(jax_reference(s, t, kind, beta, T, reduction, sw))

        s, t = jnp.asarray(s), jnp.asarray(t)
        ds, dt = (
            jnp.asarray(rng.standard_normal(s.shape)),
            jnp.asarray(rng.standard_normal(s.shape)),
        )
        dw = jnp.asarray(rng.standard_normal(sw.shape))
        # Measured over these 9 cases: value 6.7e-16, tangent 8.9e-16, Hessian 2.5e-15 (relative
        # to its largest entry), d/d sample_weight 9.8e-16; bounds about 10x.
        v1, j1 = jax.jvp(f, (s, t, sw), (ds, dt, dw))
        v2, j2 = jax.jvp(ref, (s, t, sw), (ds, dt, dw))
        assert abs(float(v1 - v2)) < 1e-14 * max(1.0, abs(float(v2)))
        assert abs(float(j1 - j2)) < 1e-14 * max(1.0, abs(float(j2)))
        h1 = jax.jit(jax.hessian(f, argnums=(0, 1)))(s, t, sw)
        h2 = jax.hessian(ref, argnums=(0, 1))(s, t, sw)
        for a in range(2):
            for b in range(2):
                assert grad_error(h1[a][b], h2[a][b]) < 3e-14, (a, b)
        g1 = jax.grad(f, argnums=2)(s, t, sw)
        g2 = jax.grad(ref, argnums=2)(s, t, sw)
        assert grad_error(g1, g2) < 1e-14


@needs_ffi
@needs_ffi
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("kb", KINDS, ids=KIND_IDS)
def test_sample_weight_derivative_at_zero(rng, kb, reduction):
    """d / d sample_weight at a weight of exactly 0 is the row's loss (the reference blanked
    the row: 0 for "sum", -L/den for "mean"), against finite differences; a masked row beside
    it 0. A weight-0 row whose divergence is infinite (reverse KL, a teacher logit -inf): the
    loss and the logits' gradient finite, that weight's derivative inf (not 0)."""
    kind, beta = kb
    N, C = 5, 6
    s, t = rng.standard_normal((N, C)) * 2, rng.standard_normal((N, C)) * 2
    sw = np.array([1.0, 0.0, 1.0, 1.0, 0.5])
    mask = np.array([True, True, True, False, True])
    with _x64():

        def f(s, t, w):
            return _fn(kind, beta, dict(reduction=reduction, mask=mask, sample_weight=w))(s, t)

        g = np.asarray(jax.grad(lambda w: f(s, t, w))(jnp.asarray(sw)))
        check_weight_derivative(lambda w: f(s, t, w), g, sw)
        assert g[1] != 0 and g[3] == 0
        if kind == "reverse":
            t[1, 2] = -np.inf
            loss, (gs, gw) = jax.value_and_grad(lambda s, w: f(s, t, w), argnums=(0, 1))(
                jnp.asarray(s), jnp.asarray(sw)
            )
            assert np.isfinite(loss) and np.all(np.isfinite(gs))
            assert np.isposinf(gw[1]) and np.all(np.isfinite(np.delete(np.asarray(gw), 1)))


def test_vmap_is_one_call(rng):
    s = jnp.asarray(rng.standard_normal((3, 5, 7)).astype(np.float32))
    t = jnp.asarray(rng.standard_normal((3, 5, 7)).astype(np.float32))
    m = jnp.asarray(rng.random((3, 5)) > 0.3)
    for reduction in REDUCTIONS:
        vg = jax.value_and_grad(
            lambda s, t, m, r=reduction: jnp.sum(fxj.jsd_with_logits(s, t, mask=m, reduction=r)),
            argnums=(0, 1),
        )
        f = jax.jit(jax.vmap(vg))
        hlo = f.lower(s, t, m).compile().as_text()
        assert hlo.count('custom_call_target="fastxent_distill_grad"') == 1 and " while(" not in hlo
        l1, (gs1, gt1) = f(s, t, m)
        for b in range(3):
            l2, gs2, gt2 = fastxent.jsd_with_logits_with_grad(
                np.asarray(s[b]),
                np.asarray(t[b]),
                mask=np.asarray(m[b]),
                reduction=reduction,
                teacher_grad=True,
            )
            assert np.float32(l1[b]) == np.float32(np.sum(l2))
            assert np.array_equal(np.asarray(gs1[b]), gs2)
            assert np.array_equal(np.asarray(gt1[b]), gt2)


def test_per_row_cotangent_and_empty_mean(rng):
    s, t, kw, r = _case(rng, np.float32, dict())
    c = jnp.asarray(rng.standard_normal(s.shape[0]).astype(np.float32))
    f = jax.jit(
        jax.grad(
            lambda s, t: jnp.sum(c * fxj.kl_div_with_logits(s, t, reduction="none")), argnums=(0, 1)
        )
    )
    gs, gt = f(jnp.asarray(s), jnp.asarray(t))
    with _x64():
        ref = jax.grad(
            lambda s, t: jnp.sum(
                np.asarray(c, np.float64) * jax_reference(s, t, "forward", None, 1.0, "none", r)
            ),
            argnums=(0, 1),
        )(s.astype(np.float64), t.astype(np.float64))
    tol = TOL["float32"][1]  # the float32 gradient bound (module docstring)
    assert grad_error(gs, ref[0]) < tol and grad_error(gt, ref[1]) < tol
    # "mean" over no counted row: 0, with zero gradients (as the NumPy API).
    m = jnp.zeros(s.shape[0], bool)
    (v, (gs, gt)) = jax.jit(
        jax.value_and_grad(lambda s, t: fxj.jsd_with_logits(s, t, mask=m), argnums=(0, 1))
    )(jnp.asarray(s), jnp.asarray(t))
    assert float(v) == 0.0 and not np.any(np.asarray(gs)) and not np.any(np.asarray(gt))


@needs_ffi
def test_aliasing_never_corrupts_an_input(rng):
    """The gradients may take the logits' buffers: an intermediate's (a head's matmul), and the
    same array passed as student and teacher, still give the right values, inputs untouched."""
    h = jnp.asarray(rng.standard_normal((6, 4)).astype(np.float32))
    W1 = jnp.asarray(rng.standard_normal((4, 9)).astype(np.float32))
    W2 = jnp.asarray(rng.standard_normal((4, 9)).astype(np.float32))
    h0 = np.asarray(h).copy()

    def loss(W1, W2, f):
        return f(h @ W1, h @ W2, reduction="sum")

    for f in (fxj.kl_div_with_logits, fxj.jsd_with_logits):
        g = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(W1, W2, f)
        with _x64():

            def ref(W1, W2, kind="forward" if f is fxj.kl_div_with_logits else "jsd"):
                return jax_reference(h0 @ W1, h0 @ W2, kind, 0.5, 1.0, "sum", 1.0)

            gr = jax.grad(ref, argnums=(0, 1))(
                np.asarray(W1, np.float64), np.asarray(W2, np.float64)
            )
        tol = TOL["float32"][1]  # the float32 gradient bound (module docstring)
        assert grad_error(g[0], gr[0]) < tol and grad_error(g[1], gr[1]) < tol
    assert np.array_equal(np.asarray(h), h0)
    # The same buffer as both: the loss and both gradients are 0.
    x = jnp.asarray(rng.standard_normal((5, 8)).astype(np.float32))
    x0 = np.asarray(x).copy()
    v, (gs, gt) = jax.jit(
        jax.value_and_grad(lambda a, b: fxj.kl_div_with_logits(a, b), argnums=(0, 1))
    )(x, x)
    assert abs(float(v)) < 1e-6 and np.abs(np.asarray(gs)).max() < 1e-6
    assert np.abs(np.asarray(gt)).max() < 1e-6 and np.array_equal(np.asarray(x), x0)


def test_fallback_pure_callback(rng, monkeypatch):
    """Without the FFI: the NumPy API through pure_callback, first-order reverse mode in both
    logits; forward mode and second order raise instead of returning wrong numbers."""
    monkeypatch.setattr(_jax_ffi, "_state", False)
    s, t, kw, r = _case(rng, np.float32, OPTION_SETS[2])
    for reduction in REDUCTIONS:
        k = dict(kw, reduction=reduction)
        f = _fn("jsd", 0.3, k)
        got = _value_and_grads(f, s, t, jit=True)
        hlo = jax.jit(f).lower(jnp.asarray(s), jnp.asarray(t)).as_text()
        assert "fastxent_distill" not in hlo
        ref = _reference_all(s, t, "jsd", 0.3, k["temperature"], reduction, r)
        _check(*got, ref, "float32", reduction, s.shape)
    f = _fn("forward", None, {})
    S, T_ = jnp.asarray(s), jnp.asarray(t)
    with pytest.raises(TypeError, match="forward-mode|jvp"):
        jax.jvp(f, (S, T_), (S, T_))
    with pytest.raises(Exception, match="(?i)jvp|differentiat|pure_callback"):
        jax.hessian(f)(S, T_)


def test_errors(rng):
    s = jnp.zeros((3, 4), jnp.float32)
    t = jnp.zeros((3, 4), jnp.float32)
    kl, jsd = fxj.kl_div_with_logits, fxj.jsd_with_logits
    with pytest.raises(ValueError, match="shape"):
        kl(s, jnp.zeros((3, 5)))
    with pytest.raises(TypeError, match="dtype"):
        kl(s, t.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="float32"):
        kl(jnp.zeros((3, 4), jnp.int32), jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="one dimension"):
        kl(jnp.float32(1), jnp.float32(1))
    with pytest.raises(ValueError, match="no classes"):
        kl(jnp.zeros((3, 0)), jnp.zeros((3, 0)))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            kl(s, t, temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        kl(s, t, temperature="2")
    for bad in (1e-31, 1e31):
        with pytest.raises(ValueError, match=r"temperature must be in \[1e-30, 100\]"):
            jsd(s, t, temperature=bad)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda s, t, T: kl(s, t, temperature=T))(s, t, 2.0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            jsd(s, t, beta=bad)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda s, t, b: jsd(s, t, beta=b))(s, t, 0.5)
    with pytest.raises(ValueError, match="direction"):
        kl(s, t, direction="sideways")
    with pytest.raises(ValueError, match="reduction"):
        kl(s, t, reduction="batchmean")
    with pytest.raises(TypeError, match="unexpected keyword"):
        kl(s, t, beta=0.5)
    with pytest.raises(ValueError, match="labels has shape"):
        kl(s, t, labels=jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="labels must be integers"):
        kl(s, t, labels=jnp.zeros((3,)))
    with pytest.raises(TypeError, match="mask must be boolean"):
        kl(s, t, mask=jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="sample_weight has shape"):
        kl(s, t, sample_weight=jnp.ones((3, 1)))
    with pytest.raises(TypeError, match="num_threads"):
        kl(s, t, num_threads=1.5)
    # beyond the handlers' C int: refused (2**32 + 1 used to wrap to 1 thread, 2**40 to 0,
    # OpenMP's default, silently)
    for nt in (2**31, 2**32 + 1, 2**40):
        with pytest.raises(ValueError, match="num_threads must be at most 2147483647"):
            kl(s, t, num_threads=nt)
    if _jax_ffi.enabled():
        # A negative (traced) sample weight is caught by the kernel when the call runs.
        with pytest.raises(Exception, match="row weights must be finite and >= 0"):
            jax.jit(lambda w: kl(s, t, sample_weight=w))(
                jnp.array([1.0, -1.0, 1.0])
            ).block_until_ready()
