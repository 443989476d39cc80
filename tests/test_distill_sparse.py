"""Distillation from a sparse (top-k) teacher (fx.kl_div_with_topk_teacher, jsd_with_topk_teacher
and their _with_grad forms, fastxent.torch's wrappers) against a float64 NumPy reference that
builds the dense teacher explicitly, against the dense kernel on that teacher, finite
differences, tiles and threads, and every error path (each leaves out= untouched)."""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from fastxent import _distill_sparse

TOL = {np.dtype(np.float32): (1e-5, 3e-7), np.dtype(np.float64): (1e-13, 1e-15)}


def _log_softmax(z):
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def teacher(rng, rows, C, k, scale=2.0):
    """(indices, log-probabilities, float64) of a random full teacher's top k (mass < 1)."""
    lt = _log_softmax(rng.standard_normal(rows + (C,)) * scale)
    idx = np.argsort(-lt, axis=-1, kind="stable")[..., :k]
    rng.permuted(idx, axis=-1, out=idx)  # order within the row does not matter
    return idx, np.take_along_axis(lt, idx, -1)


def dense_teacher(idx, lp, C, residual):
    """log t (float64, rows x C) built explicitly, as the docstrings define it."""
    lp = np.asarray(lp, np.float64)
    k = idx.shape[-1]
    m = np.exp(lp).sum(-1, keepdims=True)
    if residual == "uniform" and C > k:
        with np.errstate(divide="ignore"):
            fill = np.log(np.maximum(1.0 - m, 0.0) / (C - k))
    else:
        fill = np.full(m.shape, -np.inf)
    lt = np.broadcast_to(fill, idx.shape[:-1] + (C,)).copy()
    np.put_along_axis(lt, idx, lp, -1)
    return lt


def _xlogy(a, b):
    with np.errstate(invalid="ignore"):
        return np.where(a == 0, 0.0, a * b)


