"""The benchmark's fused linear + cross-entropy section (``python -m fastxent bench
--linear``, needs PyTorch): fastxent.torch.linear_cross_entropy against the matmuls alone and
PyTorch's F.linear_cross_entropy (reference path, which materialises the logits, and the
chunked path, ``options=LinearCrossEntropyOptions()``), forward + backward to the input and
the weight, and forward only; plus each contestant's peak RSS.

Timing: contestants interleaved within each round (bench._measure), medians quoted, one
thread count (the largest asked for) for PyTorch's BLAS and fastxent's OpenMP kernel.
Peak RSS: each contestant runs once in a fresh process (``python -m fastxent.bench_linear
rss ...``) that creates the inputs, resets the kernel's high-water mark (/proc/self/
clear_refs) and reports VmHWM minus the RSS before the call: memory beyond the inputs,
gradients included (Linux only; elsewhere the column is empty).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .bench import Contestant, fmt_time, measure, torch_modules

# (N tokens, H hidden, V vocabulary): the shapes; --quick uses QUICK.
SHAPES: List[Tuple[int, int, int]] = [
    (4096, 1024, 32000),
    (2048, 2048, 128256),
    (16384, 512, 32000),
]
QUICK: List[Tuple[int, int, int]] = [(512, 128, 4000)]
DTYPES = ("float32", "bfloat16", "float16", "float64")
NAMES = (
    "one matmul X.W^T",
    "three matmuls",
    "fastxent fwd+bwd",
    "fastxent fwd",
    "torch reference fwd+bwd",
    "torch reference fwd",
    "torch chunked fwd+bwd",
    "torch chunked fwd",
)


def parse_shapes(text: str) -> List[Tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        dims = part.strip().lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"bad linear shape {part!r}: expected NxHxV, e.g. 4096x1024x32000")
        out.append((int(dims[0]), int(dims[1]), int(dims[2])))
    return out


def _inputs(torch: Any, shape: Tuple[int, int, int], dt: Any) -> Tuple[Any, Any, Any]:
    n, h, v = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.empty(n, h, dtype=dt).normal_(0.0, 1.0, generator=gen)
    w = torch.empty(v, h, dtype=dt).normal_(0.0, h**-0.5, generator=gen)
    return x, w, torch.randint(0, v, (n,), generator=gen)


def _calls(torch: Any, x: Any, w: Any, t: Any, nt: int) -> Dict[str, Callable[[], Any]]:
    import torch.nn.functional as F

    from . import torch as fxt

    opts = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    lce = getattr(F, "linear_cross_entropy", None)

    def fwd_bwd(fn: Callable[..., Any], **kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            return torch.autograd.grad(fn(xg, wg, t, **kw), (xg, wg))

        return run

    def fwd(fn: Callable[..., Any], **kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return fn(x, w, t, **kw)

        return run

    def three() -> Any:
        z = torch.mm(x, w.t())
        return torch.mm(z, w), torch.mm(z.t(), x)

    calls = {
        "one matmul X.W^T": lambda: torch.mm(x, w.t()),
        "three matmuls": three,
        "fastxent fwd+bwd": fwd_bwd(fxt.linear_cross_entropy, num_threads=nt),
        "fastxent fwd": fwd(fxt.linear_cross_entropy, num_threads=nt),
    }
    if lce is not None:
        calls["torch reference fwd+bwd"] = fwd_bwd(lce)
        calls["torch reference fwd"] = fwd(lce)
        if opts is not None:
            calls["torch chunked fwd+bwd"] = fwd_bwd(lce, options=opts())
            calls["torch chunked fwd"] = fwd(lce, options=opts())
    return calls


def _rss_child(name: str, shape: Tuple[int, int, int], dtype: str, nt: int) -> None:
    """In a fresh process: inputs, reset the high-water mark, one call, print the peak."""
    import warnings

    import torch

    torch.set_num_threads(nt)
    x, w, t = _inputs(torch, shape, getattr(torch, dtype))
    call = _calls(torch, x, w, t, nt)[name]

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(key)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call()
    print(json.dumps({"peak_bytes": status("VmHWM") - base}))


def _peak_rss(name: str, shape: Tuple[int, int, int], dtype: str, nt: int) -> Optional[int]:
    if not sys.platform.startswith("linux"):
        return None
    cmd = [
        sys.executable,
        "-m",
        "fastxent.bench_linear",
        "rss",
        name,
        "x".join(map(str, shape)),
        dtype,
        str(nt),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        return None
    return int(json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"])


def run_linear(
    threads: Sequence[int],
    repeats: Optional[int] = None,
    budget_s: float = 20.0,
    quick: bool = False,
    shapes: Optional[Sequence[Tuple[int, int, int]]] = None,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    rss: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, Any]]:
    """Times the contestants per shape and dtype at max(threads); returns one row each."""
    import warnings

    emit = log or (lambda s: None)
    mods = torch_modules(emit)
    if mods is None:
        return []
    (torch,) = mods
    nt = max(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(nt)
    results: List[Dict[str, Any]] = []
    try:
        for shape in shapes or (QUICK if quick else SHAPES):
            for dtype in dtypes:
                x, w, t = _inputs(torch, shape, getattr(torch, dtype))
                cs = [Contestant(k, c) for k, c in _calls(torch, x, w, t, nt).items()]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the chunked path's fallback warnings
                    active, _, reps, secs = measure(cs, repeats, budget_s, 1e9)
                med = {c.name: float(np.median(c.times)) for c in active}
                n, h, v = shape
                logits = n * v * x.element_size()
                grads = (n + v) * h * x.element_size()
                emit(
                    f"\n-- linear + cross-entropy N={n} H={h} V={v} {dtype}, threads={nt}, "
                    f"{reps} interleaved rounds ({secs:.1f} s); logits would be "
                    f"{logits / 2**20:.0f} MiB, gradients {grads / 2**20:.0f} MiB"
                )
                for c in active:
                    m = med[c.name]
                    three = "bwd" in c.name or c.name == "three matmuls"
                    base = med["three matmuls"] if three else med["one matmul X.W^T"]
                    peak = _peak_rss(c.name, shape, dtype, nt) if rss else None
                    emit(
                        f"  {c.name:<25}{fmt_time(m):>11}  x{m / base:5.2f} of the matmuls"
                        + ("" if peak is None else f"  peak RSS +{peak / 2**20:7.0f} MiB")
                    )
                    results.append(
                        {
                            "shape": shape,
                            "dtype": dtype,
                            "threads": nt,
                            "contestant": c.name,
                            "median_s": m,
                            "vs_matmuls": m / base,
                            "peak_rss_bytes": peak,
                        }
                    )
                del cs, active, x, w, t
                gc.collect()
    finally:
        torch.set_num_threads(old)
    return results


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[dtype]


def plot_linear(results: List[Dict[str, Any]], path: str) -> None:
    """The section's chart: per dtype (rows), time over the matmuls alone for forward +
    backward (against the three matmuls) and for the forward (against the one), and peak
    memory beyond the inputs and gradients; one group of bars per shape."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("the linear plot needs matplotlib: pip install matplotlib") from e
    if not results:
        raise RuntimeError("no linear results to plot (is PyTorch installed?)")
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    peers = ("fastxent", "torch reference", "torch chunked")
    fig = Figure(figsize=(13.0, 3.3 * len(dtypes) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / len(peers)
    panels = (
        ("fwd+bwd", "median_s", "forward + backward / three matmuls"),
        ("fwd", "median_s", "forward only / one matmul"),
        ("fwd+bwd", "peak_rss_bytes", "fwd + bwd: peak RSS beyond inputs and gradients, MiB"),
    )
    for i, dt in enumerate(dtypes):
        for j, (kind, key, title) in enumerate(panels):
            ax = fig.add_subplot(len(dtypes), len(panels), i * len(panels) + j + 1)
            for k, peer in enumerate(peers):
                ys = []
                for s in shapes:
                    row = {
                        r["contestant"]: r for r in results if r["dtype"] == dt and r["shape"] == s
                    }
                    r = row.get(f"{peer} {kind}")
                    if r is None or r[key] is None:
                        ys.append(np.nan)
                    elif key == "median_s":
                        ys.append(r["vs_matmuls"])
                    else:  # every contestant holds the same gradients
                        n, h, v = s
                        grads = (n + v) * h * _itemsize(dt)
                        ys.append(max(r[key] - grads, 2**20) / 2**20)
                xs = [m + (k - (len(peers) - 1) / 2) * width for m in range(len(shapes))]
                ax.bar(xs, ys, width, label=peer)
            if key == "median_s":
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
                ax.axhline(1.1, color="tab:red", lw=0.8, ls=":")
            else:
                ax.set_yscale("log")
                for m, s in enumerate(shapes):  # the target: 1/4 of the logits' size
                    n, _, v = s
                    size = n * v * _itemsize(dt) / 4 / 2**20
                    ax.plot([m - 0.4, m + 0.4], [size, size], color="k", lw=0.8, ls="--")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{n}x{h}x{v}" for n, h, v in shapes], fontsize=8)
            ax.set_title(f"{dt}: {title}", fontsize=9)
            ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    labels = [
        f"{x} (dashed: the matmuls alone / 1/4 of the logits; dotted: 1.10x)" if i == 0 else x
        for i, x in enumerate(labels)
    ]
    try:
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    except ValueError:  # matplotlib < 3.7 has no "outside"
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "rss":
    _rss_child(sys.argv[2], parse_shapes(sys.argv[3])[0], sys.argv[4], int(sys.argv[5]))
