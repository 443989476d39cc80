"""Distillation losses between a student's and a teacher's logits (KL divergence in either
direction and the generalised Jensen-Shannon divergence), loss and gradients in one call,
around the compiled kernel (``fastxent/distill.hpp``).

Everything is checked here, or in the C++ core, before the kernel writes a byte, so a bad
call leaves ``out=`` and the logits exactly as they were.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Tuple

import numpy as np

from . import _core
from ._options import FLOAT_DTYPES, check_out, half_kind, reduction_code, rows_view, threads
from ._options import to_numpy

__all__ = [
    "kl_div_with_logits",
    "kl_div_with_logits_with_grad",
    "jsd_with_logits",
    "jsd_with_logits_with_grad",
]

_DIRECTIONS = {"forward": 0, "reverse": 1}


def _as_logits(v: Any, name: str) -> np.ndarray:
    x = to_numpy(v, name)
    if x.dtype not in FLOAT_DTYPES and half_kind(x.dtype) is None:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis)")
    return x


def _real(v: Any, name: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    return float(v)


def _row_weight(
    rows: Tuple[int, ...], labels: Any, ignore_index: Any, mask: Any, sample_weight: Any
) -> Optional[np.ndarray]:
    """The per-row weights (float64, flat) from labels / ignore_index, mask and sample_weight,
    or None when none of them is given."""
    w: Optional[np.ndarray] = None
    if sample_weight is not None:
        sw = to_numpy(sample_weight, "sample_weight")
        if sw.dtype.kind not in "fiu" and half_kind(sw.dtype) is None:
            raise TypeError(f"sample_weight must be numeric, got dtype {sw.dtype}")
        if sw.shape != rows:
            raise ValueError(f"sample_weight has shape {sw.shape}, expected {rows} (one per row)")
        w = np.array(sw, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("sample_weight must be finite and >= 0")
    if labels is not None:
        lab = to_numpy(labels, "labels")
        if lab.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
        if lab.shape != rows:
            raise ValueError(f"labels has shape {lab.shape}, expected {rows} (one per row)")
        try:
            ii = operator.index(ignore_index)
        except TypeError:
            raise TypeError("ignore_index must be an integer") from None
        keep = (lab != ii).reshape(-1)
        w = keep.astype(np.float64) if w is None else w * keep
    if mask is not None:
        m = to_numpy(mask, "mask")
        if m.dtype != np.bool_:
            raise TypeError(f"mask must be boolean (True: the row counts), got dtype {m.dtype}")
        if m.shape != rows:
            raise ValueError(f"mask has shape {m.shape}, expected {rows} (one per row)")
        keep = m.reshape(-1)
        w = keep.astype(np.float64) if w is None else w * keep
    return w


def _run(
    student: Any,
    teacher: Any,
    divergence: int,
    beta: float,
    kw: dict,
    want_grad: bool,
    teacher_grad: bool,
    out: Any,
    teacher_out: Any,
):
    s = _as_logits(student, "student")
    t = _as_logits(teacher, "teacher")
    if t.dtype != s.dtype:
        raise TypeError(f"teacher has dtype {t.dtype}, expected the student's {s.dtype}")
    if t.shape != s.shape:
        raise ValueError(f"teacher has shape {t.shape}, expected the student's {s.shape}")
    C = s.shape[-1]
    if C == 0:
        raise ValueError("the class axis has no classes (C = 0)")
    tau = _real(kw["temperature"], "temperature")
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"temperature must be finite and > 0, got {kw['temperature']!r}")
    red = reduction_code(kw["reduction"])
    nt = threads(kw["num_threads"])
    rows = s.shape[:-1]
    rw = _row_weight(rows, kw["labels"], kw["ignore_index"], kw["mask"], kw["sample_weight"])
    hk = half_kind(s.dtype)
    gs = gt = None
    if want_grad:
        gs = np.empty(s.shape, s.dtype) if out is None else check_out(out, s, [("teacher", t)])
        if teacher_grad:
            gt = (
                np.empty(t.shape, t.dtype)
                if teacher_out is None
                else check_out(teacher_out, t, [("student", s)])
            )
            if gs is gt or np.shares_memory(gs, gt):
                raise ValueError("out and teacher_out overlap")
            if gt is not t and np.shares_memory(gt, s):
                raise ValueError("teacher_out overlaps the student logits")
        elif teacher_out is not None:
            raise ValueError("teacher_out is only written with teacher_grad=True")
    elif out is not None or teacher_out is not None:
        raise ValueError("out= and teacher_out= belong to the _with_grad form")
    sv, tv = rows_view(s), rows_view(t)
    n_rows = sv.shape[0]
    losses = np.empty(n_rows, np.float64) if red == 0 else None

    def flat(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if a is None:
            return None
        v = a.reshape(-1)
        return v.view(np.uint16) if hk is not None else v

    if hk is not None:
        sv, tv = sv.view(np.uint16), tv.view(np.uint16)
    total = _core.distill(
        sv,
        tv,
        divergence,
        beta,
        tau,
        red,
        rw,
        nt,
        -1 if hk is None else hk,
        flat(gs),
        flat(gt),
        losses,
    )
    ldt = np.float32 if hk is not None else s.dtype
    loss = losses.astype(ldt).reshape(rows) if losses is not None else np.dtype(ldt).type(total)
    if not want_grad:
        return loss
    return (loss, gs, gt) if teacher_grad else (loss, gs)


_COMMON = dict(
    temperature=1.0,
    reduction="mean",
    labels=None,
    ignore_index=-100,
    mask=None,
    sample_weight=None,
    num_threads=None,
)

_PARAMS = """
    Parameters
    ----------
    student, teacher : array_like, the same shape (..., C) and dtype
        Logits (float32, float64, float16 or bfloat16; 16-bit rows are computed in float32),
        classes on the last axis; every leading position is a row. NumPy arrays, or CPU
        tensors through DLPack (PyTorch, JAX), read without a copy.
    temperature : float > 0
        Both distributions are softmax(logits / temperature); the row loss is multiplied by
        ``temperature**2`` (Hinton et al.), so gradient magnitudes do not shrink with it.
    reduction : {"mean", "sum", "none"}
        "mean" divides the sum of the row losses by the number of counted rows (the sum of
        the row weights): PyTorch's ``reduction="batchmean"`` for ``F.kl_div``, and Liger-Kernel's
        per-token mean. It is *not* ``F.kl_div``'s "mean", which also divides by C. "none"
        returns one loss per row (shape ``student.shape[:-1]``).
    labels : array_like of integers, shape ``student.shape[:-1]``, optional
        Rows whose label equals ``ignore_index`` count for nothing (Liger-Kernel's
        ``shift_labels``); the labels are not otherwise used.
    ignore_index : int
        See ``labels`` (default -100).
    mask : array_like of bool, shape ``student.shape[:-1]``, optional
        False: the row counts for nothing.
    sample_weight : array_like, shape ``student.shape[:-1]``, optional
        Per-row weights (finite, >= 0); "mean" then divides by their sum over counted rows.
        A row of weight 0 (ignored, masked or weighted 0) gets a loss of 0 and a gradient of
        exactly 0, whatever its logits hold; "mean" over no counted row is 0 with a zero
        gradient (as fastxent's cross-entropy; PyTorch's mean over nothing is NaN).
    num_threads : int, optional
        Caps the OpenMP threads of this call. Results are bitwise identical for every count.
