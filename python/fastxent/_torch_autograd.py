"""fastxent.torch's autograd drop-in (private): the torch.autograd.Function whose
forward computes the loss and its gradient in one fused pass (the backward scales it),
and the dispatch of a cross_entropy call with options between it, the forward-only
kernel, the torch.func fallback and the custom op."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import _api
from ._torch_common import (
    autocast_loss_dtype,
    direct_logits,
    first_order,
    has_tangent,
    logits_array,
    loss_tensor,
    numpy_of,
    prepare,
    reference_grads,
    reference_loss,
    reference_stats,
    under_func_transform,
)
from ._torch_common import is_wrapped
from ._keywords import FLOAT_OUTPUTS, output_names
from ._torch_fast import fused, is_compiling
from ._torch_nodata import func_transform_loss, is_fake, op_loss


class _FusedCrossEntropy(torch.autograd.Function):
    """Forward: loss and gradient from one fused kernel call. Backward: gradient times
    grad_output (first order, first_order); under create_graph=True, or for a probability
    target's gradient, the vector-Jacobian product of reference_loss instead, so that every
    derivative it returns is one it computed. Forward mode (jvp): the tangent of a row loss is
    <g_n, v_n> with the fused gradient g. Differentiable inputs: the logits and a
    probability target; weight and sample_weight (`extras`, saved for their version check)
    are refused by the wrapper when they require grad."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        target: Tensor,
        tgt: np.ndarray,
        cdt: torch.dtype,
        kw: Dict[str, Any],
        inplace: bool,
        fwd: bool,
        *extras: Tensor,
    ) -> Tensor:
        # fwd: a forward-mode tangent is present (decided by the caller: inside forward the
        # inputs come without their tangents).
        if inplace:
            x = direct_logits(input, tgt)
            if x is not None:
                loss, _ = _api.cross_entropy_with_grad(x, tgt, out=x, **kw)
            else:  # bfloat16 without ml_dtypes: a float32 copy, the gradient written back
                x32 = numpy_of(input, cdt)
                loss, _ = _api.cross_entropy_with_grad(x32, tgt, out=x32, **kw)
                input.detach().copy_(torch.from_numpy(x32))
            grad = input.detach()
            # The logits' memory now holds the gradient, written behind autograd's back:
            # bump the version counter so any other autograd node that saved these values
            # (e.g. a tanh or a softmax producing them) fails loudly in backward instead of
            # silently using the gradient as its saved tensor.
            torch.autograd.graph.increment_version(input)
        else:
            loss, grad = fused(input, tgt, cdt, kw)
            # The logits, target, weights: for the derivatives that read them (second order,
            # target gradient, a recomputed gradient); autograd checks their versions there
            # and frees them after a backward that does not retain the graph. (None after
            # inplace=True: the logits' memory holds the gradient.)
            ctx.save_for_backward(input, target, *extras)
        ctx.grad = grad  # first order: first_order hands it out
        if fwd:
            ctx.save_for_forward(grad)
            ctx.fwd = (input, target)  # for jvp (forward mode: no backward, no graph to free)
        ctx.tgt, ctx.cdt, ctx.kw = tgt, cdt, kw
        ctx.inplace = inplace
        ctx.scaled_in_place = False
        ctx.n_extras = len(extras)
        # "none": grad_output has the rows' shape; it broadcasts over the class dimension.
        ctx.class_dim = 1 if (kw["reduction"] == "none" and input.ndim > 1) else None
        ctx.loss_dtype = autocast_loss_dtype(input)
        return loss_tensor(loss, ctx.loss_dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        create_graph = torch.is_grad_enabled()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        rest = (None,) * (5 + ctx.n_extras)
        if create_graph or need[1]:
            if ctx.inplace:
                raise RuntimeError(
                    "fastxent.torch.cross_entropy(inplace=True) overwrote the logits with the "
                    "gradient, so it cannot differentiate the gradient again (create_graph="
                    "True: Hessians, gradient penalties) or give a probability target's "
                    "gradient; use inplace=False"
                )
            input, target = ctx.saved_tensors[:2]  # version-checked by autograd
            gz, gt = reference_grads(input, target, ctx.kw, grad_output, need, create_graph)
            if need[0] and not create_graph:
                gz = _FusedCrossEntropy._first(ctx, grad_output)
            return (gz, gt) + rest
        return (_FusedCrossEntropy._first(ctx, grad_output), None) + rest

    @staticmethod
    def _first(ctx: Any, grad_output: Tensor) -> Tensor:
        def recompute() -> Tensor:
            return fused(ctx.saved_tensors[0], ctx.tgt, ctx.cdt, ctx.kw)[1]

        return first_order(ctx, grad_output, recompute)

    @staticmethod
    def jvp(ctx, input_t: Optional[Tensor], target_t: Optional[Tensor], *_: Any) -> Tensor:
        (grad,) = ctx.saved_tensors
        red = ctx.kw["reduction"]
        out: Optional[Tensor] = None
        if input_t is not None:
            prod = grad * input_t
            if red == "none":
                out = prod.sum(dim=ctx.class_dim) if ctx.class_dim is not None else prod.sum()
            else:
                out = prod.sum()
        if target_t is not None and ctx.fwd[1].is_floating_point():
            if ctx.inplace:
                raise RuntimeError(
                    "fastxent.torch.cross_entropy(inplace=True): a probability "
                    "target's tangent needs the logits, which were overwritten"
                )
            # d loss / d target . v, from the reference loss (linear in v).
            with torch.enable_grad():
                tr = ctx.fwd[1].detach().requires_grad_(True)
                loss = reference_loss(ctx.fwd[0].detach(), tr, ctx.kw)
                (dt,) = torch.autograd.grad(loss, tr, torch.ones_like(loss), allow_unused=True)
            if dt is not None:
                if red == "none":
                    # the reference's "none" gradient is that of the sum; rows are separate
                    tt = (dt * target_t).sum(dim=ctx.class_dim if ctx.class_dim is not None else 0)
                else:
                    tt = (dt * target_t).sum()
                tt = tt.to(grad.dtype)
                out = tt if out is None else out + tt
        if out is None:
            raise RuntimeError("fastxent.torch.cross_entropy: jvp without a tangent")
        return out.to(ctx.loss_dtype)


def general_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    inplace: bool,
    options: Dict[str, Any],
) -> Tensor:
    if is_compiling() or is_fake(input):
        # (torch.func transforms inside a compiled function are not told apart here: Dynamo
        # cannot trace the check; the custom op then refuses them with an error.)
        return op_loss(input, target, weight, ignore_index, reduction, label_smoothing, options)
    if under_func_transform(input, target, weight, options.get("sample_weight")):
        return func_transform_loss(
            input, target, weight, ignore_index, reduction, label_smoothing, options
        )
    cdt, tgt, kw = prepare(input, target, weight, ignore_index, reduction, label_smoothing, options)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    grad_mode = torch.is_grad_enabled()
    reverse = input.requires_grad and grad_mode
    t_diff = target.is_floating_point() and (
        (target.requires_grad and grad_mode) or has_tangent(target)
    )
    if not (reverse or t_diff or has_tangent(input)):
        # No derivative wanted: the forward-only kernel, nothing of the logits' size written.
        return loss_tensor(
            _api.cross_entropy(logits_array(input, tgt, cdt), tgt, **kw), autocast_loss_dtype(input)
        )
    # The logits are overwritten only for a reverse-mode gradient of theirs alone.
    inplace = inplace and reverse and not t_diff
    if inplace:
        base = input if input._base is None else input._base
        if base.is_leaf and base.requires_grad:
            raise ValueError(
                "inplace=True would overwrite a leaf tensor that requires grad (or a view of "
                "one): its values are the parameters being learned; use inplace=False"
            )
        if not input.is_contiguous() or input.is_neg():
            raise ValueError(
                "inplace=True needs a contiguous input without a lazy negation "
                "(the gradient is written over its memory in the same layout); "
                "call .contiguous() / .resolve_neg() or use inplace=False"
            )
    fwd = has_tangent(input) or (t_diff and has_tangent(target))
    # weight and sample_weight tensors ride along for autograd's version check only.
    extras = tuple(v for v in (weight, options.get("sample_weight")) if isinstance(v, Tensor))
    return _FusedCrossEntropy.apply(input, target, tgt, cdt, kw, inplace, fwd, *extras)


