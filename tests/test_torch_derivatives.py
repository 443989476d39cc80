"""Derivatives of fastxent.torch.cross_entropy beyond the first: none may be silently wrong.

What PyTorch's own tests check for F.cross_entropy (its OpInfo "nn.functional.cross_entropy"
in torch/testing/_internal/common_methods_invocations.py, sample_inputs_cross_entropy, as of
torch 2.13.0, commit cf30153c4c131c8164ee7798e5022d810682e2cb: gradcheck, gradgradcheck,
forward-mode gradcheck, batched gradients, probability targets that require grad), written
anew here for fastxent, plus fastxent's own options and the paths that must raise. Everything
in float64, where gradcheck's finite differences are meaningful.
"""

from __future__ import annotations

import itertools
import zlib

import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd import gradcheck, gradgradcheck  # noqa: E402

import fastxent.torch as fxt  # noqa: E402

D64 = torch.float64
C = 3


def _samples():
    """(name, input shape, kwargs, probability target?): the OpInfo's sample set (shapes
    (2, 3) and (2, 3) followed by 1, (1, 2), (1, 2, 3) trailing dimensions; each reduction;
    class weights with each reduction; ignore_index), each with class-index and probability
    targets (ignore_index with class indices only)."""
    shapes = [(2, C), (2, C, 1), (2, C, 1, 2), (2, C, 1, 2, 3)]
    configs = [(s, {}) for s in shapes]
    configs += [((2, C), dict(reduction=r)) for r in ("mean", "sum", "none")]
    configs += [((2, C), dict(weight="w", reduction=r)) for r in ("mean", "sum", "none")]
    configs += [((2, C), dict(ignore_index=1))]
    for (shape, kw), probs in itertools.product(configs, (False, True)):
        if probs and "ignore_index" in kw:
            continue
        yield (f"{shape}-{kw}-{'probs' if probs else 'index'}", shape, kw, probs)


SAMPLES = list(_samples())
assert len(SAMPLES) == 21

# fastxent's options, each alone and all together (class-index targets with an ignored row).
OPTIONS = {
    "label_smoothing": dict(label_smoothing=0.2),
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=2.5),
    "logit_scale": dict(logit_scale=1.7),
    "sample_weight": dict(sample_weight="s"),
    "normalizer": dict(normalizer=3.0),
    "all": dict(
        label_smoothing=0.1,
        z_loss=0.05,
        softcap=2.5,
        logit_scale=1.7,
        sample_weight="s",
        weight="w",
    ),
}


def _make(shape, kw, probs, gen, target_grad=True):
    x = torch.randn(shape, dtype=D64, generator=gen).requires_grad_(True)
    rows = (shape[0],) + tuple(shape[2:])
    if probs:
        t = torch.rand(shape, dtype=D64, generator=gen).requires_grad_(target_grad)
    else:
        t = torch.randint(0, shape[1], rows, generator=gen)
        if kw.get("ignore_index") == 1:
            t.view(-1)[0] = 1
    kw = dict(kw)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(shape[1], dtype=D64, generator=gen) + 0.5
    if kw.get("sample_weight") == "s":
        kw["sample_weight"] = torch.rand(rows, dtype=D64, generator=gen) + 0.5
    return x, t, kw


def _fn(t, kw, target_is_input):
    if target_is_input:
        return lambda z, tt: fxt.cross_entropy(z, tt, **kw)
    return lambda z: fxt.cross_entropy(z, t, **kw)


# gradcheck's batched-gradient check goes through torch's legacy vmap, which scripts a helper
# with torch.jit.script, deprecated in torch 2.13 (a warning, an error under this suite).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name,shape,kw,probs", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_opinfo_samples_gradcheck_gradgradcheck_forward_ad(name, shape, kw, probs):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x, t, kw = _make(shape, kw, probs, gen)
    f = _fn(t, kw, probs)
    inputs = (x, t) if probs else (x,)
    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)
    assert gradcheck(
        f,
        inputs,
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )
    # Batched gradients (autograd.grad with is_grads_batched), as OpInfo's check_batched_grad.
    assert gradcheck(f, inputs, check_batched_grad=True)


