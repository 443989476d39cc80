"""fastxent's loss in jax.numpy ops: what the derivatives beyond the kernel's differentiate.

The XLA custom call gives the loss and its gradient with respect to the logits in one pass.
Everything else is differentiated through :func:`reference_loss`, the same formula as
:func:`fastxent.cross_entropy` written in differentiable JAX ops without a data-dependent
branch: the derivative of the gradient (Hessians, Hessian-vector products, gradient
penalties, ``jax.grad`` of ``jax.grad``), and the derivatives with respect to probability
targets, class and sample weights, and traced label smoothing, normalizer or entropy_coef;
and, through :func:`reference_stats`, those of the per-row outputs (``outputs=``). It
materialises (rows, C) arrays, at XLA's speed: those derivatives are rare, and exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

_HALF = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def reference_loss(
    x: Any,
    t: Any,
    w: Any,
    sw: Any,
    eps: Any,
    normalizer: Any,
    *,
    probs: bool,
    axis: int,
    reduction: int,
    ignore_index: int,
    z_loss: float,
    softcap: float,
    logit_scale: float,
    entropy_coef: Any = 0.0,
) -> jax.Array:
    """The loss of fastxent.cross_entropy: reduction 0 none / 1 sum / 2 mean, softcap 0 off,
    normalizer None for the default denominator; w, sw None when absent; entropy_coef beta
    subtracts beta * s_n * entropy_n on counted rows (a Python 0.0: no term). 16-bit logits
    are computed in float32, as the kernel does. For "none", the rows' losses."""
    z = jnp.moveaxis(x, axis, -1)
    rows_shape, C = z.shape[:-1], z.shape[-1]
    z = z.reshape(-1, C)
    if np.dtype(z.dtype) in _HALF:
        z = z.astype(jnp.float32)
    dt = z.dtype
    N = z.shape[0]
    wv = jnp.ones((C,), dt) if w is None else jnp.asarray(w).astype(dt).reshape(C)
    s = jnp.ones((N,), dt) if sw is None else jnp.asarray(sw).astype(dt).reshape(N)
    if probs:
        q = jnp.moveaxis(t, axis, -1).reshape(-1, C).astype(dt)
        u = wv * (q * (1.0 - eps) + eps / C)
        counted = jnp.ones((N,), bool)
        den = s
    else:
        y = t.reshape(-1)
        counted = counted_rows(y, ignore_index)
        yc = jnp.where(counted, y, 0)
        # An ignored row's logits reach nothing, not even as 0 * NaN in a derivative: they are
        # replaced before any operation on them.
        z = jnp.where(counted[:, None], z, 0.0)
        onehot = (jnp.arange(C)[None, :] == yc[:, None]).astype(dt)
        wy = wv[yc]
        u = (1.0 - eps) * onehot * wy[:, None]
        # Without smoothing (a Python 0) the class weights are not in u: 0 * inf would be NaN.
        # A traced label_smoothing keeps the term: its derivative at 0 is sum w (lse - z') / C
        # (infinite with an infinite weight, where NaN is then the honest answer).
        if not (isinstance(eps, (int, float)) and eps == 0):
            u = u + (eps / C) * wv[None, :]
        den = jnp.where(counted, s * wy, 0.0)
    zp = softcap * jnp.tanh(logit_scale * z / softcap) if softcap > 0 else logit_scale * z
    lse = jax.nn.logsumexp(zp, axis=1)
    # 0 * inf := 0: a class with no target weight at a -inf logit costs nothing, and its
    # derivative with respect to that weight is taken as 0 (the loss is +inf on one side of
    # u = 0 there). Only that case is masked: where u is 0 and the logit finite, the
    # derivative with respect to u (a soft label, a class weight, the smoothing) is lse - z'.
    d = lse[:, None] - zp
    terms = u * jnp.where((u == 0) & jnp.isinf(d), 0.0, d)
    extra = z_loss * lse * lse
    if not (isinstance(entropy_coef, (int, float)) and entropy_coef == 0):
        extra = extra - entropy_coef * row_entropy(zp, lse)
    row = jnp.where(counted, s * (terms.sum(axis=1) + extra), 0.0)
    if reduction == 0:
        return row.reshape(rows_shape)
    total = row.sum()
    if reduction == 1:
        return total
    D = den.sum() if normalizer is None else jnp.asarray(normalizer, dt)
    # "mean" with D = 0 (no row counts) is identically 0, and so is every derivative.
    return jnp.where(D == 0, 0.0, total / jnp.where(D == 0, 1.0, D))


