"""Short rows (C <= 32 classes, the row layout) run through the column kernel on transposed
tiles of 240 rows instead of the row kernel, whose fixed cost per row dominates there. The
two must agree, and the short-row path must keep the library's guarantees: the same bits for
any thread count, in place equal to out of place, strided logits equal to a contiguous copy.
FASTXENT_SHORT_ROWS=N sets the threshold (0: never), read once per process, so the row
kernel's results come from a subprocess."""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastxent as fx
from reference import (
    U32,
    assert_bitwise_equal,
    cross_entropy_ref,
    grad_error,
    loss_error,
    make_logits,
    make_target,
)

# Rows around the tile of 240 (one tile, a full tile, a tile and one row, two and one), and
# class counts up to the threshold.
SHAPES = [(239, 2), (240, 10), (241, 17), (481, 7), (1000, 32)]

CASES = r"""
import numpy as np, fastxent as fx, pickle, sys
from fastxent import _core
rng = np.random.default_rng(1)
res = {}
for isa in fx.available_isas():
    _core.set_isa(isa)
    for dt in (np.float32, np.float64):
        for N, C in SHAPES:
            x = (rng.standard_normal((N, C)) * 3).astype(dt)
            y = rng.integers(0, C, N)
            y[3] = -100                     # an ignored row
            x[5] = -np.inf                  # a row of all -inf
            x[6, 0] = np.nan                # a NaN row
            w = rng.random(C).astype(dt)
            opts = dict(weight=w, label_smoothing=0.1, softcap=5.0, z_loss=1e-3,
                        logit_scale=0.7, sample_weight=rng.random(N).astype(dt))
            for k, kw in enumerate(({}, opts)):
                for red in ("sum", "none"):
                    l, g = fx.cross_entropy_with_grad(x, y, reduction=red, **kw)
                    res[(isa, np.dtype(dt).name, N, C, k, red)] = (np.asarray(l), g)
                p = rng.random((N, C)).astype(dt)
                l, g = fx.cross_entropy_with_grad(x, p, reduction="none", **kw)
                res[(isa, np.dtype(dt).name, N, C, k, "probs")] = (np.asarray(l), g)
sys.stdout.buffer.write(pickle.dumps(res))
"""


def _run(env_value):
    env = dict(os.environ)
    env.pop("FASTXENT_SHORT_ROWS", None)
    if env_value is not None:
        env["FASTXENT_SHORT_ROWS"] = env_value
    code = f"SHAPES = {SHAPES!r}\n" + textwrap.dedent(CASES)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    return pickle.loads(res.stdout)


def test_short_rows_agree_with_the_row_kernel():
    """Both paths round the same operations in float32 (float64) in a different order (sums
    over at most 32 classes: per lane down the class axis against two vector accumulators
    across it). Measured on the AVX-512 Xeon: row losses within 1 ulp of each other,
    gradients within 6.2 u of max|grad| (u = eps / 2). Bound: 16 u of (1 + |loss|) for row
    losses and of max|grad| for gradients. NaN rows and -inf rows must match exactly."""
    short, rows = _run(None), _run("0")
    assert short.keys() == rows.keys()
    for k in short:
        (la, ga), (lb, gb) = short[k], rows[k]
        u = np.finfo(ga.dtype).eps / 2
        np.testing.assert_array_equal(np.isnan(la), np.isnan(lb), err_msg=str(k))
        np.testing.assert_array_equal(np.isnan(ga), np.isnan(gb), err_msg=str(k))
        np.testing.assert_array_equal(np.isinf(la), np.isinf(lb), err_msg=str(k))
        fin = np.isfinite(lb)
        assert np.all(np.abs(la[fin] - lb[fin]) <= 16 * u * (1 + np.abs(lb[fin]))), k
        np.testing.assert_array_equal(la[np.isinf(lb)], lb[np.isinf(lb)], err_msg=str(k))
        ok = ~np.isnan(gb)
        scale = np.abs(gb[ok]).max()
        assert np.all(np.abs(ga[ok] - gb[ok]) <= 16 * u * scale), k


def test_threshold_is_read_from_the_environment():
    """FASTXENT_SHORT_ROWS=0 really switches the path: the bits differ somewhere (else the
    comparison above would prove nothing)."""
    short, rows = _run(None), _run("0")
    differ = [k for k in short if short[k][1].tobytes() != rows[k][1].tobytes()]
    assert differ, "FASTXENT_SHORT_ROWS=0 gave identical bits everywhere"


