"""Thread-count control composes with OMP_NUM_THREADS and threadpoolctl, and never changes the
results (bitwise); next to NumPy's BLAS threads it stays right, ends, and one threadpoolctl
limit caps both pools."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastxent as fx
from fastxent import _core


def test_omp_num_threads_sets_the_default():
    code = "from fastxent import _core; print(_core.default_num_threads())"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
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


# ---------------------------------------------------------------------------------------------
# Next to NumPy's BLAS threads. Each check runs in a fresh interpreter (only fastxent, NumPy and
# threadpoolctl loaded, so the OpenMP runtime in the process is fastxent's), under a timeout.


def _run_json(code: str, **kw):
    import json

    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180, **kw
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_CONCURRENT_BLAS = r"""
import json, threading, time
import numpy as np, threadpoolctl
import fastxent as fx
from fastxent import _core

rng = np.random.default_rng(0)
z = rng.standard_normal((2048, 3000)).astype(np.float32)  # far above the serial grain
y = rng.integers(0, 3000, 2048)
ref_loss, ref_grad = fx.cross_entropy_with_grad(z, y, num_threads=1)
a = rng.standard_normal((400, 400))
a_ref = a @ a
done = threading.Event()
mm = {"count": 0, "bad": 0}

def blas_loop():  # NumPy's matmul releases the GIL and runs on OpenBLAS's own threads
    while not done.is_set():
        if not np.allclose(a @ a, a_ref, rtol=1e-12, atol=1e-9):
            mm["bad"] += 1
        mm["count"] += 1

t = threading.Thread(target=blas_loop)
t.start()
while mm["count"] < 2:
    time.sleep(0.001)
before = mm["count"]
mismatches = 0
for _ in range(12):
    loss, grad = fx.cross_entropy_with_grad(z, y)  # the default thread count
    mismatches += int(not (loss == ref_loss and np.array_equal(grad, ref_grad)))
during = mm["count"] - before
done.set()
t.join()
blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
print(json.dumps({"mismatches": mismatches, "matmuls_during": during, "bad_matmuls": mm["bad"],
                  "omp_threads": _core.default_num_threads(), "blas_threads": blas}))
"""


def test_concurrent_blas_matmul_bitwise_and_terminates():
    """fastxent on its default OpenMP threads while another Python thread keeps NumPy's BLAS
    busy on its own threads: every result is bitwise the serial one, the matmuls stay right,
    both really ran at once, and the whole thing ends (a deadlock fails on the timeout)."""
    r = _run_json(_CONCURRENT_BLAS)
    assert r["mismatches"] == 0, r
    assert r["bad_matmuls"] == 0, r
    assert r["matmuls_during"] > 0, r  # the BLAS thread made progress during fastxent's calls
    if (os.cpu_count() or 1) > 1 and _core.has_openmp():
        assert r["omp_threads"] > 1, r  # both pools were multi-threaded: the contended case


_POOLS = r"""
import json, os, sys
import numpy as np, threadpoolctl
import fastxent as fx
from fastxent import _core

fx.cross_entropy_with_grad(np.zeros((512, 512), np.float32), np.zeros(512, np.int64))
omp_names = ("libgomp", "libomp", "libiomp", "vcomp")
mapped = set()
if os.path.exists("/proc/self/maps"):
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if "/" in path and os.path.basename(path).startswith(omp_names):
                mapped.add(os.path.realpath(path))
info = threadpoolctl.threadpool_info()
seen = {os.path.realpath(i["filepath"]) for i in info if i["user_api"] == "openmp"}
with threadpoolctl.threadpool_limits(limits=1):
    limited = {"fastxent": _core.default_num_threads(),
               "pools": [i["num_threads"] for i in threadpoolctl.threadpool_info()]}
print(json.dumps({"mapped": sorted(mapped), "seen": sorted(seen), "limited": limited,
                  "apis": sorted({i["user_api"] for i in info}),
                  "after": _core.default_num_threads()}))
"""


def test_one_threadpoolctl_limit_caps_fastxent_and_blas():
    """The usual remedy for oversubscription, threadpool_limits(1) with no user_api, reaches
    both pools: threadpoolctl finds the OpenMP runtime fastxent loaded (the wheel's renamed,
    bundled libgomp-<hash>.so included: every OpenMP library mapped into the process is one
    threadpoolctl controls), fastxent's default becomes 1 and so does every BLAS pool."""
    pytest.importorskip("threadpoolctl")
    if not _core.has_openmp():
        pytest.skip("built without OpenMP: one thread always")
    r = _run_json(_POOLS)
    assert "openmp" in r["apis"], r
    if sys.platform.startswith("linux"):
        assert r["mapped"], r  # fastxent brought an OpenMP runtime in
        assert set(r["mapped"]) <= set(r["seen"]), r
    assert r["limited"]["fastxent"] == 1, r
    assert all(n == 1 for n in r["limited"]["pools"]), r
    assert r["after"] == _core.default_num_threads(), r  # the limit is lifted on exit


def test_default_threads_follow_the_cpu_affinity():
    """A process allowed on one CPU (taskset, a container's cpuset) gets one thread by default,
    not one per CPU of the machine; unpinned, the default is at most the CPUs it may use."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    # The child pins itself before fastxent (and its OpenMP runtime, which reads the affinity
    # mask when it loads) is imported: no preexec_fn, so no fork of this multi-threaded process.
    code = (
        "import json, os; cpus = {cpus}\n"
        "if cpus is not None: os.sched_setaffinity(0, cpus)\n"
        "from fastxent import _core\n"
        "print(json.dumps({{'n': _core.default_num_threads(), "
        "'cpus': len(os.sched_getaffinity(0))}}))"
    )
    free = _run_json(code.format(cpus=None))
    assert 1 <= free["n"] <= free["cpus"], free
    pinned = _run_json(code.format(cpus={min(os.sched_getaffinity(0))}))
    assert pinned == {"n": 1, "cpus": 1}, pinned
