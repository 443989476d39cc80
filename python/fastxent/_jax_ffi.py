"""fastxent.jax through XLA's FFI: the kernel as an XLA custom call (CPU).

The handlers (cpp/ffi/xla_handlers.cpp, submodule ``fastxent._core.xla_ffi``) read XLA's operand
buffers and write its result buffers in place: no host callback, no copy, no GIL. This module
registers them with JAX and builds the ``custom_vjp`` function that :mod:`fastxent.jax` uses
when :func:`enabled` is true. Otherwise (a fastxent built without jaxlib's FFI headers, a
jaxlib older than the one it was built against, or ``FASTXENT_JAX_FFI=0`` in the environment)
fastxent.jax keeps its ``jax.pure_callback`` path.

Operands of the custom call: logits (their own dtype, float16/bfloat16 included), target
(class indices of any integer dtype, or probabilities in the logits' dtype), weight and
sample_weight (the compute dtype: float32 for 16-bit logits; empty when absent), and three
scalars (label smoothing, normalizer, entropy_coef) read only when given as traced values;
static options are attributes. ``fastxent_ce_stats`` also returns the per-row outputs of
``outputs=`` (lse, entropy, argmax, target_logprob; 0 elements where not asked for) and
computes the gradient only when its result has the logits' shape. Under ``jax.vmap`` the
batch dims lead every operand (``vmap_method="broadcast_all"``) and the handler runs each
batch element as its own problem: one custom call for the whole batch.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Dict, Optional, Tuple

import numpy as np

import jax
import jax.numpy as jnp

from . import _jax_reference
from ._keywords import FLOAT_OUTPUTS

_FLAG_PROBS, _FLAG_WEIGHT, _FLAG_SWEIGHT = 1, 2, 4
_FLAG_EPS_OPERAND, _FLAG_NORMALIZER, _FLAG_NORM_OPERAND = 8, 16, 32
_FLAG_BETA_OPERAND = 64
_FLOAT_STATS = FLOAT_OUTPUTS  # differentiable; argmax is not
_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
_HALF = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))

_lock = threading.Lock()
_state: Optional[bool] = None


def _version(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def enabled() -> bool:
    """True when fastxent.jax runs through the FFI handlers (registered on first use)."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _register()
    return _state


def _register() -> bool:
    env = os.environ.get("FASTXENT_JAX_FFI", "").strip()
    if env == "0":
        return False
    from . import _core

    _xla_ffi = getattr(_core, "xla_ffi", None)  # built only with jaxlib's FFI headers
    if _xla_ffi is None:
        return False
    import jaxlib

    runtime = getattr(getattr(jaxlib, "version", None), "__version__", "0")
    # Handlers compiled against a newer FFI header than the running XLA may be refused by it;
    # FASTXENT_JAX_FFI=1 forces them anyway.
    if env != "1" and _version(runtime) < _version(_xla_ffi.jaxlib_version):
        return False
    for name, capsule in _xla_ffi.handlers().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return True


def compute_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if dt in _HALF else dt


def _result(shape: Tuple[int, ...], dtype: Any, like: Any) -> Any:
    """A result type that varies over the manual (shard_map) mesh axes the logits vary over:
    each shard's call computes on its own rows."""
    t = jax.typeof(like) if hasattr(jax, "typeof") else None
    mat = getattr(t, "manual_axis_type", None)
    if mat is not None and getattr(mat, "varying", None):
        spec = jax.sharding.PartitionSpec(*([None] * len(shape)))
        sharding = jax.sharding.NamedSharding(t.sharding.mesh, spec)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding, manual_axis_type=mat)
    vma = getattr(t, "vma", None)  # the same information in JAX releases before 0.10
    if vma:
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
    return jax.ShapeDtypeStruct(shape, dtype)


