"""Pieces shared by the models: norms with the fused residual path, MLPs, the encoder layer, positional
encodings, padding helpers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..nn.attention import Attention
from ..norms import layer_norm, rms_norm

__all__ = ["ModelConfig", "make_norm", "norm", "MLP", "EncoderLayer", "SinusoidalPositions", "swiglu_hidden",
           "lengths_to_cu_seqlens", "check_token_ids"]


class ModelConfig:
    """Base of the models' dataclass configs: named presets (a subclass's PRESETS) and the common checks."""

    PRESETS: dict = {}

    @classmethod
    def preset(cls, name: str, **overrides):
        """The named preset of PRESETS, with fields overridden by keyword."""
        if name not in cls.PRESETS:
            raise ValueError(f"name must be one of {sorted(cls.PRESETS)}, got {name!r}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def _check_sizes(self, *fields):
        for f in fields:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be an int >= 1, got {v!r}")

    def _check_dropout(self):
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_token_ids(name, ids, vocab_size):
    """Token ids within 0..vocab_size-1, checked where that is free (CPU tensors, outside torch.compile
    tracing): the embedding lookup would otherwise fail with a bare IndexError."""
    if _checks.check_validate(None, ids):
        bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
        if bad.numel():
            at = tuple(int(i) for i in bad[0])
            raise ValueError(f"{name}{list(at)} = {int(ids[at])} is not a token id of the model (0..{vocab_size - 1})")


def make_norm(kind: str, dim: int, eps: float, device=None, dtype=None) -> nn.Module:
    """A LayerNorm ("layer") or RMSNorm ("rms") module: transformer.nn's when available, else torch.nn's.

    ``norm()`` applies it with the fused residual add (``layer_norm`` / ``rms_norm`` through the dispatcher)
    whichever class it is.
    """
    if kind not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")
    try:
        from ..nn import norms as tf_norms  # transformer.nn.LayerNorm / RMSNorm (fused residual path)
        cls = tf_norms.LayerNorm if kind == "layer" else tf_norms.RMSNorm
        mod = cls(dim, eps=eps, device=device, dtype=dtype)
    except (ImportError, AttributeError, TypeError):
        mod = (nn.LayerNorm if kind == "layer" else nn.RMSNorm)(dim, eps=eps, device=device, dtype=dtype)
    mod.norm_kind = kind
    return mod


def norm(module: nn.Module, x, residual=None, prenorm=False):
    """Apply a norm made by make_norm to h = x (+ residual). prenorm=True returns (out, h) for pre-norm blocks."""
    if hasattr(module, "residual_in_fp32"):       # transformer.nn.LayerNorm / RMSNorm: fused residual in forward
        return module(x, residual=residual, prenorm=prenorm)
    w = getattr(module, "weight", None)           # torch.nn fallback: same math through the public ops
    eps = module.eps if getattr(module, "eps", None) is not None else torch.finfo(x.dtype).eps
    if module.norm_kind == "layer":
        return layer_norm(x, w, getattr(module, "bias", None), eps, residual=residual, prenorm=prenorm)
    return rms_norm(x, w, eps, residual=residual, prenorm=prenorm)


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of `multiple_of`."""
    h = int(2 * 4 * dim / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


class MLP(nn.Module):
    """Position-wise feed-forward network: "relu" / "gelu" (two matrices) or "swiglu" (three)."""

    def __init__(self, dim, hidden_dim, kind="swiglu", bias=False, device=None, dtype=None):
        super().__init__()
        if kind not in ("relu", "gelu", "swiglu"):
            raise ValueError(f"mlp must be 'relu', 'gelu' or 'swiglu', got {kind!r}")
        fk = dict(bias=bias, device=device, dtype=dtype)
        self.kind = kind
        self.w1 = nn.Linear(dim, hidden_dim, **fk)
        self.w2 = nn.Linear(hidden_dim, dim, **fk)
        self.w3 = nn.Linear(dim, hidden_dim, **fk) if kind == "swiglu" else None

    def forward(self, x):
        if self.kind == "swiglu":
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        act = F.relu if self.kind == "relu" else F.gelu
        return self.w2(act(self.w1(x)))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention then a position-wise MLP, each with dropout and a residual around it:
    post-norm, LN(x + Sublayer(x)), as in the Transformer and BERT papers, or pre-norm (x + Sublayer(LN(x))).

    forward(x [B, N, dim], key_lengths=None): key_lengths [B] marks right padding (keys >= length are hidden).
    attn_dropout: dropout on the attention probabilities (training mode, fused into the kernels)."""

    def __init__(self, dim, n_heads, hidden_dim, activation, *, norm_eps, dropout, pre_norm, attn_dropout=0.0,
                 backend="auto"):
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = Attention(dim, n_heads, causal=False, rope_theta=None, bias=True, dropout=attn_dropout,
                              backend=backend)
        self.mlp = MLP(dim, hidden_dim, activation, bias=True)
        self.norm1 = make_norm("layer", dim, norm_eps)
        self.norm2 = make_norm("layer", dim, norm_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_lengths=None):
        if self.pre_norm:
            x = x + self.drop(self.attn(norm(self.norm1, x), key_lengths=key_lengths))
            return x + self.drop(self.mlp(norm(self.norm2, x)))
        x = norm(self.norm1, self.drop(self.attn(x, key_lengths=key_lengths)), residual=x)
        return norm(self.norm2, self.drop(self.mlp(x)), residual=x)


class SinusoidalPositions(nn.Module):
    """The fixed sin/cos encodings of "Attention Is All You Need" (section 3.5), computed for any position."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even for sinusoidal positions, got {dim}")
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        self.register_buffer("div", div, persistent=False)

    def forward(self, positions):
        """positions: int tensor [...] -> fp32 [..., dim] (sin in even, cos in odd channels)."""
        ang = positions.to(torch.float32).unsqueeze(-1) * self.div
        return torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)


def lengths_to_cu_seqlens(lengths, device=None):
    """Host list of ints (or a 1-D tensor) -> int32 [B + 1] cumulative offsets."""
    t = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return F.pad(torch.cumsum(t, 0, dtype=torch.int32), (1, 0))
