"""fastxent.torch.vocab_parallel_linear_cross_entropy on two spawned gloo processes (the
weight's rows split 7 + 12 of V = 19): loss, grad_input, each rank's weight and bias slice
against the one-process fastxent.torch.linear_cross_entropy on the full weight, for every
reduction and the options (class weights given in full, ignore_index, label smoothing over
the whole vocabulary, sample weights, z_loss, softcap), float64 and bfloat16. Probability
targets (each rank holding its columns of them) likewise, for float64, float32 and bfloat16,
and against F.linear + F.cross_entropy where PyTorch has the options; their argument errors
are raised before any collective, so those tests run in this process."""

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
    # the entropy bonus (entropies from the merged statistics, gradient through theirs)
    ("none", {"ignore_index": 3, "entropy_coef": 0.3, "sample_weight": True}, "float64"),
    (
        "mean",
        {"entropy_coef": 0.2, "weight": True, "ignore_index": 3, "softcap": 4.0},
        "float64",
    ),
    ("sum", {"entropy_coef": 0.5, "logit_scale": 0.7, "z_loss": 1e-3}, "float64"),
    ("mean", {"entropy_coef": 0.1, "normalizer": 5.0}, "float64"),
    ("mean", {"entropy_coef": 0.2}, "bfloat16"),
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


# Probability targets: each rank holds its columns [lo, hi) of the (..., V) probabilities.
# "perm": a (2, 7, V) target that cannot be viewed as (14, V) rows (gathered per tile).
PROB_CASES = [
    ("mean", {}, "float64"),
    ("sum", {"weight": True, "label_smoothing": 0.1}, "float64"),
    ("none", {"z_loss": 1e-3, "sample_weight": True}, "float64"),
    (
        "mean",
        {"weight": True, "label_smoothing": 0.2, "sample_weight": True, "softcap": 5.0},
        "float64",
    ),
    ("none", {"weight": True, "perm": True}, "float64"),
    ("mean", {"logit_scale": 0.5, "normalizer": 7.0, "z_loss": 1e-2}, "float32"),
    ("sum", {"label_smoothing": 0.1, "perm": True}, "float32"),
    ("none", {"weight": True, "sample_weight": True}, "float32"),
    ("mean", {"weight": True, "label_smoothing": 0.1}, "float32"),
    ("mean", {"label_smoothing": 0.1}, "bfloat16"),
    ("mean", {"entropy_coef": 0.25, "sample_weight": True}, "float64"),
    ("none", {"entropy_coef": 0.1, "perm": True}, "float32"),
]
# The options F.cross_entropy has: those cases are checked against F.linear + F.cross_entropy.
_TORCH_OPTIONS = {"weight", "label_smoothing", "perm"}


def _max_rel(p, q):
    p, q = p.detach().double(), q.detach().double()
    return float((p - q).abs().max() / max(1.0, float(q.abs().max())))