def _call(want_grad: bool, attrs: Tuple[Tuple[str, Any], ...], x, t, w, sw, sc):
    a = dict(attrs)
    cdt = compute_dtype(x.dtype)
    axis = int(a["axis"])
    rows = x.shape[:axis] + x.shape[axis + 1 :]
    loss_shape = rows if int(a["reduction"]) == 0 else ()
    outs = [_result(loss_shape, cdt, x)]
    if want_grad:
        outs.append(_result(x.shape, x.dtype, x))
    empty = jnp.zeros((0,), cdt)
    # The gradient may take the logits' buffer (the kernel runs in place): where the logits
    # are an intermediate of the jitted computation (a head's matmul output) XLA then needs no
    # fresh N x C buffer for the gradient; where they are still needed (a jit parameter that
    # is not donated, or used again) XLA copies them first.
    aliases = {0: 1} if want_grad else {}
    f = jax.ffi.ffi_call(
        "fastxent_ce_grad" if want_grad else "fastxent_ce",
        tuple(outs),
        vmap_method="broadcast_all",
        input_output_aliases=aliases,
    )
    return f(
        x,
        t,
        empty if w is None else w,
        empty if sw is None else sw,
        sc,
        core_ndim=np.int64(x.ndim),
        **a,
    )


def _call_stats(want_grad: bool, attrs, want: Tuple[str, ...], x, t, w, sw, sc) -> Dict[str, Any]:
    """One fastxent_ce_stats call: {"loss", "grad" (with want_grad), and the names in `want`
    (of lse, entropy, target_logprob, argmax)}. argmax is int64 under x64, else int32."""
    a = dict(attrs)
    cdt = compute_dtype(x.dtype)
    axis = int(a["axis"])
    rows = x.shape[:axis] + x.shape[axis + 1 :]
    loss_shape = rows if int(a["reduction"]) == 0 else ()
    am_dt = jax.dtypes.canonicalize_dtype(np.int64)
    outs = [
        _result(loss_shape, cdt, x),
        _result(x.shape if want_grad else (0,), x.dtype, x),
        _result(rows if "lse" in want else (0,), cdt, x),
        _result(rows if "entropy" in want else (0,), cdt, x),
        _result(rows if "argmax" in want else (0,), am_dt, x),
        _result(rows if "target_logprob" in want else (0,), cdt, x),
    ]
    empty = jnp.zeros((0,), cdt)
    f = jax.ffi.ffi_call(
        "fastxent_ce_stats",
        tuple(outs),
        vmap_method="broadcast_all",
        input_output_aliases={0: 1} if want_grad else {},
    )
    res = f(
        x,
        t,
        empty if w is None else w,
        empty if sw is None else sw,
        sc,
        core_ndim=np.int64(x.ndim),
        **a,
    )
    names = ("loss", "grad", "lse", "entropy", "argmax", "target_logprob")
    return {n: r for n, r in zip(names, res) if n in ("loss", "grad") or n in want}


def _reference(attrs: Tuple[Tuple[str, Any], ...]):
    """The loss of one custom call's attributes as a function of its operands (x, t, w, sw,
    sc), in jax.numpy ops (_jax_reference): what derivatives beyond the kernel's go through."""
    a = dict(attrs)
    f = int(a["flags"])
    static = dict(
        probs=bool(f & _FLAG_PROBS),
        axis=int(a["axis"]),
        reduction=int(a["reduction"]),
        ignore_index=int(a["ignore_index"]),
        z_loss=float(a["z_loss"]),
        softcap=float(a["softcap"]),
        logit_scale=float(a["logit_scale"]),
    )

    def loss(x, t, w, sw, sc):
        eps = sc[0] if f & _FLAG_EPS_OPERAND else float(a["eps"])
        if f & _FLAG_NORM_OPERAND:
            norm = sc[1]
        else:
            norm = float(a["normalizer"]) if f & _FLAG_NORMALIZER else None
        beta = sc[2] if f & _FLAG_BETA_OPERAND else float(a["entropy_coef"])
        return _jax_reference.reference_loss(x, t, w, sw, eps, norm, entropy_coef=beta, **static)

    return loss


def _zero(tangent: Any) -> bool:
    return tangent is None or isinstance(tangent, jax.custom_derivatives.SymbolicZero)


