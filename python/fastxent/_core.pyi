# Stubs of the compiled module fastxent._core (private: the public API is fastxent.*).
# tests/test_typing.py runs mypy's stubtest against the built module so these cannot drift.
from typing import Any, Optional, SupportsFloat, SupportsIndex, SupportsInt, Union

import numpy

_Int = Union[SupportsInt, SupportsIndex]
_Float = Union[SupportsFloat, SupportsIndex]

__version__: str
build_info: dict[str, Any]

def active_isa() -> str: ...
def available_isas() -> list[str]: ...
def set_isa(name: str) -> None: ...
def default_num_threads() -> int: ...
def has_openmp() -> bool: ...
def companion(x: numpy.ndarray, out: numpy.ndarray, which: _Int, num_threads: _Int,
              g: object = ...) -> None: ...
def cross_entropy(logits: numpy.ndarray, target: object, probs: object, weight: object,
                  sample_weight: object, reduction: _Int, ignore_index: _Int,
                  label_smoothing: _Float, z_loss: _Float, softcap: _Float,
                  logit_scale: _Float, normalizer: object, num_threads: _Int, grad: object,
                  row_losses: object) -> float: ...
def cross_entropy_simple(logits: numpy.ndarray, target: object, reduction: _Int, grad: object,
                         row_losses: object, num_threads: _Int = ...) -> float: ...
def cross_entropy_half(logits: numpy.ndarray, kind: _Int, target: object, probs: object,
                       weight: object, sample_weight: object, reduction: _Int,
                       ignore_index: _Int, label_smoothing: _Float, z_loss: _Float,
                       softcap: _Float, logit_scale: _Float, normalizer: object,
                       num_threads: _Int, grad: object, row_losses: object) -> float: ...
def sigmoid_cross_entropy(logits: numpy.ndarray, target: object, pos_weight: object,
                          pos_weight_mode: _Int, weight: object, weight_mode: _Int, last: _Int,
                          reduction: _Int, num_threads: _Int, grad: object,
                          losses: object) -> float: ...
