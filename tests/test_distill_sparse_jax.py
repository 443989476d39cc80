"""fastxent.jax.kl_div_with_topk_teacher / jsd_with_topk_teacher: loss and student gradient
against the NumPy API and a float64 jax.numpy reference (its own dense teacher, jax.grad),
both residual rules, every divergence, temperature, reductions and row weights, tiles, dtypes,
jit / eager / vmap, the XLA FFI path and the pure_callback fallback, derivatives (forward
mode, second order, sample_weight, the refusals), and every error path: static ones at trace
time, the teacher's values when the call runs (JaxRuntimeError) or right away for concrete
arrays, with the NumPy API's messages.

Tolerances (loss_error / grad_error of tests/reference.py), measured over the 48 FFI cases of
test_matches_numpy_and_reference (tiles of 4 rows, T = 2.5):
* against the NumPy API (the same kernel on the same tiles; the loss differs by the rows'
  losses rounded to the loss dtype, the gradient by the "mean" weights' division in the
  weights' dtype): float32 loss 1.1e-7, gradient 1.4e-7, bounds 1e-6 / 1e-6; float64
  2.1e-16 / 2.8e-16, bounds 3e-15 / 3e-15.
* against the float64 jax.numpy reference: float32 6.4e-7 / 7.1e-7 (the NumPy API's own
  errors there, the same), bounds 2e-6 / 7e-6; float64 1.9e-15 / 4.5e-15, bounds 3e-14 /
  5e-14 (test_distill_jax.py's).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fastxent as fx  # noqa: E402
import fastxent.jax as fxj  # noqa: E402
from fastxent import _distill_sparse, _jax_ffi  # noqa: E402
from reference import check_weight_derivative, grad_error, loss_error  # noqa: E402
from test_distill_sparse import _errors, teacher  # noqa: E402

needs_ffi = pytest.mark.skipif(
    not _jax_ffi.enabled(), reason="the XLA FFI path is off (not built, or FASTXENT_JAX_FFI=0)"
)

KINDS = [("forward", None), ("reverse", None), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 1.0)]
CASES = [
    (r, kind, beta)
    for r in ("renormalize", "uniform")
    for kind, beta in KINDS
    if not (r == "renormalize" and (kind == "reverse" or beta == 1.0))  # infinite: refused
]
CASE_IDS = [f"{r[:5]}-{kind}{'' if b is None else b}" for r, kind, b in CASES]
REDUCTIONS = ("mean", "sum", "none")
TOL_NP = {"float32": (1e-6, 1e-6), "float64": (3e-15, 3e-15)}  # see the module docstring
TOL_REF = {"float32": (2e-6, 7e-6), "float64": (3e-14, 5e-14)}


@pytest.fixture(params=["ffi", "fallback"])
def path(request, monkeypatch):
    """Both paths: the XLA FFI custom call (when built) and the pure_callback fallback."""
    if request.param == "ffi" and not _jax_ffi.enabled():
        pytest.skip("the XLA FFI path is off")
    if request.param == "fallback":
        monkeypatch.setattr(_jax_ffi, "_state", False)
    return request.param


@contextlib.contextmanager
def _x64():
    """JAX's x64 mode, set globally for the block: the scoped jax.enable_x64 does not reach
    the threads that run host callbacks, which then round a float64 result to float32."""
    old = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def _fn(kind, beta, **kw):
    def f(s, idx, lp):
        if kind == "jsd":
            return fxj.jsd_with_topk_teacher(s, idx, lp, beta=beta, **kw)
        return fxj.kl_div_with_topk_teacher(s, idx, lp, direction=kind, **kw)

    return f


def _numpy(kind, beta, s, idx, lp, **kw):
    if kind == "jsd":
        return fx.jsd_with_topk_teacher_with_grad(s, idx, lp, beta=beta, **kw)
    return fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, direction=kind, **kw)


def jnp_reference(s, idx, lp, residual, kind, beta, T, reduction, w):
    """The loss in float64 jax.numpy ops (under x64), its own dense teacher from the
    definition: t = exp(l) / m on K ("renormalize"), or exp(l) on K and (1 - m) / (C - k)
    elsewhere ("uniform"); softmax(log t / T); 0 * log 0 := 0."""
    s = jnp.asarray(s, jnp.float64)
    C, k = s.shape[-1], idx.shape[-1]
    pk = jnp.exp(jnp.asarray(lp, jnp.float64))
    m = pk.sum(-1, keepdims=True)
    onehot = jax.nn.one_hot(jnp.asarray(idx), C, dtype=jnp.float64)  # (..., k, C)
    on_k = onehot.sum(-2)
    if residual == "renormalize":
        t = jnp.einsum("...k,...kc->...c", pk / m, onehot)
    else:
        other = jnp.maximum(1.0 - m, 0.0) / (C - k) if C > k else 0.0 * m
        t = jnp.einsum("...k,...kc->...c", pk, onehot) + (1.0 - on_k) * other
    lt = jnp.where(t > 0, jnp.log(jnp.where(t > 0, t, 1.0)), -jnp.inf)
    ls, lq = jax.nn.log_softmax(s / T), jax.nn.log_softmax(lt / T)
    p, q = jnp.exp(ls), jnp.exp(lq)

    def kl(a, la, lb):
        z = a == 0
        return jnp.sum(jnp.where(z, 0.0, a * jnp.where(z, 0.0, la - lb)), -1)

    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse"
    if kind == "forward":
        D = kl(q, lq, ls)
    elif kind == "reverse":
        D = kl(p, ls, lq)
    else:
        lm = jnp.log(beta * q + (1 - beta) * p)
        D = beta * kl(q, lq, lm) + (1 - beta) * kl(p, ls, lm)
    r = jnp.ones(D.shape) if w is None else jnp.asarray(w, jnp.float64).reshape(D.shape)
    rows = jnp.where(r != 0, r * T * T * D, 0.0)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    den = r.sum()
    return jnp.where(den > 0, rows.sum() / jnp.where(den > 0, den, 1.0), 0.0)


def _reference(s, idx, lp, residual, kind, beta, T, reduction, w):
    """(loss, d sum(loss) / d student), float64 NumPy."""
    with _x64():
        s64 = np.asarray(s, np.float64)
        lp64 = np.asarray(lp, np.float64)

        def f(x):
            return jnp.sum(jnp_reference(x, idx, lp64, residual, kind, beta, T, reduction, w))

        loss = jnp_reference(s64, idx, lp64, residual, kind, beta, T, reduction, w)
        return np.asarray(loss), np.asarray(jax.grad(f)(s64))


def _value_and_grad(f, s, idx, lp, jit=True):
    """loss (as returned) and d sum(loss) / d student from one value_and_grad call."""

    def g(s, idx, lp):
        out = f(s, idx, lp)
        return jnp.sum(out), out

    vg = jax.value_and_grad(g, has_aux=True)
    if jit:
        vg = jax.jit(vg)
    (_, loss), gs = vg(jnp.asarray(s), jnp.asarray(idx), jnp.asarray(lp))
    return np.asarray(loss), np.asarray(gs)


def _case(rng, N, C, k, dtype, weights):
    s = (3 * rng.standard_normal((N, C))).astype(dtype)
    idx, lp = teacher(rng, (N,), C, k)
    lp = lp.astype(dtype)
    kw, w = {}, None
    if weights:
        labels = rng.integers(0, C, N)
        labels[[1, 6]] = -100
        mask = np.ones(N, bool)
        mask[3] = False
        sw = rng.uniform(0.2, 2.0, N).astype(dtype)
        kw = dict(labels=labels, mask=mask, sample_weight=sw)
        w = (labels != -100) * mask * sw.astype(np.float64)
    return s, idx, lp, kw, w


def _compare(loss, gs, want_np, want_ref, dtname, shape):
    loss_np, gs_np = want_np
    lt, gt = TOL_NP[dtname]
    assert loss_error(loss, loss_np) < lt and grad_error(gs, gs_np) < gt
    lt, gt = TOL_REF[dtname]
    assert loss_error(loss, want_ref[0]) < lt and grad_error(gs, want_ref[1]) < gt
    assert gs.shape == shape


@pytest.mark.parametrize("dtname", ["float32", "float64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("residual,kind,beta", CASES, ids=CASE_IDS)
def test_matches_numpy_and_reference(rng, path, residual, kind, beta, reduction, dtname):
    """N = 11 in tiles of 4 (two full tiles through lax.scan, a remainder of 3), T = 2.5,
    with and without labels / ignore_index, mask and sample_weight, under jit."""
    if path == "fallback" and (dtname == "float64" or reduction == "sum"):
        pytest.skip("the fallback is the NumPy API itself: float32, mean and none suffice")
    dtype = np.dtype(dtname)
    with _x64() if dtname == "float64" else contextlib.nullcontext():
        for weights in (False, True):
            s, idx, lp, kw, w = _case(rng, 11, 37, 5, dtype, weights)
            opts = dict(residual=residual, temperature=2.5, reduction=reduction, **kw)
            jopts = {a: jnp.asarray(v) if isinstance(v, np.ndarray) else v for a, v in opts.items()}
            loss, gs = _value_and_grad(_fn(kind, beta, _tile_rows=4, **jopts), s, idx, lp)
            assert loss.dtype == dtype and gs.dtype == dtype
            assert loss.shape == ((11,) if reduction == "none" else ())
            want_np = _numpy(kind, beta, s, idx, lp, **opts)
            ref = _reference(s, idx, lp, residual, kind, beta, 2.5, reduction, w)
            _compare(loss, gs, want_np, ref, dtname, s.shape)
            # the loss alone, eager, in one tile: the same value to rounding
            v = _fn(kind, beta, **jopts)(jnp.asarray(s), jnp.asarray(idx), jnp.asarray(lp))
            assert loss_error(v, want_np[0]) < TOL_NP[dtname][0]


@pytest.mark.parametrize("residual", ["renormalize", "uniform"])
def test_k_one_and_k_all(rng, path, residual):
    """k = 1 and k = C; at k = C both residuals are the full teacher and the reverse KL is
    finite under "renormalize" too."""
    N, C = 6, 12
    s = rng.standard_normal((N, C)).astype(np.float32)
    for k in (1, C):
        idx, lp = teacher(rng, (N,), C, k)
        lp = lp.astype(np.float32)
        kinds = [("forward", None), ("jsd", 0.3)]
        if k == C or residual == "uniform":
            kinds.append(("reverse", None))
        for kind, beta in kinds:
            got = _value_and_grad(_fn(kind, beta, residual=residual), s, idx, lp)
            want = _numpy(kind, beta, s, idx, lp, residual=residual)
            ref = _reference(s, idx, lp, residual, kind, beta, 1.0, "mean", None)
            _compare(*got, want, ref, "float32", s.shape)


@pytest.mark.parametrize("dtname", ["bfloat16", "float16"])
def test_16bit_student(rng, path, dtname):
    """16-bit students compute in float32 (student tile upcast, float32 teacher tile): the
    NumPy API's result, the loss float32, the gradient rounded once to the student's dtype."""
    dtype = np.dtype(getattr(jnp, dtname))
    N, C, k = 7, 30, 4
    s = rng.standard_normal((N, C)).astype(np.float32).astype(dtype)
    idx, lp = teacher(rng, (N,), C, k)
    for res in ("renormalize", "uniform"):
        for lpd in (np.float32, dtype):
            lpx = lp.astype(lpd)
            loss, gs = _value_and_grad(
                _fn("forward", None, residual=res, _tile_rows=3), s, idx, lpx
            )
            l_np, g_np = fx.kl_div_with_topk_teacher_with_grad(s, idx, lpx, residual=res)
            assert loss.dtype == np.float32 and gs.dtype == dtype
            assert loss_error(loss, l_np) < 1e-6
            # the float32 gradients agree to 1e-6; rounded once to 16 bits, an entry may land
            # on the neighbouring value: at most one ulp of the 16-bit type (2**-7 / 2**-10)
            ulp = 2.0**-7 if dtname == "bfloat16" else 2.0**-10
            d = np.abs(gs.astype(np.float64) - g_np.astype(np.float64))
            assert np.all(d <= ulp * np.maximum(np.abs(g_np.astype(np.float64)), 2.0**-14))


def test_tiles_automatic_and_leading_axes(rng, path, monkeypatch):
    """The automatic tile (the NumPy layer's _TILE_BYTES, shrunk here to 3 rows), leading
    axes, the same result as one tile."""
    C, k = 20, 4
    s = rng.standard_normal((2, 5, C)).astype(np.float32)
    idx, lp = teacher(rng, (2, 5), C, k)
    lp = lp.astype(np.float32)
    lp[0, 1, 2] = -np.inf  # a zero probability in the top k
    for red in REDUCTIONS:
        f = _fn("jsd", 0.3, residual="uniform", reduction=red, num_threads=1)
        one = _value_and_grad(f, s, idx, lp)
        monkeypatch.setattr(_distill_sparse, "_TILE_BYTES", 3 * C * 4)
        tiled = _value_and_grad(f, s, idx, lp)
        monkeypatch.setattr(_distill_sparse, "_TILE_BYTES", 8 << 20)
        assert tiled[0].shape == ((2, 5) if red == "none" else ())
        assert loss_error(tiled[0], one[0]) < 1e-6
        np.testing.assert_array_equal(tiled[1], one[1])
        want = fx.jsd_with_topk_teacher_with_grad(
            s, idx, lp, beta=0.3, residual="uniform", reduction=red
        )
        assert loss_error(tiled[0], want[0]) < 1e-6 and grad_error(tiled[1], want[1]) < 1e-6


@needs_ffi
def test_ffi_graph(rng):
    """Through the FFI: the dense custom call inside a scan over the tiles, the host check a
    callback only for traced teacher arrays (test_no_n_by_c_temporary: the memory)."""
    N, C, k = 10, 6, 2
    s = jnp.asarray(rng.standard_normal((N, C)).astype(np.float32))
    idx, lp = teacher(rng, (N,), C, k)
    lp = lp.astype(np.float32)
    f = jax.jit(
        jax.value_and_grad(lambda s, i, l: fxj.kl_div_with_topk_teacher(s, i, l, _tile_rows=4))
    )
    hlo = f.lower(s, jnp.asarray(idx), jnp.asarray(lp)).compile().as_text()
    assert "fastxent_distill_grad" in hlo and "callback" in hlo.lower()
    assert "f32[10,6]" in hlo  # the student and its gradient
    consts = jax.jit(jax.value_and_grad(lambda s: fxj.kl_div_with_topk_teacher(s, idx, lp)))
    hlo = consts.lower(s).compile().as_text()
    assert "fastxent_distill_grad" in hlo and "callback" not in hlo.lower()
    # the loss alone: the forward-only call
    hlo = jax.jit(lambda s: fxj.kl_div_with_topk_teacher(s, idx, lp)).lower(s).compile().as_text()
    assert 'custom_call_target="fastxent_distill"' in hlo and "distill_grad" not in hlo


@needs_ffi
@pytest.mark.parametrize("N", [10240, 10000])
def test_no_n_by_c_temporary(N):
    """XLA's temporaries, compiled only: the teacher's tiles, never an N x C array (no teacher,
    no copy of the student), also where N is not a multiple of the tile (512 rows at C =
    4096: a slice of the student before the scan over the full tiles was materialised, 1.13
    N x C; now ~0.1, the tiles')."""
    C, k = 4096, 8
    s = jax.ShapeDtypeStruct((N, C), jnp.float32)
    idx = jax.ShapeDtypeStruct((N, k), jnp.int32)
    lp = jax.ShapeDtypeStruct((N, k), jnp.float32)
    for red in ("sum", "mean", "none"):

        def f(s, i, l, red=red):
            return jnp.sum(fxj.kl_div_with_topk_teacher(s, i, l, reduction=red))

        for g in (f, jax.value_and_grad(f)):
            temp = jax.jit(g).lower(s, idx, lp).compile().memory_analysis().temp_size_in_bytes
            assert temp < 0.5 * N * C * 4, (red, temp / (N * C * 4))


@needs_ffi
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_any_thread_count_same_loss(rng, reduction):
    """The loss bitwise the same for any num_threads (the rows' losses reduced once; the tile
    a function of C only: it was at least the thread count, and the tiles' float32 sums
    differed: 2498.40112 against 2498.40137 at 100 threads)."""
    N, C, k = 200, 65536, 4
    s = jnp.asarray((rng.standard_normal((N, C)) * 3).astype(np.float32))
    idx, lp = teacher(rng, (N,), C, k)
    i, l = jnp.asarray(idx), jnp.asarray(lp.astype(np.float32))
    out = [
        np.asarray(
            fxj.kl_div_with_topk_teacher(
                s, i, l, residual="uniform", reduction=reduction, num_threads=nt
            )
        )
        for nt in (1, 2, 3, 64, 100)
    ]
    for o in out[1:]:
        assert o.tobytes() == out[0].tobytes(), (out[0], o)


@needs_ffi
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_sample_weight_derivative_at_zero(rng, kind, reduction):
    """d / d sample_weight at a weight of exactly 0 is the row's loss (was 0 for "sum", -L/den
    for "mean": the reference blanked the row) against finite differences, also for a
    masked row beside it (0) and with tiles of 2 rows."""
    N, C, k = 5, 7, 3
    s = rng.standard_normal((N, C))
    idx, lp = teacher(rng, (N,), C, k)
    sw = np.array([1.0, 0.0, 1.0, 1.0, 0.5])
    mask = np.array([True, True, True, False, True])
    with _x64():
        f = functools.partial(
            fxj.jsd_with_topk_teacher if kind == "jsd" else fxj.kl_div_with_topk_teacher,
            residual="uniform",
            reduction=reduction,
            mask=mask,
            _tile_rows=2,
            **({} if kind == "jsd" else dict(direction=kind)),
        )
        args = (jnp.asarray(s), jnp.asarray(idx), jnp.asarray(lp))
        g = np.asarray(jax.grad(lambda w: f(*args, sample_weight=w))(jnp.asarray(sw)))
        check_weight_derivative(lambda w: f(*args, sample_weight=w), g, sw)
        assert g[1] != 0 and g[3] == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap(rng, path, reduction):
    """Each batch element its own problem (its own "mean" denominator), teacher batched."""
    B, N, C, k = 3, 5, 9, 3
    s = rng.standard_normal((B, N, C)).astype(np.float32)
    idx, lp = teacher(rng, (B, N), C, k)
    lp = lp.astype(np.float32)
    m = rng.random((B, N)) > 0.3
    m[:, 0] = True

    def one(s, i, l, m):
        out = fxj.jsd_with_topk_teacher(s, i, l, residual="uniform", mask=m, reduction=reduction)
        return jnp.sum(out), out

    (_, loss), gs = jax.jit(jax.vmap(jax.value_and_grad(one, has_aux=True)))(
        jnp.asarray(s), jnp.asarray(idx), jnp.asarray(lp), jnp.asarray(m)
    )
    for b in range(B):
        want = fx.jsd_with_topk_teacher_with_grad(
            s[b], idx[b], lp[b], residual="uniform", mask=m[b], reduction=reduction
        )
        assert loss_error(loss[b], want[0]) < 1e-6 and grad_error(gs[b], want[1]) < 1e-6


def test_per_row_cotangent_empty_and_uncounted(rng, path):
    N, C, k = 6, 8, 2
    s = rng.standard_normal((N, C)).astype(np.float32)
    idx, lp = teacher(rng, (N,), C, k)
    lp = lp.astype(np.float32)
    c = rng.standard_normal(N).astype(np.float32)
    g = jax.jit(
        jax.grad(lambda s: jnp.sum(c * fxj.kl_div_with_topk_teacher(s, idx, lp, reduction="none")))
    )(jnp.asarray(s))
    _, gr = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, reduction="none")
    assert grad_error(g, gr * c[:, None]) < 1e-6
    # "mean" over no counted row: 0 and a zero gradient; a massless row that does not count
    lp0 = lp.copy()
    lp0[1] = -np.inf
    for mask in (np.zeros(N, bool), np.arange(N) != 1):
        v, g = jax.jit(
            jax.value_and_grad(lambda s, m: fxj.kl_div_with_topk_teacher(s, idx, lp0, mask=m))
        )(jnp.asarray(s), jnp.asarray(mask))
        want = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp0, mask=mask)
        assert loss_error(v, want[0]) < 1e-6 and grad_error(g, want[1]) < 1e-6
        assert np.isfinite(np.asarray(g)).all() and not np.asarray(g)[1].any()
    # no rows
    s0, i0, l0 = np.zeros((0, 5), np.float32), np.zeros((0, 2), np.int32), np.zeros((0, 2))
    l0 = l0.astype(np.float32)
    v, g = jax.value_and_grad(lambda s: fxj.kl_div_with_topk_teacher(s, i0, l0))(jnp.asarray(s0))
    assert float(v) == 0.0 and g.shape == (0, 5)
    assert fxj.jsd_with_topk_teacher(s0, i0, l0, reduction="none").shape == (0,)


