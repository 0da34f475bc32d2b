"""The decode-attention op contract shared by the Triton and CUDA backends: fake, entry function, limits.

Every kernel backend defines one op in its namespace:

    decode_attention(q, k_cache!, v_cache!, cache_seqlens, k, v, block_table, alibi_slopes, softmax_scale,
                     window_left, window_right, softcap, num_splits, k_scale!=None, v_scale!=None,
                     rotary_cos=None, rotary_sin=None, rotary_interleaved=False)
        -> (out [B, Sq, Hq, D], lse [B, Hq, Sq])

k_cache / v_cache are mutated in place (the schema marks them ``Tensor(a!)``) when k / v are given: the new
tokens are written at positions cache_seqlens .. cache_seqlens + Sq - 1 before attending. A quantized cache
(k_cache / v_cache int8 or float8_e4m3fn) comes with its fp32 scales k_scale / v_scale (the cache's shape
without D, mutated like the caches): appends store reference.quantize_kv(k) (8-bit values and scales), attention
reads reference.dequantize_kv(cache, scale) rounded to q's dtype. The scales are the last two arguments, with
default None, so the 16-bit schema's positional calls are unchanged. rotary_cos / rotary_sin [seqlen_ro,
rotary_dim / 2] (any float dtype; seqlen_ro >= capacity, host-checked) rotate the appended k rows and q in the
kernels, as reference.rotary_decode; q row i turns at cache_seqlens + i when a window side (causal included) is
in 0..capacity-1, else at cache_seqlens; rows outside the table are clamped to it. They follow the scales and
are passed only when given (a backend whose schema lacks them declines rotary calls). window_* = -1
means unbounded; causal is window_right = 0, folded in by `decode_attention` here. num_splits = 0 lets the
launcher pick the split count from shapes and the cached SM count: no device-to-host copy, so a decode step
can be captured in a CUDA graph. lse is fp32, natural log. Inference only (no autograd formula).
"""
from __future__ import annotations

import torch

from .. import _checks

__all__ = ["MAX_SPLITS", "register", "supports", "decode_attention"]

MAX_SPLITS = 128      # split-KV chunks per sequence the kernels take (the public function's limit)


def _fake(q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes, softmax_scale, window_left,
          window_right, softcap, num_splits, k_scale=None, v_scale=None, rotary_cos=None, rotary_sin=None,
          rotary_interleaved=False):
    b, sq, hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, hq, sq), dtype=torch.float32)


def register(ns: str):
    """Fake of torch.ops.<ns>.decode_attention (call once per namespace)."""
    torch.library.register_fake(f"{ns}::decode_attention")(_fake)


def supports(call, what, rotary=True):
    """Limits of the decode kernels beyond what the public describe checks (head dim <= 256, any group size,
    page size >= 1, Sq <= 16, contiguous last dims, num_splits <= MAX_SPLITS): fp16/bf16 q (and 16-bit caches
    of q's dtype, or int8 / fp8 e4m3 caches with scales), no backward. `what` names the kernel in the reason."""
    if call["dtype"] not in _checks.HALF_DTYPES:
        if call.get("kv_dtype"):
            return f"the {what} needs a float16/bfloat16 q over a {call['kv_dtype']} cache, got {call['dtype']}"
        return f"the {what} needs float16/bfloat16 tensors, got {call['dtype']}"
    if call["requires_grad"]:
        return f"the {what} is inference-only (no backward) and a tensor requires grad"
    if call.get("rotary_dim") and not rotary:
        return f"the {what} does not apply rotary embeddings (rotary_cos / rotary_sin)"
    return None


def decode_attention(op, q, k_cache, v_cache, cache_seqlens, *, k, v, block_table, softmax_scale, causal,
                     window_size, alibi_slopes, softcap, num_splits, return_lse, k_scale=None, v_scale=None,
                     rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    """Canonical entry (transformer/decode.py, arguments validated) over a backend's decode op. Raises
    ValueError when a tensor requires grad while grad mode is on: the kernels are inference-only."""
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
            if t is not None and t.requires_grad:
                raise ValueError(f"decode_attention kernels are inference-only (no backward), but {name} "
                                 f"requires grad; run it under torch.no_grad() or use backend='reference'")
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    extra = () if k_scale is None and v_scale is None else (k_scale, v_scale)
    if rotary_cos is not None:
        extra = (k_scale, v_scale, rotary_cos, rotary_sin, bool(rotary_interleaved))
    out, lse = op(q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes, float(softmax_scale),
                  left, right, float(softcap), int(num_splits), *extra)
    return (out, lse) if return_lse else out
