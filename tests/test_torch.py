"""fastxent.torch: the autograd Function, F.cross_entropy parity, gradcheck, training, the
inplace mode and its guards, half precision, errors.

Tolerances (loss_error / grad_error of tests/reference.py: loss relative to max(|loss|, 1),
gradient relative to its largest entry):

* float64, 1e-12: both PyTorch and fastxent compute in float64 with no cancellation-prone
  step; the difference is a few u (1.1e-16) times the accumulation lengths (<= a few hundred
  here). 1e-12 is far above that and far below any formula mistake (>= 1e-3).
* float32, 64 u (3.8e-6): fastxent's own float32 error is <= 24 u (the bound derived in
  tests/test_cross_entropy.py), and PyTorch's float32 log_softmax / nll_loss accumulates in
  float32, adding up to ~u * (log2 C + log2 N) for the shapes here (<= 10 u), plus the
  rounding of F's own exp/log (a few u). Their difference is thus bounded by ~40 u; 64 u
  keeps a margin and still catches every formula error.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastxent._api as api  # noqa: E402
import fastxent.torch as fxt  # noqa: E402
from reference import U32, grad_error, loss_error  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 64 * U32}  # see the module docstring
REDUCTIONS = ("mean", "sum", "none")
# (shape of the input): unbatched (C,), (N, C), (N, C, d1), (N, C, d1, d2).
SHAPES = [(7,), (9, 5), (4, 6, 3), (2, 5, 3, 2)]
OPTION_SETS = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.15),
    dict(weight=True, label_smoothing=0.3, ignore=True),
    dict(ignore=True, ignore_index=3),
    dict(probs=True),
    dict(probs=True, weight=True, label_smoothing=0.2),
]


def _t(a):
    return torch.from_numpy(np.array(a, order="C"))  # a C-contiguous copy, 0-d kept 0-d


def _inputs(
    rng,
    shape,
    dtype,
    probs=False,
    weight=False,
    ignore=False,
    ignore_index=-100,
    label_smoothing=0.0,
):
    """(input, target, F keywords): logits ~ 2 randn, 25% of rows ignored when asked."""
    C = shape[0] if len(shape) == 1 else shape[1]
    rows = () if len(shape) == 1 else (shape[0],) + shape[2:]
    x = _t(2.0 * rng.standard_normal(shape)).to(dtype)
    if probs:
        p = rng.random(shape)
        p /= p.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)
        y = _t(p).to(dtype)
    else:
        yy = rng.integers(0, C, size=rows)
        if ignore:
            yy = np.where(rng.random(rows) < 0.25, ignore_index, yy)
            yy.reshape(-1)[0] = 0  # at least one counted row
        y = _t(np.asarray(yy, dtype=np.int64))
    kw = dict(label_smoothing=label_smoothing)
    if ignore:
        kw["ignore_index"] = ignore_index
    if weight:
        kw["weight"] = _t(rng.uniform(0.25, 2.0, C)).to(dtype)
    return x, y, kw


def _loss_and_grad(fn, x, y, go=None, **kw):
    """(loss, d(sum(go * loss))/dx) as float64 NumPy arrays."""
    xx = x.detach().clone().requires_grad_(True)
    loss = fn(xx, y, **kw)
    if go is None:
        loss.backward()
    else:
        loss.backward(go)
    return loss.detach().double().numpy(), xx.grad.double().numpy()


# ----------------------------------------------------------------------------------------
# parity with F.cross_entropy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
def test_matches_F_cross_entropy(rng, dtype, shape, reduction, opts):
    x, y, kw = _inputs(rng, shape, dtype, **opts)
    kw["reduction"] = reduction
    go = None
    if reduction == "none":  # a random upstream gradient per row: tests the per-row scaling
        go = _t(
            rng.uniform(
                -2.0,
                2.0,
                y.shape if not opts.get("probs") else F.cross_entropy(x, y, reduction="none").shape,
            )
        ).to(dtype)
    l_fx, g_fx = _loss_and_grad(fxt.cross_entropy, x, y, go, **kw)
    l_pt, g_pt = _loss_and_grad(F.cross_entropy, x, y, go, **kw)
    assert l_fx.shape == l_pt.shape
    assert loss_error(l_fx, l_pt) <= TOL[dtype]
    assert grad_error(g_fx, g_pt) <= TOL[dtype]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_matches_nn_CrossEntropyLoss(rng, reduction):
    x, y, kw = _inputs(rng, (12, 7), torch.float64, weight=True, ignore=True, label_smoothing=0.1)
    ours = fxt.CrossEntropyLoss(
        kw["weight"], ignore_index=-100, reduction=reduction, label_smoothing=0.1
    )
    theirs = torch.nn.CrossEntropyLoss(
        kw["weight"], ignore_index=-100, reduction=reduction, label_smoothing=0.1
    )
    l1, g1 = _loss_and_grad(
        lambda a, b: ours(a, b), x, y, torch.ones(12) if reduction == "none" else None
    )
    l2, g2 = _loss_and_grad(
        lambda a, b: theirs(a, b), x, y, torch.ones(12) if reduction == "none" else None
    )
    assert loss_error(l1, l2) <= 1e-12 and grad_error(g1, g2) <= 1e-12


def test_module_weight_is_a_buffer():
    m = fxt.CrossEntropyLoss(torch.ones(4), label_smoothing=0.1, z_loss=1e-3)
    assert "weight" in dict(m.named_buffers()) and "weight" in m.state_dict()
    assert m.double().weight.dtype == torch.float64
    assert "label_smoothing=0.1" in repr(m) and "z_loss=0.001" in repr(m)
    assert fxt.CrossEntropyLoss().weight is None
    with pytest.raises(ValueError, match="reduction"):
        fxt.CrossEntropyLoss(reduction="avg")


@pytest.mark.parametrize(
    "kw",
    [
        dict(label_smoothing=0.5),
        dict(reduction="sum"),
        dict(ignore_index=0),
        dict(weight=torch.ones(4)),
        dict(inplace=True),
        dict(reduce=False),
    ],
    ids=lambda d: next(iter(d)),
)
def test_module_forward_refuses_constructor_arguments(kw):
    # They were silently ignored per call: crit(x, y, label_smoothing=0.5) gave the loss
    # without smoothing.
    x, y = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match=f"forward\\(\\) got {next(iter(kw))}.*constructor"):
        fxt.CrossEntropyLoss()(x, y, **kw)
    assert x.grad is None
    sw = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    l1 = fxt.CrossEntropyLoss(reduction="sum")(x.double(), y, sample_weight=sw)
    l2 = (F.cross_entropy(x.double(), y, reduction="none") * sw).sum()
    assert abs(l1.item() - l2.item()) <= 1e-12 * abs(l2.item())


def test_noncontiguous_input(rng):
    x = _t(rng.standard_normal((6, 9)))
    xt = x.t()  # (9, 6), a transposed view: rows are strided
    y = _t(rng.integers(0, 6, 9))
    for reduction in REDUCTIONS:
        go = torch.ones(9, dtype=torch.float64) if reduction == "none" else None
        l1, g1 = _loss_and_grad(fxt.cross_entropy, xt, y, go, reduction=reduction)
        l2, g2 = _loss_and_grad(F.cross_entropy, xt, y, go, reduction=reduction)
        assert loss_error(l1, l2) <= 1e-12 and grad_error(g1, g2) <= 1e-12


def test_any_integer_target_dtype(rng):
    x, y, _ = _inputs(rng, (5, 4), torch.float64)
    ref = fxt.cross_entropy(x, y)
    for dt in (torch.int32, torch.int16, torch.uint8):
        assert fxt.cross_entropy(x, y.to(dt)).item() == ref.item()


# ----------------------------------------------------------------------------------------
# the fastxent options, against an explicit float64 autograd formula


def _options_reference(x, y, w, sw, z_loss, softcap, scale, normalizer, reduction):
    z = scale * x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.movedim(1, -1)
    lse = torch.logsumexp(z, -1)
    nll = lse - z.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    counted = y != -100
    wy = w[y.clamp(min=0)]
    row = torch.where(counted, sw * (wy * nll + z_loss * lse**2), torch.zeros_like(nll))
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    D = normalizer if normalizer is not None else (sw * wy * counted).sum()
    return row.sum() / D


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("normalizer", [None, 7.0])
def test_fastxent_options(rng, reduction, softcap, normalizer):
    x = _t(2.0 * rng.standard_normal((5, 6, 4)))
    y = _t(rng.integers(0, 6, (5, 4)))
    y[0, 1] = -100
    w = _t(rng.uniform(0.5, 2.0, 6))
    sw = _t(rng.uniform(0.0, 2.0, (5, 4)))
    opts = dict(z_loss=1e-2, softcap=softcap, logit_scale=1.3, normalizer=normalizer)
    go = _t(rng.uniform(-1, 1, (5, 4))) if reduction == "none" else None
    l1, g1 = _loss_and_grad(
        fxt.cross_entropy, x, y, go, weight=w, reduction=reduction, sample_weight=sw, **opts
    )
    l2, g2 = _loss_and_grad(
        lambda a, b: _options_reference(a, b, w, sw, 1e-2, softcap, 1.3, normalizer, reduction),
        x,
        y,
        go,
    )
    assert loss_error(l1, l2) <= 1e-12 and grad_error(g1, g2) <= 1e-12
    # The module: constructor options, per-call sample_weight.
    m = fxt.CrossEntropyLoss(w, reduction=reduction, **opts)
    l3, g3 = _loss_and_grad(lambda a, b: m(a, b, sample_weight=sw), x, y, go)
    assert np.array_equal(l3, l1) and np.array_equal(g3, g1)


# ----------------------------------------------------------------------------------------
# gradcheck (float64, finite differences)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 3)], ids=str)
def test_gradcheck(rng, reduction, opts, shape):
    x, y, kw = _inputs(rng, shape, torch.float64, **opts)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: fxt.cross_entropy(a, y, reduction=reduction, **kw),
        (x,),
        eps=1e-6,
        atol=1e-8,
        rtol=1e-6,
    )


def test_gradcheck_fastxent_options(rng):
    x = _t(rng.standard_normal((4, 5))).requires_grad_(True)
    y = _t(rng.integers(0, 5, 4))
    sw = _t(rng.uniform(0.5, 1.5, 4))
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda a, r=reduction: fxt.cross_entropy(
                a,
                y,
                reduction=r,
                sample_weight=sw,
                z_loss=0.05,
                softcap=2.0,
                logit_scale=0.7,
            ),
            (x,),
        )


# ----------------------------------------------------------------------------------------
# training


def _separable_data(n=256, d=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + 0.5 * torch.randn(n, d, generator=g)
    return x, y


@pytest.mark.parametrize("inplace", [False, True])
def test_trains_a_classifier(inplace):
    """A small MLP learns separable synthetic data with fastxent as its loss."""
    torch.manual_seed(0)
    x, y = _separable_data()
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    crit = fxt.CrossEntropyLoss(label_smoothing=0.05, inplace=inplace)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.97


def test_training_follows_F_cross_entropy_step_for_step():
    """Two identical float64 models, one trained with F.cross_entropy and one with fastxent
    (with weights, smoothing and ignored rows): their parameters stay equal to rounding."""
    x, y = _separable_data(n=128)
    x = x.double()
    y = y.clone()
    y[::7] = -100
    w = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)
    torch.manual_seed(1)
    a = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    a = a.double()
    b = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    b = b.double()
    b.load_state_dict(a.state_dict())
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(20):
        for m, o, fn in ((a, oa, F.cross_entropy), (b, ob, fxt.cross_entropy)):
            o.zero_grad()
            fn(m(x), y, w, ignore_index=-100, label_smoothing=0.1).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------
# the forward-only path


def test_no_gradient_no_fused_call(rng, monkeypatch):
    """Without a gradient to compute the forward-only kernel runs (nothing N x C written)."""
    x, y, _ = _inputs(rng, (6, 5), torch.float32)

    def boom(*a, **k):
        raise AssertionError("cross_entropy_with_grad called without a gradient to compute")

    monkeypatch.setattr(api, "cross_entropy_with_grad", boom)
    ref = F.cross_entropy(x, y)
    l1 = fxt.cross_entropy(x, y)  # x does not require grad
    assert l1.grad_fn is None and loss_error(l1.numpy(), ref.numpy()) <= TOL[torch.float32]
    xr = x.clone().requires_grad_(True)
    with torch.no_grad():
        l2 = fxt.cross_entropy(xr, y, inplace=True)
    assert l2.grad_fn is None and l2.item() == l1.item()
    assert torch.equal(xr.detach(), x)  # inplace acts only when a gradient is computed


def test_gradient_path_does_not_call_forward_only(rng, monkeypatch):
    x, y, _ = _inputs(rng, (6, 5), torch.float32)

    def boom(*a, **k):
        raise AssertionError("the loss-only kernel ran although a gradient is needed")

    monkeypatch.setattr(api, "cross_entropy", boom)
    loss = fxt.cross_entropy(x.requires_grad_(True), y)
    assert loss.grad_fn is not None


def test_backward_twice_with_retain_graph(rng):
    x, y, _ = _inputs(rng, (6, 5), torch.float64)
    x.requires_grad_(True)
    g_ref = torch.autograd.grad(F.cross_entropy(x, y), x)[0]
    loss = fxt.cross_entropy(x, y)
    (2.0 * loss).backward(retain_graph=True)
    (3.0 * loss).backward()
    torch.testing.assert_close(x.grad, 5.0 * g_ref, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------
# inplace


def _head(rng, dtype=torch.float64):
    h = _t(rng.standard_normal((8, 6))).to(dtype).requires_grad_(True)
    lin = torch.nn.Linear(6, 5).to(dtype)
    y = _t(rng.integers(0, 5, 8))
    return h, lin, y


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_inplace_same_gradients_and_overwrites_logits(rng, reduction, scale):
    h, lin, y = _head(rng)
    grads = []
    for inplace in (False, True):
        h.grad = None
        lin.zero_grad()
        logits = lin(h)
        seen = {}
        logits.register_hook(lambda g, seen=seen: seen.setdefault("g", g.clone()))
        loss = fxt.cross_entropy(
            logits, y, reduction=reduction, label_smoothing=0.1, inplace=inplace
        )
        if inplace:  # the logits' memory now holds d(loss)/d(logits)
            _, g = api.cross_entropy_with_grad(
                lin(h).detach().numpy(), y.numpy(), reduction=reduction, label_smoothing=0.1
            )
            assert np.array_equal(logits.detach().numpy(), g)
        (scale * loss.sum()).backward()
        grads.append((h.grad.clone(), lin.weight.grad.clone(), seen["g"]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_class_dim_1(rng, reduction):
    """(N, C, d) logits, the class dimension read in place (fastxent's axis=1)."""
    h = _t(rng.standard_normal((3, 4, 6))).requires_grad_(True)
    lin = torch.nn.Linear(6, 5).double()
    y = _t(rng.integers(0, 5, (3, 4)))
    y[1, 2] = -100
    go = _t(rng.uniform(0.5, 2.0, (3, 4))) if reduction == "none" else None
    grads = []
    for inplace in (False, True):
        h.grad = None
        logits = lin(h).transpose(1, 2).contiguous()  # (3, 5, 4)
        loss = fxt.cross_entropy(
            logits, y, reduction=reduction, label_smoothing=0.2, inplace=inplace
        )
        loss.backward(go)
        grads.append(h.grad.clone())
    x = lin(h).transpose(1, 2).detach().requires_grad_(True)
    F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.2).backward(go)
    ref = torch.einsum("nct,cd->ntd", x.grad, lin.weight.detach())
    for g in grads:
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