@needs_ffi
@pytest.mark.parametrize(
    "residual,kind,beta,reduction",
    [
        ("renormalize", "forward", None, "mean"),
        ("uniform", "reverse", None, "none"),
        ("uniform", "jsd", 0.3, "sum"),
        ("renormalize", "jsd", 0.6, "mean"),
    ],
)
def test_forward_mode_second_order_and_sample_weight(rng, residual, kind, beta, reduction):
    """Through the FFI, by composition with the dense custom call: jax.jvp, the Hessian and
    d / d sample_weight against the float64 reference's own derivatives."""
    with _x64():
        N, C, k = 5, 7, 3
        s = jnp.asarray(rng.standard_normal((N, C)))
        idx, lp = teacher(rng, (N,), C, k)
        sw = jnp.asarray(rng.uniform(0.2, 2.0, N))
        T = 1.4

        def f(s, sw):
            out = _fn(kind, beta, residual=residual, temperature=T, reduction=reduction,
                      sample_weight=sw, _tile_rows=2)(s, idx, lp)  # fmt: skip
            return jnp.sum(out)

        def ref(s, sw):
            return jnp.sum(jnp_reference(s, idx, lp, residual, kind, beta, T, reduction, sw))

        ds = jnp.asarray(rng.standard_normal((N, C)))
        dw = jnp.asarray(rng.standard_normal(N))
        v1, j1 = jax.jvp(f, (s, sw), (ds, dw))
        v2, j2 = jax.jvp(ref, (s, sw), (ds, dw))
        assert abs(float(v1 - v2)) < 1e-13 * max(1.0, abs(float(v2)))
        assert abs(float(j1 - j2)) < 1e-13 * max(1.0, abs(float(j2)))
        h1 = jax.jit(jax.hessian(f))(s, sw)
        h2 = jax.hessian(ref)(s, sw)
        assert float(jnp.abs(h2).max()) > 1e-3 and grad_error(h1, h2) < 3e-14
        g1 = jax.grad(f, argnums=1)(s, sw)
        g2 = jax.grad(ref, argnums=1)(s, sw)
        assert grad_error(g1, g2) < 1e-14


