"""Dask against the one-machine kernel, for logits larger than one Dask worker's memory limit.

``python -m fastxent.dask_bench --plot docs/dask.png --out docs/dask-run.txt``

The logits (float32, uniform in [0, 1), logit_scale=8) are a lazy ``dask.array.random``
array: the same seeded blocks everywhere, so both sides see the same values.

* one machine: a fresh child process fills one NumPy array with the blocks (``da.store``,
  synchronous: NumPy's generator holds the GIL), then runs :func:`fastxent.cross_entropy`
  (the loss) and :func:`fastxent.cross_entropy_with_grad` (the gradient written in place,
  ``out=logits``: the least memory a one-machine gradient needs) with the kernel's default
  threads;
* Dask: a ``distributed.LocalCluster`` of 2 worker processes (1 thread each, a memory limit
  below the logits' size) computes, lazily from the seed, the logits alone (their block sums:
  the cost of generating them), the loss, and the loss with the gradient, reduced on the
  workers to per-block norms (the gradient as a whole fits in no worker).

Time: wall time of each step, the median of ``--repeats``. Memory: the peak resident set
(VmHWM, reset before each step through /proc/self/clear_refs) of the one-machine process and
of each worker process (elsewhere than Linux, the peak since the process started).

This module owns the report, the plot and the command line; the runs themselves (memory
probes, the problem, the one-machine child, the Dask cluster) live in ``_dask_bench_runs``,
and their names are importable from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

import numpy as np

from ._dask_bench_runs import (  # noqa: F401 (re-exported: fastxent.dask_bench's names)
    MiB,
    _block_norm,
    _block_sum,
    _one_machine_child,
    make_problem,
    peak_bytes,
    reset_peak,
    run_dask,
    run_one_machine,
)


# ----------------------------------------------------------------------------- report
def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def report(cfg: Dict[str, Any], one: Dict[str, Any], dk: Dict[str, Any], info: str) -> str:
    size = cfg["rows"] * cfg["cols"] * 4
    lines = [f"command: {cfg.get('command', 'python -m fastxent.dask_bench')}", "", info, ""]
    try:
        import dask
        import distributed

        lines.append(f"dask {dask.__version__}, distributed {distributed.__version__}")
    except ImportError:  # pragma: no cover
        pass
    lines += [
        f"load average (1, 5, 15 min) at the start: {cfg['load_start']}, at the end: "
        f"{cfg.get('load_end') or _load()} ({os.cpu_count()} logical CPUs; a load above that "
        f"count means other work shared the CPUs and the times are noisy)",
        f"logits {cfg['rows']} x {cfg['cols']} float32 = {size / MiB:.0f} MiB, chunks "
        f"{cfg['chunks'][0]} x {cfg['chunks'][1]} "
        f"({cfg['chunks'][0] * cfg['chunks'][1] * 4 / MiB:.0f} MiB), options weight, "
        f"label_smoothing=0.05, logit_scale=8, 2% ignored rows",
        f"Dask: {cfg['workers']} worker processes x 1 thread, memory_limit "
        f"{cfg['worker_limit'] / MiB:.0f} MiB each; one machine: one process, kernel default "
        f"threads",
        f"repeats {cfg['repeats']} (Dask: median time, highest peak; one machine: one run in a "
        f"fresh process)",
        f"writing memory on this machine: {one['touch_s_per_gib']:.2f} s/GiB the first time "
        f"(page faults), {one['write_s_per_gib']:.2f} s/GiB again; every new block a task "
        f"returns (and the one-machine array) pays the first",
        "",
        "step                          time (s)  peak memory (MiB)",
    ]
    base1 = one["base"] / MiB
    lines.append(f"one machine  process at start           {base1:8.0f}")
    names = {"generate": "generate logits", "loss": "loss", "grad": "loss + gradient"}
    names["grad_new"] = "loss + gradient"
    for k in ("generate", "loss", "grad_new", "grad"):
        extra = {"grad": " (in place)", "grad_new": " (new)"}.get(k, "")
        lines.append(
            f"one machine  {names[k] + extra:<26}{one[k]['time']:6.2f}  {one[k]['peak'] / MiB:8.0f}"
        )
    lines.append(
        f"Dask         workers at start                    "
        f"{' / '.join(f'{b / MiB:.0f}' for b in dk['base'])}"
    )
    for k in ("generate", "loss", "grad"):
        what = {
            "generate": "generate (block sums)",
            "loss": "generate + loss",
            "grad": "gen + loss + grad norms",
        }[k]
        lines.append(
            f"Dask         {what:<26}{dk[k]['time']:6.2f}  "
            f"{' / '.join(f'{b / MiB:.0f}' for b in dk[k]['peak'])}  "
            f"(times {', '.join(f'{v:.2f}' for v in dk[k]['times'])}; spilled "
            f"{dk[k]['spilled'] / MiB:.0f} MiB)"
        )
    rel = abs(dk["loss"]["value"] - one["loss"]["value"]) / abs(one["loss"]["value"])
    relg = abs(dk["grad_norm"] - one["grad_norm"]) / one["grad_norm"]
    lines += [
        "",
        f"check: loss {dk['loss']['value']:.9g} (Dask) vs {one['loss']['value']:.9g} "
        f"(one machine), rel. diff {rel:.1e}; gradient norm {dk['grad_norm']:.9g} vs "
        f"{one['grad_norm']:.9g}, rel. diff {relg:.1e}; workers restarted: "
        f"{dk['restarted']}",
    ]
    return "\n".join(lines) + "\n"


def plot(cfg: Dict[str, Any], one: Dict[str, Any], dk: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = cfg["rows"] * cfg["cols"] * 4 / MiB
    limit = cfg["worker_limit"] / MiB
    nw = cfg["workers"]
    c_one, c_gen, c_dask = "#1f77b4", "#c7c7c7", ["#ff7f0e", "#ffbb78"]
    # rows, top to bottom: (label, side, step)
    rows = [
        ("one machine: generate logits", "one", "generate"),
        ("+ loss", "one", "loss"),
        ("+ loss and gradient (in place)", "one", "grad"),
        ("+ loss and gradient (new array)", "one", "grad_new"),
        ("Dask: generate logits (block sums)", "dask", "generate"),
        ("+ loss", "dask", "loss"),
        ("+ loss and gradient (block norms)", "dask", "grad"),
    ]
    y = np.arange(len(rows), dtype=float)
    y[4:] += 0.6  # a gap between the two sides
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
    gen1 = one["generate"]["time"]
    tmax = 0.0
    for yi, (_, side, step) in zip(y, rows):
        if side == "one":
            ax_t.barh(yi, gen1, 0.7, color=c_gen)
            if step != "generate":
                ax_t.barh(yi, one[step]["time"], 0.7, left=gen1, color=c_one)
            v = gen1 + (one[step]["time"] if step != "generate" else 0.0)
        else:
            v = dk[step]["time"]
            ax_t.barh(yi, v, 0.7, color=c_dask[0])
        tmax = max(tmax, v)
        ax_t.text(v, yi, f" {v:.1f} s", va="center", fontsize=8)
    ax_t.set_xlim(0, 1.45 * tmax)  # room for the legend, lower right
    ax_t.set_yticks(y, [r[0] for r in rows])
    ax_t.invert_yaxis()
    ax_t.set_xlabel("wall time (s); Dask: median of the repeats")
    ax_t.set_title("time", fontsize=10)
    from matplotlib.patches import Patch

    ax_t.legend(
        handles=[
            Patch(color=c_gen, label="one machine: generate (1 thread)"),
            Patch(color=c_one, label="one machine: fastxent kernel (2 threads)"),
            Patch(color=c_dask[0], label=f"Dask, {nw} workers x 1 thread: whole graph"),
        ],
        fontsize=7.5,
        loc="lower right",
    )
    h = 0.7 / nw
    mmax = max(size, limit)
    for yi, (_, side, step) in zip(y, rows):
        if side == "one":
            v = one[step]["peak"] / MiB
            ax_m.barh(yi, v, 0.7, color=c_one)
            ax_m.text(v, yi, f" {v:.0f}", va="center", fontsize=8)
            mmax = max(mmax, v)
        else:
            for i in range(nw):
                v = dk[step]["peak"][i] / MiB
                ax_m.barh(yi - 0.35 + h * (i + 0.5), v, h, color=c_dask[i % 2])
            ax_m.text(
                1.03 * max(size, limit),
                yi,
                ", ".join(f"worker {i + 1}: {dk[step]['peak'][i] / MiB:.0f}" for i in range(nw)),
                va="center",
                fontsize=8,
            )
    gap = (y[3] + y[4]) / 2
    ax_m.axvline(limit, color="k", ls="--", lw=1)
    ax_m.text(limit, gap - 0.25, f" worker memory_limit {limit:.0f} MiB", fontsize=8, va="center")
    ax_m.axvline(size, color=c_one, ls=":", lw=1.2)
    ax_m.text(size, gap + 0.25, f" logits {size:.0f} MiB", fontsize=8, va="center", color=c_one)
    ax_m.set_xlim(0, 1.2 * mmax)
    ax_m.set_xlabel("peak resident memory of each process (MiB, VmHWM)")
    ax_m.set_title("peak memory per process", fontsize=10)
    fig.suptitle(
        f"fastxent.dask: {cfg['rows']} x {cfg['cols']} float32 logits ({size:.0f} MiB), "
        f"one process vs {nw} Dask workers limited to {limit:.0f} MiB each",
        fontsize=10,
    )
    if "touch_s_per_gib" in one:
        fig.text(
            0.5,
            0.01,
            f"Fresh memory costs {one['touch_s_per_gib']:.1f} s/GiB on the first "
            f"write on this machine (page faults; {one['write_s_per_gib']:.2f} s/GiB "
            f"after): the one-machine array and new gradient pay it, as does every new "
            f"block a Dask task returns. Details: docs/dask-run.txt",
            ha="center",
            fontsize=7.5,
            color="#444444",
        )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastxent.dask_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=32768)
    ap.add_argument("--chunks", default="1024,4096", metavar="R,C")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--worker-limit",
        default="512",
        metavar="MIB",
        help="memory_limit per worker in MiB (default 512)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="FILE.png")
    ap.add_argument("--out", metavar="FILE.txt", help="also write the report there")
    ap.add_argument("--json", metavar="FILE.json", help="also save the raw results there")
    ap.add_argument(
        "--from-json", metavar="FILE.json", help="report and plot saved results instead of running"
    )
    ap.add_argument("--one-machine-child", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one_machine_child:
        print(json.dumps(_one_machine_child(json.loads(args.one_machine_child))))
        return 0
    cfg = dict(
        rows=args.rows,
        cols=args.cols,
        workers=args.workers,
        repeats=args.repeats,
        chunks=[int(v) for v in args.chunks.split(",")],
        seed=args.seed,
        worker_limit=int(float(args.worker_limit) * MiB),
        load_start=_load(),
        command=" ".join(
            ["python -m fastxent.dask_bench", *(argv if argv is not None else sys.argv[1:])]
        ),
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        cfg, one, dk, info = saved["cfg"], saved["one"], saved["dask"], saved["info"]
    else:
        from .bench import format_info, system_info

        info = format_info(system_info())  # before the cluster's workers are spawned
        log("one machine ...")
        one = run_one_machine(cfg)
        log(f"  {one}")
        log("dask ...")
        dk = run_dask(cfg, log)
        cfg["load_end"] = _load()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(cfg=cfg, one=one, dask=dk, info=info), f, indent=1)
    text = report(cfg, one, dk, info)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.plot:
        plot(cfg, one, dk, args.plot)
        print(f"plot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
