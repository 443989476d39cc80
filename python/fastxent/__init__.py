"""fastxent: the fused softmax cross-entropy (loss and gradient in one pass) on the CPU.

>>> import numpy as np, fastxent as fx
>>> logits = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
>>> loss, grad = fx.cross_entropy_with_grad(logits, np.array([1, 0, 9, 3]))

See :func:`cross_entropy` and :func:`cross_entropy_with_grad` for the exact contract.
"""

from __future__ import annotations

import os as _os
from typing import List

from . import _core
from ._api import RowStats, cross_entropy, cross_entropy_with_grad
from ._linear import linear_cross_entropy, linear_cross_entropy_with_grad
from ._distill import (
    jsd_with_logits,
    jsd_with_logits_with_grad,
    kl_div_with_logits,
    kl_div_with_logits_with_grad,
)
from ._distill_sparse import (
    jsd_with_topk_teacher,
    jsd_with_topk_teacher_with_grad,
    kl_div_with_topk_teacher,
    kl_div_with_topk_teacher_with_grad,
)
from ._distill_linear import (
    linear_jsd,
    linear_jsd_with_grad,
    linear_kl_div,
    linear_kl_div_with_grad,
)
from ._companions import log_softmax, logsumexp, softmax, softmax_backward, softmax_jacobian
from ._shard import (
    OUTPUT_STAT_FIELDS,
    STAT_FIELDS,
    loss_from_stats,
    merge_output_stats,
    merge_stats,
    outputs_from_stats,
    shard_grad,
    shard_stats,
    stats_denominator,
)
from ._sigmoid import sigmoid_cross_entropy, sigmoid_cross_entropy_with_grad

__version__: str = _core.__version__

__all__ = [
    "cross_entropy",
    "cross_entropy_with_grad",
    "RowStats",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "linear_kl_div",
    "linear_kl_div_with_grad",
    "linear_jsd",
    "linear_jsd_with_grad",
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_backward",
    "softmax_jacobian",
    "sigmoid_cross_entropy",
    "sigmoid_cross_entropy_with_grad",
    "kl_div_with_logits",
    "kl_div_with_logits_with_grad",
    "jsd_with_logits",
    "jsd_with_logits_with_grad",
    "kl_div_with_topk_teacher",
    "kl_div_with_topk_teacher_with_grad",
    "jsd_with_topk_teacher",
    "jsd_with_topk_teacher_with_grad",
    "STAT_FIELDS",
    "shard_stats",
    "merge_stats",
    "loss_from_stats",
    "shard_grad",
    "stats_denominator",
    "OUTPUT_STAT_FIELDS",
    "merge_output_stats",
    "outputs_from_stats",
    "available_isas",
    "active_isa",
    "__version__",
]


def available_isas() -> List[str]:
    """The instruction sets this CPU and OS can run, best last (e.g. ['scalar', 'avx2'])."""
    return list(_core.available_isas())


def active_isa() -> str:
    """The instruction set the kernel runs with (the best available, or FASTXENT_ISA)."""
    return str(_core.active_isa())


def _select_isa_from_env() -> None:
    name = _os.environ.get("FASTXENT_ISA", "").strip().lower()
    try:
        _core.set_isa(name)
    except ValueError as e:
        raise ImportError(f"FASTXENT_ISA={name!r}: {e}") from e


_select_isa_from_env()