def _prob_errors(rank, dist):
    import torch.nn.functional as F

    import fastxent.torch as fxt

    out = []
    v = sum(SPLIT)
    lo = 0 if rank == 0 else SPLIT[0]
    hi = lo + SPLIT[rank]
    for i, (red, opt, dt_name) in enumerate(PROB_CASES):
        dt = getattr(torch, dt_name)
        g = torch.Generator().manual_seed(100 + i)
        lead = (2, 7) if opt.get("perm") else (13,)  # 13, 14 rows: not a multiple of 4
        x = torch.randn(*lead, 6, generator=g, dtype=torch.float64).to(dt)
        w = torch.randn(v, 6, generator=g, dtype=torch.float64).to(dt)
        b = (0.1 * torch.randn(v, generator=g, dtype=torch.float64)).to(dt)
        pdt = torch.float32 if dt == torch.bfloat16 else dt
        if opt.get("perm"):
            p = torch.randn(7, 2, v, generator=g, dtype=torch.float64)
            p = torch.softmax(2 * p, -1).transpose(0, 1).to(pdt)
        else:
            p = torch.randn(*lead, v, generator=g, dtype=torch.float64)
            p = torch.softmax(2 * p, -1).to(pdt)
        if not opt.get("perm"):
            p.view(-1)[::5] = 0.0  # some zero probabilities
        kw = {k: val for k, val in opt.items() if k not in ("weight", "sample_weight", "perm")}
        if opt.get("weight"):
            kw["weight"] = torch.rand(v, generator=g, dtype=torch.float64) + 0.5
        if opt.get("sample_weight"):
            kw["sample_weight"] = torch.rand(lead, generator=g, dtype=torch.float64)
        up = torch.randn(lead if red == "none" else (), generator=g, dtype=torch.float64).to(dt)
        pl = p[..., lo:hi]
        if opt.get("perm"):  # not viewable as (14, V_r) rows
            assert pl.reshape(-1, hi - lo).data_ptr() != pl.data_ptr()
        xl, wl, bl = (a.clone().requires_grad_() for a in (x, w[lo:hi], b[lo:hi]))
        loss = fxt.vocab_parallel_linear_cross_entropy(
            xl, wl, pl, linear_bias=bl, reduction=red, tile_rows=4, **kw
        )
        loss.backward(up)
        xr, wr, br = (a.clone().requires_grad_() for a in (x, w, b))
        ref = fxt.linear_cross_entropy(xr, wr, p, linear_bias=br, reduction=red, **kw)
        ref.backward(up)
        errs = [
            _max_rel(loss, ref),
            _max_rel(xl.grad, xr.grad),
            _max_rel(wl.grad, wr.grad[lo:hi]),
            _max_rel(bl.grad, br.grad[lo:hi]),
        ]
        if set(opt) <= _TORCH_OPTIONS and dt != torch.bfloat16:
            xt, wt, bt = (a.clone().requires_grad_() for a in (x, w, b))
            z = F.linear(xt, wt, bt).reshape(-1, v)
            tw = kw.get("weight")
            tk = {**kw, "weight": None if tw is None else tw.to(dt)}
            ft = F.cross_entropy(z, p.reshape(-1, v), reduction=red, **tk)
            ft.reshape(up.shape).backward(up)
            errs += [
                _max_rel(loss, ft.reshape(up.shape)),
                _max_rel(xl.grad, xt.grad),
                _max_rel(wl.grad, wt.grad[lo:hi]),
                _max_rel(bl.grad, bt.grad[lo:hi]),
            ]
        # No gradient wanted: the same loss without the autograd Function.
        with torch.no_grad():
            nl = fxt.vocab_parallel_linear_cross_entropy(
                x, w[lo:hi], pl, linear_bias=b[lo:hi], reduction=red, tile_rows=4, **kw
            )
        errs.append(_max_rel(nl, loss))
        out.append((dt_name, errs))
    # A target that requires grad is fine where no gradient is taken (no_grad) ...
    g = torch.Generator().manual_seed(7)  # the same on every rank
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(v, 6, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(5, v, generator=g, dtype=torch.float64), -1)
    pl = p[:, lo:hi].clone().requires_grad_()
    with torch.no_grad():
        a = fxt.vocab_parallel_linear_cross_entropy(x, w[lo:hi], pl)
    bref = fxt.linear_cross_entropy(x, w, p)
    # ... and an in-place change of the target between forward and backward is an error.
    wl = w[lo:hi].clone().requires_grad_()
    pl = p[:, lo:hi].clone()
    loss = fxt.vocab_parallel_linear_cross_entropy(x, wl, pl, tile_rows=2)
    pl.mul_(0.5)
    try:
        loss.backward()
        inplace = "no error"
    except RuntimeError as e:
        inplace = str(e)
    # Targets made under inference_mode work (nothing of theirs is saved for backward), and
    # class indices changed in place after the forward do not change the gradient (copied).
    y = torch.tensor([0, v - 1, 2, 1, 0])
    with torch.inference_mode():
        pi, yi = p[:, lo:hi].clone(), y.clone()
    same = []
    for ref_t, t in ((p[:, lo:hi].clone(), pi), (y, yi), (y, y.clone())):
        grads = []
        for tt in (ref_t, t):
            wl = w[lo:hi].clone().requires_grad_()
            loss = fxt.vocab_parallel_linear_cross_entropy(x, wl, tt, tile_rows=2)
            if tt is t and not t.is_floating_point() and not t.is_inference():
                t.fill_(1)  # after the forward: the backward must still use the old labels
            loss.backward()
            grads.append(wl.grad)
        same.append(bool(torch.equal(grads[0], grads[1])))
    return out, _max_rel(a, bref), inplace, same