def reference(s, lt, kind, beta=0.5, T=1.0, reduction="mean", w=None):
    """(loss, grad_student) in float64 by hand, the teacher's logits lt (dense)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.asarray(s, np.float64)
        ls, lq = _log_softmax(s / T), _log_softmax(lt / T)
        p, q = np.exp(ls), np.exp(lq)
        if kind == "forward":
            D = _xlogy(q, lq - ls).sum(-1)
            g = T * (p - q)
        elif kind == "reverse":
            D = _xlogy(p, ls - lq).sum(-1)
            g = T * _xlogy(p, ls - lq - D[..., None])
        else:
            lm = np.log(beta * q + (1 - beta) * p)
            Ks = _xlogy(p, ls - lm).sum(-1)
            D = beta * _xlogy(q, lq - lm).sum(-1) + (1 - beta) * Ks
            g = T * (1 - beta) * _xlogy(p, ls - lm - Ks[..., None])
    rows = T * T * D
    w = np.ones(rows.shape) if w is None else np.asarray(w, np.float64).reshape(rows.shape)
    rows = np.where(w != 0, w * rows, 0.0)
    g = np.where(w[..., None] != 0, w[..., None] * g, 0.0)
    if reduction == "none":
        return rows, g
    if reduction == "sum":
        return rows.sum(), g
    den = w.sum()
    return (0.0, 0 * g) if den == 0 else (rows.sum() / den, g / den)


def call(kind, beta, s, idx, lp, grad=True, **kw):
    if kind == "jsd":
        f = fx.jsd_with_topk_teacher_with_grad if grad else fx.jsd_with_topk_teacher
        return f(s, idx, lp, beta=beta, **kw)
    f = fx.kl_div_with_topk_teacher_with_grad if grad else fx.kl_div_with_topk_teacher
    return f(s, idx, lp, direction=kind, **kw)


KINDS = [("forward", None), ("reverse", None), ("jsd", 0.5), ("jsd", 0.2)]
# reverse KL against a renormalised top-k teacher is infinite: refused (its own test)
CASES = [
    (r, kind, beta)
    for r in ("renormalize", "uniform")
    for kind, beta in KINDS
    if not (kind == "reverse" and r == "renormalize")
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("residual,kind,beta", CASES)
def test_matches_reference(residual, kind, beta, T, reduction, dtype):
    rng = np.random.default_rng(0)
    N, C, k = 11, 37, 5
    s = (rng.standard_normal((N, C)) * 3).astype(dtype)
    idx, lp = teacher(rng, (N,), C, k)
    lp = lp.astype(dtype)
    labels = rng.integers(0, C, N)
    labels[[1, 6]] = -100
    mask = np.ones(N, bool)
    mask[3] = False
    sw = rng.uniform(0.2, 2.0, N)
    w = (labels != -100) * mask * sw
    kw = dict(residual=residual, temperature=T, reduction=reduction)
    lt = dense_teacher(idx, lp, C, residual)
    for opts, ww in ((dict(), None), (dict(labels=labels, mask=mask, sample_weight=sw), w)):
        loss, g = call(kind, beta, s, idx, lp, _tile_rows=4, **kw, **opts)
        rl, rg = reference(s, lt, kind, beta or 0.5, T, reduction, ww)
        lt_tol, g_tol = TOL[np.dtype(dtype)]
        assert g.dtype == dtype and g.shape == s.shape
        assert np.asarray(loss).dtype == dtype
        scale = max(1.0, float(np.max(np.abs(rl))))
        np.testing.assert_allclose(loss, rl, rtol=lt_tol, atol=lt_tol * scale)
        np.testing.assert_allclose(g, rg, rtol=0, atol=g_tol * T * max(1.0, np.abs(rg).max()) * 10)
        nog = call(kind, beta, s, idx, lp, grad=False, **kw, **opts)
        np.testing.assert_array_equal(nog, loss)


def test_reverse_renormalize_refused():
    rng = np.random.default_rng(12)
    s = rng.standard_normal((3, 6))
    idx, lp = teacher(rng, (3,), 6, 2)
    out = np.full_like(s, 2.0)
    with pytest.raises(ValueError, match="infinite"):
        fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, direction="reverse", out=out)
    assert (out == 2.0).all()
    # k = C: the renormalised teacher is the full one, finite
    idx, lp = teacher(rng, (3,), 6, 6)
    loss, g = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, direction="reverse")
    rl, rg = reference(s, dense_teacher(idx, lp, 6, "renormalize"), "reverse")
    np.testing.assert_allclose(loss, rl, rtol=1e-13)
    np.testing.assert_allclose(g, rg, atol=1e-15)


def test_jsd_beta_one_is_reverse():
    """beta=1 is the reverse KL: refused where that is (renormalize, k < C), equal to it
    elsewhere."""
    rng = np.random.default_rng(13)
    s = rng.standard_normal((3, 7))
    idx, lp = teacher(rng, (3,), 7, 2)
    out = np.full_like(s, 2.0)
    with pytest.raises(ValueError, match="beta=1 .*infinite"):
        fx.jsd_with_topk_teacher_with_grad(s, idx, lp, beta=1.0, out=out)
    assert (out == 2.0).all()
    with pytest.raises(ValueError, match="infinite"):
        fx.jsd_with_topk_teacher(s, idx, lp, beta=1.0, reduction="none")
    a = fx.jsd_with_topk_teacher_with_grad(s, idx, lp, beta=1.0, residual="uniform")
    b = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, direction="reverse", residual="uniform")
    np.testing.assert_allclose(a[0], b[0], rtol=1e-13)
    np.testing.assert_allclose(a[1], b[1], atol=1e-15)
    # k = C: the renormalised teacher is the full one, finite
    idx, lp = teacher(rng, (3,), 7, 7)
    loss, g = fx.jsd_with_topk_teacher_with_grad(s, idx, lp, beta=1.0)
    rl, rg = reference(s, dense_teacher(idx, lp, 7, "renormalize"), "reverse")
    np.testing.assert_allclose(loss, rl, rtol=1e-13)
    np.testing.assert_allclose(g, rg, atol=1e-15)


@pytest.mark.parametrize("residual,kind,beta", CASES)
def test_matches_dense_kernel(residual, kind, beta):
    """Bitwise the dense kernel's gradient on the explicit dense teacher (float32 tile)."""
    rng = np.random.default_rng(1)
    N, C, k = 9, 64, 7
    s = rng.standard_normal((N, C)).astype(np.float32)
    idx, lp = teacher(rng, (N,), C, k)
    lt = dense_teacher(idx, lp.astype(np.float32), C, residual).astype(np.float32)
    for red in ("mean", "sum", "none"):
        kw = dict(temperature=1.7, reduction=red)
        loss, g = call(kind, beta, s, idx, lp, residual=residual, _tile_rows=2, **kw)
        if kind == "jsd":
            dl, dg = fx.jsd_with_logits_with_grad(s, lt, beta=beta, **kw)
        else:
            dl, dg = fx.kl_div_with_logits_with_grad(s, lt, direction=kind, **kw)
        if red != "mean":  # "mean" scales the rows before the kernel (last-bit differences)
            np.testing.assert_array_equal(g, dg)
        np.testing.assert_allclose(g, dg, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(loss, dl, rtol=1e-6)


def test_tiles_and_threads_bitwise():
    rng = np.random.default_rng(2)
    N, C, k = 13, 50, 6  # N a multiple of no tile size below
    s = rng.standard_normal((N, C)).astype(np.float32)
    idx, lp = teacher(rng, (N,), C, k)
    sw = rng.uniform(0, 2, N)
    base = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, residual="uniform", sample_weight=sw)
    for tr in (1, 2, 3, 4, 5, 12, 13, 100):
        for nt in (1, 2):
            loss, g = fx.kl_div_with_topk_teacher_with_grad(
                s, idx, lp, residual="uniform", sample_weight=sw, num_threads=nt, _tile_rows=tr
            )
            assert loss == base[0]
            np.testing.assert_array_equal(g, base[1])