def test_derivative_refusals(rng, path):
    """teacher_logprobs is data (both paths); without the FFI, forward mode, second order and
    sample_weight raise too: errors, never zeros."""
    N, C, k = 4, 6, 2
    s = jnp.asarray(rng.standard_normal((N, C)).astype(np.float32))
    idx, lp = teacher(rng, (N,), C, k)
    idx, lp = jnp.asarray(idx), jnp.asarray(lp.astype(np.float32))
    f = fxj.kl_div_with_topk_teacher
    for g in (jax.grad, jax.jacfwd):
        with pytest.raises(TypeError, match="teacher_logprobs is being differentiated"):
            g(lambda l: f(s, idx, l))(lp)
        with pytest.raises(TypeError, match="teacher_logprobs is being differentiated"):
            jax.jit(g(lambda l: f(s, idx, l)))(lp)
    # stop_gradient: fine, the student's gradient only
    jax.grad(lambda s, l: f(s, idx, jax.lax.stop_gradient(l)))(s, lp)
    sw = jnp.ones(N)
    if path == "fallback":
        with pytest.raises(TypeError, match="forward-mode|jvp"):
            jax.jvp(lambda s: f(s, idx, lp), (s,), (s,))
        with pytest.raises(Exception, match="(?i)jvp|differentiat|pure_callback"):
            jax.hessian(lambda s: f(s, idx, lp))(s)
        with pytest.raises(TypeError, match="student only; sample_weight is being"):
            jax.grad(lambda w: f(s, idx, lp, sample_weight=w))(sw)
    else:
        jax.grad(lambda w: f(s, idx, lp, sample_weight=w))(sw)