def test_probability_targets_match_one_process(tmp_path):
    for r, (res, no_grad_err, inplace, same) in enumerate(run_ranks(_prob_errors, (), tmp_path)):
        for (dt_name, errs), case in zip(res, PROB_CASES):
            tol = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 2e-2}[dt_name]
            assert max(errs) <= tol, (r, case, errs)
        assert [len(e) for _, e in res] == [
            9 if set(c[1]) <= _TORCH_OPTIONS and c[2] != "bfloat16" else 5 for c in PROB_CASES
        ]
        assert no_grad_err <= 1e-12
        assert "modified in place" in inplace, inplace
        assert same == [True, True, True], same


def _args(target, **kw):
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    return (h, w, target), kw


@pytest.mark.parametrize(
    "target, kw, exc, match",
    [
        # probabilities of the wrong shape: rows, or not this rank's 4 columns
        (
            torch.rand(6, 4, dtype=torch.float64),
            {},
            ValueError,
            r"shape \(6, 4\), expected \(5, 4\)",
        ),
        (
            torch.rand(5, 7, dtype=torch.float64),
            {},
            ValueError,
            r"shape \(5, 7\), expected \(5, 4\)",
        ),
        # float class indices, integer probabilities
        (torch.tensor([0.0, 1, 2, 3, 0]), {}, ValueError, "must be an integer tensor"),
        (torch.zeros(5, 4, dtype=torch.int64), {}, ValueError, "must be a float tensor"),
        (torch.zeros(5, 4, dtype=torch.int64), {}, ValueError, r"expected \(5,\)"),
        (torch.zeros(5, dtype=torch.bool), {}, TypeError, "got dtype torch.bool"),
        (torch.zeros(5, 4, dtype=torch.complex64), {}, TypeError, "class probabilities"),
        ("not a tensor", {}, TypeError, "target must be a torch.Tensor"),
        # what probability targets exclude, as the one-process function and
        # vocab_parallel_cross_entropy
        (
            torch.rand(5, 4, dtype=torch.float64),
            {"ignore_index": 2},
            ValueError,
            "ignore_index applies to class-index targets only",
        ),
        (
            torch.rand(5, 4, dtype=torch.float64, requires_grad=True),
            {},
            RuntimeError,
            "does not differentiate with respect to a probability target",
        ),
        # inputs that are not differentiated: requiring grad raises (it was grad None)
        (
            torch.tensor([0, 1, 2, 3, 0]),
            {"weight": torch.rand(4, dtype=torch.float64, requires_grad=True)},
            RuntimeError,
            "does not differentiate with respect to weight",
        ),
        (
            torch.tensor([0, 1, 2, 3, 0]),
            {"sample_weight": torch.rand(5, dtype=torch.float64, requires_grad=True)},
            RuntimeError,
            "does not differentiate with respect to sample_weight",
        ),
        # the entropy bonus's coefficient: a finite number >= 0, not differentiated
        (torch.tensor([0, 1, 2, 3, 0]), {"entropy_coef": -0.1}, ValueError, "entropy_coef"),
        (torch.tensor([0, 1, 2, 3, 0]), {"entropy_coef": float("nan")}, ValueError, "finite"),
        (torch.tensor([0, 1, 2, 3, 0]), {"entropy_coef": [0.1]}, TypeError, "entropy_coef"),
        (
            torch.tensor([0, 1, 2, 3, 0]),
            {"entropy_coef": torch.tensor(0.1, requires_grad=True)},
            RuntimeError,
            "entropy_coef",
        ),
    ],
)
def test_target_errors_before_any_collective(target, kw, exc, match):
    # No process group is initialized here: these are raised before torch.distributed is
    # used at all, on the rank that got the bad argument.
    (h, w, t), kw = _args(target, **kw)
    with pytest.raises(exc, match=match):
        fxt_vp(h, w, t, offset=0, num_classes=4, **kw)
    assert h.grad is None and w.grad is None


def test_input_checks_before_any_collective():
    p = torch.rand(5, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="linear_weight has dtype float32, expected float64"):
        fxt_vp(torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3), p)
    with pytest.raises(ValueError, match=r"expected \(V, 3\)"):
        fxt_vp(torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), p)
    with pytest.raises(TypeError, match="hidden must be float32"):
        fxt_vp(torch.ones(5, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64), p)


