"""fastxent.jax.linear_kl_div / linear_jsd: distillation from hidden states and head weights in
row tiles, under jit and jax.value_and_grad with respect to the student's hidden states, weight
and bias, against the NumPy fastxent.linear_kl_div_with_grad / linear_jsd_with_grad and a
float64 jax.numpy reference that materialises the logits; both kernel paths (the XLA custom
call and the pure_callback fallback), vmap, the refusals (teacher and sample_weight
derivatives, forward mode, second order) and the NumPy version's argument errors.

Tolerances: float64 against the NumPy version and the reference, rtol 1e-12 / atol 1e-13 (as
tests/test_distill_linear.py). float32 against the float64 reference (test_float32): the loss
is a float32 sum of tiles of float32 matmul logits; measured worst over those cases 2.9e-7
(loss, loss_error) and 4.6e-7 (gradients, grad_error); bounds 2e-6 / 1e-5.

The pure_callback fallback is tested in float32 only: under the jax.enable_x64 context manager
a callback that XLA runs on another of its threads sees x64 off, and JAX's own wrapper then
turns the float64 operands and result into float32 (a JaxRuntimeError, depending on which
thread runs it: it made test_vmap[fallback] fail 1 run in 3 here).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastxent as fx  # noqa: E402
import fastxent.jax as fxj  # noqa: E402
from fastxent import _jax_ffi  # noqa: E402
from reference import grad_error, loss_error  # noqa: E402
from test_distill_linear import (  # noqa: E402
    HALF_CASES,
    HALF_TOL,
    HS,
    N,
    V,
    _inputs,
    half_inputs,
    half_kw,
    reference_up,
    rel_error,
)

TILE = 4  # N is not a multiple of it: two full tiles and a remainder

needs_ffi = pytest.mark.skipif(
    not _jax_ffi.enabled(), reason="the XLA FFI path is off (not built, or FASTXENT_JAX_FFI=0)"
)

VARIANTS = [
    ({"direction": "forward"}, False),
    ({"direction": "reverse", "temperature": 2.0}, False),
    ({"beta": 0.5}, True),
    ({"beta": 0.2, "temperature": 0.7}, True),
    ({"beta": 0.0}, True),
    ({"beta": 1.0}, True),
]
VAR_IDS = ["fwd", "rev,T2", "jsd0.5", "jsd0.2,T0.7", "jsd0", "jsd1"]
REDUCTIONS = ("mean", "sum", "none")
ROWS = ["plain", "labels", "mask,sw"]


def _x64():
    return (
        jax.enable_x64(True)
        if hasattr(jax, "enable_x64")
        else __import__("jax.experimental", fromlist=["enable_x64"]).enable_x64()
    )


def _row_kw(rows, lead=(N,), seed=1):
    """Row keywords (NumPy arrays) and the row weights they mean (float64)."""
    r = np.random.default_rng(seed)
    w = np.ones(lead)
    kw = {}
    if rows == "labels":
        lab = r.integers(0, V, lead)
        lab[r.random(lead) < 0.3] = 7
        kw.update(labels=lab, ignore_index=7)
        w = w * (lab != 7)
    if rows == "mask,sw":
        m = r.random(lead) > 0.3
        sw = r.uniform(0.0, 2.0, lead)
        kw.update(mask=m, sample_weight=sw)
        w = w * m * sw
    return kw, w


def _jfn(jsd):
    return fxj.linear_jsd if jsd else fxj.linear_kl_div


def _numpy(args, jsd, **kw):
    hs, ws, ht, wt, bs, bt = args
    fn = fx.linear_jsd_with_grad if jsd else fx.linear_kl_div_with_grad
    return fn(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, **kw)


def jax_reference(hs, ws, bs, ht, wt, bt, opts, jsd, reduction, r):
    """The loss in jax.numpy ops on materialised logits (float64 under x64)."""
    T = opts.get("temperature", 1.0)
    zs = hs @ ws.T + (0 if bs is None else bs)
    zt = ht @ wt.T + (0 if bt is None else bt)
    ls, lt = jax.nn.log_softmax(zs / T), jax.nn.log_softmax(zt / T)
    p, q = jnp.exp(ls), jnp.exp(lt)
    kind = opts.get("direction", "jsd")
    beta = opts.get("beta")
    if kind == "forward" or beta == 0.0:
        D = jnp.sum(q * (lt - ls), -1)
    elif kind == "reverse" or beta == 1.0:
        D = jnp.sum(p * (ls - lt), -1)
    else:
        lm = jnp.log(beta * q + (1 - beta) * p)
        D = beta * jnp.sum(q * (lt - lm), -1) + (1 - beta) * jnp.sum(p * (ls - lm), -1)
    rows = jnp.asarray(r) * T * T * D
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / jnp.sum(jnp.asarray(r))


def _value_and_grads(args, jsd, jit=True, **kw):
    """loss (as returned) and the gradients of sum(loss) with respect to (hs, ws[, bs])."""
    hs, ws, ht, wt, bs, bt = (None if a is None else jnp.asarray(a) for a in args)

    def g(hs, ws, bs):
        out = _jfn(jsd)(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, **kw)
        return jnp.sum(out), out

    vg = jax.value_and_grad(g, argnums=(0, 1, 2) if bs is not None else (0, 1), has_aux=True)
    if jit:
        vg = jax.jit(vg)
    (_, loss), grads = vg(hs, ws, bs)
    return (loss,) + tuple(grads) + ((None,) if bs is None else ())


def _reference_all(args, opts, jsd, reduction, r):
    """(loss, grad_hs, grad_ws, grad_bs) of sum(loss), float64 NumPy."""
    with _x64():
        a = [None if x is None else jnp.asarray(x, jnp.float64) for x in args]
        hs, ws, ht, wt, bs, bt = a

        def f(hs, ws, bs):
            return jax_reference(hs, ws, bs, ht, wt, bt, opts, jsd, reduction, r)

        loss = f(hs, ws, bs)
        g = jax.grad(lambda *x: jnp.sum(f(*x)), argnums=(0, 1, 2))(hs, ws, bs)
        return (np.asarray(loss),) + tuple(None if x is None else np.asarray(x) for x in g)


def _close(got, want, rtol=1e-12, atol=1e-13):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if b is not None:
            np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("var", VARIANTS, ids=VAR_IDS)
def test_float64_matches_numpy_and_reference(var, reduction, rows):
    opts, jsd = var
    bias = rows != "labels"  # with and without biases
    args = _inputs(bias=bias)
    rkw, r = _row_kw(rows)
    kw = dict(opts, reduction=reduction, **rkw)
    with _x64():
        got = _value_and_grads(args, jsd, tile_rows=TILE, **kw)
        assert got[0].dtype == jnp.float64
    _close(got, _numpy(args, jsd, **kw))
    _close(got, _reference_all(args, opts, jsd, reduction, r))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("var", VARIANTS[:4], ids=VAR_IDS[:4])
def test_float32(var, reduction):
    opts, jsd = var
    args = _inputs(np.float32)
    rkw, r = _row_kw("mask,sw")
    kw = dict(opts, reduction=reduction, **rkw)
    got = _value_and_grads(args, jsd, tile_rows=TILE, **kw)
    assert got[0].dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in got[1:])
    ref = _reference_all(args, opts, jsd, reduction, r)
    assert loss_error(got[0], ref[0]) < 2e-6
    for g, gr in zip(got[1:], ref[1:]):
        assert grad_error(g, gr) < 1e-5
    # the NumPy version on the same float32 inputs (its own float32 matmuls)
    _close(got, _numpy(args, jsd, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile", [1, 3, TILE, N, None])
def test_tile_sizes_and_eager(tile):
    """Every tile size (one row, a remainder, exactly N, the default) gives the same loss and
    gradients, eager or jitted."""
    args = _inputs()
    kw = dict(direction="reverse", temperature=1.5, reduction="mean")
    with _x64():
        want = _numpy(args, False, **kw)
        for jit in (False, True):
            _close(_value_and_grads(args, False, jit=jit, tile_rows=tile, **kw), want)


def test_leading_axes_and_per_row_cotangent():
    """(2, 5, H) hidden states; "none" under jax.vjp with an arbitrary (negative, zero) per-row
    cotangent: each row's gradient scaled by it."""
    lead = (2, 5)
    args = _inputs(lead=lead)
    rkw, r = _row_kw("labels", lead=lead)
    ct = np.random.default_rng(3).normal(size=lead)
    ct[0, 1] = 0.0
    with _x64():
        a = [None if x is None else jnp.asarray(x) for x in args]
        hs, ws, ht, wt, bs, bt = a

        def f(hs, ws, bs):
            return fxj.linear_jsd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt,
                                  beta=0.3, reduction="none", tile_rows=3, **rkw)  # fmt: skip

        def ref(hs, ws, bs):
            return jax_reference(hs, ws, bs, ht, wt, bt, {"beta": 0.3}, True, "none", r)

        out, vjp = jax.vjp(jax.jit(f), hs, ws, bs)
        ref_out, ref_vjp = jax.vjp(ref, hs, ws, bs)
        assert out.shape == lead
        _close((out,) + vjp(jnp.asarray(ct)), (ref_out,) + ref_vjp(jnp.asarray(ct)))


