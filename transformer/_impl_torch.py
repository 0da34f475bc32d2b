"""The "torch" backend: PyTorch built-ins (SDPA, F.layer_norm, F.rms_norm). The fast fallback on any device.

Masks come from transformer.reference.attention_mask, so the visibility rules live in one place.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .reference import alibi_bias, attention_mask, varlen_bounds, zeros_like_output


# On the CPU, SDPA's fused (flash) kernel recomputes the scores in its backward with another summation order than
# its forward, so P = exp(S - lse) comes back within ~1e-6 of its forward value instead of equal to it: a row with
# a single visible key gets P != 1, and dV = dO (or the sum of a query group's dO) then lands on the other side of
# a rounding tie once cast to fp16 / bf16, one ulp from PyTorch's own low-precision result. The math backend keeps
# the forward's P for the backward. It materialises the [B, H, Nq, Nk] scores, so it serves calls up to this many
# scores; larger ones take the fused kernel.
_CPU_MATH_MAX_SCORES = 1 << 26


def _sdpa_backend(q, k):
    """The SDPA backend context for q [B, Hq, Nq, D], k [B, Hkv, Nk, D]: the math backend for CPU calls up to
    _CPU_MATH_MAX_SCORES scores, PyTorch's own choice otherwise."""
    if q.device.type == "cpu" and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= _CPU_MATH_MAX_SCORES:
        return torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    return contextlib.nullcontext()


def _sdpa(q, k, v, mask, bias, scale):
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]; mask bool broadcastable to [B, Hq, Nq, Nk] or None.

    Rows with no visible key return 0 (SDPA would give NaN there): such rows are unmasked for the
    call and zeroed after, which keeps their gradients at exactly 0.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None and bias is None:
        with _sdpa_backend(q, k):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    row_visible = None
    attn_mask = None
    if mask is not None:
        row_visible = mask.any(dim=-1, keepdim=True)
        attn_mask = mask | ~row_visible
    if bias is not None:
        bias = bias.to(q.dtype)
        attn_mask = bias if attn_mask is None else bias.masked_fill(~attn_mask, float("-inf"))
    with _sdpa_backend(q, k):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    if row_visible is not None:
        out = torch.where(row_visible, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _half_on_cpu(q):
    """PyTorch's CPU SDPA in fp16/bf16 sums the GQA gradients of K/V in half precision (twice rounded, beyond
    the tolerance rule); on the CPU half inputs are computed in fp32 and the results cast back."""
    return q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16)


def _dense(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, causal_align):
    """q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D] -> [B, Nq, Hq, D]."""
    if _half_on_cpu(q):
        return _dense(q.float(), k.float(), v.float(), causal=causal, softmax_scale=softmax_scale,
                      window_size=window_size, alibi_slopes=alibi_slopes, causal_align=causal_align).to(q.dtype)
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    unbounded = window_size == (-1, -1)
    if unbounded and alibi_slopes is None and (not causal or (causal_align == "top_left" or nq == nk)):
        with _sdpa_backend(qt, kt):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                 scale=softmax_scale, enable_gqa=qt.shape[1] != kt.shape[1])
        return out.transpose(1, 2)
    mask = None
    if causal or not unbounded:
        mask = attention_mask(nq, nk, causal=causal, window_size=window_size, causal_align=causal_align,
                              device=q.device)
    bias = None
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, b, nq, nk, causal_align=causal_align)
    return _sdpa(qt, kt, vt, mask, bias, softmax_scale).transpose(1, 2)


def flash_attention(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap, deterministic,
                    return_lse, causal_align, dropout_p=0.0, rng_state=None):
    return _dense(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                  alibi_slopes=alibi_slopes, causal_align=causal_align)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal,
                           softmax_scale, window_size, alibi_slopes, softcap, deterministic, return_lse,
                           causal_align, dropout_p=0.0, rng_state=None):
    # One SDPA call per sequence; reading cu_seqlens costs a device-to-host copy (fallback path). Bounds are
    # clamped as the kernels clamp them (transformer/_checks.py); tokens in no sequence give 0.
    bq = varlen_bounds(cu_seqlens_q.tolist(), q.shape[0])
    bk = varlen_bounds(cu_seqlens_k.tolist(), k.shape[0])
    out = zeros_like_output(q.shape, q.dtype, q, k, v)
    for i, ((qa, qb), (ka, kb)) in enumerate(zip(bq, bk)):
        if ka == kb or qa == qb:
            continue
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o = _dense(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], causal=causal, softmax_scale=softmax_scale,
                   window_size=window_size, alibi_slopes=slopes, causal_align=causal_align)[0]
        out = out.index_put((torch.arange(qa, qb, device=q.device),), o)
    return out


