"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

Embeddings scaled by sqrt(d_model) plus sinusoidal positions, encoder self-attention (bidirectional, source
padding masked), masked decoder self-attention, encoder-decoder cross-attention, ReLU position-wise FFN,
residual + LayerNorm around every sub-layer (post-norm as in the paper; ``pre_norm=True`` for the variant
that trains without warm-up tricks), dropout on sub-layer outputs and embedding sums, source/target
embeddings shared and tied to the output projection. Loss and schedule: ``transformer.models.training``.

Padding convention: sequences are right-padded; ``src_lengths`` / ``tgt_lengths`` [B] give the real lengths
(None = no padding). ``greedy_decode`` translates with a KV cache: decoder self-attention appends to a
``KVCache`` through ``decode_attention``; cross-attention reads the encoder states as a fixed cache.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..kv_cache import KVCache
from ..nn.attention import Attention, CrossAttention
from ..nn.attention import check_lengths
from .layers import MLP, EncoderLayer, ModelConfig, SinusoidalPositions, check_token_ids, make_norm, norm

__all__ = ["EncoderDecoderConfig", "EncoderDecoder"]


@dataclasses.dataclass
class EncoderDecoderConfig(ModelConfig):
    """Presets: "base" and "big" from the paper (Table 3); "tiny" (tests) and "small" (the example)."""

    vocab_size: int = 37000            # shared source/target vocabulary (BPE in the paper)
    dim: int = 512                     # d_model
    n_layers: int = 6                  # N, in the encoder and in the decoder
    n_heads: int = 8                   # h
    hidden_dim: int = 2048             # d_ff
    dropout: float = 0.1               # P_drop
    attn_dropout: float = 0.0          # on the attention probabilities (the paper has none; fused into the kernels)
    pre_norm: bool = False
    norm_eps: float = 1e-5
    pad_token_id: int = 0

    PRESETS = {
        "base": dict(),
        "big": dict(dim=1024, n_heads=16, hidden_dim=4096, dropout=0.3),
        "tiny": dict(vocab_size=32, dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0),
        "small": dict(vocab_size=16, dim=128, n_layers=2, n_heads=4, hidden_dim=256, dropout=0.0),
    }

    def __post_init__(self):
        self._check_sizes("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.dim % 2:
            raise ValueError(f"dim must be even (sinusoidal positions), got {self.dim}")
        self._check_dropout()

    def num_params(self) -> int:
        """Parameter count of EncoderDecoder(self) (embeddings shared and tied: counted once)."""
        d, f = self.dim, self.hidden_dim
        attn = 4 * d * d + 4 * d
        ffn = 2 * d * f + f + d
        ln = 2 * d
        enc = self.n_layers * (attn + ffn + 2 * ln)
        dec = self.n_layers * (2 * attn + ffn + 3 * ln)
        final = 2 * ln if self.pre_norm else 0
        return self.vocab_size * d + enc + dec + final


class DecoderLayer(nn.Module):
    def __init__(self, cfg, backend):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.self_attn = Attention(cfg.dim, cfg.n_heads, causal=True, rope_theta=None, bias=True,
                                   dropout=cfg.attn_dropout, backend=backend)
        self.cross_attn = CrossAttention(cfg.dim, cfg.n_heads, bias=True, dropout=cfg.attn_dropout, backend=backend)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, "relu", bias=True)
        self.norm1 = make_norm("layer", cfg.dim, cfg.norm_eps)
        self.norm2 = make_norm("layer", cfg.dim, cfg.norm_eps)
        self.norm3 = make_norm("layer", cfg.dim, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory_kv, src_lengths, tgt_lengths, cache, layer):
        def sa(h):
            return self.self_attn(h, key_lengths=tgt_lengths if cache is None else None, cache=cache, layer=layer)

        def ca(h):
            return self.cross_attn(h, memory_lengths=src_lengths, kv=memory_kv)

        if self.pre_norm:
            x = x + self.drop(sa(norm(self.norm1, x)))
            x = x + self.drop(ca(norm(self.norm2, x)))
            return x + self.drop(self.mlp(norm(self.norm3, x)))
        x = norm(self.norm1, self.drop(sa(x)), residual=x)
        x = norm(self.norm2, self.drop(ca(x)), residual=x)
        return norm(self.norm3, self.drop(self.mlp(x)), residual=x)