def _bad_values(N, C, k):
    """(change, message) for the teacher's and the row arrays' values: each raised by the
    NumPy API, by fastxent.jax with concrete arrays, and when a jitted call runs."""
    s, idx, lp, cases = _errors(N, C, k)
    out = [
        (change, match)
        for change, exc, match in cases
        if exc is ValueError
        and set(change) <= {"teacher_indices", "teacher_logprobs", "sample_weight"}
        and "shape" not in match
        and "k = 0" not in match
    ]
    # the reverse KL against a "uniform" teacher of mass 1 (row 0)
    lp1 = lp.copy()
    lp1[0] = -np.inf
    lp1[0, :2] = np.log(0.5) + 1e-6  # a mass of 1 (above by rounding)
    out.append((dict(teacher_logprobs=lp1, residual="uniform", direction="reverse"),
                "infinite at row 0"))  # fmt: skip
    # k = C under "uniform", a massless counted row
    full = np.tile(np.arange(C), (N, 1))
    lpf = np.full((N, C), np.log(1.0 / C), np.float32)
    lpf[1] = -np.inf
    out.append((dict(teacher_indices=full, teacher_logprobs=lpf, residual="uniform"),
                "row 1's teacher has no mass"))  # fmt: skip
    return s, idx, lp, out


def test_value_errors(path):
    """Concrete arrays: the NumPy API's ValueError, same message, raised by the call. Traced
    (jit arguments): the same message in a runtime error when the call runs, for the loss
    alone and for jax.grad alone (the check feeds the teacher tiles: never dropped)."""
    N, C, k = 5, 8, 3
    s, idx, lp, cases = _bad_values(N, C, k)
    assert len(cases) >= 9
    for change, match in cases:
        args = dict(teacher_indices=idx, teacher_logprobs=lp, direction="forward")
        args.update(change)
        i, lg = args.pop("teacher_indices"), args.pop("teacher_logprobs")
        with pytest.raises(ValueError, match=match) as np_err:
            fx.kl_div_with_topk_teacher(s, i, lg, **args)
        with pytest.raises(ValueError) as j_err:
            fxj.kl_div_with_topk_teacher(jnp.asarray(s), i, lg, **args)
        assert str(j_err.value) == str(np_err.value), change
        sw = args.pop("sample_weight", None)

        def loss(s, i, lg, sw, args=args):
            return fxj.kl_div_with_topk_teacher(s, i, lg, sample_weight=sw, **args)

        for f in (jax.jit(loss), jax.jit(jax.grad(loss))):
            with pytest.raises(Exception, match=match) as err:
                jax.block_until_ready(f(jnp.asarray(s), jnp.asarray(i), jnp.asarray(lg), sw))
            assert not isinstance(err.value, (TypeError, AssertionError))
    # tolerated rounding: log-probabilities a rounding above 0, masses above 1 by rounding
    s2 = np.zeros((2, 4), np.float32)
    i2 = np.array([[0, 1], [2, 3]])
    l2 = np.array([[np.log(0.5) + 1e-6, np.log(0.5) + 1e-6], [1e-6, -np.inf]], np.float32)
    v = jax.jit(lambda s, i, l: fxj.kl_div_with_topk_teacher(s, i, l, residual="uniform"))(
        s2, i2, l2
    )
    assert np.isfinite(float(v))


