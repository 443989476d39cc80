"""Distillation losses between a student's and a teacher's logits (KL divergence in either
direction and the generalised Jensen-Shannon divergence), loss and gradients in one call,
around the compiled kernel (``fastxent/distill.hpp``).

Everything is checked here, or in the C++ core, before the kernel writes a byte, so a bad
call leaves ``out=`` and the logits exactly as they were.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, NamedTuple, Optional, Tuple

import numpy as np

from . import _core
from ._options import FLOAT_DTYPES, check_out, flag, half_kind, reduction_code, rows_view
from ._options import threads
from ._options import to_numpy

__all__ = [
    "kl_div_with_logits",
    "kl_div_with_logits_with_grad",
    "jsd_with_logits",
    "jsd_with_logits_with_grad",
]

_DIRECTIONS = {"forward": 0, "reverse": 1}

# The temperatures accepted. Below, 1 / T (the logits' scale, float32 included) stays finite.
# Above, the loss is T**2 times a divergence that shrinks as 1 / T**2, so the rounding of the
# log-probabilities (about eps * log C per row) is multiplied by T**2. Measured in float32 at
# 8 x 32000 (6 seeds), against float64: relative error of the loss up to 1.3e-4 at T = 30,
# 1.2e-3 at T = 100, 7% at 1000, a negative loss at 1e4 (float64: 2e-6 at 1e5). 100 keeps
# float32 within a few 1e-3.
TEMPERATURE_RANGE = (1e-30, 100.0)

# What a row array may hold, as NumPy dtype kinds ('f' for every floating type, 16-bit
# included), and the TypeError otherwise.
_ROW_KINDS = {
    "sample_weight": ("fiu", "sample_weight must be numeric, got dtype {}"),
    "labels": ("iu", "labels must be integers, got dtype {}"),
    "mask": ("b", "mask must be boolean (True: the row counts), got dtype {}"),
}


def _as_logits(v: Any, name: str) -> np.ndarray:
    x = to_numpy(v, name)
    return check_logits(x, name, x.dtype in FLOAT_DTYPES or half_kind(x.dtype) is not None)


def check_logits(x: Any, name: str, floating: bool) -> Any:
    """x itself when it can be logits (floating: whether its dtype is float32, float64,
    float16 or bfloat16 in the front end's terms, with at least one dimension)."""
    if not floating:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis)")
    return x