def test_inplace_half(rng):
    h, lin, y = _head(rng, torch.float32)
    lin = lin.to(torch.bfloat16)
    hb = h.detach().to(torch.bfloat16).requires_grad_(True)
    loss = fxt.cross_entropy(lin(hb), y, inplace=True)
    loss.backward()
    ref_h = hb.detach().clone().requires_grad_(True)
    F.cross_entropy(lin(ref_h).float(), y).backward()
    assert hb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hb.grad.float(), ref_h.grad.float(), rtol=2e-2, atol=2e-3)


def test_inplace_second_backward_after_scaling_raises(rng):
    h, lin, y = _head(rng)
    loss = fxt.cross_entropy(lin(h), y, inplace=True)
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran a second time"):
        loss.backward()


def test_inplace_second_backward_with_unit_grad_is_fine(rng):
    h, lin, y = _head(rng)
    loss = fxt.cross_entropy(lin(h), y, inplace=True)
    loss.backward(retain_graph=True)
    g1 = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2.0 * g1)


def test_inplace_detects_an_autograd_node_that_saved_the_logits(rng):
    """tanh saves its output for backward; overwriting it must fail loudly, not silently."""
    h, lin, y = _head(rng)
    logits = torch.tanh(lin(h))
    loss = fxt.cross_entropy(logits, y, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_refuses_leaf_and_noncontiguous(rng):
    x, y, _ = _inputs(rng, (6, 5), torch.float64)
    leaf = x.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="leaf"):
        fxt.cross_entropy(leaf, y, inplace=True)
    assert torch.equal(leaf.detach(), x)
    with pytest.raises(ValueError, match="leaf"):  # a view of a leaf is the leaf's memory
        fxt.cross_entropy(leaf.view(3, 2, 5).view(6, 5), y, inplace=True)
    assert torch.equal(leaf.detach(), x)
    nc = (x.t().contiguous().requires_grad_(True) * 1.0).t()  # non-leaf, transposed
    with pytest.raises(ValueError, match="contiguous"):
        fxt.cross_entropy(nc, y, inplace=True)
    with pytest.raises(TypeError, match="inplace"):
        fxt.cross_entropy(leaf * 1.0, y, inplace=1)


