"""PyTorch integration: fastxent's fused cross-entropy as a drop-in for ``F.cross_entropy``.

>>> import torch, fastxent.torch as fxt
>>> logits = torch.randn(8, 5, requires_grad=True)
>>> loss = fxt.cross_entropy(logits, torch.randint(0, 5, (8,)))
>>> loss.backward()          # the gradient was computed by the forward pass; this scales it

How it works: a ``torch.autograd.Function`` whose forward calls
:func:`fastxent.cross_entropy_with_grad` on zero-copy NumPy views of the (CPU) tensors, so the
loss and its gradient with respect to the logits come out of one pass over memory. The
gradient is kept for the backward pass, which only multiplies it by the incoming gradient
(``grad_output``; per row for ``reduction="none"``). When no gradient is needed (no input
requires grad, or grad mode is off) the forward-only kernel :func:`fastxent.cross_entropy` runs
instead and nothing of the logits' size is written.

:func:`vocab_parallel_cross_entropy` is the tensor-parallel variant: each rank of a
``torch.distributed`` process group holds a slice of the vocabulary (Megatron-LM's
vocab-parallel layout), the forward pass merges per-shard statistics with two all-reduces and
the backward pass is local.

This module holds the public names; the implementation is in private modules, by concern:
``_torch_common`` (tensor <-> NumPy plumbing, dtypes, targets, the reference loss in PyTorch
ops), ``_torch_fast`` (the gradient buffer pool, the fused call, the lean path of a plain call),
``_torch_autograd`` (the autograd Function and the dispatch of a call with options),
``_torch_nodata`` (checks without tensor values, torch.func, the custom op for torch.compile),
``_torch_bce`` (sigmoid cross-entropy), ``_torch_distill`` (distillation losses: KL, JSD),
``_torch_distill_sparse`` (the same from a sparse top-k teacher), ``_torch_distill_linear``
(the same from hidden states and head weights) and ``_torch_vocab`` (vocab-parallel).

Requires the optional extra: ``pip install fastxent[torch]``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, cast

try:
    import torch
except ImportError as _e:  # pragma: no cover - exercised without torch installed
    raise ImportError("fastxent.torch needs PyTorch: pip install 'fastxent[torch]'") from _e
from torch import Tensor, nn

from ._keywords import EXTRA, ExtraKeywords, Unpack, output_names, real
from ._options import common_options
from ._torch_autograd import general_cross_entropy, stats_cross_entropy, without_idle_stats
from ._torch_bce import BCEWithLogitsLoss, binary_cross_entropy_with_logits
from ._torch_distill import (
    JSDWithLogitsLoss,
    KLDivWithLogitsLoss,
    jsd_with_logits,
    kl_div_with_logits,
)
from ._torch_distill_sparse import jsd_with_topk_teacher, kl_div_with_topk_teacher
from ._torch_distill_linear import linear_jsd, linear_kl_div
from ._torch_fast import is_compiling, kept_buffer_bytes, lean_call, release_buffers
from ._torch_nodata import validate_options
from ._torch_vocab import vocab_parallel_cross_entropy

__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "binary_cross_entropy_with_logits",
    "BCEWithLogitsLoss",
    "kl_div_with_logits",
    "KLDivWithLogitsLoss",
    "jsd_with_logits",
    "JSDWithLogitsLoss",
    "kl_div_with_topk_teacher",
    "jsd_with_topk_teacher",
    "linear_kl_div",
    "linear_jsd",
    "vocab_parallel_cross_entropy",
    "release_buffers",
    "kept_buffer_bytes",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "vocab_parallel_linear_cross_entropy",
    "patch_causal_lm",
    "unpatch_causal_lm",
]

_DOC_OPTIONS = """
    ``**fastxent_options`` (keyword-only) are those of :func:`fastxent.cross_entropy`:

    * ``sample_weight``: tensor (or array) of the target's shape for class-index targets,
      the rows' shape ``(N, d1, ..., dk)`` in all cases: per-row weights;
    * ``z_loss`` (float >= 0): adds ``z_loss * logsumexp(z)**2`` per counted row;
    * ``softcap`` (float > 0): logits pass through ``softcap * tanh(z / softcap)`` first;
    * ``logit_scale`` (float > 0): logits are multiplied by it first;
    * ``normalizer`` (float >= 0): the denominator of ``"mean"`` instead of the weight sum;
    * ``num_threads`` (int): caps the kernel's OpenMP threads for this call.

    ``inplace`` (bool, default False): write the gradient into the input's own memory (the
    ``out=logits`` mode of :func:`fastxent.cross_entropy_with_grad`), so no second buffer of
    the logits' size is allocated: the Liger-kernel trick for huge vocabularies.
    **Hazard**: after the call ``input`` holds the gradient, not the logits. That is only
    right when nothing else needs the logit values afterwards; e.g. the output of an
    ``nn.Linear`` head (whose backward needs its input and weight, not its output) that you
    do not read again. The version counter of ``input`` is bumped, so an autograd node that
    saved these values (a ``tanh``, ``softmax``, ``exp`` ... that produced them) makes
    ``backward()`` fail with PyTorch's "modified by an inplace operation" error rather than
    compute a wrong gradient; code outside autograd that reads ``input`` again (accuracy from
    the logits, logging) sees the gradient and cannot be protected. The backward pass scales
    the gradient in place as well, so it can run only once (a second ``backward`` with
    ``retain_graph=True`` raises, unless grad_output was exactly 1). ``inplace`` acts only
    when a gradient is computed: without one the input is left untouched. Refused (ValueError)
    for a non-contiguous input, and for a leaf tensor that requires grad or a view of one (a
    parameter: its values would be destroyed).
