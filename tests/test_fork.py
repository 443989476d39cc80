"""Fork safety: a process that ran the kernel on several OpenMP threads, then forked (as
data-loader pools do), can call it again in the child without hanging (GNU libgomp would: its
worker pool does not survive fork). Each scenario runs in a fresh interpreter under a timeout,
so a hang fails the test instead of hanging the suite."""

import subprocess
import sys
import textwrap

import pytest

_PRELUDE = textwrap.dedent("""
    import os, sys
    import numpy as np
    import fastxent as fx
    z = np.random.default_rng(0).standard_normal((4096, 1000)).astype(np.float32)
    y = np.arange(4096) % 1000
    def work(_=None):
        loss, g = fx.cross_entropy_with_grad(z, y, num_threads=2)
        return float(loss), float(np.abs(g).sum())
    parent = work()   # starts the OpenMP worker pool
""")


def _run(body: str, timeout: float = 120.0) -> str:
    code = _PRELUDE + textwrap.dedent(body)
    try:
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child hung (timeout)")
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_os_fork_child_does_not_hang_and_agrees():
    out = _run("""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, repr(work()).encode())
            os._exit(0)
        os.close(w)
        child = eval(os.read(r, 1000).decode())
        _, status = os.waitpid(pid, 0)
        assert status == 0
        assert child == parent, (child, parent)
        # The parent keeps its threads.
        assert work() == parent
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.skipif(sys.platform == "win32", reason="the fork start method is POSIX-only")
def test_multiprocessing_fork_pool():
    out = _run("""
        import multiprocessing as mp
        with mp.get_context("fork").Pool(2) as pool:
            results = pool.map(work, range(4))
        assert all(r == parent for r in results), (results, parent)
        print("ok")
    """)
    assert out.strip() == "ok"
