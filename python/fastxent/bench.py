"""Benchmark of fastxent against the memory floors and its peers (NumPy, PyTorch, JAX).

Everything runs in one process. For each shape and thread setting every contestant gets a
warm-up call, then the contestants take turns within each repetition
(``for rep: for contestant: time one call``) so that drift of the machine (other jobs,
frequency, temperature) hits them all alike; the median per contestant is quoted.

This module never touches OPENBLAS_* (or any other) environment variable: that is the
user's job. It only reports the ones it sees.
"""

from __future__ import annotations

import functools
import gc
import importlib
import os
import platform
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._api import cross_entropy, cross_entropy_with_grad

Shape = Tuple[int, int]

DEFAULT_SHAPES: List[Shape] = [(4096, 32000), (1024, 128256), (65536, 1000), (256, 1000), (32, 10)]
QUICK_SHAPES: List[Shape] = [(256, 1000), (32, 10)]
PEERS = ("numpy", "torch", "jax")
FUSED_OUT = "fastxent fused out="
_OMP_VERSIONS = {
    200505: "2.5",
    200805: "3.0",
    201107: "3.1",
    201307: "4.0",
    201511: "4.5",
    201811: "5.0",
    202011: "5.1",
    202111: "5.2",
    202411: "6.0",
}
_ENV_SHOWN = (
    "OMP_NUM_THREADS",
    "OMP_PROC_BIND",
    "OMP_WAIT_POLICY",
    "FASTXENT_ISA",
    "FASTXENT_STREAM_BYTES",
    "FASTXENT_RECOMPUTE_BYTES",
    "FASTXENT_SHORT_ROWS",
)


class CheckError(RuntimeError):
    """fastxent disagrees grossly with the NumPy reference."""


# ----------------------------------------------------------------------------- environment
def cpu_fields() -> Dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key and value:
                    fields.setdefault(key, value)
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's name, with CPUID's vendor, family and model where Linux reports them (a VM's
    name, e.g. "AMD EPYC", does not say which generation it is)."""
    fields = cpu_fields()
    name = (
        next(
            (fields[k] for k in ("model name", "Model", "cpu model", "Processor") if k in fields),
            "",
        )
        or platform.processor()
        or platform.machine()
        or "unknown"
    )
    if "vendor_id" in fields and "cpu family" in fields and "model" in fields:
        name += f" [{fields['vendor_id']} family {fields['cpu family']} model {fields['model']}]"
    return name


def all_threads() -> int:
    """What "all" means for --threads: the logical CPUs (else the OpenMP default)."""
    return os.cpu_count() or _core.default_num_threads() or 1


def system_info() -> Dict[str, str]:
    """Label -> value lines describing this build and machine (``python -m fastxent info``)."""
    from . import __version__, active_isa, available_isas

    bi = dict(getattr(_core, "build_info", {}))
    omp = int(bi.get("openmp") or 0)
    if _core.has_openmp():
        ver = _OMP_VERSIONS.get(omp, "?")
        omp_s = f"yes (_OPENMP {omp} = OpenMP {ver}), default threads {_core.default_num_threads()}"
    else:
        omp_s = "no (single-threaded build)"
    env = ", ".join(
        f"{k}={os.environ[k]}"
        for k in sorted(os.environ)
        if k.startswith("OPENBLAS_") or k in _ENV_SHOWN
    )
    return {
        "fastxent": __version__,
        "ISA": f"{active_isa()} active (available: {', '.join(available_isas())})",
        "stream": _stream_text(_core.stream_bytes()),
        "OpenMP": omp_s,
        "compiler": str(bi.get("compiler", "?")),
        "flags": str(bi.get("cxx_flags", "?")).strip() or "(none)",
        "numpy": np.__version__,
        "python": platform.python_version(),
        "CPU": f"{cpu_model()} ({os.cpu_count() or '?'} logical CPUs, {platform.machine()})",
        "env": env or "(no OPENBLAS_*/OMP_*/FASTXENT_* set)",
    }


def _stream_text(nbytes: int) -> str:
    if nbytes <= 0:
        return "plain stores for every gradient (no non-temporal stores)"
    size = f"{nbytes >> 20} MiB" if nbytes % (1 << 20) == 0 else f"{nbytes} bytes"
    return f"non-temporal gradient stores from {size} (out=, not in place)"


def format_info(info: Dict[str, str]) -> str:
    w = max(map(len, info))
    return "\n".join(f"{k:<{w}}  {v}" for k, v in info.items())


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
def numpy_xent(logits: np.ndarray, target: np.ndarray) -> Tuple[Any, np.ndarray]:
    """Mean softmax cross-entropy and its gradient, plain vectorised NumPy (the logits' dtype)."""
    n = logits.shape[0]
    rows = np.arange(n)
    m = logits.max(axis=1, keepdims=True)
    e = logits - m
    np.exp(e, out=e)
    s = e.sum(axis=1, keepdims=True)
    loss = (np.log(s[:, 0]) + m[:, 0] - logits[rows, target]).mean()
    e /= s
    e[rows, target] -= 1
    e /= n
    return loss, e


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


# ----------------------------------------------------------------------------- contestants
@dataclass
class Contestant:
    name: str
    call: Callable[[], Any]
    prepare: Optional[Callable[[], Any]] = None  # untimed, before every call
    kind: str = "fastxent"  # "floor", "fastxent" or "peer"
    floor: str = "copy"  # the floor it is naturally compared with
    note: str = ""
    times: List[float] = field(default_factory=list)
    number: int = 1  # calls per timing (more than 1 for calls of a few microseconds)


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


@functools.lru_cache(maxsize=None)
def _jax_fn(jax: Any, jnp: Any) -> Any:
    def loss_fn(x, t):
        logp = jax.nn.log_softmax(x, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss_fn))


