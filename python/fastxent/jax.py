"""JAX integration: fastxent's fused cross-entropy as a differentiable, jit-compatible function.

>>> import jax, jax.numpy as jnp, fastxent.jax as fxj
>>> logits = jax.random.normal(jax.random.PRNGKey(0), (8, 5))
>>> target = jnp.arange(8) % 5
>>> loss, grad = jax.jit(jax.value_and_grad(fxj.cross_entropy))(logits, target)

How it works: :func:`cross_entropy` calls the C++ kernel as an XLA custom call through JAX's
FFI (:mod:`fastxent._jax_ffi`, handlers in ``cpp/ffi/``): the kernel reads XLA's input
buffers and writes XLA's output buffers in place, in the logits' own dtype (float16 and
bfloat16 included), without the GIL. It is a ``jax.custom_jvp`` function: the tangent rule
runs the fused kernel, which returns the loss and its gradient g with respect to the logits
from one pass over memory, and gives the tangent ``<g, dz>`` (per row for
``reduction="none"``). JAX transposes that linear map for reverse mode (``jax.grad``,
``jax.value_and_grad``, ``jax.vjp``: g times the cotangent, a product XLA drops when the
cotangent is the constant 1 of ``value_and_grad``), and forward mode (``jax.jvp``,
``jax.jacfwd``) uses it directly. Evaluated without differentiation, only the loss is
computed (the forward-only kernel, nothing of the logits' size written). Every other
derivative goes through the same loss written in jax.numpy ops
(:mod:`fastxent._jax_reference`, materialising): the derivative of g (second and higher
order: ``jax.hessian``, Hessian-vector products, ``jax.grad`` of a gradient penalty) and the
derivatives with respect to probability targets, class and sample weights and traced
``label_smoothing`` / ``normalizer``.

The wheel carries the FFI handlers when it was built with jaxlib's FFI headers (jaxlib is a
build requirement on the platforms it has wheels for). Where they are absent, where the
running jaxlib is older than the one they were built against, or with ``FASTXENT_JAX_FFI=0``
in the environment, the same function runs the kernel through ``jax.pure_callback`` instead
(host copies in and out, 16-bit logits via float32, options static, vmap one call per
element).

:func:`softmax_cross_entropy_with_integer_labels` and :func:`softmax_cross_entropy` are
optax-shaped drop-ins (per-example losses, ``axis``, ``where``); unlike optax, a label of -100
is ignored and any other label outside ``[0, C)`` raises.

:func:`kl_div_with_logits` and :func:`jsd_with_logits` are the distillation losses of
:func:`fastxent.kl_div_with_logits` / :func:`fastxent.jsd_with_logits` (student and teacher
logits, both differentiable), as custom calls in the same way (:mod:`fastxent._jax_distill`).
:func:`linear_kl_div` and :func:`linear_jsd` are the same losses from hidden states and head
weights (:func:`fastxent.linear_kl_div` / :func:`fastxent.linear_jsd`): per row tile the
logits by ``jnp.dot`` and the same kernel, the N x V logits never held; differentiable with
respect to the student's hidden states, head weight and bias, the teacher's head frozen
(:mod:`fastxent._jax_distill_linear`).

:func:`kl_div_with_topk_teacher` and :func:`jsd_with_topk_teacher` are those of a sparse
(top-k) teacher, given by its class indices and log-probabilities per row: the dense custom
call over row tiles (:mod:`fastxent._jax_distill_sparse`), differentiable with respect to the
student.

Requires the optional extra: ``pip install fastxent[jax]``.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Tuple

import numpy as np

try:
    import jax
except ImportError as _e:  # pragma: no cover - exercised without jax installed
    raise ImportError("fastxent.jax needs JAX: pip install 'fastxent[jax]'") from _e
import jax.numpy as jnp

from . import _api, _jax_ffi, _jax_reference
from ._keywords import kernel_outputs, output_names

__all__ = [
    "cross_entropy",
    "jsd_with_logits",
    "jsd_with_topk_teacher",
    "kl_div_with_logits",
    "kl_div_with_topk_teacher",
    "linear_cross_entropy",
    "linear_jsd",
    "linear_kl_div",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]

_Options = Tuple[Tuple[str, Any], ...]  # sorted (name, value) pairs: hashable, a cache key

_RESERVED = ("out",)  # the NumPy API's, not this front end's
_TRACEABLE = ("label_smoothing", "normalizer", "entropy_coef")  # may be traced through the FFI
_STAND_IN = {"label_smoothing": 0.0, "normalizer": 1.0, "entropy_coef": 0.0}  # trace-time check


def _compute_dtype(dtype: Any) -> np.dtype:
    """float64 stays float64; float32, float16 and bfloat16 compute in float32."""
    dt = np.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"logits must be a floating-point array (float32, float64, float16 or "
            f"bfloat16), got {dt}"
        )
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def _static(v: Any, name: str) -> Any:
    """Options are static: Python / NumPy scalars, hashable, known at trace time (concrete
    0-d arrays as their Python scalar). A traced value is a TypeError saying so: the options
    of every function here (cross_entropy's but the FFI's traced label_smoothing and
    normalizer, linear_cross_entropy's) are compiled into the call."""
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python number (options are compiled into the call), "
            f"got a traced value ({type(v).__name__}): pass a Python number, closed over or "
            "through jax.jit's static_argnums / static_argnames, not a traced argument"
        )
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
        try:
            a = np.asarray(v)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            a = None
        if a is None or a.ndim != 0:
            raise TypeError(
                f"{name} must be a static Python scalar (options are compiled "
                f"into the call), got {type(v).__name__}"
            )
        return a.item()
    try:
        hash(v)
    except TypeError:
        raise TypeError(
            f"{name} must be a static (hashable) value, got {type(v).__name__}"
        ) from None
    return v


