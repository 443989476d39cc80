"""The loss keywords written once (fastxent._keywords): every public function that takes a
group of them shows them in its signature with their defaults, accepts exactly them, and
refuses any other keyword with Python's own TypeError before touching a buffer."""

import importlib.util
import inspect

import numpy as np
import pytest

import fastxent as fx
from fastxent import _keywords
from fastxent._options import LossOptions

DEFAULTS = _keywords.DEFAULTS  # checked against the kernel's own defaults below
ARRAY = ["axis", "reduction", "weight", "ignore_index", "label_smoothing", "sample_weight"]
ARRAY += ["z_loss", "softcap", "logit_scale", "normalizer", "num_threads"]
LOSS = ARRAY[1:]
STATS = ARRAY + ["entropy_coef", "outputs"]  # fastxent.cross_entropy(_with_grad)
LINEAR = LOSS + ["entropy_coef", "outputs"]  # the fused linear functions
SHARD = ["weight", "ignore_index", "label_smoothing", "softcap", "logit_scale", "num_threads"]
EXTRA = ["sample_weight", "z_loss", "softcap", "logit_scale", "normalizer", "num_threads"]


def _unexpected(fname, name):
    """Python's own message for an unexpected keyword argument, as a whole-message match."""
    return rf"^{fname}\(\) got an unexpected keyword argument '{name}'$"