def _contestants(
    x: np.ndarray, t: np.ndarray, nt: int, bufs: Dict[str, Any], mods: Dict[str, Any]
) -> List[Contestant]:
    out, work = bufs["out"], bufs["work"]
    cs = [
        Contestant("copy (floor)", lambda: np.copyto(out, x), kind="floor"),
        Contestant("read (floor)", lambda: x.max(), kind="floor", floor="read"),
    ]
    if nt > 1 and x.size >= 1 << 16:
        # The floors also on nt Python threads (NumPy releases the GIL in copyto and max), each
        # over a contiguous band of rows; the ratios divide by the faster of the two.
        from concurrent.futures import ThreadPoolExecutor

        if f"pool{nt}" not in bufs:
            bufs[f"pool{nt}"] = ThreadPoolExecutor(nt)
        pool = bufs[f"pool{nt}"]
        bands = [slice(i * x.shape[0] // nt, (i + 1) * x.shape[0] // nt) for i in range(nt)]
        cs += [
            Contestant(
                f"copy ({nt} threads)",
                lambda: list(pool.map(lambda s: np.copyto(out[s], x[s]), bands)),
                kind="floor",
            ),
            Contestant(
                f"read ({nt} threads)",
                lambda: max(pool.map(lambda s: x[s].max(), bands)),
                kind="floor",
                floor="read",
            ),
        ]
    cs += [
        Contestant("fastxent fused", lambda: cross_entropy_with_grad(x, t, num_threads=nt)),
        Contestant(FUSED_OUT, lambda: cross_entropy_with_grad(x, t, num_threads=nt, out=out)),
        Contestant(
            "fastxent in-place",
            lambda: cross_entropy_with_grad(work, t, num_threads=nt, out=work),
            prepare=lambda: np.copyto(work, x),
        ),
        Contestant("fastxent forward", lambda: cross_entropy(x, t, num_threads=nt), floor="read"),
    ]
    if isinstance(mods.get("numpy"), tuple):
        cs.append(Contestant("numpy", lambda: numpy_xent(x, t), kind="peer"))
    if isinstance(mods.get("torch"), tuple):
        torch, F = mods["torch"]
        tt = bufs.setdefault("torch_t", torch.from_numpy(t))

        def torch_call():
            xt = torch.from_numpy(x).requires_grad_()
            F.cross_entropy(xt, tt).backward()
            return xt.grad

        cs.append(Contestant("torch", torch_call, kind="peer"))
    if isinstance(mods.get("jax"), tuple):
        jax, jnp = mods["jax"]
        f = _jax_fn(jax, jnp)
        if "jax_x" not in bufs:  # device arrays made once per shape, outside the timing
            bufs["jax_x"] = jax.block_until_ready(jnp.array(x, copy=True))
            bufs["jax_t"] = jax.block_until_ready(jnp.asarray(t.astype(np.int32)))
        xj, tj = bufs["jax_x"], bufs["jax_t"]
        cs.append(
            Contestant(
                "jax",
                lambda: jax.block_until_ready(f(xj, tj)),
                kind="peer",
                note="XLA's own thread pool",
            )
        )
    return cs


# ----------------------------------------------------------------------------- measuring
# Calls shorter than this are timed in loops of several calls (as timeit does): a single
# call of a few microseconds is mostly timer and cold-cache noise.
_MIN_TIMING_S = 2e-4


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


# ----------------------------------------------------------------------------- reporting
def _mu() -> str:
    try:
        "µ".encode(sys.stdout.encoding or "ascii")
        return "µ"
    except (UnicodeEncodeError, LookupError):
        return "u"


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} {_mu()}s"


def format_table(rows: List[Dict[str, Any]]) -> str:
    r0 = rows[0]
    head = (
        f"-- {r0['N']}x{r0['C']} {r0['dtype']}, threads={r0['threads']}, "
        f"{r0['rounds']} interleaved rounds after a warm-up ({r0['seconds']:.1f} s), "
        "median of each"
    )
    cols = (
        f"  {'contestant':<21}{'median':>11}{'min':>11}{'x copy':>9}{'x read':>9}"
        f"{'out= speed-up':>15}  note"
    )
    lines = [head, cols]
    for r in rows:

        def num(v, suf=""):
            return "-" if v is None else f"{v:.2f}{suf}"

        sp = r["speedup_of_fused_out"]
        sp_s = "" if r["contestant"] == FUSED_OUT or sp is None else f"{sp:.2f}x"
        lines.append(
            f"  {r['contestant']:<21}{fmt_time(r['median_s']):>11}"
            f"{fmt_time(r['min_s']):>11}{num(r['ratio_copy']):>9}"
            f"{'' if r['ratio_read'] is None else num(r['ratio_read']):>9}{sp_s:>15}"
            f"  {r['note']}".rstrip()
        )
    return "\n".join(lines)


def _header(mods: Dict[str, Any]) -> str:
    info = system_info()
    for name in ("torch", "jax"):
        if name in mods:
            m = mods[name]
            info[name] = (
                f"{m[0].__version__}"
                if isinstance(m, tuple)
                else f"not available ({type(m).__name__}: {m})"
            )
    if hasattr(os, "getloadavg"):
        la = os.getloadavg()
        busy = ": other work is running, timings (above all multi-threaded) will be noisy"
        info["load"] = f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}" + (busy if la[0] > 0.5 else "")
    info["note"] = (
        "fastxent threads via num_threads=, torch via torch.set_num_threads, "
        "NumPy/BLAS/floors via threadpoolctl; JAX/XLA threads cannot be changed "
        "in-process, so the jax row uses XLA's default pool at every setting; at "
        "threads=T > 1 the floors also run on T Python threads over bands of rows, "
        "and ratios divide by the faster of the two"
    )
    info["columns"] = (
        "x copy / x read = median / median of that floor; out= speed-up = "
        "median / median of 'fastxent fused out=' (>1: fastxent is faster)"
    )
    return format_info(info)