def test_static_errors(path):
    """Shapes, dtypes, k and the options: at trace time (under jit too), with the NumPy API's
    exception and message."""
    N, C, k = 5, 8, 3
    s, idx, lp, cases = _errors(N, C, k)
    static = [c for c in cases if c[1] is TypeError or "shape" in c[2] or c[2] in (
        "k = 0", "more than", "residual must be", "direction", "temperature", "reduction",
        r"temperature must be in \[1e-30, 100\]", "num_threads", "C = 0")]  # fmt: skip
    static += [
        (dict(direction="reverse"), ValueError, "infinite"),
        (dict(mask=np.ones(N, bool), labels=np.zeros((N,), np.float32)), TypeError, "labels"),
    ]
    assert len(static) >= 18
    for change, exc, match in static:
        args = dict(student=s, teacher_indices=idx, teacher_logprobs=lp, direction="forward")
        args.update(change)
        a = [args.pop(n) for n in ("student", "teacher_indices", "teacher_logprobs")]
        with pytest.raises(exc, match=match) as np_err:
            fx.kl_div_with_topk_teacher(*a, **args)
        with pytest.raises(exc) as j_err:
            jax.jit(lambda *x, args=args: fxj.kl_div_with_topk_teacher(*x, **args))(*a)
        assert str(j_err.value) == str(np_err.value), change
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            fxj.jsd_with_topk_teacher(s, idx, lp, beta=bad)
    with pytest.raises(ValueError, match="beta=1 .*infinite"):
        fxj.jsd_with_topk_teacher(s, idx, lp, beta=1.0)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda s, T: fxj.kl_div_with_topk_teacher(s, idx, lp, temperature=T))(s, 2.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fxj.kl_div_with_topk_teacher(s, idx, lp, beta=0.5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fxj.jsd_with_topk_teacher(s, idx, lp, out=None)
    with pytest.raises(ValueError, match="_tile_rows"):
        fxj.kl_div_with_topk_teacher(s, idx, lp, _tile_rows=0)


def test_docstrings():
    for f in (fxj.kl_div_with_topk_teacher, fxj.jsd_with_topk_teacher):
        doc = f.__doc__
        assert "student : jax.Array" in doc and "JAX specifics" in doc
        assert "array_like" not in doc and "before anything is written" not in doc
    assert "kl_div_with_topk_teacher" in fxj.__all__ and "jsd_with_topk_teacher" in fxj.__all__
