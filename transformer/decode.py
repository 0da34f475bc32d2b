"""Public decode-attention API (attention of a few new queries over a KV cache): defaults, docs, dispatch.

Canonical backend signature (validated arguments, softmax_scale a float):

    decode_attention(q, k_cache, v_cache, cache_seqlens, *, k, v, block_table, softmax_scale, causal,
                     window_size, alibi_slopes, softcap, num_splits, return_lse, k_scale, v_scale,
                     rotary_cos, rotary_sin, rotary_interleaved)
        -> out | (out, lse)
"""
from __future__ import annotations

import torch

from . import _checks, backends
from .ops.decode import MAX_SPLITS

__all__ = ["decode_attention"]


def _describe(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, block_table=None, softmax_scale=None,
              causal=True, window_size=(-1, -1), alibi_slopes=None, softcap=0.0, num_splits=0, return_lse=False,
              k_scale=None, v_scale=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    info = _checks.check_decode(q, k_cache, v_cache, cache_seqlens, k, v, block_table, window_size=window_size,
                                softcap=softcap, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
                                k_scale=k_scale, v_scale=v_scale, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                rotary_interleaved=rotary_interleaved)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in 0..{MAX_SPLITS} (0 = choose automatically), got {num_splits!r}")
    _checks.check_bool("causal", causal)
    _checks.check_bool("return_lse", return_lse)
    return dict(device=q.device, dtype=q.dtype, head_dim=info["head_dim"], hq=info["hq"], hkv=info["hkv"],
                group=info["hq"] // info["hkv"], sq=info["sq"], paged=info["paged"], page_size=info["page_size"],
                capacity=info["capacity"], append=k is not None, causal=causal, window=info["window"],
                alibi=alibi_slopes is not None, softcap=info["softcap"], num_splits=num_splits, return_lse=return_lse,
                scale=info["scale"], kv_dtype=info["kv_dtype"], rotary_dim=info["rotary_dim"],
                requires_grad=torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (q, k_cache, v_cache, k, v)))


backends.register_op("decode_attention", _describe)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, block_table=None, softmax_scale=None,
                     causal=True, window_size=(-1, -1), alibi_slopes=None, softcap=0.0, num_splits=0,
                     return_lse=False, validate=None, backend="auto", k_scale=None, v_scale=None, rotary_cos=None,
                     rotary_sin=None, rotary_interleaved=False):
    """Attention of Sq new queries per sequence over a KV cache (flash-attn's flash_attn_with_kvcache).

    Args:
        q: [B, Sq, Hq, D], 1 <= Sq <= 16 (1 for plain decoding, more for speculative decoding).
        k_cache, v_cache: contiguous [B, S_max, Hkv, D], or paged [num_pages, page_size, Hkv, D] with
            ``block_table`` [B, max_pages] int32 (token t of sequence b lives in page block_table[b, t // page_size]).
        cache_seqlens: [B] int32, tokens already in the cache per sequence.
        k, v: optional [B, Sq, Hkv, D] new tokens, written into the cache in place at
            cache_seqlens .. cache_seqlens + Sq - 1 before attending (cache_seqlens itself is not changed).
        causal: the Sq queries sit at the end of their sequence (bottom-right alignment).
        window_size, alibi_slopes, softcap, softmax_scale: as `flash_attention`.
        num_splits: split-KV chunks per sequence; 0 picks a count on the host (no device sync).
        return_lse: also return lse [B, Hq, Sq] (fp32, natural log).
        k_scale, v_scale: the fp32 scales of a quantized cache (k_cache / v_cache int8 or float8_e4m3fn, e.g. a
            ``KVCache(kv_dtype=...)``), shaped like the cache without D ([B, S_max, Hkv] or
            [num_pages, page_size, Hkv]): token t, head h holds k_cache[..., t, h, :] * k_scale[..., t, h]
            (``reference.dequantize_kv``). The kernels read 8 bits per element plus the scales and dequantize in
            registers to q's dtype; appended k / v (q's dtype) are quantized in place like
            ``reference.quantize_kv`` (values and scales, bit for bit), under the same index rules.
        rotary_cos, rotary_sin: optional rotary embedding tables [seqlen_ro, rotary_dim / 2] (any float dtype, read
            as fp32; rotary_dim even, <= D; seqlen_ro >= the cache capacity), with k / v: the appended k row i of
            sequence b is rotated at position cache_seqlens[b] + i before it is stored (and quantized), q row i at
            cache_seqlens[b] + i when causal or windowed (a window side < capacity), else every q row at
            cache_seqlens[b] (flash-attn's flash_attn_with_kvcache). The first rotary_dim dims of each head turn
            as ``transformer.nn.rope.apply_rotary`` computes them (fp32, bit for bit; ``reference.rotary_decode``);
            the rest pass through. Positions outside 0..seqlen_ro-1 (only unchecked cache_seqlens reach them) read
            the nearest row.
        rotary_interleaved: pairs (x[2j], x[2j + 1]) (GPT-J) instead of (x[j], x[j + rotary_dim / 2]) (GPT-NeoX /
            LLaMA, the default, as ``apply_rotary``).
        validate: check the cache_seqlens / block_table values (lengths within the capacity, the pages a
            sequence uses within 0..num_pages-1), which costs a device-to-host copy; None (default) checks CPU
            tensors only. Unchecked values never make a kernel read or write outside its tensors: lengths are
            clamped to 0..capacity, appends outside the cache are dropped, and a page id outside
            0..num_pages-1 holds no visible token (nothing is read from it or appended into it).
    Returns out [B, Sq, Hq, D] (dtype of q), or (out, lse). Sequences with no visible token give 0.
    """
    kw = dict(k=k, v=v, block_table=block_table, softmax_scale=softmax_scale, causal=causal,
              window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap, num_splits=num_splits,
              return_lse=return_lse, k_scale=k_scale, v_scale=v_scale, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
              rotary_interleaved=rotary_interleaved)
    call = _describe(q, k_cache, v_cache, cache_seqlens, **kw)
    if _checks.check_validate(validate, q):
        _checks.check_decode_values(cache_seqlens, block_table, k_cache.shape[0], call["page_size"],
                                    call["capacity"], call["sq"] if k is not None else 0)
    kw.update(softmax_scale=call["scale"], window_size=call["window"], softcap=call["softcap"])
    return backends.dispatch("decode_attention", call, backend, q, k_cache, v_cache, cache_seqlens, **kw)
