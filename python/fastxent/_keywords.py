"""The loss keywords of the public functions, each written down once.

fastxent's functions take their loss options as keyword-only arguments: the NumPy functions
(fastxent.cross_entropy and cross_entropy_with_grad, the shard functions, the fused linear
functions), fastxent.dask, and fastxent.torch's extras beside PyTorch's own keywords. Each
option's name and default stand once, in ``DEFAULTS``, and its type once, in the TypedDict of
its group, which type checkers read through ``**kw: Unpack[LossKeywords]``. A function
declares the group it takes with a :class:`Keywords` spec, which

* gives the function its public signature (``__signature__``, what ``help()``, ``inspect``
  and IDEs show): its own positional and required keyword-only parameters, the group's
  keywords with their defaults, then its own optional keyword-only parameters;
* checks a call's keywords and fills in the defaults (:meth:`Keywords.bind`); an unknown
  keyword is the TypeError Python raises for an unexpected keyword argument.

A new option is its default in ``DEFAULTS`` and its type in the TypedDict of its group; every
function that takes the group then takes it, checks it and shows it. (Its validation is in
_options.LossOptions.)

This module does not use ``from __future__ import annotations``: the TypedDicts' annotations
are evaluated, so the signatures show ``Optional[float]``, not strings.
"""

import inspect
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, TypedDict, TypeVar

__all__ = [
    "DEFAULTS",
    "Keywords",
    "ShardKeywords",
    "ExtraKeywords",
    "LossKeywords",
    "ArrayKeywords",
    "SHARD",
    "EXTRA",
    "LOSS",
    "ARRAY",
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
}


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


class ArrayKeywords(LossKeywords, total=False):
    """:func:`fastxent.cross_entropy`'s keywords: every option and the class axis."""

    axis: int


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


SHARD = Keywords(ShardKeywords)
EXTRA = Keywords(ExtraKeywords)
LOSS = Keywords(LossKeywords)
ARRAY = Keywords(ArrayKeywords)