def test_tile_byte_bound(monkeypatch):
    """The automatic tile size (rows of at most _TILE_BYTES, at least the thread count)."""
    rng = np.random.default_rng(3)
    N, C, k = 10, 40, 3
    s = rng.standard_normal((N, C))
    idx, lp = teacher(rng, (N,), C, k)
    ref = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp)
    seen = []
    real = np.empty

    def spy(shape, dtype=float, *a, **kw):
        seen.append(shape)
        return real(shape, dtype, *a, **kw)

    monkeypatch.setattr(_distill_sparse, "_TILE_BYTES", 3 * C * 8)
    monkeypatch.setattr(_distill_sparse.np, "empty", spy)
    got = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, num_threads=1)
    monkeypatch.undo()
    tiles = [sh for sh in seen if sh != (N, C)]  # (N, C): the gradient
    assert tiles and all(sh == (3, C) for sh in tiles), seen
    assert got[0] == ref[0]
    np.testing.assert_array_equal(got[1], ref[1])


@pytest.mark.parametrize("residual", ["renormalize", "uniform"])
def test_k_one_and_k_all(residual):
    rng = np.random.default_rng(4)
    N, C = 6, 12
    s = rng.standard_normal((N, C))
    for k in (1, C):
        idx, lp = teacher(rng, (N,), C, k)
        lt = dense_teacher(idx, lp, C, residual)
        loss, g = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, residual=residual)
        rl, rg = reference(s, lt, "forward")
        np.testing.assert_allclose(loss, rl, rtol=1e-13)
        np.testing.assert_allclose(g, rg, atol=1e-15)
    # k = C: the teacher is the full distribution, the same under both residuals, and
    # equal to the dense loss on the teacher's log-probabilities
    full = _log_softmax(rng.standard_normal((N, C)))
    idx = np.tile(np.arange(C)[::-1], (N, 1))
    lp = np.take_along_axis(full, idx, -1)
    loss, g = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, residual=residual)
    dl, dg = fx.kl_div_with_logits_with_grad(s, full)
    np.testing.assert_allclose(loss, dl, rtol=1e-14)
    np.testing.assert_allclose(g, dg, atol=1e-16)


def test_leading_axes_and_partial_mass():
    rng = np.random.default_rng(5)
    C, k = 20, 4
    s = rng.standard_normal((2, 3, C))
    idx, lp = teacher(rng, (2, 3), C, k)
    lp[0, 1, 2] = -np.inf  # a zero probability in the top k
    for res in ("renormalize", "uniform"):
        loss, g = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, residual=res, reduction="none")
        rl, rg = reference(s, dense_teacher(idx, lp, C, res), "forward", reduction="none")
        assert loss.shape == (2, 3) and g.shape == s.shape
        np.testing.assert_allclose(loss, rl, rtol=1e-13)
        np.testing.assert_allclose(g, rg, atol=1e-15)


def test_mass_one_uniform_is_renormalize():
    rng = np.random.default_rng(6)
    C = 10
    s = rng.standard_normal((4, C))
    lp = np.log(np.array([[0.5, 0.3, 0.2]] * 4))
    idx = np.array([[0, 5, 9]] * 4)
    a = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, residual="uniform")
    b = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, residual="renormalize")
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    np.testing.assert_allclose(a[1], b[1], atol=1e-15)


