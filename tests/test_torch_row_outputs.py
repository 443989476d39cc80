"""fastxent.torch.cross_entropy with outputs= and entropy_coef: the values against the NumPy
API (the same kernel call: bitwise) and a float64 PyTorch reference, every derivative against
autograd through that reference (first order fused + the statistics' tiles; second order and
target gradients through the reference), and the errors of the paths left out.

Tolerances: float64 throughout, 1e-12 relative (as tests/test_torch.py: both sides compute in
float64 without cancellation-prone steps at these sizes, a few u times row length <= 40; any
formula mistake is >= 1e-3). gradcheck / gradgradcheck use their float64 defaults.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastxent.torch as fxt  # noqa: E402

ALL = ("lse", "entropy", "argmax", "target_logprob", "accuracy")
FLOATS = ("lse", "entropy", "target_logprob")


def _transform(z, softcap=None, logit_scale=1.0):
    z = logit_scale * z
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def _ref(z, y, *, beta=0.0, reduction="mean", ignore_index=-100, weight=None, **kw):
    """float64 loss (CE - beta * reduce(H)) and stats in plain PyTorch ops."""
    zp = _transform(z, kw.get("softcap"), kw.get("logit_scale", 1.0))
    lp = F.log_softmax(zp, -1)
    ce = F.cross_entropy(
        zp,
        y,
        weight=weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=kw.get("label_smoothing", 0.0),
    )
    H = -(lp.exp() * lp).sum(-1)
    counted = y != ignore_index
    wy = torch.ones_like(H) if weight is None else weight[torch.where(counted, y, 0)]
    row = torch.where(counted, ce - beta * H, 0.0)
    if reduction == "none":
        loss = row
    elif reduction == "sum":
        loss = row.sum()
    else:
        loss = row.sum() / (wy * counted).sum()
    tlp = torch.where(counted, lp.gather(-1, torch.where(counted, y, 0)[..., None])[..., 0], 0.0)
    stats = dict(lse=torch.logsumexp(zp, -1), entropy=H, target_logprob=tlp)
    return loss, stats


def _close(got, ref):
    """max |got - ref| <= 1e-12 * max(1, max |ref|), on detached values."""
    got, ref = got.detach(), ref.detach()
    return float((got - ref).abs().max()) <= 1e-12 * max(1.0, float(ref.abs().max()))


def _case(seed, N=9, C=13):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(N, C, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, C, (N,), generator=g)
    y[2] = -100
    return z, y


OPTS = [
    dict(),
    dict(label_smoothing=0.1, softcap=4.0),
    dict(logit_scale=0.6, weight=True),
]


def _kw(opts, C):
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    return kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTS, ids=lambda d: "-".join(d) or "plain")
def test_values_and_gradients_of_loss_and_statistics(reduction, opts):
    z, y = _case(1)
    kw = _kw(opts, z.shape[1])
    loss, st = fxt.cross_entropy(z, y, reduction=reduction, outputs=ALL, entropy_coef=0.3, **kw)
    # the same kernel call as the NumPy API: bitwise
    np_kw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    l_np, st_np = fx.cross_entropy(
        z.detach().numpy(),
        y.numpy(),
        reduction=reduction,
        outputs=ALL,
        entropy_coef=0.3,
        **np_kw,
    )
    np.testing.assert_array_equal(loss.detach().numpy(), l_np)
    for n in ("lse", "entropy", "argmax", "target_logprob"):
        np.testing.assert_array_equal(getattr(st, n).detach().numpy(), getattr(st_np, n))
    assert st.accuracy == st_np.accuracy
    assert st.argmax.dtype == torch.int64 and not st.argmax.requires_grad
    assert torch.equal(st.argmax, torch.argmax(z.detach(), -1))

    l_ref, s_ref = _ref(z, y, beta=0.3, reduction=reduction, **kw)
    assert _close(loss, l_ref)
    for n in FLOATS:
        assert _close(getattr(st, n), s_ref[n]), n
    # a combination of every differentiable output, with per-row upstream weights
    a = torch.linspace(-1.0, 2.0, z.shape[0], dtype=torch.float64)

    def combo(lo, s):
        lo = (lo * a).sum() if reduction == "none" else lo
        return (
            lo + (a * s["lse"]).sum() + 0.7 * s["entropy"].mean() - (a * s["target_logprob"]).sum()
        )

    (g,) = torch.autograd.grad(combo(loss, st._asdict()), z)
    (g_ref,) = torch.autograd.grad(combo(l_ref, s_ref), z)
    assert _close(g, g_ref)


def test_only_some_outputs_each_alone_differentiable():
    z, y = _case(2)
    _, s_ref = _ref(z, y)
    for n in FLOATS:
        loss, st = fxt.cross_entropy(z, y, outputs=(n,))
        others = [m for m in ALL if m != n]
        assert all(getattr(st, m) is None for m in others)
        (g,) = torch.autograd.grad(getattr(st, n).sum(), z)  # the loss's gradient unused
        (g_ref,) = torch.autograd.grad(s_ref[n].sum(), z, retain_graph=True)
        assert _close(g, g_ref)


def test_gradcheck_and_second_order():
    z, y = _case(3, N=5, C=6)
    for kw in (dict(), dict(softcap=3.0, logit_scale=0.8, label_smoothing=0.2)):

        def f(x, kw=kw):
            loss, st = fxt.cross_entropy(
                x,
                y,
                outputs=("lse", "entropy", "target_logprob"),
                entropy_coef=0.4,
                reduction="none",
                **kw,
            )
            return loss, st.lse, st.entropy, st.target_logprob

        assert torch.autograd.gradcheck(f, (z,))
        # create_graph=True differentiates the reference: its first derivative is the
        # kernel's (gradgradcheck alone would accept a reference consistent with itself)
        for out in (f(z), (fxt.cross_entropy(z, y, entropy_coef=0.4, **kw),)):
            total = sum(o.sum() for o in out)
            (g1,) = torch.autograd.grad(total, z, retain_graph=True)
            (g2,) = torch.autograd.grad(total, z, create_graph=True)
            assert g2.requires_grad and _close(g2, g1)
        assert torch.autograd.gradgradcheck(f, (z,))
        assert torch.autograd.gradgradcheck(
            lambda x, kw=kw: fxt.cross_entropy(x, y, entropy_coef=0.4, **kw), (z,)
        )


def test_probability_targets_and_their_gradient():
    z, _ = _case(4, N=4, C=5)
    q = torch.softmax(torch.randn(4, 5, dtype=torch.float64), -1).requires_grad_(True)

    def f(x, t):
        loss, st = fxt.cross_entropy(x, t, outputs=("lse", "entropy"), entropy_coef=0.2)
        return loss, st.lse, st.entropy

    assert torch.autograd.gradcheck(f, (z, q))
    with pytest.raises(ValueError, match="target_logprob"):
        fxt.cross_entropy(z, q, outputs=("target_logprob",))


# forward_ad's first use scripts a helper: torch.jit.script, deprecated in torch 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_entropy_coef_alone_loss_and_forward_mode():
    z, y = _case(5)
    loss = fxt.cross_entropy(z, y, entropy_coef=0.5, label_smoothing=0.1)
    l_ref, _ = _ref(z, y, beta=0.5, label_smoothing=0.1)
    assert _close(loss, l_ref)
    v = torch.randn_like(z)
    with fwAD.dual_level():
        t = fwAD.unpack_dual(
            fxt.cross_entropy(fwAD.make_dual(z.detach(), v), y, entropy_coef=0.5)
        ).tangent
    (g_ref,) = torch.autograd.grad(_ref(z, y, beta=0.5)[0], z)
    assert _close(t, (g_ref * v).sum())


def test_no_grad_calls_compute_no_gradient(monkeypatch):
    z, y = _case(6)
    from fastxent import _api

    calls = []
    monkeypatch.setattr(_api, "cross_entropy_with_grad", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        loss, st = fxt.cross_entropy(z, y, outputs=("entropy",))
    assert not calls and not loss.requires_grad and not st.entropy.requires_grad


# forward_ad's first use scripts a helper: torch.jit.script, deprecated in torch 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_paths_left_out_raise_clearly():
    z, y = _case(7)
    with pytest.raises(NotImplementedError, match="inplace=True"):
        fxt.cross_entropy(z.detach().clone(), y, outputs=("lse",), inplace=True)
    with pytest.raises(NotImplementedError, match="input of shape"):
        fxt.cross_entropy(
            torch.randn(2, 5, 3), torch.zeros(2, 3, dtype=torch.long), outputs=("lse",)
        )
    with pytest.raises(NotImplementedError, match="forward-mode"):
        with fwAD.dual_level():
            fxt.cross_entropy(fwAD.make_dual(z.detach(), torch.ones_like(z)), y, outputs=("lse",))
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda x: fxt.cross_entropy(x, y, entropy_coef=0.1))(z.detach())
    with pytest.raises(ValueError, match="unknown output"):
        fxt.cross_entropy(z, y, outputs=("logits",))
    with pytest.raises(ValueError, match="entropy_coef"):
        fxt.cross_entropy(z, y, entropy_coef=-1.0)


def test_module_takes_entropy_coef_and_outputs():
    z, y = _case(8)
    crit = fxt.CrossEntropyLoss(label_smoothing=0.1, entropy_coef=0.3, outputs=("entropy",))
    loss, st = crit(z, y)
    l_ref, s_ref = _ref(z, y, beta=0.3, label_smoothing=0.1)
    assert _close(loss, l_ref) and _close(st.entropy, s_ref["entropy"])
    assert "entropy_coef=0.3" in repr(crit)
    assert _close(fxt.CrossEntropyLoss(entropy_coef=0.3)(z, y), _ref(z, y, beta=0.3)[0])
    # checked in the constructor, not at the first forward
    with pytest.raises(ValueError, match="entropy_coef"):
        fxt.CrossEntropyLoss(entropy_coef=-0.5)
    with pytest.raises(ValueError, match="unknown output"):
        fxt.CrossEntropyLoss(outputs=("lse", "bogus"))
    with pytest.raises(TypeError, match="unexpected keyword argument 'entropy_coeff'"):
        fxt.CrossEntropyLoss(entropy_coeff=0.1)


@pytest.mark.parametrize("C", [5, 1 << 15])  # one tile of rows; several (2^20 / C = 32 rows)
def test_batched_upstream_grads(C):
    # autograd.grad(..., is_grads_batched=True): was all zeros through the reference branch
    # (create_graph, probability targets) and a vmap error through the statistics' tiles.
    g = torch.Generator().manual_seed(9)
    N = 3 if C == 5 else 40
    z = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=g)
    E = torch.randn(2, N, generator=g, dtype=torch.float64)
    _, s_ref = _ref(z, y, reduction="none")
    for n in FLOATS:
        for create_graph in (False, True):
            _, st = fxt.cross_entropy(z, y, reduction="none", outputs=(n,))
            (J,) = torch.autograd.grad(
                getattr(st, n), z, E, is_grads_batched=True, create_graph=create_graph
            )
            (J_ref,) = torch.autograd.grad(s_ref[n], z, E, is_grads_batched=True, retain_graph=True)
            assert _close(J, J_ref), (n, create_graph)
    if C == 5:  # a probability target's gradient goes through the reference
        q = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1)
        q.requires_grad_(True)
        lo, _ = fxt.cross_entropy(z, q, reduction="none", outputs=("lse",))
        Jz, Jq = torch.autograd.grad(lo, (z, q), E, is_grads_batched=True)
        l0 = F.cross_entropy(z, q, reduction="none")
        Jz0, Jq0 = torch.autograd.grad(l0, (z, q), E, is_grads_batched=True)
        assert _close(Jz, Jz0) and _close(Jq, Jq0)


def test_entropy_coef_tensor_requiring_grad_is_refused():
    z, y = _case(10)
    beta = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(RuntimeError, match="entropy_coef"):
        fxt.cross_entropy(z, y, entropy_coef=beta)
    with pytest.raises(RuntimeError, match="entropy_coef"):
        fxt.cross_entropy(z, y, entropy_coef=beta, outputs=("lse",))
    # a plain tensor (no derivative) is a number
    assert _close(
        fxt.cross_entropy(z, y, entropy_coef=torch.tensor(0.3, dtype=torch.float64)),
        _ref(z, y, beta=0.3)[0],
    )


def test_all_minus_inf_row_statistics_have_finite_gradients():
    z = torch.tensor([[0.0, 1.0, 2.0], [float("-inf")] * 3], dtype=torch.float64)
    z.requires_grad_(True)
    y = torch.tensor([0, -100])
    loss, st = fxt.cross_entropy(z, y, outputs=("lse", "entropy", "target_logprob"))
    assert st.entropy[1].item() == pytest.approx(np.log(3.0), rel=1e-15)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    total = loss + (st.entropy * w).sum() + (st.lse * w).sum()
    (g,) = torch.autograd.grad(total, z, retain_graph=True)
    assert torch.isfinite(g).all() and torch.equal(g[1], torch.zeros(3, dtype=torch.float64))
    # no finite logit: the statistics' derivative there is 0 (documented)
    (g,) = torch.autograd.grad(st.entropy[1] + st.lse[1], z)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dt", [torch.float64, torch.float32])
def test_statistics_gradients_of_huge_logits_do_not_cancel(dt):
    # p = (1, 0, 0, 0): d lse = (1, 0, 0, 0), d entropy = 0, d target_logprob (y = 3) =
    # (-1, 0, 0, 1). Written as lse - sum p z', the entropy's derivative passed through terms
    # of size 3e38 and rounded the other statistics' away (the lse part was lost).
    z = torch.tensor([[3e38, -2.5, 6.0, 1.5]], dtype=dt, requires_grad=True)
    y = torch.tensor([3])
    loss, st = fxt.cross_entropy(
        z, y, reduction="none", outputs=("lse", "entropy", "target_logprob")
    )
    total = (
        loss.sum() + 0.75 * st.lse.sum() + 0.5 * st.entropy.sum() - 0.25 * st.target_logprob.sum()
    )
    (g,) = torch.autograd.grad(total, z)
    want = torch.tensor([[1.0 + 0.75 + 0.25, 0.0, 0.0, -1.0 - 0.25]], dtype=dt)
    assert torch.equal(g, want), g


def test_rows_the_scale_overflows_have_zero_statistics_derivatives():
    # Finite logits that logit_scale takes to -inf: the kernel's all -inf row (entropy log C),
    # whose statistics have derivative 0, not NaN.
    z = torch.tensor([[-3e38, -3e38, float("-inf"), -3e38], [0.0, 1.0, 2.0, 3.0]])
    z.requires_grad_(True)
    loss, st = fxt.cross_entropy(
        z, torch.tensor([0, 1]), reduction="none", logit_scale=2.0, outputs=("lse", "entropy")
    )
    assert st.lse[0].item() == float("-inf") and st.entropy[0].item() == pytest.approx(np.log(4))
    (g,) = torch.autograd.grad(st.lse.sum() + st.entropy.sum(), z)
    assert torch.equal(g[0], torch.zeros(4)) and torch.isfinite(g).all()


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_no_rows_backward(dt):
    z = torch.zeros(0, 5, dtype=dt, requires_grad=True)
    loss, st = fxt.cross_entropy(
        z, torch.zeros(0, dtype=torch.int64), outputs=("lse", "entropy"), reduction="sum"
    )
    (loss + st.lse.sum() + st.entropy.sum()).backward()
    assert z.grad.shape == (0, 5) and z.grad.dtype == dt


def test_idle_keywords_are_the_plain_call():
    # outputs=None and entropy_coef=0.0 (a configuration's defaults) take every path the plain
    # call takes, torch.func included
    z, y = _case(11)
    for kw in (dict(outputs=None), dict(entropy_coef=0.0), dict(outputs=None, entropy_coef=0)):
        g = torch.func.grad(lambda x, kw=kw: fxt.cross_entropy(x, y, **kw))(z.detach())
        assert _close(g, torch.autograd.grad(F.cross_entropy(z, y), z)[0])
    with pytest.raises(TypeError, match="inplace must be a bool"):
        fxt.cross_entropy(z, y, outputs=("lse",), inplace=0)
    crit = fxt.CrossEntropyLoss(entropy_coef=0.0, outputs=None)
    g = torch.func.grad(lambda x: crit(x, y))(z.detach())
    assert _close(g, torch.autograd.grad(F.cross_entropy(z, y), z)[0])


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_16_bit_logits(dt):
    """16-bit logits: float32 statistics, those of the float32 call on the converted logits bit
    for bit; the gradient with statistics in the loss within the fused gradient's own 16-bit
    rounding plus one rounding of the sum (taken in float32) of the float32 call's."""
    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(5)
    z = (3 * torch.randn(9, 300, generator=gen)).to(dtype).requires_grad_(True)
    y = torch.randint(0, 300, (9,), generator=gen)
    y[2] = -100
    names = ("lse", "entropy", "argmax", "target_logprob", "accuracy")
    loss, st = fxt.cross_entropy(z, y, outputs=names, entropy_coef=0.2)
    (loss + 0.5 * st.entropy.sum() + st.target_logprob.sum()).backward()
    z32 = z.detach().float().requires_grad_(True)
    l32, st32 = fxt.cross_entropy(z32, y, outputs=names, entropy_coef=0.2)
    (l32 + 0.5 * st32.entropy.sum() + st32.target_logprob.sum()).backward()
    assert loss.dtype == dtype and z.grad.dtype == dtype
    assert loss == l32.to(dtype)
    for n in ("lse", "entropy", "target_logprob"):
        assert getattr(st, n).dtype == torch.float32
        assert torch.equal(getattr(st, n), getattr(st32, n)), n
    assert torch.equal(st.argmax, st32.argmax) and st.accuracy == st32.accuracy
    # Two roundings to the 16-bit type: the fused gradient's (of the loss alone, at most half
    # an eps relative to it) and the sum's (half an eps relative to the total); one eps each
    # leaves room for the float32 sums.
    (g_loss,) = torch.autograd.grad(fxt.cross_entropy(z32, y, entropy_coef=0.2), z32)
    eps = torch.finfo(dtype).eps
    bound = eps * (g_loss.abs() + z32.grad.abs()) + torch.finfo(dtype).tiny
    assert bool(((z.grad.float() - z32.grad).abs() <= bound).all())