def counted_rows(t: Any, ignore_index: int) -> jax.Array:
    """Class targets that count: those other than ignore_index. An ignore_index outside
    the targets' integer type matches no target (comparing would wrap it into the type's
    range: -100 as a uint8 is 156, a real class)."""
    lim = np.iinfo(np.dtype(t.dtype))
    if lim.min <= ignore_index <= lim.max:
        return t != ignore_index
    return jnp.ones(t.shape, bool)


def accuracy(argmax: Any, t: Any, ignore_index: int, dtype: Any) -> jax.Array:
    """The fraction of counted rows whose argmax is the class target (0 when no row counts),
    a 0-d array of `dtype`: outputs=("accuracy",) of the JAX front ends."""
    keep = counted_rows(t, ignore_index)
    n = jnp.sum(keep)
    hits = jnp.sum(keep & (argmax == t))
    return jnp.where(n > 0, hits / jnp.maximum(n, 1), 0).astype(dtype)


def row_entropy(zp: Any, lse: Any) -> jax.Array:
    """H_n = -sum_c p_nc (z'_nc - lse_n) of (rows, C) transformed logits (= lse_n - sum_c p_nc
    z'_nc, written relative to lse so that no derivative passes through a term of the size
    of the logits: with logits near 1e38, lse - sum p z' cancelled the other statistics'
    derivatives away); a class of probability 0 (a -inf logit) contributes 0, value and
    derivative."""
    d = zp - lse[:, None]
    p = jnp.exp(d)
    live = p > 0
    return -jnp.where(live, p * jnp.where(live, d, 0.0), 0.0).sum(axis=1)


def reference_stats(
    x: Any,
    t: Any,
    *,
    probs: bool,
    ignore_index: int,
    softcap: float,
    logit_scale: float,
) -> "dict[str, jax.Array]":
    """The float per-row outputs of ``outputs=`` (lse, entropy, and target_logprob for class
    targets: 0 on ignored rows, whose logits reach nothing), of logits whose class axis is the
    last, each of the rows' shape: what the derivatives of the kernel's statistics
    differentiate."""
    rows_shape, C = x.shape[:-1], x.shape[-1]
    z = x.reshape(-1, C)
    if np.dtype(z.dtype) in _HALF:
        z = z.astype(jnp.float32)  # computed in float32, as the kernel does
    # A row of all -inf (values: the kernel's limits, e.g. entropy log C) has derivative 0,
    # not the NaN of -inf - (-inf), which a zero cotangent would not cancel; without a
    # softcap, also a row of finite logits that the scale takes to -inf (as the kernel).
    zs = jax.lax.stop_gradient(z if softcap > 0 else logit_scale * z)
    z = jnp.where(jnp.all(zs == -jnp.inf, axis=1, keepdims=True), 0.0, z)

    def transform(v: Any) -> Any:
        return softcap * jnp.tanh(logit_scale * v / softcap) if softcap > 0 else logit_scale * v

    zp = transform(z)
    lse = jax.nn.logsumexp(zp, axis=1)
    out = {"lse": lse, "entropy": row_entropy(zp, lse)}
    if not probs:
        y = t.reshape(-1)
        keep = counted_rows(y, ignore_index)
        yc = jnp.where(keep, y, 0)
        zc = transform(jnp.where(keep[:, None], z, 0.0))
        picked = jnp.take_along_axis(zc, yc[:, None], axis=1)[:, 0] - jax.nn.logsumexp(zc, axis=1)
        out["target_logprob"] = jnp.where(keep, picked, 0.0)
    return {k: v.reshape(rows_shape) for k, v in out.items()}