def test_inplace_error_leaves_logits_intact(rng):
    h, lin, y = _head(rng)
    logits = lin(h)
    before = logits.detach().clone()
    bad = y.clone()
    bad[3] = 99
    with pytest.raises(IndexError, match="out of range"):
        fxt.cross_entropy(logits, bad, inplace=True)
    assert torch.equal(logits.detach(), before)


# ----------------------------------------------------------------------------------------
# half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision_via_float32(rng, dtype, reduction):
    """Half inputs are computed in float32 from the (exactly representable) half values: the
    result is F.cross_entropy in float32 on the same values, rounded once to the half type."""
    x, y, kw = _inputs(rng, (10, 7), dtype, weight=True, label_smoothing=0.1)
    kw["weight"] = kw["weight"].float()
    go = torch.ones(10) if reduction == "none" else None
    xr = x.detach().clone().requires_grad_(True)
    loss = fxt.cross_entropy(xr, y, reduction=reduction, **kw)
    loss.backward(None if go is None else go.to(dtype))
    assert loss.dtype == dtype and xr.grad.dtype == dtype
    x32 = x.float().requires_grad_(True)
    ref = F.cross_entropy(x32, y, reduction=reduction, **kw)
    ref.backward(go)
    ulp = float(torch.finfo(dtype).eps)  # one rounding to the half type
    torch.testing.assert_close(loss.float(), ref.detach(), rtol=ulp, atol=0)
    torch.testing.assert_close(
        xr.grad.float(),
        x32.grad.to(dtype).float(),
        rtol=ulp,
        atol=ulp * float(x32.grad.abs().max()),
    )


