"""Rows of one block (C up to 4096 float32 / 2048 float64 classes) whose gradient is not
streamed go through the grouped driver (one_block_rows: a group's block passes in one kernel
call, then each row's merge and gradient). It must give the bits of the one-row-at-a-time
driver (compute_row, which the per-row outputs still take), for the forward pass, out= and
in place, at group boundaries (32 rows forward; 16 KiB of gradient rows with a gradient), with
ignored, all -inf, NaN and +inf rows in a group, strided logits and probabilities, every
option, and 1-3 threads (calls from 32768 elements on, here 67 x 1000 and 37 x 900, split
their rows between threads out of step with the groups)."""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from reference import assert_bitwise_equal, option_kwargs

# Row counts around the groups: forward 32 rows; with a gradient 16384 / (C * itemsize) rows
# (C = 100 float32: 32; C = 1000 float32: 4; C = 3000 float32 and C = 2000 float64: 1).
SHAPES = [(1, 100), (31, 100), (33, 100), (70, 100), (9, 1000), (67, 1000), (5, 3000), (40, 700)]

OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"weight": "w", "label_smoothing": 0.2, "z_loss": 1e-3},
    {"logit_scale": 0.6, "reduction": "sum"},
    {"sample_weight": "s", "reduction": "none"},
    {"softcap": 30.0},  # forward only here: the softcap's gradient keeps compute_row
]


def _inputs(rng, N, C, dtype, stride):
    wide = (rng.standard_normal((N, C + stride)) * 3).astype(dtype)
    z = wide[:, :C]  # row stride C + stride (stride 0: contiguous)
    y = rng.integers(0, C, N)
    for n in range(0, N, 4):
        y[n] = -100  # every 4th row ignored: runs of counted rows between them
    if N > 3:
        y[N - 1] = -100
        z[2] = -np.inf  # all -inf: the uniform limit
        z[3, 5] = np.nan
    if N > 6:
        z[6, 1] = np.inf
    if N > 13:
        y[9:14] = -100  # a run of ignored rows across a group boundary
    return z, y


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride", [0, 3])
def test_grouped_rows_match_one_row_at_a_time(isa, rng, shape, dtype, stride):
    N, C = shape
    z, y = _inputs(rng, N, C, dtype, stride)
    for case in OPTIONS:
        kw = option_kwargs(case, rng, N, C, dtype)
        what = f"{shape} {np.dtype(dtype).name} stride +{stride} {sorted(case)}"
        # The outputs= calls take compute_row: the reference bits.
        want_l = fx.cross_entropy(z, y, outputs=("lse",), **kw)[0]
        for nt in (1, 2, 3):
            assert_bitwise_equal(fx.cross_entropy(z, y, num_threads=nt, **kw), want_l, what)
        if "softcap" in case:
            continue
        want_gl, want_g, _ = fx.cross_entropy_with_grad(z, y, outputs=("lse",), **kw)
        if N > 3:
            assert np.isnan(want_g[3]).all() and not np.isnan(want_g[2]).any()
        assert (want_g[0] == 0).all()
        for nt in (1, 2, 3):
            out = np.full((N, C), np.nan, dtype)
            loss, g = fx.cross_entropy_with_grad(z, y, out=out, num_threads=nt, **kw)
            assert g is out
            assert_bitwise_equal(loss, want_gl, f"out= loss {what} threads {nt}")
            assert_bitwise_equal(g, want_g, f"out= grad {what} threads {nt}")
            x = z.copy()
            loss, g = fx.cross_entropy_with_grad(x, y, out=x, num_threads=nt, **kw)
            assert_bitwise_equal(loss, want_gl, f"in-place loss {what} threads {nt}")
            assert_bitwise_equal(x, want_g, f"in-place grad {what} threads {nt}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_rows_with_strided_probabilities(isa, rng, dtype):
    N, C = 37, 900
    z = (rng.standard_normal((N, C)) * 2).astype(dtype)
    wide = rng.random((N, C + 5)).astype(dtype)
    wide[:, :C] /= wide[:, :C].sum(-1, keepdims=True)
    q = wide[:, :C]  # row stride C + 5
    assert not q.flags.c_contiguous
    for kw in ({}, {"label_smoothing": 0.3, "weight": rng.uniform(0.5, 1.5, C).astype(dtype)}):
        want_l, want_g, _ = fx.cross_entropy_with_grad(z, q, outputs=("lse",), **kw)
        for nt in (1, 2):
            loss, g = fx.cross_entropy_with_grad(z, q, num_threads=nt, **kw)
            assert_bitwise_equal(loss, want_l, f"loss {sorted(kw)}")
            assert_bitwise_equal(g, want_g, f"grad {sorted(kw)}")
            assert_bitwise_equal(fx.cross_entropy(z, q, num_threads=nt, **kw), want_l)


def test_grouped_rows_against_float64(isa, rng):
    # Not only the same bits as before: right. 67 rows of 1000 float32 against NumPy float64.
    N, C = 67, 1000
    z = (rng.standard_normal((N, C)) * 4).astype(np.float32)
    y = rng.integers(0, C, N)
    y[::5] = -100
    z64 = z.astype(np.float64)
    m = z64.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z64 - m).sum(-1, keepdims=True)))[:, 0]
    counted = y != -100
    rows = np.where(counted, lse - z64[np.arange(N), np.where(counted, y, 0)], 0.0)
    ref_loss = rows.sum() / counted.sum()
    grad = np.exp(z64 - lse[:, None])
    grad[np.arange(N)[counted], y[counted]] -= 1.0
    grad[~counted] = 0.0
    grad /= counted.sum()
    loss, g = fx.cross_entropy_with_grad(z, y)
    assert abs(float(loss) - ref_loss) <= 1e-6 * abs(ref_loss)
    # float32 rounding of entries of size up to 1/D: a few ulps of the largest.
    assert np.max(np.abs(g - grad)) <= 4 * np.finfo(np.float32).eps / counted.sum()
    assert float(fx.cross_entropy(z, y)) == float(loss)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grouped_rows_all_ignored(isa, rng, dtype):
    N, C = 45, 600
    z = (rng.standard_normal((N, C)) * 2).astype(dtype)
    y = np.full(N, -100)
    for red in ("mean", "sum", "none"):
        want_l, want_g, _ = fx.cross_entropy_with_grad(z, y, reduction=red, outputs=("lse",))
        loss, g = fx.cross_entropy_with_grad(z, y, reduction=red)
        assert_bitwise_equal(loss, want_l, red)
        assert_bitwise_equal(g, want_g, red)
        assert not np.any(g) and not np.any(loss)
        x = z.copy()
        fx.cross_entropy_with_grad(x, y, reduction=red, out=x)
        assert not np.any(x)
