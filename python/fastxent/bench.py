"""Benchmark of fastxent against the memory floors and its peers (NumPy, PyTorch, JAX).

Everything runs in one process. For each shape and thread setting every contestant gets a
warm-up call, then the contestants take turns within each repetition
(``for rep: for contestant: time one call``) so that drift of the machine (other jobs,
frequency, temperature) hits them all alike; the median per contestant is quoted.

This module never touches OPENBLAS_* (or any other) environment variable: that is the
user's job. It only reports the ones it sees.

This module owns the run: the shapes and thread settings (parsing), the check against the
NumPy float64 reference, the measurement (warm-up, interleaved rounds, medians), the rows
of results, and the options section (``run_variants``). The pieces it uses live in
``_bench_env`` (the machine and build description), ``_bench_contestants`` (what is timed)
and ``_bench_report`` (tables, header, plot); their public names are importable from here.
"""

from __future__ import annotations

import gc
import importlib
import time
from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._api import cross_entropy_with_grad
from ._bench_contestants import (  # noqa: F401 (re-exported: fastxent.bench's names)
    FUSED_OUT,
    Contestant,
    _contestants,
    _jax_fn,
    _variant_cases,
    numpy_xent,
)
from ._bench_env import (  # noqa: F401 (re-exported: fastxent.bench's names)
    _ENV_SHOWN,
    _OMP_VERSIONS,
    _stream_text,
    all_threads,
    cpu_fields,
    cpu_model,
    format_info,
    system_info,
)
from ._bench_report import _header, _mu, fmt_time, format_table, plot  # noqa: F401

Shape = Tuple[int, int]

DEFAULT_SHAPES: List[Shape] = [(4096, 32000), (1024, 128256), (65536, 1000), (256, 1000), (32, 10)]
QUICK_SHAPES: List[Shape] = [(256, 1000), (32, 10)]
PEERS = ("numpy", "torch", "jax")


class CheckError(RuntimeError):
    """fastxent disagrees grossly with the NumPy reference."""


# ----------------------------------------------------------------------------- parsing
def parse_shapes(text: str) -> List[Shape]:
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            n, c = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad shape {item!r}: expected NxC, e.g. 4096x32000") from None
        if n < 1 or c < 1:
            raise ValueError(f"bad shape {item!r}: N and C must be >= 1")
        shapes.append((n, c))
    if not shapes:
        raise ValueError("no shapes given")
    return shapes


def parse_threads(text: str) -> List[int]:
    out: List[int] = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        if item != "all" and not item.isdigit():
            raise ValueError(f"bad thread count {item!r}: expected an integer or 'all'")
        n = all_threads() if item == "all" else int(item)
        if n < 1:
            raise ValueError(f"thread counts must be >= 1, got {item}")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError("no thread counts given")
    return out


