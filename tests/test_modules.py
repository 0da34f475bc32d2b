"""transformer.MultiheadAttention (drop-in for torch's), transformer.Attention, RoPE and the KV cache."""
import pytest
import torch
import torch.nn.functional as F

import transformer
from transformer import reference
from transformer.kv_cache import KVCache
from transformer.nn import Attention, CrossAttention, MultiheadAttention, RotaryEmbedding, apply_rotary
from transformer.nn.attention import alibi_slopes

from helpers import assert_close, randn

# --- MultiheadAttention ----------------------------------------------------------------------------


def _pair(monkeypatch=None, **kw):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(**kw)
    ours = MultiheadAttention(**kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _forbid_fallback(monkeypatch, mod):
    def boom(*a, **k):
        raise AssertionError("fell back to torch's MultiheadAttention.forward")
    monkeypatch.setattr(mod, "_torch_forward", boom)


def _mask_cases(b, l, s):
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[0, s - 3:] = True                           # right padding
    if b > 1:
        kpm[1, :2] = True                           # left padding
    causal = torch.nn.Transformer.generate_square_subsequent_mask(l) if l == s else None
    right_only = torch.zeros(b, s, dtype=torch.bool)
    right_only[0, s - 2:] = True
    cases = {"none": {}, "kpm": dict(key_padding_mask=kpm),
             "kpm_float": dict(key_padding_mask=torch.zeros(b, s).masked_fill(kpm, float("-inf")))}
    if causal is not None:
        cases["causal"] = dict(attn_mask=causal)
        cases["causal_bool"] = dict(attn_mask=causal.isinf())
        cases["is_causal"] = dict(attn_mask=causal, is_causal=True)
        cases["causal_kpm"] = dict(attn_mask=causal.isinf(), key_padding_mask=right_only)
    return cases


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["none", "kpm", "kpm_float", "causal", "causal_bool", "is_causal", "causal_kpm"])
def test_mha_matches_torch_fp32(batch_first, case, monkeypatch):
    ref, ours = _pair(embed_dim=48, num_heads=4, batch_first=batch_first)
    ours.backend = "reference"      # a different computation than torch's: the comparison is not vacuous
    _forbid_fallback(monkeypatch, ours)
    b, l = 3, 13
    x = randn(b, l, 48) if batch_first else randn(l, b, 48)
    kw = _mask_cases(b, l, l)[case]
    want = ref(x, x, x, need_weights=False, **kw)[0]
    got, w = ours(x, x, x, need_weights=False, **kw)
    assert w is None and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mha_low_precision_and_grads(dtype, monkeypatch):
    """Cross-attention with kdim/vdim, key padding; outputs and gradients by the tolerance rule."""
    ref, ours = _pair(embed_dim=80, num_heads=2, kdim=40, vdim=24, batch_first=True)
    _forbid_fallback(monkeypatch, ours)
    ref_low = torch.nn.MultiheadAttention(80, 2, kdim=40, vdim=24, batch_first=True).to(dtype)
    ref_low.load_state_dict(ref.state_dict())
    ours = ours.to(dtype)
    q, k, v = randn(2, 7, 80), randn(2, 11, 40), randn(2, 11, 24)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 6:] = True
    out = ours(q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=kpm, need_weights=False)[0]
    want = ref(q, k, v, key_padding_mask=kpm, need_weights=False)[0]
    low = ref_low(q.to(dtype), k.to(dtype), v.to(dtype), key_padding_mask=kpm, need_weights=False)[0]
    assert_close(out, want, low)
    g = torch.randn_like(want)
    out.backward(g.to(dtype))
    want.backward(g)
    low.backward(g.to(dtype))
    for (n, p), p_ref, p_low in zip(ours.named_parameters(), ref.parameters(), ref_low.parameters()):
        assert_close(p.grad, p_ref.grad, p_low.grad, factor=3.0, atol=1e-4, name=f"grad {n}")


@pytest.mark.parametrize("kw", [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(bias=False)])
def test_mha_variants_and_need_weights(kw):
    ref, ours = _pair(embed_dim=32, num_heads=4, batch_first=True, **kw)
    x = randn(2, 5, 32)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, 3:] = True
    for nw, avg in ((True, True), (True, False), (False, True)):
        a = ref(x, x, x, key_padding_mask=kpm, need_weights=nw, average_attn_weights=avg)
        b = ours(x, x, x, key_padding_mask=kpm, need_weights=nw, average_attn_weights=avg)
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
        if nw:
            torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)


