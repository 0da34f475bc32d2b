"""Plain PyTorch reference implementations: the one place that says what each op computes.

Written for clarity, not speed. Every function computes in ``compute_dtype`` (float32 by
default; float64 on request; ``None`` means "in the inputs' own dtype", which is the
same-precision baseline of the tolerance rule) and returns results in that dtype. All are
differentiable through autograd. They validate their inputs, including the value checks
that need a device-to-host copy.

Attention layout follows flash-attn: q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D].
Visibility of key j to query i, with ``offset = Nk - Nq`` (bottom-right alignment, as
flash-attn) or ``offset = 0`` (top-left, as ``F.scaled_dot_product_attention``'s is_causal):
  causal:              j <= i + offset
  window (left, right): i + offset - left <= j <= i + offset + right   (-1 = unbounded)
Scores: s = q.k * scale; s = softcap * tanh(s / softcap) if softcap > 0;
s -= slope_h * |i + offset - j| with ALiBi. Rows with no visible key give out = 0, lse = -inf.
"""
from __future__ import annotations


import torch

from . import _checks

__all__ = ["attention", "attention_varlen", "attention_mask", "layer_norm", "rms_norm",
           "decode_attention"]


def _cast(t, dtype):
    return t if t is None or dtype is None else t.to(dtype)


def attention_mask(nq, nk, *, causal=False, window_size=(-1, -1), causal_align="bottom_right",
                   device=None):
    """Boolean [Nq, Nk] mask, True where query i may see key j."""
    if causal_align not in ("bottom_right", "top_left"):
        raise ValueError(f"causal_align must be 'bottom_right' or 'top_left', got {causal_align!r}")
    offset = nk - nq if causal_align == "bottom_right" else 0
    i = torch.arange(nq, device=device).view(-1, 1) + offset
    j = torch.arange(nk, device=device).view(1, -1)
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    mask = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def alibi_bias(alibi_slopes, batch, nq, nk, *, causal_align="bottom_right", dtype=torch.float32):
    """ALiBi bias [B, Hq, Nq, Nk] = -slope * |i + offset - j|."""
    offset = nk - nq if causal_align == "bottom_right" else 0
    dev = alibi_slopes.device
    i = torch.arange(nq, device=dev).view(-1, 1) + offset
    j = torch.arange(nk, device=dev).view(1, -1)
    dist = (i - j).abs().to(dtype)
    slopes = alibi_slopes.to(dtype)
    slopes = slopes.view(1, -1) if slopes.dim() == 1 else slopes
    return -slopes.expand(batch, -1)[:, :, None, None] * dist


def attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
              softcap=0.0, key_padding_mask=None, causal_align="bottom_right", return_lse=False,
              compute_dtype=torch.float32):
    """Attention over q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D]. Returns out [B, Nq, Hq, D] (and lse [B, Hq, Nq])."""
    info = _checks.check_attention(q, k, v, window_size=window_size, softcap=softcap,
                                   softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
                                   key_padding_mask=key_padding_mask)
    b, nq, nk, hq, hkv = info["batch"], info["nq"], info["nk"], info["hq"], info["hkv"]
    group = hq // hkv
    qc, kc, vc = (_cast(t, compute_dtype) for t in (q, k, v))
    # GQA: query head h reads key/value head h // group.
    kc = kc.repeat_interleave(group, dim=2)
    vc = vc.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", qc, kc) * info["scale"]          # (B, Hq, Nq, Nk)
    if info["softcap"] > 0:
        scores = info["softcap"] * torch.tanh(scores / info["softcap"])
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, b, nq, nk, causal_align=causal_align,
                                     dtype=scores.dtype)
    visible = attention_mask(nq, nk, causal=causal, window_size=info["window"], causal_align=causal_align,
                             device=q.device).expand(b, hq, nq, nk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                      # (B, Hq, Nq)
    any_visible = visible.any(dim=-1, keepdim=True)
    # exp(-inf - -inf) would be NaN: rows with no visible key get probability 0 everywhere.
    safe_lse = torch.where(any_visible.squeeze(-1), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse.unsqueeze(-1)) * any_visible
    out = torch.einsum("bhij,bjhd->bihd", probs, vc)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                     causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
                     softcap=0.0, causal_align="bottom_right", return_lse=False,
                     compute_dtype=torch.float32):
    """Packed sequences: q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens int32 [B + 1].

    Returns out [total_q, Hq, D] (and lse [Hq, total_q], flash-attn's varlen layout).
    """
    info = _checks.check_attention(q, k, v, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                   window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
                                   alibi_slopes=alibi_slopes)
    _checks.check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    _checks.check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for name, cu, mx in (("max_seqlen_q", cq, max_seqlen_q), ("max_seqlen_k", ck, max_seqlen_k)):
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        if mx is not None and mx < longest:
            raise ValueError(f"{name} = {mx} is smaller than the longest sequence ({longest})")
    dtype = compute_dtype or q.dtype
    lse_dtype = torch.float32 if compute_dtype is None else dtype
    hq, d = info["hq"], info["head_dim"]

    def empty(n):  # n query tokens that see no key: out 0, lse -inf
        return (q.new_zeros((n, hq, d), dtype=dtype),
                torch.full((hq, n), float("-inf"), dtype=lse_dtype, device=q.device))

    outs, lses = [], []
    for i in range(info["batch"]):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        if ck[i + 1] == ck[i]:
            o, l = empty(cq[i + 1] - cq[i])
        else:
            slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
            o, l = attention(q[None, qs], k[None, ks], v[None, ks], causal=causal, softmax_scale=info["scale"],
                             window_size=window_size, alibi_slopes=slopes, softcap=softcap,
                             causal_align=causal_align, return_lse=True, compute_dtype=compute_dtype)
            o, l = o[0], l[0].to(lse_dtype)
        outs.append(o)
        lses.append(l)
    tail = q.shape[0] - cq[-1]  # packed tokens past the last sequence, if any
    if tail:
        o, l = empty(tail)
        outs.append(o)
        lses.append(l)
    out, lse = torch.cat(outs, dim=0), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

