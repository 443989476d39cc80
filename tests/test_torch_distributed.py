"""fastxent.torch.vocab_parallel_cross_entropy on a real torch.distributed process group: two
processes (spawned, gloo backend over 127.0.0.1) each hold an uneven slice of the same logits
(C = 11 classes split 4 + 7, so C_local != C / 2: smoothing with eps / C_local instead of
eps / C, Megatron-LM #737, cannot pass); loss and each rank's gradient slice (forward and
backward through loss.backward()) are compared with the single-process fastxent kernel
(fx.cross_entropy_with_grad on the full logits) and, where PyTorch has the option, with
F.cross_entropy.

All cases run inside ONE process group (each worker loops over them and pickles its results to
a file), so the whole module costs one spawn of two interpreters. The workers run under a
timeout: a hang (a collective some rank never joins) fails the test instead of blocking CI,
and the gloo timeout makes a stuck collective raise inside the workers as well.

Tolerances: float64 1e-12 and float32 64 u, as tests/test_torch.py (the sharded pass does the
one-machine kernel's arithmetic over a shard's columns, then merges in float64); 16-bit: the
result is the float32 computation rounded to the 16-bit type, so the error is a few units of
its precision (bfloat16 u = 2**-8, float16 u = 2**-11), checked at 4 u.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import fastxent as fx  # noqa: E402
import fastxent.torch as fxt  # noqa: E402
from gloo_ranks import run_ranks  # noqa: E402
from reference import U32, grad_error, loss_error  # noqa: E402

C = 11
SPLIT = (4, 7)  # rank 0: classes [0, 4), rank 1: [4, 11)
ROWS = (3, 5)  # leading dimensions: (B, T, C_local) logits
WORKER_TIMEOUT_S = 240  # the whole spawned run (imports included)
TOL = {"float64": 1e-12, "float32": 64 * U32, "bfloat16": 4 * 2.0**-8, "float16": 4 * 2.0**-11}
_TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# ------------------------------------------------------------------------------------------
# The cases (built in the parent, deterministic; pickled to the workers)
# ------------------------------------------------------------------------------------------


def _case(
    name,
    rng,
    *,
    dtype="float64",
    rows=ROWS,
    reduction="mean",
    opts=None,
    weight=None,
    ignore_frac=0.0,
    ignore_index=-100,
    targets=None,
    probs=False,
    sample_weight=False,
    upstream=None,
    layout=None,
    torch_ref=True,
    no_grad=False,
    destroy_before_backward=False,
    edit=None,
):
    x = 2.0 * rng.standard_normal(rows + (C,))
    if probs:
        p = rng.random(rows + (C,))
        y = p / p.sum(axis=-1, keepdims=True)
    else:
        lo, hi = targets or (0, C)
        y = rng.integers(lo, hi, size=rows).astype(np.int64)
        if ignore_frac:
            y[rng.random(rows) < ignore_frac] = ignore_index
    if edit is not None:
        edit(x, y)
    if dtype in ("bfloat16", "float16"):  # the reference sees the 16-bit values exactly
        x = torch.from_numpy(x).to(_TORCH_DTYPES[dtype]).to(torch.float64).numpy()
    kw = dict(opts or {})
    kw.update(reduction=reduction, ignore_index=ignore_index)
    w = None
    if weight is not None:
        w = 0.2 + rng.random(C)
        kw["weight"] = w
    if sample_weight:
        kw["sample_weight"] = 0.1 + rng.random(rows)
    if upstream == "rows":
        upstream = rng.standard_normal(rows)  # with negatives
        upstream.flat[0] = 0.0
    return dict(
        name=name,
        dtype=dtype,
        x=x,
        y=y,
        kw=kw,
        weight_mode=weight,
        upstream=upstream,
        layout=layout or "rank_order",
        torch_ref=torch_ref,
        no_grad=no_grad,
        destroy_before_backward=destroy_before_backward,
    )


def _neg_inf_slices(x, y):
    # Rows 0-4: rank 0's whole slice -inf (targets on rank 1); rows 5-9: rank 1's (targets on
    # rank 0).
    xf, yf = x.reshape(-1, C), y.reshape(-1)
    xf[:5, : SPLIT[0]] = -np.inf
    yf[:5] = SPLIT[0] + np.arange(5) % SPLIT[1]
    xf[5:10, SPLIT[0] :] = -np.inf
    yf[5:10] = np.arange(5) % SPLIT[0]


def _all_neg_inf_row(x, y):
    x.reshape(-1, C)[3] = -np.inf


def _nans(x, y):
    xf = x.reshape(-1, C)
    xf[2, SPLIT[0] + 3] = np.nan  # on rank 1
    xf[7, 1] = np.nan  # on rank 0


def _all_ignored(x, y):
    y[...] = -100


def make_cases():
    rng = np.random.default_rng(20240737)
    return [
        _case("plain", rng),
        _case("smoothing", rng, opts=dict(label_smoothing=0.2)),
        _case(
            "smoothing_full_weight_ignore_sum",
            rng,
            weight="full",
            ignore_frac=0.25,
            reduction="sum",
            opts=dict(label_smoothing=0.1),
        ),
        _case(
            "smoothing_local_weight_ignore_mean",
            rng,
            weight="local",
            ignore_frac=0.25,
            opts=dict(label_smoothing=0.3),
        ),
        _case("ignore_index_3", rng, ignore_index=3, ignore_frac=0.3, reduction="sum"),
        _case(
            "none_upstream",
            rng,
            reduction="none",
            weight="full",
            ignore_frac=0.2,
            upstream="rows",
            opts=dict(label_smoothing=0.1),
        ),
        _case(
            "none_sample_weight_upstream",
            rng,
            reduction="none",
            sample_weight=True,
            upstream="rows",
            torch_ref=False,
            opts=dict(label_smoothing=0.15),
        ),
        _case(
            "mean_sample_weight_normalizer_upstream",
            rng,
            sample_weight=True,
            upstream=2.5,
            torch_ref=False,
            opts=dict(normalizer=7.5),
        ),
        _case("z_loss", rng, torch_ref=False, opts=dict(z_loss=1e-3, label_smoothing=0.1)),
        _case(
            "softcap_logit_scale",
            rng,
            reduction="sum",
            torch_ref=False,
            opts=dict(softcap=3.0, logit_scale=1.7, label_smoothing=0.05),
        ),
        _case(
            "targets_on_rank0",
            rng,
            targets=(0, SPLIT[0]),
            weight="full",
            opts=dict(label_smoothing=0.1),
        ),
        _case(
            "targets_on_rank1",
            rng,
            targets=(SPLIT[0], C),
            weight="full",
            opts=dict(label_smoothing=0.1),
        ),
        _case("neg_inf_slices", rng, weight="full", edit=_neg_inf_slices),
        _case("all_neg_inf_row", rng, reduction="none", torch_ref=False, edit=_all_neg_inf_row),
        _case("nan", rng, reduction="none", torch_ref=False, edit=_nans),
        _case(
            "float32",
            rng,
            dtype="float32",
            weight="full",
            ignore_frac=0.2,
            opts=dict(label_smoothing=0.1),
        ),
        _case(
            "float32_none_sample_weight_upstream",
            rng,
            dtype="float32",
            reduction="none",
            sample_weight=True,
            upstream="rows",
            torch_ref=False,
            opts=dict(label_smoothing=0.1),
        ),
        _case("bfloat16", rng, dtype="bfloat16", opts=dict(label_smoothing=0.1)),
        _case("float16", rng, dtype="float16", reduction="sum"),
        _case(
            "probability_targets", rng, probs=True, weight="full", opts=dict(label_smoothing=0.1)
        ),
        _case(
            "explicit_reversed_layout",
            rng,
            layout="reversed",
            weight="full",
            ignore_frac=0.2,
            opts=dict(label_smoothing=0.2),
        ),
        _case("unbatched", rng, rows=(), reduction="sum", opts=dict(label_smoothing=0.1)),
        _case("all_ignored_mean", rng, torch_ref=False, edit=_all_ignored),
        _case("no_rows", rng, rows=(0,), reduction="sum"),
        _case("no_grad_forward", rng, no_grad=True, opts=dict(label_smoothing=0.1)),
        # Last: backward after the process group is gone proves it communicates nothing.
        _case(
            "backward_without_process_group",
            rng,
            weight="full",
            opts=dict(label_smoothing=0.1),
            destroy_before_backward=True,
        ),
    ]


def _slice(case, rank):
    """(offset, size, explicit) of rank's columns."""
    if case["layout"] == "reversed":  # rank 0 holds the top 4 columns, rank 1 the rest
        return ((C - SPLIT[0], SPLIT[0]) if rank == 0 else (0, C - SPLIT[0])) + (True,)
    return (sum(SPLIT[:rank]), SPLIT[rank], False)


