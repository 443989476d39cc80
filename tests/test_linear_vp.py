"""fastxent.torch.vocab_parallel_linear_cross_entropy on two spawned gloo processes (the
weight's rows split 7 + 12 of V = 19): loss, grad_input, each rank's weight and bias slice
against the one-process fastxent.torch.linear_cross_entropy on the full weight, for every
reduction and the options (class weights given in full, ignore_index, label smoothing over
the whole vocabulary, sample weights, z_loss, softcap), float64 and bfloat16."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from gloo_ranks import run_ranks  # noqa: E402

SPLIT = (7, 12)
CASES = [
    ("mean", {}, "float64"),
    ("sum", {"label_smoothing": 0.1}, "float64"),
    ("none", {"ignore_index": 3, "z_loss": 1e-3}, "float64"),
    (
        "mean",
        {
            "weight": True,
            "ignore_index": 3,
            "label_smoothing": 0.2,
            "sample_weight": True,
            "softcap": 5.0,
        },
        "float64",
    ),
    ("mean", {"label_smoothing": 0.1}, "bfloat16"),
]


def _errors(rank, dist):
    import fastxent.torch as fxt

    out = []
    for i, (red, opt, dt_name) in enumerate(CASES):
        dt = getattr(torch, dt_name)
        g = torch.Generator().manual_seed(i)
        n, h, v = 13, 6, sum(SPLIT)
        x = torch.randn(n, h, generator=g, dtype=torch.float64).to(dt)
        w = torch.randn(v, h, generator=g, dtype=torch.float64).to(dt)
        b = (0.1 * torch.randn(v, generator=g, dtype=torch.float64)).to(dt)
        t = torch.randint(0, v, (n,), generator=g)
        kw = {k: val for k, val in opt.items() if k not in ("weight", "sample_weight")}
        if "ignore_index" in opt:
            t[::3] = opt["ignore_index"]
        if opt.get("weight"):
            kw["weight"] = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
        if opt.get("sample_weight"):
            kw["sample_weight"] = torch.rand(n, generator=g, dtype=torch.float64)
        up = torch.randn(n if red == "none" else (), generator=g, dtype=torch.float64).to(dt)
        lo = 0 if rank == 0 else SPLIT[0]
        hi = lo + SPLIT[rank]
        xl, wl, bl = (a.clone().requires_grad_() for a in (x, w[lo:hi], b[lo:hi]))
        loss = fxt.vocab_parallel_linear_cross_entropy(
            xl, wl, t, linear_bias=bl, reduction=red, tile_rows=4, **kw
        )
        loss.backward(up)
        xr, wr, br = (a.clone().requires_grad_() for a in (x, w, b))
        ref = fxt.linear_cross_entropy(xr, wr, t, linear_bias=br, reduction=red, **kw)
        ref.backward(up)
        pairs = [
            (loss, ref),
            (xl.grad, xr.grad),
            (wl.grad, wr.grad[lo:hi]),
            (bl.grad, br.grad[lo:hi]),
        ]
        out.append(
            (
                dt_name,
                [
                    float(
                        (p.detach().double() - q.detach().double()).abs().max()
                        / max(1.0, float(q.detach().double().abs().max()))
                    )
                    for p, q in pairs
                ],
            )
        )
    return out


def test_matches_one_process(tmp_path):
    for r, res in enumerate(run_ranks(_errors, (), tmp_path)):
        for (dt_name, errs), case in zip(res, CASES):
            tol = 1e-12 if dt_name == "float64" else 2e-2
            assert max(errs) <= tol, (r, case, errs)


def _refusals(rank, dist):
    """Each derivative the vocab-parallel losses do not compute, asked for: the message it
    raises, or what came back instead (a silently missing or constant derivative)."""
    import torch.autograd.forward_ad as fwAD

    import fastxent.torch as fxt

    g = torch.Generator().manual_seed(rank)
    n, h, v = 4, 3, SPLIT[rank]
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64)
    t = torch.randint(0, sum(SPLIT), (n,), generator=g)
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
    sw = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    vplin, vp = fxt.vocab_parallel_linear_cross_entropy, fxt.vocab_parallel_cross_entropy

    def penalty(f):  # a gradient penalty: create_graph=True, then a second backward
        xx = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(f(xx), xx, create_graph=True)
        ((gx**2).sum() + xx.sum()).backward()
        return xx.grad

    def tangent(f, a, requires_grad=False):
        with fwAD.dual_level():
            d = fwAD.make_dual(a.clone().requires_grad_(requires_grad), torch.ones_like(a))
            return fwAD.unpack_dual(f(d)).tangent

    def grad_of(f, a):
        a = a.clone().requires_grad_()
        f(a).backward()
        return a.grad

    cases = {
        "vplin penalty": lambda: penalty(lambda xx: vplin(xx, w, t)),
        "vplin weight grad": lambda: grad_of(
            lambda c: vplin(x.clone().requires_grad_(), w, t, weight=c), cw
        ),
        "vplin sample_weight grad": lambda: grad_of(
            lambda s: vplin(x.clone().requires_grad_(), w, t, sample_weight=s), sw
        ),
        "vplin input tangent": lambda: tangent(lambda xx: vplin(xx, w, t), x),
        "vplin input tangent rg": lambda: tangent(lambda xx: vplin(xx, w, t), x, True),
        "vplin weight tangent": lambda: tangent(lambda c: vplin(x, w, t, weight=c), cw),
        "vplin func.grad": lambda: torch.func.grad(lambda xx: vplin(xx, w, t))(x),
        "vp logits tangent": lambda: tangent(lambda z: vp(z, t), x @ w.t()),
        "vp weight tangent": lambda: tangent(lambda c: vp(x @ w.t(), t, weight=c), cw),
        "vp sample_weight tangent": lambda: tangent(
            lambda s: vp(x @ w.t(), t, sample_weight=s), sw
        ),
    }
    out = {}
    for name, f in cases.items():
        try:
            r = f()
            out[name] = f"no error: {r}"
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            out[name] = f"{type(e).__name__}: {e}"
    return out


def test_missing_derivatives_raise(tmp_path):
    """No silently wrong derivative: a create_graph=True backward gave a constant gradient
    (a gradient penalty's term silently 0); class / sample weights that require grad were
    detached (grad None); forward-mode tangents of the logits, hidden states and weights
    were dropped (tangent None). Each raises RuntimeError naming what is missing."""
    expect = {
        "vplin penalty": "no second-order derivative",
        "vplin weight grad": "does not differentiate with respect to weight",
        "vplin sample_weight grad": "does not differentiate with respect to sample_weight",
        "vplin input tangent": "no forward-mode derivative",
        "vplin input tangent rg": "no forward-mode derivative",
        "vplin weight tangent": "forward-mode tangent",
        "vplin func.grad": "torch.func",
        "vp logits tangent": "no forward-mode derivative",
        "vp weight tangent": "forward-mode tangent",
        "vp sample_weight tangent": "forward-mode tangent",
    }
    for r, res in enumerate(run_ranks(_refusals, (), tmp_path)):
        for name, needle in expect.items():
            assert needle in res[name], (r, name, res[name])