# ----------------------------------------------------------------------------------------
# edge cases and errors


def test_no_counted_rows_mean_is_zero():
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.full((3,), -100)
    loss = fxt.cross_entropy(x, y)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()
    e = torch.zeros(0, 4, requires_grad=True)
    loss = fxt.cross_entropy(e, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, 4)


def test_non_cpu_tensors_rejected():
    # TypeError, as the README's error table and fastxent's NumPy API say (meta logits are
    # shape inference instead: tests/test_torch_training.py).
    with pytest.raises(TypeError, match="CPU kernel.*target"):
        fxt.cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(TypeError, match="CPU kernel.*weight"):
        fxt.cross_entropy(
            torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(3, device="meta")
        )
    with pytest.raises(TypeError, match="fastxent is a CPU kernel"):
        fxt.vocab_parallel_cross_entropy(
            torch.empty(4, 3, device="meta"),
            torch.zeros(4, dtype=torch.long),
            offset=0,
            num_classes=3,
        )


def test_errors():
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        fxt.cross_entropy(torch.ones(4, 3, dtype=torch.int32), y)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fxt.cross_entropy(x.numpy(), y)
    with pytest.raises(TypeError, match="axis"):
        fxt.cross_entropy(x, y, axis=0)
    with pytest.raises(TypeError, match="out"):
        fxt.cross_entropy(x, y, out=x)
    with pytest.raises(TypeError):
        fxt.cross_entropy(x, y, no_such_option=1)
    # F's positional order is accepted (tests/test_torch_training.py checks the legacy
    # arguments); a non-integer ignore_index in its position is still an error.
    with pytest.raises(TypeError, match="ignore_index"):
        fxt.cross_entropy(x, y, None, None, 1.5)
    with pytest.raises(TypeError, match="target"):
        fxt.cross_entropy(x, y.bool())
    with pytest.raises(IndexError, match=r"target\[2\] = 3"):
        fxt.cross_entropy(x, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="shape"):
        fxt.cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        fxt.cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match="ignore_index"):
        fxt.cross_entropy(x, torch.softmax(x, 1), ignore_index=0)
    with pytest.raises(ValueError, match="0-dimensional"):
        fxt.cross_entropy(torch.tensor(1.0), torch.tensor(0))
    xg = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="weight"):
        fxt.cross_entropy(xg, y, torch.ones(3, requires_grad=True))
    # (a probability target that requires grad is differentiated: test_torch_derivatives.py)
    with pytest.raises(RuntimeError, match="sample_weight"):
        fxt.cross_entropy(xg, y, sample_weight=torch.ones(4, requires_grad=True))


def test_docstring_examples():
    res = doctest.testmod(fxt, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
