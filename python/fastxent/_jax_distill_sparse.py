"""fastxent.jax's distillation from a sparse (top-k) teacher: :func:`kl_div_with_topk_teacher`
and :func:`jsd_with_topk_teacher` (the teacher's definition: :mod:`fastxent._distill_sparse`).

Through the XLA FFI (:func:`fastxent._jax_ffi.enabled`):

* The teacher's values are checked on the host, over its N x k arrays only (range,
  duplicates, NaN, log-probabilities <= 0, mass <= 1, a counted row without mass, the reverse
  KL's infinite rows), by the NumPy layer's own functions, which also give each row's teacher
  logit outside the top k (-inf, or ``log((1 - m) / (C - k))``, in float64 rounded once to
  the compute dtype: the NumPy tiles' values). Concrete teacher arrays (and row arrays) are
  checked right away (a bad one raises the NumPy layer's ValueError); traced ones through a
  small ``jax.pure_callback`` whose result (those fills) every teacher tile is built from, so
  XLA cannot drop it: a bad value raises when the computation runs (``JaxRuntimeError``
  carrying the same message).
* The rows go in tiles (``lax.scan`` over ceil(N / tile) tiles read with dynamic_slice, the
  last one's start clamped to N - tile; a tile of the NumPy layer's 2**21 teacher logits, a
  function of C only): each tile's dense teacher logits (the fill, with the k
  log-probabilities scattered in, in the compute dtype) and its student rows (16-bit:
  upcast to float32) go through the dense losses' custom call (:mod:`fastxent._jax_distill`'s
  ``_call``, reduction "none"); the rows' losses and gradients are written back with
  dynamic_update_slice, and "sum" / "mean" add the rows' losses once at the end (float64
  under x64), "mean" with the row weights divided by the whole batch's denominator (as the
  NumPy layer). No N x C teacher and no copy of the student.
* Derivatives: a custom_jvp around the whole sweep (see :func:`_sweep`): first order from
  the kernel's gradients (forward and reverse mode), second and higher order and
  ``sample_weight`` through the dense losses' jax.numpy reference, per tile. The teacher is
  data: differentiating ``teacher_logprobs`` raises.

Without the FFI, the NumPy layer's own function runs through ``jax.pure_callback`` (host
copies, its checks and tiles) in a custom_vjp: reverse mode, first order, with respect to the
student only.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import numpy as np

import jax
import jax.numpy as jnp

from . import _distill, _distill_sparse, _jax_distill, _jax_ffi

__all__ = ["kl_div_with_topk_teacher", "jsd_with_topk_teacher"]


@jax.custom_jvp
def _data(x: jax.Array) -> jax.Array:
    """x itself; differentiating it raises (the teacher's log-probabilities are data)."""
    return x


def _data_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        raise TypeError(
            "fastxent.jax's top-k teacher losses differentiate with respect to the student "
            "only: teacher_logprobs is being differentiated, but the top-k teacher is data "
            "(wrap it in jax.lax.stop_gradient)"
        )
    return x, jnp.zeros_like(x)


_data.defjvp(_data_jvp, symbolic_zeros=True)


def _host_fill(C: int, k: int, residual: str, what: Optional[str], cdt: np.dtype):
    """The host check of the teacher's values (the NumPy layer's checks, in its order):
    call(indices (n, k), log-probabilities (n, k), row weights (n,) or empty, sample_weight
    or None) -> each row's teacher logit outside the top k, in cdt."""

    def call(idx, lp, w, sw):
        if sw is not None:
            sw = np.asarray(sw, np.float64)
            if not np.all(np.isfinite(sw)) or np.any(sw < 0):
                raise ValueError("sample_weight must be finite and >= 0")
        lp = np.asarray(lp)
        ix = np.asarray(idx, np.int64).reshape(-1, k)
        lg = np.asarray(lp, np.float64).reshape(-1, k)
        mass = _distill_sparse.check_teacher_values(C, ix, lg, _distill_sparse._tolerance(lp.dtype))
        w = np.asarray(w)
        counted = np.ones(ix.shape[0], bool) if w.size == 0 else w.reshape(-1) > 0
        _distill_sparse.check_massless(residual, k, C, mass, counted)
        fill = _distill_sparse._fill(residual, mass, C, k)
        _distill_sparse.check_reverse_uniform(what, residual, k, C, mass, fill, counted)
        return fill.astype(cdt)

    return call


def _concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _tile_rows(n: int, C: int, tile_rows: Optional[int]) -> int:
    """Rows per tile: ~2**21 teacher logits (the NumPy layer's 8 MiB of float32; float64
    tiles take 16 MiB, so that they stay at the custom call's threading threshold of 2**21
    elements), a function of C only (never of the thread count: the loss does not depend on
    it); or the private _tile_rows."""
    if tile_rows is not None:
        if int(tile_rows) < 1:
            raise ValueError("_tile_rows must be >= 1")
        return min(int(tile_rows), max(n, 1))
    return min(max(1, _distill_sparse._TILE_BYTES // (C * 4)), max(n, 1))


def _tiles(piece, tile: int, args):
    """piece(*rows of args) -> per-row outputs, over tiles of `tile` rows: a lax.scan over
    ceil(n / tile) tiles, each read with dynamic_slice from the unreshaped arrays (no copy of
    the student: a slice or reshape of it before the scan would be materialised), the last
    tile's start clamped to n - tile (its first rows repeat rows of the tile before, which
    compute the same values again: rows are independent), each output written back with
    dynamic_update_slice into a carried (n, ...) buffer (in place)."""
    n = args[0].shape[0]
    if n <= tile:
        return tuple(piece(*args))
    count = -(-n // tile)
    shapes = jax.eval_shape(
        piece, *(jax.ShapeDtypeStruct((tile,) + a.shape[1:], a.dtype) for a in args)
    )
    init = tuple(jnp.zeros((n,) + o.shape[1:], o.dtype) for o in shapes)

    def body(outs, i):
        at = jnp.minimum(i * tile, n - tile)
        ys = piece(*(jax.lax.dynamic_slice_in_dim(a, at, tile) for a in args))
        outs = tuple(jax.lax.dynamic_update_slice_in_dim(o, y, at, 0) for o, y in zip(outs, ys))
        return outs, None

    return jax.lax.scan(body, init, jnp.arange(count))[0]


def _teacher_tile(C: int, i_t, l_t, f_t):
    """A tile's dense teacher logits: each row's fill, the k log-probabilities scattered in."""
    m = i_t.shape[0]
    t = jnp.broadcast_to(f_t[:, None], (m, C))
    return t.at[jnp.arange(m)[:, None], i_t].set(l_t, unique_indices=True)


@functools.lru_cache(maxsize=256)
def _sweep(attrs: Any, tile: int, cdt: np.dtype):
    """sweep(student (n, C), indices (n, k), log-probabilities (n, k) and fills (n,) in cdt,
    row weights (n,)): the rows' losses (n,) (attrs: reduction "none"; the caller reduces
    them once, in a fixed order), each tile one dense custom call (_jax_distill._call). A
    custom_jvp whose tangent is <g, ds> per row, g from one sweep of the loss-and-gradient
    custom call (sweep_grad), plus the row weights' tangent through the dense reference
    (_jax_distill._reference) per tile.

    sweep_grad is itself a custom_jvp whose tangent is that of the reference's loss and
    gradient, per tile (second and higher order). Both custom_jvps wrap whole scans, whose
    bodies hold bare custom calls or jax.numpy ops only: a custom_jvp inside a scan body is
    inlined by the scan's partial evaluation (reverse mode), and second order would then meet
    a bare custom call."""
    ref = _jax_distill._reference(attrs)

    def tile_inputs(s_t, i_t, l_t, f_t):
        return s_t.astype(cdt), _teacher_tile(s_t.shape[1], i_t, l_t, f_t)

    def run(piece, *args):
        return _tiles(piece, tile, args)

    def ref_tiles(s2, idx2, lpc, fill, w, keep):
        def piece(s_t, i_t, l_t, f_t, w_t, k_t):
            st, t = tile_inputs(s_t, i_t, l_t, f_t)
            g = jax.grad(lambda x: jnp.sum(ref(x, t, w_t, k_t)))(st)
            return ref(st, t, w_t, k_t), g.astype(cdt)

        return run(piece, s2, idx2, lpc, fill, w, keep)

    @jax.custom_jvp
    def sweep_grad(s2, idx2, lpc, fill, w, keep):
        def piece(s_t, i_t, l_t, f_t, w_t):
            return tuple(
                _jax_distill._call(attrs, True, True, False, *tile_inputs(s_t, i_t, l_t, f_t), w_t)[
                    :2
                ]
            )

        return run(piece, s2, idx2, lpc, fill, w)

    def sweep_grad_jvp(primals, tangents):
        s2, idx2, lpc, fill, w, keep = primals
        out = sweep_grad(*primals)
        _, tan = jax.jvp(
            lambda s, w: ref_tiles(s, idx2, lpc, fill, w, keep), (s2, w), (tangents[0], tangents[4])
        )
        return out, tuple(d.astype(o.dtype) for d, o in zip(tan, out))

    sweep_grad.defjvp(sweep_grad_jvp)

    @jax.custom_jvp
    def sweep(s2, idx2, lpc, fill, w, keep):
        def piece(s_t, i_t, l_t, f_t, w_t):
            return (
                _jax_distill._call(
                    attrs, False, False, False, *tile_inputs(s_t, i_t, l_t, f_t), w_t
                )[0],
            )

        return run(piece, s2, idx2, lpc, fill, w)[0]

    def jvp(primals, tangents):
        s2, idx2, lpc, fill, w, keep = primals
        ds, dw = tangents[0], tangents[4]
        if _jax_distill._zero(ds):
            out = sweep(*primals)
            tan = jnp.zeros_like(out)
        else:
            out, g = sweep_grad(*primals)
            # row n's loss depends on row n's logits only; g is the gradient of the sum of
            # the rows
            tan = jnp.sum((g * ds.astype(g.dtype)).astype(out.dtype), axis=-1)
        if not _jax_distill._zero(dw):  # a differentiated sample_weight: the reference's

            def piece_ref(s_t, i_t, l_t, f_t, w_t, dw_t, k_t):
                a = tile_inputs(s_t, i_t, l_t, f_t)
                return (jax.jvp(lambda w: ref(*a, w, k_t), (w_t,), (dw_t,))[1],)

            tan = tan + run(piece_ref, s2, idx2, lpc, fill, w, dw, keep)[0].astype(out.dtype)
        return out, tan

    sweep.defjvp(jvp, symbolic_zeros=True)
    return sweep


@functools.lru_cache(maxsize=256)
def _fallback(kw: Tuple[Tuple[str, Any], ...]):
    """No FFI: the NumPy layer's function on host copies (its own checks and tiles)."""
    k = dict(kw)
    fn = getattr(_distill_sparse, k.pop("fn"))

    def host(grad):
        f = getattr(_distill_sparse, fn.__name__ + "_with_grad") if grad else fn

        def call(s, idx, lp, labels, mask, sw):
            s = np.asarray(s)
            out = f(
                s,
                np.asarray(idx),
                np.asarray(lp),
                labels=None if labels is None else np.asarray(labels),
                mask=None if mask is None else np.asarray(mask),
                sample_weight=None if sw is None else np.asarray(sw),
                **k,
            )
            cdt = _jax_distill._compute_dtype(s.dtype)
            return (np.asarray(out[0], cdt), out[1]) if grad else np.asarray(out, cdt)

        return call

    return _jax_distill.callback_vjp(
        host,
        k["reduction"] == "none",
        1,
        ("teacher_indices", "teacher_logprobs", "labels", "mask", "sample_weight"),
        "fastxent.jax's top-k teacher losses without the XLA FFI differentiate with respect "
        "to the student only; {} is being differentiated",
    )


def _loss(
    student: Any,
    teacher_indices: Any,
    teacher_logprobs: Any,
    divergence: int,
    beta: float,
    residual: Any,
    kw: dict,
    fn: str,
    tile_rows: Optional[int],
) -> jax.Array:
    # --- static checks, in the NumPy layer's order (the values' are the host's)
    s = _jax_distill._jax_logits(student, "student")
    C = int(s.shape[-1])
    if C == 0:
        raise ValueError("the class axis has no classes (C = 0)")
    _distill_sparse.check_residual(residual)
    tau, red, nt = _distill.check_options(kw, _jax_distill._static_real)
    rows = tuple(s.shape[:-1])
    labels, mask, sw = kw["labels"], kw["mask"], kw["sample_weight"]
    w = _jax_distill._row_weight(rows, labels, kw["ignore_index"], mask, sw)
    idx, lp = jnp.asarray(teacher_indices), jnp.asarray(teacher_logprobs)
    k = _distill_sparse.check_teacher_static(rows, C, idx, lp)
    what = _distill_sparse.reverse_what(divergence, beta)
    _distill_sparse.check_reverse_renormalize(what, residual, k, C)
    lp = _data(lp)
    cdt = _jax_distill._compute_dtype(s.dtype)
    n = int(np.prod(rows, dtype=np.int64))
    tile = _tile_rows(n, C, tile_rows)
    sw_flat = None if sw is None else jnp.asarray(sw).reshape(-1)
    idx2, lp2 = idx.reshape(n, k), lp.reshape(n, k)
    fill = None
    host = _host_fill(C, k, residual, what, cdt)
    if n and _concrete(teacher_indices, teacher_logprobs, labels, mask, sw):
        # known now (even as constants of a jit): checked now, with the NumPy layer's row
        # weights (the NumPy API's ValueError), the fills a constant
        rw = _distill._row_weight(rows, labels, kw["ignore_index"], mask, sw)
        i_np, l_np = np.asarray(teacher_indices), np.asarray(teacher_logprobs)
        fill = jnp.asarray(host(i_np, l_np, np.zeros((0,)) if rw is None else rw, None))
    if not _jax_ffi.enabled():
        fkw = [("fn", fn), ("residual", residual), ("temperature", tau)]
        fkw += [("reduction", kw["reduction"]), ("num_threads", kw["num_threads"])]
        fkw += [("ignore_index", kw["ignore_index"])]
        fkw.append(
            ("beta", beta) if divergence == 2 else ("direction", ("forward", "reverse")[divergence])
        )
        if labels is not None:
            labels = jnp.asarray(labels)
        if mask is not None:
            mask = jnp.asarray(mask)
        if sw is not None:
            sw = jnp.asarray(sw)
        return _fallback(tuple(fkw))(s, idx, lp, labels, mask, sw)
    if n == 0:
        return jnp.zeros(rows if red == 0 else (), cdt)
    if fill is None:
        wd = jnp.zeros((0,)) if w is None else jax.lax.stop_gradient(w)
        swd = None if sw_flat is None else jax.lax.stop_gradient(sw_flat)
        fill = jax.pure_callback(
            host, jax.ShapeDtypeStruct((n,), cdt), idx2, lp2, wd, swd, vmap_method="sequential"
        )
    # the rows that labels / mask exclude (for the reference: sample_weight's derivative)
    w_dt = jnp.float64 if _jax_distill._x64() else jnp.float32
    keep = _jax_distill._row_weight(rows, labels, kw["ignore_index"], mask, None)
    keep = jnp.ones((n,), w_dt) if keep is None else jax.lax.stop_gradient(keep)
    # "mean": "sum" over the tiles with the row weights divided by the whole batch's total
    if w is None:
        w = jnp.ones((n,), w_dt)
    if red == 2:
        w = _jax_distill.mean_weights(w)
    # the rows' losses (reduction "none" per tile), reduced once at the end in a fixed order
    # (float64 where available): the same for any thread count and tile
    attrs = _jax_distill.attributes(divergence, beta, tau, 0, nt)
    out = _sweep(attrs, tile, cdt)(s.reshape(n, C), idx2, lp2.astype(cdt), fill, w, keep)
    if red == 0:
        return out.reshape(rows)
    return out.astype(jnp.float64 if _jax_distill._x64() else cdt).sum().astype(cdt)


def kl_div_with_topk_teacher(
    student: Any,
    teacher_indices: Any,
    teacher_logprobs: Any,
    *,
    residual: str = "renormalize",
    direction: str = "forward",
    _tile_rows: Optional[int] = None,
    **options: Any,
) -> jax.Array:
    return _loss(
        student,
        teacher_indices,
        teacher_logprobs,
        _distill._direction(direction),
        0.5,
        residual,
        _distill._kw(options, "kl_div_with_topk_teacher"),
        "kl_div_with_topk_teacher",
        _tile_rows,
    )


def jsd_with_topk_teacher(
    student: Any,
    teacher_indices: Any,
    teacher_logprobs: Any,
    *,
    residual: str = "renormalize",
    beta: float = 0.5,
    _tile_rows: Optional[int] = None,
    **options: Any,
) -> jax.Array:
    return _loss(
        student,
        teacher_indices,
        teacher_logprobs,
        2,
        _distill._beta(beta, _jax_distill._static_real),
        residual,
        _distill._kw(options, "jsd_with_topk_teacher"),
        "jsd_with_topk_teacher",
        _tile_rows,
    )


_JAX_NOTES = """
    JAX specifics: jit-compatible and differentiable with respect to ``student``
    (``jax.grad``, ``jax.value_and_grad``, ``jax.vjp``; through the XLA FFI also forward mode,
    second and higher order, and ``sample_weight``, as :func:`kl_div_with_logits`).
    ``teacher_indices`` and ``teacher_logprobs`` are data: differentiating
    ``teacher_logprobs`` raises TypeError (wrap it in ``jax.lax.stop_gradient``). The options
    (``residual``, ``direction``, ``beta``, ``temperature``, ``reduction``, ``ignore_index``,
    ``num_threads``) are static Python values; the teacher arrays, ``labels``, ``mask`` and
    ``sample_weight`` may be traced. Shapes, dtypes, k and the options are checked at trace
    time; the values of concrete teacher and row arrays too (the NumPy function's
    ValueError); those of traced ones (an index out of range or repeated, a NaN or positive
    log-probability, a mass above 1, a counted row without mass, an infinite reverse KL, a
    negative sample weight) on the host over the N x k arrays when the call runs, raising
    ``JaxRuntimeError`` with the same message. The rows go in tiles of ~2**21 teacher
    logits (``lax.scan``), each through the dense losses' XLA custom call: no N x C teacher.
    The loss is float32 for 16-bit students, else the student's dtype (float64 needs JAX's
    x64 mode); it matches the NumPy function to rounding (the rows' losses are rounded to
    the loss dtype, then added once, in float64 under x64). Under ``jax.vmap`` each batch
    element is its own problem.

    Without the XLA FFI (``FASTXENT_JAX_FFI=0``, or a build without it) the NumPy function
    runs through ``jax.pure_callback`` (host copies): reverse mode, first order, with
    respect to the student only; forward mode and second order raise.
"""


def _doc(numpy_doc: str) -> str:
    out = numpy_doc
    for old, new in (
        ("student : array_like", "student : jax.Array"),
        ("teacher_indices : array_like", "teacher_indices : jax.Array"),
        ("teacher_logprobs : array_like", "teacher_logprobs : jax.Array"),
        (
            " Results are bitwise\n        identical for every thread count and tile size.",
            " Results are the same\n        for every thread count.",
        ),
        (
            "        Everything is checked before anything is written.\n",
            "        Checked at trace time, or when the call runs (see below).\n",
        ),
    ):
        assert old in out, old
        out = out.replace(old, new)
    return out + _JAX_NOTES


kl_div_with_topk_teacher.__doc__ = _doc(_distill_sparse.kl_div_with_topk_teacher.__doc__ or "")
jsd_with_topk_teacher.__doc__ = _doc(_distill_sparse.jsd_with_topk_teacher.__doc__ or "")