def _add_residual(x, residual, compute_dtype):
    h = _cast(x, compute_dtype)
    if residual is not None:
        h = h + _cast(residual, compute_dtype or x.dtype)
    return h


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, prenorm=False, residual_in_fp32=False,
               compute_dtype=torch.float32):
    """LayerNorm over the last dim of h = x (+ residual). Returns out, or (out, h) when prenorm."""
    _checks.check_norm(x, weight, bias, eps, residual)
    h = _add_residual(x, residual, compute_dtype)
    mean = h.mean(dim=-1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
    out = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * _cast(weight, compute_dtype or x.dtype)
    if bias is not None:
        out = out + _cast(bias, compute_dtype or x.dtype)
    return (out, h) if prenorm else out


def rms_norm(x, weight=None, eps=1e-6, *, residual=None, prenorm=False, residual_in_fp32=False,
             compute_dtype=torch.float32):
    """RMSNorm over the last dim of h = x (+ residual). Returns out, or (out, h) when prenorm."""
    _checks.check_norm(x, weight, None, eps, residual, has_bias=False)
    h = _add_residual(x, residual, compute_dtype)
    out = h * torch.rsqrt((h * h).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        out = out * _cast(weight, compute_dtype or x.dtype)
    return (out, h) if prenorm else out


# ---------------------------------------------------------------------------------------------
# Decode attention over a KV cache
# ---------------------------------------------------------------------------------------------

def cache_positions(cache_seqlens_b, n, block_table_b, page_size):
    """(page, slot) indices of token positions 0..n-1 of one sequence (page = None when contiguous)."""
    pos = torch.arange(n, device=cache_seqlens_b.device)
    if block_table_b is None:
        return None, pos
    return block_table_b[pos // page_size].long(), pos % page_size


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, block_table=None,
                     softmax_scale=None, causal=True, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                     return_lse=False, compute_dtype=torch.float32):
    """Attention of q [B, Sq, Hq, D] over a KV cache.

    Contiguous cache: k_cache/v_cache [B, S_max, Hkv, D]. Paged cache: [num_pages, page_size, Hkv, D]
    with block_table [B, max_pages] int32 (token t of sequence b is at page block_table[b, t // page_size],
    slot t % page_size). cache_seqlens [B] int32 counts the tokens already cached. If k/v [B, Sq, Hkv, D]
    are given they are written into the cache (in place) at positions cache_seqlens .. cache_seqlens+Sq-1
    first. The Sq queries sit at the end of their sequence (bottom-right causal alignment).
    Returns out [B, Sq, Hq, D] (and lse [B, Hq, Sq]).
    """
    info = _checks.check_decode(q, k_cache, v_cache, cache_seqlens, k, v, block_table, window_size=window_size,
                                softcap=softcap, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes)
    b, sq, hq = info["batch"], info["sq"], info["hq"]
    appended = sq if k is not None else 0
    _checks.check_decode_values(cache_seqlens, block_table, k_cache.shape[0], info["page_size"],
                                info["capacity"], appended)
    lens = cache_seqlens.tolist()
    dtype = compute_dtype or q.dtype
    outs, lses = [], []
    for i in range(b):
        bt = block_table[i] if block_table is not None else None
        if k is not None:  # append new tokens in place
            page, slot = cache_positions(cache_seqlens[i], lens[i] + sq, bt, info["page_size"])
            new = slice(lens[i], lens[i] + sq)
            with torch.no_grad():
                if page is None:
                    k_cache[i, new] = k[i]
                    v_cache[i, new] = v[i]
                else:
                    k_cache[page[new], slot[new]] = k[i]
                    v_cache[page[new], slot[new]] = v[i]
        n = lens[i] + appended
        page, slot = cache_positions(cache_seqlens[i], n, bt, info["page_size"])
        ki = k_cache[i, :n] if page is None else k_cache[page, slot]
        vi = v_cache[i, :n] if page is None else v_cache[page, slot]
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        if n == 0:
            outs.append(q.new_zeros((sq, hq, q.shape[-1]), dtype=dtype))
            lses.append(torch.full((hq, sq), float("-inf"), device=q.device, dtype=dtype))
            continue
        o, l = attention(q[i:i + 1], ki[None], vi[None], causal=causal, softmax_scale=info["scale"],
                         window_size=window_size, alibi_slopes=slopes, softcap=softcap,
                         return_lse=True, compute_dtype=compute_dtype)
        outs.append(o[0])
        lses.append(l[0])
    out = torch.stack(outs)
    lse = torch.stack(lses)
    return (out, lse) if return_lse else out