# ------------------------------------------------------------------------------------------
# The worker (runs in each spawned process)
# ------------------------------------------------------------------------------------------


def _run_case(case, rank, dist):
    off, cs, explicit = _slice(case, rank)
    dt = _TORCH_DTYPES[case["dtype"]]
    local = torch.from_numpy(np.ascontiguousarray(case["x"][..., off : off + cs])).to(dt)
    local.requires_grad_(True)
    y = case["y"]
    if y.dtype.kind == "f":
        target = torch.from_numpy(np.ascontiguousarray(y[..., off : off + cs])).to(dt)
    else:
        target = torch.from_numpy(y)
    kw = dict(case["kw"])
    if "weight" in kw:
        w = kw["weight"] if case["weight_mode"] == "full" else kw["weight"][off : off + cs]
        kw["weight"] = torch.from_numpy(np.ascontiguousarray(w)).to(dt)
    if "sample_weight" in kw:
        kw["sample_weight"] = torch.from_numpy(kw["sample_weight"]).to(dt)
    if explicit:
        kw.update(offset=off, num_classes=C)
    calls = _count_collectives(dist)
    if case["no_grad"]:
        with torch.no_grad():
            loss = fxt.vocab_parallel_cross_entropy(local, target, **kw)
        assert loss.grad_fn is None
        return dict(
            loss=loss.double().numpy(), grad=None, dtype=str(loss.dtype), forward_calls=dict(calls)
        )
    loss = fxt.vocab_parallel_cross_entropy(local, target, **kw)
    forward_calls = dict(calls)
    calls.clear()
    if case["destroy_before_backward"]:
        dist.destroy_process_group()
    up = case["upstream"]
    if up is None:
        loss.sum().backward()  # "none": upstream ones (the all-ones fast path)
    elif isinstance(up, float):
        (loss * up).backward()
    else:
        (loss * torch.from_numpy(up).to(dt)).sum().backward()
    return dict(
        loss=loss.detach().double().numpy(),
        grad=local.grad.double().numpy(),
        dtype=str(loss.dtype),
        grad_dtype=str(local.grad.dtype),
        forward_calls=forward_calls,
        backward_calls=dict(calls),
    )


