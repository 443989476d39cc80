"""The runs of fastxent.dask_bench: the process memory probes (peak resident set, reset
before each step), the problem (seeded lazy logits, targets, options), the one-machine
child process and the Dask ``LocalCluster`` run; each returns times, peaks and the values
checked against the other side. Re-exported by fastxent.dask_bench, which reports them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np

MiB = 2**20


# ----------------------------------------------------------------------------- process memory
def reset_peak(dask_worker: Any = None) -> None:
    """Resets this process's peak resident set (VmHWM) to its current size (Linux; elsewhere
    the peak stays the one since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes(dask_worker: Any = None) -> Dict[str, Any]:
    """This process's peak and current resident set, and what Dask spilled to disk."""
    spilled = getattr(getattr(dask_worker, "data", None), "spilled_total", None)
    res = dict(pid=os.getpid(), spilled=int(getattr(spilled, "disk", 0) or 0))
    try:
        with open("/proc/self/status") as f:
            st = dict(line.split(":", 1) for line in f if ":" in line)
        res.update(peak=int(st["VmHWM"].split()[0]) * 1024, rss=int(st["VmRSS"].split()[0]) * 1024)
    except (OSError, KeyError):
        import psutil  # type: ignore[import-untyped]  # a dependency of distributed

        mi = psutil.Process().memory_info()
        peak = getattr(mi, "peak_wset", None)  # Windows
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
            peak *= 1024 if sys.platform.startswith("linux") else 1
        res.update(peak=int(peak), rss=int(mi.rss))
    return res


# ----------------------------------------------------------------------------- the problem
def make_problem(rows: int, cols: int, chunks: Sequence[int], seed: int) -> Dict[str, Any]:
    import dask.array as da

    x = da.random.default_rng(seed).random((rows, cols), dtype=np.float32, chunks=tuple(chunks))
    rng = np.random.default_rng(seed + 1)
    target = np.where(rng.random(rows) < 0.02, -100, rng.integers(0, cols, rows))
    weight = rng.uniform(0.5, 1.5, cols)
    opts = dict(weight=weight, label_smoothing=0.05, logit_scale=8.0)
    return dict(x=x, target=target, opts=opts)


def _block_norm(g: np.ndarray) -> np.ndarray:
    return np.array([[np.einsum("ij,ij->", g, g, dtype=np.float64)]])


def _block_sum(b: np.ndarray) -> np.ndarray:
    return np.array([[b.sum(dtype=np.float64)]])


# ----------------------------------------------------------------------------- one machine
def _one_machine_child(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a fresh process: generation, loss, gradient in place; times and peaks."""
    import dask

    from . import cross_entropy, cross_entropy_with_grad

    p = make_problem(cfg["rows"], cfg["cols"], cfg["chunks"], cfg["seed"])
    x, t, opts = p["x"], p["target"], p["opts"]
    res: Dict[str, Any] = dict(base=peak_bytes()["rss"])
    probe = np.empty(256 * MiB, np.uint8)
    t0 = time.perf_counter()
    probe.fill(1)  # the first write to fresh memory: page faults
    res["touch_s_per_gib"] = (time.perf_counter() - t0) * 4
    t0 = time.perf_counter()
    probe.fill(2)
    res["write_s_per_gib"] = (time.perf_counter() - t0) * 4
    del probe
    logits = np.empty(x.shape, x.dtype)
    reset_peak()
    t0 = time.perf_counter()
    with dask.config.set(scheduler="sync"):  # the generator holds the GIL: 1 thread
        x.store(logits, lock=False)
    res["generate"] = dict(time=time.perf_counter() - t0, peak=peak_bytes()["peak"])
    reset_peak()
    t0 = time.perf_counter()
    loss = cross_entropy(logits, t, **opts)
    res["loss"] = dict(time=time.perf_counter() - t0, peak=peak_bytes()["peak"], value=float(loss))
    reset_peak()
    t0 = time.perf_counter()
    loss2, grad = cross_entropy_with_grad(logits, t, **opts)  # a new array for the gradient
    res["grad_new"] = dict(
        time=time.perf_counter() - t0, peak=peak_bytes()["peak"], value=float(loss2)
    )
    del grad
    reset_peak()
    t0 = time.perf_counter()
    loss2, grad = cross_entropy_with_grad(logits, t, out=logits, **opts)
    res["grad"] = dict(time=time.perf_counter() - t0, peak=peak_bytes()["peak"], value=float(loss2))
    res["grad_norm"] = float(np.sqrt(np.einsum("ij,ij->", grad, grad, dtype=np.float64)))
    return res


def run_one_machine(cfg: Dict[str, Any]) -> Dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "fastxent.dask_bench", "--one-machine-child", json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"one-machine child failed:\n{out.stdout}\n{out.stderr}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ----------------------------------------------------------------------------- Dask
def run_dask(cfg: Dict[str, Any], log: Any) -> Dict[str, Any]:
    import distributed

    from . import dask as fxd

    p = make_problem(cfg["rows"], cfg["cols"], cfg["chunks"], cfg["seed"])
    x, t, opts = p["x"], p["target"], p["opts"]
    res: Dict[str, Any] = {}
    with (
        distributed.LocalCluster(
            n_workers=cfg["workers"],
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=cfg["worker_limit"],
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        # warm-up: the workers import Dask and fastxent before the first timing
        warm = make_problem(64, 64, (32, 32), cfg["seed"])
        client.compute(fxd.cross_entropy(warm["x"], warm["target"], **warm["opts"])).result()
        res["base"] = sorted(v["rss"] for v in client.run(peak_bytes).values())
        pids = sorted(client.run(os.getpid).values())

        def step(name: str) -> List[Any]:
            """The lazy results of one step (built afresh for every repeat)."""
            if name == "generate":
                return [x.map_blocks(_block_sum, chunks=(1, 1), dtype=np.float64)]
            if name == "loss":
                return [fxd.cross_entropy(x, t, **opts)]
            loss, grad = fxd.cross_entropy_with_grad(x, t, **opts)
            g: Any = grad
            return [loss, g.map_blocks(_block_norm, chunks=(1, 1), dtype=np.float64)]

        for name in ("generate", "loss", "grad"):
            times: List[float] = []
            peaks: List[List[int]] = []
            spilled = 0
            values: Any = None
            for rep in range(cfg["repeats"]):
                client.run(reset_peak)
                t0 = time.perf_counter()
                values = client.gather(client.compute(step(name)))
                times.append(time.perf_counter() - t0)
                mem = client.run(peak_bytes)
                peaks.append(sorted(v["peak"] for v in mem.values()))
                spilled = max(spilled, max(v["spilled"] for v in mem.values()))
                log(
                    f"  dask {name} #{rep + 1}: {times[-1]:.2f} s, worker peaks "
                    f"{', '.join(f'{b / MiB:.0f}' for b in peaks[-1])} MiB"
                )
            res[name] = dict(
                time=statistics.median(times),
                times=times,
                peak=[max(pk[i] for pk in peaks) for i in range(cfg["workers"])],
                spilled=spilled,
            )
            if name == "loss":
                res[name]["value"] = float(values[0])
            if name == "grad":
                res[name]["value"] = float(values[0])
                res["grad_norm"] = float(np.sqrt(np.sum(values[1])))
        res["restarted"] = sorted(client.run(os.getpid).values()) != pids
    return res
