"""``python -m fastxent bench-jax``: fastxent.jax against optax inside ``jax.jit``.

Each case times ``jax.jit(jax.value_and_grad(loss))`` (and, with forward-only rows, the
jitted loss alone) of the mean integer-label cross-entropy, fastxent.jax against
``optax.softmax_cross_entropy_with_integer_labels(...).mean()``, on "fresh" logits: two
device arrays made outside the timing are used alternately, so no call finds its input in a
cache the previous call of the same contestant warmed. Contestants are interleaved within
each round; medians are quoted. Needs JAX and optax.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_SHAPES = ((32, 10), (256, 1000), (4096, 32000))


def _parse_shapes(text: str) -> List[Tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, c = part.lower().split("x")
        out.append((int(n), int(c)))
    return out


def _cases(jax: Any, jnp: Any, optax: Any, fxj: Any) -> Dict[str, Tuple[Callable, Callable]]:
    def ours(z, y):
        return fxj.cross_entropy(z, y)

    def theirs(z, y):
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    return {
        "value_and_grad": (jax.jit(jax.value_and_grad(ours)), jax.jit(jax.value_and_grad(theirs))),
        "forward": (jax.jit(ours), jax.jit(theirs)),
    }


def _time(fn: Callable, args: Sequence[Any], jax: Any) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def run(
    shapes: Sequence[Tuple[int, int]],
    dtypes: Sequence[str],
    budget: float,
    forward_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    out: Callable[[str], None] = print,
) -> List[Dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import optax

    import fastxent.jax as fxj
    from . import _jax_ffi

    out(
        f"fastxent.jax via {'the XLA FFI custom call' if _jax_ffi.enabled() else 'pure_callback'}"
        f"; jax {jax.__version__}, optax {optax.__version__}; medians of interleaved rounds"
    )
    fns = _cases(jax, jnp, optax, fxj)
    rows: List[Dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for N, C in shapes:
        for dt in dtypes:
            kinds = ["value_and_grad"]
            if forward_shapes is None or (N, C) in forward_shapes:
                kinds.append("forward")
            jdt = getattr(jnp, dt)
            zs = [
                jax.block_until_ready(jnp.asarray(rng.standard_normal((N, C), np.float32), jdt))
                for _ in range(2)
            ]
            y = jax.block_until_ready(jnp.asarray(rng.integers(0, C, N), jnp.int32))
            for kind in kinds:
                f_ours, f_theirs = fns[kind]
                for f in (f_ours, f_theirs):  # compile and warm up
                    _time(f, (zs[0], y), jax)
                    _time(f, (zs[1], y), jax)
                times: Dict[str, List[float]] = {"fastxent": [], "optax": []}
                start = time.perf_counter()
                k = 0
                while k < 5 or (time.perf_counter() - start < budget and k < 200):
                    z = zs[k % 2]
                    times["fastxent"].append(_time(f_ours, (z, y), jax))
                    times["optax"].append(_time(f_theirs, (z, y), jax))
                    k += 1
                med = {name: statistics.median(v) for name, v in times.items()}
                row = dict(
                    shape=f"{N}x{C}",
                    dtype=dt,
                    kind=kind,
                    rounds=k,
                    fastxent_s=med["fastxent"],
                    optax_s=med["optax"],
                    ratio=med["fastxent"] / med["optax"],
                )
                rows.append(row)
                out(
                    f"{row['shape']:>12} {dt:>8} {kind:>15}: fastxent {_fmt(row['fastxent_s'])}"
                    f"  optax {_fmt(row['optax_s'])}  fastxent/optax {row['ratio']:.2f}x"
                    f"  ({k} rounds)"
                )
            del zs
    return rows


def _fmt(s: float) -> str:
    return f"{s * 1e6:8.1f} us" if s < 1e-3 else f"{s * 1e3:8.2f} ms"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench-jax",
        help="time fastxent.jax against optax inside jax.jit (needs JAX, optax)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument(
        "--shapes",
        metavar="NxC,...",
        help="comma-separated shapes (default: 32x10,256x1000,4096x32000)",
    )
    p.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        metavar="D,...",
        help="comma-separated JAX dtypes (default: float32,bfloat16)",
    )
    p.add_argument(
        "--forward-shapes",
        metavar="NxC,...",
        help="shapes that also get a forward-only row (default: every shape)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds of timing per case (default 5; at least 5 rounds)",
    )
    p.set_defaults(func=_cmd)


def _cmd(args: Any) -> int:
    shapes = _parse_shapes(args.shapes) if args.shapes else list(DEFAULT_SHAPES)
    fwd = _parse_shapes(args.forward_shapes) if args.forward_shapes else None
    try:
        import jax  # noqa: F401
        import optax  # noqa: F401
    except ImportError as e:
        print(f"bench-jax needs JAX and optax: {e}")
        return 2
    run(shapes, [d.strip() for d in args.dtypes.split(",") if d.strip()], args.budget, fwd)
    return 0