@functools.lru_cache(maxsize=256)
def _make(attrs: Tuple[Tuple[str, Any], ...]):
    """The custom_jvp function for one set of attributes (cached: a stable callee for jit).

    First order with respect to the logits is the kernel's: the tangent rule runs the fused
    kernel (loss and gradient g in one call) and returns <g, dx> (per row for "none"), linear
    in dx, so JAX transposes it for reverse mode into g * cotangent (XLA drops the product
    when the cotangent is the constant 1 of value_and_grad), and forward mode (jax.jvp,
    jax.jacfwd) works as well. Every other derivative goes through the reference formula
    (_reference): the derivative of g itself (g comes from ``loss_and_grad``, a custom_jvp
    whose tangent is the reference's Hessian-vector product: second and higher order), and
    the tangents of probability targets, weights, sample weights and traced scalars."""
    a = dict(attrs)
    axis = int(a["axis"])
    none = int(a["reduction"]) == 0
    ref = _reference(attrs)

    def ref_grad(x, t, w, sw, sc):
        """The reference's gradient with respect to the logits (of the sum of the rows for
        "none", as the kernel's), in the logits' dtype."""
        g = jax.grad(lambda x: jnp.sum(ref(x, t, w, sw, sc)))(x)
        return g.astype(x.dtype)

    @jax.custom_jvp
    def loss_and_grad(x, t, w, sw, sc):
        return tuple(_call(True, attrs, x, t, w, sw, sc))

    def loss_and_grad_jvp(primals, tangents):
        out = loss_and_grad(*primals)
        _, tan = jax.jvp(lambda *p: (ref(*p), ref_grad(*p)), primals, tangents)
        return out, (tan[0].astype(out[0].dtype), tan[1].astype(out[1].dtype))

    loss_and_grad.defjvp(loss_and_grad_jvp)

    @jax.custom_jvp
    def ce(x, t, w, sw, sc):
        return _call(False, attrs, x, t, w, sw, sc)[0]

    def jvp(primals, tangents):
        x, t, w, sw, sc = primals
        dx, others = tangents[0], tangents[1:]
        moving = [i for i, d in enumerate(others, 1) if not _zero(d)]
        if _zero(dx):
            loss = ce(*primals)
            tan = jnp.zeros_like(loss)
        else:
            loss, grad = loss_and_grad(*primals)
            # Row n's loss depends on row n's logits only, and g is the gradient of the sum of
            # the rows ("none") or of the reduced loss: <g, dx> row by row is the exact tangent.
            prod = (grad * dx.astype(grad.dtype)).astype(loss.dtype)
            tan = jnp.sum(prod, axis=axis) if none else jnp.sum(prod)
        if moving:
            # Probability targets, weights, sample weights, traced scalars: the reference's
            # tangent with respect to them (the logits held fixed).
            tan = tan + _tangent_of_others(ref, primals, tangents, moving).astype(loss.dtype)
        return loss, tan

    ce.defjvp(jvp, symbolic_zeros=True)
    return ce


def _tangent_of_others(fn, primals, tangents, moving):
    """The tangent of fn(*primals) with respect to the operands in `moving` alone (the others
    held fixed): for the reference loss, its tangent in the probability targets, weights,
    sample weights and traced scalars; symbolic zeros stay out of jax.jvp."""

    def of_others(*vals):
        p = list(primals)
        for i, v in zip(moving, vals):
            p[i] = v
        return fn(*p)

    return jax.jvp(
        of_others, tuple(primals[i] for i in moving), tuple(tangents[i] for i in moving)
    )[1]