def _validate(
    shape: Tuple[int, ...],
    cdt: np.dtype,
    probs: bool,
    axis: int,
    opts: _Options,
    weight: Any,
    sample_weight: Any,
) -> None:
    """Runs fastxent once on a single-row stand-in at trace time, so that a bad option or
    shape raises its ordinary fastxent exception here, not later inside the callback."""
    kw = dict(opts)
    kw.pop("axis", None)  # the stand-in has its class axis last
    C = shape[axis]
    t_shape = shape[:axis] + shape[axis + 1 :]
    if weight is not None and tuple(np.shape(weight)) != (C,):
        raise ValueError(
            f"weight has shape {tuple(np.shape(weight))}, expected {(C,)} (one per class)"
        )
    if sample_weight is not None and tuple(np.shape(sample_weight)) != t_shape:
        raise ValueError(
            f"sample_weight has shape {tuple(np.shape(sample_weight))}, expected "
            f"{t_shape} (one per row)"
        )
    z = np.zeros((1, C), cdt)
    t = np.full((1, C), 1.0 / max(C, 1), cdt) if probs else np.zeros(1, np.int64)
    _api.cross_entropy(
        z,
        t,
        weight=None if weight is None else np.ones(C, cdt),
        sample_weight=None if sample_weight is None else np.ones(1, cdt),
        **kw,
    )


def _host(opts: _Options, want_grad: bool):
    kw = dict(opts)

    def call(x, t, w, sw):
        # The callback receives host (CPU) buffers; np.asarray views them without a copy.
        x = np.asarray(x)
        t = np.asarray(t)
        w = None if w is None else np.asarray(w)
        sw = None if sw is None else np.asarray(sw)
        if want_grad:
            loss, grad = _api.cross_entropy_with_grad(x, t, weight=w, sample_weight=sw, **kw)
            return np.asarray(loss, x.dtype), grad
        return np.asarray(_api.cross_entropy(x, t, weight=w, sample_weight=sw, **kw), x.dtype)

    return call


@functools.lru_cache(maxsize=256)
def _make(opts: _Options, axis: int):
    """The custom_vjp function for one set of static options (cached: the same function
    object for the same options, so jit sees a stable callee)."""
    reduction = dict(opts)["reduction"]

    def shapes(x):
        rows = x.shape[:axis] + x.shape[axis + 1 :]
        return jax.ShapeDtypeStruct(rows if reduction == "none" else (), x.dtype)

    @jax.custom_vjp
    def ce(x, t, w, sw):
        # "sequential": under vmap each batch element is its own call (a batched call would
        # mix the batch into the rows, and the mean's denominator with it).
        return jax.pure_callback(
            _host(opts, False), shapes(x), x, t, w, sw, vmap_method="sequential"
        )

    def fwd(x, t, w, sw):
        for name, a in (("target", t), ("weight", w), ("sample_weight", sw)):
            if a is not None and a.perturbed:
                raise TypeError(
                    f"fastxent.jax.cross_entropy differentiates with respect to the logits "
                    f"only; {name} is being differentiated (wrap it in jax.lax.stop_gradient "
                    f"if it is a constant)"
                )
        xv = x.value
        out = (shapes(xv), jax.ShapeDtypeStruct(xv.shape, xv.dtype))
        loss, grad = jax.pure_callback(
            _host(opts, True),
            out,
            xv,
            t.value,
            None if w is None else w.value,
            None if sw is None else sw.value,
            vmap_method="sequential",
        )
        return loss, grad

    def bwd(grad, ct):
        if isinstance(ct, jax.custom_derivatives.SymbolicZero):
            return None, None, None, None
        if reduction == "none":
            # ct has the rows' shape; row n's loss depends on row n's logits only, so
            # scaling each row of the fused gradient (that of the sum of rows) is exact.
            ct = jnp.expand_dims(ct, axis)
        return grad * ct.astype(grad.dtype), None, None, None

    ce.defvjp(fwd, bwd, symbolic_zeros=True)
    return ce