def test_partial_gradients():
    """Differentiating with respect to one student input only (the others constants)."""
    args = _inputs()
    hs, ws, ht, wt, bs, bt = args
    want = _numpy(args, False)
    with _x64():
        for i in range(3):

            def f(x, i=i):
                a = [hs, ws, bs]
                a[i] = x
                return fxj.linear_kl_div(a[0], a[1], ht, wt, student_bias=a[2],
                                         teacher_bias=bt, tile_rows=TILE)  # fmt: skip

            loss, g = jax.jit(jax.value_and_grad(f))(jnp.asarray([hs, ws, bs][i]))
            _close((loss, g), (want[0], want[1 + i]))
        # evaluated without differentiation: the loss alone
        assert float(fxj.linear_kl_div(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt)) == (
            pytest.approx(float(want[0]), rel=1e-12)
        )


def test_empty_mean_and_no_rows():
    """ "mean" over no counted row is 0 with zero gradients; N = 0 rows."""
    args = _inputs()
    with _x64():
        got = _value_and_grads(args, True, mask=np.zeros(N, bool), tile_rows=TILE)
        assert float(got[0]) == 0.0 and all(not np.asarray(g).any() for g in got[1:])
        empty = _inputs(lead=(0,))
        got = _value_and_grads(empty, False)
        assert float(got[0]) == 0.0 and got[1].shape == (0, HS) and not np.asarray(got[2]).any()
        none = fxj.linear_kl_div(*empty[:4], reduction="none")
        assert none.shape == (0,)


