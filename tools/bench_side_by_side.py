"""Two builds of fastxent side by side in one process, interleaved round by round, medians
(steady state: out= preallocated where named; calls under 0.1 ms timed in loops).

    python tools/bench_side_by_side.py BEFORE AFTER

BEFORE and AFTER are folders holding a built `fastxent` package each (for example
build/m/python of two CMake builds, or two site-packages). The BEFORE package is copied under
the name fastxent_before into a temporary folder so that both import in one process. Unset
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for this command where the machine sets them."""

import os
import shutil
import statistics
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

_tmp = tempfile.mkdtemp()
shutil.copytree(os.path.join(sys.argv[1], "fastxent"), os.path.join(_tmp, "fastxent_before"))
sys.path[:0] = [_tmp, sys.argv[2]]
import fastxent as A  # noqa: E402
import fastxent_before as B  # noqa: E402

rng = np.random.default_rng(0)


def case(name, fa, fb, rounds, inner=1):
    """Median seconds per call of fa (after) and fb (before), alternating which goes first."""
    ta, tb = [], []
    fa()
    fb()
    for r in range(rounds):
        for f, ts in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            ts.append((time.perf_counter() - t0) / inner)
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(
        f"{name:<50} before {mb * 1e6:11.2f} us  after {ma * 1e6:11.2f} us  "
        f"after/before {ma / mb:5.3f}",
        flush=True,
    )


def grad_case(name, args, kw, rounds, inner=1):
    """cross_entropy_with_grad(*args, **kw) in both builds."""
    case(
        name,
        lambda: A.cross_entropy_with_grad(*args, **kw),
        lambda: B.cross_entropy_with_grad(*args, **kw),
        rounds,
        inner,
    )


def shape_cases(N, C):
    x = rng.standard_normal((N, C), dtype=np.float32)
    t = rng.integers(0, C, N)
    out = np.empty_like(x)
    big = N * C > 1e7
    R = 15 if big else (40 if N * C > 1e5 else 200)
    inner = 1 if N * C > 1e5 else (50 if N * C > 1e4 else 2000)
    grad_case(f"{N}x{C} f32 with_grad out=", (x, t), dict(out=out), R, inner)
    case(
        f"{N}x{C} f32 forward",
        lambda: A.cross_entropy(x, t),
        lambda: B.cross_entropy(x, t),
        R,
        inner,
    )
    if not big:
        grad_case(f"{N}x{C} f32 with_grad alloc", (x, t), {}, R, inner)
        opts = dict(
            weight=rng.random(C, dtype=np.float32),
            label_smoothing=0.1,
            z_loss=1e-4,
            softcap=30.0,
            logit_scale=0.9,
        )
        grad_case(
            f"{N}x{C} f32 with_grad out= all options", (x, t), dict(out=out, **opts), R, inner
        )


def option_cases():
    N, C = 4096, 32000
    x = rng.standard_normal((N, C), dtype=np.float32) * 3
    t = rng.integers(0, C, N)
    out = np.empty_like(x)
    opts = dict(
        weight=rng.random(C, dtype=np.float32) + 0.5,
        label_smoothing=0.1,
        z_loss=1e-4,
        softcap=30.0,
        logit_scale=0.9,
        sample_weight=rng.random(N, dtype=np.float32),
    )
    grad_case("4096x32000 f32 all options out=", (x, t), dict(out=out, **opts), 15)
    p = rng.random((1024, C), dtype=np.float32)
    p /= p.sum(1, keepdims=True)
    grad_case("1024x32000 f32 probability targets out=", (x[:1024], p), dict(out=out[:1024]), 20)
    h = x.astype(ml_dtypes.bfloat16)
    hw = h.copy()

    def in_place(m):
        np.copyto(hw, h)
        m.cross_entropy_with_grad(hw, t, out=hw)

    case(
        "4096x32000 bf16 in place (+ a restoring copy)",
        lambda: in_place(A),
        lambda: in_place(B),
        15,
    )
    xc = rng.standard_normal((8, 1000, 32, 32), dtype=np.float32)
    tc = rng.integers(0, 1000, (8, 32, 32))
    grad_case("8x1000x32x32 f32 axis=1 out=", (xc, tc), dict(axis=1, out=np.empty_like(xc)), 20)


for shape in [(4096, 32000), (1024, 128256), (65536, 1000), (256, 1000), (32, 10)]:
    shape_cases(*shape)
option_cases()