@pytest.mark.parametrize("opt", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["rows", "classes_dim1"])
def test_options_second_order_and_forward_mode(opt, reduction, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{opt}-{reduction}-{layout}".encode()))
    shape = (5, 4) if layout == "rows" else (2, 4, 3)
    x, t, kw = _make(shape, dict(OPTIONS[opt], reduction=reduction), False, gen)
    t.view(-1)[1] = -100  # an ignored row
    f = _fn(t, kw, False)
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))
    assert gradcheck(
        f,
        (x,),
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )


@pytest.mark.parametrize("opt", ["label_smoothing", "all"])
def test_probability_target_options_second_order(opt):
    gen = torch.Generator().manual_seed(11)
    kw = {k: v for k, v in OPTIONS[opt].items()}
    x, t, kw = _make((4, 5), kw, True, gen)
    f = _fn(t, kw, True)
    assert gradcheck(f, (x, t))
    assert gradgradcheck(f, (x, t))
    assert gradcheck(
        f,
        (x, t),
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )


def test_hessian_and_gradient_penalty_match_pytorch():
    # The reported cases: the Hessian was all zeros and a gradient penalty added exactly 0.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, dtype=D64, generator=gen)
    t = torch.tensor([0, 2, 4, 1])
    H = torch.autograd.functional.hessian(lambda z: fxt.cross_entropy(z, t), x)
    H_ref = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z, t), x)
    assert H_ref.abs().max() > 0.01
    torch.testing.assert_close(H, H_ref, rtol=1e-12, atol=1e-14)

    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fxt.cross_entropy(xr, t), xr, create_graph=True)
    assert g.requires_grad
    # Its value is the fused gradient's, to rounding.
    xf = x.clone().requires_grad_(True)
    fxt.cross_entropy(xf, t).backward()
    torch.testing.assert_close(g.detach(), xf.grad, rtol=1e-14, atol=1e-16)
    (g**2).sum().backward()
    xp = x.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(F.cross_entropy(xp, t), xp, create_graph=True)
    (gp**2).sum().backward()
    assert xp.grad.abs().max() > 1e-3
    torch.testing.assert_close(xr.grad, xp.grad, rtol=1e-12, atol=1e-15)

    # Hessian-vector product through a tanh layer (the reported 3.17 against 4.51).
    v = torch.randn(4, 5, dtype=D64, generator=gen)
    hv = torch.autograd.functional.hvp(lambda z: fxt.cross_entropy(torch.tanh(z), t), x, v)[1]
    hv_ref = torch.autograd.functional.hvp(lambda z: F.cross_entropy(torch.tanh(z), t), x, v)[1]
    torch.testing.assert_close(hv, hv_ref, rtol=1e-12, atol=1e-15)


