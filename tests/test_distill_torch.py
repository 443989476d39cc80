"""fastxent.torch's distillation losses (kl_div_with_logits, jsd_with_logits and their modules)
against PyTorch's own F.kl_div (and Liger-Kernel's JSD written in PyTorch ops): values, the
gradients with respect to student and teacher, gradcheck / gradgradcheck, forward mode,
torch.func, torch.compile and the error paths."""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastxent.torch as fxt  # noqa: E402
from fastxent import _distill  # noqa: E402

KINDS = [
    ("forward", None),
    ("reverse", None),
    ("jsd", 0.5),
    ("jsd", 0.2),
    ("jsd", 0.0),
    ("jsd", 1.0),
]
REDUCTIONS = ["mean", "sum", "none"]


def call(kind, beta, s, t, **kw):
    if kind == "jsd":
        return fxt.jsd_with_logits(s, t, beta=beta, **kw)
    return fxt.kl_div_with_logits(s, t, direction=kind, **kw)


def torch_reference(s, t, kind, beta=None, T=1.0, reduction="mean", w=None):
    """The loss from PyTorch's F.kl_div(log_target=True); JSD by Liger-Kernel's formula
    beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p (beta = 0 / 1: the
    forward / reverse KL). w: row weights (the rows' shape) or None."""
    ls = F.log_softmax(s / T, -1)
    lt = F.log_softmax(t / T, -1)

    def kl(lb, la):  # KL(a || b) per row, F.kl_div(input=log b, target=log a)
        return F.kl_div(lb, la, log_target=True, reduction="none").sum(-1)

    if kind == "forward" or (kind == "jsd" and beta == 0.0):
        rows = kl(ls, lt)
    elif kind == "reverse" or (kind == "jsd" and beta == 1.0):
        rows = kl(lt, ls)
    else:
        lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
        rows = beta * kl(lm, lt) + (1 - beta) * kl(lm, ls)
    rows = rows * T * T
    if w is not None:
        rows = rows * w
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (w.sum() if w is not None else rows.numel())


def row_options(which, rows, gen):
    """(fastxent keywords, the row weights they mean) for one way of weighting rows."""
    if which == "plain":
        return {}, None
    labels = torch.randint(0, 5, rows, generator=gen)
    labels[(torch.rand(rows, generator=gen) < 0.3)] = -100
    labels.view(-1)[0] = 1  # at least one row counts
    keep = (labels != -100).double()
    if which == "labels":
        return {"labels": labels}, keep
    if which == "mask":
        return {"mask": labels != -100}, keep
    sw = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    return {"labels": labels, "sample_weight": sw}, keep * sw


def inputs(shape, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return s, t, gen


def max_rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))