def plot(results: List[Dict[str, Any]], path: str) -> None:
    """Bar chart of the ratio to the copy floor, per contestant per shape (one panel per
    thread setting)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e
    threads = sorted({r["threads"] for r in results})
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    names = [
        n for n in dict.fromkeys(r["contestant"] for r in results) if not n.startswith("copy (")
    ]
    fig = Figure(
        figsize=(max(7.0, 1.6 * len(shapes) + 1), 3.2 * len(threads) + 0.8), layout="constrained"
    )
    FigureCanvasAgg(fig)
    width = 0.8 / max(1, len(names))
    for i, nt in enumerate(threads):
        ax = fig.add_subplot(len(threads), 1, i + 1)
        for j, name in enumerate(names):
            val = {
                r["shape"]: r["ratio_copy"]
                for r in results
                if r["threads"] == nt and r["contestant"] == name
            }
            ys = [val.get(s) or np.nan for s in shapes]
            ax.bar(
                [k + (j - (len(names) - 1) / 2) * width for k in range(len(shapes))],
                ys,
                width,
                label=name,
            )
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{n}x{c}" for n, c in shapes])
        ax.set_ylabel("time / copy floor")
        ax.set_title(f"threads={nt}")
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    try:
        fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    except ValueError:  # matplotlib < 3.7 has no "outside"
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


# ----------------------------------------------------------------------------- variants
def _variant_cases(
    rng: np.random.Generator, mods: Dict[str, Any], nt: int
) -> List[Tuple[str, List[Contestant]]]:
    """The options of the loss, each against PyTorch doing the same computation: all options
    on, probability targets, bfloat16 in place, and the (N, C, H, W) layout with axis=1."""
    torch_ok = isinstance(mods.get("torch"), tuple)
    cases: List[Tuple[str, List[Contestant]]] = []
    n, c = 4096, 32000
    x = rng.standard_normal((n, c), dtype=np.float32) * 3
    t = rng.integers(0, c, n)
    w = rng.random(c, dtype=np.float32) + 0.5
    sw = rng.random(n, dtype=np.float32)
    out, work = np.empty_like(x), np.empty_like(x)
    opts = dict(
        weight=w, label_smoothing=0.1, z_loss=1e-4, softcap=30.0, logit_scale=0.9, sample_weight=sw
    )
    cs = [
        Contestant(FUSED_OUT, lambda: cross_entropy_with_grad(x, t, out=out, num_threads=nt)),
        Contestant(
            "fastxent all options out=",
            lambda: cross_entropy_with_grad(x, t, out=out, num_threads=nt, **opts),
        ),
    ]
    if torch_ok:
        torch, F = mods["torch"]
        tt, wt, st = torch.from_numpy(t), torch.from_numpy(w), torch.from_numpy(sw)

        def torch_all():
            xt = torch.from_numpy(x).requires_grad_()
            zp = 30.0 * torch.tanh(0.9 * xt / 30.0)
            rows = F.cross_entropy(zp, tt, weight=wt, label_smoothing=0.1, reduction="none")
            lse = torch.logsumexp(zp, 1)
            ((rows + 1e-4 * lse * lse) * st).sum().div((st * wt[tt]).sum()).backward()
            return xt.grad

        cs.append(Contestant("torch all options", torch_all, kind="peer"))
    cases.append(
        (
            f"{n}x{c} float32, all options (weight, smoothing, z_loss, softcap, "
            "logit_scale, sample_weight)",
            cs,
        )
    )

    p = rng.random((n, c), dtype=np.float32)
    p /= p.sum(1, keepdims=True)
    cs = [
        Contestant(FUSED_OUT, lambda: cross_entropy_with_grad(x, t, out=out, num_threads=nt)),
        Contestant(
            "fastxent probs out=", lambda: cross_entropy_with_grad(x, p, out=out, num_threads=nt)
        ),
    ]
    if torch_ok:
        pt = torch.from_numpy(p)

        def torch_probs():
            xt = torch.from_numpy(x).requires_grad_()
            F.cross_entropy(xt, pt).backward()
            return xt.grad

        cs.append(Contestant("torch probs", torch_probs, kind="peer"))
    cases.append((f"{n}x{c} float32, probability targets", cs))

    try:
        import ml_dtypes

        xb = x.astype(ml_dtypes.bfloat16)
        workb = np.empty_like(xb)
        cs = [
            Contestant(
                "fastxent in-place f32",
                lambda: cross_entropy_with_grad(work, t, out=work, num_threads=nt),
                prepare=lambda: np.copyto(work, x),
            ),
            Contestant(
                "fastxent in-place bf16",
                lambda: cross_entropy_with_grad(workb, t, out=workb, num_threads=nt),
                prepare=lambda: np.copyto(workb, xb),
            ),
        ]
        if torch_ok:
            xtb = torch.from_numpy(x).to(torch.bfloat16)

            def torch_bf16():
                xt = xtb.detach().requires_grad_()
                F.cross_entropy(xt, tt).backward()
                return xt.grad

            cs.append(Contestant("torch bf16", torch_bf16, kind="peer"))
        cases.append((f"{n}x{c} bfloat16 vs float32, in place", cs))
    except ImportError:
        pass

    seg = rng.standard_normal((8, 21, 512, 512), dtype=np.float32)
    tseg = rng.integers(0, 21, (8, 512, 512))
    outs = np.empty_like(seg)
    cs = [
        Contestant(
            "fastxent axis=1 out=",
            lambda: cross_entropy_with_grad(seg, tseg, axis=1, out=outs, num_threads=nt),
        )
    ]
    if torch_ok:
        ts = torch.from_numpy(tseg)

        def torch_seg():
            xt = torch.from_numpy(seg).requires_grad_()
            F.cross_entropy(xt, ts).backward()
            return xt.grad

        cs.append(Contestant("torch (N,C,H,W)", torch_seg, kind="peer"))
    cases.append(("8x21x512x512 float32, class axis 1 (segmentation)", cs))
    return cases


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