_ORIGINAL = {}


def _count_collectives(dist):
    """Counts the calls to torch.distributed's collectives from now on (the dict returned)."""
    calls = {}
    for name in (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "broadcast",
        "reduce_scatter",
        "all_to_all",
        "barrier",
        "send",
        "recv",
    ):
        fn = _ORIGINAL.setdefault(name, getattr(dist, name))

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        setattr(dist, name, counted)
    return calls


def _run_cases(rank, dist, cases):
    return {case["name"]: _run_case(case, rank, dist) for case in cases}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every case on 2 spawned ranks; returns (cases by name, [rank 0, rank 1] results)."""
    outdir = tmp_path_factory.mktemp("vocab_parallel")
    cases = make_cases()
    out = run_ranks(_run_cases, (cases,), outdir, timeout_s=WORKER_TIMEOUT_S)
    return {c["name"]: c for c in cases}, out


# ------------------------------------------------------------------------------------------
# References and checks (in the parent)
# ------------------------------------------------------------------------------------------


def _fx_reference(case):
    """(loss, full gradient of the backpropagated quantity) from the one-machine kernel."""
    kw = dict(case["kw"])
    x = case["x"] if case["dtype"] == "float64" else case["x"].astype(np.float32)
    if case["dtype"] != "float64":
        kw = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    y = case["y"].astype(x.dtype) if case["y"].dtype.kind == "f" else case["y"]
    loss, g = fx.cross_entropy_with_grad(x, y, **kw)
    loss, g = np.asarray(loss, np.float64), g.astype(np.float64)
    up = case["upstream"]
    if isinstance(up, float):
        g = g * up
    elif up is not None:
        g = g * up[..., None]
    return loss, g


def _torch_reference(case):
    """(loss, full gradient) from F.cross_entropy in float64 (class dimension moved to 1)."""
    kw = dict(case["kw"])
    z = torch.from_numpy(case["x"].copy()).requires_grad_(True)
    y = torch.from_numpy(case["y"])
    if "weight" in kw:
        kw["weight"] = torch.from_numpy(kw["weight"])
    zz = z.movedim(-1, 1) if z.ndim > 1 else z
    yy = y.movedim(-1, 1) if y.dtype.is_floating_point and y.ndim > 1 else y
    loss = F.cross_entropy(zz, yy, **kw)
    up = case["upstream"]
    if up is None:
        loss.sum().backward()
    elif isinstance(up, float):
        (loss * up).backward()
    else:
        (loss * torch.from_numpy(up)).sum().backward()
    return loss.detach().numpy(), z.grad.numpy()


def _assert_close(got, ref, err_fn, tol, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    # Non-finite entries must match exactly (NaN where NaN, the same infinities).
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{what}: NaN")
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(
        got[~fin & ~np.isnan(ref)], ref[~fin & ~np.isnan(ref)], err_msg=f"{what}: infinities"
    )
    assert np.isfinite(got[fin]).all(), what
    err = err_fn(got[fin], ref[fin])
    assert err <= tol, f"{what}: error {err:.3g} > {tol:.3g}"


def _local_grads(case, res):
    """The two ranks' gradients, each put back at its columns of a full-width array."""
    g = np.full(case["x"].shape, np.nan)
    for r in range(2):
        off, cs, _ = _slice(case, r)
        g[..., off : off + cs] = res[r]["grad"]
    return g