def test_uniform_full_mass_reverse_refused():
    """residual="uniform" at a row of mass 1 (exactly, or above by rounding) gives the others 0:
    the reverse KL (and the JSD at beta = 1) is infinite and refused, naming the row; the
    forward KL and the JSD at beta < 1 are finite and accept it."""
    rng = np.random.default_rng(14)
    C = 6
    idx = np.array([[0, 1], [2, 3]])
    for row0, dt in (([0.5, 0.5], np.float64), ([0.5, 0.5000001], np.float32)):
        lp = np.log(np.array([row0, [0.25, 0.70]], dt))
        s = rng.standard_normal((2, C)).astype(dt)
        out = np.full_like(s, 2.0)
        with pytest.raises(ValueError, match="infinite at row 0.*sum to"):
            fx.kl_div_with_topk_teacher_with_grad(
                s, idx, lp, residual="uniform", direction="reverse", out=out
            )
        with pytest.raises(ValueError, match="beta=1.*infinite at row 0"):
            fx.jsd_with_topk_teacher_with_grad(s, idx, lp, residual="uniform", beta=1.0, out=out)
        assert (out == 2.0).all()
        # a row that does not count is not refused
        mask = np.array([False, True])
        loss, g = fx.kl_div_with_topk_teacher_with_grad(
            s, idx, lp, residual="uniform", direction="reverse", mask=mask
        )
        assert np.isfinite(loss) and np.isfinite(g).all()
        lt = dense_teacher(idx, lp, C, "uniform")
        for kind, beta in (("forward", None), ("jsd", 0.5), ("jsd", 0.0)):
            loss, g = call(kind, beta, s, idx, lp, residual="uniform", reduction="none")
            rl, rg = reference(s, lt, kind if beta != 0.0 else "forward", beta, reduction="none")
            assert np.isfinite(loss).all() and np.isfinite(g).all()
            np.testing.assert_allclose(loss, rl, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(g, rg, atol=1e-6)


def test_no_counted_row_and_massless_ignored_row():
    rng = np.random.default_rng(7)
    C, k, N = 8, 2, 3
    s = rng.standard_normal((N, C))
    idx, lp = teacher(rng, (N,), C, k)
    lp[1] = -np.inf  # no mass: fine where the row does not count
    mask = np.array([True, False, True])
    loss, g = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, mask=mask)
    rl, rg = reference(s, dense_teacher(idx, lp, C, "renormalize"), "forward", w=mask)
    np.testing.assert_allclose(loss, rl, rtol=1e-13)
    np.testing.assert_allclose(g, rg, atol=1e-15)
    assert not g[1].any()
    loss, g = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, mask=np.zeros(N, bool))
    assert loss == 0 and not g.any()
    with pytest.raises(ValueError, match="no mass"):
        fx.kl_div_with_topk_teacher(s, idx, lp)
    # under "uniform" a massless row is the uniform teacher over the other C - k classes
    loss = fx.kl_div_with_topk_teacher(s, idx, lp, residual="uniform", reduction="none")
    rl, _ = reference(s, dense_teacher(idx, lp, C, "uniform"), "forward", reduction="none")
    np.testing.assert_allclose(loss, rl, rtol=1e-13)
    # ... but with k = C there is no other class: no teacher at all, refused as "renormalize"
    idx = np.tile(np.arange(C), (N, 1))
    lp = np.full((N, C), np.log(1 / C))
    lp[1] = -np.inf
    out = np.full_like(s, 2.0)
    for kind, beta in KINDS:
        with pytest.raises(ValueError, match="row 1's teacher has no mass.*k = C"):
            call(kind, beta, s, idx, lp, residual="uniform", out=out)
        assert (out == 2.0).all()
    loss = fx.kl_div_with_topk_teacher(s, idx, lp, residual="uniform", mask=mask)
    assert np.isfinite(loss)


def test_empty_rows():
    s = np.zeros((0, 5), np.float32)
    idx = np.zeros((0, 2), np.int64)
    lp = np.zeros((0, 2), np.float32)
    loss, g = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp)
    assert loss == 0 and g.shape == (0, 5)
    assert fx.kl_div_with_topk_teacher(s, idx, lp, reduction="none").shape == (0,)


@pytest.mark.parametrize("residual,kind,beta", [c for c in CASES if c[2] != 0.5])
def test_finite_differences(residual, kind, beta):
    rng = np.random.default_rng(8)
    N, C, k = 3, 9, 3
    s = rng.standard_normal((N, C))
    idx, lp = teacher(rng, (N,), C, k)
    sw = np.array([1.0, 0.5, 2.0])
    kw = dict(residual=residual, temperature=1.5, sample_weight=sw)
    _, g = call(kind, beta, s, idx, lp, **kw)
    h = 1e-6
    fd = np.zeros_like(s)
    for i in np.ndindex(s.shape):
        sp, sm = s.copy(), s.copy()
        sp[i] += h
        sm[i] -= h
        up = call(kind, beta, sp, idx, lp, False, **kw)
        down = call(kind, beta, sm, idx, lp, False, **kw)
        fd[i] = (up - down) / (2 * h)
    np.testing.assert_allclose(g, fd, atol=1e-8)


