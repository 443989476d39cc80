"""JAX front end of the fused linear + cross-entropy: :func:`linear_cross_entropy`, a
``jax.custom_vjp`` function usable under ``jax.jit``.

Invariants:
- The rows are taken in tiles (``lax.scan`` over the full tiles, then the remainder); per
  tile ``Z = hidden[tile] @ W.T (+ bias)`` by ``jnp.dot`` (float32 accumulation and float32
  logits for 16-bit inputs), fastxent's kernel turns Z into the tile's loss and gradient G
  on the host (``jax.pure_callback``), then ``grad_hidden[tile] = G @ W`` and
  ``grad_weight += G.T @ hidden[tile]`` by ``jnp.dot``. No N x V array.
- "mean" divides every tile by the whole batch's denominator D, computed from the targets
  and weights in JAX (or the static ``normalizer``).
- Evaluated without differentiation: the loss alone. Under ``jax.grad``: "mean"/"sum"
  compute the loss and the three gradients in one sweep (the residuals), the backward
  scales them; "none" recomputes the tiles in the backward with the rows weighted by the
  cotangent.
- 16-bit: G is rounded once to the input dtype for the gradient matmuls, which accumulate
  in float32; grad_weight and grad_bias are summed over tiles in float32, rounded once.
- Cotangents on the float statistics of outputs=: their vector-Jacobian product (jax.vjp
  of the reference formula on the tile's logits) joins each tile's G ("none": in the loss's
  backward sweep; "mean" / "sum": a sweep of its own, added to the scaled gradients).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _jax_reference, _linear
from ._api import RowStats, cross_entropy, cross_entropy_with_grad
from ._keywords import FLOAT_OUTPUTS, LINEAR, kernel_outputs, output_names

__all__ = ["linear_cross_entropy"]


def _host(
    opts: Tuple[Tuple[str, Any], ...],
    red: str,
    want_grad: bool,
    cdt: Any,
    names: Tuple[str, ...] = (),
    am_dt: Any = np.int64,
):
    kw = dict(opts, reduction=red)
    if names:
        kw["outputs"] = names

    def stats(st: Any) -> Tuple[np.ndarray, ...]:
        return tuple(np.asarray(getattr(st, n), am_dt if n == "argmax" else cdt) for n in names)

    def call(z, t, w, sw, d):
        z = np.asarray(z)
        k = dict(
            kw,
            weight=None if w is None else np.asarray(w),
            sample_weight=None if sw is None else np.asarray(sw),
        )
        if red == "mean":
            k["normalizer"] = float(d)
        if want_grad:
            loss, g, *st = cross_entropy_with_grad(z, np.asarray(t), **k)
            return (np.asarray(loss, cdt), g.astype(cdt, copy=False)) + (
                stats(st[0]) if names else ()
            )
        res = cross_entropy(z, np.asarray(t), **k)
        if names:
            return (np.asarray(res[0], cdt),) + stats(res[1])
        return np.asarray(res, cdt)

    return call


def _stats_vjp(opts, z, t_t, cts: dict, g: Optional[jax.Array] = None) -> jax.Array:
    """g (the tile's loss gradient; None: zeros) plus the vector-Jacobian product of the
    tile's float statistics (the reference formula, in the logits' dtype: float32 for 16-bit
    inputs) with the cotangents `cts` (name -> the tile's rows; absent ones 0). In blocks of
    rows of at most _linear.STAT_BLOCK logits, each added into g in place (a fori_loop whose
    carry is g, then the remainder), so that the formula's temporaries stay small beside the
    tile and no second tile-sized array is made."""
    m, v = z.shape
    step = max(1, _linear.STAT_BLOCK // max(v, 1))
    if g is None:
        g = jnp.zeros_like(z)
    full = (m // step) * step

    def add_block(g, i, k):  # rows [i, i + k) of g gain their block's product
        zb = jax.lax.dynamic_slice_in_dim(z, i, k)
        tb = jax.lax.dynamic_slice_in_dim(t_t, i, k)
        cb = {n: jax.lax.dynamic_slice_in_dim(c, i, k) for n, c in cts.items()}
        gb = jax.lax.dynamic_slice_in_dim(g, i, k) + _stats_vjp_block(opts, zb, tb, cb)
        return jax.lax.dynamic_update_slice_in_dim(g, gb.astype(g.dtype), i, 0)

    if full:
        g = jax.lax.fori_loop(0, full // step, lambda j, g: add_block(g, j * step, step), g)
    if m > full:
        g = add_block(g, full, m - full)
    return g


def _stats_vjp_block(opts, z, t_t, cts: dict) -> jax.Array:
    o = dict(opts)
    probs = jnp.issubdtype(t_t.dtype, jnp.floating)

    def stats(zz):
        return _jax_reference.reference_stats(
            zz,
            t_t,
            probs=bool(probs),
            ignore_index=o["ignore_index"],
            softcap=float(o["softcap"] or 0.0),
            logit_scale=float(o["logit_scale"]),
        )

    out, vjp = jax.vjp(stats, z)
    (gz,) = vjp(
        {k: cts[k].astype(v.dtype) if k in cts else jnp.zeros_like(v) for k, v in out.items()}
    )
    return gz


def _sweep(
    opts,
    red: str,
    tile: int,
    want_grad: bool,
    h2,
    w_lin,
    b,
    t,
    cw,
    sw,
    d,
    names=(),
    stat_ct: Optional[dict] = None,
    loss_grad: bool = True,
):
    """The tile loop: (loss, grad_hidden (n, h), grad_weight, grad_bias, stats) (grads
    None when not wanted); loss summed over tiles, or the (n,) rows for "none"; stats: the
    (n,) per-row outputs of `names` (kernel statistics), a tuple in that order.
    `stat_ct` (a backward through the float statistics: name -> (n,) cotangents): each
    tile's gradient gets their vector-Jacobian product (_stats_vjp) before the gradient
    matmuls; `loss_grad` False: that product alone (no kernel call, loss 0)."""
    n, hdim = h2.shape
    v = w_lin.shape[0]
    dt = h2.dtype
    cdt = jnp.float64 if dt == jnp.float64 else jnp.float32
    am_dt = jax.dtypes.canonicalize_dtype(np.int64)
    host = _host(opts, red, want_grad, np.dtype(cdt), names, am_dt)

    def step(carry, xs):
        h_t, t_t, sw_t, ct_t = xs
        z = jnp.dot(h_t, w_lin.T, preferred_element_type=cdt)
        if b is not None:
            z = z + b.astype(cdt)
        m = h_t.shape[0]
        lshape = jax.ShapeDtypeStruct((m,) if red == "none" else (), cdt)
        if ct_t is not None and not loss_grad:  # the statistics' gradient alone
            g = _stats_vjp(opts, z, t_t, ct_t)
            return _grad_step(carry, g, h_t, jnp.zeros(lshape.shape, cdt), ())
        sshapes = tuple(jax.ShapeDtypeStruct((m,), am_dt if k == "argmax" else cdt) for k in names)
        if not want_grad:
            res = jax.pure_callback(
                host, (lshape,) + sshapes, z, t_t, cw, sw_t, d, vmap_method="sequential"
            )
            return carry, (res[0], None, tuple(res[1:]))
        loss, g, *st = jax.pure_callback(
            host,
            (lshape, jax.ShapeDtypeStruct(z.shape, cdt)) + sshapes,
            z,
            t_t,
            cw,
            sw_t,
            d,
            vmap_method="sequential",
        )
        if ct_t is not None:
            g = _stats_vjp(opts, z, t_t, ct_t, g)
        return _grad_step(carry, g, h_t, loss, tuple(st))

    def _grad_step(carry, g, h_t, loss, st):
        gw, gb = carry
        g16 = g.astype(dt)
        gh = jnp.dot(g16, w_lin, preferred_element_type=cdt).astype(dt)
        gw = gw + jnp.dot(g16.T, h_t, preferred_element_type=cdt)
        gb = gb + g.sum(0)
        return (gw, gb), (loss, gh, st)

    carry: Any = (jnp.zeros((v, hdim), cdt), jnp.zeros((v,), cdt)) if want_grad else None
    full = (n // tile) * tile
    outs: Any = []
    if full:

        def tiles(a):
            return None if a is None else a[:full].reshape((full // tile, tile) + a.shape[1:])

        carry, (ls, ghs, sts) = jax.lax.scan(
            step, carry, (tiles(h2), tiles(t), tiles(sw), _map(tiles, stat_ct))
        )
        outs.append(
            (
                ls.reshape(-1) if red == "none" else ls.sum(),
                None if ghs is None else ghs.reshape(full, hdim),
                tuple(s.reshape(-1) for s in sts),
            )
        )
    if n > full or not full:

        def rest(a):
            return None if a is None else a[full:]

        carry, (lr, ghr, str_) = step(carry, (rest(h2), rest(t), rest(sw), _map(rest, stat_ct)))
        outs.append((lr, ghr, str_))
    if red == "none":
        loss = jnp.concatenate([o[0] for o in outs])
    else:
        loss = sum(o[0] for o in outs)
    stats = tuple(jnp.concatenate([o[2][i] for o in outs]) for i in range(len(names)))
    if not want_grad:
        return loss, None, None, None, stats
    gh = jnp.concatenate([o[1] for o in outs]) if len(outs) > 1 else outs[0][1]
    gw, gb = carry
    return loss, gh, gw.astype(dt), None if b is None else gb.astype(dt), stats


def _map(f, cts: Optional[dict]) -> Optional[dict]:
    return None if cts is None else {k: f(c) for k, c in cts.items()}


def _rows(h: jax.Array) -> jax.Array:
    """(..., H) as (rows, H); not reshape(-1, H): -1 is undefined for H = 0."""
    return h.reshape(math.prod(h.shape[:-1]), h.shape[-1])


@functools.lru_cache(maxsize=128)
def _make(
    opts: Tuple[Tuple[str, Any], ...], tile: int, has_bias: bool, names: Tuple[str, ...] = ()
):
    """The custom_vjp function: the loss, or with `names` (kernel statistics) (loss,
    *statistics of the rows' shape); cotangents on the float statistics are
    differentiated through (see _sweep's stat_ct)."""
    red = dict(opts)["reduction"]

    def pack(h, loss, stats):
        loss = loss.reshape(h.shape[:-1]) if red == "none" else loss
        if not names:
            return loss
        return (loss,) + tuple(s.reshape(h.shape[:-1]) for s in stats)

    def loss_of(h, w, b, t, cw, sw, d):
        h2 = _rows(h)
        res = _sweep(opts, red, tile, False, h2, w, b if has_bias else None, t, cw, sw, d, names)
        return pack(h, res[0], res[4])

    @jax.custom_vjp
    def f(h, w, b, t, cw, sw, d):
        return loss_of(h, w, b, t, cw, sw, d)

    def fwd(*args):
        # symbolic_zeros: each argument says whether it is being differentiated. The
        # gradients of the target, class weights, sample weights and normalizer are not
        # computed; asking for one raises rather than returning zeros.
        for name, a in (
            ("target", args[3]),
            ("weight", args[4]),
            ("sample_weight", args[5]),
            ("normalizer", args[6]),
        ):
            if a is not None and a.perturbed:
                raise TypeError(
                    f"fastxent.jax.linear_cross_entropy differentiates with respect to "
                    f"hidden, linear_weight and linear_bias only; {name} is being "
                    f"differentiated (wrap it in jax.lax.stop_gradient if it is a constant)"
                )
        h, w, b, t, cw, sw, d = (None if a is None else a.value for a in args)
        if red == "none":
            return loss_of(h, w, b, t, cw, sw, d), (h, w, b, t, cw, sw, d, None)
        h2 = _rows(h)
        loss, gh, gw, gb, stats = _sweep(
            opts, red, tile, True, h2, w, b if has_bias else None, t, cw, sw, d, names
        )
        return pack(h, loss, stats), (h, w, b, t, cw, sw, d, (gh, gw, gb))

    def bwd(res, ct):
        h, w, b, t, cw, sw, d, grads = res
        sc = None
        if names:
            ct, stat_cts = ct[0], ct[1:]
            sc = {
                k: c.reshape(-1)
                for k, c in zip(names, stat_cts)
                if k in FLOAT_OUTPUTS and not isinstance(c, jax.custom_derivatives.SymbolicZero)
            } or None
        zero = isinstance(ct, jax.custom_derivatives.SymbolicZero)
        if zero and sc is None:
            return None, None, None, None, None, None, None
        args = (_rows(h), w, b if has_bias else None, t, cw)
        if zero:  # the statistics alone
            _, gh, gw, gb, _ = _sweep(
                opts, red, tile, True, *args, sw, d, stat_ct=sc, loss_grad=False
            )
        elif grads is None:  # "none": the rows weighted by the cotangent, recomputed
            s = ct.reshape(-1).astype(d.dtype)
            s = s if sw is None else s * sw
            _, gh, gw, gb, _ = _sweep(opts, "sum", tile, True, *args, s, d, stat_ct=sc)
        else:
            c = ct.astype(grads[0].dtype)
            gh, gw, gb = (None if g is None else (g * c).astype(g.dtype) for g in grads)
            if sc is not None:  # plus the statistics' sweep
                _, sh, sw_, sb, _ = _sweep(
                    opts, red, tile, True, *args, sw, d, stat_ct=sc, loss_grad=False
                )
                gh, gw = gh + sh, gw + sw_
                gb = None if gb is None else gb + sb
        return (gh.reshape(h.shape), gw, gb if has_bias else None, None, None, None, None)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def linear_cross_entropy(
    hidden: Any,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    weight: Any = None,
    sample_weight: Any = None,
    tile_rows: Optional[int] = None,
    **options: Any,
) -> jax.Array:
    """The loss of ``fastxent.jax.cross_entropy(hidden @ linear_weight.T + linear_bias,
    target, ...)`` (see :func:`fastxent.linear_cross_entropy`), differentiable with respect
    to hidden, linear_weight and linear_bias, usable under ``jax.jit`` and ``jax.grad``.
    Options are static Python numbers, all of them (a traced label_smoothing or normalizer,
    which fastxent.jax.cross_entropy takes through its custom call, is a TypeError here, as
    any traced option); weight and sample_weight are traced, not differentiated:
    differentiating with respect to them or to a probability target raises TypeError. Class
    indices are checked when the kernel runs (an out-of-range one is a runtime error).

    ``entropy_coef`` and ``outputs`` are those of :func:`fastxent.linear_cross_entropy`: the
    entropy term is in the loss and every gradient; with ``outputs`` the function returns
    ``(loss, fastxent.RowStats)`` of arrays (argmax int32, or int64 under x64; accuracy a
    0-d array). lse, entropy and target_logprob are differentiable with respect to hidden,
    linear_weight and linear_bias: the backward adds their vector-Jacobian product (the
    reference formula, by jax.vjp on each recomputed tile of logits) to each tile's
    gradient before the gradient matmuls; with "mean" / "sum" in a second sweep."""
    from .jax import _static  # (here: fastxent.jax imports this module)

    outputs = options.pop("outputs", None)  # a tuple or list of names, checked below
    options = {k: _static(v, k) for k, v in options.items()}
    h = jnp.asarray(hidden)
    w = jnp.asarray(linear_weight)
    b = None if linear_bias is None else jnp.asarray(linear_bias)
    t = jnp.asarray(target)
    # weight and sample_weight are this function's own (traced) arguments: never in options.
    kw = LINEAR.bind("linear_cross_entropy", options)
    red = kw.pop("reduction")
    kw.pop("outputs")
    names = None if outputs is None else output_names(outputs)
    hdt, wdt = np.dtype(h.dtype), np.dtype(w.dtype)
    _linear.shape_checks(
        tuple(h.shape),
        hdt,
        tuple(w.shape),
        wdt,
        None if b is None else tuple(b.shape),
        None if b is None else np.dtype(b.dtype),
    )
    lead, v = tuple(h.shape[:-1]), w.shape[0]
    n = int(np.prod(lead, dtype=np.int64))
    cdt = np.dtype(np.float64) if hdt == np.float64 else np.dtype(np.float32)
    probs = jnp.issubdtype(t.dtype, jnp.floating)
    if t.shape != (lead + (v,) if probs else lead):
        raise ValueError(
            f"target has shape {t.shape}, expected {lead} (class indices) or "
            f"{lead + (v,)} (probabilities)"
        )
    if not probs and not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"target must hold class indices or probabilities, got {t.dtype}")
    if sample_weight is not None and tuple(np.shape(sample_weight)) != lead:
        raise ValueError(f"sample_weight has shape {np.shape(sample_weight)}, expected {lead}")
    opts_kw = {k: kw[k] for k in kw if k not in ("weight", "sample_weight")}
    _linear.check_options(
        v,
        cdt,
        bool(probs),
        red,
        dict(opts_kw, weight=None if weight is None else np.ones(np.shape(weight), cdt)),
        sample_weight is not None,
        names,
    )
    cw = None if weight is None else jnp.asarray(weight).astype(cdt)
    sw = None if sample_weight is None else jnp.asarray(sample_weight).astype(cdt).reshape(-1)
    t = t.reshape((n, v)).astype(cdt) if probs else t.reshape(n)
    ii = opts_kw["ignore_index"]
    if red != "mean" or opts_kw["normalizer"] is not None:
        d = jnp.asarray(1.0 if opts_kw["normalizer"] is None else opts_kw["normalizer"], cdt)
    elif probs:
        d = jnp.asarray(n, cdt) if sw is None else sw.sum()
    else:
        counted = _jax_reference.counted_rows(t, ii)
        per = jnp.ones(n, cdt) if sw is None else sw
        if cw is not None:
            per = per * cw[jnp.where(counted, t, 0)]
        d = jnp.where(counted, per, 0).sum()
    tile = _linear.tile_rows(max(n, 1), v, cdt.itemsize, tile_rows)
    opts = tuple(sorted((k, val) for k, val in opts_kw.items() if k != "normalizer"))
    if names is None:
        f = _make(opts + (("reduction", red),), tile, b is not None)
        return f(h, w, b, t, cw, sw, d).astype(h.dtype)
    want = kernel_outputs(names)
    if not want:  # outputs=(): the plain loss and an empty RowStats, as NumPy's
        f = _make(opts + (("reduction", red),), tile, b is not None)
        return f(h, w, b, t, cw, sw, d).astype(h.dtype), RowStats()
    f = _make(opts + (("reduction", red),), tile, b is not None, want)
    loss, *stats = f(h, w, b, t, cw, sw, d)
    got = dict(zip(want, stats))
    fields = {k: got[k] for k in names if k != "accuracy"}
    if "accuracy" in names:
        fields["accuracy"] = _jax_reference.accuracy(got["argmax"], t.reshape(lead), ii, cdt)
    return loss.astype(h.dtype), RowStats(**fields)