# --- outputs= and entropy_coef: the per-row statistics of the same kernel pass --------------

_FLOAT_STATS = FLOAT_OUTPUTS  # differentiable; argmax, accuracy are not


def _stats_vjp(z: Tensor, target: Tensor, kw: Dict[str, Any], grads: Dict[str, Tensor]) -> Tensor:
    """sum_k <grads[k], d stat_k / d z> for the float statistics, by autograd through
    reference_stats over tiles of rows (at most 2^20 elements each: no (rows, C) temporary
    beyond the result). The upstream grads go in as grad_outputs, so that batched ones
    (autograd.grad(..., is_grads_batched=True)) give batched results."""
    C = z.shape[-1]
    if z.numel() == 0:  # no rows: nothing to differentiate (and no tile to concatenate)
        half = z.dtype in (torch.float16, torch.bfloat16)
        return torch.zeros(z.shape, dtype=torch.float32 if half else z.dtype)
    z2, t1 = z.detach().reshape(-1, C), target.detach()
    # float32 for 16-bit logits (rounded once by the caller), converted tile by tile
    f32 = z2.dtype in (torch.float16, torch.bfloat16)
    t1 = t1.reshape(-1, C) if t1.is_floating_point() else t1.reshape(-1)
    g1 = {k: g.reshape(-1) for k, g in grads.items()}
    out: Optional[Tensor] = None
    parts: List[Tensor] = []
    tile = max(1, (1 << 20) // max(C, 1))
    for a in range(0, z2.shape[0], tile):
        with torch.enable_grad():
            zt = (z2[a : a + tile].float() if f32 else z2[a : a + tile].clone()).requires_grad_(
                True
            )
            st = reference_stats(zt, t1[a : a + tile], kw)  # (float32 for 16-bit logits)
            names = list(g1)
            (gz,) = torch.autograd.grad(
                [st[k] for k in names],
                zt,
                [g1[k][a : a + tile].to(st[k].dtype) for k in names],
            )
        if a == 0 and not _batched(gz) and tile < z2.shape[0]:
            out = torch.empty(z2.shape, dtype=gz.dtype)
        if out is None:
            parts.append(gz)  # batched upstream grads (is_grads_batched=True), or one tile
        else:
            out[a : a + tile] = gz
    res = out if out is not None else (parts[0] if len(parts) == 1 else torch.cat(parts))
    return res.reshape(z.shape)


def _batched(t: Tensor) -> bool:
    """A batched tensor (autograd.grad(..., is_grads_batched=True) runs backward under the
    legacy vmap, whose tensors carry the Batched dispatch key; torch.func's carry
    FuncTorchBatched): it cannot be copied into a plain one."""
    return "Batched" in str(torch._C._dispatch_keys(t)) or bool(is_wrapped(t))


class _StatsCrossEntropy(torch.autograd.Function):
    """cross_entropy with outputs=: the loss and the float statistics (lse, entropy,
    target_logprob) from one kernel call. Backward: the fused gradient times the loss's
    grad_output, plus the statistics' vector-Jacobian product through reference_stats (tiles
    of rows); under create_graph=True, or for a probability target's gradient, everything
    through reference_loss and reference_stats. No forward mode."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input: Tensor,
        target: Tensor,
        tgt: np.ndarray,
        cdt: torch.dtype,
        kw: Dict[str, Any],
        names: Tuple[str, ...],
        side: Dict[str, Any],
        *extras: Tensor,
    ):
        ctx.set_materialize_grads(False)
        loss, grad, st = fused(input, tgt, cdt, kw, names)
        ctx.grad = grad
        ctx.save_for_backward(input, target, *extras)
        ctx.tgt, ctx.cdt, ctx.kw = tgt, cdt, kw
        ctx.inplace, ctx.scaled_in_place = False, False
        ctx.n_extras = len(extras)
        ctx.class_dim = 1 if (kw["reduction"] == "none" and input.ndim > 1) else None
        ctx.loss_dtype = autocast_loss_dtype(input)
        ctx.float_names = tuple(n for n in _FLOAT_STATS if n in names)
        side["stats"] = st
        rows = tuple(target.shape) if not target.is_floating_point() else tuple(input.shape[:-1])
        outs = [torch.from_numpy(np.asarray(getattr(st, n))).reshape(rows) for n in ctx.float_names]
        return (loss_tensor(loss, ctx.loss_dtype), *outs)

    @staticmethod
    def backward(ctx, grad_loss: Optional[Tensor], *grad_stats: Optional[Tensor]):
        create_graph = torch.is_grad_enabled()
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        rest = (None,) * (5 + ctx.n_extras)
        gs = {n: g for n, g in zip(ctx.float_names, grad_stats) if g is not None}
        input, target = ctx.saved_tensors[:2]
        if create_graph or need[1]:
            with torch.enable_grad():
                zr = input if create_graph else input.detach().requires_grad_(need[0])
                tr = target if (create_graph and target.requires_grad) else target.detach()
                if need[1] and not tr.requires_grad:
                    tr = tr.detach().requires_grad_(True)
                # grad_outputs, not a product summed here: batched upstream grads
                # (is_grads_batched=True) must stay batched
                outs: List[Tensor] = []
                gos: List[Tensor] = []
                if grad_loss is not None:
                    ref = reference_loss(zr, tr, ctx.kw)
                    outs.append(ref)
                    gos.append(grad_loss.to(ref.dtype))
                if gs:
                    st = reference_stats(zr, tr, ctx.kw)
                    for n, g in gs.items():
                        outs.append(st[n])
                        gos.append(g.reshape(st[n].shape).to(st[n].dtype))
                keep = [i for i, o in enumerate(outs) if o.requires_grad]
                wrt = [x for x, n in zip((zr, tr), need) if n]
                if not keep:  # constant (no row counts): every derivative is 0
                    got: Tuple[Optional[Tensor], ...] = (None,) * len(wrt)
                else:
                    got = torch.autograd.grad(
                        [outs[i] for i in keep],
                        wrt,
                        [gos[i] for i in keep],
                        create_graph=create_graph,
                        allow_unused=True,
                    )
            it = iter(got)
            res = [next(it) if n else None for n in need]
            res = [
                (torch.zeros_like(x) if (n and r is None) else r)
                for x, n, r in zip((input, target), need, res)
            ]
            return (res[0], res[1]) + rest
        gz: Optional[Tensor] = None
        if need[0] and grad_loss is not None:

            def recompute() -> Tensor:
                return fused(input, ctx.tgt, ctx.cdt, ctx.kw)[1]

            gz = first_order(ctx, grad_loss, recompute)
        # The fused gradient is not kept past its backward (a statistic kept for logging holds
        # this node): a second backward through a retained graph computes it again.
        ctx.grad = None
        if need[0] and gs:
            # (float32 for 16-bit logits: summed with the fused gradient, then rounded once)
            gv = _stats_vjp(input, target, ctx.kw, gs)
            if gz is None:
                gz = gv.to(input.dtype)
            elif _batched(gv) or _batched(gz):
                gz = (gz.to(gv.dtype) + gv).to(input.dtype)
            else:
                gz = gv.add_(gz.to(gv.dtype)).to(input.dtype)  # gv is this call's own
        return (gz, None) + rest

    @staticmethod
    def jvp(ctx, *_: Any) -> Any:
        raise NotImplementedError(
            "fastxent.torch.cross_entropy(outputs=...): forward-mode derivatives (jvp, "
            "forward_ad) are not implemented for the per-row outputs; entropy_coef alone "
            "supports them"
        )


def stats_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    inplace: bool,
    options: Dict[str, Any],
) -> Any:
    """cross_entropy with outputs= (and/or entropy_coef): (loss, RowStats of tensors), or the
    loss alone for entropy_coef without outputs (the fused path, whose reference loss carries
    the entropy term for the derivatives beyond the first)."""
    opts = dict(options)
    names = opts.pop("outputs", None)
    if (
        is_compiling()
        or is_fake(input)
        or under_func_transform(input, target, weight, opts.get("sample_weight"))
    ):
        raise NotImplementedError(
            "fastxent.torch.cross_entropy: outputs= and entropy_coef run eagerly only, not "
            "under torch.compile, torch.func transforms or with fake / meta tensors (yet)"
        )
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace:
        raise NotImplementedError(
            "fastxent.torch.cross_entropy: inplace=True is not implemented with outputs= or "
            "entropy_coef (their derivatives read the logits)"
        )
    if names is None:
        return general_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, False, opts
        )
    names = output_names(names)
    cdt, tgt, kw = prepare(input, target, weight, ignore_index, reduction, label_smoothing, opts)
    if input.ndim > 2:
        raise NotImplementedError(
            "fastxent.torch.cross_entropy: outputs= is implemented for input of shape (C,) or "
            f"(N, C), not {tuple(input.shape)}"
        )
    grad_mode = torch.is_grad_enabled()
    t_diff = target.is_floating_point() and target.requires_grad and grad_mode
    if has_tangent(input) or has_tangent(target):
        _StatsCrossEntropy.jvp(None)  # raises: no forward mode for the statistics
    if not ((input.requires_grad and grad_mode) or t_diff):
        loss, st = _api.cross_entropy(logits_array(input, tgt, cdt), tgt, outputs=names, **kw)
        rows = tuple(target.shape) if not target.is_floating_point() else tuple(input.shape[:-1])
        floats = [
            torch.from_numpy(np.asarray(getattr(st, n))).reshape(rows)
            for n in _FLOAT_STATS
            if n in names
        ]
        return _row_stats(loss_tensor(loss, autocast_loss_dtype(input)), floats, st, names, rows)
    extras = tuple(v for v in (weight, opts.get("sample_weight")) if isinstance(v, Tensor))
    side: Dict[str, Any] = {}
    res = _StatsCrossEntropy.apply(input, target, tgt, cdt, kw, names, side, *extras)
    rows = tuple(res[1].shape) if len(res) > 1 else ()
    if len(res) == 1:
        rows = tuple(target.shape) if not target.is_floating_point() else tuple(input.shape[:-1])
    return _row_stats(res[0], list(res[1:]), side["stats"], names, rows)


def _row_stats(loss: Tensor, floats: List[Tensor], st: Any, names: Tuple[str, ...], rows):
    fields: Dict[str, Any] = dict(zip([n for n in _FLOAT_STATS if n in names], floats))
    if "argmax" in names:
        fields["argmax"] = torch.from_numpy(np.asarray(st.argmax)).reshape(rows)
    if "accuracy" in names:
        fields["accuracy"] = float(st.accuracy)
    return loss, _api.RowStats(**fields)


def without_idle_stats(opts: Dict[str, Any]) -> Dict[str, Any]:
    """opts without outputs=None and a plain-number entropy_coef of 0 (the plain call, with
    every path open to it); a tensor entropy_coef stays (it may carry a derivative)."""
    out = dict(opts)
    if "outputs" in out and out["outputs"] is None:
        del out["outputs"]
    ec = out.get("entropy_coef")
    if isinstance(ec, (int, float, np.floating, np.integer)) and not isinstance(ec, bool):
        if ec == 0:
            del out["entropy_coef"]
    return out
