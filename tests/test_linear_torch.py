"""fastxent.torch.linear_cross_entropy / LinearCrossEntropyLoss against float64 PyTorch
(F.linear + F.cross_entropy) and PyTorch 2.13's F.linear_cross_entropy: every reduction with
random upstream gradients, the options PyTorch has, fastxent's extra options against the
NumPy API, gradcheck, no gradient matmuls without autograd, retained graphs, 16-bit."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastxent as fx  # noqa: E402
import fastxent.torch as fxt  # noqa: E402
from fastxent import _torch_linear  # noqa: E402

TORCH_OPTIONS = [
    {},
    {"weight": True},
    {"ignore_index": 2},
    {"label_smoothing": 0.15},
    {"probs": True},
    {"weight": True, "label_smoothing": 0.1, "ignore_index": 2},
    {"probs": True, "weight": True, "label_smoothing": 0.1},
]


def _problem(n, h, v, dtype, opt, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g, dtype=torch.float64) / h**0.5).to(dtype)
    w = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    kw = {}
    if opt.get("weight"):
        kw["weight"] = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    if "label_smoothing" in opt:
        kw["label_smoothing"] = opt["label_smoothing"]
    if opt.get("probs"):
        t = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64), 1).to(dtype)
    else:
        t = torch.randint(0, v, (n,), generator=g)
        if "ignore_index" in opt:
            kw["ignore_index"] = opt["ignore_index"]
            t[::3] = opt["ignore_index"]
    return x, w, b, t, kw


def _ref_grads(x, w, b, t, reduction, go, kw):
    leaves = [
        a.detach().double().requires_grad_() for a in (x, w) + ((b,) if b is not None else ())
    ]
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    tt = t.double() if t.is_floating_point() else t
    z = F.linear(leaves[0], leaves[1], leaves[2] if b is not None else None)
    loss = F.cross_entropy(z, tt, reduction=reduction, **kw64)
    return (loss.detach(),) + torch.autograd.grad(loss, leaves, go.double())


def _err(a, r):
    scale = max(1.0, float(r.abs().max()))
    return float((a.double() - r).abs().max()) / scale


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)]
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", TORCH_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_against_float64_torch(dtype, tol, reduction, opt):
    x, w, b, t, kw = _problem(29, 7, 19, dtype, opt)
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    loss = fxt.linear_cross_entropy(
        leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction, tile_rows=4, **kw
    )
    assert loss.dtype == dtype
    go = torch.randn(loss.shape, dtype=torch.float64)
    if reduction == "none":
        go[1] = 0.0  # a zero upstream gradient on one row
    grads = torch.autograd.grad(loss, leaves, go.to(dtype))
    ref = _ref_grads(x, w, b, t, reduction, go, kw)
    assert _err(loss.detach(), ref[0]) <= tol
    for g, r in zip(grads, ref[1:]):
        assert g.dtype == dtype and _err(g, r) <= tol


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_pytorch_linear_cross_entropy(reduction):
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("PyTorch without F.linear_cross_entropy")
    x, w, b, t, kw = _problem(
        33, 6, 11, torch.float64, {"weight": True, "ignore_index": 1, "label_smoothing": 0.05}
    )
    a = fxt.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **kw)
    r = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **kw)
    torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fastxent_options_match_the_numpy_api(reduction):
    x, w, b, t, _ = _problem(25, 5, 9, torch.float64, {"ignore_index": 4})
    extra = dict(
        sample_weight=torch.rand(25, dtype=torch.float64),
        z_loss=1e-3,
        softcap=4.0,
        logit_scale=0.8,
        ignore_index=4,
        weight=torch.rand(9, dtype=torch.float64),
    )
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    loss = fxt.linear_cross_entropy(
        *leaves[:2], t, linear_bias=leaves[2], reduction=reduction, tile_rows=6, **extra
    )
    go = torch.ones(loss.shape, dtype=torch.float64)
    grads = torch.autograd.grad(loss, leaves, go)
    ref = fx.linear_cross_entropy_with_grad(
        x.numpy(),
        w.numpy(),
        t.numpy(),
        linear_bias=b.numpy(),
        reduction=reduction,
        **{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()},
    )
    np.testing.assert_allclose(loss.detach().numpy(), ref[0], rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref[1:]):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction):
    x, w, b, t, _ = _problem(7, 3, 5, torch.float64, {"ignore_index": 1})
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]

    def f(x_, w_, b_):
        return fxt.linear_cross_entropy(
            x_,
            w_,
            t,
            linear_bias=b_,
            reduction=reduction,
            ignore_index=1,
            label_smoothing=0.1,
            tile_rows=3,
        )

    assert torch.autograd.gradcheck(f, leaves)


def test_no_gradient_matmuls_without_autograd(monkeypatch):
    x, w, b, t, _ = _problem(20, 4, 8, torch.float32, {})
    expected = fxt.linear_cross_entropy(x, w, t, linear_bias=b)

    def refuse(*a, **k):
        raise AssertionError("a gradient matmul ran")

    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        monkeypatch.setattr(_torch_linear._TorchBackend, name, refuse)
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        got = fxt.linear_cross_entropy(xg, w, t, linear_bias=b, tile_rows=3)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    rows = fxt.linear_cross_entropy(xg, w, t, linear_bias=b, reduction="none")  # forward only
    assert rows.requires_grad


def test_only_the_wanted_gradients():
    x, w, b, t, _ = _problem(12, 4, 6, torch.float64, {})
    xg = x.clone().requires_grad_()
    loss = fxt.linear_cross_entropy(xg, w, t, linear_bias=b)
    loss.backward()
    ref = _ref_grads(x, w, b, t, "mean", torch.tensor(1.0), {})
    torch.testing.assert_close(xg.grad, ref[1])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_graph_second_backward(reduction):
    x, w, b, t, _ = _problem(10, 4, 6, torch.float64, {})
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    loss = fxt.linear_cross_entropy(*leaves[:2], t, linear_bias=leaves[2], reduction=reduction)
    loss.sum().backward(retain_graph=True)
    first = [a.grad.clone() for a in leaves]
    loss.sum().backward()
    for a, g in zip(leaves, first):
        torch.testing.assert_close(a.grad, 2 * g)


def test_module_and_3d_input():
    torch.manual_seed(0)
    m = fxt.LinearCrossEntropyLoss(6, 10, bias=True, dtype=torch.float64, label_smoothing=0.1)
    ref = torch.nn.Linear(6, 10, bias=True, dtype=torch.float64)
    ref.load_state_dict(m.linear.state_dict())
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    t = torch.randint(0, 10, (2, 5))
    a = m(x, t)
    a.backward()
    r = F.cross_entropy(ref(x).reshape(-1, 10), t.reshape(-1), label_smoothing=0.1)
    r.backward()
    torch.testing.assert_close(a, r)
    torch.testing.assert_close(m.linear.weight.grad, ref.weight.grad)
    torch.testing.assert_close(m.linear.bias.grad, ref.bias.grad)


def test_all_ignored_is_zero():
    x, w, b, t, _ = _problem(6, 3, 4, torch.float32, {})
    xg = x.clone().requires_grad_()
    loss = fxt.linear_cross_entropy(xg, w, torch.full((6,), -100), linear_bias=b)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not xg.grad.any()


@pytest.mark.parametrize("case", ["dtype_mismatch", "shape", "target_range", "not_tensor"])
def test_errors(case):
    x, w, b, t, _ = _problem(6, 3, 4, torch.float32, {})
    args = [x, w, t]
    err: type = ValueError
    if case == "dtype_mismatch":
        args[1], err = w.double(), TypeError
    elif case == "shape":
        args[1] = w[:, :2]
    elif case == "target_range":
        args[2], err = torch.tensor([0, 1, 2, 3, 4, 0]), IndexError
    else:
        args[0], err = x.numpy(), TypeError
    with pytest.raises(err):
        fxt.linear_cross_entropy(*args, linear_bias=b)


def test_inputs_not_differentiated_refuse_requires_grad():
    # The target's gradient is not computed: a target that requires grad must raise, never
    # come back with grad None as if it had no influence on the loss.
    x, w, b, _, _ = _problem(6, 3, 4, torch.float32, {})
    p = torch.softmax(torch.randn(6, 4), -1).requires_grad_()
    xg = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="probability target"):
        fxt.linear_cross_entropy(xg, w, p, linear_bias=b)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    for name, a in (("weight", torch.rand(4)), ("sample_weight", torch.rand(6))):
        with pytest.raises(RuntimeError, match=name):
            fxt.linear_cross_entropy(xg, w, y, linear_bias=b, **{name: a.requires_grad_()})
    with torch.no_grad():  # no graph: nothing to differentiate, the loss is computed
        ref = fxt.linear_cross_entropy(x, w, p.detach(), linear_bias=b)
        torch.testing.assert_close(fxt.linear_cross_entropy(x, w, p, linear_bias=b), ref)
    loss = fxt.linear_cross_entropy(xg, w, p.detach(), linear_bias=b)
    loss.backward()
    assert xg.grad is not None


# forward_ad's first use scripts a helper: torch.jit.script, deprecated in torch 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_no_silent_second_order_or_forward_mode():
    """create_graph=True gave a constant gradient (a gradient penalty's term silently 0);
    forward-mode tangents of a probability target, class weights and sample weights were
    dropped (tangent None); torch.func failed deep in the kernel. Each raises now."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(5)
    n, h, v = 4, 3, 5
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    p = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    sw = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    xx = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no second-order derivative"):
        torch.autograd.grad(fxt.linear_cross_entropy(xx, w, t), xx, create_graph=True)

    def tangent(f, a, requires_grad=False):
        with fwAD.dual_level():
            d = fwAD.make_dual(a.clone().requires_grad_(requires_grad), torch.ones_like(a))
            return fwAD.unpack_dual(f(d)).tangent

    with pytest.raises(RuntimeError, match="no forward-mode derivative"):
        tangent(lambda a: fxt.linear_cross_entropy(a, w, t), x)
    with pytest.raises(RuntimeError, match="no forward-mode derivative"):
        tangent(lambda a: fxt.linear_cross_entropy(a, w, t), x, True)
    for name, f, a in (
        ("a probability target", lambda a: fxt.linear_cross_entropy(x, w, a), p),
        ("weight", lambda a: fxt.linear_cross_entropy(x, w, t, weight=a), cw),
        ("sample_weight", lambda a: fxt.linear_cross_entropy(x, w, t, sample_weight=a), sw),
    ):
        with pytest.raises(RuntimeError, match=f"respect to {name}.*forward-mode tangent"):
            tangent(f, a)
    for k in ("label_smoothing", "z_loss", "logit_scale"):
        s = torch.tensor(0.1 if k != "logit_scale" else 2.0, dtype=torch.float64)
        with pytest.raises(RuntimeError, match=f"respect to {k}"):
            fxt.linear_cross_entropy(x.clone().requires_grad_(), w, t, **{k: s.requires_grad_()})
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda a: fxt.linear_cross_entropy(a, w, t))(x)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", TORCH_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_vocab_tiles_forward(vocab_tiles, dtype, tol, reduction, opt):
    """A forward pass alone (no_grad, or no input requiring grad) in tiles of the vocabulary
    (torch.mm / addmm per slice of the weight): against float64 PyTorch, bias or not."""
    x, w, b, t, kw = _problem(37, 9, 91, dtype, opt, seed=3)
    ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    tt = t.double() if t.is_floating_point() else t
    for bias in (b, None):
        z = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        ref = F.cross_entropy(z, tt, reduction=reduction, **ref_kw)
        with torch.no_grad():
            loss = fxt.linear_cross_entropy(x, w, t, linear_bias=bias, reduction=reduction, **kw)
        assert loss.dtype == dtype and loss.shape == ref.shape
        assert _err(loss, ref) <= tol
        again = fxt.linear_cross_entropy(x, w, t, linear_bias=bias, reduction=reduction, **kw)
        assert torch.equal(again, loss)
    cols = 5 if dtype == torch.float32 else 3
    assert vocab_tiles == [cols] * 4


def test_vocab_tiles_only_without_gradients_and_outputs(vocab_tiles):
    x, w, b, t, _ = _problem(37, 9, 91, torch.float32, {}, seed=4)
    names = ("lse", "entropy", "argmax", "accuracy")
    loss_r, st_r = fxt.linear_cross_entropy(x, w, t, linear_bias=b, outputs=names, tile_rows=8)
    assert vocab_tiles == []
    fxt.linear_cross_entropy(x.requires_grad_(), w, t, linear_bias=b).backward()
    assert vocab_tiles == []
    with torch.no_grad():
        loss, st = fxt.linear_cross_entropy(x, w, t, linear_bias=b, outputs=names)
    assert vocab_tiles == [5]
    torch.testing.assert_close(loss, loss_r, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(st.lse, st_r.lse, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(st.entropy, st_r.entropy, rtol=2e-6, atol=2e-6)
    assert torch.equal(st.argmax, st_r.argmax) and st.accuracy == st_r.accuracy
