"""Rotary position embeddings (RoPE, Su et al. 2021), LLaMA / GPT-NeoX "rotate half" convention.

Plain PyTorch (a few element-wise ops the compiler fuses); positions are a tensor, so packed sequences,
ragged batches and KV-cache decoding all take the same path without host syncs.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


def apply_rotary(x, cos, sin):
    """x [..., N, H, D]; cos/sin [..., N, D] (fp32). Rotates pairs (x[i], x[i + D/2]); returns x's dtype."""
    d2 = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d2], xf[..., d2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = xf * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)
    return out.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed on the fly for integer positions.

    Args:
        head_dim: even size of the rotated head dimension.
        theta: base of the frequencies (10000 in the paper and LLaMA 1/2; 500000 in LLaMA 3).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, device=None):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2 for RoPE, got {head_dim!r}")
        if not isinstance(theta, (int, float)) or theta <= 1:
            raise ValueError(f"theta must be a number > 1, got {theta!r}")
        self.head_dim, self.theta = head_dim, float(theta)
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions):
        """positions: int tensor [...] -> (cos, sin), each fp32 [..., head_dim]."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def extra_repr(self):
        return f"head_dim={self.head_dim}, theta={self.theta:g}"