@functools.lru_cache(maxsize=256)
def _make_stats(attrs: Tuple[Tuple[str, Any], ...], want: Tuple[str, ...]):
    """The custom_jvp function of one set of attributes with per-row outputs: (x, t, w, sw,
    sc) -> (loss, the float statistics of `want` in _FLOAT_STATS order, argmax if wanted),
    from one fastxent_ce_stats call (cached: a stable callee for jit).

    The loss's derivatives are those of _make (first order from the kernel's gradient, which
    the same call returns, beyond it the reference). The float statistics depend on the
    logits only: their tangent is the reference's (_jax_reference.reference_stats), a
    (rows, C) computation that exists only where a statistic is differentiated (under jit,
    XLA drops it when the statistic's cotangent is zero, as for statistics kept for
    logging). argmax is piecewise constant: its tangent is float0 zeros."""
    a = dict(attrs)
    f = int(a["flags"])
    axis = int(a["axis"])
    none = int(a["reduction"]) == 0
    ref = _reference(attrs)
    floats = tuple(n for n in _FLOAT_STATS if n in want)
    static = dict(
        probs=bool(f & _FLAG_PROBS),
        ignore_index=int(a["ignore_index"]),
        softcap=float(a["softcap"]),
        logit_scale=float(a["logit_scale"]),
    )

    def ref_floats(x, t):
        z = jnp.moveaxis(x, axis, -1)
        st = _jax_reference.reference_stats(z, t, **static)
        return tuple(st[n] for n in floats)

    def ref_grad(x, t, w, sw, sc):
        g = jax.grad(lambda x: jnp.sum(ref(x, t, w, sw, sc)))(x)
        return g.astype(x.dtype)

    def pack(res: Dict[str, Any]) -> Tuple[Any, ...]:
        am = (res["argmax"],) if "argmax" in want else ()
        return (res["loss"],) + tuple(res[n] for n in floats) + am

    def float0(out: Tuple[Any, ...]) -> Tuple[Any, ...]:
        if "argmax" not in want:
            return ()
        # A symbolic zero: it carries the primal's type, manual (shard_map) axes included.
        aval = jax.typeof(out[-1]) if hasattr(jax, "typeof") else None
        if aval is not None and hasattr(aval, "to_tangent_aval"):
            return (jax.custom_derivatives.SymbolicZero(aval.to_tangent_aval()),)
        return (np.zeros(out[-1].shape, jax.dtypes.float0),)

    @jax.custom_jvp
    def with_grad(x, t, w, sw, sc):
        res = _call_stats(True, attrs, want, x, t, w, sw, sc)
        return (res["grad"],) + pack(res)

    def with_grad_jvp(primals, tangents):
        out = with_grad(*primals)
        # Symbolic zeros (they carry manual shard_map axes, which argmax's tangent needs)
        # stay out of jax.jvp: only the operands that move are its inputs.
        moving = [i for i, d in enumerate(tangents) if not _zero(d)]
        tan = _tangent_of_others(
            lambda *p: (ref_grad(*p), ref(*p)) + ref_floats(p[0], p[1]),
            primals,
            tangents,
            moving,
        )
        tan = tuple(d.astype(o.dtype) for d, o in zip(tan, out))
        return out, tan + float0(out)

    with_grad.defjvp(with_grad_jvp, symbolic_zeros=True)

    @jax.custom_jvp
    def ce(x, t, w, sw, sc):
        return pack(_call_stats(False, attrs, want, x, t, w, sw, sc))

    def jvp(primals, tangents):
        x, t = primals[0], primals[1]
        dx, others = tangents[0], tangents[1:]
        moving = [i for i, d in enumerate(others, 1) if not _zero(d)]
        if _zero(dx):
            out = ce(*primals)
            tan = jnp.zeros_like(out[0])
            tan_f = tuple(jnp.zeros_like(o) for o in out[1 : 1 + len(floats)])
        else:
            grad, *rest = with_grad(*primals)
            out = tuple(rest)
            prod = (grad * dx.astype(grad.dtype)).astype(out[0].dtype)
            tan = jnp.sum(prod, axis=axis) if none else jnp.sum(prod)
            _, tan_f = jax.jvp(lambda x: ref_floats(x, t), (x,), (dx,))
            tan_f = tuple(d.astype(o.dtype) for d, o in zip(tan_f, out[1:]))
        if moving:
            tan = tan + _tangent_of_others(ref, primals, tangents, moving).astype(out[0].dtype)
        return out, (tan,) + tan_f + float0(out)

    ce.defjvp(jvp, symbolic_zeros=True)
    return ce


