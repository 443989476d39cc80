"""fastxent.torch.linear_kl_div / linear_jsd against PyTorch's F.kl_div with autograd on the
materialised logits (the NumPy API: test_distill_linear.py)."""

import numpy as np
import pytest

import fastxent as fx

torch = pytest.importorskip("torch")
import fastxent.torch as fxt  # noqa: E402
from test_distill_linear import (  # noqa: E402,F401
    HALF_CASES,
    HALF_TOL,
    HS,
    HT,
    N,
    V,
    _inputs,
    _reference,
    half_inputs,
    half_kw,
    reference_up,
    rel_error,
)

F = torch.nn.functional


# --- fastxent.torch


def _torch_reference(zs, zt, direction, temperature, reduction):
    ls = F.log_softmax(zs / temperature, -1)
    lt = F.log_softmax(zt / temperature, -1)
    inp, tgt = (ls, lt) if direction == "forward" else (lt, ls)
    if reduction == "mean":  # batchmean over the rows (leading axes flattened)
        inp, tgt = inp.reshape(-1, V), tgt.reshape(-1, V)
        return F.kl_div(inp, tgt, log_target=True, reduction="batchmean") * temperature**2
    rows = F.kl_div(inp, tgt, log_target=True, reduction="none").sum(-1) * temperature**2
    return rows.sum() if reduction == "sum" else rows


def _tensors(bias=True, lead=(N,)):
    return [None if x is None else torch.from_numpy(x) for x in _inputs(lead=lead, bias=bias)]


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_matches_f_kl_div(direction, reduction, bias):
    hs, ws, ht, wt, bs, bt = _tensors(bias, lead=(3, 4))
    leaves = [x.requires_grad_() for x in (hs, ws, bs) if x is not None]
    up = torch.linspace(0.5, 1.5, 12).reshape(3, 4) if reduction == "none" else 1.7
    got = fxt.linear_kl_div(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, tile_rows=5,
                            direction=direction, temperature=2.0, reduction=reduction)  # fmt: skip
    g_got = torch.autograd.grad((got * up).sum(), leaves)
    zs = F.linear(hs, ws, bs)
    zt = F.linear(ht, wt, bt)
    want = _torch_reference(zs, zt, direction, 2.0, reduction)
    g_want = torch.autograd.grad((want * up).sum(), leaves)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    for g, w in zip(g_got, g_want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_jsd_matches_dense(reduction):
    hs, ws, ht, wt, bs, bt = _tensors()
    leaves = [x.requires_grad_() for x in (hs, ws, bs)]
    mask = torch.arange(N) % 4 != 1
    kw = dict(beta=0.3, temperature=1.5, reduction=reduction, mask=mask)
    got = fxt.linear_jsd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, tile_rows=3, **kw)
    want = fxt.jsd_with_logits(F.linear(hs, ws, bs), F.linear(ht, wt, bt), **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    for g, w in zip(torch.autograd.grad(got.sum(), leaves),
                    torch.autograd.grad(want.sum(), leaves)):  # fmt: skip
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)


def test_torch_only_what_requires_grad():
    hs, ws, ht, wt, bs, bt = _tensors()
    ws.requires_grad_()
    loss = fxt.linear_kl_div(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt)
    (gw,) = torch.autograd.grad(loss, [ws])
    np.testing.assert_allclose(gw.numpy(), _reference(*_inputs())[2], rtol=1e-12, atol=1e-13)
    with torch.no_grad():
        assert not fxt.linear_kl_div(hs, ws, ht, wt).requires_grad


