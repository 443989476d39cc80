"""The benchmark's distillation section (``python -m fastxent bench``): the KL divergence and
the generalised JSD between a student's and a teacher's logits, loss and student gradient,
against the memory floor of the traffic they need and against PyTorch and JAX doing the same.

The floor reads two arrays of the logits' size and writes one (``torch.add(a, b, out=c)``,
threaded; NumPy's single-threaded ``np.add`` without PyTorch): the least any fused
distillation loss with a gradient can move. fastxent's rows write into a preallocated
gradient (``out=``, steady state), as does the floor. The peers are timed as their users call
them: PyTorch's ``F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True,
reduction="batchmean") * T**2`` forward and backward on a fresh leaf tensor, and the same in
``jax.jit(jax.value_and_grad(...))`` on two device arrays used alternately. fastxent.torch and
fastxent.jax are timed the same way as their peers, where those front ends are installed.
fastxent's cross-entropy forward on the student alone (one exp per element) is timed too:
every distillation loss needs two exps per element (both log-sum-exps), so twice its time is
a floor of its own, which the memory floor cannot show when the exps cost more than the
traffic.
Contestants are interleaved within each round (bench.measure); medians are quoted.
"""

from __future__ import annotations

import gc
import importlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import fastxent as fx

from .bench import Contestant, fmt_time, measure

SHAPES: Tuple[Tuple[int, int], ...] = ((4096, 32000), (1024, 128256))
QUICK_SHAPES: Tuple[Tuple[int, int], ...] = ((256, 5000),)
T = 2.0  # the temperature of every case
BETA = 0.5
TOPK = 64  # the sparse teacher's k


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name, __package__)
    except ImportError:
        return None


def _contestants(N: int, C: int, nt: int, peers: Sequence[str]) -> List[Contestant]:
    rng = np.random.default_rng(0)
    s = (2 * rng.standard_normal((N, C))).astype(np.float32)
    t = (2 * rng.standard_normal((N, C))).astype(np.float32)
    g = np.empty_like(s)
    y = np.zeros(N, np.int64)
    torch = _optional("torch") if "torch" in peers else None
    cs: List[Contestant] = []
    if torch is not None:
        ts, tt, tg = torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(g)
        cs.append(Contestant("add a+b->c (floor)", lambda: torch.add(ts, tt, out=tg), kind="floor"))
    else:
        cs.append(
            Contestant("add a+b->c (floor, 1 thread)", lambda: np.add(s, t, out=g), kind="floor")
        )
    cs += [
        Contestant(
            "fastxent KL fwd+grad out=",
            lambda: fx.kl_div_with_logits_with_grad(s, t, temperature=T, out=g, num_threads=nt),
        ),
        Contestant(
            "fastxent JSD fwd+grad out=",
            lambda: fx.jsd_with_logits_with_grad(
                s, t, beta=BETA, temperature=T, out=g, num_threads=nt
            ),
        ),
        Contestant(
            "fastxent KL loss only",
            lambda: fx.kl_div_with_logits(s, t, temperature=T, num_threads=nt),
        ),
        # One exp per element of one array (the cross-entropy's forward): the distillation
        # losses need two (both lse's), so twice this bounds them from below.
        Contestant(
            "fastxent CE loss only (1 exp/elt)",
            lambda: fx.cross_entropy(s, y, num_threads=nt),
            kind="floor",
            floor="read",
        ),
    ]
    # The sparse (top-k) teacher: the teacher's K largest log-probabilities per row
    # (renormalised), as offline distillation stores them.
    k = min(TOPK, C)
    idx = np.argpartition(-t, k - 1, axis=-1)[:, :k]
    tk = np.take_along_axis(t, idx, -1).astype(np.float64)
    lse = np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, dtype=np.float64))
    lp = (tk - t.max(-1, keepdims=True) - lse[:, None]).astype(np.float32)
    cs.append(
        Contestant(
            f"fastxent top-{k} KL fwd+grad out=",
            lambda: fx.kl_div_with_topk_teacher_with_grad(
                s, idx, lp, temperature=T, out=g, num_threads=nt
            ),
        )
    )
    if torch is not None:
        F = torch.nn.functional
        ts, tt = torch.from_numpy(s), torch.from_numpy(t)
        ti, tl = torch.from_numpy(idx), torch.from_numpy(lp)

        def torch_topk_kl():
            # The dense teacher built by scatter (-1e30 off the top k: F.kl_div's log_target
            # gives NaN at -inf), then F.kl_div as above.
            x = ts.detach().requires_grad_()
            dense = torch.full_like(ts, -1e30).scatter_(-1, ti, tl)
            loss = F.kl_div(
                F.log_softmax(x / T, -1),
                F.log_softmax(dense / T, -1),
                log_target=True,
                reduction="batchmean",
            ) * (T * T)
            loss.backward()
            return x.grad

        cs.append(Contestant(f"torch top-{k} KL (scatter) fwd+bwd", torch_topk_kl, kind="peer"))

        def torch_kl():
            x = ts.detach().requires_grad_()
            loss = F.kl_div(
                F.log_softmax(x / T, -1),
                F.log_softmax(tt / T, -1),
                log_target=True,
                reduction="batchmean",
            ) * (T * T)
            loss.backward()
            return x.grad

        def torch_jsd():
            x = ts.detach().requires_grad_()
            lp, lq = F.log_softmax(x / T, -1), F.log_softmax(tt / T, -1)
            lm = torch.logaddexp(lq + np.log(BETA), lp + np.log1p(-BETA))
            loss = (
                BETA * F.kl_div(lm, lq, log_target=True, reduction="batchmean")
                + (1 - BETA) * F.kl_div(lm, lp, log_target=True, reduction="batchmean")
            ) * (T * T)
            loss.backward()
            return x.grad

        cs.append(Contestant("torch F.kl_div fwd+bwd", torch_kl, kind="peer"))
        cs.append(Contestant("torch JSD (ops) fwd+bwd", torch_jsd, kind="peer"))
        fxt = _optional(".torch")
        if fxt is not None and hasattr(fxt, "kl_div_with_logits"):

            def fxt_kl():
                x = ts.detach().requires_grad_()
                fxt.kl_div_with_logits(x, tt, temperature=T).backward()
                return x.grad

            cs.append(Contestant("fastxent.torch KL fwd+bwd", fxt_kl))
    jax = _optional("jax") if "jax" in peers else None
    if jax is not None:
        cs += _jax_contestants(jax, s, t)
    return cs