HALF = [np.float16]
try:
    import ml_dtypes

    HALF.append(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    pass


@pytest.mark.parametrize("dtype", HALF)
def test_16bit_student(dtype):
    """16-bit students are computed in float32 (student tile upcast, float32 teacher tile):
    the float32 result on the upcast student, the gradient rounded once."""
    rng = np.random.default_rng(9)
    N, C, k = 7, 30, 4
    s = rng.standard_normal((N, C)).astype(dtype)
    idx, lp = teacher(rng, (N,), C, k)
    for res in ("renormalize", "uniform"):
        loss, g = fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, residual=res, _tile_rows=3)
        l32, g32 = fx.kl_div_with_topk_teacher_with_grad(
            s.astype(np.float32), idx, lp, residual=res
        )
        assert g.dtype == s.dtype and np.asarray(loss).dtype == np.float32
        assert loss == l32
        np.testing.assert_array_equal(g, g32.astype(dtype))
        out = np.zeros_like(s)
        assert fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, residual=res, out=out)[1] is out
        np.testing.assert_array_equal(out, g)


def test_out_and_in_place():
    rng = np.random.default_rng(10)
    N, C, k = 5, 16, 3
    s = rng.standard_normal((N, C)).astype(np.float32)
    idx, lp = teacher(rng, (N,), C, k)
    loss, g = fx.jsd_with_topk_teacher_with_grad(s, idx, lp, residual="uniform")
    out = np.full_like(s, 7.0)
    l2, g2 = fx.jsd_with_topk_teacher_with_grad(s, idx, lp, residual="uniform", out=out)
    assert g2 is out and l2 == loss
    np.testing.assert_array_equal(out, g)
    x = s.copy()
    l3, g3 = fx.jsd_with_topk_teacher_with_grad(x, idx, lp, residual="uniform", out=x, _tile_rows=2)
    assert g3 is x and l3 == loss
    np.testing.assert_array_equal(x, g)