def attention_supports(call):
    if call.get("dropout", 0.0) > 0:
        return ("dropout_p > 0: SDPA's dropout mask is not the counter-based mask every other backend applies "
                "(transformer.reference.dropout_keep)")
    if call["softcap"] > 0:
        return "F.scaled_dot_product_attention has no softcap"
    if call["return_lse"]:
        return "F.scaled_dot_product_attention does not return the log-sum-exp"
    if call["deterministic"] and call["device"].type == "cuda" and call["requires_grad"]:
        return "SDPA's CUDA backward is not guaranteed deterministic"
    return None


def _run_mask(nq, nk, start, end, causal, causal_align, window):
    """Boolean [B, 1, Nq, Nk]: key j visible to query i under padded_attention's rules."""
    dev = start.device
    i = torch.arange(nq, device=dev).view(1, -1, 1)
    j = torch.arange(nk, device=dev).view(1, 1, -1)
    s, e = start.long().view(-1, 1, 1), end.long().view(-1, 1, 1)
    mask = (j >= s) & (j < e)
    # Query i sits at run position i + off; run position of key j is j - start.
    off = (e - s - nq) if causal_align == "bottom_right" else torch.zeros_like(s)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        mask = mask & (j - s <= i + off + right)
    if left >= 0:
        mask = mask & (j - s >= i + off - left)
    return mask.expand(-1, nq, nk)[:, None], (i + off + s)  # query position in key coordinates, for ALiBi


def padded_attention(q, k, v, key_start, key_end, *, causal, softmax_scale, window_size, alibi_slopes, softcap,
                     deterministic, return_lse, causal_align, dropout_p=0.0, rng_state=None):
    """One masked SDPA call over the padded batch (no host copy; the varlen path would loop over sequences).
    Bounds are clamped as the kernels clamp them: 0 <= start <= end <= Nk."""
    if _half_on_cpu(q):
        return padded_attention(q.float(), k.float(), v.float(), key_start, key_end, causal=causal,
                                softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
                                softcap=softcap, deterministic=deterministic, return_lse=return_lse,
                                causal_align=causal_align).to(q.dtype)
    start = key_start.long().clamp(0, k.shape[1])
    end = torch.maximum(key_end.long().clamp(max=k.shape[1]), start)
    b, nq, hq, _ = q.shape
    nk = k.shape[1]
    mask, qpos = _run_mask(nq, nk, start, end, causal, causal_align, window_size)   # (B, 1, Nq, Nk)
    row_visible = mask.any(dim=-1, keepdim=True)
    attn_mask = mask | ~row_visible        # rows with no visible key: unmask for the call, zero after
    if alibi_slopes is not None:
        slopes = alibi_slopes.view(1, -1) if alibi_slopes.dim() == 1 else alibi_slopes
        dist = (qpos - torch.arange(nk, device=q.device).view(1, 1, -1)).abs().float()  # (B, Nq, Nk)
        bias = (-slopes.expand(b, -1)[:, :, None, None] * dist[:, None]).to(q.dtype)
        attn_mask = bias.masked_fill(~attn_mask, float("-inf"))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with _sdpa_backend(qt, kt):
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, scale=softmax_scale,
                                             enable_gqa=hq != k.shape[2])
    out = torch.where(row_visible, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2)


def _residual_add(x, residual, residual_in_fp32):
    if residual is None:
        h = x
    else:
        h = x.float() + residual.float()
    if residual_in_fp32:
        h = h.float()
    return h


def _norm(fn, x, params, eps, residual, prenorm, residual_in_fp32):
    h = _residual_add(x, residual, residual_in_fp32)
    same = all(p is None or p.dtype == h.dtype for p in params)
    # PyTorch's CPU half-precision LayerNorm backward accumulates dweight in half (fails the tolerance
    # rule against the fp32 reference): on the CPU, half inputs are normalised in fp32.
    if same and not (h.device.type == "cpu" and h.dtype in (torch.float16, torch.bfloat16)):
        out = fn(h, params, eps).to(x.dtype)
    else:  # mixed precision (e.g. fp32 weight, bf16 x): compute in fp32
        out = fn(h.float(), [None if p is None else p.float() for p in params], eps).to(x.dtype)
    if prenorm:
        return out, h.to(torch.float32 if residual_in_fp32 else x.dtype)
    return out


def layer_norm(x, weight, bias, eps, *, residual, prenorm, residual_in_fp32):
    return _norm(lambda h, p, e: F.layer_norm(h, (h.shape[-1],), p[0], p[1], e), x, [weight, bias], eps,
                 residual, prenorm, residual_in_fp32)


def rms_norm(x, weight, eps, *, residual, prenorm, residual_in_fp32):
    return _norm(lambda h, p, e: F.rms_norm(h, (h.shape[-1],), p[0], e), x, [weight], eps,
                 residual, prenorm, residual_in_fp32)


