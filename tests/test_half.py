"""16-bit logits: float16 and bfloat16 (ml_dtypes.bfloat16).

The contract is exact, so every comparison here is bitwise: 16-bit logits (and probability
targets of the same dtype) are computed in float32 on their exact upcast, so

- the loss is float32 (a NumPy float32 scalar for "mean"/"sum", a float32 array for "none")
  and has exactly the bits of fx.cross_entropy_with_grad(z.astype(float32), ...)'s loss;
- the gradient has the logits' 16-bit dtype and is exactly that float32 gradient rounded once
  to it (.astype(half): round to nearest even), with every option, on any axis, for every
  thread count, in place or not;
- the loss-only entry point gives the same loss.

(How close the float32 computation is to the truth is tests/test_options.py's business.)
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from reference import BLOCK32, assert_bitwise_equal, make_logits, make_target, make_weight

ml_dtypes = pytest.importorskip("ml_dtypes")

HALVES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
REDUCTIONS = ("none", "sum", "mean")


def half_id(d):
    return np.dtype(d).name


OPTIONS = {
    "off": dict(),
    "classic": dict(weight=True, label_smoothing=0.1, ignore_frac=0.2),
    "on": dict(
        weight=True,
        label_smoothing=0.1,
        ignore_frac=0.2,
        sample_weight=True,
        z_loss=1e-3,
        softcap=8.0,
        logit_scale=1.3,
        normalizer=17.0,
    ),
    "scale-only": dict(logit_scale=0.6, sample_weight=True),
}


def make_case(rng, shape, half, opts, probs, axis=-1, masked=False):
    """Half logits, target and keywords. Weights and sample weights are float64 arrays (the
    kernel converts them to float32 for both the half and the float32 call alike)."""
    z = make_logits(rng, shape, 3.0, half)
    if masked and z.size:
        zm = np.moveaxis(z, axis, -1)
        zm[..., 1::7] = -np.inf  # masked classes
    ax = axis % len(shape)
    rshape = shape[:ax] + shape[ax + 1 :]
    C = shape[ax]
    kw = {k: v for k, v in opts.items() if k not in ("weight", "sample_weight", "ignore_frac")}
    if opts.get("weight"):
        kw["weight"] = make_weight(rng, C, np.float64)
    if opts.get("sample_weight"):
        kw["sample_weight"] = rng.uniform(0.0, 2.0, size=rshape)
    if probs:
        kw.pop("ignore_index", None)
        t = rng.random(shape).astype(half)
    else:
        t = make_target(rng, rshape, C, ignore_frac=opts.get("ignore_frac", 0.0))
    if axis != -1:
        kw["axis"] = axis
    return z, t, kw


def float32_twin(z, t):
    """The same problem on the exact float32 upcast."""
    t32 = t.astype(np.float32) if t.dtype.kind == "f" or t.dtype in HALVES else t
    return z.astype(np.float32), t32


def assert_half_contract(z, t, kw, what=""):
    z32, t32 = float32_twin(z, t)
    for red in REDUCTIONS:
        l32, g32 = fx.cross_entropy_with_grad(z32, t32, reduction=red, **kw)
        loss, g = fx.cross_entropy_with_grad(z, t, reduction=red, **kw)
        if red == "none":
            assert isinstance(loss, np.ndarray) and loss.dtype == np.float32, what
        else:
            assert type(loss) is np.float32, f"{what}: loss type {type(loss)}"
        assert g.dtype == z.dtype and g.shape == z.shape and g.flags.c_contiguous, what
        assert_bitwise_equal(loss, l32, f"{what} {red}: loss vs float32")
        assert_bitwise_equal(g, g32.astype(z.dtype), f"{what} {red}: grad vs float32 rounded")
        assert_bitwise_equal(
            fx.cross_entropy(z, t, reduction=red, **kw), loss, f"{what} {red}: loss-only"
        )


@pytest.mark.parametrize("probs", [False, True], ids=["class", "probs"])
@pytest.mark.parametrize("opts", list(OPTIONS))
@pytest.mark.parametrize("half", HALVES, ids=half_id)
def test_equals_float32_rounded_once(isa, half, opts, probs, rng):
    """Shapes: small rows, C above the kernel's block (several blocks per row), many rows
    (several conversion chunks of 2**18 elements), strided logits, masked (-inf) classes."""
    for shape in ((17, 13), (3, BLOCK32 + 808), (300, 1000)):
        z, t, kw = make_case(rng, shape, half, OPTIONS[opts], probs, masked=shape[1] == 13)
        assert_half_contract(z, t, kw, f"[{isa}] {shape}")
    # Non-contiguous 16-bit logits: a column slice (row stride > C) and a transposed view.
    z, t, kw = make_case(rng, (40, 60), half, OPTIONS[opts], False)
    t = make_target(rng, (40,), 30)
    kw.pop("weight", None)
    assert_half_contract(z[:, 5:35], t, kw, "column slice")
    zt, tt, kwt = make_case(rng, (50, 40), half, OPTIONS[opts], False)
    tt = make_target(rng, (40,), 50)
    kwt.pop("weight", None)
    kwt.pop("sample_weight", None)
    assert_half_contract(zt.T, tt, kwt, "transposed")


@pytest.mark.parametrize("probs", [False, True], ids=["class", "probs"])
@pytest.mark.parametrize("half", HALVES, ids=half_id)
def test_any_axis(isa, half, probs, rng):
    """The class axis not last (PyTorch's (N, C, d1, ...) with axis=1, read in place through
    the column path; (6, 50, 1000): two conversion chunks of 2**18 elements): the same
    contract."""
    for shape, axis in (((4, 9, 5), 1), ((3, 6, 4, 5), 1), ((9, 4), 0), ((3, 5, 7), -3)):
        for opts in ("off", "on"):
            z, t, kw = make_case(rng, shape, half, OPTIONS[opts], probs, axis=axis)
            assert_half_contract(z, t, kw, f"[{isa}] {shape} axis {axis} {opts}")
    z, t, kw = make_case(rng, (6, 50, 1000), half, OPTIONS["on"], probs, axis=1)
    assert_half_contract(z, t, kw, f"[{isa}] (6, 50, 1000) axis 1")


@pytest.mark.parametrize("half", HALVES, ids=half_id)
def test_in_place_and_out(isa, half, rng):
    """out=logits overwrites the 16-bit logits with exactly the out-of-place gradient; out=
    a 16-bit buffer is filled and returned; both for the row and the column path."""
    for shape, axis, probs in (
        ((30, 700), -1, False),
        ((30, 700), -1, True),
        ((6, 20, 300), 1, False),
        ((2, 300000), -1, True),
    ):
        z, t, kw = make_case(rng, shape, half, OPTIONS["on"], probs, axis=axis)
        for red in REDUCTIONS:
            loss, g = fx.cross_entropy_with_grad(z, t, reduction=red, **kw)
            out = np.empty_like(z)
            l2, g2 = fx.cross_entropy_with_grad(z, t, reduction=red, out=out, **kw)
            assert g2 is out
            assert_bitwise_equal(out, g, f"{shape} {red} out=")
            assert_bitwise_equal(l2, loss, f"{shape} {red} out= loss")
            zi = z.copy()
            l3, g3 = fx.cross_entropy_with_grad(zi, t, reduction=red, out=zi, **kw)
            assert g3 is zi
            assert_bitwise_equal(zi, g, f"{shape} {red} in place")
            assert_bitwise_equal(l3, loss, f"{shape} {red} in place loss")


THREAD_CASES = [
    ((2, 300000), -1, "off", False),
    ((2, 300000), -1, "on", True),
    ((64, 3000), -1, "on", False),
    ((64, 3000), -1, "off", True),
    ((6, 50, 1000), 1, "on", False),
    ((6, 50, 1000), 1, "off", True),
]


@pytest.mark.parametrize(
    "shape,axis,opts,probs",
    THREAD_CASES,
    ids=[f"{s}-axis{a}-{o}-{'probs' if p else 'class'}" for s, a, o, p in THREAD_CASES],
)
@pytest.mark.parametrize("half", HALVES, ids=half_id)
def test_bitwise_for_every_thread_count(isa, half, shape, axis, opts, probs, rng):
    """num_threads 1, 2, 3, None: the same bits (few rows over many classes go through the
    fixed-chunk path when threads outnumber rows, one row per thread otherwise: both must
    equal the float32 computation), with options on and off."""
    z, t, kw = make_case(rng, shape, half, OPTIONS[opts], probs, axis=axis)
    z32, t32 = float32_twin(z, t)
    for red in ("none", "mean"):
        l32, g32 = fx.cross_entropy_with_grad(z32, t32, reduction=red, **kw)
        g32 = g32.astype(half)
        for nt in (1, 2, 3, None):
            loss, g = fx.cross_entropy_with_grad(z, t, reduction=red, num_threads=nt, **kw)
            assert_bitwise_equal(loss, l32, f"{opts} {red} nt={nt} loss")
            assert_bitwise_equal(g, g32, f"{opts} {red} nt={nt} grad")
        assert_bitwise_equal(
            fx.cross_entropy(z, t, reduction=red, num_threads=3, **kw),
            l32,
            f"{opts} {red} loss-only",
        )


@pytest.mark.parametrize("half", HALVES, ids=half_id)
def test_weights_given_as_any_float_array(isa, half, rng):
    """weight and sample_weight as float64, float32, float16 arrays or lists: converted to
    float32, the same bits whichever spelling holds the same values."""
    z, y, _ = make_case(rng, (20, 8), half, OPTIONS["off"], False)
    w = (np.arange(8) % 4 + 1) / 4.0  # exact in every float type
    sw = (np.arange(20) % 3 + 1) / 2.0
    ref = fx.cross_entropy_with_grad(z, y, weight=w, sample_weight=sw, reduction="none")
    for cast in (np.float32, np.float16, half, list):
        wc = list(w) if cast is list else w.astype(cast)
        swc = list(sw) if cast is list else sw.astype(cast)
        got = fx.cross_entropy_with_grad(z, y, weight=wc, sample_weight=swc, reduction="none")
        assert_bitwise_equal(got[0], ref[0], f"loss with {cast}")
        assert_bitwise_equal(got[1], ref[1], f"grad with {cast}")


@pytest.mark.parametrize("half", HALVES, ids=half_id)
def test_special_values(isa, half):
    """Masked rows and entries: -inf classes get 0, an all -inf row has loss +inf (the
    float32 path's convention) and NaN stays in its row; ignored rows are exactly 0; overflow
    of the gradient into the 16-bit range cannot happen (|g| <= max weight)."""
    z = np.array(
        [
            [0.0, -np.inf, 2.0, 1.0],
            [-np.inf, -np.inf, -np.inf, -np.inf],
            [np.nan, 0.0, 1.0, 2.0],
            [np.nan, np.inf, 1.0, 2.0],
            [60000.0 if half == np.float16 else 1e30, 0.0, -3.0, 1.0],
        ]
    ).astype(half)
    y = np.array([0, 1, 2, -100, 1])
    for red in REDUCTIONS:
        assert_half_contract(z, y, {}, f"special {red}")
    loss, g = fx.cross_entropy_with_grad(z, y, reduction="none")
    assert loss[1] == np.inf and np.isnan(loss[2]) and loss[3] == 0.0
    assert np.all(g[3] == 0) and np.all(np.isnan(g[2].astype(np.float32)))
    assert g[0, 1] == 0 and np.isfinite(loss[4])


@pytest.mark.parametrize("half", HALVES, ids=half_id)
def test_probability_targets_of_the_half_dtype_are_read_as_such(isa, half, rng):
    """Probabilities of the logits' 16-bit dtype: used exactly (their float32 upcast); the
    loss is float32, the gradient 16-bit."""
    z = make_logits(rng, (10, 6), 2.0, half)
    p = rng.dirichlet(np.ones(6), size=10).astype(half)
    for red in REDUCTIONS:
        loss, g = fx.cross_entropy_with_grad(z, p, reduction=red, label_smoothing=0.1)
        l32, g32 = fx.cross_entropy_with_grad(
            z.astype(np.float32), p.astype(np.float32), reduction=red, label_smoothing=0.1
        )
        assert_bitwise_equal(loss, l32, red)
        assert_bitwise_equal(g, g32.astype(half), red)


@pytest.mark.parametrize("half", HALVES, ids=half_id)
def test_errors(half):
    """out= must have the 16-bit dtype (float32 is refused, nothing written); bad options
    are refused as for float logits."""
    z = np.ones((4, 3), half)
    y = np.array([0, 1, 2, 0])
    out = np.full((4, 3), 7.0, np.float32)
    with pytest.raises(ValueError, match="dtype"):
        fx.cross_entropy_with_grad(z, y, out=out)
    assert np.all(out == 7.0)
    other = np.float16 if half != np.float16 else ml_dtypes.bfloat16
    out2 = np.full((4, 3), 7.0, other)
    with pytest.raises(ValueError, match="dtype"):
        fx.cross_entropy_with_grad(z, y, out=out2)
    for kw in (
        dict(softcap=0.0),
        dict(logit_scale=-1.0),
        dict(z_loss=float("nan")),
        dict(normalizer=-1.0),
        dict(sample_weight=np.ones(5)),
    ):
        zi = z.copy()
        with pytest.raises(ValueError):
            fx.cross_entropy_with_grad(zi, y, out=zi, **kw)
        assert_bitwise_equal(zi, z, f"in place after {kw}")
    with pytest.raises(ValueError, match="shape"):
        fx.cross_entropy(z, np.ones((4, 4), half))
