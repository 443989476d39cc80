"""optax-shaped drop-ins of fastxent.jax (re-exported there): the signatures and per-example
outputs of ``optax.softmax_cross_entropy_with_integer_labels`` and
``optax.softmax_cross_entropy``, computed by :func:`fastxent.jax.cross_entropy`.
Derivatives are those of :func:`fastxent.jax.cross_entropy` (the labels included).

``where`` of the examples' shape (one flag per row) excludes rows: their loss and gradient
are 0, as optax's. A ``where`` of the logits' shape masks single classes, which the kernel
does not do: that case is computed in plain jnp (a masked log-sum-exp), like optax.

Differences from optax (deliberate, from fastxent's contract): a class index equal to -100
is ignored (loss 0), and any other index outside ``[0, C)`` raises instead of being clamped.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp

from . import jax as _fxj


def _axis(axis: Any, ndim: int) -> int:
    try:
        a = operator.index(axis)
    except TypeError:
        raise TypeError(
            f"axis must be an int (fastxent reads one class axis), got {type(axis).__name__}"
        ) from None
    if not -ndim <= a < ndim:
        raise ValueError(f"axis {axis} is out of bounds for logits with {ndim} dimensions")
    return a % ndim


def _row_mask(where: Any, logits: jax.Array, axis: int):
    """(per-row bool mask or None, per-class mask or None) from optax's ``where``."""
    if where is None:
        return None, None
    w = jnp.asarray(where, bool)
    rows = logits.shape[:axis] + logits.shape[axis + 1 :]
    if w.ndim == logits.ndim:
        return None, jnp.broadcast_to(w, logits.shape)
    return jnp.broadcast_to(w, rows), None


def _masked_log_softmax_parts(z: jax.Array, cls: jax.Array, axis: int):
    lse = jax.nn.logsumexp(z, axis=axis, where=cls, keepdims=True)
    return z - lse


def softmax_cross_entropy_with_integer_labels(
    logits: Any, labels: Any, axis: Any = -1, where: Any = None
) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, as
    ``optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis, where)``: the
    shape of ``labels``, the logits' dtype, differentiable with respect to the logits.
    ``where`` (optional): a bool array of the labels' shape (rows left out: loss 0, gradient
    0) or of the logits' shape (classes left out of the softmax). A label of -100 is ignored
    (loss 0); any other label outside ``[0, C)`` raises."""
    z = jnp.asarray(logits)
    a = _axis(axis, z.ndim)
    y = jnp.asarray(labels)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {y.dtype}")
    rows, cls = _row_mask(where, z, a)
    if cls is not None:
        logp = _masked_log_softmax_parts(z, cls, a)
        picked = jnp.take_along_axis(logp, jnp.expand_dims(y, a), axis=a).squeeze(a)
        return jnp.where(jnp.any(cls, axis=a), -picked, 0).astype(z.dtype)
    if rows is not None:
        y = jnp.where(rows, y, -100)
    return _fxj.cross_entropy(z, y, axis=a, reduction="none")


def softmax_cross_entropy(logits: Any, labels: Any, axis: Any = -1, where: Any = None) -> jax.Array:
    """Per-example softmax cross-entropy with probability (e.g. one-hot) labels of the
    logits' shape, as ``optax.softmax_cross_entropy(logits, labels, axis, where)``: the
    examples' shape, the logits' dtype, differentiable with respect to the logits and, through
    the XLA FFI, the labels (the pure_callback fallback raises TypeError for the labels).
    ``where`` as in :func:`softmax_cross_entropy_with_integer_labels`."""
    z = jnp.asarray(logits)
    a = _axis(axis, z.ndim)
    p = jnp.asarray(labels)
    if p.shape != z.shape:
        raise ValueError(f"labels have shape {p.shape}, expected the logits' shape {z.shape}")
    rows, cls = _row_mask(where, z, a)
    if cls is not None:
        logp = _masked_log_softmax_parts(z, cls, a)
        return (-jnp.sum(p * logp, axis=a, where=cls)).astype(z.dtype)
    # Not stop_gradient: the labels' gradient is fastxent.jax.cross_entropy's (a probability
    # target is differentiable through the FFI; the pure_callback fallback raises TypeError),
    # never a silent 0.
    p = p.astype(z.dtype)
    sw = (
        None
        if rows is None
        else rows.astype(jnp.float32 if z.dtype != jnp.float64 else jnp.float64)
    )
    return _fxj.cross_entropy(z, p, axis=a, reduction="none", sample_weight=sw)
