"""Rotary position embeddings (RoPE, Su et al. 2021), LLaMA / GPT-NeoX "rotate half" convention.

Plain PyTorch (a few element-wise ops the compiler fuses); positions are a tensor, so packed sequences,
ragged batches and KV-cache decoding all take the same path without host syncs.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding", "apply_rotary"]


def apply_rotary(x, cos, sin, *, interleaved=False):
    """Rotate the first R dims of each head of x [..., N, H, D] by cos/sin [..., N, R] (fp32, R even, R <= D);
    dims R.. pass through unchanged. Returns x's dtype; the rotation is computed in fp32.

    Pairs are (x[i], x[i + R/2]) ("rotate half", GPT-NeoX / LLaMA), or with ``interleaved=True`` (x[2i], x[2i + 1])
    (GPT-J). Either way pair i turns by the angle whose cos/sin sit at cos[..., i] == cos[..., i + R/2] (the
    layout `RotaryEmbedding` returns): an interleaved x is de-interleaved, rotated by the same fp32 math and
    re-interleaved, so both conventions give bit-identical values for the same pairs.
    """
    r = cos.shape[-1]
    if tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"sin must have the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if r < 2 or r % 2 or r > x.shape[-1]:
        raise ValueError(f"the rotary dim (cos.shape[-1]) must be even and in 2..{x.shape[-1]} (the head dim), "
                         f"got {r}")
    if r < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :r], cos, sin, interleaved=interleaved), x[..., r:]), dim=-1)
    if interleaved:   # (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...), rotated, then back
        halves = x.unflatten(-1, (r // 2, 2)).transpose(-1, -2).flatten(-2)
        return apply_rotary(halves, cos, sin).unflatten(-1, (2, r // 2)).transpose(-1, -2).flatten(-2)
    d2 = r // 2
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
        self._tables = None     # (inv_freq it was computed from, cos, sin) of `tables`

    def tables(self, n):
        """(cos, sin) fp32 [n, head_dim / 2] for positions 0..n-1, the rotary_cos / rotary_sin layout of
        ``decode_attention``: row p is the first half of ``forward(p)``'s (the second repeats it). Kept between
        calls; recomputed when n exceeds the kept rows or inv_freq was replaced (e.g. by ``.to(device)``)."""
        kept = self._tables
        if kept is None or kept[0] is not self.inv_freq or kept[1].shape[0] < n:
            cos, sin = self(torch.arange(n, device=self.inv_freq.device))
            half = self.head_dim // 2
            self._tables = kept = (self.inv_freq, cos[:, :half].contiguous(), sin[:, :half].contiguous())
        return kept[1][:n], kept[2][:n]

    def forward(self, positions):
        """positions: int tensor [...] -> (cos, sin), each fp32 [..., head_dim]."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def extra_repr(self):
        return f"head_dim={self.head_dim}, theta={self.theta:g}"
