"""Command line: ``python -m fastxent {info,bench,bench-jax,demo} ...`` (no arguments: help).

A subcommand is a function ``_add_NAME(subparsers)`` that adds its parser and sets
``func`` (args -> exit code); list it in ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, List, Optional


def _add_info(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "info",
        help="version, ISA, OpenMP, compiler and CPU",
        description="Print the build and machine fastxent runs on.",
    )
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from .bench import format_info, system_info

    print(format_info(system_info()))
    return 0


def _add_bench(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "bench",
        help="time fastxent against the memory floors, NumPy, PyTorch and JAX",
        description="Time fastxent (fused, fused out=, in place, forward only) against the "
        "copy/read memory floors and NumPy, PyTorch and JAX, in one process, "
        "contestants interleaved within each repetition; medians are quoted. "
        "Environment variables (OPENBLAS_*, OMP_*) are left as you set them.",
    )
    p.add_argument(
        "--shapes",
        metavar="NxC,...",
        help="comma-separated shapes (default: 4096x32000,1024x128256,65536x1000,256x1000,32x10)",
    )
    p.add_argument(
        "--threads",
        default="1,all",
        metavar="T,...",
        help="comma-separated thread counts, 'all' = logical CPUs (default: 1,all)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        metavar="K",
        help="interleaved rounds per setting (default: as many as fit in the budget, 3 to 100)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds of timing per shape when --repeats is not given (default 20)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument(
        "--peers",
        default="numpy,torch,jax",
        metavar="P,...",
        help="peers to time among numpy,torch,jax (default: all; '' for none)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="save a bar chart of time / copy floor")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: small shapes, few repeats (a few seconds)"
    )
    sections = (
        (
            "variants",
            "also time the loss's options against PyTorch doing the same (all options "
            "on, probability targets, bfloat16 in place, axis=1 segmentation); on by "
            "default in a full run",
            "the options section",
        ),
        (
            "training",
            "also time the loss inside a PyTorch training loop (fresh activations "
            "each step, default path, float32, bfloat16 and a small batch) against "
            "F.cross_entropy; on by default in a full run (needs PyTorch)",
            "the training-loop section",
        ),
        (
            "linear",
            "also time the fused linear + cross-entropy (fastxent.torch.linear_"
            "cross_entropy) against the matmuls alone and PyTorch's "
            "F.linear_cross_entropy, with peak RSS; off by default (minutes at the "
            "issue's shapes; --quick: a small shape)",
            "the linear section",
        ),
        (
            "distill",
            "also time the distillation losses (KL and JSD, loss and student gradient) "
            "against the read-two-write-one memory floor, PyTorch's F.kl_div and jax.jit; "
            "on by default in a full run (--quick: a small shape)",
            "the distillation section",
        ),
    )
    p.add_argument(
        "--linear-shapes",
        metavar="NxHxV,...",
        help="the linear section's shapes (default: 4096x1024x32000,2048x2048x128256,"
        "16384x512x32000)",
    )
    p.add_argument(
        "--linear-dtypes",
        default="float32,bfloat16",
        metavar="D,...",
        help="the linear section's dtypes among float32,bfloat16,float16,float64 "
        "(default: float32,bfloat16)",
    )
    p.add_argument(
        "--linear-plot",
        metavar="FILE.png",
        help="save a chart of the linear section (time over the matmuls, peak RSS)",
    )
    for name, on_help, what in sections:  # --NAME / --no-NAME, None when neither is given
        p.add_argument(f"--{name}", dest=name, action="store_true", default=None, help=on_help)
        p.add_argument(f"--no-{name}", dest=name, action="store_false", help=f"skip {what}")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    try:
        shapes = (
            bench.parse_shapes(args.shapes)
            if args.shapes
            else (bench.QUICK_SHAPES if args.quick else bench.DEFAULT_SHAPES)
        )
        threads = bench.parse_threads(args.threads)
        linear_shapes = None
        linear_dtypes = tuple(d.strip() for d in args.linear_dtypes.split(",") if d.strip())
        if args.linear:
            from . import bench_linear

            if args.linear_shapes:
                linear_shapes = bench_linear.parse_shapes(args.linear_shapes)
            bad = sorted(set(linear_dtypes) - set(bench_linear.DTYPES)) or not linear_dtypes
            if bad:
                raise ValueError(
                    f"--linear-dtypes: expected some of {', '.join(bench_linear.DTYPES)}, "
                    f"got {args.linear_dtypes!r}"
                )
        elif args.linear_shapes or args.linear_plot:
            raise ValueError("--linear-shapes and --linear-plot need --linear")
    except ValueError as e:
        print(f"fastxent bench: error: {e}", file=sys.stderr)
        return 2
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(bench.PEERS))
    if unknown or (args.repeats is not None and args.repeats < 1):
        print(
            f"fastxent bench: error: unknown peers {unknown}"
            if unknown
            else "fastxent bench: error: --repeats must be >= 1",
            file=sys.stderr,
        )
        return 2
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else None)
    try:
        results = bench.run_bench(
            shapes,
            threads,
            repeats=repeats,
            dtype=args.dtype,
            peers=peers,
            budget_s=args.budget,
            log=lambda s: print(s, flush=True),
        )
    except bench.CheckError as e:
        print(f"fastxent bench: CHECK FAILED: {e}", file=sys.stderr)
        return 1
    variants = args.variants if args.variants is not None else not (args.quick or args.shapes)
    if variants and args.dtype == "float32":
        print("\n== options of the loss, each against PyTorch doing the same thing", flush=True)
        bench.run_variants(
            threads,
            repeats=repeats,
            budget_s=args.budget,
            peers=peers,
            log=lambda s: print(s, flush=True),
        )
    training = args.training if args.training is not None else not args.shapes
    if training and "torch" in peers:
        from . import bench_training

        print(
            "\n== the loss inside a PyTorch training loop (fresh activations each step, "
            "default path), against F.cross_entropy",
            flush=True,
        )
        bench_training.run_training(
            threads,
            repeats=repeats,
            budget_s=args.budget,
            quick=args.quick,
            log=lambda s: print(s, flush=True),
        )
    if args.linear and "torch" in peers:
        from . import bench_linear

        print(
            "\n== fused linear + cross-entropy, forward + backward to input and weight", flush=True
        )
        linear_rows = bench_linear.run_linear(
            threads,
            repeats=repeats,
            budget_s=args.budget,
            quick=args.quick,
            shapes=linear_shapes,
            dtypes=linear_dtypes,
            log=lambda s: print(s, flush=True),
        )
        if args.linear_plot and not _save_plot(
            bench_linear.plot_linear, linear_rows, args.linear_plot, "linear plot"
        ):
            return 1
    distill = args.distill if args.distill is not None else not args.shapes
    if distill and args.dtype == "float32":
        from . import bench_distill

        print(
            "\n== distillation losses from logits (student gradient), against the floor "
            "and the peers",
            flush=True,
        )
        bench_distill.run_distill(
            threads,
            repeats=repeats,
            budget_s=args.budget,
            quick=args.quick,
            log=lambda s: print(s, flush=True),
            peers=peers,
        )
    if args.plot and not _save_plot(bench.plot, results, args.plot, "plot"):
        return 1
    return 0


def _save_plot(draw: Callable[[Any, str], None], rows: Any, path: str, what: str) -> bool:
    """draw(rows, path), saying where it went; False (the error on stderr) when it cannot
    (matplotlib missing, no rows)."""
    try:
        draw(rows, path)
    except RuntimeError as e:
        print(f"fastxent bench: error: {e}", file=sys.stderr)
        return False
    print(f"\n{what} saved to {path}", flush=True)
    return True


def _add_demo(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "demo",
        help="train digit classifiers in NumPy with fastxent's loss and gradient",
        description="Train softmax regression and a one-hidden-layer MLP (NumPy) on "
        "scikit-learn's bundled handwritten digits, the backward pass starting "
        "from fastxent's fused gradient; print test accuracies and the time spent "
        "in the loss, fastxent against a NumPy log-softmax on the same logits. "
        'Needs pip install "fastxent[demo]".',
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=20,
        metavar="E",
        help="passes over the training set per model (default 20)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, the initialization and the shuffles (default 0)",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="save the train loss and test accuracy curves (matplotlib)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import time
    from . import demo

    if args.epochs < 1 or args.seed < 0:
        print("fastxent demo: error: --epochs must be >= 1 and --seed >= 0", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if args.plot:
            demo.check_plot_deps()
        res = demo.run_demo(epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    except demo.MissingDependency as e:
        print(f"fastxent demo: {e}", file=sys.stderr)
        return 2
    print(demo.format_report(res, time.perf_counter() - t0))
    if args.plot:
        demo.plot(res, args.plot)
        print(f"plot saved to {args.plot}")
    return 0 if res.agree else 1


def _add_bench_jax(sub: "argparse._SubParsersAction") -> None:
    from .bench_jax import add_parser  # imports neither JAX nor optax until it runs

    add_parser(sub)


_SUBCOMMANDS: List[Callable[["argparse._SubParsersAction"], None]] = [
    _add_info,
    _add_bench,
    _add_bench_jax,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastxent",
        description="fastxent: fused softmax cross-entropy (loss and gradient in one pass).",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