def _keyword_only(fn):
    return [
        (p.name, p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    ]


def _expected(own_first, group, own_last):
    return list(own_first) + [(k, DEFAULTS[k]) for k in group] + list(own_last)


NUMPY_FUNCTIONS = [
    (fx.cross_entropy, [], STATS, []),
    (fx.cross_entropy_with_grad, [], STATS, [("out", None)]),
    (
        fx.linear_cross_entropy,
        [("linear_bias", None)],
        LINEAR,
        [("tile_rows", None)],
    ),
    (
        fx.linear_cross_entropy_with_grad,
        [("linear_bias", None)],
        LINEAR,
        [("tile_rows", None), ("out", None)],
    ),
    (
        fx.shard_stats,
        [
            ("offset", inspect.Parameter.empty),
            ("num_classes", inspect.Parameter.empty),
            ("outputs", None),
        ],
        SHARD,
        [],
    ),
    (
        fx.shard_grad,
        [("offset", inspect.Parameter.empty), ("num_classes", inspect.Parameter.empty)],
        LOSS,
        [("scale", 1.0), ("out", None)],
    ),
]


@pytest.mark.parametrize("fn, first, group, last", NUMPY_FUNCTIONS, ids=lambda v: str(v)[:40])
def test_signature_lists_the_group_with_its_defaults(fn, first, group, last):
    assert _keyword_only(fn) == _expected(first, group, last)
    # The annotations are the TypedDict's, not strings of the decorator's own.
    params = inspect.signature(fn).parameters
    assert params["logit_scale"].annotation is float


def test_the_public_defaults_are_the_kernels():
    """Each scalar keyword's default validates to the field's default of LossOptions (the
    C++ Options' defaults): a call without options is a call with every default."""
    assert list(DEFAULTS) == STATS
    scalars = {k: DEFAULTS[k] for k in LossOptions._fields}
    assert LossOptions.from_keywords(**scalars) == LossOptions()
    assert (DEFAULTS["axis"], DEFAULTS["weight"], DEFAULTS["sample_weight"]) == (-1, None, None)


def test_the_groups():
    assert list(_keywords.ARRAY.defaults) == ARRAY
    assert list(_keywords.STATS.defaults) == STATS
    assert list(_keywords.LOSS.defaults) == LOSS
    assert list(_keywords.SHARD.defaults) == SHARD
    assert list(_keywords.EXTRA.defaults) == EXTRA


def _numpy_calls(bad):
    z = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
    y = np.array([0, 5, 2, 1])
    h = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    w = np.linspace(-1, 1, 18, dtype=np.float32).reshape(6, 3)
    st = fx.shard_stats(z, y, offset=0, num_classes=6)
    return [
        ("cross_entropy", lambda: fx.cross_entropy(z, y, **bad)),
        ("cross_entropy_with_grad", lambda: fx.cross_entropy_with_grad(z, y, **bad)),
        ("linear_cross_entropy", lambda: fx.linear_cross_entropy(h, w, y, **bad)),
        (
            "linear_cross_entropy_with_grad",
            lambda: fx.linear_cross_entropy_with_grad(h, w, y, **bad),
        ),
        ("shard_stats", lambda: fx.shard_stats(z, y, offset=0, num_classes=6, **bad)),
        ("shard_grad", lambda: fx.shard_grad(z, y, st, offset=0, num_classes=6, **bad)),
    ]


@pytest.mark.parametrize("name", ["zloss", "label_smothing", "dim"])
def test_unknown_keyword_is_pythons_type_error(name):
    for fname, call in _numpy_calls({name: 1}):
        with pytest.raises(TypeError, match=_unexpected(fname, name)):
            call()


def test_a_keyword_of_another_group_is_refused():
    z = np.zeros((4, 6), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(TypeError, match=_unexpected("shard_stats", "z_loss")):
        fx.shard_stats(z, y, offset=0, num_classes=6, z_loss=1e-4)
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'axis'"):
        fx.linear_cross_entropy(z[:, :3], z.T[:, :3].copy(), y, axis=-1)
    # Still keyword-only: a third positional argument is Python's own error.
    with pytest.raises(TypeError, match="positional"):
        fx.cross_entropy(z, y, "sum")


def test_a_refused_keyword_leaves_out_untouched():
    z = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
    y = np.array([0, 5, 2, 1])
    out = np.full_like(z, 7.0)
    z0 = z.copy()
    for bad in ({"zloss": 1e-4}, {"reduction": "sum", "zloss": 1e-4}):
        with pytest.raises(TypeError, match="zloss"):
            fx.cross_entropy_with_grad(z, y, out=out, **bad)
        assert (out == 7.0).all() and (z == z0).all()
    with pytest.raises(TypeError, match="zloss"):
        fx.cross_entropy_with_grad(z, y, out=z, zloss=1e-4)
    assert (z == z0).all()


def test_given_keywords_reach_the_kernel():
    """Each keyword passed through **kw changes the result as its explicit meaning says
    (a binding that dropped one would give the default's result)."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 7))
    y = np.array([0, 6, 3, 2, 6])
    base = fx.cross_entropy(z, y)
    for k, v in [
        ("reduction", "sum"),
        ("weight", np.arange(1.0, 8.0)),
        ("ignore_index", 6),
        ("label_smoothing", 0.2),
        ("sample_weight", np.arange(1.0, 6.0)),
        ("z_loss", 0.1),
        ("softcap", 1.5),
        ("logit_scale", 0.5),
        ("normalizer", 2.0),
    ]:
        assert fx.cross_entropy(z, y, **{k: v}) != base, k
        assert fx.linear_cross_entropy(z, np.eye(7), y, **{k: v}) == pytest.approx(
            fx.cross_entropy(z, y, **{k: v}), rel=1e-12
        ), k
    assert fx.cross_entropy(z.T.copy(), y, axis=0) == base


@pytest.mark.skipif(importlib.util.find_spec("dask") is None, reason="needs dask")
def test_dask_functions():
    import dask.array as da

    import fastxent.dask as fxd

    for fn in (fxd.cross_entropy, fxd.cross_entropy_with_grad):
        assert _keyword_only(fn) == _expected([("outputs", None)], LOSS, [])
    x = da.from_array(np.zeros((4, 6), np.float32), chunks=(2, 3))
    y = np.zeros(4, np.int64)
    with pytest.raises(TypeError, match=_unexpected("cross_entropy", "axis")):
        fxd.cross_entropy(x, y, axis=-1)
    with pytest.raises(TypeError, match=_unexpected("cross_entropy_with_grad", "zloss")):
        fxd.cross_entropy_with_grad(x, y, zloss=0.1)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_torch_functions_list_fastxents_extras():
    import fastxent.torch as fxt

    for fn in (
        fxt.cross_entropy,
        fxt.linear_cross_entropy,
        fxt.vocab_parallel_cross_entropy,
        fxt.vocab_parallel_linear_cross_entropy,
    ):
        names = [n for n, _ in _keyword_only(fn)]
        assert [n for n in names if n in EXTRA] == EXTRA, fn.__name__
        for k in EXTRA:
            assert inspect.signature(fn).parameters[k].default == DEFAULTS[k]
    import torch

    h = torch.zeros(4, 3, requires_grad=True)
    w = torch.zeros(6, 3, requires_grad=True)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match=_unexpected("linear_cross_entropy", "zloss")):
        fxt.linear_cross_entropy(h, w, y, zloss=0.1)
    with pytest.raises(
        TypeError,
        match=_unexpected("vocab_parallel_cross_entropy", "zloss"),
    ):
        fxt.vocab_parallel_cross_entropy(torch.zeros(4, 6), y, zloss=0.1)
    with pytest.raises(
        TypeError,
        match=_unexpected("vocab_parallel_linear_cross_entropy", "zloss"),
    ):
        fxt.vocab_parallel_linear_cross_entropy(h, w, y, zloss=0.1)
    assert h.grad is None and w.grad is None


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")
def test_jax_linear_refuses_an_unknown_keyword():
    import fastxent.jax as fxj

    h, w, y = np.zeros((4, 3), np.float32), np.zeros((6, 3), np.float32), np.zeros(4, np.int32)
    with pytest.raises(TypeError, match=_unexpected("linear_cross_entropy", "zloss")):
        fxj.linear_cross_entropy(h, w, y, zloss=0.1)
    with pytest.raises(TypeError, match=_unexpected("linear_cross_entropy", "axis")):
        fxj.linear_cross_entropy(h, w, y, axis=-1)


def test_a_group_keyword_declared_by_the_function_itself_is_refused():
    def f(x, *, z_loss=0.0, **kw):
        pass

    with pytest.raises(AssertionError, match="z_loss"):
        _keywords.LOSS(f)


def test_annotations_evaluate_at_run_time():
    """typing.get_type_hints (typeguard, Sphinx) resolves the **kw annotations."""
    import typing

    for fn, _, _, _ in NUMPY_FUNCTIONS:
        hints = typing.get_type_hints(fn)
        assert "kw" in hints, fn.__name__


def test_defaults_spelled_out_take_the_fast_path(monkeypatch):
    """fx.cross_entropy(z, y, ignore_index=-100) is the plain call: the small-call fast path
    takes it, as it takes the call without keywords; any other value takes the general path."""
    from fastxent import _api

    z = np.linspace(-1, 1, 40, dtype=np.float32).reshape(4, 10)
    y = np.array([0, 9, 3, 3])
    want = fx.cross_entropy_with_grad(z, y)
    spelled = dict(axis=-1, ignore_index=-100, label_smoothing=0.0, softcap=None, weight=None)
    calls = []
    run = _api._run
    monkeypatch.setattr(_api, "_run", lambda *a: calls.append(a) or run(*a))
    got = fx.cross_entropy_with_grad(z, y, **spelled)
    assert not calls
    assert got[0] == want[0] and np.array_equal(got[1], want[1])
    for other in (dict(ignore_index=-1), dict(label_smoothing=np.float64(0.0)), dict(axis=0)):
        zz = z.T.copy() if "axis" in other else z
        got = fx.cross_entropy_with_grad(zz, y, **other)
        g_want = want[1].T if "axis" in other else want[1]
        assert got[0] == want[0] and np.array_equal(got[1], g_want)
    assert len(calls) == 3
