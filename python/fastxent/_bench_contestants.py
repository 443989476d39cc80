"""The benchmark's contestants (fastxent.bench): the Contestant record, the copy and read
floors, fastxent's calls, the NumPy reference (:func:`numpy_xent`) and the PyTorch and JAX
peers of the main table, and the cases of the options section (``bench --variants``).
Re-exported by fastxent.bench, which times them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ._api import cross_entropy, cross_entropy_with_grad

FUSED_OUT = "fastxent fused out="


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


def _torch_peer(torch: Any, F: Any, x: np.ndarray, target: Any) -> Callable[[], Any]:
    """PyTorch's F.cross_entropy forward and backward on a fresh leaf tensor over x (zero
    copy) against target (a tensor): the call returns the gradient."""

    def call():
        xt = torch.from_numpy(x).requires_grad_()
        F.cross_entropy(xt, target).backward()
        return xt.grad

    return call


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
        cs.append(Contestant("torch", _torch_peer(torch, F, x, tt), kind="peer"))
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
        cs.append(Contestant("torch probs", _torch_peer(torch, F, x, pt), kind="peer"))
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
        cs.append(Contestant("torch (N,C,H,W)", _torch_peer(torch, F, seg, ts), kind="peer"))
    cases.append(("8x21x512x512 float32, class axis 1 (segmentation)", cs))
    return cases
