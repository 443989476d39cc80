"""The benchmark's reporting (fastxent.bench): times formatted for the terminal, the table of
each shape and thread setting, the header (the machine, the peers' versions, the load, what
the columns mean) and the --plot bar chart. Re-exported by fastxent.bench.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

import numpy as np

from ._bench_contestants import FUSED_OUT
from ._bench_env import format_info, system_info


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