"""

_DOC_DIFF = """
    Differences from ``F.cross_entropy`` (deliberate, those of fastxent): when no row counts
    (all ignored, zero rows, or a zero weight sum) ``"mean"`` is 0.0 instead of NaN; an
    ignored row's loss and gradient are 0 whatever its logits hold. Class-index targets may
    have any integer dtype (PyTorch wants int64 or uint8). ``input`` and a probability
    ``target`` are differentiable; a ``weight`` or ``sample_weight`` that requires grad is
    refused (PyTorch refuses ``weight`` too). Under ``torch.compile`` the kernel is the
    custom op ``torch.ops.fastxent.cross_entropy`` (no graph break; only the logits are
    differentiable there).

    Derivatives: first order with respect to ``input`` from the fused kernel; second order
    (``create_graph=True``), a probability target's gradient and ``torch.func`` transforms
    (``grad``, ``vmap``, ``jvp``, ``jacrev``, ``hessian``) through the same formula in PyTorch
    ops (materialising, at PyTorch's speed); forward mode (``torch.autograd.forward_ad``) as
    ``<gradient, tangent>`` per row. After ``inplace=True`` a second-order or target
    derivative raises RuntimeError (the logits are gone). The scalar options
    (``label_smoothing``, ``z_loss``, ``softcap``, ``logit_scale``, ``normalizer``) are
    constants: a tensor given for one is read as a number, so one that requires grad, carries
    a forward-mode tangent, or is differentiated or mapped over by a ``torch.func`` transform
    (``grad`` with respect to ``normalizer``, ``vmap`` over it) raises RuntimeError.
"""


@EXTRA
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace: bool = False,
    **fastxent_options: Unpack[ExtraKeywords],
) -> Tensor:
    if size_average is not None or reduce is not None:
        # PyTorch's own translation of the deprecated arguments, with its warning.
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if (
        weight is None
        and not fastxent_options
        and ignore_index == -100
        and not isinstance(label_smoothing, Tensor)  # (== on a vmapped one cannot be read)
        and label_smoothing == 0.0
        and inplace is False
        and not is_compiling()
    ):
        res = lean_call(input, target, reduction)
        if res is not None:
            return res
    # **fastxent_options is a plain dict at run time (the TypedDict is for type checkers).
    opts = cast(Dict[str, Any], fastxent_options)
    opts, run = _route(opts)
    return run(input, target, weight, ignore_index, reduction, label_smoothing, inplace, opts)


def _route(opts: Dict[str, Any]) -> Tuple[Dict[str, Any], Callable[..., Any]]:
    """The options and the path of a cross_entropy call: the statistics' path for outputs= or
    a non-zero entropy_coef, else the general one (outputs=None and a plain entropy_coef of 0
    dropped: the plain call)."""
    if "outputs" in opts or "entropy_coef" in opts:
        opts = without_idle_stats(opts)
        if "outputs" in opts or "entropy_coef" in opts:
            return opts, stats_cross_entropy
    return opts, general_cross_entropy


cross_entropy.__doc__ = (
    """Cross-entropy loss with the signature and semantics of
    ``torch.nn.functional.cross_entropy``, computed by fastxent's fused CPU kernel.

    For logits ``z`` (class dimension 1 of ``input``, or 0 for an unbatched ``(C,)`` input),
    class weights ``w`` and smoothing ``eps``, a counted row n (``target[n] !=
    ignore_index``) costs::

        row_n = (1 - eps) * w[y_n] * (lse_n - z[n, y_n]) + (eps / C) * sum_c w_c * (lse_n - z[n, c])

    with ``lse_n = logsumexp(z_n)``; ``"sum"`` adds the rows, ``"mean"`` divides the sum by
    ``sum_n w[y_n]`` over counted rows, ``"none"`` returns them (ignored rows: 0). With
    probability targets ``p`` (a float target of the input's shape) the row is
    ``sum_c w_c q[n, c] (lse_n - z[n, c])`` with ``q = (1 - eps) p + eps / C`` and ``"mean"``
    divides by the number of rows. The full formula with the fastxent options (sample
    weights, z-loss, softcap, logit scale, normalizer) is in :func:`fastxent.cross_entropy`.

    The gradient with respect to ``input`` is computed by the forward pass, in the same
    kernel call, whenever ``input`` requires grad (and grad mode is on); the backward pass
    only multiplies it by ``grad_output``. Otherwise only the loss is computed.

    Parameters
    ----------
    input : Tensor, shape (C,), (N, C) or (N, C, d1, ..., dk), on the CPU
        float32 and float64 are read in place (zero-copy), and so are float16 and bfloat16
        (see Mixed precision below for the one exception). The
        class dimension 1 of a (N, C, d1, ..., dk) input is read in place by fastxent's
        ``axis=1`` support (no transposed copy); a non-contiguous input is copied first.
    target : Tensor
        Class indices (any integer dtype) of shape (), (N,) or (N, d1, ..., dk), in
        ``[0, C)`` or equal to ``ignore_index``; or class probabilities, a float tensor of
        the input's shape.
    weight : Tensor of shape (C,), optional
        Class weights.
    size_average, reduce : bool, optional
        PyTorch's deprecated arguments, in PyTorch's positions: translated to ``reduction``
        by PyTorch's own helper, with its deprecation warning.
    ignore_index : int
        Class-index rows equal to it count for nothing (default -100).
    reduction : {"mean", "sum", "none"}
    label_smoothing : float in [0, 1]
"""
    + _DOC_OPTIONS
    + """
    The positional order is ``F.cross_entropy``'s; ``inplace`` and fastxent's options are
    keyword-only.

    Per-row outputs and the entropy bonus, as in :func:`fastxent.cross_entropy`:
    ``entropy_coef=beta`` (>= 0) makes the loss ``CE - beta * reduce(s_n * entropy_n)`` over
    counted rows, its exact gradient fused into the kernel's (second order and forward mode
    through the reference, as for every option). ``outputs=`` (names from "lse", "entropy",
    "argmax", "target_logprob", "accuracy") returns ``(loss, stats)``, ``stats`` a
    :class:`fastxent.RowStats` of tensors of the rows' shape (argmax int64, accuracy a
    float), from the same kernel call. lse, entropy and target_logprob are differentiable:
    their vector-Jacobian product is taken through their formula in PyTorch ops over tiles of
    at most 2^20 logits (create_graph=True and a probability target's gradient: through the
    reference loss and statistics). Input of shape (C,) or (N, C) (16-bit logits: float32
    statistics, their gradient summed with the fused one in float32 and rounded once), eager
    only: ``torch.compile`` runs the call eagerly (a graph break; ``fullgraph=True`` fails),
    and ``torch.func`` transforms, fake or meta tensors, ``inplace=True`` and a forward-mode
    tangent (outputs only) raise NotImplementedError. ``outputs=None`` and a float
    ``entropy_coef=0.0`` are the plain call. A statistic kept for logging holds its graph
    node: ``.detach()`` it, or the logits it was computed from stay referenced. The
    statistics of a row of all -inf have derivative 0.

    Memory: the default (``inplace=False``) path writes the gradient into a buffer it keeps
    between calls (at most two, of 1 MiB or more each), handed out again only once no tensor
    references it any more (the gradient autograd passed on, a ``.grad`` that kept it, any
    view): a training loop then pays no page faults for a fresh logits-sized array each step.
    :func:`kept_buffer_bytes` says how much is kept, :func:`release_buffers` frees it.

    Mixed precision: float16 / bfloat16 logits are read in place by the kernel's 16-bit path
    (float32 arithmetic, the gradient rounded once to the input's dtype; bfloat16 needs
    ml_dtypes, part of the ``torch`` extra, else a float32 copy is made). Under
    ``torch.autocast("cpu")`` the loss of 16-bit logits is float32, as PyTorch's.

    torch.compile, FakeTensor and ``meta``: the kernel is the custom op
    ``torch.ops.fastxent.cross_entropy`` (with a fake implementation and an autograd formula),
    so ``torch.compile(fullgraph=True)`` traces it as one node, and fake or meta logits get
    shape inference. There, only the logits are differentiable and ``inplace`` is ignored.

    Returns
    -------
    Tensor of the input's dtype: a scalar for ``"mean"`` / ``"sum"``, the target's (rows')
    shape for ``"none"``.
"""
    + _DOC_DIFF
    + """
    Raises
    ------
    ValueError
        the shape, range and option errors of :func:`fastxent.cross_entropy`;
        ``inplace=True`` on a leaf that requires grad or on a non-contiguous input.
    TypeError
        a tensor on a device other than the CPU (fastxent is a CPU kernel; ``meta`` and fake
        logits get shape inference instead); an input dtype other than
        float32/float64/float16/bfloat16; a target that is neither integer nor float;
        ``axis=`` or ``out=`` given (they are set here).
    IndexError
        a class index outside ``[0, C)`` that is not ``ignore_index``.
    RuntimeError
        ``weight`` or ``sample_weight`` that requires grad; a scalar option that is a tensor
        requiring grad or a ``torch.func`` transform's (see above); a second backward through an
        ``inplace=True`` call that scaled the gradient in place; a second-order or target
        derivative after ``inplace=True``, or after the logits were changed in place.

    Example
    -------
    >>> import torch, fastxent.torch as fxt
    >>> z = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3]], requires_grad=True)
    >>> loss = fxt.cross_entropy(z, torch.tensor([0, 1]), label_smoothing=0.1)
    >>> loss.backward()
    >>> torch.allclose(loss, torch.nn.functional.cross_entropy(
    ...     z, torch.tensor([0, 1]), label_smoothing=0.1))
    True