def _real(v: Any, name: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    return float(v)


ScalarReader = Callable[[Any, str], float]


def _temperature(temperature: Any, real: ScalarReader = _real) -> float:
    tau = real(temperature, "temperature")
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if not (TEMPERATURE_RANGE[0] <= tau <= TEMPERATURE_RANGE[1]):
        raise ValueError(
            "temperature must be in [1e-30, 100] (the loss is T**2 times a divergence that "
            "shrinks as 1/T**2: above 100, float32 rounding would dominate it), "
            f"got {temperature!r}"
        )
    return tau


def _direction(direction: Any) -> int:
    if not isinstance(direction, str) or direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    return _DIRECTIONS[direction]


def _beta(beta: Any, real: ScalarReader = _real) -> float:
    b = real(beta, "beta")
    if not (0.0 <= b <= 1.0):
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    return b


def _ignore_index(ignore_index: Any) -> int:
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError("ignore_index must be an integer") from None


class Options(NamedTuple):
    """The scalar options of one call, checked: temperature, the kernel's reduction code and
    thread count."""

    temperature: float
    reduction: int
    num_threads: int


def check_options(kw: dict, real: ScalarReader = _real) -> Options:
    """temperature, reduction and num_threads of kw (real: how a scalar is read, e.g. JAX's
    refusal of a traced value)."""
    return Options(
        _temperature(kw["temperature"], real),
        reduction_code(kw["reduction"]),
        threads(kw["num_threads"]),
    )


class RowArrays(NamedTuple):
    """The row arrays of one call, checked (None where not given); ignore_index is an int
    when labels are given."""

    sample_weight: Any
    labels: Any
    ignore_index: Any
    mask: Any


def check_row_arrays(
    rows: Tuple[int, ...],
    labels: Any,
    ignore_index: Any,
    mask: Any,
    sample_weight: Any,
    convert: Callable[[Any, str], Tuple[Any, str]],
) -> RowArrays:
    """Dtypes and shapes of sample_weight, labels and mask (one value per row), and
    ignore_index with labels. convert(v, name) gives the front end's array and its dtype's
    kind as a NumPy kind character ('f' for any floating type, 16-bit included)."""
    got = {"sample_weight": sample_weight, "labels": labels, "mask": mask}
    for name, v in got.items():
        if v is None:
            continue
        a, kind = convert(v, name)
        ok, msg = _ROW_KINDS[name]
        if kind not in ok:
            raise TypeError(msg.format(a.dtype))
        if tuple(a.shape) != rows:
            raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {rows} (one per row)")
        got[name] = a
    ii = _ignore_index(ignore_index) if labels is not None else ignore_index
    return RowArrays(got["sample_weight"], got["labels"], ii, got["mask"])


def _numpy_rows(v: Any, name: str) -> Tuple[np.ndarray, str]:
    a = to_numpy(v, name)
    return a, "f" if half_kind(a.dtype) is not None else a.dtype.kind


def check_sample_weight(w: np.ndarray) -> None:
    """sample_weight's values (any shape): finite and >= 0, else ValueError. The NumPy
    layer's check, and fastxent.torch's under torch.func (where the kernel is not called)."""
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("sample_weight must be finite and >= 0")


def _row_weight(
    rows: Tuple[int, ...], labels: Any, ignore_index: Any, mask: Any, sample_weight: Any
) -> Optional[np.ndarray]:
    """The per-row weights (float64, flat) from labels / ignore_index, mask and sample_weight,
    or None when none of them is given."""
    r = check_row_arrays(rows, labels, ignore_index, mask, sample_weight, _numpy_rows)
    w: Optional[np.ndarray] = None
    if r.sample_weight is not None:
        w = np.array(r.sample_weight, dtype=np.float64).reshape(-1)
        check_sample_weight(w)
    if r.labels is not None:
        keep = (r.labels != r.ignore_index).reshape(-1)
        w = keep.astype(np.float64) if w is None else w * keep
    if r.mask is not None:
        keep = r.mask.reshape(-1)
        w = keep.astype(np.float64) if w is None else w * keep
    return w


class DistillArgs(NamedTuple):
    """One call's arguments, checked: the logits (as the front end's arrays), the scalar
    options, the rows' shape and the front end's row weights (None for none)."""

    student: Any
    teacher: Any
    temperature: float
    reduction: int
    num_threads: int
    rows: Tuple[int, ...]
    row_weight: Any


def check_distill_args(
    student: Any,
    teacher: Any,
    kw: dict,
    *,
    as_logits: Callable[[Any, str], Any] = _as_logits,
    real: ScalarReader = _real,
    row_weight: Callable[..., Any] = _row_weight,
) -> DistillArgs:
    """Every check of a distillation call but direction / beta (the public functions') and
    out= (the NumPy _with_grad form's), in one order for every front end. kw: the keywords
    of _COMMON. The front end says how to read logits (as_logits(v, name): its array, checked
    with check_logits), scalars (real(v, name), as _real) and the row arrays
    (row_weight(rows, labels, ignore_index, mask, sample_weight), as _row_weight: checked
    with check_row_arrays)."""
    s = as_logits(student, "student")
    t = as_logits(teacher, "teacher")
    if t.dtype != s.dtype:
        raise TypeError(f"teacher has dtype {t.dtype}, expected the student's {s.dtype}")
    if tuple(t.shape) != tuple(s.shape):
        raise ValueError(
            f"teacher has shape {tuple(t.shape)}, expected the student's {tuple(s.shape)}"
        )
    if s.shape[-1] == 0:
        raise ValueError("the class axis has no classes (C = 0)")
    opt = check_options(kw, real)
    rows = tuple(s.shape[:-1])
    rw = row_weight(rows, kw["labels"], kw["ignore_index"], kw["mask"], kw["sample_weight"])
    return DistillArgs(s, t, *opt, rows, rw)


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
    student_grad: bool = True,
):
    """The public functions' call: the loss, or with want_grad (loss, grad_student) /
    (loss, grad_student, grad_teacher). student_grad=False (fastxent.torch's, with
    teacher_grad=True and no out=) has the kernel skip the student's gradient: None in its
    place."""
    s, t, tau, red, nt, rows, rw = check_distill_args(student, teacher, kw)
    hk = half_kind(s.dtype)
    gs = gt = None
    if want_grad:
        if student_grad:
            gs = (
                np.empty(s.shape, s.dtype)
                if out is None
                else check_out(out, s, [("teacher", t)], "out", "student")
            )
        elif out is not None or not teacher_grad:
            raise ValueError("student_grad=False goes with teacher_grad=True and no out=")
        if teacher_grad:
            gt = (
                np.empty(t.shape, t.dtype)
                if teacher_out is None
                else check_out(teacher_out, t, [("student", s)], "teacher_out", "teacher")
            )
            if gs is not None and (gs is gt or np.shares_memory(gs, gt)):
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
    temperature : float in [1e-30, 100]
        Both distributions are softmax(logits / temperature); the row loss is multiplied by
        ``temperature**2`` (Hinton et al.), so gradient magnitudes do not shrink with it.
        Outside the range ``temperature**2`` or ``1 / temperature`` would overflow.
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
        Also return the gradient with respect to the teacher's logits (default False). A bool
        or numpy.bool_ (anything else is a TypeError, not read by its truth value).
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
        a mask that is not boolean, a non-numeric temperature / beta, or a teacher_grad that
        is not a bool (or numpy.bool_).
    ValueError
        for mismatched shapes, C = 0, a temperature outside [1e-30, 100] (NaN, inf and
        <= 0 included), beta outside [0, 1], an unknown direction or reduction, bad row
        arrays, and bad ``out=``. On any error nothing is written.
"""


def _kw(kw: dict, name: str) -> dict:
    unknown = set(kw) - set(_COMMON)
    if unknown:
        raise TypeError(f"{name}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    return {**_COMMON, **kw}


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
        flag(teacher_grad, "teacher_grad"),
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
        flag(teacher_grad, "teacher_grad"),
        out,
        teacher_out,
    )


_KL_DOC = """KL divergence between the teacher's and the student's softmax, from logits.

    With ``p = softmax(student / T)``, ``q = softmax(teacher / T)`` per row::

        direction="forward":  loss_n = T**2 * sum_c q_c (log q_c - log p_c)   # KL(q || p)
        direction="reverse":  loss_n = T**2 * sum_c p_c (log p_c - log q_c)   # KL(p || q)

    times the row weight. For a 2-D (N, C) input with no row weighted, "forward" is
    ``F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
    log_target=True, reduction="batchmean") * T**2``. The logits are read once each for the
    loss; no rows x C temporary is made (16-bit rows go through per-thread row buffers).

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