# ----------------------------------------------------------------------------- references
def check(x: np.ndarray, t: np.ndarray, chunk: int = 1 << 22) -> Dict[str, float]:
    """fastxent against numpy_xent run in float64; raises CheckError if grossly off."""
    ref_loss, ref_grad = numpy_xent(x.astype(np.float64), t)
    loss, grad = cross_entropy_with_grad(x, t)
    rel = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
    step = max(1, chunk // x.shape[1])
    gdiff = max(
        float(np.abs(grad[i : i + step] - ref_grad[i : i + step]).max())
        for i in range(0, x.shape[0], step)
    )
    gscale = float(np.abs(ref_grad).max())
    del ref_grad, grad
    if not (rel <= 1e-4 and gdiff <= 1e-3 * gscale + 1e-30):
        raise CheckError(
            f"fastxent disagrees with the NumPy float64 reference at shape "
            f"{x.shape}: loss rel diff {rel:.3g}, grad max abs diff {gdiff:.3g} "
            f"(max |grad| {gscale:.3g})"
        )
    return {"loss_rel_diff": rel, "grad_max_abs_diff": gdiff, "grad_max_abs": gscale}


# ----------------------------------------------------------------------------- peers
_PEER_IMPORTS = {
    "numpy": ("numpy",),
    "torch": ("torch", "torch.nn.functional"),
    "jax": ("jax", "jax.numpy"),
}


def _peer_modules(peers: Sequence[str]) -> Dict[str, Any]:
    """name -> tuple of modules, or the exception that importing raised."""
    mods: Dict[str, Any] = {}
    for name in peers:
        try:
            mods[name] = tuple(importlib.import_module(m) for m in _PEER_IMPORTS[name])
        except Exception as e:  # ImportError, or a broken install
            mods[name] = e
    return mods


def torch_modules(emit: Callable[[str], None], *extra: str) -> Optional[Tuple[Any, ...]]:
    """(torch, *extra) imported (a name in extra may be relative to this package, as
    ".torch"), or None after emit says the section is skipped: PyTorch is optional."""
    try:
        return tuple(importlib.import_module(m, __package__) for m in ("torch",) + extra)
    except ImportError:
        emit("  skipped: PyTorch is not installed (pip install 'fastxent[torch]')")
        return None


# ----------------------------------------------------------------------------- measuring
# Calls shorter than this are timed in loops of several calls (as timeit does): a single
# call of a few microseconds is mostly timer and cold-cache noise. 1 ms: a 32 x 10 call of
# 2-3 us runs in loops of several hundred, so its median over 100 rounds covers tens of
# thousands of calls (issue #24 asks for at least 10 000), in the steady state of a loop that
# makes millions of them; the first calls after another contestant's (its cache and branch
# history gone) weigh less than in loops of 50 at 0.2 ms.
_MIN_TIMING_S = 1e-3


def _time_one(c: Contestant) -> float:
    """Seconds per call. With c.number > 1 the calls run back to back (an in-place call then
    works on the previous call's gradient, which costs the same)."""
    if c.prepare is not None:
        c.prepare()
    if c.number == 1:
        t0 = time.perf_counter()
        r = c.call()
        dt = time.perf_counter() - t0
        del r  # freeing the result is not part of the call
        return dt
    call = c.call
    t0 = time.perf_counter()
    for _ in range(c.number):
        call()
    return (time.perf_counter() - t0) / c.number


def _rotated(cs: List[Contestant], r: int) -> List[Contestant]:
    """Round r's order: the list rotated by r, so that no contestant always runs right after
    the same one: a peer's worker threads can still be busy after its call returns, and with a
    fixed order the contestant after it paid for that in every round, which its median kept.
    This spreads a short after-effect; it does not remove a long one: with JAX in the process
    the threaded copy floor took 39-47 ms, rotated or not, against 30-31 ms without JAX
    (4096x32000, 2 threads, AMD EPYC Zen 4), so docs/benchmarks.md also quotes a run without JAX.
    (An untimed pause after each peer made every call after it slower instead: idle vCPUs
    are slow to wake.)"""
    k = r % len(cs) if cs else 0
    return cs[k:] + cs[:k]


def measure(
    cs: List[Contestant], repeats: Optional[int], budget_s: float, max_call_s: float
) -> Tuple[List[Contestant], List[Contestant], int, float]:
    active, skipped, t_warm = [], [], time.perf_counter()
    for c in cs:  # warm-up (and jit compilation)
        dt = _time_one(c)
        if dt < _MIN_TIMING_S:
            dt = min(_time_one(c), dt)  # the first call may include compilation
            c.number = int(min(1000, max(1, _MIN_TIMING_S // max(dt, 1e-7))))
        if dt > max_call_s and c.kind == "peer":
            c.note = f"skipped: warm-up took {dt:.1f} s > {max_call_s:g} s"
            skipped.append(c)
        else:
            active.append(c)
    k, rep, t_start = repeats or 0, 0, time.perf_counter()
    while True:
        for c in _rotated(active, rep):  # interleaved: one call each per round
            c.times.append(_time_one(c))
        rep += 1
        if not repeats and rep == 1:  # the budget counts the warm-up too
            now = time.perf_counter()
            k = int(min(100, max(3, (budget_s - (t_start - t_warm)) / max(now - t_start, 1e-9))))
        if rep >= k:
            return active, skipped, rep, time.perf_counter() - t_warm


_measure = measure  # (the name tests/test_bench.py calls)


def run_bench(
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    threads: Sequence[int] = (1,),
    repeats: Optional[int] = None,
    dtype: Any = np.float32,
    peers: Sequence[str] = PEERS,
    budget_s: float = 20.0,
    max_call_s: float = 10.0,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, Any]]:
    """Time all contestants on each (N, C) shape and thread count; one dict per row.

    repeats=None picks, per shape and thread setting, as many repetitions (3 to 100) as fit
    in budget_s / len(threads) seconds. A peer whose warm-up takes over max_call_s is
    skipped. log (e.g. print) receives the header, the check and the table of each setting.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: `pip install .` alone does not bring it
        threadpool_limits = None

    dtype = np.dtype(dtype)
    emit = log or (lambda s: None)
    mods = _peer_modules(peers)
    if threadpool_limits is None:
        emit(
            "note      threadpoolctl is not installed: NumPy's BLAS threads are left as they "
            "are (pip install threadpoolctl to limit them per setting)"
        )
    if dtype == np.float64 and isinstance(mods.get("jax"), tuple):  # process-wide switch
        mods["jax"][0].config.update("jax_enable_x64", True)
    emit(_header(mods))
    results: List[Dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    for n, c in shapes:
        x = (rng.standard_normal((n, c), dtype=np.float32) * 3).astype(dtype, copy=False)
        t = rng.integers(0, c, n, dtype=np.int64)
        chk = check(x, t)
        emit(
            f"\n== {n}x{c} {dtype.name} ({x.nbytes / 2**20:.1f} MiB)  check vs NumPy float64: "
            f"loss rel diff {chk['loss_rel_diff']:.2e}, grad max abs diff "
            f"{chk['grad_max_abs_diff']:.2e} (max |grad| {chk['grad_max_abs']:.2e})"
        )
        bufs: Dict[str, Any] = {"out": np.empty_like(x), "work": np.empty_like(x)}
        for nt in threads:
            cs = _contestants(x, t, nt, bufs, mods)
            with ExitStack() as stack:
                if threadpool_limits is not None:
                    stack.enter_context(threadpool_limits(limits=nt))
                if isinstance(mods.get("torch"), tuple):
                    torch = mods["torch"][0]
                    old = torch.get_num_threads()
                    torch.set_num_threads(nt)
                    stack.callback(torch.set_num_threads, old)
                active, skipped, reps, secs = measure(
                    cs, repeats, budget_s / len(threads), max_call_s
                )
            rows = _rows(active, skipped, (n, c), dtype, nt, reps, secs, chk)
            emit(format_table(rows))
            results.extend(rows)
            del cs, active, skipped
        for k in [k for k in bufs if k.startswith("pool")]:
            bufs[k].shutdown()
        del x, t, bufs
        gc.collect()
    return results


def _rows(
    active: List[Contestant],
    skipped: List[Contestant],
    shape: Shape,
    dtype: np.dtype,
    nt: int,
    reps: int,
    secs: float,
    chk: Dict[str, float],
) -> List[Dict[str, Any]]:
    med = {c.name: float(np.median(c.times)) for c in active}
    # The floor of each kind: the faster of the single call and its threaded version.
    floor_copy = min(v for k, v in med.items() if k.startswith("copy ("))
    floor_read = min(v for k, v in med.items() if k.startswith("read ("))
    rows = []
    for c in active + skipped:
        m = med.get(c.name)
        rows.append(
            {
                "shape": shape,
                "N": shape[0],
                "C": shape[1],
                "dtype": dtype.name,
                "threads": nt,
                "contestant": c.name,
                "kind": c.kind,
                "repeats": len(c.times),
                "rounds": reps,
                "seconds": secs,
                "median_s": m,
                "min_s": min(c.times) if c.times else None,
                "ratio_copy": None if m is None else m / floor_copy,
                "ratio_read": None if m is None or c.floor != "read" else m / floor_read,
                "speedup_of_fused_out": None
                if m is None or c.kind == "floor"
                else m / med[FUSED_OUT],
                "note": "; ".join(
                    x for x in (c.note, f"loops of {c.number}" if c.number > 1 else "") if x
                ),
                **chk,
            }
        )
    return rows


# ----------------------------------------------------------------------------- variants
def run_variants(
    threads: Sequence[int],
    repeats: Optional[int] = None,
    budget_s: float = 20.0,
    peers: Sequence[str] = PEERS,
    seed: int = 1,
    log: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, Any]]:
    """Times the loss's options against PyTorch doing the same thing (see _variant_cases);
    the first contestant of each case is its baseline."""
    emit = log or (lambda s: None)
    mods = _peer_modules([p for p in peers if p == "torch"])
    rng = np.random.default_rng(seed)
    results: List[Dict[str, Any]] = []
    for nt in threads:
        torch_ctx = ExitStack()
        if isinstance(mods.get("torch"), tuple):
            torch = mods["torch"][0]
            old = torch.get_num_threads()
            torch.set_num_threads(nt)
            torch_ctx.callback(torch.set_num_threads, old)
        with torch_ctx:
            for title, cs in _variant_cases(rng, mods, nt):
                active, _, reps, secs = measure(cs, repeats, budget_s / 4, 30.0)
                base = float(np.median(active[0].times))
                emit(f"\n-- {title}, threads={nt}, {reps} interleaved rounds ({secs:.1f} s)")
                for c in active:
                    m = float(np.median(c.times))
                    emit(f"  {c.name:<28}{fmt_time(m):>11}  x{m / base:.2f} of {active[0].name}")
                    results.append(
                        {
                            "case": title,
                            "threads": nt,
                            "contestant": c.name,
                            "median_s": m,
                            "ratio_base": m / base,
                        }
                    )
                del cs, active
                gc.collect()
    return results
