"""The loss keywords of the public functions: each one's name, default, type, documentation
and validation, written once.

fastxent's functions take their loss options as keyword-only arguments: the NumPy functions
(fastxent.cross_entropy and cross_entropy_with_grad, the shard functions, the fused linear
functions), fastxent.dask, and fastxent.torch's extras beside PyTorch's own keywords. Here:

* ``DEFAULTS``, each option's default, and the TypedDict of its group, its type (type checkers
  read them through ``**kw: Unpack[LossKeywords]``); ``DOCS``, its entry in the numpydoc
  Parameters section.
* :class:`Keywords`, a group's spec: it gives each function that takes the group its public
  signature (``__signature__``, what ``help()``, ``inspect`` and IDEs show: the function's
  own parameters, the group's keywords with their defaults, then its own ``tile_rows``,
  ``scale`` and ``out``), and checks a call's keywords and fills in the defaults
  (:meth:`Keywords.bind`; an unknown keyword is the TypeError Python raises for an
  unexpected keyword argument).
* :class:`LossOptions`, the frozen, validated form of the scalar keywords, field for field
  the compiled ``_core.Options`` (the C++ ``fastxent::Options``) handed whole to every kernel
  entry point, and the validators (``real``, ``index``, ``flag``, ``reduction_code``,
  ``threads``).

A new scalar option is therefore, in Python, this module alone (its default, type, doc, its
LossOptions field and validation line); every function that takes its group then takes,
checks, shows and documents it. In C++ it is its ``fastxent::Options`` field, its binding
(cpp/bindings/register_options.cpp) and stub (_core.pyi), and the kernel code that uses it.

This module does not use ``from __future__ import annotations``: the TypedDicts' annotations
are evaluated, so the signatures show ``Optional[float]``, not strings.
"""

import inspect
import math
import operator
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    List,
    Mapping,
    NamedTuple,
    TYPE_CHECKING,
    Optional,
    Tuple,
    TypedDict,
    TypeVar,
)

import numpy as np

from . import _core

# Unpack, for the front ends' ``**kw: Unpack[...]`` annotations, importable at run time too
# (typing.get_type_hints, typeguard, Sphinx evaluate them).
if TYPE_CHECKING:
    from typing_extensions import Unpack
else:
    try:
        from typing import Unpack  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.9 and 3.10
        try:
            from typing_extensions import Unpack
        except ImportError:

            class Unpack:
                """A stand-in without typing_extensions: Unpack[X] evaluates to X."""

                def __class_getitem__(cls, item: Any) -> Any:
                    return item


__all__ = [
    "DEFAULTS",
    "Keywords",
    "ShardKeywords",
    "ExtraKeywords",
    "LossKeywords",
    "ArrayKeywords",
    "RowStatsKeywords",
    "OUTPUT_NAMES",
    "SHARD",
    "EXTRA",
    "LOSS",
    "ARRAY",
    "STATS",
]

# Every loss keyword with its default, in the order signatures list them.
DEFAULTS: Dict[str, Any] = {
    "axis": -1,
    "reduction": "mean",
    "weight": None,
    "ignore_index": -100,
    "label_smoothing": 0.0,
    "sample_weight": None,
    "z_loss": 0.0,
    "softcap": None,
    "logit_scale": 1.0,
    "normalizer": None,
    "num_threads": None,
    "entropy_coef": 0.0,
    "outputs": None,
}

# The per-row outputs ``outputs=`` may ask for (fastxent.cross_entropy(_with_grad)).
OUTPUT_NAMES: Tuple[str, ...] = ("lse", "entropy", "argmax", "target_logprob", "accuracy")
# Those of them that are per-row floats (differentiable where a front end differentiates them).
FLOAT_OUTPUTS: Tuple[str, ...] = ("lse", "entropy", "target_logprob")


def kernel_outputs(names: Tuple[str, ...]) -> Tuple[str, ...]:
    """The kernel's per-row outputs that checked outputs= `names` need: the float ones asked
    for in FLOAT_OUTPUTS order, then argmax if argmax or accuracy is asked for."""
    floats = tuple(n for n in FLOAT_OUTPUTS if n in names)
    return floats + (("argmax",) if "argmax" in names or "accuracy" in names else ())


class _Transform(TypedDict, total=False):
    """The logit transform and the thread cap (every group has them)."""

    softcap: Optional[float]
    logit_scale: float
    num_threads: Optional[int]


