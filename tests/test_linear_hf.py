"""fastxent.torch.patch_causal_lm on a small GPT-2 built locally (no downloads): loss and
every parameter's gradient against the unpatched model, with ignored labels and
num_items_in_batch; logits are not materialised; the original forward on request."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastxent.torch as fxt  # noqa: E402


def _models():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=97,
        n_positions=16,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    ref = transformers.GPT2LMHeadModel(cfg)
    return ref, fxt.patch_causal_lm(copy.deepcopy(ref))


@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_gradients_match_the_unpatched_model(num_items):
    ref, fused = _models()
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    out_r = ref(ids, attention_mask=mask, labels=labels, **kw)
    out_f = fused(ids, attention_mask=mask, labels=labels, **kw)
    assert out_f.logits is None
    torch.testing.assert_close(out_f.loss, out_r.loss, rtol=1e-6, atol=1e-6)
    out_r.loss.backward()
    out_f.loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_logits_on_request_and_unpatch():
    ref, fused = _models()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = fused(ids, labels=ids, return_logits=True)
        b = ref(ids, labels=ids)
        c = fused(ids)  # no labels: the original forward
        d = fused(ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(c.logits, b.logits)
    torch.testing.assert_close(d.loss, b.loss, rtol=1e-6, atol=1e-6)
    fxt.unpatch_causal_lm(fused)
    with torch.no_grad():
        assert fused(ids, labels=ids).logits is not None