def cross_entropy(
    x,
    t,
    w,
    sw,
    probs: bool,
    axis: int,
    opts: dict,
    eps: Any,
    normalizer: Any,
    beta: Any = 0.0,
    want: Tuple[str, ...] = (),
) -> Any:
    """The loss (in the compute dtype) through the custom call. `opts`: static options
    (reduction, ignore_index, z_loss, softcap, logit_scale, num_threads); `eps`,
    `normalizer` and `beta` (entropy_coef): Python numbers (attributes) or traced scalars
    (operands); normalizer None: absent. With per-row outputs (`want`, names of
    _FLOAT_STATS and "argmax"): (loss, float statistics in _FLOAT_STATS order, argmax if
    wanted). Logits whose rows are sharded over explicit mesh axes (the class axis whole) are
    computed shard by shard (_sharded)."""
    rows = _row_sharding(x, axis)
    if rows is not None:
        return _sharded(rows, x, t, w, sw, probs, axis, opts, eps, normalizer, beta, want)
    return _single(x, t, w, sw, probs, axis, opts, eps, normalizer, beta, want)


def _row_sharding(x, axis: int):
    """(mesh, per-dim spec) when the logits' sharding is known at trace time (explicit mesh
    axes) and shards some row dimension but not the class axis; else None."""
    t = jax.typeof(x) if hasattr(jax, "typeof") else None
    sh = getattr(t, "sharding", None)
    spec, mesh = getattr(sh, "spec", None), getattr(sh, "mesh", None)
    if spec is None or mesh is None or getattr(mesh, "empty", True):
        return None
    spec = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
    if spec[axis] is not None or all(s is None for s in spec):
        return None
    return mesh, spec


def _denominator(t, w, sw, probs: bool, opts: dict, C: int, cdt: Any):
    """This shard's share of the "mean" denominator D (fastxent.cross_entropy's definition)."""
    if probs:
        return jnp.sum(sw) if sw is not None else jnp.asarray(t.size // max(C, 1), cdt)
    d = jnp.ones(t.shape, cdt) if w is None else jnp.take(w, jnp.clip(t, 0, C - 1))
    d = d if sw is None else d * sw
    keep = _jax_reference.counted_rows(t, int(opts.get("ignore_index", -100)))
    return jnp.sum(jnp.where(keep, d, 0))


def _sharded(rows, x, t, w, sw, probs, axis, opts, eps, normalizer, beta, want):
    """Row-sharded logits: _sharded_in_mesh under a jit of its own (cached per static
    configuration), so that an eager call (jax.grad without jit, or no transformation) traces
    its operands with their shardings, as a call under the user's jit does; a NumPy target or
    weight is then placed on the mesh like any jit argument. `rows`: checked by the caller,
    recomputed from the traced logits."""
    del rows
    dyn = {"x": x, "t": t}
    static = {}
    for k, v in (("w", w), ("sw", sw), ("eps", eps), ("norm", normalizer), ("beta", beta)):
        if isinstance(v, (jax.Array, np.ndarray)):
            dyn[k] = v
        else:
            static[k] = v  # None or a Python number
    f = _sharded_jit(
        bool(probs), axis, tuple(sorted(opts.items())), tuple(sorted(static.items())), want
    )
    return f(dyn)


@functools.lru_cache(maxsize=64)
def _sharded_jit(probs: bool, axis: int, opts_key, static_key, want: Tuple[str, ...]):
    opts, static = dict(opts_key), dict(static_key)

    def f(dyn):
        x = dyn["x"]

        def get(k):
            return dyn[k] if k in dyn else static.get(k)

        return _sharded_in_mesh(
            _row_sharding(x, axis),
            x,
            dyn["t"],
            get("w"),
            get("sw"),
            probs,
            axis,
            opts,
            get("eps"),
            get("norm"),
            get("beta"),
            want,
        )

    return jax.jit(f)


def _sharded_in_mesh(rows, x, t, w, sw, probs, axis, opts, eps, normalizer, beta, want):
    """Row-sharded logits under jit: a shard_map whose shards each run the custom call on
    their rows; "sum" and "mean" combine with psum, "mean" dividing every shard by the global
    denominator (a traced normalizer); the gradient and the per-row outputs keep the rows'
    sharding."""
    P = jax.sharding.PartitionSpec
    mesh, spec = rows
    names = tuple(n for s in spec if s is not None for n in (s if isinstance(s, tuple) else (s,)))
    row_spec = P(*(spec[:axis] + spec[axis + 1 :]))
    reduction = opts.get("reduction", "mean")
    args: Dict[str, Any] = {"x": x, "t": t}
    specs: Dict[str, Any] = {"x": P(*spec), "t": P(*spec) if probs else row_spec}
    for k, v, sp in (
        ("w", w, P()),
        ("sw", sw, row_spec),
        ("eps", eps, P()),
        ("norm", normalizer, P()),
        ("beta", beta, P()),
    ):
        if isinstance(v, jax.Array):
            args[k], specs[k] = v, sp
    args = {
        k: jax.sharding.reshard(v, jax.sharding.NamedSharding(mesh, specs[k]))
        for k, v in args.items()
    }
    cdt = compute_dtype(x.dtype)

    def local(a):
        norm = a.get("norm", normalizer)
        if reduction == "mean" and norm is None:
            d = _denominator(a["t"], a.get("w"), a.get("sw"), probs, opts, x.shape[axis], cdt)
            norm = jax.lax.psum(d, names)
        res = _single(
            a["x"],
            a["t"],
            a.get("w"),
            a.get("sw"),
            probs,
            axis,
            opts,
            a.get("eps", eps),
            norm,
            a.get("beta", beta),
            want,
        )
        loss, stats = (res[0], tuple(res[1:])) if want else (res, ())
        loss = loss if reduction == "none" else jax.lax.psum(loss, names)
        return (loss,) + stats if want else loss

    loss_spec = row_spec if reduction == "none" else P()
    out_specs = (loss_spec,) + (row_spec,) * len(want) if want else loss_spec
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out_specs)(args)