class EncoderDecoder(nn.Module):
    """forward(src [B, S], tgt_in [B, T], src_lengths=None, tgt_lengths=None) -> logits [B, T, vocab]."""

    def __init__(self, config: EncoderDecoderConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, EncoderDecoderConfig):
            raise TypeError(f"config must be an EncoderDecoderConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        nn.init.normal_(self.embed.weight, std=config.dim ** -0.5)
        self.positions = SinusoidalPositions(config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(
            EncoderLayer(config.dim, config.n_heads, config.hidden_dim, "relu", norm_eps=config.norm_eps,
                         dropout=config.dropout, pre_norm=config.pre_norm, attn_dropout=config.attn_dropout,
                         backend=backend)
            for _ in range(config.n_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config, backend) for _ in range(config.n_layers))
        if config.pre_norm:
            self.enc_norm = make_norm("layer", config.dim, config.norm_eps)
            self.dec_norm = make_norm("layer", config.dim, config.norm_eps)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, ids, offset=None):
        pos = torch.arange(ids.shape[1], device=ids.device)
        if offset is not None:
            pos = offset.long()[:, None] + pos
        x = self.embed(ids) * math.sqrt(self.config.dim) + self.positions(pos).to(self.embed.weight.dtype)
        return self.drop(x)

    def _check_ids(self, name, ids):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
            raise ValueError(f"{name} must be an integer tensor [B, N] of token ids, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        check_token_ids(name, ids, self.config.vocab_size)

    def encode(self, src, src_lengths=None):
        """Encoder states [B, S, dim]."""
        self._check_ids("src", src)
        if src_lengths is not None:
            check_lengths("src_lengths", src_lengths, src.shape[0], src.shape[1], src)
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, src_lengths)
        return norm(self.enc_norm, x) if self.config.pre_norm else x

    def memory_kv(self, memory):
        """Cross-attention keys/values of every decoder layer (computed once per source)."""
        return [tuple(t.contiguous() for t in layer.cross_attn.memory_kv(memory)) for layer in self.decoder]

    def decode(self, tgt_in, memory_kv, src_lengths=None, tgt_lengths=None, cache=None):
        """Decoder logits [B, T, vocab]. With ``cache`` (a KVCache from make_cache) the T tokens extend it."""
        self._check_ids("tgt_in", tgt_in)
        if tgt_lengths is not None:
            check_lengths("tgt_lengths", tgt_lengths, tgt_in.shape[0], tgt_in.shape[1], tgt_in)
        offset = cache.seqlens if cache is not None and not cache.empty else None
        x = self._embed(tgt_in, offset)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory_kv[i], src_lengths, tgt_lengths, cache, i)
        if cache is not None:
            cache.advance(tgt_in.shape[1])
        if self.config.pre_norm:
            x = norm(self.dec_norm, x)
        return x @ self.embed.weight.t()                 # output projection tied to the embeddings

    def forward(self, src, tgt_in, src_lengths=None, tgt_lengths=None):
        memory = self.encode(src, src_lengths)
        return self.decode(tgt_in, self.memory_kv(memory), src_lengths, tgt_lengths)

    def make_cache(self, batch_size, capacity, *, page_size=None) -> KVCache:
        c, p = self.config, self.embed.weight
        return KVCache(c.n_layers, batch_size, capacity, c.n_heads, c.dim // c.n_heads, dtype=p.dtype,
                       device=p.device, page_size=page_size)

    @torch.no_grad()
    def greedy_decode(self, src, src_lengths, max_len, bos_token_id, eos_token_id=None, *, page_size=None):
        """Greedy translation with a KV cache: [B, <= max_len] output ids (without bos), pad after eos."""
        self._check_ids("src", src)
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        was = self.training
        self.eval()
        try:
            b = src.shape[0]
            memory_kv = self.memory_kv(self.encode(src, src_lengths))
            cache = self.make_cache(b, max_len, page_size=page_size)
            tok = torch.full((b, 1), bos_token_id, dtype=torch.long, device=src.device)
            done = torch.zeros(b, dtype=torch.bool, device=src.device)
            out = []
            for _ in range(max_len):
                logits = self.decode(tok, memory_kv, src_lengths, cache=cache)[:, -1]
                nxt = logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.config.pad_token_id), nxt)
                out.append(nxt)
                if eos_token_id is not None:
                    done |= nxt == eos_token_id
                    if bool(done.all()):
                        break
                tok = nxt[:, None]
            return torch.stack(out, dim=1)
        finally:
            self.train(was)