@pytest.mark.parametrize("which", [2, 3, 5])
def test_torch_teacher_requires_grad_refused(which):
    ts = _tensors()
    ts[0].requires_grad_()
    ts[which].requires_grad_()
    hs, ws, ht, wt, bs, bt = ts
    with pytest.raises(RuntimeError, match="frozen"):
        fxt.linear_kl_div(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt)
    with pytest.raises(RuntimeError, match="frozen"):
        fxt.linear_jsd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_double_backward_refused(reduction):
    hs, ws, ht, wt, bs, bt = _tensors()
    hs.requires_grad_()
    loss = fxt.linear_kl_div(hs, ws, ht, wt, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(loss, [hs], create_graph=True)


def test_torch_errors():
    hs, ws, ht, wt, bs, bt = _tensors()
    with pytest.raises(ValueError, match="vocabulary"):
        fxt.linear_kl_div(hs, ws, ht, wt[:-1])
    with pytest.raises(TypeError, match="dtype"):
        fxt.linear_kl_div(hs, ws, ht.float(), wt)
    with pytest.raises(TypeError, match="teacher_hidden has dtype"):
        fxt.linear_kl_div(hs.bfloat16(), ws.bfloat16(), ht, wt)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fxt.linear_kl_div(hs.numpy(), ws, ht, wt)


def test_torch_float32_grads_dtype():
    hs, ws, ht, wt, bs, bt = (None if x is None else x.float() for x in _tensors())
    hs.requires_grad_()
    ws.requires_grad_()
    loss = fxt.linear_jsd(hs, ws, ht, wt, tile_rows=4)
    gh, gw = torch.autograd.grad(loss, [hs, ws])
    assert loss.dtype == gh.dtype == gw.dtype == torch.float32


def _dense_grads(hs, ws, ht, wt, up, **kw):
    """Gradients of sum(up * loss) through the materialised logits (fastxent's dense loss)."""
    hs, ws = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    loss = fxt.kl_div_with_logits(hs @ ws.T, (ht @ wt.T).detach(), reduction="none", **kw)
    (loss * up).sum().backward()
    return hs.grad, ws.grad


def test_torch_none_any_upstream_gradient():
    # A negative, zero or NaN upstream gradient (loss * advantage) is not a row weight: the
    # backward of "none" scales G's rows after the kernel (it raised "row weights must be
    # finite and >= 0").
    hs, ws, ht, wt, _, _ = _tensors(bias=False)
    sw = torch.rand(N, dtype=torch.float64)
    for up in (
        torch.linspace(-1.5, 2.0, N, dtype=torch.float64),
        torch.tensor([float("nan")] + [1.0] * (N - 1), dtype=torch.float64),
    ):
        a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        (fxt.linear_kl_div(a, b, ht, wt, reduction="none", sample_weight=sw) * up).sum().backward()
        gh, gw = _dense_grads(hs, ws, ht, wt, up, sample_weight=sw)
        torch.testing.assert_close(a.grad, gh, rtol=1e-12, atol=1e-13, equal_nan=True)
        torch.testing.assert_close(b.grad, gw, rtol=1e-12, atol=1e-13, equal_nan=True)


def test_torch_none_inference_mode_teacher_and_in_place_row_arrays():
    hs, ws, ht, wt, _, _ = _tensors(bias=False)
    with torch.inference_mode():  # the usual frozen teacher (could not be saved for backward)
        ht_i, wt_i = ht.clone(), wt.clone()
    up = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    sw = torch.rand(N, dtype=torch.float64)
    sw0 = sw.clone()
    a = hs.clone().requires_grad_()
    loss = fxt.linear_kl_div(a, ws, ht_i, wt_i, reduction="none", sample_weight=sw)
    sw.mul_(0)  # after the forward: the backward uses the weights the loss was computed with
    (loss * up).sum().backward()
    gh, _ = _dense_grads(hs, ws, ht, wt, up, sample_weight=sw0)
    torch.testing.assert_close(a.grad, gh, rtol=1e-12, atol=1e-13)
    # An input changed in place before the backward of "none" (which reads it again) raises.
    a = hs.clone().requires_grad_()
    t = ht.clone()
    loss = fxt.linear_kl_div(a, ws, t, wt, reduction="none")
    t.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.sum().backward()


@pytest.mark.parametrize("fn", ["kl", "jsd"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_mean_sum_backward_scales_in_place(fn, reduction):
    # "mean" / "sum": the backward hands out the forward's gradients scaled in place (it made
    # a second copy of each, `g * go`, and kept the first until the graph was freed). Against
    # the dense loss with autograd: an upstream 1, a non-unit upstream gradient, gradients
    # accumulated into existing .grad, two backwards with retain_graph=True (the second
    # computes them again), a batch of upstream gradients, an input changed in place.
    hs, ws, ht, wt, bs, bt = _tensors()
    kw = dict(reduction=reduction, temperature=1.5)
    if fn == "jsd":
        kw["beta"] = 0.3
    lin0 = fxt.linear_jsd if fn == "jsd" else fxt.linear_kl_div

    def lin(*args, **k):
        return lin0(*args, tile_rows=5, **k)

    dense = fxt.jsd_with_logits if fn == "jsd" else fxt.kl_div_with_logits

    def leaves():
        return [x.detach().clone().requires_grad_() for x in (hs, ws, bs)]

    def want(up):
        a = leaves()
        loss = dense(F.linear(a[0], a[1], a[2]), F.linear(ht, wt, bt), **kw)
        return torch.autograd.grad(loss, a, torch.tensor(up, dtype=loss.dtype))

    def close(got, exp):
        for g, w in zip(got, exp):
            torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)

    for up in (1.0, -2.5):
        a = leaves()
        loss = lin(a[0], a[1], ht, wt, student_bias=a[2], teacher_bias=bt, **kw)
        saved = [g.data_ptr() for g in loss.grad_fn.grads]
        loss.backward(torch.tensor(up, dtype=loss.dtype))
        close([x.grad for x in a], want(up))
        # no copy: the weight's .grad is the forward's gradient itself, and nothing is kept
        assert a[1].grad.data_ptr() == saved[1]
        assert loss.grad_fn.grads is None
        # accumulated into the existing .grad
        lin(a[0], a[1], ht, wt, student_bias=a[2], teacher_bias=bt, **kw).backward(
            torch.tensor(up, dtype=loss.dtype)
        )
        close([x.grad for x in a], [2 * w for w in want(up)])
    # retain_graph=True and backward twice: each backward gets the right gradients
    for ups in ((1.0, 1.0), (3.0, 3.0), (3.0, 1.0), (1.0, -0.5), (2.0, 0.25)):
        a = leaves()
        loss = lin(a[0], a[1], ht, wt, student_bias=a[2], teacher_bias=bt, **kw)
        for i, up in enumerate(ups):
            go = torch.tensor(up, dtype=loss.dtype)
            close(torch.autograd.grad(loss, a, go, retain_graph=i == 0), want(up))
    a = leaves()
    loss = lin(a[0], a[1], ht, wt, student_bias=a[2], teacher_bias=bt, **kw)
    loss.backward(retain_graph=True)
    loss.backward(torch.tensor(-2.0, dtype=loss.dtype))
    close([x.grad for x in a], [w1 + w2 for w1, w2 in zip(want(1.0), want(-2.0))])
    # a batch of upstream gradients, twice (the saved gradients are not scaled in place)
    a = leaves()
    loss = lin(a[0], a[1], ht, wt, student_bias=a[2], teacher_bias=bt, **kw)
    ups = torch.tensor([1.0, -2.0, 0.5], dtype=loss.dtype)
    for retain in (True, False):
        got = torch.autograd.grad(loss, a, ups, retain_graph=retain, is_grads_batched=True)
        for j, up in enumerate(ups.tolist()):
            close([g[j] for g in got], want(up))
    # the second backward reads the inputs again: one changed in place since is refused
    a = leaves()
    t = ht.clone()
    loss = lin(a[0], a[1], t, wt, student_bias=a[2], teacher_bias=bt, **kw)
    loss.backward(retain_graph=True)
    t.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_torch_no_grad_forward_is_loss_only(monkeypatch):
    # Under no_grad (evaluation) no gradient is computed even though the head requires grad.
    from fastxent import _distill_linear

    hs, ws, ht, wt, _, _ = _tensors(bias=False)
    ws.requires_grad_()
    wants = []
    run = _distill_linear.run

    def spy(*a, **kw):
        wants.append(kw["want"])
        return run(*a, **kw)

    monkeypatch.setattr(_distill_linear, "run", spy)
    with torch.no_grad():
        got = fxt.linear_kl_div(hs, ws, ht, wt)
    assert wants == [(False, False, False)]
    want = fx.linear_kl_div(hs.numpy(), ws.detach().numpy(), ht.numpy(), wt.numpy())
    assert float(got) == pytest.approx(float(want), rel=1e-14)


def test_torch_func_transforms_raise_clearly():
    # torch.func hands the wrapper tensors without storage: a clear error, never a number.
    hs, ws, ht, wt, _, _ = _tensors(bias=False)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(lambda h: fxt.linear_kl_div(h, ws, ht, wt))(hs)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.vmap(lambda h: fxt.linear_kl_div(h, ws, ht, wt))(hs[None].expand(2, -1, -1))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("jsd, reduction", HALF_CASES)
def test_torch_16bit(dtype, jsd, reduction):
    """float16 / bfloat16 tensors (16-bit tiles by torch.mm, the kernel in float32): the
    loss and gradients in the input dtype, against the float64 result of the same rounded
    inputs, with per-row upstream gradients for "none"; under no_grad the same loss."""
    dt = getattr(torch, dtype)
    ts = [None if x is None else torch.from_numpy(x).to(dt) for x in half_inputs(reduction)]
    hs, ws, ht, wt, bs, bt = ts
    leaves = [x.requires_grad_() for x in (hs, ws, bs) if x is not None]
    kw = half_kw(jsd, reduction)
    tkw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    up = torch.linspace(-1.0, 2.0, N, dtype=torch.float64) if reduction == "none" else 1.7
    fn = fxt.linear_jsd if jsd else fxt.linear_kl_div
    loss = fn(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, tile_rows=4, **tkw)
    assert loss.dtype == dt
    grads = torch.autograd.grad((loss.double() * up).sum(), leaves)
    assert all(g.dtype == dt for g in grads)
    args = [None if x is None else x.detach().double().numpy() for x in ts]
    want = reference_up(args, jsd, up.numpy() if reduction == "none" else up, **kw)
    for got, w in zip((loss.detach(),) + grads, [w for w in want if w is not None]):
        assert rel_error(got.double().numpy(), w) <= HALF_TOL["torch", dtype]
    with torch.no_grad():
        again = fn(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, tile_rows=4, **tkw)
    assert torch.equal(again, loss.detach())
