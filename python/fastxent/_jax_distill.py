"""fastxent.jax's distillation losses: :func:`kl_div_with_logits` and :func:`jsd_with_logits`.

The kernel (``fastxent/distill.hpp``) runs as an XLA custom call (``fastxent_distill`` for the
loss, ``fastxent_distill_grad`` for the loss and the gradients in one pass; handlers in
``cpp/ffi/distill_handlers.cpp``) on XLA's own buffers. Operands: student and teacher logits
(their own dtype, 16-bit included), and the per-row weights computed here in jax.numpy ops
from ``labels`` / ``ignore_index``, ``mask`` and ``sample_weight`` (N values: float64 when
JAX's x64 mode is on, else float32, widened to double in C++; an empty operand when none of
them is given). The static options (direction / beta, temperature, reduction, num_threads)
are attributes.

Derivatives, as fastxent.jax.cross_entropy's: a ``jax.custom_jvp`` whose tangent rule runs the
fused kernel (loss, the student's gradient and, only when the teacher's tangent is not a
symbolic zero, the teacher's: one call) and returns ``<g_s, ds> + <g_t, dt>`` (per row for
"none"). JAX transposes it for reverse mode (``value_and_grad`` is one kernel call) and forward
mode uses it directly. The derivative of the gradients (second and higher order) and the
tangent of a differentiated ``sample_weight`` go through the same loss in jax.numpy ops
(:func:`reference_loss`, materialising).

Without the FFI (:func:`fastxent._jax_ffi.enabled` false) the kernel runs through
``jax.pure_callback`` (the NumPy API, host copies) in a ``jax.custom_vjp``: reverse mode, first
order, with respect to both logits; forward mode, second order and differentiating
``sample_weight`` raise.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Tuple

import numpy as np

import jax
import jax.numpy as jnp

from . import _distill, _jax_ffi

__all__ = ["kl_div_with_logits", "jsd_with_logits", "reference_loss"]

_Attrs = Tuple[Tuple[str, Any], ...]
_FLOATS = (
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.float16),
    np.dtype(jnp.bfloat16),
)
_HALF = (np.dtype(np.float16), np.dtype(jnp.bfloat16))


def _compute_dtype(dt: Any) -> np.dtype:
    dt = np.dtype(dt)
    return np.dtype(np.float32) if dt in _HALF else dt


def _static_real(v: Any, name: str) -> float:
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python number (it is compiled into the call), got a "
            f"traced value"
        )
    if isinstance(v, (jax.Array, np.ndarray)) and np.ndim(v) == 0:
        v = np.asarray(v).item()
    return _distill._real(v, name)


def _x64() -> bool:
    return jax.dtypes.canonicalize_dtype(np.float64) == np.float64


def _jax_rows(v: Any, name: str) -> Tuple[jax.Array, str]:
    a = jnp.asarray(v)
    return a, "f" if jnp.issubdtype(a.dtype, jnp.floating) else np.dtype(a.dtype).kind


def _row_weight(rows: Tuple[int, ...], labels: Any, ignore_index: Any, mask: Any, sw: Any):
    """The flat per-row weights (float64 with x64, else float32), or None: the NumPy layer's
    _distill._row_weight in jax.numpy ops (traceable; sample_weight's range is checked by the
    kernel when the call runs)."""
    r = _distill.check_row_arrays(rows, labels, ignore_index, mask, sw, _jax_rows)
    wdt = jnp.float64 if _x64() else jnp.float32
    w = None if r.sample_weight is None else r.sample_weight.astype(wdt).reshape(-1)
    if r.labels is not None:
        ii, lim = r.ignore_index, np.iinfo(np.dtype(r.labels.dtype))
        # An ignore_index outside the labels' integer type matches no label.
        keep = (r.labels != ii) if lim.min <= ii <= lim.max else jnp.ones(rows, bool)
        keep = keep.reshape(-1).astype(wdt)
        w = keep if w is None else w * keep
    if r.mask is not None:
        keep = r.mask.reshape(-1).astype(wdt)
        w = keep if w is None else w * keep
    return w


def mean_weights(w: jax.Array) -> jax.Array:
    """Row weights w (N,) divided by their sum: "mean" as "sum" over these weights. Scaled
    by a power of two first, so that the largest is in [0.5, 1): the float32 sum of large
    weights (1e38 six times) cannot overflow to inf (and w / inf make a silent 0 loss), and
    no reciprocal of a large sum flushes to zero (XLA turns w / max(w) into w * (1 / max),
    and 1 / 1e38 is a float32 denormal, which XLA's CPU threads read as 0). A total of 0
    (every weight 0) leaves them; a negative or non-finite (traced) weight reaches the
    kernel as such (an infinite one through inf / inf = NaN; a negative one unscaled, which
    could have flushed to -0), which raises."""
    if w.shape[0] == 0:
        return w
    # times 2**-e in two normal factors (2**-127 alone is a float32 denormal), not
    # jnp.ldexp(w, -e), whose derivative at w = 0 is 1, not 2**-e
    e = jax.lax.stop_gradient(jnp.frexp(jnp.max(jnp.abs(w)))[1])
    one = jnp.ones((), w.dtype)
    w = jnp.where(w < 0, w, w * jnp.ldexp(one, -(e // 2)) * jnp.ldexp(one, e // 2 - e))
    den = w.sum()
    return jnp.where(den > 0, w / jnp.where(den > 0, den, 1), w)


def _jax_logits(v: Any, name: str) -> jax.Array:
    x = jnp.asarray(v)
    return _distill.check_logits(x, name, np.dtype(x.dtype) in _FLOATS)


@jax.custom_jvp
def _weighted(r: jax.Array, D: jax.Array, cut: jax.Array) -> jax.Array:
    """r * D row by row, where a row of weight 0 costs 0 (also with an infinite or NaN D),
    its derivative with respect to r being D (inf / NaN included). cut (bool, data): the rows
    of weight 0 whose D is not finite, which pass no tangent of D (no 0 * inf)."""
    return jnp.where(r == 0, 0.0, r * D)


def _weighted_jvp(primals, tangents):
    r, D, cut = primals
    dr, dD, _ = tangents
    return _weighted(r, D, cut), dr * D + jnp.where(cut, 0.0, r * dD)


_weighted.defjvp(_weighted_jvp)


def reference_loss(
    s: Any,
    t: Any,
    w: Any,
    keep: Any = None,
    *,
    divergence: int,
    beta: float,
    temperature: float,
    reduction: int,
) -> jax.Array:
    """The loss of fastxent.kl_div_with_logits / jsd_with_logits in jax.numpy ops (divergence
    0 forward KL, 1 reverse KL, 2 JSD; reduction 0 none / 1 sum / 2 mean; w: flat row weights,
    or an empty array for none; keep: flat, 0 for the rows that labels / ignore_index / mask
    exclude, or None or an empty array). 16-bit logits compute in float32. An excluded row
    costs 0 and reaches nothing (its logits are replaced before any operation, so not even a
    NaN in them shows in a derivative). Any other row of weight 0 costs 0 too, with zero
    derivatives with respect to the logits, but its derivative with respect to the weight
    is its divergence on the real logits (inf or NaN where that is); its logits reach no
    derivative with respect to the logits where that divergence is not finite. "mean" over
    a total weight of 0 is 0 with zero derivatives, as the kernel's."""
    rows_shape, C = s.shape[:-1], s.shape[-1]
    dt = _compute_dtype(s.dtype)
    s2 = s.reshape(-1, C).astype(dt)
    t2 = t.reshape(-1, C).astype(dt)
    N = s2.shape[0]
    r = jnp.ones((N,), dt) if w is None or w.size == 0 else w.reshape(N).astype(dt)
    if keep is not None and keep.size:
        out = jax.lax.stop_gradient(keep.reshape(N)) == 0
        s2 = jnp.where(out[:, None], 0.0, s2)
        t2 = jnp.where(out[:, None], 0.0, t2)

    def divergence_rows(s2, t2):
        ls = jax.nn.log_softmax(s2 / temperature, axis=-1)
        lt = jax.nn.log_softmax(t2 / temperature, axis=-1)
        p, q = jnp.exp(ls), jnp.exp(lt)

        def kl(a, la, lb):
            # 0 * (anything, inf included) := 0, also in the derivatives (double where).
            z = a == 0
            return jnp.sum(jnp.where(z, 0.0, a * jnp.where(z, 0.0, la - lb)), axis=-1)

        if divergence == 0 or (divergence == 2 and beta == 0.0):
            return kl(q, lt, ls)
        if divergence == 1 or (divergence == 2 and beta == 1.0):
            return kl(p, ls, lt)
        lm = jnp.logaddexp(math.log(beta) + lt, math.log1p(-beta) + ls)
        return beta * kl(q, lt, lm) + (1.0 - beta) * kl(p, ls, lm)

    # a row of weight 0 whose divergence is not finite: its logits as constants (no 0 * inf
    # in the logits' derivatives)
    sg = jax.lax.stop_gradient
    cut = (sg(r) == 0) & ~jnp.isfinite(divergence_rows(sg(s2), sg(t2)))
    D = divergence_rows(jnp.where(cut[:, None], sg(s2), s2), jnp.where(cut[:, None], sg(t2), t2))
    row = _weighted(r, (temperature * temperature) * D, cut)
    if reduction == 0:
        return row.reshape(rows_shape)
    total = row.sum()
    if reduction == 1:
        return total
    den = r.sum()
    return jnp.where(den == 0, 0.0, total / jnp.where(den == 0, 1.0, den)).astype(dt)


def _reference(attrs: _Attrs):
    a = dict(attrs)
    kw = dict(
        divergence=int(a["divergence"]),
        beta=float(a["beta"]),
        temperature=float(a["temperature"]),
        reduction=int(a["reduction"]),
    )
    return lambda s, t, w, keep=None: reference_loss(s, t, w, keep, **kw)


def _call(attrs: _Attrs, grad: bool, want_s: bool, want_t: bool, s, t, w):
    """The custom call: (loss,) or (loss, grad_student, grad_teacher); a gradient not wanted
    is a 0-element result the kernel does not write. The wanted gradients may take the logits'
    buffers (the kernel's in-place mode): XLA copies the logits first where they are still
    needed."""
    a = dict(attrs)
    cdt = _compute_dtype(s.dtype)
    loss_shape = s.shape[:-1] if int(a["reduction"]) == 0 else ()
    outs = [_jax_ffi._result(loss_shape, cdt, s)]
    aliases = {}
    if grad:
        outs.append(_jax_ffi._result(s.shape if want_s else (0,), s.dtype, s))
        outs.append(_jax_ffi._result(t.shape if want_t else (0,), t.dtype, t))
        if want_s:
            aliases[0] = 1
        if want_t:
            aliases[1] = 2
    f = jax.ffi.ffi_call(
        "fastxent_distill_grad" if grad else "fastxent_distill",
        tuple(outs),
        vmap_method="broadcast_all",
        input_output_aliases=aliases,
    )
    return f(s, t, w, core_ndim=np.int64(s.ndim), **a)


def _zero(tangent: Any) -> bool:
    return tangent is None or isinstance(tangent, jax.custom_derivatives.SymbolicZero)


@functools.lru_cache(maxsize=256)
def _loss_and_grad(attrs: _Attrs, want_s: bool, want_t: bool):
    """(loss, grad_student, grad_teacher) from one kernel call, a custom_jvp whose tangent is
    the reference's (second and higher order)."""
    ref = _reference(attrs)

    def ref_all(s, t, w, keep):
        g = jax.grad(lambda s, t: jnp.sum(ref(s, t, w, keep)), argnums=(0, 1))(s, t)
        return (
            ref(s, t, w, keep),
            g[0].astype(s.dtype) if want_s else jnp.zeros((0,), s.dtype),
            g[1].astype(t.dtype) if want_t else jnp.zeros((0,), t.dtype),
        )

    @jax.custom_jvp
    def f(s, t, w, keep):
        return tuple(_call(attrs, True, want_s, want_t, s, t, w))

    def f_jvp(primals, tangents):
        out = f(*primals)
        _, tan = jax.jvp(ref_all, primals, tangents)
        return out, tuple(d.astype(o.dtype) for d, o in zip(tan, out))

    f.defjvp(f_jvp)
    return f


@functools.lru_cache(maxsize=256)
def _make(attrs: _Attrs):
    """The custom_jvp loss for one set of attributes (cached: a stable callee for jit)."""
    none = int(dict(attrs)["reduction"]) == 0
    ref = _reference(attrs)

    @jax.custom_jvp
    def loss(s, t, w, keep):
        return _call(attrs, False, False, False, s, t, w)[0]

    def jvp(primals, tangents):
        ds, dt, dw, _ = tangents
        want_s, want_t = not _zero(ds), not _zero(dt)
        if not (want_s or want_t):
            out = loss(*primals)
            tan = jnp.zeros_like(out)
        else:
            out, gs, gt = _loss_and_grad(attrs, want_s, want_t)(*primals)
            tan = jnp.zeros_like(out)
            # Row n's loss depends on row n's logits only and the kernel's gradients are those
            # of the sum of the rows ("none") or of the reduced loss: <g, d> row by row is the
            # exact tangent.
            for g, d in ((gs, ds), (gt, dt)):
                if not _zero(d):
                    prod = (g * d.astype(g.dtype)).astype(out.dtype)
                    tan = tan + (jnp.sum(prod, axis=-1) if none else jnp.sum(prod))
        if not _zero(dw):  # a differentiated sample_weight: the reference's tangent
            s, t, w, keep = primals
            _, tw = jax.jvp(lambda w: ref(s, t, w, keep), (w,), (dw,))
            tan = tan + tw.astype(out.dtype)
        return out, tan

    loss.defjvp(jvp, symbolic_zeros=True)
    return loss


_REDUCTION_NAMES = ("none", "sum", "mean")


def _host(attrs: _Attrs, grad: bool, teacher_grad: bool):
    """The NumPy API on host copies of (student, teacher, flat row weights or an empty
    array), for the custom call's attributes: the loss in the compute dtype, with grad
    (loss, grad_student) or (loss, grad_student, grad_teacher)."""
    a = dict(attrs)
    div, beta = int(a["divergence"]), float(a["beta"])
    nt = int(a["num_threads"])
    kw = dict(
        _distill._COMMON,
        temperature=float(a["temperature"]),
        reduction=_REDUCTION_NAMES[int(a["reduction"])],
        num_threads=None if nt == 0 else nt,
    )

    def call(s, t, w):
        s, t, w = np.asarray(s), np.asarray(t), np.asarray(w)
        k = dict(kw, sample_weight=None if w.size == 0 else w)
        out = _distill._run(s, t, div, beta, k, grad, teacher_grad, None, None)
        if not grad:
            return np.asarray(out, _compute_dtype(s.dtype))
        return (np.asarray(out[0], _compute_dtype(s.dtype)),) + tuple(out[1:])

    return call


def _loss_shape(attrs: _Attrs, s: Any) -> jax.ShapeDtypeStruct:
    none = int(dict(attrs)["reduction"]) == 0
    return jax.ShapeDtypeStruct(s.shape[:-1] if none else (), _compute_dtype(s.dtype))


def kernel(attrs: _Attrs, grad: bool, ffi: bool, s: Any, t: Any, w: Any):
    """The kernel on one block of logits, under no differentiation rule (for front ends with
    their own: fastxent._jax_distill_linear): the loss, with grad (loss, grad_student). ffi
    (the caller's _jax_ffi.enabled()): the custom call, else the NumPy API through
    ``jax.pure_callback`` (one call per element under vmap). w: flat row weights, or an
    empty array."""
    if ffi:
        out = _call(attrs, grad, True, False, s, t, w)
        return out[0] if not grad else (out[0], out[1])
    return _callback(attrs, grad, s, t, w)


def _callback(attrs: _Attrs, grad: bool, s: Any, t: Any, w: Any):
    shapes: Any = _loss_shape(attrs, s)
    if grad:
        shapes = (shapes, jax.ShapeDtypeStruct(s.shape, s.dtype))
    return jax.pure_callback(_host(attrs, grad, False), shapes, s, t, w, vmap_method="sequential")


def loss_shape(s: Any, none: bool) -> jax.ShapeDtypeStruct:
    """The loss of student logits s: the rows ("none") or a scalar, in the compute dtype."""
    return jax.ShapeDtypeStruct(s.shape[:-1] if none else (), _compute_dtype(s.dtype))


def callback_vjp(host: Callable[[bool], Callable], none: bool, n_diff: int, data: Tuple[str, ...],
                 refusal: str):  # fmt: skip
    """A custom_vjp loss f(*diff, *data) around jax.pure_callback (the no-FFI paths): the
    first n_diff arguments are differentiated (logits: their gradients come from the host
    with the loss), the others (named in data, None allowed) are not: differentiating one
    raises refusal.format(name). host(False)(*args) gives the loss, host(True)(*args) the
    loss and the n_diff gradients (of the reduced loss; "none": of the sum of the rows)."""

    @jax.custom_vjp
    def loss(*args):
        shape = loss_shape(args[0], none)
        return jax.pure_callback(host(False), shape, *args, vmap_method="sequential")

    def fwd(*args):
        for name, a in zip(data, args[n_diff:]):
            if a is not None and a.perturbed:
                raise TypeError(refusal.format(name))
        vals = [None if a is None else a.value for a in args]
        out = (loss_shape(vals[0], none),) + tuple(
            jax.ShapeDtypeStruct(v.shape, v.dtype) for v in vals[:n_diff]
        )
        out = jax.pure_callback(host(True), out, *vals, vmap_method="sequential")
        return out[0], tuple(out[1:])

    def bwd(grads, ct):
        if isinstance(ct, jax.custom_derivatives.SymbolicZero):
            return (None,) * (n_diff + len(data))
        if none:
            ct = ct[..., None]
        return tuple(g * ct.astype(g.dtype) for g in grads) + (None,) * len(data)

    loss.defvjp(fwd, bwd, symbolic_zeros=True)
    return loss


@functools.lru_cache(maxsize=256)
def _fallback(attrs: _Attrs):
    """The pure_callback path (no FFI): the NumPy API on host copies, in a custom_vjp."""
    none = int(dict(attrs)["reduction"]) == 0

    @jax.custom_vjp
    def loss(s, t, w):
        return _callback(attrs, False, s, t, w)

    def fwd(s, t, w):
        if w.perturbed:
            raise TypeError(
                "fastxent.jax distillation losses without the XLA FFI differentiate with "
                "respect to the logits only; sample_weight is being differentiated"
            )
        sv, tv = s.value, t.value
        out = (_loss_shape(attrs, sv), jax.ShapeDtypeStruct(sv.shape, sv.dtype))
        out = out + (jax.ShapeDtypeStruct(tv.shape, tv.dtype),)
        out, gs, gt = jax.pure_callback(
            _host(attrs, True, True), out, sv, tv, w.value, vmap_method="sequential"
        )
        return out, (gs, gt)

    def bwd(res, ct):
        gs, gt = res
        if isinstance(ct, jax.custom_derivatives.SymbolicZero):
            return None, None, None
        if none:
            ct = ct[..., None]
        return gs * ct.astype(gs.dtype), gt * ct.astype(gt.dtype), None

    loss.defvjp(fwd, bwd, symbolic_zeros=True)
    return loss


def attributes(divergence: int, beta: float, temperature: float, reduction: int, nt: int):
    """The custom call's attributes (a hashable tuple, also the fallback's options)."""
    return (
        ("divergence", np.int64(divergence)),
        ("reduction", np.int64(reduction)),
        ("num_threads", np.int64(nt)),
        ("beta", np.float64(beta)),
        ("temperature", np.float64(temperature)),
    )


def _loss(student: Any, teacher: Any, divergence: int, beta: float, kw: dict):
    s, t, tau, red, nt, _, w = _distill.check_distill_args(
        student, teacher, kw, as_logits=_jax_logits, real=_static_real, row_weight=_row_weight
    )
    if w is None:
        w = jnp.zeros((0,), jnp.float64 if _x64() else jnp.float32)
    attrs = attributes(divergence, beta, tau, red, nt)
    if _jax_ffi.enabled():
        # the rows that labels / mask exclude (for the reference: sample_weight's derivative)
        keep = _row_weight(s.shape[:-1], kw["labels"], kw["ignore_index"], kw["mask"], None)
        keep = jnp.zeros((0,), w.dtype) if keep is None else jax.lax.stop_gradient(keep)
        return _make(attrs)(s, t, w, keep)
    return _fallback(attrs)(s, t, w)


def kl_div_with_logits(
    student: Any, teacher: Any, *, direction: str = "forward", **options: Any
) -> jax.Array:
    return _loss(
        student,
        teacher,
        _distill._direction(direction),
        0.5,
        _distill._kw(options, "kl_div_with_logits"),
    )


def jsd_with_logits(student: Any, teacher: Any, *, beta: float = 0.5, **options: Any) -> jax.Array:
    return _loss(
        student,
        teacher,
        2,
        _distill._beta(beta, _static_real),
        _distill._kw(options, "jsd_with_logits"),
    )


_JAX_NOTES = """
    JAX specifics: jit-compatible and differentiable with respect to both ``student`` and
    ``teacher`` (and ``sample_weight``). Under ``jax.jit`` the kernel runs as an XLA custom
    call on XLA's buffers; ``jax.value_and_grad`` is one kernel call for the loss and the
    gradients (the teacher's only when it is differentiated), the gradients possibly taking
    the logits' buffers. Forward mode (``jax.jvp``) works the same way; second and higher
    order (``jax.hessian``, ``jax.grad`` of ``jax.grad``) and the derivative with respect to
    ``sample_weight`` go through the same loss in jax.numpy ops (materialising). The options
    (``direction``, ``beta``, ``temperature``, ``reduction``, ``ignore_index``,
    ``num_threads``) are static Python values; ``labels``, ``mask`` and ``sample_weight`` may
    be traced, a negative or non-finite ``sample_weight`` then raising when the call runs
    (``JaxRuntimeError``). The loss is float32 for 16-bit logits, else the logits' dtype
    (float64 needs JAX's x64 mode). Under ``jax.vmap`` each batch element is its own problem
    (its own "mean" denominator), one custom call for the batch.

    Without the XLA FFI (a build without jaxlib's headers, ``FASTXENT_JAX_FFI=0``) the NumPy
    API runs through ``jax.pure_callback``: reverse mode, first order, with respect to the
    logits only; forward mode and second order raise.
"""


def _doc(numpy_doc: str) -> str:
    return (
        numpy_doc.replace("student, teacher : array_like", "student, teacher : jax.Array")
        .replace(
            "NumPy arrays, or CPU\n        tensors through DLPack (PyTorch, JAX), read without "
            "a copy.",
            "Anything\n        jnp.asarray takes.",
        )
        .replace("labels : array_like", "labels : jax.Array")
        .replace("mask : array_like", "mask : jax.Array")
        .replace("sample_weight : array_like", "sample_weight : jax.Array")
        + _JAX_NOTES
    )


kl_div_with_logits.__doc__ = _doc(_distill.kl_div_with_logits.__doc__ or "")
jsd_with_logits.__doc__ = _doc(_distill.jsd_with_logits.__doc__ or "")
