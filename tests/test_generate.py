"""transformer.generate: cached generation (packed prefill + decode_attention over a contiguous or paged KV
cache) against re-running the full sequence, sampling controls, and bad input."""
import pytest
import torch

import transformer
from transformer.generate import sample_next
from transformer.models import DecoderOnly, DecoderOnlyConfig

from helpers import assert_close, kernel_backends, require_backend

VARIANTS = {
    "rope_gqa": dict(),
    "learned_gelu": dict(mlp="gelu", norm="layer", positions="learned", tie_embeddings=True),
    "alibi": dict(positions="alibi"),
    "window": dict(sliding_window=4),
}


def _model(**kw):
    torch.manual_seed(0)
    model = DecoderOnly(DecoderOnlyConfig.preset("tiny", **kw)).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20.0)
    return model


def _greedy_full_rerun(model, prompt, n):
    """Greedy decoding by re-running model(ids) on the whole sequence each step (dense path, no cache)."""
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_cached_greedy_equals_full_rerun(variant, cache):
    model = _model(**VARIANTS[variant])
    prompts = [torch.randint(0, 256, (n,)) for n in (5, 1, 11)]
    out = transformer.generate(model, prompts, 9, temperature=0, cache=cache, page_size=3)
    for p, o in zip(prompts, out):
        assert o.tolist() == _greedy_full_rerun(model, p, 9).tolist()


def test_no_cache_path_and_tensor_input():
    model = _model()
    ids = torch.randint(0, 256, (2, 6))
    a = transformer.generate(model, ids, 5, temperature=0)
    b = transformer.generate(model, ids, 5, temperature=0, cache=None)
    assert a.shape == (2, 11) and torch.equal(a, b) and torch.equal(a[:, :6], ids)


def test_eos_stops_and_pads():
    model = _model()
    prompts = [torch.randint(0, 256, (n,)) for n in (4, 7)]
    free = transformer.generate(model, prompts, 8, temperature=0)
    eos = int(free[0][4 + 2])                   # the third token sequence 0 generates
    out = transformer.generate(model, prompts, 8, temperature=0, eos_token_id=eos)
    assert out[0].tolist() == free[0][: 4 + 3].tolist()
    gen1 = free[1][7:].tolist()
    want1 = gen1[: gen1.index(eos) + 1] if eos in gen1 else gen1
    assert out[1][7:].tolist() == want1
    t = transformer.generate(model, torch.stack([prompts[0], prompts[0]]), 8, temperature=0, eos_token_id=eos,
                             pad_token_id=None)
    assert t.shape == (2, 4 + 3)                # both stop after 3 tokens: generation ends early


def test_sampling_reproducible_and_filters():
    model = _model()
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 8)]

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return [o.tolist() for o in transformer.generate(model, prompts, 12, temperature=1.0, generator=g, **kw)]
    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = [o.tolist() for o in transformer.generate(model, prompts, 12, temperature=0)]
    assert run(3, top_k=1) == greedy
    assert run(4, top_p=1e-6) == greedy
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 3}
    probs = logits.softmax(-1)[0]   # 0.032, 0.644, 0.087, 0.237: top_p=0.7 keeps {1, 3}
    assert probs[1] < 0.7 < probs[1] + probs[3]
    draws = {int(sample_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {1, 3}


def test_bad_input():
    model = _model()
    p = [torch.randint(0, 256, (5,))]
    with pytest.raises(ValueError, match="input_ids"):
        transformer.generate(model, [torch.randint(0, 256, (250,))], 10)      # prompt + new > max_seq_len
    with pytest.raises(ValueError, match="input_ids"):
        transformer.generate(model, [[]], 3)
    with pytest.raises(ValueError, match="input_ids"):
        transformer.generate(model, torch.randn(2, 3), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        transformer.generate(model, p, -1)
    with pytest.raises(ValueError, match="temperature"):
        transformer.generate(model, p, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        transformer.generate(model, p, 3, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        transformer.generate(model, p, 3, top_p=1.5)
    with pytest.raises(ValueError, match="cache"):
        transformer.generate(model, p, 3, cache="ring")
    cache = model.make_cache(1, 4)
    with pytest.raises(ValueError, match="input_ids"):       # prompt longer than the cache
        model.hidden_states(torch.randint(0, 256, (1, 6)), cache=cache)


@pytest.mark.parametrize("backend", kernel_backends("triton", "cuda"))
@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_prefill_and_decode_on_kernel_backends(backend, cache):
    """The generation path (packed prefill into the cache, then decode_attention steps) on the kernel backends,
    bf16, by the tolerance rule: reference = the same bf16 weights in fp32 running full sequences on the
    reference backend; baseline = the bf16 model with the reference backend on the same cached path."""
    require_backend(backend)
    torch.manual_seed(0)
    cfg = DecoderOnlyConfig.preset("tiny", n_layers=1, dim=128, n_heads=2, n_kv_heads=1)   # head_dim 64
    kernel = DecoderOnly(cfg, backend=backend).to(torch.bfloat16).eval()
    for op in ("flash_attention_varlen", "decode_attention"):
        q = torch.zeros(2, 1, 2, 64, dtype=torch.bfloat16)
        kv = torch.zeros(2, 8, 1, 64, dtype=torch.bfloat16)
        lens = torch.zeros(2, dtype=torch.int32)
        if op == "decode_attention":
            text = transformer.backends.explain(op, q, kv, kv, lens, backend=backend)
        else:
            cu = torch.tensor([0, 1, 2], dtype=torch.int32)
            text = transformer.backends.explain(op, q[:, 0], kv[0], kv[0], cu, cu, 1, 8, backend=backend,
                                                causal=True)
        if "selected" not in text:
            pytest.skip(f"{backend} cannot serve {op} yet: {text.splitlines()[-1].strip()}")
    base = DecoderOnly(cfg, backend="reference").to(torch.bfloat16).eval()
    base.load_state_dict(kernel.state_dict())
    ref = DecoderOnly(cfg, backend="reference").eval()
    ref.load_state_dict({k: v.float() for k, v in kernel.state_dict().items()})
    lens = [37, 5, 20]
    seqs = [torch.randint(0, 256, (n + 4,)) for n in lens]

    def cached(model):
        kv = model.make_cache(3, 64, page_size=8 if cache == "paged" else None)
        cu = torch.tensor([0, 37, 42, 62], dtype=torch.int32)
        h = model.hidden_states(torch.cat([s[:n] for s, n in zip(seqs, lens)]), cu_seqlens=cu, max_seqlen=37,
                                cache=kv)
        outs = [model.lm_head(h[cu[1:].long() - 1])]
        for t in range(3):
            step = torch.stack([s[n + t] for s, n in zip(seqs, lens)])[:, None]
            outs.append(model.lm_head(model.hidden_states(step, cache=kv)[:, -1]))
        return torch.stack(outs, 1)                                     # (B, 4, vocab)

    with torch.no_grad():
        got, low = cached(kernel), cached(base)
        want = torch.stack([ref(s[None])[0, n - 1:n + 3] for s, n in zip(seqs, lens)])
    assert_close(got, want, low, atol=1e-3, config=f"{backend} {cache}")
