"""Runs a function on every rank of a real torch.distributed process group: one spawned
interpreter per rank, the gloo backend over 127.0.0.1 (test_torch_distributed.py,
test_linear_vp.py).

run_ranks(body, args, outdir) spawns the ranks; each joins the group (rank_main), returns
body(rank, dist, *args) through a pickle in outdir and its traceback, if it raises, through
rank<r>.err. The ranks run under a timeout: a hang (a collective some rank never joins) fails
the test instead of blocking CI, and the gloo timeout makes a stuck collective raise inside the
ranks as well. body must be a module-level function (spawn pickles it by name).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import traceback

import pytest


def _loopback_ifname():
    try:
        names = [n for _, n in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, outdir, body, args):
    """In a spawned rank: body(rank, dist, *args) inside the process group, to rank<r>.pkl."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        ifname = _loopback_ifname()
        if ifname and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname  # stay on the loopback device
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        result = body(rank, dist, *args)
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    # The result is on disk: leave without the interpreter's teardown. A C++ thread that
    # PyTorch leaves behind after autograd errors raised in backward (seen after
    # test_linear_vp's refusals, about 1 run in 10) can abort the exit with "terminate called
    # without an active exception" (exit code -6) once the work is done and the group
    # destroyed.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(body, args, outdir, world=2, timeout_s=240):
    """[what body returned on rank 0, on rank 1, ...]; fails the test when a rank hangs past
    timeout_s (the whole spawned run, imports included), raises or exits with a non-zero code."""
    outdir = str(outdir)
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, outdir, body, args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(10)
    errors = ""
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.err")
        if os.path.exists(path):
            with open(path) as f:
                errors += f"--- rank {r} ---\n{f.read()}"
    if hung:
        pytest.fail(
            f"ranks {hung} still running after {timeout_s} s (a hung collective?)\n{errors}"
        )
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world and not errors, f"worker exit codes {codes}\n{errors}"
    out = []
    for r in range(world):
        with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as f:
            out.append(pickle.load(f))
    return out