class ShardKeywords(_Transform, total=False):
    """The keywords of :func:`fastxent.shard_stats`: what acts on one shard's columns."""

    weight: Any
    ignore_index: int
    label_smoothing: float


class ExtraKeywords(_Transform, total=False):
    """fastxent's keywords beyond PyTorch's (``weight``, ``reduction``, ``ignore_index`` and
    ``label_smoothing``, which fastxent.torch's functions declare as PyTorch does)."""

    sample_weight: Any
    z_loss: float
    normalizer: Optional[float]


class LossKeywords(ShardKeywords, ExtraKeywords, total=False):
    """Every option of a loss over the class axis last (fastxent.dask, the fused linear
    functions, :func:`fastxent.shard_grad`)."""

    reduction: str


class TorchLinearKeywords(ExtraKeywords, total=False):
    """fastxent.torch.linear_cross_entropy's extra keywords: ExtraKeywords, the per-row
    outputs and the entropy bonus."""

    entropy_coef: float
    outputs: Optional[Tuple[str, ...]]


class LinearKeywords(LossKeywords, total=False):
    """The fused linear functions' keywords (NumPy): every option of a loss, the per-row
    outputs and the entropy bonus."""

    entropy_coef: float
    outputs: Optional[Tuple[str, ...]]


class ArrayKeywords(LossKeywords, total=False):
    """:func:`fastxent.cross_entropy`'s keywords: every option and the class axis."""

    axis: int


class RowStatsKeywords(ArrayKeywords, total=False):
    """:func:`fastxent.cross_entropy(_with_grad)`'s keywords: ArrayKeywords and the per-row
    outputs of the same pass, with the entropy bonus (the class axis last)."""

    entropy_coef: float
    outputs: Optional[Tuple[str, ...]]


F = TypeVar("F", bound=Callable[..., Any])

# A function's own keywords that its signature lists after the loss keywords (the per-call
# extras, as every signature had them before the keywords were written once).
TRAILING = ("tile_rows", "scale", "out")


class Keywords:
    """The keyword-only loss options a group of functions takes (one of the TypedDicts)."""

    def __init__(self, group: type) -> None:
        types = group.__annotations__
        unknown = set(types) - set(DEFAULTS)
        if unknown:
            raise AssertionError(f"keywords without a default: {sorted(unknown)}")
        self.defaults: Dict[str, Any] = {k: v for k, v in DEFAULTS.items() if k in types}
        self.names: FrozenSet[str] = frozenset(self.defaults)
        self._params = [
            inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v, annotation=types[k])
            for k, v in self.defaults.items()
        ]

    def __call__(self, fn: F) -> F:
        """Decorator: the public signature of ``fn(..., **kw)`` with the group's keywords."""
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        last: List[inspect.Parameter] = [p for p in own if p.name in TRAILING]
        first = [p for p in own if p.name not in TRAILING]
        clash = self.names.intersection(p.name for p in own)
        if clash:
            raise AssertionError(f"{fn.__name__} declares {sorted(clash)} itself")
        fn.__signature__ = sig.replace(parameters=first + self._params + last)  # type: ignore[attr-defined]
        return fn

    def bind(self, fname: str, kw: Mapping[str, Any]) -> Dict[str, Any]:
        """Every keyword of the group: the given ones over the defaults. A keyword the group
        does not have raises Python's own TypeError for it."""
        if not self.names.issuperset(kw):
            k = next(k for k in kw if k not in self.names)
            raise TypeError(f"{fname}() got an unexpected keyword argument '{k}'")
        return {**self.defaults, **kw}