def test_threshold_above_one_block_keeps_the_row_kernel():
    """FASTXENT_SHORT_ROWS above a block (4096 float32 / 2048 float64 classes) must not send
    rows of several blocks to the column kernel, whose lanes hold one block's statistics each:
    they read past them (a loss off by 0.09 with smoothing). Such rows keep the row kernel."""
    code = textwrap.dedent("""
        import numpy as np, fastxent as fx
        rng = np.random.default_rng(0)
        worst = 0.0
        for dt, C in ((np.float32, 5000), (np.float64, 3000)):
            x = rng.standard_normal((8, C)).astype(dt)
            t = rng.integers(0, C, 8)
            loss = fx.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
            z = x.astype(np.float64)
            lp = z - z.max(1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(1, keepdims=True))
            ref = -(0.9 * lp[np.arange(8), t] + 0.1 * lp.mean(1))
            worst = max(worst, float(np.abs((loss - ref) / ref).max()))
        print(worst)
    """)
    env = dict(os.environ, FASTXENT_SHORT_ROWS="10000")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    # float32 row losses of about 9 (log 5000): 24 u relative is 1.4e-6.
    assert float(res.stdout) <= 24 * U32, res.stdout


# The suite's bounds (test_cross_entropy.py's docstring derives them): 24 u for float32, 1e-12
# for float64, on loss_error's and grad_error's scales.
TOL = {np.dtype(np.float32): 24 * U32, np.dtype(np.float64): 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_rows_against_reference(isa, dtype, rng):
    """Weights and smoothing against the float64 reference, across tile boundaries, per row
    and reduced."""
    for N, C in SHAPES:
        x = make_logits(rng, (N, C), 3.0, dtype)
        y = make_target(rng, (N,), C, ignore_frac=0.1)
        w = rng.random(C).astype(dtype)
        for red in ("mean", "none"):
            kw = dict(weight=w, label_smoothing=0.1, reduction=red)
            loss, g = fx.cross_entropy_with_grad(x, y, **kw)
            ref_loss, ref_g = cross_entropy_ref(x, y, **kw)
            assert loss_error(loss, ref_loss) <= TOL[np.dtype(dtype)], (N, C, red)
            assert grad_error(g, ref_g) <= TOL[np.dtype(dtype)], (N, C, red)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_class_count(dtype, rng):
    """The transposes are instantiated per class count (1 to 32): every count against the
    float64 reference, strided logits (a row stride other than C) and a tile and a half of
    rows, loss and gradient."""
    for C in range(1, 33):
        wide = make_logits(rng, (361, C + 3), 3.0, dtype)
        x = wide[:, 1 : 1 + C]
        y = make_target(rng, (361,), C, ignore_frac=0.1)
        loss, g = fx.cross_entropy_with_grad(x, y, reduction="none")
        ref_loss, ref_g = cross_entropy_ref(np.ascontiguousarray(x), y, reduction="none")
        assert loss_error(loss, ref_loss) <= TOL[np.dtype(dtype)], C
        assert grad_error(g, ref_g) <= TOL[np.dtype(dtype)], C


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_rows_threads_in_place_and_strides(isa, dtype, rng):
    """Above the serial grain (4000 x 10 = 40k logits) tiles are shared among threads: the
    same bits for 1, 2 and 3 threads; in place equals out of place; a strided view equals
    its contiguous copy."""
    N, C = 4000, 10
    wide = make_logits(rng, (N, 3 * C), 3.0, dtype)
    x = np.ascontiguousarray(wide[:, 5 : 5 + C])
    y = make_target(rng, (N,), C, ignore_frac=0.1)
    want_l, want_g = fx.cross_entropy_with_grad(x, y, reduction="none", num_threads=1)
    for nt in (2, 3):
        l, g = fx.cross_entropy_with_grad(x, y, reduction="none", num_threads=nt)
        assert_bitwise_equal(l, want_l, f"losses, {nt} threads")
        assert_bitwise_equal(g, want_g, f"gradient, {nt} threads")
    l, g = fx.cross_entropy_with_grad(wide[:, 5 : 5 + C], y, reduction="none")
    assert_bitwise_equal(g, want_g, "strided logits")
    work = x.copy()
    l, g = fx.cross_entropy_with_grad(work, y, reduction="none", out=work)
    assert g is work
    assert_bitwise_equal(l, want_l, "in place losses")
    assert_bitwise_equal(work, want_g, "in place gradient")