"""
)


_STATS_ARGS = ("outputs", "entropy_coef")  # the loss's per-row outputs and entropy bonus
_MODULE_ARGS = frozenset(
    ("weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing", "inplace")
)


class CrossEntropyLoss(nn.Module):
    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average: Optional[bool] = None,
        ignore_index: int = -100,
        reduce: Optional[bool] = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        inplace: bool = False,
        **fastxent_options: Any,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        # Every option is checked here, not at the first forward.
        stats_opts = {k: fastxent_options[k] for k in _STATS_ARGS if k in fastxent_options}
        if stats_opts.get("outputs") is not None:
            output_names(stats_opts["outputs"])
        if "entropy_coef" in stats_opts:
            real(stats_opts["entropy_coef"], "entropy_coef", 0.0, False)
        validate_options(
            {k: v for k, v in fastxent_options.items() if k not in _STATS_ARGS},
            "CrossEntropyLoss",
        )
        common_options(
            reduction, ignore_index, label_smoothing, fastxent_options.get("num_threads")
        )
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
        if weight is not None and not isinstance(weight, Tensor):
            weight = torch.as_tensor(weight)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.inplace = inplace
        self.fastxent_options = dict(fastxent_options)

    def forward(self, input: Tensor, target: Tensor, **fastxent_options: Any) -> Tensor:
        opts = self.fastxent_options
        if fastxent_options:
            fixed = _MODULE_ARGS.intersection(fastxent_options)
            if fixed:
                # They went into the options dict and were silently ignored (the module's own
                # value used): a per-call label_smoothing=0.5 gave the unsmoothed loss.
                raise TypeError(
                    f"CrossEntropyLoss.forward() got {', '.join(sorted(fixed))}: "
                    f"{', '.join(sorted(_MODULE_ARGS))} are set in the constructor; forward "
                    "takes fastxent's per-batch options (sample_weight, normalizer, ...)"
                )
            opts = {**opts, **fastxent_options}
        opts, run = _route(opts)
        return run(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            self.inplace,
            opts,
        )

    def extra_repr(self) -> str:
        s = (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}"
        )
        if self.inplace:
            s += ", inplace=True"
        for k, v in self.fastxent_options.items():
            s += f", {k}={v!r}"
        return s


CrossEntropyLoss.__doc__ = """``torch.nn.CrossEntropyLoss`` computed by fastxent's fused CPU
    kernel: ``CrossEntropyLoss(...)(input, target)`` is :func:`cross_entropy` with the
    constructor's options.

    Constructor: PyTorch's signature and positions, ``weight`` (class weights, a registered
    buffer as in PyTorch, so ``.to()``, ``.double()`` and ``state_dict()`` carry it),
    ``size_average``, ``ignore_index``, ``reduce``, ``reduction``, ``label_smoothing`` (the
    deprecated ``size_average`` and ``reduce`` translated with PyTorch's warning), then
    keyword-only ``inplace`` and the ``**fastxent_options`` of :func:`cross_entropy`
    (``z_loss``, ``softcap``, ``logit_scale``, ``normalizer``, ``num_threads``,
    ``entropy_coef``, ``outputs``: with ``outputs`` the module returns ``(loss, stats)``).
    ``forward(input, target, **fastxent_options)`` takes per-batch options (``sample_weight``,
    a per-call ``normalizer``), which override the constructor's; the constructor's own
    arguments (``weight``, ``reduction``, ``label_smoothing``, ...) raise TypeError there.

    The formula, the gradient (computed in the forward pass, scaled in backward), the
    ``inplace`` hazard, the half-precision handling and the errors are those of
    :func:`cross_entropy`; the constructor checks every option itself (TypeError for an
    unknown keyword, ValueError for a bad value), so a typo fails where it was written.

    Example
    -------
    >>> import torch, fastxent.torch as fxt
    >>> head = torch.nn.Linear(16, 10)
    >>> crit = fxt.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
    >>> loss = crit(head(torch.randn(32, 16)), torch.randint(0, 10, (32,)))
    >>> loss.backward()
    >>> head.weight.grad.shape
    torch.Size([10, 16])
"""


from ._torch_linear import LinearCrossEntropyLoss, linear_cross_entropy  # noqa: E402
from ._torch_linear_vp import vocab_parallel_linear_cross_entropy  # noqa: E402
from ._torch_linear_hf import patch_causal_lm, unpatch_causal_lm  # noqa: E402