def test_mean_with_huge_float32_weights():
    """float32 row weights whose sum overflows float32 (six times 1e38): "mean" is still the
    weighted mean, as NumPy's (it was a silent 0 loss with zero gradients: the sum was inf),
    under jit too; a non-finite or negative weight still raises when the call runs."""
    hs, ws, ht, wt, bs, bt = (None if a is None else a.astype(np.float32) for a in _inputs())
    sw = np.full(N, 1e38, np.float32)
    sw[1] = 3e37
    want = fx.linear_kl_div(hs, ws, ht, wt, sample_weight=sw)
    same = fx.linear_kl_div(hs, ws, ht, wt, sample_weight=sw / np.float32(1e38))
    np.testing.assert_allclose(want, same, rtol=1e-6)

    def f(hs, sw):
        return fxj.linear_kl_div(hs, ws, ht, wt, sample_weight=sw)

    got, g = jax.jit(jax.value_and_grad(f))(hs, sw)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    _, gh = fx.linear_kl_div_with_grad(hs, ws, ht, wt, sample_weight=sw)[:2]
    np.testing.assert_allclose(g, gh, rtol=1e-4, atol=1e-7)
    assert np.abs(np.asarray(g)).max() > 0
    for bad in (np.inf, np.nan, -1.0):
        sw2 = sw.copy()
        sw2[2] = bad
        with pytest.raises(Exception, match="row weights must be finite and >= 0"):
            jax.jit(f)(hs, sw2).block_until_ready()


def test_zero_width_hidden():
    """A hidden size of 0 (the student's logits are its bias): as NumPy's, not
    ZeroDivisionError from reshape(-1, 0)."""
    hs, ws, ht, wt, bs, bt = _inputs()
    hs0, ws0 = np.zeros((N, 0)), np.zeros((V, 0))
    with _x64():
        want = fx.linear_kl_div_with_grad(hs0, ws0, ht, wt, student_bias=bs, teacher_bias=bt)
        got = fxj.linear_kl_div(hs0, ws0, ht, wt, student_bias=bs, teacher_bias=bt)
        gb = jax.grad(
            lambda b: fxj.linear_kl_div(hs0, ws0, ht, wt, student_bias=b, teacher_bias=bt)
        )(bs)
    np.testing.assert_allclose(got, want[0], rtol=1e-12)
    np.testing.assert_allclose(gb, want[-1], rtol=1e-12, atol=1e-15)