def cross_entropy(
    logits: Any, target: Any, *, weight: Any = None, sample_weight: Any = None, **options: Any
) -> jax.Array:
    x = jnp.asarray(logits)
    cdt = _compute_dtype(x.dtype)
    if x.ndim == 0:
        raise ValueError("logits must have at least one dimension (the class axis)")
    for k in _RESERVED:
        if k in options:
            raise TypeError(f"fastxent.jax.cross_entropy does not take {k!r}")
    try:
        axis = operator.index(options.pop("axis", -1))
    except TypeError:
        raise TypeError("axis must be an integer") from None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for logits with {x.ndim} dimensions")
    axis %= x.ndim
    options.setdefault("reduction", "mean")
    names = options.pop("outputs", None)
    names = None if names is None else output_names(names)
    if options.get("entropy_coef", 0.0) is None:
        raise TypeError("entropy_coef must be a real number >= 0, got None")
    ffi = _jax_ffi.enabled()
    if not ffi and isinstance(options.get("entropy_coef"), jax.core.Tracer):
        _check_extras(x, axis, ffi)  # raises: the fallback has no entropy term
    # Through the FFI, label_smoothing, normalizer and entropy_coef may be traced values
    # (custom-call operands).
    traced = {
        k: options.pop(k) for k in _TRACEABLE if ffi and isinstance(options.get(k), jax.core.Tracer)
    }
    opts: _Options = tuple(sorted((k, _static(v, k)) for k, v in options.items()))
    # The kernel is called with the class axis given as `axis`: fastxent reads any axis in
    # place, so the callback passes it on unchanged.
    opts_k = opts + (("axis", axis),)

    t = jnp.asarray(target)
    probs = jnp.issubdtype(t.dtype, jnp.floating) and t.ndim == x.ndim
    if probs:
        t = t.astype(x.dtype if ffi else cdt)  # the custom call reads the logits' dtype
    elif not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(
            f"target must hold integer class indices or float class probabilities "
            f"(the logits' shape), got dtype {t.dtype}"
        )
    w = None if weight is None else jnp.asarray(weight).astype(cdt)
    sw = None if sample_weight is None else jnp.asarray(sample_weight).astype(cdt)
    stand_ins = tuple((k, _STAND_IN[k]) for k in traced)  # checked at run time instead
    out_kw = () if names is None else (("outputs", names),)
    _validate(x.shape, cdt, bool(probs), axis, opts_k + stand_ins + out_kw, w, sw)
    # (after _validate: a bad entropy_coef is its ValueError wherever it is given)
    if names is not None or "entropy_coef" in traced or dict(opts).get("entropy_coef", 0) > 0:
        _check_extras(x, axis, ffi)
    if not probs:
        t_shape = x.shape[:axis] + x.shape[axis + 1 :]
        if t.shape != t_shape:
            raise ValueError(
                f"target has shape {t.shape}, expected {t_shape} (the logits' "
                f"shape without the class axis)"
            )
    if ffi:
        kw = dict(opts)
        eps = traced.get("label_smoothing", kw.pop("label_smoothing", 0.0))
        norm = traced.get("normalizer", kw.pop("normalizer", None))
        beta = traced.get("entropy_coef", kw.pop("entropy_coef", 0.0))
        if names is None:
            return _jax_ffi.cross_entropy(
                x, t, w, sw, bool(probs), axis, kw, eps, norm, beta
            ).astype(x.dtype)
        want = kernel_outputs(names)
        if not want:  # outputs=(): the plain loss and an empty RowStats, as NumPy's
            loss = _jax_ffi.cross_entropy(x, t, w, sw, bool(probs), axis, kw, eps, norm, beta)
            return loss.astype(x.dtype), _api.RowStats()
        res = _jax_ffi.cross_entropy(x, t, w, sw, bool(probs), axis, kw, eps, norm, beta, want)
        return res[0].astype(x.dtype), _row_stats(names, want, res[1:], t, kw, cdt)
    loss = _make(opts_k, axis)(x.astype(cdt), t, w, sw)
    return loss.astype(x.dtype)