def decode_supports(call):
    if call["softcap"] > 0:
        return "F.scaled_dot_product_attention has no softcap"
    if call["return_lse"]:
        return "F.scaled_dot_product_attention does not return the log-sum-exp"
    return None


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, k, v, block_table, softmax_scale, causal,
                     window_size, alibi_slopes, softcap, num_splits, return_lse, k_scale=None, v_scale=None,
                     rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    """Vectorised over the batch (no host sync): gather the cache, mask by length, one SDPA call. Index values
    are taken as the kernels take them (transformer/_checks.py): lengths clamped to 0..capacity, appends outside
    the cache or into invalid pages dropped, tokens of invalid pages not visible. A quantized cache (k_scale /
    v_scale given) stores appends as reference.quantize_kv and is read as reference.dequantize_kv in q's dtype.
    Rotary tables rotate q and k first (reference.rotary_decode, vectorised)."""
    from . import reference
    kv_dtype = None if k_scale is None else ("int8" if k_cache.dtype == torch.int8 else "fp8_e4m3")
    b, sq = q.shape[0], q.shape[1]
    dev = q.device
    paged = block_table is not None
    num_pages = k_cache.shape[0]
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    if rotary_cos is not None:
        q, k = reference.rotary_decode(q, k, cache_seqlens, rotary_cos, rotary_sin, interleaved=rotary_interleaved,
                                       q_per_token=reference.rotary_q_per_token(causal, window_size, capacity))
    lens = cache_seqlens.long()
    if paged:
        bt = block_table.long()
        page_ok = (bt >= 0) & (bt < num_pages)                                    # (B, P)
        pages = bt.clamp(0, num_pages - 1)
    if k is not None:
        pos = lens[:, None] + torch.arange(sq, device=dev)                       # (B, Sq)
        keep = (pos >= 0) & (pos < capacity)
        pos = pos.clamp(0, capacity - 1)
        with torch.no_grad():
            if not paged:
                bidx = torch.arange(b, device=dev)[:, None].expand(b, sq)
                rows = (bidx[keep], pos[keep])
            else:
                keep = keep & page_ok.gather(1, pos // page_size)
                rows = (pages.gather(1, pos // page_size)[keep], (pos % page_size)[keep])
            if kv_dtype is None:
                k_cache[rows] = k[keep]
                v_cache[rows] = v[keep]
            else:
                k_cache[rows], k_scale[rows] = reference.quantize_kv(k[keep], kv_dtype)
                v_cache[rows], v_scale[rows] = reference.quantize_kv(v[keep], kv_dtype)
        lens = lens + sq
    lens = lens.clamp(0, capacity)
    if not paged:
        keys, vals = k_cache, v_cache                                             # (B, S, Hkv, D)
        token_ok = None
        if kv_dtype is not None:
            keys, vals = (reference.dequantize_kv(c, sc).to(q.dtype) for c, sc in ((keys, k_scale), (vals, v_scale)))
    else:
        keys = k_cache[pages].flatten(1, 2)                                       # (B, P*page, Hkv, D)
        vals = v_cache[pages].flatten(1, 2)
        if kv_dtype is not None:
            keys = reference.dequantize_kv(keys, k_scale[pages].flatten(1, 2)).to(q.dtype)
            vals = reference.dequantize_kv(vals, v_scale[pages].flatten(1, 2)).to(q.dtype)
        token_ok = page_ok.repeat_interleave(page_size, dim=1)                    # (B, P*page)
    nk = keys.shape[1]
    j = torch.arange(nk, device=dev)
    visible = j[None, :] < lens[:, None]                                          # (B, Nk): cached, valid page
    if token_ok is not None:
        visible = visible & token_ok
    # Slots that are not visible may hold anything (NaN included): zero them so 0-probabilities stay 0.
    zero = torch.zeros((), dtype=keys.dtype, device=dev)
    keys = torch.where(visible[:, :, None, None], keys, zero)
    vals = torch.where(visible[:, :, None, None], vals, zero)
    qpos = lens[:, None] - sq + torch.arange(sq, device=dev)                      # (B, Sq) position of each query
    mask = visible[:, None, :].expand(b, sq, nk).clone()                          # (B, Sq, Nk)
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:
        mask &= j[None, None, :] <= qpos[..., None] + right
    if left >= 0:
        mask &= j[None, None, :] >= qpos[..., None] - left
    bias = None
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(b, -1)
        bias = -slopes[:, :, None, None] * (qpos[:, None, :, None] - j).abs().float()   # (B, Hq, Sq, Nk)
    out = _sdpa(q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), mask[:, None], bias, softmax_scale)
    return out.transpose(1, 2)