def _errors(N, C, k):
    rng = np.random.default_rng(11)
    s = rng.standard_normal((N, C)).astype(np.float32)
    idx, lp = teacher(rng, (N,), C, k)
    lp = lp.astype(np.float32)

    def with_(a, i, v):
        a = a.copy()
        a[i] = v
        return a

    dup = with_(idx, (2, 1), idx[2, 0])
    big = np.log(np.full((N, k), 0.6, np.float32))
    return s, idx, lp, [
        (dict(teacher_indices=idx.astype(np.float32)), TypeError, "integers"),
        (dict(teacher_logprobs=lp.astype(np.int32)), TypeError, "teacher_logprobs must be"),
        (dict(teacher_indices=idx[:-1]), ValueError, "teacher_indices has shape"),
        (dict(teacher_indices=idx[:, :-1]), ValueError, "teacher_logprobs has shape"),
        (dict(teacher_indices=idx[:, :0], teacher_logprobs=lp[:, :0]), ValueError, "k = 0"),
        (dict(teacher_indices=with_(idx, (1, 0), C)), ValueError, "out of range"),
        (dict(teacher_indices=with_(idx, (1, 0), -1)), ValueError, "out of range"),
        (dict(teacher_indices=dup), ValueError, "row 2 holds an index twice"),
        (dict(teacher_logprobs=with_(lp, (0, 0), np.nan)), ValueError, "NaN"),
        (dict(teacher_logprobs=with_(lp, (0, 0), 0.01)), ValueError, r"<= 0"),
        (dict(teacher_logprobs=with_(lp, (0, 0), np.inf)), ValueError, r"<= 0"),
        (dict(teacher_logprobs=big), ValueError, "sum to"),
        (dict(teacher_logprobs=np.full_like(lp, -np.inf)), ValueError, "no mass"),
        (dict(residual="spread"), ValueError, "residual must be"),
        (dict(direction="sideways"), ValueError, "direction"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(temperature=150.0), ValueError, r"temperature must be in \[1e-30, 100\]"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
        (dict(labels=np.zeros(N - 1, np.int64)), ValueError, "labels has shape"),
        (dict(mask=np.ones(N, np.int8)), TypeError, "mask must be boolean"),
        (dict(sample_weight=-np.ones(N)), ValueError, "sample_weight"),
        (dict(num_threads=0), ValueError, "num_threads"),
        (dict(num_threads=2**40), ValueError, "num_threads must be at most 2147483647"),
        (dict(student=s.astype(np.int32)), TypeError, "student must be"),
        (dict(student=s[:, :0], teacher_indices=idx[:, :0]), ValueError, "C = 0"),
        (dict(teacher_indices=np.tile(np.arange(C + 1), (N, 1)),
              teacher_logprobs=np.full((N, C + 1), -9.0, np.float32)), ValueError, "more than"),
    ]  # fmt: skip


def test_errors_leave_out_untouched():
    N, C, k = 5, 8, 3
    s, idx, lp, cases = _errors(N, C, k)
    for change, exc, match in cases:
        args = dict(student=s, teacher_indices=idx, teacher_logprobs=lp)
        args.update(change)
        args.setdefault("direction", "forward")
        out = np.full_like(s, 3.5)
        before = s.copy()
        with pytest.raises(exc, match=match):
            fx.kl_div_with_topk_teacher_with_grad(
                args.pop("student"), args.pop("teacher_indices"), args.pop("teacher_logprobs"),
                out=out if args.get("student", s).shape == s.shape else None, **args,
            )  # fmt: skip
        assert (out == 3.5).all(), change
        np.testing.assert_array_equal(s, before)
    # out= itself
    for bad, exc in (
        (np.zeros((N, C), np.float64), ValueError),
        (np.zeros((N, C + 1), np.float32), ValueError),
        (np.zeros((N, 2 * C), np.float32)[:, ::2], ValueError),
        ([[0.0] * C] * N, TypeError),
    ):
        with pytest.raises(exc):
            fx.kl_div_with_topk_teacher_with_grad(s, idx, lp, out=bad)
    with pytest.raises(ValueError, match="jsd|beta"):
        fx.jsd_with_topk_teacher_with_grad(s, idx, lp, beta=1.5)
    with pytest.raises(TypeError):
        fx.kl_div_with_topk_teacher(s, idx, lp, out=np.zeros_like(s))  # no out= there


def test_rounding_tolerated():
    """log-probabilities a rounding above 0 and masses a rounding above 1 are accepted."""
    s = np.zeros((2, 4), np.float32)
    idx = np.array([[0, 1], [2, 3]])
    lp = np.array([[np.log(0.5) + 1e-6, np.log(0.5) + 1e-6], [1e-6, -np.inf]], np.float32)
    loss = fx.kl_div_with_topk_teacher(s, idx, lp, residual="uniform", reduction="none")
    assert np.all(np.isfinite(loss))


# -------------------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch_mods():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    import fastxent.torch as fxt

    return torch, F, fxt


@pytest.mark.parametrize("residual", ["renormalize", "uniform"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_torch_matches_kl_div(torch_mods, residual, dtype, T):
    torch, F, fxt = torch_mods
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    N, C, k = 8, 40, 6
    s = torch.randn(N, C, generator=g, dtype=dt, requires_grad=True)
    lp, idx = torch.log_softmax(2 * torch.randn(N, C, generator=g, dtype=dt), -1).topk(k, -1)
    lt = torch.from_numpy(dense_teacher(idx.numpy(), lp.numpy(), C, residual)).to(dt)
    # F.kl_div's exp(t) * (t - x) is NaN at t = -inf: a very negative finite value instead
    lt = torch.where(torch.isinf(lt), torch.tensor(-1e30, dtype=dt), lt)
    loss = fxt.kl_div_with_topk_teacher(s, idx, lp, residual=residual, temperature=T)
    (gs,) = torch.autograd.grad(loss, s)
    s2 = s.detach().clone().requires_grad_()
    ref = (
        F.kl_div(
            F.log_softmax(s2 / T, dim=-1),
            F.log_softmax(lt / T, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * T**2
    )
    (rg,) = torch.autograd.grad(ref, s2)
    assert loss.dtype == dt
    tol = 1e-5 if dtype == "float32" else 1e-12
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gs, rg, rtol=tol, atol=tol)


def test_torch_reductions_weights_and_grad_output(torch_mods):
    torch, F, fxt = torch_mods
    g = torch.Generator().manual_seed(1)
    N, C, k = 6, 20, 4
    s = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    lp, idx = torch.log_softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1).topk(k)
    labels = torch.tensor([1, -100, 3, 4, -100, 0])
    sw = torch.rand(N, generator=g, dtype=torch.float64)
    for kind in ("forward", "reverse", "jsd"):
        kw = dict(residual="uniform", labels=labels, sample_weight=sw, reduction="none")
        if kind == "jsd":
            loss = fxt.jsd_with_topk_teacher(s, idx, lp, beta=0.3, **kw)
        else:
            loss = fxt.kl_div_with_topk_teacher(s, idx, lp, direction=kind, **kw)
        go = torch.randn(N, generator=g, dtype=torch.float64)
        (gs,) = torch.autograd.grad(loss, s, go)
        w = ((labels != -100) * sw).numpy()
        lt = dense_teacher(idx.numpy(), lp.numpy(), C, "uniform")
        rl, rg = reference(s.detach().numpy(), lt, kind, 0.3, 1.0, "none", w)
        np.testing.assert_allclose(loss.detach().numpy(), rl, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(gs.numpy(), rg * go.numpy()[:, None], atol=1e-14)


def test_torch_errors(torch_mods):
    torch, F, fxt = torch_mods
    N, C, k = 4, 10, 3
    s = torch.randn(N, C, requires_grad=True)
    lp, idx = torch.log_softmax(torch.randn(N, C), -1).topk(k)
    with pytest.raises(ValueError, match="teacher_logprobs requires grad"):
        fxt.kl_div_with_topk_teacher(s, idx, lp.clone().requires_grad_())
    with pytest.raises(ValueError, match="out of range"):
        fxt.kl_div_with_topk_teacher(s, idx + C, lp)
    # a sample_weight that requires grad would silently get none: refused, as the dense wrapper
    sw = torch.rand(N, requires_grad=True)
    for f in (fxt.kl_div_with_topk_teacher, fxt.jsd_with_topk_teacher):
        with pytest.raises(RuntimeError, match="sample_weight.*requires_grad=True"):
            f(s, idx, lp, sample_weight=sw)
    with torch.no_grad():
        fxt.kl_div_with_topk_teacher(s, idx, lp, sample_weight=sw)  # nothing to differentiate
    fxt.kl_div_with_topk_teacher(s, idx, lp, sample_weight=sw.detach()).backward()
    # a float mask is refused (mask is boolean), so it cannot carry a gradient either
    with pytest.raises(TypeError, match="mask must be boolean"):
        fxt.kl_div_with_topk_teacher(s, idx, lp, mask=torch.ones(N, requires_grad=True))
    # torch.func: the library's clear refusal (it was PyTorch's "it must override the
    # setup_context staticmethod"), also with a negative sample_weight
    for f in (fxt.kl_div_with_topk_teacher, fxt.jsd_with_topk_teacher):
        for run in (
            lambda f=f: torch.func.grad(lambda a: f(a, idx, lp))(s.detach()),
            lambda f=f: torch.func.vmap(lambda a: f(a, idx, lp, sample_weight=-torch.ones(N)))(
                s.detach()[None]
            ),
            lambda f=f: torch.func.vmap(lambda w: f(s, idx, lp, sample_weight=w))(torch.ones(2, N)),
        ):
            with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
                run()
    loss = fxt.kl_div_with_topk_teacher(s, idx, lp)
    # no gradient asked for: the loss alone
    with torch.no_grad():
        l0 = fxt.kl_div_with_topk_teacher(s, idx, lp)
    torch.testing.assert_close(l0, loss.detach())


SECOND = [
    ("renormalize", "forward", None, "mean", 1.0),
    ("renormalize", "jsd", 0.3, "sum", 2.0),
    ("uniform", "forward", None, "none", 2.0),
    ("uniform", "reverse", None, "mean", 1.0),
    ("uniform", "jsd", 1.0, "none", 1.0),
]


@pytest.mark.parametrize("residual,kind,beta,reduction,T", SECOND)
def test_torch_second_order(torch_mods, residual, kind, beta, reduction, T):
    """create_graph=True (hvp, jvp, hessian, gradient penalties) gives the true second-order
    terms: those of the dense wrapper on the dense teacher logits (F.kl_div for "forward"),
    not the zeros of a constant gradient."""
    torch, F, fxt = torch_mods
    g = torch.Generator().manual_seed(3)
    N, C, k = 4, 9, 3
    dt = torch.float64
    s = torch.randn(N, C, generator=g, dtype=dt)
    v = torch.randn(N, C, generator=g, dtype=dt)
    lp, idx = torch.log_softmax(2 * torch.randn(N, C, generator=g, dtype=dt), -1).topk(k)
    lt = torch.from_numpy(dense_teacher(idx.numpy(), lp.numpy(), C, residual))
    labels = torch.tensor([0, -100, 2, 3])
    sw = torch.rand(N, generator=g, dtype=dt)
    kw = dict(residual=residual, temperature=T, reduction=reduction, labels=labels)
    kw["sample_weight"] = sw
    dkw = {key: val for key, val in kw.items() if key != "residual"}
    go = (
        torch.randn(N, generator=g, dtype=dt)
        if reduction == "none"
        else torch.tensor(1.7, dtype=dt)
    )

    if kind == "jsd":

        def f(x):
            return (fxt.jsd_with_topk_teacher(x, idx, lp, beta=beta, **kw) * go).sum()

        def fr(x):
            return (fxt.jsd_with_logits(x, lt, beta=beta, **dkw) * go).sum()
    else:

        def f(x):
            return (fxt.kl_div_with_topk_teacher(x, idx, lp, direction=kind, **kw) * go).sum()

        def fr(x):
            return (fxt.kl_div_with_logits(x, lt, direction=kind, **dkw) * go).sum()

    for a, b in (
        (torch.autograd.functional.hvp(f, s, v)[1], torch.autograd.functional.hvp(fr, s, v)[1]),
        (torch.autograd.functional.jvp(f, s, v)[1], torch.autograd.functional.jvp(fr, s, v)[1]),
        (torch.autograd.functional.hessian(f, s), torch.autograd.functional.hessian(fr, s)),
    ):
        assert b.abs().sum() > 1e-3  # a real second-order term, not the zeros of the bug
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # a gradient penalty L + |g|^2
    pen = []
    for fn in (f, fr):
        x = s.clone().requires_grad_()
        L = fn(x)
        (gx,) = torch.autograd.grad(L, x, create_graph=True)
        assert gx.requires_grad
        pen.append(torch.autograd.grad(L + (gx**2).sum(), x)[0])
    torch.testing.assert_close(pen[0], pen[1], rtol=1e-10, atol=1e-12)
    if kind == "forward" and reduction == "mean" and T == 1.0:
        # and against PyTorch's own KL on the dense teacher (-inf made very negative)
        w = sw * (labels != -100)

        def fk(x):
            ls = F.log_softmax(x, -1)
            lq = F.log_softmax(torch.where(torch.isinf(lt), -1e30, lt), -1)
            rows = F.kl_div(ls, lq, log_target=True, reduction="none").sum(-1)
            return (rows * w).sum() / w.sum() * go

        hv = torch.autograd.functional.hvp(fk, s, v)[1]
        torch.testing.assert_close(torch.autograd.functional.hvp(f, s, v)[1], hv)


def test_torch_second_order_16bit(torch_mods):
    torch, F, fxt = torch_mods
    g = torch.Generator().manual_seed(4)
    N, C, k = 3, 8, 2
    s32 = torch.randn(N, C, generator=g).to(torch.bfloat16).float()
    lp, idx = torch.log_softmax(torch.randn(N, C, generator=g), -1).topk(k)
    out = []
    for x in (s32.to(torch.bfloat16).requires_grad_(), s32.clone().requires_grad_()):
        L = fxt.kl_div_with_topk_teacher(x, idx, lp, residual="uniform")
        (gx,) = torch.autograd.grad(L, x, create_graph=True)
        (h,) = torch.autograd.grad((gx.float() ** 2).sum(), x)
        assert h.dtype == x.dtype and h.abs().sum() > 0
        out.append(h.float())
    torch.testing.assert_close(out[0], out[1], rtol=2e-2, atol=1e-3)


# Dynamo, resuming after a graph break, looks at .grad of the non-leaf tensors it carries over
# and hides PyTorch's warning through warnings.showwarning, which this suite's
# filterwarnings = error bypasses (a PyTorch internal, silent outside -W error).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_graph_break(torch_mods, backend):
    """torch.compile runs the call eagerly (a graph break) around the compiled rest: the same
    loss and gradient as eager, not a dynamo error from the NumPy layer."""
    torch, F, fxt = torch_mods
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    N, C, k = 4, 10, 3
    s = torch.randn(N, C, generator=g, dtype=torch.float64)
    lp, idx = torch.log_softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1).topk(k)
    sw = torch.rand(N, generator=g, dtype=torch.float64)

    def fn(x):
        y = 2.0 * x + 1.0  # compiled around the call
        a = fxt.kl_div_with_topk_teacher(y, idx, lp, residual="uniform", sample_weight=sw)
        b = fxt.jsd_with_topk_teacher(y, idx, lp, beta=0.3, reduction="none")
        return a + (b * b).sum()

    res = []
    for f in (fn, torch.compile(fn, backend=backend)):
        x = s.clone().requires_grad_()
        L = f(x)
        L.backward()
        res.append((L.detach(), x.grad))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-13, atol=0)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-13, atol=1e-15)
    # errors still surface as themselves
    with pytest.raises(ValueError, match="out of range"):
        torch.compile(lambda x: fxt.kl_div_with_topk_teacher(x, idx + C, lp), backend=backend)(s)
    # fullgraph=True cannot break the graph: refused, naming the reason
    with pytest.raises(torch._dynamo.exc.Unsupported, match="fastxent top-k teacher"):
        torch.compile(fn, backend=backend, fullgraph=True)(s)


def test_torch_bfloat16(torch_mods):
    torch, F, fxt = torch_mods
    N, C, k = 5, 16, 4
    s = torch.randn(N, C).to(torch.bfloat16).requires_grad_()
    lp, idx = torch.log_softmax(torch.randn(N, C), -1).topk(k)
    loss = fxt.kl_div_with_topk_teacher(s, idx, lp, residual="uniform")
    loss.backward()
    s32 = s.detach().float().requires_grad_()
    l32 = fxt.kl_div_with_topk_teacher(s32, idx, lp, residual="uniform")
    l32.backward()
    assert s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s.grad, s32.grad.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(loss.float(), l32.to(torch.bfloat16).float())