def fxt_vp(*a, **kw):
    import fastxent.torch as fxt

    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    return fxt.vocab_parallel_linear_cross_entropy(*a, **kw)


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


# outputs=: the per-row outputs of whole rows, the same on every rank, against the
# one-process function's, with the loss's gradients (input, weight slice, bias slice) and
# those through each float output (alone, or summed with the loss's); bad names and
# probability targets with target_logprob / accuracy raise before any collective. bfloat16
# asks for no argmax: its logits tie often, and a slice's matmul may round differently from
# the whole weight's.
OUT_CASES = [
    ("mean", {}, "float64", ("lse", "entropy", "argmax", "target_logprob", "accuracy")),
    ("none", {"ignore_index": 3, "softcap": 5.0}, "float64", ("target_logprob", "argmax")),
    ("sum", {"label_smoothing": 0.1, "logit_scale": 0.7}, "float32", ("entropy", "accuracy")),
    ("mean", {"probs": True, "z_loss": 1e-3}, "float64", ("lse", "entropy", "argmax")),
    ("mean", {}, "bfloat16", ("lse", "entropy")),
    # the entropy bonus with the entropy as an output: both gradients through it
    ("none", {"entropy_coef": 0.2, "ignore_index": 3}, "float64", ("entropy", "lse")),
]


def _output_errors(rank, dist):
    import fastxent.torch as fxt
    from fastxent import _linear

    # The statistics' product in blocks of 2 or 3 rows inside the 4-row tiles (a block's
    # rows of the merged statistics and targets must be its own).
    _linear.STAT_BLOCK = 2 * max(SPLIT)

    out = []
    for i, (red, opt, dt_name, names) in enumerate(OUT_CASES):
        dt = getattr(torch, dt_name)
        opt = dict(opt)
        probs = opt.pop("probs", False)
        g = torch.Generator().manual_seed(100 + i)
        n, h, v = 13, 6, sum(SPLIT)
        x = torch.randn(2, n, h, generator=g, dtype=torch.float64).to(dt)  # lead (2, 13)
        w = torch.randn(v, h, generator=g, dtype=torch.float64).to(dt)
        b = (0.1 * torch.randn(v, generator=g, dtype=torch.float64)).to(dt)
        if probs:
            t = torch.softmax(torch.randn(2, n, v, generator=g, dtype=torch.float64), -1)
        else:
            t = torch.randint(0, v, (2, n), generator=g)
            # Targets that are the argmax in some rows, so that accuracy is neither 0 nor 1.
            t[0, :5] = torch.argmax(x[0, :5].double() @ w.double().t() + b.double(), -1)
        if "ignore_index" in opt:
            t[:, ::3] = opt["ignore_index"]
        lo = 0 if rank == 0 else SPLIT[0]
        hi = lo + SPLIT[rank]
        tl = t[..., lo:hi].to(dt) if probs else t
        up = torch.randn((2, n) if red == "none" else (), generator=g, dtype=torch.float64)
        xl, wl, bl = (a.clone().requires_grad_() for a in (x, w[lo:hi], b[lo:hi]))
        loss, st = fxt.vocab_parallel_linear_cross_entropy(
            xl, wl, tl, linear_bias=bl, reduction=red, tile_rows=4, outputs=names, **opt
        )
        xr, wr, br = (a.clone().requires_grad_() for a in (x, w, b))
        ref, rst = fxt.linear_cross_entropy(
            xr, wr, t.to(dt) if probs else t, linear_bias=br, reduction=red, outputs=names, **opt
        )
        loss.backward(up.to(dt))
        ref.backward(up.to(dt))
        pairs = [
            (loss, ref),
            (xl.grad, xr.grad),
            (wl.grad, wr.grad[lo:hi]),
            (bl.grad, br.grad[lo:hi]),
        ]
        errs = [float((p.detach().double() - q.detach().double()).abs().max()) for p, q in pairs]
        same = True
        for k in ("lse", "entropy", "target_logprob", "argmax", "accuracy"):
            a, r = getattr(st, k), getattr(rst, k)
            same &= (a is None) == (r is None) and (a is None) == (k not in names)
            if a is None or r is None:
                continue
            if k == "argmax":
                same &= a.dtype == torch.int64 and bool(torch.equal(a, r))
            elif k == "accuracy":
                same &= a == r and 0.0 < a < 1.0
            else:
                same &= a.shape == r.shape == (2, n) and a.dtype == r.dtype
                errs.append(float((a.detach().double() - r.double()).abs().max()))
        # Gradients through each float output, alone and summed with the loss's, against the
        # one-process function's (differentiable there): input, weight and bias slices. The
        # upstream gradients are the same on every rank (the generator is seeded per case).
        for k in [k for k in ("lse", "entropy", "target_logprob") if k in names]:
            for with_loss in (False, True):
                us = torch.randn((2, n), generator=g, dtype=torch.float64)
                got = []
                for fn, args in (
                    (fxt.vocab_parallel_linear_cross_entropy, (x, w[lo:hi], b[lo:hi], tl)),
                    (fxt.linear_cross_entropy, (x, w, b, t.to(dt) if probs else t)),
                ):
                    xs, ws, bs = (a.clone().requires_grad_() for a in args[:3])
                    l2, st2 = fn(
                        xs, ws, args[3], linear_bias=bs, reduction=red, outputs=names, **opt
                    )
                    total = (getattr(st2, k).double() * us).sum()
                    if with_loss:
                        total = total + (l2.double() * up).sum()
                    total.backward()
                    got.append((xs.grad, ws.grad, bs.grad))
                (gx, gw, gb), (rx, rw, rb) = got
                for p, q in ((gx, rx), (gw, rw[lo:hi]), (gb, rb[lo:hi])):
                    # relative to the largest entry (at least 1): these gradients reach
                    # magnitudes of a few units, where one bfloat16 ulp is 2^-7 or 2^-6
                    scale = max(1.0, float(q.double().abs().max()))
                    errs.append(float((p.double() - q.double()).abs().max()) / scale)
        # Under no_grad: the same values.
        with torch.no_grad():
            l3, st3 = fxt.vocab_parallel_linear_cross_entropy(
                x,
                w[lo:hi],
                tl,
                linear_bias=b[lo:hi],
                reduction=red,
                tile_rows=4,
                outputs=names,
                **opt,
            )
        same &= bool(torch.equal(l3, loss.detach()))
        for k in names:
            a3, a = getattr(st3, k), getattr(st, k)
            same &= a3 == a if k == "accuracy" else bool(torch.equal(a3, a.detach()))
        out.append((dt_name, errs, same))
    return out