"""

_GRAD_PARAMS = """    teacher_grad : bool
        Also return the gradient with respect to the teacher's logits (default False).
    out, teacher_out : ndarray, optional
        Where to write the student's / teacher's gradient: the logits' shape and dtype,
        C-contiguous, writable. ``out=student`` (``teacher_out=teacher``) is the in-place mode.

    Returns
    -------
    (loss, grad_student) or, with ``teacher_grad=True``, (loss, grad_student, grad_teacher):
    gradients of the reduced loss ("none": of the sum of the row losses), in the logits' dtype.
"""

_EDGES = """
    A zero probability times an infinite log-ratio counts 0 (so -inf logits are fine where the
    other distribution is also 0 or where only the one being divided by is finite); a row whose
    logits are all -inf, or that holds NaN, gives NaN, as PyTorch's ``log_softmax`` would.

    Raises
    ------
    TypeError
        for logits that are not floating point, mismatched dtypes, labels that are not integers,
        a mask that is not boolean, or a non-numeric temperature / beta.
    ValueError
        for mismatched shapes, C = 0, a temperature that is not finite and > 0, beta outside
        [0, 1], an unknown direction or reduction, bad row arrays, and bad ``out=``. On any
        error nothing is written.
"""


def _kw(kw: dict, name: str) -> dict:
    unknown = set(kw) - set(_COMMON)
    if unknown:
        raise TypeError(f"{name}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    return {**_COMMON, **kw}


def _direction(direction: Any) -> int:
    if not isinstance(direction, str) or direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    return _DIRECTIONS[direction]


def _beta(beta: Any) -> float:
    b = _real(beta, "beta")
    if not (0.0 <= b <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    return b


def kl_div_with_logits(student: Any, teacher: Any, *, direction: str = "forward", **kw: Any):
    return _run(
        student,
        teacher,
        _direction(direction),
        0.5,
        _kw(kw, "kl_div_with_logits"),
        False,
        False,
        None,
        None,
    )


def kl_div_with_logits_with_grad(
    student: Any,
    teacher: Any,
    *,
    direction: str = "forward",
    teacher_grad: bool = False,
    out: Any = None,
    teacher_out: Any = None,
    **kw: Any,
):
    return _run(
        student,
        teacher,
        _direction(direction),
        0.5,
        _kw(kw, "kl_div_with_logits_with_grad"),
        True,
        bool(teacher_grad),
        out,
        teacher_out,
    )


def jsd_with_logits(student: Any, teacher: Any, *, beta: float = 0.5, **kw: Any):
    return _run(
        student, teacher, 2, _beta(beta), _kw(kw, "jsd_with_logits"), False, False, None, None
    )


def jsd_with_logits_with_grad(
    student: Any,
    teacher: Any,
    *,
    beta: float = 0.5,
    teacher_grad: bool = False,
    out: Any = None,
    teacher_out: Any = None,
    **kw: Any,
):
    return _run(
        student,
        teacher,
        2,
        _beta(beta),
        _kw(kw, "jsd_with_logits_with_grad"),
        True,
        bool(teacher_grad),
        out,
        teacher_out,
    )


_KL_DOC = """KL divergence between the teacher's and the student's softmax, from logits.

    With ``p = softmax(student / T)``, ``q = softmax(teacher / T)`` per row::

        direction="forward":  loss_n = T**2 * sum_c q_c (log q_c - log p_c)   # KL(q || p)
        direction="reverse":  loss_n = T**2 * sum_c p_c (log p_c - log q_c)   # KL(p || q)

    times the row weight. "forward" is ``F.kl_div(F.log_softmax(student / T),
    F.log_softmax(teacher / T), log_target=True, reduction="batchmean") * T**2``. The logits
    are read once each for the loss; no rows x C temporary is made (16-bit rows go through
    per-thread row buffers).

    Gradients (before the reduction's scale and the row weight)::

        forward:  d/d student = T (p - q);            d/d teacher = T q (log q - log p - KL)
        reverse:  d/d student = T p (log p - log q - KL);  d/d teacher = T (q - p)
"""

_JSD_DOC = """Generalised Jensen-Shannon divergence between the teacher's and the student's softmax.

    With ``p = softmax(student / T)``, ``q = softmax(teacher / T)`` and
    ``m = beta q + (1 - beta) p`` per row::

        loss_n = T**2 * (beta KL(q || m) + (1 - beta) KL(p || m))

    times the row weight: Liger-Kernel's ``LigerJSD`` (beta weighs the teacher). As Liger
    defines its end points, ``beta=0`` is the forward KL(q || p) and ``beta=1`` the reverse
    KL(p || q) (the formula above would give 0 there), so the result is that of
    :func:`kl_div_with_logits` with the matching direction. beta = 0.5 is the symmetric JSD.

    Gradients (before the reduction's scale and the row weight)::

        d/d student = T (1 - beta) p (log p - log m - KL(p || m))
        d/d teacher = T beta q (log q - log m - KL(q || m))
"""

kl_div_with_logits.__doc__ = (
    _KL_DOC
    + _PARAMS
    + """    direction : {"forward", "reverse"}
        "forward": KL(teacher || student), the usual distillation loss; "reverse":
        KL(student || teacher) (mode seeking).

    Returns
    -------
    The loss: a scalar, or per-row losses for "none" (the logits' dtype; float32 for 16-bit).
"""
    + _EDGES
)
kl_div_with_logits_with_grad.__doc__ = (
    _KL_DOC
    + _PARAMS
    + """    direction : {"forward", "reverse"}
        See :func:`kl_div_with_logits`.
"""
    + _GRAD_PARAMS
    + _EDGES
)
jsd_with_logits.__doc__ = (
    _JSD_DOC
    + _PARAMS
    + """    beta : float in [0, 1]
        The teacher's weight in the mixture m (default 0.5).

    Returns
    -------
    The loss: a scalar, or per-row losses for "none" (the logits' dtype; float32 for 16-bit).
"""
    + _EDGES
)
jsd_with_logits_with_grad.__doc__ = (
    _JSD_DOC
    + _PARAMS
    + """    beta : float in [0, 1]
        See :func:`jsd_with_logits`.
"""
    + _GRAD_PARAMS
    + _EDGES
)
