"""GPT / LLaMA-style decoder-only language model.

Pre-norm blocks (RMSNorm or LayerNorm through the fused residual path: each norm also adds the residual
and returns the new residual stream), RoPE / learned / ALiBi positions, grouped-query attention,
SwiGLU or GELU MLP, optional tied embeddings and Mistral-style sliding-window attention.

    cfg = DecoderOnlyConfig.preset("tiny", vocab_size=256)
    model = DecoderOnly(cfg)
    logits = model(input_ids)                       # [B, N] -> [B, N, vocab]
    transformer.generate(model, prompts, max_new_tokens=32, temperature=0)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed
from torch import nn

from ..kv_cache import KVCache
from ..nn.attention import Attention, packed_positions
from .layers import MLP, ModelConfig, check_token_ids, make_norm, norm, swiglu_hidden

__all__ = ["DecoderOnlyConfig", "DecoderOnly"]


@dataclasses.dataclass
class DecoderOnlyConfig(ModelConfig):
    """Presets (``preset(name, **overrides)``): "tiny" (tests), "small" (examples), "gpt2", "llama-7b",
    "mistral-7b" (benchmarks only)."""

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None        # None: n_heads (MHA); fewer: GQA; 1: MQA
    head_dim: Optional[int] = None          # None: dim // n_heads
    hidden_dim: Optional[int] = None        # MLP width; None: swiglu_hidden(dim) for SwiGLU, 4 * dim for GELU
    mlp: str = "swiglu"                     # "swiglu" | "gelu"
    norm: str = "rms"                       # "rms" | "layer"
    norm_eps: float = 1e-5
    positions: str = "rope"                 # "rope" | "learned" | "alibi"
    rope_theta: float = 10000.0
    max_seq_len: int = 4096                 # size of the learned position table (and a bound for generation)
    sliding_window: Optional[int] = None    # W: each token sees itself and the W - 1 previous ones
    tie_embeddings: bool = False
    dropout: float = 0.0                    # on embeddings and sub-layer outputs
    attn_dropout: float = 0.0               # on the attention probabilities (fused into the kernels)
    bias: bool = False

    PRESETS = {
        "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256),
        "small": dict(vocab_size=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=512,
                      tie_embeddings=True),
        "gpt2": dict(vocab_size=50257, dim=768, n_layers=12, n_heads=12, mlp="gelu", norm="layer",
                     positions="learned", max_seq_len=1024, tie_embeddings=True, bias=True, dropout=0.1,
                     attn_dropout=0.1),
        "llama-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096),
        "mistral-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                           sliding_window=4096, max_seq_len=32768, rope_theta=1e6),
    }

    def __post_init__(self):
        self._check_sizes("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.positions not in ("rope", "learned", "alibi"):
            raise ValueError(f"positions must be 'rope', 'learned' or 'alibi', got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be None or an int >= 1, got {self.sliding_window!r}")
        if self.hidden_dim is None:
            self.hidden_dim = swiglu_hidden(self.dim) if self.mlp == "swiglu" else 4 * self.dim
        self._check_dropout()

    def num_params(self) -> int:
        """Parameter count of DecoderOnly(self), computed without building it."""
        d, hd, b = self.dim, self.head_dim, int(self.bias)
        qkv = d * (self.n_heads + 2 * self.n_kv_heads) * hd + b * (self.n_heads + 2 * self.n_kv_heads) * hd
        wo = self.n_heads * hd * d + b * d
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * d * self.hidden_dim + b * ((n_mats - 1) * self.hidden_dim + d)
        norm_p = d * (2 if self.norm == "layer" else 1)
        layer = qkv + wo + mlp + 2 * norm_p
        emb = self.vocab_size * d
        pos = self.max_seq_len * d if self.positions == "learned" else 0
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * layer + emb + pos + norm_p + head


class Block(nn.Module):
    """Pre-norm block; the norms add the residual (fused) and hand the residual stream on."""

    def __init__(self, cfg: DecoderOnlyConfig, backend="auto"):
        super().__init__()
        window = (cfg.sliding_window - 1, 0) if cfg.sliding_window else (-1, -1)
        self.attn_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, causal=True,
                              rope_theta=cfg.rope_theta if cfg.positions == "rope" else None,
                              alibi=cfg.positions == "alibi", window_size=window, bias=cfg.bias,
                              dropout=cfg.attn_dropout, backend=backend)
        self.mlp_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.hidden_dim, cfg.mlp, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, hidden, residual, layer, context_parallel=None, **attn_kw):
        x, residual = norm(self.attn_norm, hidden, residual, prenorm=True)
        if context_parallel is not None:
            hidden = self.drop(context_parallel(self.attn, x))
        else:
            hidden = self.drop(self.attn(x, layer=layer, **attn_kw))
        x, residual = norm(self.mlp_norm, hidden, residual, prenorm=True)
        return self.drop(self.mlp(x)), residual


class DecoderOnly(nn.Module):
    """Decoder-only Transformer LM. forward(input_ids) -> logits; see `hidden_states` for the other inputs.

    ``context_parallel_group`` (a torch.distributed process group, or True for the default group): the model
    runs on a sequence sharded over the group's ranks. Each rank passes its shard of the token ids,
    ``transformer.distributed.shard_sequence(ids, context_parallel_scheme)`` ([B, N / P]), and gets the logits of
    its shard; positions (RoPE, learned) are the tokens' global positions and every attention layer runs
    ``transformer.distributed.context_parallel_attention`` with ``context_parallel_scheme`` ("zigzag", "ring" or
    "ulysses"). Every rank must call forward (and backward) together; no KV cache, padding or packing.
    """

    def __init__(self, config: DecoderOnlyConfig, backend: str = "auto", *, context_parallel_group=None,
                 context_parallel_scheme: str = "zigzag"):
        super().__init__()
        if not isinstance(config, DecoderOnlyConfig):
            raise TypeError(f"config must be a DecoderOnlyConfig, got {type(config).__name__}")
        self.config = config
        self.context_parallel = _context_parallel_option(context_parallel_group, context_parallel_scheme)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.dim) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, backend) for _ in range(config.n_layers))
        self.final_norm = make_norm(config.norm, config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch_size, capacity, *, page_size=None, dtype=None, device=None, kv_dtype=None) -> KVCache:
        """An empty KVCache sized for this model (contiguous, or paged with page_size; kv_dtype "int8" /
        "fp8_e4m3": quantized)."""
        c = self.config
        p = self.embed.weight
        return KVCache(c.n_layers, batch_size, capacity, c.n_kv_heads, c.head_dim, dtype=dtype or p.dtype,
                       device=device or p.device, page_size=page_size, kv_dtype=kv_dtype)

    def hidden_states(self, input_ids, *, key_lengths=None, cu_seqlens=None, max_seqlen=None, cache=None):
        """Final hidden states [B, N, dim] (or [T, dim] packed).

        input_ids: [B, N] (``key_lengths`` [B] for right padding), or packed [T] with ``cu_seqlens`` [B + 1]
        int32 and ``max_seqlen``. With ``cache`` (from make_cache): an empty cache is filled (prefill); a
        non-empty one is extended by N tokens per sequence through decode_attention (decode; N > 16 causal
        chunks of 16: chunked prefill). The cache is advanced here.
        """
        packed = cu_seqlens is not None
        if self.context_parallel is not None and (packed or key_lengths is not None or cache is not None):
            raise ValueError("a context-parallel model (context_parallel_group) takes input_ids [B, N / P] only: "
                             "no key_lengths, cu_seqlens or cache")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("input_ids must be an int64/int32 tensor of token ids")
        if input_ids.dim() != (1 if packed else 2):
            raise ValueError(f"input_ids must have shape {'[T] with cu_seqlens' if packed else '[B, N]'}, "
                             f"got {tuple(input_ids.shape)}")
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        new_lengths = None
        if cache is not None:
            if packed:
                new_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            elif key_lengths is not None and cache.empty:
                new_lengths = key_lengths.tolist()
            else:
                new_lengths = [input_ids.shape[1]] * input_ids.shape[0]
            if len(new_lengths) != cache.batch_size:
                raise ValueError(f"input_ids holds {len(new_lengths)} sequences but the cache {cache.batch_size}")
            cache.check_room(new_lengths, "input_ids")
        if self.pos_embed is not None and not packed and input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens per sequence, more than max_seq_len "
                             f"({self.config.max_seq_len}) learned positions")
        cp_positions = None
        if self.context_parallel is not None:
            cp_positions = _context_parallel_positions(self.context_parallel, input_ids,
                                                       self.config.max_seq_len if self.pos_embed is not None else None)
        h = self.embed(input_ids)
        if self.pos_embed is not None:
            if cp_positions is not None:
                pos = cp_positions
            elif packed:
                pos = packed_positions(cu_seqlens, input_ids.shape[0])[1]
            elif cache is not None and not cache.empty:
                pos = cache.seqlens.long()[:, None] + torch.arange(input_ids.shape[1], device=h.device)
            else:
                pos = torch.arange(input_ids.shape[1], device=h.device)
            h = h + self.pos_embed(pos)
        h = self.drop(h)
        kw = dict(cache=cache)
        if packed:
            kw.update(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        elif key_lengths is not None:
            kw.update(key_lengths=key_lengths)
        if cp_positions is not None:
            kw = dict(context_parallel=_ContextParallelAttention(self.context_parallel, cp_positions))
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, i, **kw)
        if cache is not None:
            cache.advance(new_lengths)
        return norm(self.final_norm, h, residual)

    def forward(self, input_ids, **kw):
        """Logits [B, N, vocab] (or [T, vocab] packed); keywords as `hidden_states`."""
        return self.lm_head(self.hidden_states(input_ids, **kw))


# ---------------------------------------------------------------------------------------------
# Context parallelism (DecoderOnly(..., context_parallel_group=...)): each rank holds a shard of the sequence
# ---------------------------------------------------------------------------------------------

def _context_parallel_option(group, scheme):
    """(group, scheme) or None. group True means the default process group."""
    if group is None or group is False:
        return None
    from .. import distributed
    if scheme not in distributed.SCHEMES:
        raise ValueError(f"context_parallel_scheme must be one of {distributed.SCHEMES}, got {scheme!r}")
    return (None if group is True else group), scheme


def _context_parallel_positions(option, input_ids, max_positions):
    """Global positions of this rank's tokens; ValueError if the whole sequence has more than max_positions."""
    from .. import distributed
    group, scheme = option
    total = input_ids.shape[1] * torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 0
    if max_positions is not None and total > max_positions:
        raise ValueError(f"input_ids holds {input_ids.shape[1]} tokens per rank, {total} per sequence: more than "
                         f"max_seq_len ({max_positions}) learned positions")
    return distributed.sequence_positions(input_ids.shape[1], scheme, group, device=input_ids.device)


class _ContextParallelAttention:
    """The attention of a Block over the sharded sequence: the module's projections and RoPE (on the global
    positions), then context_parallel_attention with the module's causal / window / ALiBi / softcap / backend."""

    def __init__(self, option, positions):
        self.group, self.scheme = option
        self.positions = positions

    def __call__(self, attn, x):
        from ..distributed import context_parallel_attention
        if x.dim() != 3 or x.shape[-1] != attn.dim:
            raise ValueError(f"x must have shape [B, N / P, dim={attn.dim}], got {tuple(x.shape)}")
        if attn._dropout_p() > 0:
            raise NotImplementedError("attention dropout (attn_dropout > 0 in training mode) with context "
                                      "parallelism: context_parallel_attention has no dropout")
        q, k, v = attn._qkv(x)
        q, k = attn._rotate(q, k, self.positions)
        out = context_parallel_attention(q, k, v, self.group, scheme=self.scheme, causal=attn.causal,
                                         window_size=attn.window_size, alibi_slopes=attn.alibi_slopes,
                                         softcap=attn.softcap, backend=attn.backend)
        return attn.wo(out.flatten(-2))
