"""Hugging Face integration: attn_implementation="tileformer" on a tiny randomly initialised Llama (no download).

Logits equal attn_implementation="eager" within the tolerance rule (reference: eager in fp64; baseline:
eager in the model's dtype), including left/right-padded batches, and greedy generate gives the same tokens.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is optional (pip install transformers)")

import transformer.integrations.hf as tf_hf  # noqa: E402

from helpers import assert_close  # noqa: E402


def _config(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def _models(cfg, dtype=torch.float32):
    """(eager, tileformer, eager in fp64) with the same weights; each gets its own copy of the config (the
    attention implementation is stored in it)."""
    tf_hf.register()
    torch.manual_seed(0)

    def make(impl):
        return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    eager, ours, ref = make("eager"), make("tileformer"), make("eager")
    ours.load_state_dict(eager.state_dict())
    ref.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "tileformer" and eager.config._attn_implementation == "eager"
    return eager.to(dtype), ours.to(dtype), ref.double()


def _batch(padding):
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :11] = 0
    elif padding == "right":
        mask[1, 9:] = 0
        mask[2, 2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, (None if padding == "none" else mask)


def _counting():
    """Register a counting wrapper of our attention under "tileformer"; returns the list of calls."""
    calls = []

    def spy(*a, **k):
        calls.append(1)
        return tf_hf.attention_forward(*a, **k)
    transformers.AttentionInterface.register("tileformer", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_eager(dtype, padding):
    eager, ours, ref = _models(_config(), dtype)
    calls = _counting()
    ids, mask = _batch(padding)
    try:
        with torch.no_grad():
            got = ours(ids, attention_mask=mask).logits
    finally:
        tf_hf.register()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        low = eager(ids, attention_mask=mask).logits
    assert len(calls) == 2  # our attention ran in both layers
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    assert_close(got[keep], want[keep], low[keep], atol=1e-4, config=f"{dtype} {padding}")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_greedy_generate_same_tokens(backend, monkeypatch):
    """Left-padded batched generation with the DynamicCache: prefill + one-token decode steps."""
    monkeypatch.setenv("TILEFORMER_BACKEND", backend)
    eager, ours, _ = _models(_config())
    with torch.no_grad():  # sharper logits, so greedy choices are not near-ties
        for m in (eager, ours):
            m.lm_head.weight.mul_(10.0)
    ids, mask = _batch("left")
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    a = eager.generate(ids, **kw)
    b = ours.generate(ids, **kw)
    assert a.shape == b.shape and torch.equal(a, b)


def test_sliding_window_model():
    """Mistral (sliding window, GQA) with a window shorter than the sequence."""
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                                     max_position_embeddings=128, pad_token_id=0)
    eager, ours, ref = _models(cfg)
    ids, mask = _batch("left")
    with torch.no_grad():
        got, want, low = (m(ids, attention_mask=mask).logits for m in (ours, ref, eager))
    keep = mask.bool()
    assert_close(got[keep], want[keep], low[keep], atol=1e-4)


def test_errors():
    tf_hf.register()
    q = torch.randn(1, 4, 3, 16)

    class M(torch.nn.Module):
        is_causal = True
    with pytest.raises(ValueError, match="attention_mask"):
        tf_hf.attention_forward(M(), q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights"):
        tf_hf.attention_forward(M(), q, q, q, None, output_attentions=True)
    with pytest.raises(ValueError, match="name"):
        tf_hf.register("")
