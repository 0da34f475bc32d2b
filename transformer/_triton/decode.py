"""Triton decode attention as a torch custom op (torch.ops.tileformer_triton.decode_attention) and the
backend's entry function. Kernels and launcher: triton_kernels/decode.py; the op schema, fake and limits:
the shared contract, transformer/ops/decode.py."""
from __future__ import annotations

from typing import Optional

import torch

from triton_kernels import decode as kernels

from ..ops import decode as contract

__all__ = ["decode_attention", "supports"]


@torch.library.custom_op("tileformer_triton::decode_attention",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
              k: Optional[torch.Tensor], v: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
              alibi_slopes: Optional[torch.Tensor], softmax_scale: float, window_left: int, window_right: int,
              softcap: float, num_splits: int, k_scale: Optional[torch.Tensor] = None,
              v_scale: Optional[torch.Tensor] = None, rotary_cos: Optional[torch.Tensor] = None,
              rotary_sin: Optional[torch.Tensor] = None,
              rotary_interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.decode(q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes, softmax_scale,
                          window_left, window_right, softcap, num_splits, k_scale, v_scale, rotary_cos, rotary_sin,
                          rotary_interleaved)


contract.register("tileformer_triton")


def supports(call):
    return contract.supports(call, "triton decode kernel")


def decode_attention(q, k_cache, v_cache, cache_seqlens, **kw):
    return contract.decode_attention(torch.ops.tileformer_triton.decode_attention, q, k_cache, v_cache,
                                     cache_seqlens, **kw)