def test_outputs_match_one_process(tmp_path):
    for r, res in enumerate(run_ranks(_output_errors, (), tmp_path)):
        for (dt_name, errs, same), case in zip(res, OUT_CASES):
            # Absolute errors of the loss, the three gradients and the float outputs. Measured:
            # float64 up to 2e-15 (the merge's rounding: 1e-12), float32 2.4e-7 (1e-5, as the
            # loss's relative bound above times these values' magnitude, about 3); bfloat16
            # (float32 statistics of bfloat16 logits, whose matmul may differ between a slice
            # and the whole weight): 2e-2 as above. The gradients through the float outputs
            # (relative to their largest entry, at least 1): float64 1.8e-15, float32 3.6e-7,
            # bfloat16 7.6e-3 (about one bfloat16 ulp of the largest entry); same bounds.
            tol = {"float64": 1e-12, "float32": 1e-5}.get(dt_name, 2e-2)
            assert max(errs) <= tol, (r, case, errs)
            assert same, (r, case)


@pytest.mark.parametrize(
    "outputs, probs, exc, match",
    [
        (("lse", "bogus"), False, ValueError, "unknown output"),
        ("lse", False, TypeError, "tuple of names"),
        (("target_logprob",), True, ValueError, "class-index targets"),
        (("accuracy",), True, ValueError, "class-index targets"),
    ],
)
def test_output_errors_before_any_collective(outputs, probs, exc, match):
    import fastxent.torch as fxt

    x = torch.randn(5, 4)
    w = torch.randn(7, 4)
    t = torch.rand(5, 7) if probs else torch.randint(0, 7, (5,))
    # No process group is initialised here: a collective would raise RuntimeError instead.
    with pytest.raises(exc, match=match):
        fxt.vocab_parallel_linear_cross_entropy(x, w, t, outputs=outputs)