def _single(
    x,
    t,
    w,
    sw,
    probs: bool,
    axis: int,
    opts: dict,
    eps: Any,
    normalizer: Any,
    beta: Any = 0.0,
    want: Tuple[str, ...] = (),
) -> Any:
    cdt = compute_dtype(x.dtype)
    flags = (
        (_FLAG_PROBS if probs else 0)
        | (0 if w is None else _FLAG_WEIGHT)
        | (0 if sw is None else _FLAG_SWEIGHT)
        | (0 if normalizer is None else _FLAG_NORMALIZER)
    )
    traced_eps = isinstance(eps, jax.Array)
    traced_norm = isinstance(normalizer, jax.Array)
    traced_beta = isinstance(beta, jax.Array)
    flags |= (_FLAG_EPS_OPERAND if traced_eps else 0) | (_FLAG_NORM_OPERAND if traced_norm else 0)
    flags |= _FLAG_BETA_OPERAND if traced_beta else 0
    sc = jnp.stack(
        [
            jnp.asarray(eps if traced_eps else 0.0, cdt).reshape(()),
            jnp.asarray(normalizer if traced_norm else 0.0, cdt).reshape(()),
            jnp.asarray(beta if traced_beta else 0.0, cdt).reshape(()),
        ]
    )
    softcap = opts.get("softcap")
    nt = opts.get("num_threads")
    attrs = (
        ("axis", np.int64(axis)),
        ("reduction", np.int64(_REDUCTIONS[opts.get("reduction", "mean")])),
        ("ignore_index", np.int64(opts.get("ignore_index", -100))),
        ("flags", np.int64(flags)),
        ("num_threads", np.int64(0 if nt is None else nt)),
        ("eps", np.float64(0.0 if traced_eps else eps)),
        ("normalizer", np.float64(0.0 if traced_norm or normalizer is None else normalizer)),
        ("z_loss", np.float64(opts.get("z_loss", 0.0))),
        ("softcap", np.float64(0.0 if softcap is None else softcap)),
        ("logit_scale", np.float64(opts.get("logit_scale", 1.0))),
        ("entropy_coef", np.float64(0.0 if traced_beta else beta)),
    )
    if probs:
        t = t.astype(x.dtype)
    w = None if w is None else w.astype(cdt)
    sw = None if sw is None else sw.astype(cdt)
    if want:
        return _make_stats(attrs, want)(x, t, w, sw, sc)
    return _make(attrs)(x, t, w, sw, sc)