def _jax_contestants(jax: Any, s: np.ndarray, t: np.ndarray) -> List[Contestant]:
    jnp = jax.numpy
    ss = [jax.block_until_ready(jnp.asarray(s)), jax.block_until_ready(jnp.asarray(s * 0.5))]
    tj = jax.block_until_ready(jnp.asarray(t))

    def ref(x, y):
        lp, lq = jax.nn.log_softmax(x / T, -1), jax.nn.log_softmax(y / T, -1)
        return jnp.sum(jnp.exp(lq) * (lq - lp)) / x.shape[0] * (T * T)

    out: List[Contestant] = []
    f = jax.jit(jax.value_and_grad(ref))
    k = [0]

    def call(fn):
        k[0] += 1
        return jax.block_until_ready(fn(ss[k[0] % 2], tj))

    out.append(Contestant("jax.jit KL (log_softmax) v&g", lambda: call(f), kind="peer"))
    fxj = _optional(".jax")
    if fxj is not None and hasattr(fxj, "kl_div_with_logits"):
        g = jax.jit(jax.value_and_grad(lambda x, y: fxj.kl_div_with_logits(x, y, temperature=T)))
        out.append(Contestant("fastxent.jax KL v&g", lambda: call(g)))
    return out


def run_distill(
    threads: Sequence[int],
    repeats: Optional[int] = None,
    budget_s: float = 20.0,
    quick: bool = False,
    log: Optional[Callable[[str], None]] = None,
    peers: Sequence[str] = ("torch", "jax"),
) -> List[Dict[str, Any]]:
    """Times the contestants at each shape and thread count; one row per contestant. peers:
    which of PyTorch and JAX to time (PyTorch also gives the threaded floor)."""
    emit = log or (lambda s: None)
    torch = _optional("torch") if "torch" in peers else None
    results: List[Dict[str, Any]] = []
    old = torch.get_num_threads() if torch is not None else None
    try:
        for N, C in QUICK_SHAPES if quick else SHAPES:
            for nt in threads:
                if torch is not None:
                    torch.set_num_threads(nt)
                cs = _contestants(N, C, nt, peers)
                active, skipped, reps, secs = measure(cs, repeats, budget_s, 60.0)
                med = {c.name: float(np.median(c.times)) for c in active}
                floor = next(v for k, v in med.items() if k.startswith("add a+b->c"))
                emit(
                    f"\n-- {N}x{C} float32, T={T:g}, threads={nt} (JAX: its own pool), "
                    f"{reps} interleaved rounds ({secs:.1f} s)"
                )
                for c in active:
                    m = med[c.name]
                    emit(f"  {c.name:<32}{fmt_time(m):>11}  / floor {m / floor:5.2f}")
                    results.append(
                        dict(
                            shape=f"{N}x{C}",
                            threads=nt,
                            contestant=c.name,
                            median_s=m,
                            vs_floor=m / floor,
                        )
                    )
                for c in skipped:
                    emit(f"  {c.name:<32} {c.note}")
                pairs = (
                    ("torch F.kl_div fwd+bwd", "fastxent KL fwd+grad out="),
                    ("torch JSD (ops) fwd+bwd", "fastxent JSD fwd+grad out="),
                    ("torch F.kl_div fwd+bwd", "fastxent.torch KL fwd+bwd"),
                    ("jax.jit KL (log_softmax) v&g", "fastxent.jax KL v&g"),
                    ("jax.jit KL (log_softmax) v&g", "fastxent KL fwd+grad out="),
                    (
                        f"torch top-{TOPK} KL (scatter) fwd+bwd",
                        f"fastxent top-{TOPK} KL fwd+grad out=",
                    ),
                    (f"fastxent top-{TOPK} KL fwd+grad out=", "fastxent KL fwd+grad out="),
                )
                for a, b in pairs:
                    if a in med and b in med:
                        emit(f"  {a} / {b} = {med[a] / med[b]:.2f}")
                ce = med.get("fastxent CE loss only (1 exp/elt)")
                if ce is not None:
                    emit(
                        f"  two exps per element (2 x CE loss only) / floor = {2 * ce / floor:.2f}"
                    )
                del cs, active, skipped
                gc.collect()
    finally:
        if torch is not None:
            torch.set_num_threads(old)
    return results
