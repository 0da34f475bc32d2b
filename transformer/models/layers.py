"""Pieces shared by the models: norms with the fused residual path, MLPs, positional encodings, padding helpers."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..norms import layer_norm, rms_norm

__all__ = ["make_norm", "norm", "MLP", "SinusoidalPositions", "swiglu_hidden", "lengths_to_cu_seqlens"]


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