# Each keyword's entry in the numpydoc "Parameters" section of fastxent.cross_entropy.
DOCS: Dict[str, str] = {
    "axis": """    axis : int
        The class axis (default -1). Any axis works: PyTorch's (N, C, d1, ..., dk) layout with
        ``axis=1`` is read in place (vectorised across the inner positions, no transposed
        copy); the target then has the logits' shape without that axis.
""",
    "reduction": """    reduction : {"mean", "sum", "none"}
""",
    "weight": """    weight : array_like, shape (C,), optional
        Class weights.
""",
    "ignore_index": """    ignore_index : int
        Rows whose class target equals it count for nothing (default -100; class targets only).
""",
    "label_smoothing": """    label_smoothing : float in [0, 1]
""",
    "sample_weight": """    sample_weight : array_like, shape ``logits.shape[:-1]``, optional
        Per-row weights, combined with class weights and smoothing.
""",
    "z_loss": """    z_loss : float >= 0
        Adds ``z_loss * lse**2`` per counted row (PaLM's auxiliary loss).
""",
    "softcap": """    softcap : float > 0, optional
        Logits pass through ``softcap * tanh(z / softcap)`` before the softmax (Gemma 2).
""",
    "logit_scale": """    logit_scale : float > 0
        Logits are multiplied by it first (inverse temperature).
""",
    "normalizer": """    normalizer : float >= 0, optional
        The denominator of "mean" (e.g. the global token count across accumulation steps).
""",
    "num_threads": """    num_threads : int, optional
        Caps the OpenMP threads of this call (default: OpenMP's, i.e. OMP_NUM_THREADS or a
        threadpoolctl limit). Results are bitwise identical for every thread count.
""",
    "entropy_coef": """    entropy_coef : float >= 0
        beta: the loss becomes ``CE - beta * reduce(s_n * entropy_n)`` over counted rows
        (``s_n`` the sample weight; the same reduction and denominator ``D`` as the loss),
        with its exact gradient (an entropy bonus). Class axis last.
""",
    "outputs": """    outputs : tuple of str, optional
        Per-row statistics from the same pass, any of "lse", "entropy", "argmax",
        "target_logprob", "accuracy"; the call then returns ``(loss, stats)`` (or
        ``(loss, grad, stats)``), ``stats`` a :class:`fastxent.RowStats` holding the requested
        fields (the others None): ``lse = logsumexp(z')``, ``entropy = lse - sum_c p_c z'_c``
        (``p = softmax(z')``), ``argmax`` (int64, the first index of the largest logit; a row
        holding NaN gives its first NaN's index, as torch.argmax) and ``target_logprob =
        z'[y] - lse`` (0 for ignored rows) have the target's shape, every row computed,
        ignored ones included; ``accuracy`` is the fraction of counted rows (unweighted)
        whose argmax is the target, a float (0.0 when no row counts). A row of all -inf has
        lse -inf, target_logprob -inf, entropy log C, argmax 0 (with a softcap its logits
        are all -softcap instead: a uniform row, lse = -softcap + log C, target_logprob
        -log C). Class axis last
        (``axis=-1``); target_logprob and accuracy need class targets. 16-bit logits give
        float32 statistics (their compute dtype, as the loss).
""",
}


def keyword_docs(group: "Keywords") -> str:
    """The Parameters entries of a group's keywords, in their order."""
    return "".join(DOCS[k] for k in group.defaults)


SHARD = Keywords(ShardKeywords)
EXTRA = Keywords(ExtraKeywords)
LOSS = Keywords(LossKeywords)
LINEAR = Keywords(LinearKeywords)
TORCH_LINEAR = Keywords(TorchLinearKeywords)
ARRAY = Keywords(ArrayKeywords)
STATS = Keywords(RowStatsKeywords)


# ---------------------------------------------------------------------------- validation

REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


def real(v: Any, name: str, lo: float, lo_open: bool) -> float:
    """v as a finite float >= lo (> lo when lo_open); TypeError / ValueError naming it."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}") from None
    if not math.isfinite(f) or f < lo or (lo_open and f == lo):
        raise ValueError(f"{name} must be finite and {'>' if lo_open else '>='} {lo:g}, got {v!r}")
    return f + 0.0  # -0.0 as 0.0: equal options are then equal bit for bit (see core)


def index(v: Any, name: str) -> int:
    """v as a Python int (operator.index); TypeError naming it."""
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}") from None


def flag(v: Any, name: str) -> bool:
    """v as a Python bool: a bool or a numpy.bool_ only, TypeError naming it otherwise (a
    string such as "no", an integer, None or an array would be read by its truth value)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise TypeError(f"{name} must be a bool (True or False), got {type(v).__name__}: {v!r}")


