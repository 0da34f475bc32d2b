"""The "reference" backend: transformer.reference run in fp32, results cast back to the input dtype. Index
values are taken as the kernels take them (the public functions validate them when asked)."""
from __future__ import annotations

import torch

from . import reference
from .ops import attention as _attention_contract


def _out(result, dtype, prenorm_or_lse):
    if prenorm_or_lse:
        out, extra = result
        return out.to(dtype), extra
    return result.to(dtype)


def flash_attention(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap, deterministic,
                    return_lse, causal_align, dropout_p=0.0, rng_state=None):
    res = reference.attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                              alibi_slopes=alibi_slopes, softcap=softcap, causal_align=causal_align,
                              return_lse=return_lse, dropout_p=dropout_p, rng_state=rng_state)
    return _out(res, q.dtype, return_lse)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal,
                           softmax_scale, window_size, alibi_slopes, softcap, deterministic, return_lse,
                           causal_align, dropout_p=0.0, rng_state=None):
    res = reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                                     alibi_slopes=alibi_slopes, softcap=softcap, causal_align=causal_align,
                                     return_lse=return_lse, validate=False, dropout_p=dropout_p, rng_state=rng_state)
    return _out(res, q.dtype, return_lse)


def padded_attention(q, k, v, key_start, key_end, **kw):
    return _attention_contract.padded_attention(flash_attention_varlen, q, k, v, key_start, key_end, **kw)


def _h_dtype(x, residual_in_fp32):
    return torch.float32 if residual_in_fp32 else x.dtype


def layer_norm(x, weight, bias, eps, *, residual, prenorm, residual_in_fp32):
    res = reference.layer_norm(x, weight, bias, eps, residual=residual, prenorm=prenorm)
    if prenorm:
        return res[0].to(x.dtype), res[1].to(_h_dtype(x, residual_in_fp32))
    return res.to(x.dtype)


def rms_norm(x, weight, eps, *, residual, prenorm, residual_in_fp32):
    res = reference.rms_norm(x, weight, eps, residual=residual, prenorm=prenorm)
    if prenorm:
        return res[0].to(x.dtype), res[1].to(_h_dtype(x, residual_in_fp32))
    return res.to(x.dtype)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, k, v, block_table, softmax_scale, causal,
                     window_size, alibi_slopes, softcap, num_splits, return_lse, k_scale=None, v_scale=None,
                     rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    res = reference.decode_attention(q, k_cache, v_cache, cache_seqlens, k=k, v=v, block_table=block_table,
                                     softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                     alibi_slopes=alibi_slopes, softcap=softcap, return_lse=return_lse,
                                     validate=False, k_scale=k_scale, v_scale=v_scale, rotary_cos=rotary_cos,
                                     rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved)
    if return_lse:
        return res[0].to(q.dtype), res[1].float()
    return res.to(q.dtype)
