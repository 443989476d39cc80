# Stubs of the compiled module fastxent._core (private: the public API is fastxent.*).
# tests/test_typing.py runs mypy's stubtest against the built module so these cannot drift.
from typing import Any, Optional, SupportsFloat, SupportsIndex, SupportsInt, Union, overload

import numpy

_Int = Union[SupportsInt, SupportsIndex]
_Float = Union[SupportsFloat, SupportsIndex]

__version__: str
build_info: dict[str, Any]
STAT_FIELDS: int
OUT_FIELDS: int

class Options:
    reduction: int
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float
    logit_scale: float
    normalizer: Optional[float]
    num_threads: int
    entropy_coef: float
    @overload
    def __init__(self) -> None: ...
    @overload
    def __init__(
        self,
        reduction: _Int,
        ignore_index: _Int,
        label_smoothing: _Float,
        z_loss: _Float,
        softcap: _Float,
        logit_scale: _Float,
        normalizer: object,
        num_threads: _Int,
        entropy_coef: _Float = ...,
    ) -> None: ...

def active_isa() -> str: ...
def available_isas() -> list[str]: ...
def set_isa(name: str) -> None: ...
def default_num_threads() -> int: ...
def block_classes(itemsize: int) -> int: ...
def stream_bytes() -> int: ...
def has_openmp() -> bool: ...
def companion(
    x: numpy.ndarray, out: numpy.ndarray, which: _Int, num_threads: _Int, g: object = ...
) -> None: ...
def cross_entropy(
    logits: numpy.ndarray,
    target: object,
    probs: object,
    weight: object,
    sample_weight: object,
    options: Options,
    grad: object,
    row_losses: object,
    lse: object = ...,
    entropy: object = ...,
    argmax: object = ...,
    target_logprob: object = ...,
) -> float: ...
def fast_call(
    logits: object, target: object, reduction: _Int, want_grad: bool, out: object, num_threads: _Int
) -> Any: ...
def fast_call_raw(
    logits: _Int,
    rows: _Int,
    classes: _Int,
    itemsize: _Int,
    target: _Int,
    reduction: _Int,
    grad: _Int,
    loss: _Int,
) -> bool: ...
def cross_entropy_half(
    logits: numpy.ndarray,
    kind: _Int,
    target: object,
    probs: object,
    weight: object,
    sample_weight: object,
    options: Options,
    grad: object,
    row_losses: object,
    lse: object = ...,
    entropy: object = ...,
    argmax: object = ...,
    target_logprob: object = ...,
) -> float: ...
def sigmoid_cross_entropy(
    logits: numpy.ndarray,
    target: object,
    pos_weight: object,
    pos_weight_mode: _Int,
    weight: object,
    weight_mode: _Int,
    last: _Int,
    options: Options,
    grad: object,
    losses: object,
) -> float: ...
def distill(
    student: numpy.ndarray,
    teacher: numpy.ndarray,
    divergence: _Int,
    beta: float,
    temperature: float,
    reduction: _Int,
    row_weight: object,
    num_threads: _Int,
    half: _Int,
    grad_student: object,
    grad_teacher: object,
    row_losses: object,
) -> float: ...
def shard_stats(
    logits: numpy.ndarray,
    target: object,
    probs: object,
    weight: object,
    offset: _Int,
    num_classes: _Int,
    options: Options,
    out: object,
    outs: object = None,
) -> None: ...
def merge_stats(a: object, b: object, out: object) -> None: ...
def merge_output_stats(a: object, b: object, out: object) -> None: ...
def stats_loss(
    stats: object, sample_weight: object, options: Options, num_classes: _Int, row_losses: object
) -> float: ...
def stats_denominator(stats: object, sample_weight: object) -> float: ...
def shard_grad(
    logits: numpy.ndarray,
    target: object,
    probs: object,
    weight: object,
    stats: object,
    sample_weight: object,
    offset: _Int,
    num_classes: _Int,
    options: Options,
    scale: _Float,
    grad: object,
) -> None: ...