@needs_ffi
def test_hlo_custom_call_and_no_n_by_v_array():
    """Under jit the kernel is the distillation custom call, and no array of the (N, V)
    logits' shape appears in the compiled computation."""
    n = 40
    hs, ws, ht, wt, bs, bt = (jnp.asarray(a) for a in _inputs(np.float32, lead=(n,)))

    def f(hs, ws, bs):
        return fxj.linear_kl_div(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, tile_rows=8)

    hlo = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(hs, ws, bs).compile().as_text()
    assert "fastxent_distill_grad" in hlo
    assert f"f32[{n},{V}]" not in hlo and f"f32[5,8,{V}]" not in hlo


def test_fallback_pure_callback(monkeypatch):
    """Without the FFI the tiles run through pure_callback (no custom call in the HLO); the
    same results."""
    monkeypatch.setattr(_jax_ffi, "_state", False)
    args = _inputs(np.float32)
    rkw, _ = _row_kw("mask,sw")
    ht, wt = jnp.asarray(args[2]), jnp.asarray(args[3])
    hlo = (
        jax.jit(lambda h, w: fxj.linear_jsd(h, w, ht, wt, tile_rows=TILE))
        .lower(jnp.asarray(args[0]), jnp.asarray(args[1]))
        .as_text()
    )
    assert "fastxent_distill" not in hlo
    for reduction in REDUCTIONS:
        kw = dict(beta=0.3, reduction=reduction, tile_rows=TILE, **rkw)
        got = _value_and_grads(args, True, **kw)
        _close(got, _numpy(args, True, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ffi", [True, False], ids=["ffi", "fallback"])
def test_vmap(ffi, monkeypatch):
    """Under jax.vmap each batch element is its own problem (its own "mean" denominator)."""
    if not ffi:
        monkeypatch.setattr(_jax_ffi, "_state", False)
    elif not _jax_ffi.enabled():
        pytest.skip("the XLA FFI path is off")
    # float64 through the FFI, float32 through the fallback (see the module docstring)
    dt = np.float64 if ffi else np.float32
    args = _inputs(dt, lead=(3, 4))
    rkw, _ = _row_kw("mask,sw", lead=(3, 4))
    tol = dict(rtol=1e-12, atol=1e-13) if ffi else dict(rtol=1e-5, atol=1e-6)
    with _x64() if ffi else contextlib.nullcontext():
        hs, ws, ht, wt, bs, bt = (jnp.asarray(a) for a in args)

        def f(h, t, m, sw):
            return fxj.linear_kl_div(h, ws, t, wt, student_bias=bs, teacher_bias=bt,
                                     mask=m, sample_weight=sw, tile_rows=3)  # fmt: skip

        m, sw = jnp.asarray(rkw["mask"]), jnp.asarray(rkw["sample_weight"], dt)
        loss, gh = jax.jit(jax.vmap(jax.value_and_grad(f)))(hs, ht, m, sw)
        assert loss.dtype == dt
        for i in range(3):
            want = _numpy((args[0][i], args[1], args[2][i], args[3], args[4], args[5]), False,
                          mask=rkw["mask"][i], sample_weight=rkw["sample_weight"][i])  # fmt: skip
            _close((loss[i], gh[i]), want[:2], **tol)


@pytest.mark.parametrize("ffi", [True, False], ids=["ffi", "fallback"])
def test_refusals(ffi, monkeypatch):
    """Never a silent zero: teacher inputs and sample_weight cannot be differentiated, forward
    mode and second order raise."""
    if not ffi:
        monkeypatch.setattr(_jax_ffi, "_state", False)
    elif not _jax_ffi.enabled():
        pytest.skip("the XLA FFI path is off")
    hs, ws, ht, wt, bs, bt = (jnp.asarray(a) for a in _inputs(np.float32))
    sw = jnp.ones((N,), jnp.float32)

    def f(hs, ws, bs, ht, wt, bt, sw, reduction="mean"):
        out = fxj.linear_jsd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt,
                             sample_weight=sw, reduction=reduction, tile_rows=TILE)  # fmt: skip
        return jnp.sum(out)

    args = (hs, ws, bs, ht, wt, bt, sw)
    for i, name in ((3, "teacher_hidden"), (4, "teacher_weight"), (5, "teacher_bias")):
        for g in (jax.grad(f, argnums=i), jax.jit(jax.grad(f, argnums=(0, i)))):
            with pytest.raises(TypeError, match=f"{name} is being differentiated.*frozen"):
                g(*args)
    with pytest.raises(TypeError, match="sample_weight is being differentiated"):
        jax.grad(f, argnums=6)(*args)
    # a teacher under stop_gradient is fine
    jax.grad(lambda h, t: f(h, ws, bs, jax.lax.stop_gradient(t), wt, bt, sw))(hs, ht)
    with pytest.raises(TypeError, match="forward-mode|jvp"):
        jax.jvp(lambda h: f(h, *args[1:]), (hs,), (hs,))
    for red in ("mean", "none"):
        with pytest.raises(TypeError, match="first-order.*second and higher order"):
            jax.hessian(lambda h, red=red: f(h, *args[1:], reduction=red))(hs)
        with pytest.raises(TypeError, match="second and higher order"):
            jax.grad(lambda w: jnp.sum(jax.grad(f)(hs, w, *args[2:]) ** 2))(ws)


def _bad_cases():
    hs, ws, ht, wt, bs, bt = (jnp.asarray(a) for a in _inputs())
    f32 = jnp.float32
    return [
        ((hs.astype(f32), ws, ht, wt, bs, bt), {}, TypeError, "dtype"),
        ((hs, ws, ht.astype(f32), wt, bs, bt), {}, TypeError, "teacher_hidden"),
        ((hs, ws, ht, wt, bs, bt.astype(f32)), {}, TypeError, "teacher_bias"),
        ((hs.astype(jnp.int32), ws, ht, wt, bs, bt), {}, TypeError, "float16 or bfloat16"),
        ((hs.astype(jnp.bfloat16), ws, ht, wt, bs, bt), {}, TypeError, "student_weight has"),
        ((hs.astype(jnp.float16), ws, ht, wt, bs, bt), {}, TypeError, "student_weight has"),
        ((hs[:-1], ws, ht, wt, bs, bt), {}, ValueError, "leading shapes"),
        ((hs, ws[:-1], ht, wt, bs[:-1], bt), {}, ValueError, "vocabulary"),
        ((hs, ws[:, :-1], ht, wt, bs, bt), {}, ValueError, "student_weight"),
        ((hs, ws, ht, wt[:, :-1], bs, bt), {}, ValueError, "teacher_weight"),
        ((hs, ws, ht, wt, bs[:-1], bt), {}, ValueError, "student_bias"),
        ((hs, ws[:0], ht, wt[:0], None, None), {}, ValueError, "V = 0"),
        ((hs[0, 0], ws, ht, wt, bs, bt), {}, ValueError, "at least one dimension"),
        ((hs, None, ht, wt, bs, bt), {}, TypeError, "student_weight is required"),
        ((hs, ws, ht, wt, bs, bt), {"direction": "both"}, ValueError, "direction"),
        ((hs, ws, ht, wt, bs, bt), {"temperature": 0.0}, ValueError, "temperature"),
        ((hs, ws, ht, wt, bs, bt), {"temperature": 1e3}, ValueError, "temperature"),
        ((hs, ws, ht, wt, bs, bt), {"temperature": "2"}, TypeError, "temperature"),
        ((hs, ws, ht, wt, bs, bt), {"reduction": "avg"}, ValueError, "reduction"),
        ((hs, ws, ht, wt, bs, bt), {"mask": jnp.ones(N - 1, bool)}, ValueError, "mask"),
        ((hs, ws, ht, wt, bs, bt), {"labels": jnp.ones(N)}, TypeError, "labels"),
        ((hs, ws, ht, wt, bs, bt), {"mask": jnp.ones(N, int)}, TypeError, "mask"),
        ((hs, ws, ht, wt, bs, bt), {"sample_weight": jnp.ones((N, 1))}, ValueError, "sample_w"),
        ((hs, ws, ht, wt, bs, bt), {"tile_rows": 0}, ValueError, "tile_rows"),
        ((hs, ws, ht, wt, bs, bt), {"num_threads": 1.5}, TypeError, "num_threads"),
    ]


@pytest.mark.parametrize("case", range(25))
def test_errors(case):
    """The NumPy version's errors, raised at trace time."""
    with _x64():
        args, kw, exc, msg = _bad_cases()[case]
        hs, ws, ht, wt, bs, bt = args
        with pytest.raises(exc, match=msg):
            fxj.linear_kl_div(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, **kw)
        floating = jnp.issubdtype(hs.dtype, jnp.floating)
        if ws is not None and floating and hs.ndim and ws.ndim == 2 and hs.shape[-1] == ws.shape[1]:
            with pytest.raises(exc, match=msg):  # the same under jit and grad
                jax.jit(jax.grad(lambda h: fxj.linear_kl_div(
                    h, ws, ht, wt, student_bias=bs, teacher_bias=bt, **kw)))(hs)  # fmt: skip
        np_args = tuple(None if a is None else np.asarray(a) for a in args)
        np_kw = {k: np.asarray(v) if isinstance(v, jax.Array) else v for k, v in kw.items()}
        with pytest.raises(exc, match=msg):  # the NumPy version raises the same
            fx.linear_kl_div(*np_args[:4], student_bias=np_args[4], teacher_bias=np_args[5],
                             **np_kw)  # fmt: skip


def test_option_errors():
    hs, ws, ht, wt = (jnp.asarray(a) for a in _inputs(np.float32)[:4])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            fxj.linear_jsd(hs, ws, ht, wt, beta=bad)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda h, b: fxj.linear_jsd(h, ws, ht, wt, beta=b))(hs, 0.5)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda h, T: fxj.linear_kl_div(h, ws, ht, wt, temperature=T))(hs, 2.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fxj.linear_kl_div(hs, ws, ht, wt, beta=0.5)
    if _jax_ffi.enabled():
        # A negative traced sample weight is caught by the kernel when the call runs.
        with pytest.raises(Exception, match="row weights must be finite and >= 0"):
            jax.jit(lambda w: fxj.linear_kl_div(hs, ws, ht, wt, sample_weight=w))(
                -jnp.ones((N,), jnp.float32)
            ).block_until_ready()


def test_exported_and_documented():
    for name in ("linear_kl_div", "linear_jsd"):
        f = getattr(fxj, name)
        assert name in fxj.__all__
        doc = f.__doc__
        assert "row tiles" in doc and "frozen" in doc and "jit-compatible" in doc
        assert "fastxent.jax.kl_div_with_logits" in doc and "16-bit" in doc


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("jsd, reduction", HALF_CASES)
def test_jax_16bit(dtype, jsd, reduction):
    """float16 / bfloat16 arrays under jit(value_and_grad) (float32 logits tiles and kernel,
    G rounded once): the loss and gradients in the input dtype, against the float64 result
    of the same rounded inputs, with per-row cotangents for "none"."""
    dt = getattr(jnp, dtype)
    hs, ws, ht, wt, bs, bt = (
        None if x is None else jnp.asarray(x.astype(np.float32)).astype(dt)
        for x in half_inputs(reduction)
    )
    kw = half_kw(jsd, reduction)
    up = np.linspace(-1.0, 2.0, N) if reduction == "none" else 1.7
    fn = fxj.linear_jsd if jsd else fxj.linear_kl_div

    def f(h, w, b):
        loss = fn(h, w, ht, wt, student_bias=b, teacher_bias=bt, tile_rows=TILE, **kw)
        return jnp.sum(loss.astype(jnp.float32) * jnp.asarray(up, jnp.float32)), loss

    (_, loss), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(hs, ws, bs)
    grads = tuple(g for g in grads if g is not None)
    assert loss.dtype == dt and all(g.dtype == dt for g in grads)
    args = [
        None if x is None else np.asarray(x.astype(jnp.float32), np.float64)
        for x in (hs, ws, ht, wt, bs, bt)
    ]
    want = [w for w in reference_up(args, jsd, up, **kw) if w is not None]
    assert len(want) == len(grads) + 1
    for got, w in zip((loss,) + tuple(grads), want):
        assert rel_error(np.asarray(got.astype(jnp.float32)), w) <= HALF_TOL["jax", dtype]