CASE_NAMES = [c["name"] for c in make_cases()]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_single_process(results, name):
    cases, out = results
    case, res = cases[name], [out[r][name] for r in range(2)]
    tol = TOL[case["dtype"]]
    # The loss is the same on both ranks, bit for bit (both read the same all-reduced sums).
    assert res[0]["loss"].tobytes() == res[1]["loss"].tobytes() or (
        np.array_equal(res[0]["loss"], res[1]["loss"], equal_nan=True)
    )
    assert res[0]["dtype"] == str(_TORCH_DTYPES[case["dtype"]])
    rows = case["y"].shape if case["y"].dtype.kind != "f" else case["y"].shape[:-1]
    assert res[0]["loss"].shape == (rows if case["kw"]["reduction"] == "none" else ())
    ref_loss, ref_grad = _fx_reference(case)
    _assert_close(res[0]["loss"], ref_loss, loss_error, tol, f"{name}: loss vs fastxent")
    # Exactly two all-reduces (max, packed sums), plus one all_gather of the slice sizes
    # unless the layout was given; nothing at all in backward.
    gathers = {} if case["layout"] == "reversed" else {"all_gather": 1}
    for r in range(2):
        assert res[r]["forward_calls"] == {"all_reduce": 2, **gathers}
    if case["no_grad"]:
        assert res[0]["grad"] is None and res[1]["grad"] is None
        return
    assert res[0]["grad_dtype"] == res[0]["dtype"]
    for r in range(2):
        assert res[r]["backward_calls"] == {}
    for r in range(2):
        off, cs, _ = _slice(case, r)
        assert res[r]["grad"].shape == case["x"].shape[:-1] + (cs,)
    grad = _local_grads(case, res)
    _assert_close(grad, ref_grad, grad_error, tol, f"{name}: gradient vs fastxent")
    if case["torch_ref"]:
        t_loss, t_grad = _torch_reference(case)
        ttol = max(tol, 1e-12)
        _assert_close(res[0]["loss"], t_loss, loss_error, ttol, f"{name}: loss vs F")
        _assert_close(grad, t_grad, grad_error, ttol, f"{name}: gradient vs F")


def test_label_smoothing_uses_the_whole_vocabulary(results):
    """The uneven split makes the per-shard smoothing of Megatron-LM #737 (eps / C_local on
    each shard's columns) measurably different from eps / C, and the result is the latter."""
    cases, out = results
    case, res = cases["smoothing"], [out[r]["smoothing"] for r in range(2)]
    eps = case["kw"]["label_smoothing"]
    x, y = case["x"].reshape(-1, C), case["y"].reshape(-1)
    lse = np.log(np.exp(x).sum(axis=1))
    nll = lse - x[np.arange(len(y)), y]
    right = (1 - eps) * nll + eps / C * (lse[:, None] - x).sum(axis=1)
    wrong = (1 - eps) * nll + sum(
        eps / cs * (lse[:, None] - x[:, o : o + cs]).sum(axis=1)
        for o, cs in ((0, SPLIT[0]), (SPLIT[0], SPLIT[1]))
    )
    assert abs(wrong.mean() - right.mean()) > 1e6 * TOL["float64"]
    assert loss_error(res[0]["loss"], right.mean()) <= TOL["float64"]


def test_nan_row_propagates_on_every_rank(results):
    _, out = results
    for r in range(2):
        loss = out[r]["nan"]["loss"].reshape(-1)
        assert np.isnan(loss[2]) and np.isnan(loss[7])
        assert np.isfinite(np.delete(loss, [2, 7])).all()


# ------------------------------------------------------------------------------------------
# Errors raised before any collective (no process group needed)
# ------------------------------------------------------------------------------------------


def test_needs_an_initialized_process_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fxt.vocab_parallel_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (dict(local_logits=torch.randn(3, 4, device="meta")), TypeError, "CPU"),
        (dict(target=torch.zeros(3, dtype=torch.int64, device="meta")), TypeError, "CPU"),
        (dict(local_logits=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "float32"),
        (dict(local_logits=torch.tensor(1.0)), ValueError, "last dimension"),
        (dict(local_logits=torch.zeros(3, 0)), ValueError, "empty"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(target=[0, 1, 2]), TypeError, "torch.Tensor"),
        (dict(weight=torch.ones(4, requires_grad=True)), RuntimeError, "requires_grad"),
    ],
)
def test_argument_errors(bad, exc, match):
    args = dict(local_logits=torch.randn(3, 4), target=torch.tensor([0, 1, 2]))
    args.update(bad)
    with pytest.raises(exc, match=match):
        fxt.vocab_parallel_cross_entropy(args.pop("local_logits"), args.pop("target"), **args)
