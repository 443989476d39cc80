"""JAX front end of the distillation losses from hidden states and head weights:
:func:`linear_kl_div` and :func:`linear_jsd` (those of :mod:`fastxent._distill_linear`), a
``jax.custom_vjp`` function usable under ``jax.jit``.

Invariants:
- The rows are taken in tiles (``lax.scan`` over the full tiles, then the remainder; the tile
  size is the NumPy version's, for two logits tiles); per tile ``Zs = hs[tile] @ Ws.T (+ bs)``
  and ``Zt = ht[tile] @ Wt.T (+ bt)`` by ``jnp.dot`` (accumulating in the inputs' dtype,
  float32 or float64; float32 for 16-bit inputs), the dense distillation kernel
  (:func:`fastxent._jax_distill.kernel`: the XLA custom call when the FFI is enabled, the
  NumPy API through ``jax.pure_callback`` otherwise) turns them into the tile's loss and
  student gradient G, then ``grad_hs[tile] = G @ Ws``, ``grad_Ws += G.T @ hs[tile]``,
  ``grad_bs += G.sum(0)``. No N x V array.
- "mean" is "sum" with the row weights (labels / ignore_index, mask, sample_weight; 1 for
  every row when none is given) divided by their sum over the whole batch, computed in JAX
  before the loop (as fastxent._distill_linear.run; a sum of 0 leaves the weights, all 0).
- Evaluated without differentiation: the loss alone. Under ``jax.grad``: "mean"/"sum"
  compute the loss and the wanted student gradients in one sweep (the residuals), the
  backward scales them; "none" recomputes the tiles in the backward and scales each row of
  G by its cotangent.
- The teacher's head is frozen: differentiating with respect to teacher_hidden,
  teacher_weight, teacher_bias or sample_weight is a TypeError at trace time (the
  ``custom_vjp``'s symbolic zeros tell which inputs are differentiated), never zeros.
  Forward mode (``jax.jvp``) is JAX's TypeError for a custom_vjp function; second order is
  the TypeError of the tile kernel's tangent rule (reached only when the sweep itself is
  differentiated). Under ``jax.vmap`` each batch element is
  its own problem (its own "mean" denominator).
- float32, float64, float16 and bfloat16; 16-bit inputs: the logits tiles, the kernel and G
  in float32 (``jnp.dot`` reads the 16-bit inputs, accumulates in float32), G rounded once
  for the gradient matmuls, grad_Ws / grad_bs summed in float32 and rounded once. Every check
  is the NumPy version's, at trace time.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _distill, _distill_linear, _jax_distill
from ._linear_plan import tile_rows as _tile_rows
from ._options import reduction_code, threads

__all__ = ["linear_kl_div", "linear_jsd"]

_NAMES = ("student_hidden", "student_weight", "student_bias")


def _jax_array(v: Any, name: str) -> jax.Array:
    return _distill_linear.check_dtype(jnp.asarray(v), name)


@functools.lru_cache(maxsize=256)
def _kernel(attrs, grad: bool, ffi: bool):
    """_jax_distill.kernel for a tile, as a custom_jvp whose tangent rule raises: reached
    only when the sweep itself is differentiated (second order), where the kernel's own
    error would name a custom call or a callback rather than the limit."""

    @jax.custom_jvp
    def k(zs, zt, w):
        return _jax_distill.kernel(attrs, grad, ffi, zs, zt, w)

    def jvp(primals, tangents):
        raise TypeError(
            "fastxent.jax.linear_kl_div / linear_jsd have first-order reverse-mode gradients "
            "only: second and higher order (jax.hessian, jax.grad of a gradient, "
            "Hessian-vector products) are not supported"
        )

    k.defjvp(jvp)
    return k


def _sweep(
    attrs, ffi: bool, tile: int, want: Tuple[bool, bool, bool], hs, ws, bs, ht, wt, bt, w, scale
):
    """The tile loop over the (n, H) rows: (loss, grad_hs (n, H), grad_Ws, grad_bs), the
    gradients None where not wanted; the loss summed over tiles, or the (n,) rows for "none"
    (attrs' reduction: 0 or 1). w: (n,) row weights or an empty array; scale: (n,) factors of
    the rows of G (the cotangent of "none"), or None."""
    n = hs.shape[0]
    dt = hs.dtype
    # 16-bit inputs: logits tiles, kernel, G and the weight / bias sums in float32 (the
    # matmuls read the 16-bit inputs and accumulate in float32), G rounded once to the
    # input dtype for the gradient matmuls, the sums rounded once at the end
    cdt = jnp.float32 if np.dtype(dt).itemsize == 2 else dt
    grad = any(want)
    none = int(dict(attrs)["reduction"]) == 0
    rows_w = w.shape[0] != 0

    def step(carry, xs):
        hs_t, ht_t, w_t, sc_t = xs
        zs = jnp.dot(hs_t, ws.T, preferred_element_type=cdt)
        if bs is not None:
            zs = zs + bs.astype(cdt)
        zt = jnp.dot(ht_t, wt.T, preferred_element_type=cdt)
        if bt is not None:
            zt = zt + bt.astype(cdt)
        wk = w_t if rows_w else w
        if not grad:
            return carry, (_kernel(attrs, False, ffi)(zs, zt, wk), None)
        loss, g = _kernel(attrs, True, ffi)(zs, zt, wk)
        if sc_t is not None:
            g = g * sc_t.astype(cdt)[:, None]
        gw, gb = carry
        g16 = g.astype(dt)
        gh = jnp.dot(g16, ws, preferred_element_type=cdt).astype(dt) if want[0] else None
        if want[1]:
            gw = gw + jnp.dot(g16.T, hs_t, preferred_element_type=cdt)
        if want[2]:
            gb = gb + g.sum(0)
        return (gw, gb), (loss, gh)

    carry: Any = (
        jnp.zeros(ws.shape, cdt) if want[1] else None,
        jnp.zeros(ws.shape[:1], cdt) if want[2] else None,
    )
    xs = (hs, ht, w if rows_w else None, scale)
    full = (n // tile) * tile
    outs: Any = []
    if full:

        def tiles(a):
            return None if a is None else a[:full].reshape((full // tile, tile) + a.shape[1:])

        carry, (ls, ghs) = jax.lax.scan(step, carry, tuple(tiles(a) for a in xs))
        outs.append(
            (
                ls.reshape(-1) if none else ls.sum(),
                None if ghs is None else ghs.reshape(full, hs.shape[1]),
            )
        )
    if n > full or not full:
        carry, out = step(carry, tuple(None if a is None else a[full:] for a in xs))
        outs.append(out)
    loss = jnp.concatenate([o[0] for o in outs]) if none else sum(o[0] for o in outs)
    gh = None
    if want[0]:
        gh = jnp.concatenate([o[1] for o in outs]) if len(outs) > 1 else outs[0][1]
    gw, gb = (None if c is None else c.astype(dt) for c in carry)
    return loss, gh, gw, gb


def _static(flags: Tuple[bool, ...]) -> Tuple[Any, ...]:
    """Python bools as a residual's pytree structure (() or None: no leaves), not as arrays."""
    return tuple(() if x else None for x in flags)


@functools.lru_cache(maxsize=128)
def _make(attrs, tile: int, lead: Tuple[int, ...], ffi: bool):
    """The custom_vjp loss for one set of static options (cached: a stable callee for jit).
    attrs: the kernel's, reduction 0 ("none") or 1 ("sum"; "mean" through its weights); ffi:
    the custom call (else pure_callback)."""
    none = int(dict(attrs)["reduction"]) == 0

    def flat(h):
        # (not reshape(-1, H): -1 is undefined for a hidden size of 0)
        return h.reshape(math.prod(h.shape[:-1]), h.shape[-1])

    def run(want, hs, ws, bs, ht, wt, bt, w, scale=None):
        return _sweep(attrs, ffi, tile, want, flat(hs), ws, bs, flat(ht), wt, bt, w, scale)

    def shaped(loss, dt):
        return (loss.reshape(lead) if none else loss).astype(dt)

    def primal(hs, ws, bs, ht, wt, bt, w):
        return shaped(run((False, False, False), hs, ws, bs, ht, wt, bt, w)[0], hs.dtype)

    @jax.custom_vjp
    def f(hs, ws, bs, ht, wt, bt, w):
        return primal(hs, ws, bs, ht, wt, bt, w)

    def fwd(*args):
        for name, a in zip(("teacher_hidden", "teacher_weight", "teacher_bias"), args[3:6]):
            if a is not None and a.perturbed:
                raise TypeError(
                    f"fastxent.jax.linear_kl_div / linear_jsd: {name} is being "
                    "differentiated, but the teacher's head is frozen: no gradient flows to "
                    f"it (wrap it in jax.lax.stop_gradient)"
                )
        if args[6].perturbed:
            raise TypeError(
                "fastxent.jax.linear_kl_div / linear_jsd differentiate with respect to "
                "student_hidden, student_weight and student_bias only; sample_weight is being "
                "differentiated (wrap it in jax.lax.stop_gradient if it is a constant)"
            )
        want = tuple(a is not None and a.perturbed for a in args[:3])
        vals = tuple(None if a is None else a.value for a in args)
        if none:
            return primal(*vals), (vals, _static(want), None)
        loss, gh, gw, gb = run(want, *vals)
        return shaped(loss, vals[0].dtype), (None, _static(want), (gh, gw, gb))

    def bwd(res, ct):
        vals, want, grads = res
        want = tuple(x is not None for x in want)
        if isinstance(ct, jax.custom_derivatives.SymbolicZero):
            return (None,) * 7
        if grads is None:  # "none": G recomputed, its rows scaled by the cotangent
            _, gh, gw, gb = run(want, *vals, scale=ct.reshape(-1))
        else:
            gh, gw, gb = (None if g is None else g * ct.astype(g.dtype) for g in grads)
        gh = None if gh is None else gh.reshape(lead + gh.shape[-1:])
        return (gh, gw, gb, None, None, None, None)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def _apply(arrays: Tuple[Any, ...], divergence: int, beta: float, kw: dict) -> jax.Array:
    # --- every check of the NumPy version, in its order, before anything is traced
    hs, ws, ht, wt, bs, bt = _distill_linear.check_inputs(*arrays, as_array=_jax_array)
    tau = _distill._temperature(kw["temperature"], _jax_distill._static_real)
    red = reduction_code(kw["reduction"])
    nt = threads(kw["num_threads"])
    lead = tuple(hs.shape[:-1])
    rw = _jax_distill._row_weight(
        lead, kw["labels"], kw["ignore_index"], kw["mask"], kw["sample_weight"]
    )
    v = ws.shape[0]
    n = int(np.prod(lead, dtype=np.int64))
    # (16-bit inputs: float32 tiles)
    tile = _tile_rows(max(n, 1), v, 2 * max(4, np.dtype(hs.dtype).itemsize), kw["tile_rows"])

    # --- row weights: "mean" is "sum" with the weights divided by the whole batch's sum
    wdt = jnp.float64 if _jax_distill._x64() else jnp.float32
    if red == 2:
        w = jnp.ones((n,), wdt) if rw is None else rw
        w = _jax_distill.mean_weights(w).astype(wdt)
    else:
        w = jnp.zeros((0,), wdt) if rw is None else rw
    attrs = _jax_distill.attributes(divergence, beta, tau, 0 if red == 0 else 1, nt)
    f = _make(attrs, tile, lead, _jax_distill._jax_ffi.enabled())
    return f(hs, ws, bs, ht, wt, bt, w)


def linear_kl_div(
    student_hidden: Any,
    student_weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    direction: str = "forward",
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    tile_rows: Optional[int] = None,
) -> jax.Array:
    divergence = _distill._direction(direction)
    kw = _distill_linear.call_kw(temperature, reduction, labels, ignore_index, mask,
                                 sample_weight, num_threads, tile_rows)  # fmt: skip
    arrays = (student_hidden, student_weight, teacher_hidden, teacher_weight,
              student_bias, teacher_bias)  # fmt: skip
    return _apply(arrays, divergence, 0.5, kw)


def linear_jsd(
    student_hidden: Any,
    student_weight: Any,
    teacher_hidden: Any,
    teacher_weight: Any,
    *,
    student_bias: Any = None,
    teacher_bias: Any = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    labels: Any = None,
    ignore_index: int = -100,
    mask: Any = None,
    sample_weight: Any = None,
    num_threads: Optional[int] = None,
    tile_rows: Optional[int] = None,
) -> jax.Array:
    b = _distill._beta(beta, _jax_distill._static_real)
    kw = _distill_linear.call_kw(temperature, reduction, labels, ignore_index, mask,
                                 sample_weight, num_threads, tile_rows)  # fmt: skip
    arrays = (student_hidden, student_weight, teacher_hidden, teacher_weight,
              student_bias, teacher_bias)  # fmt: skip
    return _apply(arrays, 2, b, kw)


_JAX_NOTES = """
    JAX specifics: jit-compatible; differentiable (``jax.grad``, ``jax.value_and_grad``,
    ``jax.vjp``) with respect to student_hidden, student_weight and student_bias, first order,
    reverse mode. "mean" / "sum" compute the loss and the differentiated student gradients in
    one sweep over the row tiles; "none" computes the row losses, and its backward sweeps the
    tiles again with each row's gradient scaled by its cotangent. Per tile the logits come from
    ``jnp.dot`` and the kernel runs as the XLA custom call of
    :func:`fastxent.jax.kl_div_with_logits` (or, without the XLA FFI, the NumPy API through
    ``jax.pure_callback``): the N x V logits never exist.

    Refused with a TypeError at trace time, never zeros: differentiating with respect to
    teacher_hidden, teacher_weight or teacher_bias (the teacher's head is frozen: wrap a
    traced teacher in ``jax.lax.stop_gradient``) or sample_weight; forward mode (``jax.jvp``,
    ``jax.jacfwd``: JAX's error for a ``custom_vjp`` function) and second order
    (``jax.hessian``, ``jax.grad`` of a gradient: the tile kernel's tangent rule). Under
    ``jax.vmap`` each batch element is its own problem (its own "mean" denominator). The
    options (``direction``, ``beta``, ``temperature``, ``reduction``, ``ignore_index``,
    ``num_threads``, ``tile_rows``) are static Python values; ``labels``, ``mask`` and
    ``sample_weight`` may be traced. float64 needs JAX's x64 mode (without the XLA FFI, set
    globally: under the ``jax.enable_x64`` context manager a ``pure_callback`` that XLA runs
    on another thread sees x64 off and refuses the float64 result, a JAX error).
"""


def _doc(numpy_doc: str) -> str:
    return (
        numpy_doc.replace(
            ":func:`fastxent.kl_div_with_logits`", ":func:`fastxent.jax.kl_div_with_logits`"
        ).replace(":func:`fastxent.jsd_with_logits`", ":func:`fastxent.jax.jsd_with_logits`")
        + "\n"
        + _JAX_NOTES
    )


linear_kl_div.__doc__ = _doc(_distill_linear.linear_kl_div.__doc__ or "")
linear_jsd.__doc__ = _doc(_distill_linear.linear_jsd.__doc__ or "")