def _check_extras(x: jax.Array, axis: int, ffi: bool) -> None:
    """outputs= and entropy_coef: the XLA FFI path, the class axis last (or followed by
    length-1 axes only), as fastxent.cross_entropy's."""
    if not ffi:
        raise NotImplementedError(
            "fastxent.jax.cross_entropy: outputs= and entropy_coef need the XLA FFI custom "
            "call (fastxent built with jaxlib's FFI headers, FASTXENT_JAX_FFI not 0); the "
            "pure_callback fallback does not implement them"
        )
    if any(d != 1 for d in x.shape[axis + 1 :]):
        raise NotImplementedError(
            "outputs= and entropy_coef are implemented with the class axis last (axis=-1) "
            f"only, not axis={axis}"
        )


def _row_stats(
    names: Tuple[str, ...],
    want: Tuple[str, ...],
    res: Tuple[Any, ...],
    t: Any,
    kw: dict,
    cdt: np.dtype,
) -> _api.RowStats:
    """The RowStats of the names asked for, from the custom call's per-row results (in
    `want` order); accuracy from argmax and the class targets, a 0-d array of the compute
    dtype (0 when no row counts)."""
    got = dict(zip(want, res))
    fields = {n: got[n] for n in names if n != "accuracy"}
    if "accuracy" in names:
        ii = int(kw.get("ignore_index", -100))
        fields["accuracy"] = _jax_reference.accuracy(got["argmax"], t, ii, cdt)
    return _api.RowStats(**fields)


