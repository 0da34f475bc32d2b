"""The models: configs and parameter counts, padding/packing invariance, torch.compile, training pieces,
and the two examples at a tiny step count."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformer.models import (DecoderOnly, DecoderOnlyConfig, EncoderDecoder, EncoderDecoderConfig, EncoderOnly,
                                EncoderOnlyConfig, InverseSqrtSchedule, inverse_sqrt_lr,
                                label_smoothed_cross_entropy)

ROOT = Path(__file__).resolve().parents[1]

# --- configs and parameter counts ------------------------------------------------------------------

DEC_VARIANTS = {
    "llama": dict(),
    "gpt": dict(mlp="gelu", norm="layer", positions="learned", tie_embeddings=True, bias=True),
    "alibi_mqa": dict(positions="alibi", n_kv_heads=1),
    "mistral": dict(sliding_window=6, n_kv_heads=2),
}


@pytest.mark.parametrize("variant", list(DEC_VARIANTS))
def test_decoder_param_count(variant):
    cfg = DecoderOnlyConfig.preset("tiny", **DEC_VARIANTS[variant])
    assert DecoderOnly(cfg).num_params() == cfg.num_params()


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_param_counts(pre_norm):
    c = EncoderDecoderConfig.preset("tiny", pre_norm=pre_norm)
    assert EncoderDecoder(c).num_params() == c.num_params()
    e = EncoderOnlyConfig.preset("tiny", pre_norm=pre_norm)
    assert EncoderOnly(e).num_params() == e.num_params()


def test_preset_sizes():
    """Published sizes: Transformer base/big about 65M/213M (with their 37k vocab), BERT-base 110M,
    LLaMA-7B 6.74B, GPT-2 small 124M."""
    assert abs(EncoderDecoderConfig.preset("base").num_params() / 1e6 - 63.1) < 0.1
    assert abs(EncoderDecoderConfig.preset("big").num_params() / 1e6 - 214.2) < 0.1
    assert abs(EncoderOnlyConfig.preset("bert-base").num_params() / 1e6 - 109.5) < 0.1
    assert abs(DecoderOnlyConfig.preset("llama-7b").num_params() / 1e9 - 6.738) < 0.001
    assert abs(DecoderOnlyConfig.preset("gpt2").num_params() / 1e6 - 124.4) < 0.1


def test_config_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        DecoderOnlyConfig.preset("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="dim"):
        DecoderOnlyConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="name"):
        DecoderOnlyConfig.preset("huge")
    with pytest.raises(ValueError, match="positions"):
        DecoderOnlyConfig.preset("tiny", positions="none")
    with pytest.raises(ValueError, match="dim"):
        EncoderDecoderConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="n_heads"):
        EncoderOnlyConfig.preset("tiny", n_heads=0)
    with pytest.raises(TypeError, match="config"):
        DecoderOnly(EncoderOnlyConfig.preset("tiny"))
    learned = DecoderOnly(DecoderOnlyConfig.preset("tiny", positions="learned", max_seq_len=8))
    with pytest.raises(ValueError, match="input_ids"):
        learned(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        learned(torch.zeros(1, 4))


# --- decoder-only ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(DEC_VARIANTS))
def test_decoder_packed_padded_single_agree(variant):
    torch.manual_seed(0)
    model = DecoderOnly(DecoderOnlyConfig.preset("tiny", **DEC_VARIANTS[variant])).eval()
    lens = [9, 1, 14]
    seqs = [torch.randint(0, 256, (n,)) for n in lens]
    single = [model(s[None])[0] for s in seqs]
    cu = torch.tensor([0, 9, 10, 24], dtype=torch.int32)
    packed = model(torch.cat(seqs), cu_seqlens=cu, max_seqlen=14)
    padded_ids = torch.zeros(3, 14, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded_ids[i, : len(s)] = s
    padded = model(padded_ids, key_lengths=torch.tensor(lens))
    for i, s in enumerate(single):
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[i, : lens[i]], s, rtol=1e-5, atol=1e-5)


def test_decoder_is_causal_and_windowed():
    """Changing a later token never changes earlier logits; with a window, far tokens do not matter either."""
    torch.manual_seed(0)
    model = DecoderOnly(DecoderOnlyConfig.preset("tiny", n_layers=1, sliding_window=3)).eval()
    ids = torch.randint(0, 256, (1, 12))
    base = model(ids)
    later = ids.clone()
    later[0, 8] = (later[0, 8] + 1) % 256
    torch.testing.assert_close(model(later)[0, :8], base[0, :8])
    early = ids.clone()
    early[0, 0] = (early[0, 0] + 1) % 256
    torch.testing.assert_close(model(early)[0, 3:], base[0, 3:])   # 1 layer, window 3: position >= 3 can't see 0
    assert not torch.allclose(model(early)[0, :3], base[0, :3])


def test_decoder_bf16_close_to_fp32():
    """bf16 model by the tolerance rule: reference = the same (bf16-rounded) weights computed in fp32 on the
    reference backend; baseline = the bf16 model computed on the reference backend."""
    from helpers import assert_close
    torch.manual_seed(0)
    cfg = DecoderOnlyConfig.preset("tiny")
    ids = torch.randint(0, 256, (2, 19))
    m16 = DecoderOnly(cfg).to(torch.bfloat16).eval()
    base = DecoderOnly(cfg, backend="reference").to(torch.bfloat16).eval()
    base.load_state_dict(m16.state_dict())
    ref = DecoderOnly(cfg, backend="reference").eval()
    ref.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    with torch.no_grad():
        assert_close(m16(ids), ref(ids), base(ids), atol=1e-3)


def test_decoder_trains():
    torch.manual_seed(0)
    model = DecoderOnly(DecoderOnlyConfig.preset("tiny", vocab_size=16, n_layers=1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(16).repeat(4, 2)[:, :24]  # counting sequences: next token = current + 1 (mod 16)
    losses = []
    for _ in range(40):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_torch_compile_fullgraph():
    """torch.compile(model, fullgraph=True) traces the forward with no graph break (aot_eager on CPU),
    including a right-padded batch (padded_attention) and the fused-residual norms."""
    torch.manual_seed(0)
    model = DecoderOnly(DecoderOnlyConfig.preset("tiny", n_layers=1)).eval()
    ids = torch.randint(0, 256, (2, 13))
    lens = torch.tensor([13, 6])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids))
        torch.testing.assert_close(compiled(ids, key_lengths=lens)[1, :6], model(ids, key_lengths=lens)[1, :6])


# --- encoder-decoder and encoder-only --------------------------------------------------------------

@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_decoder_padding_invariance_and_greedy(pre_norm):
    torch.manual_seed(0)
    m = EncoderDecoder(EncoderDecoderConfig.preset("tiny", pre_norm=pre_norm)).eval()
    src = torch.randint(1, 32, (3, 9))
    src_len = torch.tensor([9, 5, 1])
    tgt = torch.randint(1, 32, (3, 6))
    tgt_len = torch.tensor([6, 2, 4])
    for i in range(3):
        src[i, src_len[i]:] = 0
    full = m(src, tgt, src_len, tgt_len)
    for i in range(3):
        alone = m(src[i:i + 1, : src_len[i]], tgt[i:i + 1, : tgt_len[i]])[0]
        torch.testing.assert_close(full[i, : tgt_len[i]], alone, rtol=1e-5, atol=1e-5)
    for page_size in (None, 2):
        out = m.greedy_decode(src, src_len, 7, bos_token_id=1, page_size=page_size)
        ids = torch.ones(3, 1, dtype=torch.long)
        for _ in range(7):  # full re-run, no cache
            ids = torch.cat([ids, m(src, ids, src_len)[:, -1].argmax(-1, keepdim=True)], 1)
        assert out.tolist() == ids[:, 1:].tolist()


def test_encoder_decoder_embeddings_tied_and_scaled():
    m = EncoderDecoder(EncoderDecoderConfig.preset("tiny"))
    names = [n for n, _ in m.named_parameters()]
    assert "embed.weight" in names and not any("lm_head" in n or "generator" in n for n in names)
    pe = m.positions(torch.arange(3))
    assert torch.allclose(pe[1, 0], torch.tensor(math.sin(1.0))) and torch.allclose(pe[1, 1], torch.tensor(math.cos(1.0)))


def test_encoder_only_padding_and_errors():
    torch.manual_seed(0)
    m = EncoderOnly(EncoderOnlyConfig.preset("tiny")).eval()
    ids = torch.randint(1, 64, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    out = m(ids, mask)
    for i, n in enumerate((10, 6, 1)):
        torch.testing.assert_close(out[i, :n], m(ids[i:i + 1, :n])[0], rtol=1e-5, atol=1e-5)
    holes = mask.clone()
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        m(ids, holes)
    with pytest.raises(ValueError, match="attention_mask"):
        m(ids, mask[:, :5])
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.randint(1, 64, (1, 200)))


# --- training pieces -------------------------------------------------------------------------------

def test_label_smoothed_cross_entropy():
    logits = torch.randn(4, 7, 11)
    target = torch.randint(0, 11, (4, 7))
    target[0, 3:] = -100
    loss, n = label_smoothed_cross_entropy(logits, target, smoothing=0.1)
    want = F.cross_entropy(logits.flatten(0, 1), target.flatten(), label_smoothing=0.1, ignore_index=-100)
    torch.testing.assert_close(loss, want)
    assert int(n) == 24
    # by hand for one token: (1 - eps) * nll + eps * mean(-log p)
    lp = logits[1, 0].log_softmax(-1)
    hand = 0.9 * -lp[target[1, 0]] + 0.1 * -lp.mean()
    torch.testing.assert_close(label_smoothed_cross_entropy(logits[1, :1], target[1, :1])[0], hand)
    with pytest.raises(ValueError, match="target"):
        label_smoothed_cross_entropy(logits, target[:, :3])
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothed_cross_entropy(logits, target, smoothing=1.0)


def test_inverse_sqrt_schedule():
    d, w = 512, 4000
    assert inverse_sqrt_lr(w, d) == pytest.approx(d ** -0.5 * w ** -0.5)
    assert inverse_sqrt_lr(100, d) == pytest.approx(d ** -0.5 * 100 * w ** -1.5)
    assert inverse_sqrt_lr(w - 1, d) < inverse_sqrt_lr(w, d) > inverse_sqrt_lr(w + 1, d)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=123.0)
    sched = InverseSqrtSchedule(opt, d, warmup_steps=10)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([inverse_sqrt_lr(s, d, 10) for s in range(1, 21)])
    with pytest.raises(ValueError, match="warmup_steps"):
        InverseSqrtSchedule(opt, d, warmup_steps=0)


# --- examples at a tiny step count -----------------------------------------------------------------

@pytest.mark.parametrize("script,args,expect", [
    ("examples/translate_encoder_decoder.py", ["--steps", "3", "--eval-samples", "16"], "exact match"),
    ("examples/train_decoder_only.py", ["--steps", "3", "--sample-tokens", "8"], "backend"),
])
def test_examples_run(script, args, expect):
    path = ROOT / script
    if not path.exists():
        pytest.fail(f"{script} is missing")
    # The repository on the path: the examples also run from a copy of the tree that is not pip-installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert expect in r.stdout