def test_forward_mode_tangent_matches_pytorch():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 5, dtype=D64, generator=gen)
    v = torch.randn(4, 5, dtype=D64, generator=gen)
    t = torch.tensor([0, 2, 4, 1])
    for red in ("mean", "sum", "none"):
        with fwAD.dual_level():
            got = fwAD.unpack_dual(
                fxt.cross_entropy(fwAD.make_dual(x, v), t, reduction=red)
            ).tangent
            ref = fwAD.unpack_dual(F.cross_entropy(fwAD.make_dual(x, v), t, reduction=red)).tangent
        assert got is not None
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-15)
    jv = torch.autograd.functional.jvp(lambda z: fxt.cross_entropy(z, t), x, v)[1]
    jv_ref = torch.autograd.functional.jvp(lambda z: F.cross_entropy(z, t), x, v)[1]
    torch.testing.assert_close(jv, jv_ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("labels", ["soft", "one-hot"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_target_gradient_matches_pytorch(eps, reduction, labels):
    # One-hot labels: a label of 0 still has the derivative lse - z' (it once came out 0).
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 2, dtype=D64, generator=gen)
    p = torch.softmax(torch.randn(3, 4, 2, dtype=D64, generator=gen), 1)
    if labels == "one-hot":
        p = F.one_hot(torch.randint(0, 4, (3, 2), generator=gen), 4).movedim(-1, 1).to(D64)
    w = torch.rand(4, dtype=D64, generator=gen) + 0.5
    grads = []
    for f in (fxt.cross_entropy, F.cross_entropy):
        zz, pp = z.clone().requires_grad_(True), p.clone().requires_grad_(True)
        loss = f(zz, pp, w, label_smoothing=eps, reduction=reduction)
        loss.backward(torch.linspace(0.5, 2.0, loss.numel(), dtype=D64).reshape(loss.shape))
        grads.append((zz.grad, pp.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-13, atol=1e-15)
    # Only the target's gradient asked for: the logits' is not computed.
    pp = p.clone().requires_grad_(True)
    fxt.cross_entropy(z, pp, label_smoothing=eps).backward()
    pr = p.clone().requires_grad_(True)
    F.cross_entropy(z, pr, label_smoothing=eps).backward()
    torch.testing.assert_close(pp.grad, pr.grad, rtol=1e-13, atol=1e-15)


def test_second_order_in_float32_and_bfloat16_is_connected():
    t = torch.tensor([0, 2, 4, 1])
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(4, 5).to(dt).requires_grad_(True)
        (g,) = torch.autograd.grad(fxt.cross_entropy(x, t), x, create_graph=True)
        assert g.dtype == dt and g.requires_grad
        xr = x.detach().float().requires_grad_(True)
        (gr,) = torch.autograd.grad(F.cross_entropy(xr, t), xr, create_graph=True)
        (h,) = torch.autograd.grad((g.float() ** 2).sum(), x)
        (hr,) = torch.autograd.grad((gr**2).sum(), xr)
        torch.testing.assert_close(h.float(), hr, rtol=tol, atol=tol)


def test_paths_that_cannot_differentiate_again_raise():
    t = torch.tensor([0, 2, 4, 1])
    x = torch.randn(4, 5, requires_grad=True)
    # inplace=True destroyed the logits: no second order, a clear error (not zeros).
    loss = fxt.cross_entropy(x * 1.0, t, inplace=True)
    with pytest.raises(RuntimeError, match=r"inplace=True\) overwrote the logits"):
        torch.autograd.grad(loss, x, create_graph=True)
    # Logits changed in place between the loss and a second-order backward.
    y = x * 1.0
    loss = fxt.cross_entropy(y, t)
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x, create_graph=True)
    # vocab_parallel_cross_entropy under torch.func: a clear error instead of "Cannot access
    # data pointer" (its statistics are all-reduced by torch.distributed outside the graph).
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.grad(lambda z: fxt.vocab_parallel_cross_entropy(z, t))(torch.randn(4, 5))


def test_vocab_parallel_refuses_second_order():
    # Its gradient comes from the shard kernels outside the graph: create_graph must raise
    # rather than hand back a constant whose derivatives are silently 0. (One process, a
    # gloo group of one, so no second process is needed.)
    import os

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this PyTorch build has no torch.distributed")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        x = torch.randn(4, 5, dtype=D64, requires_grad=True)
        t = torch.tensor([0, 2, 4, 1])
        loss = fxt.vocab_parallel_cross_entropy(x, t)
        with pytest.raises(RuntimeError, match="no second-order derivative"):
            torch.autograd.grad(loss, x, create_graph=True)
        (g,) = torch.autograd.grad(fxt.vocab_parallel_cross_entropy(x, t), x)
        (gr,) = torch.autograd.grad(F.cross_entropy(x, t), x)
        torch.testing.assert_close(g, gr, rtol=1e-13, atol=1e-15)
    finally:
        if owned:
            dist.destroy_process_group()


@pytest.mark.parametrize("probs", [False, True])
def test_zero_size_dimensions_give_pytorchs_results(probs):
    x = torch.rand(2, 3, 0, 7, dtype=D64, requires_grad=True)
    t = torch.rand(2, 3, 0, 7, dtype=D64) if probs else torch.zeros(2, 0, 7, dtype=torch.long)
    for red in ("sum", "mean", "none"):
        got = fxt.cross_entropy(x, t, reduction=red)
        ref = F.cross_entropy(x, t, reduction=red)
        assert got.shape == ref.shape == ((2, 0, 7) if red == "none" else ())
        if red == "sum":
            assert float(got.detach()) == 0.0 == float(ref.detach())
        if red == "mean":
            assert float(got.detach()) == 0.0  # PyTorch: NaN (0 / 0); fastxent's D = 0 rule
        (g,) = torch.autograd.grad(got.sum(), x)
        assert g.shape == x.shape


def test_second_order_when_no_row_counts():
    # All rows ignored: "mean" is identically 0 (fastxent's D = 0 rule; PyTorch: NaN), so
    # every derivative is 0, computed, and connected enough for gradgradcheck.
    x = torch.randn(3, 4, dtype=D64, requires_grad=True)
    t = torch.full((3,), -100)
    H = torch.autograd.functional.hessian(lambda z: fxt.cross_entropy(z, t), x.detach())
    assert H.shape == (3, 4, 3, 4) and not H.any()
    assert gradgradcheck(lambda z: fxt.cross_entropy(z, t), (x,))


# --- torch.func transforms (grad, vmap, jvp, hessian, jacrev/jacfwd) ---------------------------

FUNC_CASES = {
    "plain": dict(),
    "weight_smoothing": dict(weight="w", label_smoothing=0.1),
    "options": dict(z_loss=0.05, softcap=2.5, logit_scale=1.7, sample_weight="s"),
    "sum_normalizer": dict(reduction="sum", normalizer=2.0),
}


@pytest.mark.parametrize("case", list(FUNC_CASES), ids=list(FUNC_CASES))
def test_torch_func_transforms_match_pytorch_reference(case):
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    x, t, kw = _make((4, 5), FUNC_CASES[case], False, gen)
    t[2] = -100
    x = x.detach()

    def ref(z):
        # F.cross_entropy with fastxent's options written out (the contract's formula).
        zp = z
        if "softcap" in kw:
            zp = kw["softcap"] * torch.tanh(kw["logit_scale"] * z / kw["softcap"])
        rows = F.cross_entropy(
            zp,
            t,
            kw.get("weight"),
            reduction="none",
            label_smoothing=kw.get("label_smoothing", 0.0),
        )
        lse = torch.logsumexp(zp, 1)
        sw = kw.get("sample_weight", torch.ones(4, dtype=D64))
        rows = torch.where(t != -100, sw * (rows + kw.get("z_loss", 0.0) * lse * lse), 0.0)
        if kw.get("reduction") == "sum":
            return rows.sum()
        w = kw.get("weight", torch.ones(5, dtype=D64))
        return rows.sum() / (sw * w[t.clamp(min=0)] * (t != -100)).sum()

    def f(z):
        return fxt.cross_entropy(z, t, **kw)

    torch.testing.assert_close(
        torch.func.grad(f)(x), torch.func.grad(ref)(x), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        torch.func.hessian(f)(x), torch.func.hessian(ref)(x), rtol=1e-12, atol=1e-14
    )
    v = torch.randn(4, 5, dtype=D64, generator=gen)
    torch.testing.assert_close(
        torch.func.jvp(f, (x,), (v,))[1], torch.func.jvp(ref, (x,), (v,))[1], rtol=1e-12, atol=1e-14
    )
    xb = torch.randn(3, 4, 5, dtype=D64, generator=gen)
    torch.testing.assert_close(
        torch.func.vmap(f)(xb), torch.func.vmap(ref)(xb), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(f))(xb),
        torch.func.vmap(torch.func.grad(ref))(xb),
        rtol=1e-12,
        atol=1e-14,
    )
    # The value under a transform is the kernel's value outside it, to rounding.
    torch.testing.assert_close(torch.func.vmap(f)(xb)[0], f(xb[0]), rtol=1e-13, atol=1e-15)


def test_torch_func_per_sample_gradients_and_probability_targets():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5, dtype=D64, generator=gen)
    t = torch.randint(0, 5, (6,), generator=gen)
    # Per-sample gradients (DP-SGD style): vmap over rows of grad of a one-row loss.
    ps = torch.func.vmap(torch.func.grad(lambda z, y: fxt.cross_entropy(z[None], y[None])))(x, t)
    ps_ref = torch.func.vmap(torch.func.grad(lambda z, y: F.cross_entropy(z[None], y[None])))(x, t)
    torch.testing.assert_close(ps, ps_ref, rtol=1e-12, atol=1e-14)
    # Gradient with respect to a probability target under torch.func.
    p = torch.softmax(torch.randn(6, 5, dtype=D64, generator=gen), 1)
    gp = torch.func.grad(lambda q: fxt.cross_entropy(x, q, label_smoothing=0.1))(p)
    gp_ref = torch.func.grad(lambda q: F.cross_entropy(x, q, label_smoothing=0.1))(p)
    torch.testing.assert_close(gp, gp_ref, rtol=1e-12, atol=1e-14)
    # jacrev / jacfwd of reduction="none" in the (N, C, d) layout.
    x3 = torch.randn(2, 4, 3, dtype=D64, generator=gen)
    t3 = torch.randint(0, 4, (2, 3), generator=gen)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(
            jac(lambda z: fxt.cross_entropy(z, t3, reduction="none"))(x3),
            jac(lambda z: F.cross_entropy(z, t3, reduction="none"))(x3),
            rtol=1e-12,
            atol=1e-14,
        )