def test_mha_unrecognised_mask_falls_back_and_dropout_runs_in_the_kernels():
    ref, ours = _pair(embed_dim=32, num_heads=4, dropout=0.2, batch_first=True)
    x = randn(2, 6, 32)
    mask = torch.rand(6, 6) > 0.5
    mask[:, 0] = False
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x, x, x, attn_mask=mask, need_weights=False)[0],
                               ref(x, x, x, attn_mask=mask, need_weights=False)[0])
    # Training mode: the dropout is the kernels' counter-based mask (seed from the default generator), so the
    # result is the reference attention with that mask, and the same seed gives the same output.
    ours.train()
    with transformer.backends.record_dispatches() as counts:
        torch.manual_seed(3)
        b = ours(x, x, x, need_weights=False)[0]
    assert sum(counts.values()) == 1, counts
    torch.manual_seed(3)
    rng = transformer.attention.dropout_rng_state(x.device)
    q, k, v = (t.unflatten(-1, (4, 8)) for t in ours._projections(x, x, x))
    want = ours.out_proj(transformer.reference.attention(q, k, v, dropout_p=0.2, rng_state=rng).flatten(-2))
    torch.testing.assert_close(b, want, rtol=1e-5, atol=1e-5)
    torch.manual_seed(3)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], b, rtol=0, atol=0)
    ours.eval()
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])


def test_mha_unbatched():
    ref, ours = _pair(embed_dim=16, num_heads=2)
    x = randn(5, 16)
    torch.testing.assert_close(ours(x, x, x)[0], ref(x, x, x)[0])


def test_mha_bad_input():
    with pytest.raises(ValueError, match="embed_dim"):
        MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="num_heads"):
        MultiheadAttention(32, 0)
    with pytest.raises(ValueError, match="dropout"):
        MultiheadAttention(32, 4, dropout=1.5)


# --- Attention -------------------------------------------------------------------------------------

