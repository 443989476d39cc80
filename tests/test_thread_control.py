"""Thread-count control composes with OMP_NUM_THREADS and threadpoolctl, and never changes the
results (bitwise)."""

import os
import subprocess
import sys

import numpy as np

import fastxent as fx
from fastxent import _core


def test_omp_num_threads_sets_the_default():
    code = "from fastxent import _core; print(_core.default_num_threads())"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_threadpoolctl_limits_apply_and_results_do_not_change():
    threadpoolctl = __import__("pytest").importorskip("threadpoolctl")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((512, 1000)).astype(np.float32)
    y = rng.integers(0, 1000, 512)
    ref = fx.cross_entropy_with_grad(z, y)
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert _core.default_num_threads() == 1
        got = fx.cross_entropy_with_grad(z, y)
    assert got[0] == ref[0] and np.array_equal(got[1], ref[1])
