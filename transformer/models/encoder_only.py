"""BERT-style encoder: learned positions, bidirectional self-attention with a key-padding mask, post-norm
(pre-norm optional) GELU blocks and a masked-language-model head tied to the token embeddings.

Padded batches run through ``padded_attention`` (varlen kernels where available): each row's tokens must form
one run (right, left or both-sided padding); the keys outside the run are never read.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..sdpa import key_run_bounds
from .layers import EncoderLayer, ModelConfig, check_token_ids, make_norm, norm

__all__ = ["EncoderOnlyConfig", "EncoderOnly"]


@dataclasses.dataclass
class EncoderOnlyConfig(ModelConfig):
    """Presets: "bert-base", "bert-large" (shapes of the BERT paper) and "tiny" (tests)."""

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072
    max_seq_len: int = 512
    dropout: float = 0.1
    attn_dropout: float = 0.1          # BERT's attention_probs_dropout_prob (fused into the kernels)
    norm_eps: float = 1e-12
    pre_norm: bool = False
    pad_token_id: int = 0

    PRESETS = {
        "bert-base": dict(),
        "bert-large": dict(dim=1024, n_layers=24, n_heads=16, hidden_dim=4096),
        "tiny": dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=128, dropout=0.0,
                     attn_dropout=0.0),
    }

    def __post_init__(self):
        self._check_sizes("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        self._check_dropout()

    def num_params(self) -> int:
        """Parameter count of EncoderOnly(self) (MLM decoder tied to the embeddings; its bias counted)."""
        d, f = self.dim, self.hidden_dim
        layer = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 2 * 2 * d
        emb = self.vocab_size * d + self.max_seq_len * d + 2 * d
        head = d * d + d + 2 * d + self.vocab_size
        return emb + self.n_layers * layer + head + (2 * d if self.pre_norm else 0)


class EncoderOnly(nn.Module):
    """forward(input_ids [B, N], attention_mask=None) -> MLM logits [B, N, vocab].

    attention_mask: [B, N] (1/True = token, 0/False = padding); each row's tokens must be one run.
    """

    def __init__(self, config: EncoderOnlyConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, EncoderOnlyConfig):
            raise TypeError(f"config must be an EncoderOnlyConfig, got {type(config).__name__}")
        self.config = config
        d = config.dim
        self.embed = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.pos_embed = nn.Embedding(config.max_seq_len, d)
        self.embed_norm = make_norm("layer", d, config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(d, config.n_heads, config.hidden_dim, "gelu", norm_eps=config.norm_eps,
                         dropout=config.dropout, pre_norm=config.pre_norm, attn_dropout=config.attn_dropout,
                         backend=backend)
            for _ in range(config.n_layers))
        self.final_norm = make_norm("layer", d, config.norm_eps) if config.pre_norm else None
        self.mlm_dense = nn.Linear(d, d)
        self.mlm_norm = make_norm("layer", d, config.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, input_ids, attention_mask=None):
        """Hidden states [B, N, dim]."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64) \
                or input_ids.dim() != 2:
            raise ValueError("input_ids must be an integer tensor [B, N]")
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        b, n = input_ids.shape
        if n > self.config.max_seq_len:
            raise ValueError(f"input_ids has {n} tokens, more than max_seq_len ({self.config.max_seq_len})")
        lengths = None
        if attention_mask is not None:
            if attention_mask.shape != (b, n):
                raise ValueError(f"attention_mask must have shape [B, N]=[{b}, {n}], got {tuple(attention_mask.shape)}")
            start, end, ok = key_run_bounds(attention_mask.bool())
            if not ok:
                raise ValueError("attention_mask must mark one contiguous run of tokens per row (padding at the ends)")
            if bool((start != 0).any()):
                raise ValueError("attention_mask: left padding is not supported by EncoderOnly; pad on the right")
            lengths = end
        x = self.embed(input_ids) + self.pos_embed(torch.arange(n, device=input_ids.device))
        x = self.drop(norm(self.embed_norm, x))
        for layer in self.layers:
            x = layer(x, lengths)
        return norm(self.final_norm, x) if self.final_norm is not None else x

    def forward(self, input_ids, attention_mask=None):
        h = self.encode(input_ids, attention_mask)
        h = norm(self.mlm_norm, F.gelu(self.mlm_dense(h)))
        return h @ self.embed.weight.t() + self.mlm_bias