def _naive(att: Attention, x, compute_dtype=torch.float32):
    """Attention block written out with the reference (no module code reused but the weights), computed in
    compute_dtype (RoPE angles in fp32, as everywhere)."""
    cd = compute_dtype

    def lin(t, layer):
        return F.linear(t.to(cd), layer.weight.to(cd), None if layer.bias is None else layer.bias.to(cd))
    b, n, _ = x.shape
    hq, hkv, d = att.n_heads, att.n_kv_heads, att.head_dim
    qkv = lin(x, att.wqkv).view(b, n, hq + 2 * hkv, d)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    if att.rope is not None:
        inv = 1.0 / (att.rope.theta ** (torch.arange(0, d, 2).float() / d))
        ang = torch.arange(n).float()[:, None] * inv                              # (N, D/2)

        def rot(t):  # complex-number form of RoPE, rotate-half convention: pairs (i, i + D/2)
            t = t.float()
            c = torch.complex(t[..., : d // 2], t[..., d // 2:]) * torch.polar(torch.ones_like(ang), ang)[:, None]
            return torch.cat([c.real, c.imag], dim=-1).to(cd)
        q, k = rot(q), rot(k)
    if cd == torch.float64:  # the reference takes fp32 inputs and computes in fp64
        q, k, v = q.float(), k.float(), v.float()
    out = reference.attention(q, k, v, causal=att.causal, window_size=att.window_size,
                              alibi_slopes=att.alibi_slopes, softcap=att.softcap,
                              compute_dtype=None if cd != torch.float64 else cd)
    return lin(out.flatten(-2).to(cd), att.wo)


ATT_CASES = {
    "mha_rope": dict(dim=64, n_heads=4),
    "gqa_rope_hd40": dict(dim=80, n_heads=4, n_kv_heads=2, head_dim=40),
    "mqa_bidirectional": dict(dim=48, n_heads=6, n_kv_heads=1, causal=False),
    "window": dict(dim=64, n_heads=4, n_kv_heads=2, window_size=(4, 0)),
    "alibi": dict(dim=48, n_heads=3, rope_theta=None, alibi=True),
    "bias_softcap_ref": dict(dim=32, n_heads=2, bias=True, softcap=5.0, backend="reference"),
}


@pytest.mark.parametrize("case", list(ATT_CASES))
def test_attention_matches_naive(case):
    torch.manual_seed(0)
    att = Attention(**ATT_CASES[case])
    x = randn(2, 23, att.dim)
    ref = _naive(att, x, torch.float64)
    assert_close(att(x), ref, _naive(att, x, torch.float32), config=case)
    # bf16 module: reference = the same bf16 weights/inputs computed in fp64; baseline = computed in bf16
    att16 = Attention(**ATT_CASES[case], dtype=torch.bfloat16)
    att16.load_state_dict(att.state_dict())
    xb = x.bfloat16()
    assert_close(att16(xb), _naive(att16, xb, torch.float64), _naive(att16, xb, torch.bfloat16), config=case)


@pytest.mark.parametrize("case", ["mha_rope", "gqa_rope_hd40", "window", "alibi"])
def test_attention_packed_padded_agree(case):
    """Packed (varlen), right-padded and one-sequence-at-a-time calls give the same outputs."""
    torch.manual_seed(0)
    att = Attention(**ATT_CASES[case])
    lens = [7, 1, 13]
    seqs = [randn(n, att.dim) for n in lens]
    single = [att(s[None])[0] for s in seqs]
    cu = torch.tensor([0, 7, 8, 21], dtype=torch.int32)
    packed = att(torch.cat(seqs), cu_seqlens=cu, max_seqlen=13)
    padded_in = torch.zeros(3, 13, att.dim)
    for i, s in enumerate(seqs):
        padded_in[i, : len(s)] = s
    padded = att(padded_in, key_lengths=torch.tensor(lens))
    for i, s in enumerate(single):
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[i, : lens[i]], s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("page_size", [None, 1, 4])
@pytest.mark.parametrize("case", ["gqa_rope_hd40", "window", "alibi"])
def test_attention_kv_cache_decode(case, page_size):
    """Prefill + one-token and 3-token decode steps through decode_attention == one full forward."""
    torch.manual_seed(0)
    att = Attention(**ATT_CASES[case])
    x = randn(2, 17, att.dim)
    full = att(x)
    cache = KVCache(1, 2, 20, att.n_kv_heads, att.head_dim, page_size=page_size)
    with torch.no_grad():
        outs = [att(x[:, :9], cache=cache)]
        cache.advance(9)
        for a, b in ((9, 10), (10, 13), (13, 14), (14, 17)):
            outs.append(att(x[:, a:b], cache=cache))
            cache.advance(b - a)
    torch.testing.assert_close(torch.cat(outs, 1), full.detach(), rtol=1e-5, atol=1e-5)
    assert cache.lengths == [17, 17] and cache.seqlens.tolist() == [17, 17]


def test_attention_bad_input():
    with pytest.raises(ValueError, match="n_kv_heads"):
        Attention(64, 4, 3)
    with pytest.raises(ValueError, match="dim"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="alibi"):
        Attention(64, 4, alibi=True)
    att = Attention(64, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        att(randn(2, 5, 32))
    with pytest.raises(ValueError, match="key_lengths"):
        att(randn(2, 5, 64), key_lengths=torch.tensor([5]))
    cache = KVCache(1, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="capacity"):
        cache.advance(5)


def test_cross_attention_decode_matches_training_path():
    torch.manual_seed(0)
    ca = CrossAttention(32, 4)
    x, mem = randn(3, 5, 32), randn(3, 9, 32)
    lens = torch.tensor([9, 4, 1])
    train = ca(x, mem, lens)                              # padded_attention (grad enabled)
    with torch.no_grad():
        kv = tuple(t.contiguous() for t in ca.memory_kv(mem))
        step = torch.cat([ca(x[:, i:i + 1], memory_lengths=lens, kv=kv) for i in range(5)], 1)   # decode_attention
    torch.testing.assert_close(step, train.detach(), rtol=1e-5, atol=1e-5)
    for i in range(3):
        torch.testing.assert_close(train[i], ca(x[i:i + 1], mem[i:i + 1, : lens[i]])[0], rtol=1e-5, atol=1e-5)


# --- RoPE, ALiBi, KV cache -------------------------------------------------------------------------

def test_rope_relative_property_and_norm():
    rope = RotaryEmbedding(40)
    q, k = randn(1, 1, 40), randn(1, 1, 40)

    def dot(m, n):
        cq, sq = rope(torch.tensor([m]))
        ck, sk = rope(torch.tensor([n]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()
    torch.testing.assert_close(dot(7, 3), dot(104, 100), rtol=1e-4, atol=1e-4)
    cos, sin = rope(torch.arange(5))
    x = randn(5, 3, 40)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(41)


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s = alibi_slopes(6)  # closest power of two (4) then every other slope of 8
    torch.testing.assert_close(s, torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))


def test_kv_cache_layouts_and_errors():
    c = KVCache(2, 3, 10, 2, 8, page_size=4)
    assert c.k[0].shape == (9, 4, 2, 8) and c.block_table.shape == (3, 3)
    assert sorted(c.block_table.flatten().tolist()) == list(range(9))
    assert c.block_table[0].tolist() == [0, 3, 6]       # interleaved: the indirection is exercised
    c.advance([3, 0, 10])
    assert c.lengths == [3, 0, 10] and not c.empty
    with pytest.raises(ValueError, match="input_ids"):
        c.check_room([0, 0, 1])
    with pytest.raises(ValueError, match="page_size"):
        KVCache(1, 1, 4, 1, 8, page_size=0)
    with pytest.raises(ValueError, match="num_pages"):
        KVCache(1, 2, 8, 1, 8, page_size=4, num_pages=3)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 1, 4, 1, 8, dtype=torch.int32)
    assert "paged" in repr(c)


def test_top_level_exports():
    assert transformer.MultiheadAttention is MultiheadAttention
    assert transformer.Attention is Attention
    assert callable(transformer.generate) and callable(transformer.scaled_dot_product_attention)
