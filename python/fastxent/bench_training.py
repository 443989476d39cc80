"""The benchmark's training-loop section (``python -m fastxent bench``, needs PyTorch): the
loss as a PyTorch user meets it, on the default path, against ``F.cross_entropy``.

Each step gets fresh activations: a new hidden batch goes through an ``nn.Linear`` head
(untimed), then the timed part is the loss's forward and backward to the logits (the loss
call and ``torch.autograd.grad(loss, logits)``); the gradient and the logits are then dropped
(untimed), as the rest of a backward pass would drop them. So every allocation the loss
makes is paid every step, as in training, including the page faults of fresh memory. The
small case times a whole step (head, loss, backward through the head), since at 32x10 the
loss is mostly call overhead.
Contestants are interleaved within each round (bench.measure); medians are quoted.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .bench import Contestant, all_threads, fmt_time, measure, torch_modules

# (title, rows N, vocabulary V, hidden H, dtype name, whole step)
CASES = [
    ("Linear -> loss, 2048x50257 float32", 2048, 50257, 64, "float32", False),
    ("Linear -> loss, 2048x50257 bfloat16", 2048, 50257, 64, "bfloat16", False),
    (
        "small batch step, 32x10 float32 (Linear 16->10, loss, backward)",
        32,
        10,
        16,
        "float32",
        True,
    ),
]


def _cases(torch: Any, F: Any, fxt: Any, quick: bool) -> List[Any]:
    out = []
    for title, N, V, H, dt_name, whole in CASES:
        if quick and not whole:
            N, V = 256, 5000
            title = title.replace("2048x50257", "256x5000")
        dt = getattr(torch, dt_name)
        gen = torch.Generator().manual_seed(0)
        lin = torch.nn.Linear(H, V, dtype=dt)
        y = torch.randint(0, V, (N,), generator=gen)
        state: Dict[str, Any] = {}

        def fresh(lin=lin, N=N, H=H, dt=dt, gen=gen, state=state):
            state.pop("logits", None)
            state["logits"] = lin(torch.randn(N, H, generator=gen).to(dt))

        def loss_part(fn, state=state, y=y):
            # The logits stay in `state` until the next (untimed) prepare frees them: freeing
            # 400 MB (unmapping its pages) is not the loss's cost.
            logits = state["logits"]
            (g,) = torch.autograd.grad(fn(logits, y), logits)
            return g

        def whole_step(fn, lin=lin, N=N, H=H, y=y, gen=gen):
            h = torch.randn(N, H, generator=gen)
            fn(lin(h), y).backward()
            lin.zero_grad(set_to_none=True)

        cs = []
        for name, fn in (
            ("torch F.cross_entropy", F.cross_entropy),
            ("fastxent.torch default", fxt.cross_entropy),
        ):
            if whole:
                cs.append(Contestant(name, lambda fn=fn, w=whole_step: w(fn)))
            else:
                cs.append(Contestant(name, lambda fn=fn, lp=loss_part: lp(fn), prepare=fresh))
        out.append((title, cs))
    return out


def run_training(
    threads: Sequence[int],
    repeats: Optional[int] = None,
    budget_s: float = 20.0,
    quick: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, Any]]:
    """Times the cases above at each thread count; returns one row per contestant."""
    emit = log or (lambda s: None)
    mods = torch_modules(emit, "torch.nn.functional", ".torch")
    if mods is None:
        return []
    torch, F, fxt = mods
    try:  # fastxent's default path uses all OpenMP threads: a cap needs threadpoolctl
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    results: List[Dict[str, Any]] = []
    old = torch.get_num_threads()
    try:
        for nt in threads:
            cap = contextlib.nullcontext()
            if nt != all_threads():
                if threadpool_limits is None:
                    emit(
                        f"\n-- threads={nt}: skipped (capping fastxent's default path to "
                        f"{nt} threads needs threadpoolctl)"
                    )
                    continue
                cap = threadpool_limits(nt, user_api="openmp")
            torch.set_num_threads(nt)
            with cap:
                results += _run_cases(torch, F, fxt, nt, repeats, budget_s, quick, emit)
    finally:
        torch.set_num_threads(old)
    return results


def _run_cases(
    torch: Any,
    F: Any,
    fxt: Any,
    nt: int,
    repeats: Optional[int],
    budget_s: float,
    quick: bool,
    emit: Callable[[str], None],
) -> List[Dict[str, Any]]:
    results: List[Dict[str, Any]] = []
    for title, cs in _cases(torch, F, fxt, quick):
        active, _, reps, secs = measure(cs, repeats, budget_s / 3, 60.0)
        med = {c.name: float(np.median(c.times)) for c in active}
        ref = med["torch F.cross_entropy"]
        emit(f"\n-- {title}, threads={nt}, {reps} interleaved rounds ({secs:.1f} s)")
        for c in active:
            m = med[c.name]
            emit(
                f"  {c.name:<26}{fmt_time(m):>11}"
                + (
                    ""
                    if c.name == "torch F.cross_entropy"
                    else f"  torch / fastxent = {ref / m:.2f}"
                )
            )
            results.append(
                {
                    "case": title,
                    "threads": nt,
                    "contestant": c.name,
                    "median_s": m,
                    "speedup_vs_torch": ref / m,
                }
            )
        del cs, active
        fxt.release_buffers()
        gc.collect()
    return results