def reduction_code(reduction: Any) -> int:
    """0 for "none", 1 for "sum", 2 for "mean"."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return REDUCTIONS[reduction]


# The largest num_threads: the kernel's count is a C int (fastxent::Options::num_threads, the
# bindings' and the XLA handlers' int), and OpenMP caps a team at its own thread limit anyway.
MAX_THREADS = 2**31 - 1


def threads(num_threads: Any) -> int:
    """num_threads (None or in [1, MAX_THREADS]) as the kernel's count, 0 meaning OpenMP's
    default. Every front end's check (NumPy, shard, sigmoid, companion, distillation and
    linear functions; fastxent.torch and fastxent.jax through them)."""
    if num_threads is None:
        return 0
    if isinstance(num_threads, (bool, np.bool_)):  # operator.index(True) is 1
        raise TypeError(f"num_threads must be None or a positive integer, got {num_threads!r}")
    try:
        nt = operator.index(num_threads)
    except TypeError:
        raise TypeError("num_threads must be None or a positive integer") from None
    if nt < 1:
        raise ValueError(f"num_threads must be None or >= 1, got {num_threads}")
    if nt > MAX_THREADS:
        raise ValueError(
            f"num_threads must be at most {MAX_THREADS} (the kernel's count is a C int), "
            f"got {num_threads}"
        )
    return nt


def common_options(
    reduction: Any, ignore_index: Any, label_smoothing: Any, num_threads: Any
) -> Tuple[int, int, float, int]:
    """(reduction code, ignore_index, label_smoothing, thread count), checked in that order."""
    red = reduction_code(reduction)
    try:
        ii = operator.index(ignore_index)
    except TypeError:
        raise TypeError("ignore_index must be an integer") from None
    if not -(2**63) <= ii < 2**63:
        raise ValueError("ignore_index must fit in int64")
    eps = float(label_smoothing) + 0.0  # -0.0 as 0.0 (see LossOptions.core)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return red, ii, eps, threads(num_threads)


class LossOptions(NamedTuple):
    """The validated scalar options of one call, field for field those of ``_core.Options``
    (the C++ ``fastxent::Options``): reduction 0 none / 1 sum / 2 mean, softcap 0 = off,
    normalizer None = the default denominator, num_threads 0 = OpenMP's default. Immutable
    (a NamedTuple: cheap to build per call, and a cache key)."""

    reduction: int = 2
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0
    logit_scale: float = 1.0
    normalizer: Optional[float] = None
    num_threads: int = 0
    entropy_coef: float = 0.0

    @classmethod
    def from_keywords(
        cls,
        reduction: Any = "mean",
        ignore_index: Any = -100,
        label_smoothing: Any = 0.0,
        z_loss: Any = 0.0,
        softcap: Any = None,
        logit_scale: Any = 1.0,
        normalizer: Any = None,
        num_threads: Any = None,
        entropy_coef: Any = 0.0,
    ) -> "LossOptions":
        """The public keywords, checked in this order (the first bad one raises)."""
        red, ii, eps, nt = common_options(reduction, ignore_index, label_smoothing, num_threads)
        return cls(
            red,
            ii,
            eps,
            real(z_loss, "z_loss", 0.0, False),
            0.0 if softcap is None else real(softcap, "softcap", 0.0, True),
            real(logit_scale, "logit_scale", 0.0, True),
            None if normalizer is None else real(normalizer, "normalizer", 0.0, False),
            nt,
            real(entropy_coef, "entropy_coef", 0.0, False),
        )

    def core(self) -> Any:
        """These values as a ``_core.Options``, from a small cache keyed by the options
        themselves (building one costs about 0.7 us, a lookup 0.1 us; a training loop calls
        with the same options every step). Equal keys are the same options bit for bit: the
        fields are converted ints and floats, no NaN passes validation, and validation turns
        -0.0 into 0.0 (the one pair of equal floats that differ). The cached objects are
        never modified."""
        opt = _CORE_CACHE.get(self)
        if opt is None:
            if len(_CORE_CACHE) >= 64:
                _CORE_CACHE.clear()
            opt = _CORE_CACHE[self] = _core.Options(*self)
        return opt


_CORE_CACHE: "dict[LossOptions, Any]" = {}


def output_names(outputs: Any) -> Tuple[str, ...]:
    """outputs= checked: a tuple (or list) of distinct names from OUTPUT_NAMES, in the
    order given. TypeError / ValueError naming the bad one."""
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(
            f"outputs must be a tuple of names from {OUTPUT_NAMES}, got {type(outputs).__name__}"
        )
    for name in outputs:
        if not isinstance(name, str) or name not in OUTPUT_NAMES:
            raise ValueError(f"outputs: unknown output {name!r}; choose from {OUTPUT_NAMES}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs: a name is repeated in {tuple(outputs)!r}")
    return tuple(outputs)
