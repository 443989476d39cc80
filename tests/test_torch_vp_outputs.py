"""fastxent.torch.vocab_parallel_cross_entropy(outputs=...) on a real torch.distributed process
group (two spawned gloo ranks holding 4 + 7 of C = 11 classes, one spawn for the module): the
per-row outputs of whole rows (lse, entropy, argmax, target_logprob, accuracy) and the
derivatives of the float ones with respect to each rank's logits, against the one-machine
fastxent.torch.cross_entropy(outputs=...) on the full logits (its values and autograd
gradients), which tests/test_torch_row_outputs.py checks against float64 references.

Tolerances (relative to max(1, |value|), values and gradients): float64 1e-12, as
tests/test_torch_distributed.py (both paths compute in float64, merged in another order, the
derivatives by formula here and by autograd there; measured <= 7 u = 8e-16); float32 64 u
(measured <= 7 u). argmax and accuracy exactly. Collectives: three all_reduce in forward (with an
all_gather for the default layout), none in backward.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import fastxent.torch as fxt  # noqa: E402
from gloo_ranks import run_ranks  # noqa: E402
from reference import U32  # noqa: E402
from test_torch_distributed import _count_collectives  # noqa: E402

C = 11
SPLIT = (4, 7)
N = 12
ALL = ("lse", "entropy", "argmax", "target_logprob", "accuracy")
FLOATS = ("lse", "entropy", "target_logprob")
TOL = {"float64": 1e-12, "float32": 64 * U32, "bfloat16": 4 * 2.0**-8}


def _case(
    name,
    rng,
    *,
    dtype="float64",
    names=ALL,
    kw=None,
    edit=None,
    probs=False,
    grad=True,
    rows=(N,),
):
    x = rng.standard_normal((N, C)) * 3.0
    y = rng.integers(0, C, N)
    y[1] = -100
    if edit is not None:
        edit(x, y)
    if probs:
        y = rng.dirichlet(np.ones(C), N)
    kw = dict(kw or {})
    if kw.get("sample_weight") == "s":
        kw["sample_weight"] = rng.uniform(0.2, 2.0, N).reshape(rows)
    return dict(
        name=name,
        dtype=dtype,
        names=names,
        kw=kw,
        x=x.reshape(rows + (C,)),
        y=y.reshape(rows + y.shape[1:]),
        # the statistics' upstream weights, then the loss's (for "none")
        coefs=rng.standard_normal((4,) + rows),
        grad=grad,
    )


def _special(x, y):
    x[2, :4] = -np.inf  # rank 0's slice of row 2 all -inf
    x[3, :] = -np.inf  # a whole row of -inf
    x[4, 6] = np.nan  # a NaN on rank 1
    x[5, 1] = x[5, 8] = 40.0  # equal maxima on both ranks: the first index
    x[6, 0] = 3e38  # a large finite logit
    x[7, 2] = np.inf  # +inf on rank 0 (NaN statistics)
    x[8, :] = 0.0  # all equal: argmax 0
    y[3] = 4


def _ignore_3(x, y):
    y[1:3] = 3


def make_cases():
    rng = np.random.default_rng(2312)
    return [
        _case("plain", rng),
        _case("options", rng, kw=dict(label_smoothing=0.1, weight="w", reduction="sum")),
        _case("softcap", rng, kw=dict(softcap=3.0, logit_scale=1.7)),
        _case("logit_scale", rng, kw=dict(logit_scale=2.0, label_smoothing=0.1)),
        _case(
            "none_sample_weight_batch_dims",
            rng,
            kw=dict(reduction="none", sample_weight="s", logit_scale=0.5),
            rows=(3, 4),
        ),
        _case("bfloat16", rng, dtype="bfloat16", kw=dict(logit_scale=1.5)),
        _case("ignore_index_3", rng, kw=dict(ignore_index=3), edit=_ignore_3),
        _case("special", rng, kw=dict(reduction="none"), edit=_special),
        _case("float32", rng, dtype="float32", kw=dict(label_smoothing=0.2)),
        _case("some_outputs", rng, names=("entropy", "accuracy")),
        _case("probs", rng, names=("lse", "entropy", "argmax"), probs=True),
        _case("no_grad", rng, grad=False),
        # the entropy bonus (entropies from the merged statistics; outputs or not)
        _case(
            "entropy_coef_none",
            rng,
            kw=dict(entropy_coef=0.3, reduction="none", sample_weight="s", softcap=4.0),
        ),
        _case(
            "entropy_coef_mean",
            rng,
            names=("lse", "argmax"),
            kw=dict(entropy_coef=0.2, ignore_index=3, weight="w", label_smoothing=0.1),
            edit=_ignore_3,
        ),
        _case(
            "entropy_coef_sum_probs",
            rng,
            names=("entropy",),
            probs=True,
            kw=dict(entropy_coef=0.5, reduction="sum"),
        ),  # fmt: skip
        _case("entropy_coef_special", rng, kw=dict(entropy_coef=0.1), edit=_special),
        _case("entropy_coef_float32", rng, dtype="float32", kw=dict(entropy_coef=0.25)),
    ]


def _torch_kw(case, lo=0, hi=C, flat=False):
    kw = dict(case["kw"])
    dt = getattr(torch, case["dtype"])
    if kw.get("weight") == "w":
        kw["weight"] = torch.linspace(0.5, 1.5, C, dtype=dt)[lo:hi]
    if kw.get("sample_weight") is not None:
        sw = torch.from_numpy(kw["sample_weight"]).to(dt)
        kw["sample_weight"] = sw.reshape(-1) if flat else sw
    return kw


def _objective(loss, st, case, flat=False):
    """The loss (weighted by the case's last coefficients for "none") plus the float statistics
    asked for, weighted by its first ones. flat: the rows flattened (the one-machine call)."""
    co = case["coefs"].reshape(4, -1) if flat else case["coefs"]
    tot = loss.sum() if loss.ndim == 0 else (torch.from_numpy(co[3]).to(loss.dtype) * loss).sum()
    for k, name in enumerate(FLOATS):
        v = getattr(st, name)
        if v is not None:
            tot = tot + (torch.from_numpy(co[k]).to(v.dtype) * v).sum()
    return tot


def _rank_case(case, rank, dist):
    off = sum(SPLIT[:rank])
    cs = SPLIT[rank]
    dt = getattr(torch, case["dtype"])
    local = torch.from_numpy(np.ascontiguousarray(case["x"][..., off : off + cs])).to(dt)
    y = case["y"]
    if y.dtype.kind == "f":
        target = torch.from_numpy(np.ascontiguousarray(y[..., off : off + cs])).to(dt)
    else:
        target = torch.from_numpy(y)
    local.requires_grad_(case["grad"])
    calls = _count_collectives(dist)
    loss, st = fxt.vocab_parallel_cross_entropy(
        local, target, outputs=case["names"], **_torch_kw(case, off, off + cs)
    )
    fwd = dict(calls)
    calls.clear()
    out = dict(
        loss=loss.detach().double().numpy(),
        fwd=fwd,
        argmax=None if st.argmax is None else st.argmax.numpy(),
        accuracy=st.accuracy,
        dtypes={n: str(getattr(st, n).dtype) for n in FLOATS if getattr(st, n) is not None},
    )
    for n in FLOATS:
        v = getattr(st, n)
        out[n] = None if v is None else v.detach().double().numpy()
        if v is not None:
            out[n + "_requires_grad"] = v.requires_grad
    if case["grad"]:
        _objective(loss, st, case).backward()
        out["grad"] = local.grad.double().numpy()
        out["bwd"] = dict(calls)
        # create_graph=True: refused, no silent zero second derivative
        loss2, st2 = fxt.vocab_parallel_cross_entropy(
            local, target, outputs=case["names"], **_torch_kw(case, off, off + cs)
        )
        try:
            torch.autograd.grad(_objective(loss2, st2, case), local, create_graph=True)
            out["create_graph"] = "no error"
        except RuntimeError as e:
            out["create_graph"] = str(e)
    return out


def _rank_cases(rank, dist, cases):
    return {c["name"]: _rank_case(c, rank, dist) for c in cases}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cases = make_cases()
    out = run_ranks(_rank_cases, (cases,), tmp_path_factory.mktemp("vp_outputs"), timeout_s=240)
    return {c["name"]: c for c in cases}, out


def _one_machine(case):
    """(loss, RowStats, gradient of the objective) of fastxent.torch.cross_entropy on the full
    logits."""
    dt = getattr(torch, case["dtype"])
    z = torch.from_numpy(case["x"].reshape(-1, C).copy()).to(dt).requires_grad_(True)
    y = case["y"]
    y = torch.from_numpy(y.reshape(-1, C) if y.dtype.kind == "f" else y.reshape(-1))
    if y.is_floating_point():
        y = y.to(dt)
    loss, st = fxt.cross_entropy(z, y, outputs=case["names"], **_torch_kw(case, flat=True))
    _objective(loss, st, case, flat=True).backward()
    rows = case["x"].shape[:-1]
    loss = loss.detach().double().numpy()
    return (
        loss.reshape(rows) if loss.ndim else loss,
        st,
        z.grad.double().numpy().reshape(case["x"].shape),
    )


def _close(got, ref, tol, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{what}: NaN")
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(got[~fin & ~np.isnan(ref)], ref[~fin & ~np.isnan(ref)], what)
    err = np.max(np.abs(got[fin] - ref[fin]) / np.maximum(1.0, np.abs(ref[fin])), initial=0.0)
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name", [c["name"] for c in make_cases()])
def test_matches_the_one_machine_call(results, name):
    cases, out = results
    case, res = cases[name], [out[r][name] for r in range(2)]
    tol = TOL[case["dtype"]]
    loss, st, g = _one_machine(case)
    for r in range(2):
        _close(res[r]["loss"], loss, tol, "loss")
        for n in FLOATS:
            ref = getattr(st, n)
            assert (res[r][n] is None) == (ref is None), n
            if ref is not None:
                assert res[r][n].tobytes() == res[0][n].tobytes()  # the same on every rank
                _close(res[r][n], ref.detach().double().numpy().reshape(res[r][n].shape), tol, n)
                assert res[r]["dtypes"][n] == str(ref.dtype)
                assert res[r][n + "_requires_grad"] == case["grad"]
        if st.argmax is not None:
            np.testing.assert_array_equal(res[r]["argmax"].reshape(-1), st.argmax.numpy())
        assert res[r]["accuracy"] == st.accuracy
        # forward: the loss's two all-reduces and one for the argmax, plus the layout's gather
        assert res[r]["fwd"] == {"all_gather": 1, "all_reduce": 3}, res[r]["fwd"]
    if case["grad"]:
        full = np.concatenate([res[0]["grad"], res[1]["grad"]], axis=-1)
        _close(full, g, tol, "gradient")
        for r in range(2):
            assert res[r]["bwd"] == {}, "backward must not communicate"
            assert "second-order" in res[r]["create_graph"]


def test_special_rows(results):
    cases, out = results
    r = out[0]["special"]
    np.testing.assert_array_equal(
        r["argmax"][[2, 3, 5, 6, 8]], [4 + np.argmax(cases["special"]["x"][2, 4:]), 0, 1, 0, 0]
    )
    assert r["argmax"][4] == 6 and np.isnan(r["lse"][4])
    assert np.isnan(r["lse"][7]) and r["argmax"][7] == 2
    assert r["lse"][3] == -np.inf and r["entropy"][3] == np.log(C)


def test_bad_outputs_raise_before_any_collective():
    x = torch.zeros(3, 4)
    y = torch.zeros(3, dtype=torch.int64)
    # (no process group here: the names are checked first)
    with pytest.raises(ValueError, match="unknown output"):
        fxt.vocab_parallel_cross_entropy(x, y, outputs=("nope",))
    with pytest.raises(TypeError, match="tuple of names"):
        fxt.vocab_parallel_cross_entropy(x, y, outputs="lse")
    for ec, exc in ((-0.1, ValueError), (float("inf"), ValueError), ([0.1], TypeError)):
        with pytest.raises(exc, match="entropy_coef"):
            fxt.vocab_parallel_cross_entropy(x, y, entropy_coef=ec)
    with pytest.raises(RuntimeError, match="entropy_coef"):
        fxt.vocab_parallel_cross_entropy(x, y, entropy_coef=torch.tensor(0.1, requires_grad=True))


def _entropy_coef_alone(rank, dist):
    """entropy_coef without outputs=: the loss alone (a tensor, not a pair) and its
    gradient on this rank's slice."""
    case = make_cases()[-1]  # entropy_coef_float32's logits, in float64 here
    off, cs = sum(SPLIT[:rank]), SPLIT[rank]
    local = torch.from_numpy(np.ascontiguousarray(case["x"][:, off : off + cs]))
    local.requires_grad_(True)
    out = {}
    for red in ("mean", "none"):
        loss = fxt.vocab_parallel_cross_entropy(
            local, torch.from_numpy(case["y"]), entropy_coef=0.25, reduction=red
        )
        assert isinstance(loss, torch.Tensor)
        (g,) = torch.autograd.grad(loss.sum(), local)
        out[red] = (loss.detach().numpy(), g.numpy())
    return out


def test_entropy_coef_without_outputs(tmp_path):
    case = make_cases()[-1]
    res = run_ranks(_entropy_coef_alone, (), tmp_path)
    for red in ("mean", "none"):
        z = torch.from_numpy(case["x"].copy()).requires_grad_(True)
        ref = fxt.cross_entropy(z, torch.from_numpy(case["y"]), entropy_coef=0.25, reduction=red)
        (g,) = torch.autograd.grad(ref.sum(), z)
        for r in range(2):
            _close(res[r][red][0], ref.detach().numpy(), 1e-12, "loss")
        full = np.concatenate([res[0][red][1], res[1][red][1]], axis=-1)
        _close(full, g.numpy(), 1e-12, "gradient")