cross_entropy.__doc__ = """Softmax cross-entropy of a batch of logits, differentiable with
    respect to the logits, usable under ``jax.jit``, ``jax.grad``, ``jax.value_and_grad``,
    ``jax.vjp`` and ``jax.vmap``.

    The loss is that of :func:`fastxent.cross_entropy` (PyTorch's ``F.cross_entropy`` with no
    options). For logits ``z``, ``lse_n = logsumexp(z_n)``, class weights ``w``, smoothing
    ``eps`` and ``C`` classes, a counted row n (``target[n] != ignore_index``) costs::

        row_n = (1 - eps) * w[y_n] * (lse_n - z[n, y_n]) + (eps / C) * sum_c w_c * (lse_n - z[n, c])

    ``"sum"`` adds the rows, ``"mean"`` divides by ``sum_n w[y_n]`` over counted rows (0 when
    nothing counts), ``"none"`` returns the rows. With probability targets ``p`` (a float
    target of the logits' shape) a row is ``sum_c w_c q[n, c] (lse_n - z[n, c])`` with
    ``q = (1 - eps) p + eps / C``, and ``"mean"`` divides by the number of rows.
    ``sample_weight``, ``z_loss``, ``softcap``, ``logit_scale`` and ``normalizer`` extend it
    as documented in :func:`fastxent.cross_entropy`.

    The gradient is that of :func:`fastxent.cross_entropy_with_grad`, computed in the same
    kernel call as the loss (the forward rule of the ``custom_vjp``) and kept as the
    residual; the backward rule multiplies it by the cotangent (per row for ``"none"``).

    Parameters
    ----------
    logits : array, float32 / float64 / float16 / bfloat16, shape (..., C)
        float16 and bfloat16 logits are read as they are and computed in float32 inside the
        kernel, the gradient rounded once to their dtype (the pure_callback fallback makes a
        float32 copy). float64 needs JAX's x64 mode.
    target : array
        Class indices (any integer dtype) of the logits' shape without the class axis, in
        ``[0, C)`` or equal to ``ignore_index``; or class probabilities, a float array of
        the logits' shape (differentiable through the FFI).
    weight : array of shape (C,), optional
        Class weights (a traced operand; differentiable through the FFI).
    sample_weight : array of the rows' shape, optional
        Per-row weights (a traced operand; differentiable through the FFI).
    **options
        Keyword options of :func:`fastxent.cross_entropy`, compiled into the call (Python
        scalars): ``axis`` (default -1; any axis, read in place), ``reduction`` ("mean",
        "sum", "none"), ``ignore_index``, ``label_smoothing``, ``z_loss``, ``softcap``,
        ``logit_scale``, ``normalizer``, ``num_threads``, ``entropy_coef``, ``outputs``.
        Through the FFI, ``label_smoothing``, ``normalizer`` and ``entropy_coef`` may also
        be traced scalars (a schedule, a ``mask.sum()``, a ``psum`` of token counts): they
        are then operands of the call, checked when it runs, and differentiable.
        ``outputs`` (names from "lse", "entropy", "argmax", "target_logprob", "accuracy")
        and ``entropy_coef`` are those of :func:`fastxent.cross_entropy` (the class axis
        last; through the FFI only).

    Returns
    -------
    A scalar of the logits' dtype for "mean" / "sum", or the rows' shape for "none". With
    ``outputs``: ``(loss, fastxent.RowStats)``, the statistics asked for as arrays of the
    rows' shape (lse, entropy, target_logprob in the compute dtype: float32 for 16-bit
    logits, else the logits' dtype; argmax int32, or int64
    under x64; accuracy a 0-d array, 0 when no row counts), the others None. They come from
    the same custom call as the loss (``fastxent_ce_stats``); lse, entropy and
    target_logprob are differentiable with respect to the logits (forward and reverse mode,
    any order) through their formula in jax.numpy (materialising (rows, C) arrays where a
    statistic is differentiated; under ``jit`` nothing of that size is computed for
    statistics that are only returned, such as ``value_and_grad(..., has_aux=True)``'s aux).

    Raises
    ------
    TypeError, ValueError
        at trace time: the errors of :func:`fastxent.cross_entropy` for bad options and
        shapes; a traced (non-static) option; with the pure_callback fallback,
        differentiating with respect to ``target``, ``weight`` or ``sample_weight``
        (TypeError).
    NotImplementedError
        ``outputs`` or ``entropy_coef`` with a class axis other than the last, or with the
        pure_callback fallback.
    JaxRuntimeError
        at run time, for a class index outside ``[0, C)`` that is not ``ignore_index``: the
        first line of the message names it (``INVALID_ARGUMENT: target[1, 4] = 9 is out of
        range: class indices must be in [0, 5) ...``); likewise a traced label_smoothing
        outside [0, 1] or a negative traced normalizer.

    Notes
    -----
    The custom call is registered for the CPU platform. Under ``jax.vmap`` the whole batch
    is one call, each batch element its own problem (its own "mean" denominator). Under
    ``jax.shard_map`` each shard computes its own rows and the gradient keeps the logits'
    sharding (combine the shards' "sum" losses with ``psum``, or pass the global count as a
    traced ``normalizer``). Under plain ``jit`` or in an eager call, logits whose rows are
    sharded over explicit mesh axes (``NamedSharding``, the class axis whole) are computed
    the same way by fastxent itself (eager differentiation of such arrays needs
    ``jax.set_mesh``, as for JAX's own ops), the "mean" denominator combined across
    shards; with sharding left to XLA (auto mesh axes) the custom call is not partitioned
    and XLA gathers the rows.
    Problems below 2**21 elements run on XLA's calling thread unless ``num_threads`` is
    given. Through the FFI, forward and reverse mode of any order work: first order from the
    kernel, beyond it through the reference formula. The pure_callback fallback is a
    ``custom_vjp`` function: reverse mode, first order, with respect to the logits only.

    Example
    -------
    >>> import jax, jax.numpy as jnp, fastxent.jax as fxj
    >>> z = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]])
    >>> y = jnp.array([0, 1])
    >>> loss, g = jax.jit(jax.value_and_grad(
    ...     lambda z: fxj.cross_entropy(z, y, label_smoothing=0.1)))(z)
    >>> bool(jnp.allclose(g.sum(axis=-1), 0.0, atol=1e-6))
    True
"""


# optax-shaped drop-ins (after cross_entropy: the module imports it back).
from ._jax_dropins import (  # noqa: E402
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from ._jax_linear import linear_cross_entropy  # noqa: E402

# Distillation losses (fastxent.kl_div_with_logits / jsd_with_logits as XLA custom calls).
from ._jax_distill import jsd_with_logits, kl_div_with_logits  # noqa: E402

# Distillation losses from hidden states and head weights, in row tiles (no N x V logits).
from ._jax_distill_linear import linear_jsd, linear_kl_div  # noqa: E402

# Distillation from a sparse (top-k) teacher (fastxent.kl_div_with_topk_teacher / jsd_...).
from ._jax_distill_sparse import jsd_with_topk_teacher, kl_div_with_topk_teacher  # noqa: E402