# Measured worst cases over test_matches_pytorch's cases (relative to the largest entry):
# float64 loss 5.8e-16, gradients 1.8e-15; float32 (against float64 PyTorch on the same
# float32 values) loss 1.6e-7, gradients 3.9e-7. Bounds ~10x.
TOL = {torch.float64: (1e-14, 2e-14), torch.float32: (2e-6, 4e-6)}


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("which", ["plain", "labels", "mask", "weights"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_pytorch(kind, beta, reduction, which, dtype):
    s, t, gen = inputs((3, 4, 9), dtype)
    opts, w = row_options(which, (3, 4), gen)
    T = 1.7
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = call(kind, beta, s, t, temperature=T, reduction=reduction, **opts)
    assert loss.dtype == dtype
    assert loss.shape == ((3, 4) if reduction == "none" else ())
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    ref = torch_reference(s64, t64, kind, beta, T, reduction, w)
    go = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5  # non-uniform for "none"
    gs, gt = torch.autograd.grad(loss, (s, t), go.to(dtype))
    rs, rt = torch.autograd.grad(ref, (s64, t64), go)
    tl, tg = TOL[dtype]
    assert max_rel(loss, ref) < tl
    assert gs.dtype == dtype and gt.dtype == dtype
    assert max_rel(gs, rs) < tg
    assert max_rel(gt, rt) < tg
    if w is not None:  # rows of weight 0: exactly 0
        dead = (w == 0)[..., None].expand_as(gs)
        assert torch.all(gs[dead] == 0) and torch.all(gt[dead] == 0)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_forward_kl_is_batchmean(T):
    """The docstring's identity for a 2-D input: F.kl_div(..., reduction="batchmean") * T**2."""
    s, t, _ = inputs((6, 11), torch.float64, seed=3)
    got = fxt.kl_div_with_logits(s, t, temperature=T)
    ref = (
        F.kl_div(
            F.log_softmax(s / T, -1),
            F.log_softmax(t / T, -1),
            log_target=True,
            reduction="batchmean",
        )
        * T**2
    )
    assert abs(float(got) - float(ref)) < 1e-14 * abs(float(ref))


# 16-bit: the kernel computes in float32 (errors ~4e-7, as float32 above) and rounds the loss
# and each gradient entry once to the input's dtype: relative error at most the unit roundoff,
# 2^-8 = 3.9e-3 for bfloat16 and 2^-11 = 4.9e-4 for float16. Measured against float64 PyTorch
# on the same 16-bit values (relative to the largest entry): bfloat16 loss 2.8e-3, gradients
# 3.3e-3; float16 loss 3.6e-4, gradients 3.8e-4. Bounds: the unit roundoff plus 1e-5.
HALF_TOL = {torch.bfloat16: 2.0**-8 + 1e-5, torch.float16: 2.0**-11 + 1e-5}


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half(kind, beta, reduction, dtype):
    s, t, gen = inputs((5, 33), dtype, seed=1)
    opts, w = row_options("weights", (5,), gen)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = call(kind, beta, s, t, temperature=0.8, reduction=reduction, **opts)
    assert loss.dtype == dtype  # cross_entropy's convention: the input's dtype
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    ref = torch_reference(s64, t64, kind, beta, 0.8, reduction, w)
    go = torch.ones(ref.shape, dtype=torch.float64)
    gs, gt = torch.autograd.grad(loss, (s, t), go.to(dtype))
    rs, rt = torch.autograd.grad(ref, (s64, t64), go)
    assert gs.dtype == dtype and gt.dtype == dtype
    assert max_rel(loss, ref) < HALF_TOL[dtype]
    assert max_rel(gs, rs) < HALF_TOL[dtype]
    assert max_rel(gt, rt) < HALF_TOL[dtype]


def test_loss_dtype_follows_cross_entropy():
    z = torch.randn(4, 6).bfloat16()
    ce = fxt.cross_entropy(z, torch.tensor([0, 1, 2, 3]))
    assert fxt.kl_div_with_logits(z, z.flip(0)).dtype == ce.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce = fxt.cross_entropy(z, torch.tensor([0, 1, 2, 3]))
        kl = fxt.jsd_with_logits(z, z.flip(0))
    assert kl.dtype == ce.dtype == torch.float32


def test_teacher_detached(monkeypatch):
    """A detached teacher: no teacher gradient is computed (the kernel is not asked for one)
    and teacher.grad stays None; a teacher that requires grad gets its gradient."""
    calls = []
    run = _distill._run

    def spy(*args):
        calls.append((args[5], args[6]))  # want_grad, teacher_grad
        return run(*args)

    monkeypatch.setattr(_distill, "_run", spy)
    s, t, _ = inputs((4, 7), torch.float32)
    s.requires_grad_(True)
    fxt.kl_div_with_logits(s, t).backward()
    assert calls == [(True, False)]
    assert t.grad is None and s.grad is not None
    t.requires_grad_(True)
    calls.clear()
    fxt.jsd_with_logits(s, t).backward()
    assert calls == [(True, True)]
    assert t.grad is not None and float(t.grad.abs().sum()) > 0
    calls.clear()
    with torch.no_grad():
        fxt.kl_div_with_logits(s, t)
    assert calls == [(False, False)]


def test_retain_graph_twice():
    """A second backward through the same graph gives the same gradients (the first may hand
    out the fused gradient itself)."""
    s, t, _ = inputs((4, 7), torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = fxt.jsd_with_logits(s, t, beta=0.3)
    g1 = [g.clone() for g in torch.autograd.grad(loss, (s, t), retain_graph=True)]
    g2 = torch.autograd.grad(loss, (s, t), torch.tensor(2.0, dtype=torch.float64))
    g3 = torch.autograd.grad(loss, (s, t))
    for a, b, c in zip(g1, g2, g3):
        assert torch.equal(a * 2, b) and torch.equal(a, c)


def test_all_rows_ignored():
    """ "mean" over no counted row: 0, with zero gradients (first and second order)."""
    s, t, _ = inputs((3, 5), torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    labels = torch.full((3,), -100)
    loss = fxt.kl_div_with_logits(s, t, labels=labels)
    assert loss.item() == 0.0
    gs, gt = torch.autograd.grad(loss, (s, t), create_graph=True)
    assert torch.all(gs == 0) and torch.all(gt == 0)
    gs, gt = torch.autograd.grad(fxt.kl_div_with_logits(s, t, labels=labels), (s, t))
    assert torch.all(gs == 0) and torch.all(gt == 0)


def _fn(kind, beta, reduction, opts, T=1.3):
    return lambda s, t: call(kind, beta, s, t, temperature=T, reduction=reduction, **opts)


# gradcheck's forward-mode check builds its tangents with torch.jit.script, deprecated in torch
# 2.13 (a warning, an error under this suite); torch.func.jvp does too.
JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")


@JIT_WARNING
@pytest.mark.parametrize(
    "kind,beta,reduction",
    # every kind once, every reduction twice (gradgradcheck costs seconds per case)
    [(k, b, REDUCTIONS[i % 3]) for i, (k, b) in enumerate(KINDS)],
)
def test_gradcheck(kind, beta, reduction):
    """First order and forward mode (the fused jvp) by finite differences, and second order
    (create_graph=True through the PyTorch-ops reference) by gradgradcheck, in float64."""
    s, t, gen = inputs((2, 3, 5), torch.float64, seed=2, scale=1.5)
    opts, _ = row_options("weights", (2, 3), gen)
    s.requires_grad_(True)
    t.requires_grad_(True)
    f = _fn(kind, beta, reduction, opts)
    assert torch.autograd.gradcheck(f, (s, t), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (s, t))


def test_second_order_student_only():
    """Double backward with a detached teacher: the Hessian-vector product of the reference."""
    s, t, gen = inputs((3, 6), torch.float64, seed=4)
    s.requires_grad_(True)
    for kind, beta in KINDS:
        f = _fn(kind, beta, "mean", {})
        (g,) = torch.autograd.grad(f(s, t), s, create_graph=True)
        v = torch.randn(s.shape, generator=gen, dtype=s.dtype)
        (hv,) = torch.autograd.grad((g * v).sum(), s)
        s2 = s.detach().requires_grad_(True)
        (g2,) = torch.autograd.grad(torch_reference(s2, t, kind, beta, 1.3), s2, create_graph=True)
        (hv2,) = torch.autograd.grad((g2 * v).sum(), s2)
        assert max_rel(hv, hv2) < 1e-13  # measured 1.0e-15
        assert float(hv.abs().max()) > 0


@JIT_WARNING
@pytest.mark.parametrize("kind,beta", KINDS)
def test_forward_ad_and_torch_func(kind, beta):
    """Forward mode (torch.autograd.forward_ad, the fused jvp), torch.func.jvp, grad and vmap
    (through the PyTorch-ops reference) against PyTorch's jvp of the reference, float64."""
    import torch.autograd.forward_ad as fwAD

    s, t, gen = inputs((3, 4, 6), torch.float64, seed=5)
    opts, w = row_options("labels", (3, 4), gen)
    vs = torch.randn(s.shape, generator=gen, dtype=s.dtype)
    vt = torch.randn(t.shape, generator=gen, dtype=t.dtype)
    # Measured (relative to the largest entry): values 6.1e-16, tangents and gradients up to
    # 9.9e-15 (over several draws of the tangents); bounds 1e-14 / 1e-13.
    for reduction in REDUCTIONS:
        f = _fn(kind, beta, reduction, opts)

        def ref(a, b, reduction=reduction):
            return torch_reference(a, b, kind, beta, 1.3, reduction, w)

        r, rt = torch.func.jvp(ref, (s, t), (vs, vt))
        got, gt = torch.func.jvp(f, (s, t), (vs, vt))
        assert max_rel(got, r) < 1e-14
        assert max_rel(gt, rt) < 1e-13
        with fwAD.dual_level():
            out = f(fwAD.make_dual(s, vs), fwAD.make_dual(t, vt))
            p, tan = fwAD.unpack_dual(out)
        assert max_rel(p, r) < 1e-14
        assert max_rel(tan, rt) < 1e-13
    f = _fn(kind, beta, "mean", opts)
    g = torch.func.grad(f, argnums=(0, 1))(s, t)
    s2, t2 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    rg = torch.autograd.grad(torch_reference(s2, t2, kind, beta, 1.3, "mean", w), (s2, t2))
    assert max_rel(g[0], rg[0]) < 1e-13
    assert max_rel(g[1], rg[1]) < 1e-13
    per_sample = torch.func.vmap(_fn(kind, beta, "sum", {}))(s, t)
    expected = torch.stack(
        [call(kind, beta, s[i], t[i], temperature=1.3, reduction="sum") for i in range(3)]
    )
    assert max_rel(per_sample, expected) < 1e-14


def test_modules():
    s, t, gen = inputs((4, 3, 8), torch.float32, seed=6)
    opts, _ = row_options("weights", (4, 3), gen)
    m = fxt.KLDivWithLogitsLoss(direction="reverse", temperature=2.0, reduction="sum")
    assert torch.equal(
        m(s, t, **opts),
        fxt.kl_div_with_logits(s, t, direction="reverse", temperature=2.0, reduction="sum", **opts),
    )
    j = fxt.JSDWithLogitsLoss(beta=0.25, reduction="none")
    assert torch.equal(j(s, t), fxt.jsd_with_logits(s, t, beta=0.25, reduction="none"))
    assert "beta=0.25" in repr(j) and "direction='reverse'" in repr(m)
    with pytest.raises(ValueError, match="direction"):
        fxt.KLDivWithLogitsLoss(direction="both")
    with pytest.raises(ValueError, match="beta"):
        fxt.JSDWithLogitsLoss(beta=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        fxt.KLDivWithLogitsLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        fxt.JSDWithLogitsLoss(reduction="batchmean")


def _compile_available():
    try:
        import torch._dynamo  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _compile_available(), reason="torch.compile unavailable")
@pytest.mark.parametrize("kind,beta", [("forward", None), ("jsd", 0.4)])
def test_torch_compile(kind, beta):
    """Inside torch.compile(fullgraph=True) the custom op gives eager's values and gradients
    (bitwise: the same kernel call). aot_eager keeps the test fast (no C++ code generation)."""
    torch._dynamo.reset()
    s, t, gen = inputs((2, 3, 10), torch.float32, seed=7)
    opts, _ = row_options("weights", (2, 3), gen)

    def f(s, t):
        return call(kind, beta, s * 1.0, t, temperature=1.5, reduction="none", **opts).sum() * 2

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    for teacher_grad in (False, True):
        s1, t1 = s.clone().requires_grad_(True), t.clone().requires_grad_(teacher_grad)
        s2, t2 = s.clone().requires_grad_(True), t.clone().requires_grad_(teacher_grad)
        a, b = cf(s1, t1), f(s2, t2)
        a.backward()
        b.backward()
        assert torch.equal(a, b) and torch.equal(s1.grad, s2.grad)
        if teacher_grad:
            assert torch.equal(t1.grad, t2.grad)
        else:
            assert t1.grad is None
    with torch.no_grad():
        assert torch.equal(cf(s, t), f(s, t))


def test_meta_shape_inference():
    s = torch.empty(3, 4, 10, device="meta")
    assert fxt.kl_div_with_logits(s, s, reduction="none").shape == (3, 4)
    assert fxt.jsd_with_logits(s, s).shape == ()
    with pytest.raises(ValueError, match="shape"):
        fxt.kl_div_with_logits(s, torch.empty(3, 4, 9, device="meta"))


def test_errors():
    s, t, _ = inputs((3, 5), torch.float32)
    with pytest.raises(ValueError, match="shape"):
        fxt.kl_div_with_logits(s, t[:, :4])
    with pytest.raises(TypeError, match="dtype"):
        fxt.kl_div_with_logits(s, t.double())
    with pytest.raises(TypeError, match="float32"):
        fxt.kl_div_with_logits(s.int(), t.int())
    with pytest.raises(TypeError, match="Tensor"):
        fxt.jsd_with_logits(s.numpy(), t)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            fxt.kl_div_with_logits(s, t, temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        fxt.kl_div_with_logits(s, t, temperature="2")
    for bad in (1e-31, 1e31):
        with pytest.raises(ValueError, match=r"temperature must be in \[1e-30, 100\]"):
            fxt.jsd_with_logits(s, t, temperature=bad)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            fxt.jsd_with_logits(s, t, beta=bad)
    with pytest.raises(ValueError, match="direction"):
        fxt.kl_div_with_logits(s, t, direction="backward")
    with pytest.raises(ValueError, match="reduction"):
        fxt.kl_div_with_logits(s, t, reduction="batchmean")
    with pytest.raises(TypeError, match="labels"):
        fxt.kl_div_with_logits(s, t, labels=torch.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        fxt.kl_div_with_logits(s, t, labels=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask"):
        fxt.kl_div_with_logits(s, t, mask=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="sample_weight"):
        fxt.kl_div_with_logits(s, t, sample_weight=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(RuntimeError, match="sample_weight"):
        fxt.kl_div_with_logits(s, t, sample_weight=torch.ones(3, requires_grad=True))
    # The same checks where no value is read (torch.func transforms).
    with pytest.raises(ValueError, match="shape"):
        torch.func.grad(lambda a: fxt.kl_div_with_logits(a, t[:, :4]))(s)
    with pytest.raises(ValueError, match="temperature"):
        torch.func.grad(lambda a: fxt.kl_div_with_logits(a, t, temperature=-1.0))(s)
    with pytest.raises(ValueError, match=r"temperature must be in \[1e-30, 100\]"):
        torch.func.grad(lambda a: fxt.kl_div_with_logits(a, t, temperature=1e31))(s)
    with pytest.raises(ValueError, match=r"temperature must be in \[1e-30, 100\]"):
        fxt.JSDWithLogitsLoss(temperature=1e-31)


@JIT_WARNING
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_torch_func_refuses_bad_sample_weight(kind, bad):
    """Under torch.func (the loss in PyTorch ops, no kernel) a negative or non-finite
    sample_weight is the kernel path's ValueError too: it was accepted silently (a negative
    weight gave a loss and gradients, NaN gave NaN). Every transform, a vmapped
    sample_weight with one bad row in its batch, and a NumPy sample_weight."""
    s, t, _ = inputs((3, 5), torch.float64)
    w = torch.tensor([1.0, bad, 2.0], dtype=torch.float64)
    msg = "sample_weight must be finite and >= 0"
    with pytest.raises(ValueError, match=msg):
        call(kind, 0.5, s, t, sample_weight=w)  # the kernel's path
    f = lambda a: call(kind, 0.5, a, t, sample_weight=w)  # noqa: E731
    wn = w.numpy()
    for run in (
        lambda: torch.func.grad(f)(s),
        lambda: torch.func.vmap(f)(s[None]),
        lambda: torch.func.jacrev(f)(s),
        lambda: torch.func.jvp(f, (s,), (s,)),
        lambda: torch.func.hessian(f)(s),
        lambda: torch.func.vmap(torch.func.grad(f))(s[None]),
        lambda: torch.func.grad(lambda a: call(kind, 0.5, a, t, sample_weight=wn))(s),
    ):
        with pytest.raises(ValueError, match=msg):
            run()
    ok = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    batch = torch.stack([ok, w])
    with pytest.raises(ValueError, match=msg):
        torch.func.vmap(lambda v: call(kind, 0.5, s, t, sample_weight=v))(batch)
    # valid weights still go through, equal to the kernel's gradient
    g = torch.func.grad(lambda a: call(kind, 0.5, a, t, sample_weight=ok))(s)
    a = s.clone().requires_grad_(True)
    call(kind, 0.5, a, t, sample_weight=ok).backward()
    torch.testing.assert_close(g, a.grad)


def test_no_buffer_written_on_error():
    """A failed call leaves the tensors as they were (the checks come first)."""
    s, t, _ = inputs((3, 5), torch.float32)
    s0, t0 = s.clone(), t.clone()
    s.requires_grad_(True)
    t.requires_grad_(True)
    with pytest.raises(ValueError):
        fxt.jsd_with_logits(s, t, sample_weight=torch.tensor([1.0, float("nan"), 1.0]))
    assert torch.equal(s.detach(), s0) and torch.equal(t.detach(), t0)
    assert s.grad is None and t.grad is None


def test_numpy_row_weights_accepted():
    s, t, _ = inputs((3, 5), torch.float64)
    m = np.array([True, False, True])
    a = fxt.kl_div_with_logits(s, t, mask=m, reduction="none")
    assert float(a[1]) == 0.0 and float(a[0]) > 0


def test_teacher_only_gradient():
    """A detached student and a teacher that requires grad: the teacher's gradient alone."""
    s, t, _ = inputs((4, 3, 6), torch.float64, seed=8)
    t.requires_grad_(True)
    fxt.jsd_with_logits(s, t, beta=0.7, reduction="sum").backward()
    t2 = t.detach().requires_grad_(True)
    torch_reference(s, t2, "jsd", 0.7, reduction="sum").backward()
    assert s.grad is None
    assert max_rel(t.grad, t2.grad) < 2e-14  # as test_matches_pytorch's float64 gradients


@pytest.mark.parametrize("kind,beta", [("forward", None), ("reverse", None), ("jsd", 0.3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_only_the_needed_gradients(monkeypatch, kind, beta, reduction):
    """The kernel is asked for the gradients autograd needs and no other (student only,
    teacher only, both, neither under no_grad), and the loss and gradients are bitwise those
    of one NumPy call computing both."""
    asked = []
    distill = _distill._core.distill

    def spy(*args):
        asked.append((args[9] is not None, args[10] is not None))  # grad_student, grad_teacher
        return distill(*args)

    s0, t0, _ = inputs((3, 4, 6), torch.float64, seed=5)
    np_kw = dict(beta=beta) if kind == "jsd" else dict(direction=kind)
    np_fn = (
        _distill.jsd_with_logits_with_grad
        if kind == "jsd"
        else _distill.kl_div_with_logits_with_grad
    )
    want_loss, want_gs, want_gt = np_fn(
        s0.numpy(), t0.numpy(), teacher_grad=True, reduction=reduction, temperature=1.5, **np_kw
    )
    monkeypatch.setattr(_distill._core, "distill", spy)
    for s_req, t_req, grad_mode in [
        (True, False, True),
        (False, True, True),
        (True, True, True),
        (True, True, False),
    ]:
        asked.clear()
        s = s0.clone().requires_grad_(s_req)
        t = t0.clone().requires_grad_(t_req)
        with torch.set_grad_enabled(grad_mode):
            loss = call(kind, beta, s, t, reduction=reduction, temperature=1.5)
        assert asked == [(s_req and grad_mode, t_req and grad_mode)]
        assert torch.equal(loss.detach(), torch.from_numpy(np.asarray(want_loss)))
        if grad_mode:
            loss.sum().backward()
        assert asked == [(s_req and grad_mode, t_req and grad_mode)]  # backward: no new call
        for x, req, want in ((s, s_req, want_gs), (t, t_req, want_gt)):
            if req and grad_mode:
                assert torch.equal(x.grad, torch.from_numpy(want))
            else:
                assert x.grad is None


def test_docstring_examples():
    import doctest

    from fastxent import _torch_distill

    assert doctest.testmod(_torch_distill, verbose=False).failed == 0
    for name in ("kl_div_with_logits", "jsd_with_logits", "KLDivWithLogitsLoss"):
        assert name in fxt.__all__ and getattr(fxt, name) is getattr(_torch_distill, name)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_infinite_logits_second_order(kind, beta):
    """-inf logits (a class both give probability 0, and one only the teacher excludes): the
    create_graph=True gradients (PyTorch-ops reference) equal the kernel's, with no NaN, and the
    Hessian-vector product is finite."""
    ninf = float("-inf")
    s = torch.tensor([[0.0, ninf, 1.0, 0.5], [2.0, ninf, -1.0, 0.3]], dtype=torch.float64)
    t = torch.tensor([[0.0, ninf, 2.0, ninf], [1.0, ninf, 0.5, 0.2]], dtype=torch.float64)
    if kind == "reverse" or (kind == "jsd" and beta == 1.0):
        s, t = t, s  # the reverse KL needs the student's zeros inside the teacher's
    s.requires_grad_(True)
    t.requires_grad_(True)
    f = _fn(kind, beta, "mean", {})
    first = torch.autograd.grad(f(s, t), (s, t))
    g = torch.autograd.grad(f(s, t), (s, t), create_graph=True)
    for a, b in zip(g, first):
        assert torch.all(torch.isfinite(a))
        assert max_rel(a, b) < 1e-14  # measured 7.2e-16
    (hv,) = torch.autograd.grad((g[0] * torch.ones_like(s)).sum(), s)
    assert torch.all(torch.isfinite(hv))


def test_narrow_label_dtype_ignore_index():
    """uint8 labels: ignore_index=-100 matches no label (it is not wrapped to 156) in the
    kernel path and in the PyTorch-ops reference (second order, torch.func, torch.compile)."""
    s, t, _ = inputs((2, 5), torch.float64)
    labels = torch.tensor([156, 3], dtype=torch.uint8)
    eager = fxt.kl_div_with_logits(s, t, labels=labels, reduction="none")
    assert torch.all(eager > 0)
    # torch.func runs the PyTorch-ops reference (values cannot be read there)
    ref = torch.func.grad(lambda a: fxt.kl_div_with_logits(a, t, labels=labels))(s)
    s2 = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fxt.kl_div_with_logits(s2, t, labels=labels), s2)
    torch.testing.assert_close(ref, g)
    assert torch.all(g[0].abs() > 0)  # the row labelled 156 counts


# forward_ad's first use scripts a helper: torch.jit.script, deprecated in torch 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_sample_weight_tangent_raises():
    """A forward-mode tangent of sample_weight was dropped (tangent None, the derivative
    silently 0); it raises, as a sample_weight that requires grad does."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    sw = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    for fn in (fxt.kl_div_with_logits, fxt.jsd_with_logits):
        for tangent_student in (False, True):
            with fwAD.dual_level():
                ss = fwAD.make_dual(s, torch.ones_like(s)) if tangent_student else s
                d = fwAD.make_dual(sw, torch.ones_like(sw))
                with pytest.raises(RuntimeError, match="sample_weight.*forward-mode tangent"):
                    fn(ss, t, sample_weight=d)