@pytest.mark.parametrize(
    "kw", [{}, {"label_smoothing": 0.1}, {"weight": "w"}, {"z_loss": 1e-3}], ids=str
)
def test_constant_logits_inside_torch_func(kw):
    # Logits that are a constant of the transformed function (plain tensors, not wrapped):
    # reading them through functorch's dispatch failed ("Cannot access data pointer of Tensor
    # that doesn't have storage"); the loss is a constant there.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 3])
    if kw.get("weight") == "w":
        kw = {"weight": torch.rand(5, generator=g)}
    ref = fxt.cross_entropy(x, y, **kw)  # outside any transform
    got = torch.func.grad(lambda s: fxt.cross_entropy(x, y, **kw) * s)(torch.tensor(2.0))
    assert got.item() == ref.item()
    out = torch.func.vmap(lambda s: fxt.cross_entropy(x, y, **kw) * s)(torch.arange(3.0))
    assert torch.equal(out, ref * torch.arange(3.0))


def test_torch_func_checks_arguments_before_computing():
    t = torch.tensor([0, 2, 4, 1])
    with pytest.raises(ValueError, match="target has shape"):
        torch.func.grad(lambda z: fxt.cross_entropy(z, t[:3]))(torch.randn(4, 5))
    with pytest.raises(ValueError, match="weight has shape"):
        torch.func.grad(lambda z: fxt.cross_entropy(z, t, torch.ones(4)))(torch.randn(4, 5))
    with pytest.raises(ValueError, match="z_loss"):
        torch.func.grad(lambda z: fxt.cross_entropy(z, t, z_loss=-1.0))(torch.randn(4, 5))
    with pytest.raises(TypeError, match="zloss"):
        torch.func.grad(lambda z: fxt.cross_entropy(z, t, zloss=1.0))(torch.randn(4, 5))
    with pytest.raises(ValueError, match="reduction"):
        torch.func.grad(lambda z: fxt.cross_entropy(z, t, reduction="avg"))(torch.randn(4, 5))
    # A class index out of range is an error, never a silently wrong row.
    with pytest.raises(IndexError):
        torch.func.grad(lambda z: fxt.cross_entropy(z, torch.tensor([0, 5, 1, 1])))(
            torch.randn(4, 5)
        )
    with pytest.raises(IndexError):
        torch.func.vmap(lambda z, y: fxt.cross_entropy(z, y))(
            torch.randn(2, 4, 5), torch.tensor([[0, 1, 2, 3], [0, 1, 7, 3]])
        )


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # torch.func.jvp's
@pytest.mark.parametrize(
    "name,value", [("normalizer", 4.0), ("label_smoothing", 0.1), ("z_loss", 0.05),
                   ("softcap", 3.0), ("logit_scale", 1.5)]
)  # fmt: skip
def test_torch_func_scalar_option_tensors(name, value):
    """A scalar option given as a tensor is a constant: under torch.func it may be a tensor
    from outside the transform (the same gradient as a float), but one the transform
    differentiates or maps over is a RuntimeError saying so and what is supported. It was
    'Cannot access data pointer of Tensor that doesn't have storage', a vmap .item() error,
    or, with grad over the input and normalizer together, a silent 0 for normalizer."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 5, dtype=D64, generator=gen)
    t = torch.tensor([0, 2, 4, 1])
    v = torch.tensor(value, dtype=D64)
    want = torch.func.grad(lambda z: fxt.cross_entropy(z, t, **{name: value}))(x)
    got = torch.func.grad(lambda z: fxt.cross_entropy(z, t, **{name: v}))(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    msg = f"reads {name} as a constant number: it cannot be a tensor that a torch.func transform"

    def f(z, o):
        return fxt.cross_entropy(z, t, **{name: o})

    runs = [
        lambda: torch.func.grad(lambda o: f(x, o))(v),  # with respect to the option alone
        lambda: torch.func.grad(f, argnums=(0, 1))(x, v),  # and the input
        lambda: torch.func.jacrev(f, argnums=1)(x, v),
        lambda: torch.func.jvp(lambda o: f(x, o), (v,), (torch.ones_like(v),)),
        lambda: torch.func.vmap(lambda o: f(x, o))(v.repeat(2)),  # over the option
        lambda: torch.func.vmap(f)(x[None], v[None]),
    ]
    if name != "label_smoothing":  # the module's per-call options (label_smoothing is its own)
        runs.append(lambda: torch.func.grad(lambda o: fxt.CrossEntropyLoss()(x, t, **{name: o}))(v))
    for run in runs:
        with pytest.raises(RuntimeError, match=msg):
            run()
    # Constants made inside the transform are wrapped tensors too, but neither differentiated
    # nor mapped over: the float's gradient (they were refused, a regression found in review).
    inside = [
        lambda: torch.func.grad(lambda z: f(z, torch.tensor(value, dtype=D64)))(x),
        lambda: torch.func.grad(lambda z: f(z, (t >= 0).sum().to(D64) * 0 + value))(x),
        lambda: torch.func.jacrev(lambda z: f(z, z.detach().sum() * 0 + value))(x),
        lambda: torch.func.vmap(lambda z: f(z, torch.tensor(value, dtype=D64)))(x[None])[0],
    ]
    for run in inside[:3]:
        torch.testing.assert_close(run(), want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        inside[3](), fxt.cross_entropy(x, t, **{name: value}), rtol=1e-12, atol=1e-15
    )


# --- the sigmoid loss: binary_cross_entropy_with_logits ---------------------------------------


def _bce_inputs(gen, shape=(4, 3)):
    x = torch.randn(shape, dtype=D64, generator=gen).requires_grad_(True)
    y = torch.rand(shape, dtype=D64, generator=gen).requires_grad_(True)
    w = (torch.rand(shape[-1], dtype=D64, generator=gen) + 0.5).requires_grad_(True)
    pw = (torch.rand(shape[-1], dtype=D64, generator=gen) + 0.5).requires_grad_(True)
    return x, y, w, pw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("operands", ["none", "weight", "pos_weight", "both"])
def test_bce_values_gradcheck_gradgradcheck_forward_ad(reduction, operands):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{reduction}{operands}".encode()))
    x, y, w, pw = _bce_inputs(gen)
    w = w if operands in ("weight", "both") else None
    pw = pw if operands in ("pos_weight", "both") else None
    got = fxt.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw)
    ref = F.binary_cross_entropy_with_logits(
        x,
        y,
        None if w is None else w.detach(),
        reduction=reduction,
        pos_weight=None if pw is None else pw.detach(),
    )
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-15)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-13, atol=1e-15)
    # Every input is differentiated (PyTorch refuses weight and pos_weight that require grad;
    # fastxent differentiates them, as the formula allows).
    inputs = tuple(t for t in (x, y, w, pw) if t is not None)

    def f(*a):
        it = iter(a)
        xx, yy = next(it), next(it)
        ww = next(it) if w is not None else None
        pp = next(it) if pw is not None else None
        return fxt.binary_cross_entropy_with_logits(xx, yy, ww, reduction=reduction, pos_weight=pp)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)
    assert gradcheck(
        f,
        inputs,
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )


def test_bce_torch_func_and_module():
    gen = torch.Generator().manual_seed(9)
    x, y, w, pw = (t.detach() for t in _bce_inputs(gen))

    def f(z):
        return fxt.binary_cross_entropy_with_logits(z, y, w, pos_weight=pw)

    def ref(z):
        return F.binary_cross_entropy_with_logits(z, y, w, pos_weight=pw)

    torch.testing.assert_close(
        torch.func.hessian(f)(x), torch.func.hessian(ref)(x), rtol=1e-12, atol=1e-14
    )
    xb = torch.randn(5, 4, 3, dtype=D64, generator=gen)
    torch.testing.assert_close(
        torch.func.vmap(torch.func.grad(f))(xb),
        torch.func.vmap(torch.func.grad(ref))(xb),
        rtol=1e-12,
        atol=1e-14,
    )
    m = fxt.BCEWithLogitsLoss(pos_weight=pw, reduction="sum")
    torch.testing.assert_close(
        m(x, y),
        F.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="sum"),
        rtol=1e-13,
        atol=1e-15,
    )
    assert set(dict(m.named_buffers())) == {"pos_weight"}
    with pytest.raises(ValueError, match="reduction"):
        fxt.BCEWithLogitsLoss(reduction="avg")
    # PyTorch's legacy arguments, with PyTorch's own deprecation warning.
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        legacy = fxt.binary_cross_entropy_with_logits(x, y, None, None, False)
    assert legacy.shape == x.shape


def test_bce_errors_and_half():
    x = torch.randn(4, 3)
    y = torch.rand(4, 3)
    with pytest.raises(ValueError, match="target has shape"):
        fxt.binary_cross_entropy_with_logits(x, y[:2])
    with pytest.raises(ValueError, match="pos_weight has shape"):
        fxt.binary_cross_entropy_with_logits(x, y, pos_weight=torch.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        fxt.binary_cross_entropy_with_logits(x, y, reduction="avg")
    with pytest.raises(TypeError, match="float32, float64"):
        fxt.binary_cross_entropy_with_logits(x.to(torch.int32), y)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fxt.binary_cross_entropy_with_logits(x.numpy(), y)
    for dt in (torch.float16, torch.bfloat16):
        xh = x.to(dt).requires_grad_(True)
        loss = fxt.binary_cross_entropy_with_logits(xh, y.to(dt))
        loss.backward()
        ref = F.binary_cross_entropy_with_logits(x.to(dt).float(), y.to(dt).float())
        assert loss.dtype == dt and xh.grad.dtype == dt
        torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=1e-2)


# --- regressions found in review -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lean", "general", "bce"])
def test_retained_graph_backward_never_reuses_a_handed_out_gradient(kind):
    # The first backward hands the fused gradient out (as x.grad, through a view of a leaf);
    # the user zeroes it; a second backward through the retained graph must still give the
    # gradient, not the zeroed memory.
    t = torch.tensor([0, 3, 1, 4])
    x = torch.randn(20, dtype=D64, requires_grad=True)
    if kind == "bce":
        y = torch.rand(4, 5, dtype=D64)
        loss = fxt.binary_cross_entropy_with_logits(x.view(4, 5), y, reduction="sum")
        ref = F.binary_cross_entropy_with_logits(x.view(4, 5), y, reduction="sum")
    else:
        kw = {} if kind == "lean" else {"label_smoothing": 0.1}
        loss = fxt.cross_entropy(x.view(4, 5), t, reduction="sum", **kw)
        ref = F.cross_entropy(x.view(4, 5), t, reduction="sum", **kw)
    (g_ref,) = torch.autograd.grad(ref, x)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, g_ref)
    x.grad.data.zero_()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, g_ref)
    x.grad.zero_()
    loss.backward()
    torch.testing.assert_close(x.grad, g_ref)


@pytest.mark.parametrize("lean", [True, False])
def test_target_changed_after_the_loss_is_refused_by_second_order(lean):
    z = torch.randn(2, 3, dtype=D64, requires_grad=True)
    t = torch.tensor([0, 1])
    w = torch.ones(3, dtype=D64)
    loss = fxt.cross_entropy(z, t) if lean else fxt.cross_entropy(z, t, w)
    t[1] = -100
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, z, create_graph=True)
    if not lean:
        loss = fxt.cross_entropy(z, torch.tensor([0, 1]), w)
        w.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, z, create_graph=True)


def test_negated_views_are_read_as_their_values():
    z = torch.randn(3, 16)
    t = torch._neg_view(torch.tensor([-10, 0, 10]))  # the values [10, 0, -10]
    torch.testing.assert_close(
        fxt.cross_entropy(z, t, reduction="none", ignore_index=-10),
        F.cross_entropy(z, t, reduction="none", ignore_index=-10),
    )
    zn = torch._neg_view(torch.randn(3, 16))
    torch.testing.assert_close(
        fxt.cross_entropy(zn, torch.tensor([1, 2, 3])),
        F.cross_entropy(zn.resolve_neg(), torch.tensor([1, 2, 3])),
    )
    # inplace=True would write into a copy of a lazily negated tensor: refused.
    a = torch.randn(3, 16, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match="lazy negation"):
        fxt.cross_entropy(torch._neg_view(a), torch.tensor([1, 2, 3]), inplace=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")
def test_second_order_under_compile_eager_backend_is_not_zero():
    t = torch.tensor([0, 1, 2])
    z0 = torch.randn(3, 4, dtype=D64)
    torch._dynamo.reset()
    f = torch.compile(lambda z: fxt.cross_entropy(z, t), backend="eager", fullgraph=True)
    grads = []
    for fn in (f, lambda z: F.cross_entropy(z, t)):
        z = z0.clone().requires_grad_(True)
        loss = fn(z)
        (g,) = torch.autograd.grad(loss, z, create_graph=True)
        (loss + 10 * g.pow(2).sum()).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_bfloat16_probability_target_second_order():
    z = torch.randn(3, 4, requires_grad=True)
    p = torch.rand(3, 4).softmax(1).bfloat16()
    (g,) = torch.autograd.grad(fxt.cross_entropy(z, p), z, create_graph=True)
    (gr,) = torch.autograd.grad(F.cross_entropy(z, p.float()), z, create_graph=True)
    torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-6)


def test_default_device_elsewhere_and_zero_tensors():
    z = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    with torch.device("meta"):
        got = fxt.cross_entropy(z, t)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, F.cross_entropy(z, t))
    zt = torch._efficientzerotensor((3, 5))
    torch.testing.assert_close(fxt.cross_entropy(zt, t), F.cross_entropy(torch.zeros(3, 5), t))


@pytest.mark.parametrize("path", ["lean", "general", "bce"])
def test_logits_are_freed_after_backward(path):
    import gc
    import weakref

    head = torch.nn.Linear(4, 6)
    x = torch.randn(5, 4)
    logits = head(x)
    ref = weakref.ref(logits)
    if path == "bce":
        loss = fxt.binary_cross_entropy_with_logits(logits, torch.rand(5, 6))
    else:
        kw = {} if path == "lean" else {"label_smoothing": 0.1}
        loss = fxt.cross_entropy(logits, torch.randint(0, 6, (5,)), **kw)
    del logits
    loss.backward()
    gc.collect()
    assert ref() is None  # the loss tensor is still alive; the logits are not


def test_autocast_dtypes_of_bce_and_the_tangent():
    x = torch.randn(4, 3).bfloat16()
    y = torch.rand(4, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fxt.binary_cross_entropy_with_logits(x, y)
        ref = F.binary_cross_entropy_with_logits(x, y)
        assert got.dtype == ref.dtype == torch.float32
        with fwAD.dual_level():
            d = fwAD.make_dual(x, torch.ones_like(x))
            out = fxt.cross_entropy(d, torch.tensor([0, 1, 2, 0]))
            p, tangent = fwAD.unpack_dual(out)
            assert p.dtype == tangent.dtype == torch.float32


# forward_ad's first use scripts a helper: torch.jit.script, deprecated in torch 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_weight_tangents_and_tensor_options_raise():
    """Forward mode dropped the tangent of weight / sample_weight (tangent None alone; with a
    logits tangent, <g, dz> without the weight's part: a wrong number), and options given as
    tensors that require grad (normalizer, label_smoothing, z_loss, softcap, logit_scale)
    were read as numbers (grad None). Each raises RuntimeError naming the input now."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(11)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=g)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    sw = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    for name, kw in (("weight", {"weight": w}), ("sample_weight", {"sample_weight": sw})):
        for with_z in (False, True):
            with fwAD.dual_level():
                zz = fwAD.make_dual(z, torch.ones_like(z)) if with_z else z
                (v,) = kw.values()
                d = {name: fwAD.make_dual(v, torch.randn(v.shape, generator=g, dtype=v.dtype))}
                with pytest.raises(RuntimeError, match=f"respect to {name}.*forward-mode"):
                    fxt.cross_entropy(zz, y, **d)
    for k, val in (
        ("normalizer", 3.0),
        ("label_smoothing", 0.1),
        ("z_loss", 0.01),
        ("softcap", 5.0),
        ("logit_scale", 2.0),
    ):
        s = torch.tensor(val, dtype=torch.float64, requires_grad=True)
        with pytest.raises(RuntimeError, match=f"respect to {k}"):
            fxt.cross_entropy(z.clone().requires_grad_(), y, **{k: s})
