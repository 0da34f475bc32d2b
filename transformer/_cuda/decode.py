"""CUDA decode attention over a KV cache (csrc/decode/): fake and the canonical entry function.

Op (both namespaces, see transformer/_cuda/__init__.py), same contract as the Triton op in
triton_kernels/decode.py:

    decode_attention(q, k_cache!, v_cache!, cache_seqlens, k, v, block_table, alibi_slopes, softmax_scale,
                     causal, window_left, window_right, softcap, num_splits) -> (out [B, Sq, Hq, D], lse [B, Hq, Sq])

k_cache / v_cache are mutated in place (the schema marks them ``Tensor(a!)``) when k / v are given: the new
tokens are written at positions cache_seqlens .. cache_seqlens + Sq - 1 before attending. num_splits = 0
lets the C++ launcher pick the split count from shapes and the cached SM count: no device-to-host copy,
so a decode step can be captured in a CUDA graph. Inference only (no autograd formula).
"""
from __future__ import annotations

import torch

from . import ops

__all__ = ["decode_attention", "register"]


def _fake(q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes, softmax_scale, causal, window_left,
          window_right, softcap, num_splits):
    b, sq, hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, hq, sq), dtype=torch.float32)


def register(ns: str):
    """Fake of the decode op of torch.ops.<ns> (called once per namespace by ops())."""
    torch.library.register_fake(f"{ns}::decode_attention")(_fake)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, k, v, block_table, softmax_scale, causal,
                     window_size, alibi_slopes, softcap, num_splits, return_lse):
    """Canonical entry (transformer/decode.py; arguments validated). Raises ValueError when a tensor requires
    grad while grad mode is on: the kernels are inference-only."""
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
            if t is not None and t.requires_grad:
                raise ValueError(f"the cuda decode_attention is inference-only (no backward), but {name} "
                                 f"requires grad; run it under torch.no_grad() or use backend='reference'")
    out, lse = ops(q.device).decode_attention(
        q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes, float(softmax_scale), bool(causal),
        int(window_size[0]), int(window_size[1]), float(softcap), int(num_splits))
    return (out, lse) if return_lse else out
