"""Hugging Face ``transformers`` causal language models with fastxent's fused linear +
cross-entropy: :func:`patch_causal_lm`.

Invariants:
- Only the instance given is patched (its ``forward``); :func:`unpatch_causal_lm` restores it.
- A call with ``labels`` (and no request for logits) runs the model's base (decoder) for the
  last hidden states, then fastxent.torch.linear_cross_entropy with the output embedding's
  weight (and bias): the logits are never materialised; the output's ``logits`` is None.
- The loss is transformers' causal-LM loss: labels shifted left by one (the last position
  ignored), ``ignore_index=-100``, the mean over counted tokens, or the sum divided by
  ``num_items_in_batch`` when given (gradient accumulation); a final logit softcap in the
  config (Gemma 2's ``final_logit_softcapping``) is applied. The loss is float32, as
  transformers' (which upcasts the logits); fastxent computes it in float32 for 16-bit
  models and in float64 for float64 ones.
- Any other call (no labels, positional arguments after input_ids, ``return_logits=True``, or
  ``keep_logits=True`` at patch time) runs the original forward unchanged.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch

from ._torch_linear import linear_cross_entropy

__all__ = ["patch_causal_lm", "unpatch_causal_lm"]


def patch_causal_lm(model: Any, *, keep_logits: bool = False) -> Any:
    """Makes ``model`` (a transformers ``*ForCausalLM`` / ``*LMHeadModel`` instance) compute
    its training loss with the fused linear + cross-entropy; returns the model. Calls with
    ``labels`` return ``loss`` (and the base model's past key values, hidden states and
    attentions) with ``logits=None``; pass ``return_logits=True`` to a call, or
    ``keep_logits=True`` here, for the original forward (logits and loss)."""
    if getattr(model, "_fastxent_forward", None) is not None:
        return model
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise TypeError("patch_causal_lm needs a model with an output embedding (lm_head)")
    original = model.forward

    def forward(
        self: Any,
        input_ids: Any = None,
        *args: Any,
        labels: Any = None,
        return_logits: bool = False,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if labels is None or args or return_logits or keep_logits:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(input_ids, *args, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        out = self.base_model(input_ids, return_dict=True, **kwargs)
        hidden = out.last_hidden_state
        shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        norm = None if num_items_in_batch is None else float(num_items_in_batch)
        hd = self.get_output_embeddings()
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            hd.weight,
            shift.reshape(-1).to(hidden.device),
            linear_bias=getattr(hd, "bias", None),
            ignore_index=-100,
            normalizer=norm,
            softcap=getattr(self.config, "final_logit_softcapping", None),
        ).float()
        from transformers.modeling_outputs import CausalLMOutputWithPast

        fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
        extra = {
            k: getattr(out, k, None)
            for k in ("cache", "past_key_values", "hidden_states", "attentions")
            if k in fields
        }  # transformers 5 names the cache `cache`, 4 did not
        return CausalLMOutputWithPast(loss=loss, logits=None, **extra)

    model._fastxent_forward = original
    model.forward = types.MethodType(forward, model)
    return model


def unpatch_causal_lm(model: Any) -> Any:
    """Restores the forward that :func:`patch_causal_lm` replaced; returns the model."""
    original = getattr(model, "_fastxent_forward", None)
    if original is not None:
        model.__dict__.pop("forward", None)  # the class's forward again
        model._fastxent_forward = None
    return model
