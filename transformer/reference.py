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
Dropout (dropout_p > 0, rng_state): p = softmax(s) is multiplied by keep / (1 - dropout_p) before p @ v, keep
being the counter-based mask of `dropout_keep` (the mapping is documented above it); lse stays the
log-sum-exp of the undropped scores.
"""
from __future__ import annotations


import torch

from . import _checks

__all__ = ["attention", "attention_varlen", "attention_mask", "attention_probs", "layer_norm", "rms_norm",
           "decode_attention", "rotary_decode", "rotary_q_per_token", "quantize_kv", "dequantize_kv", "philox4x32", "dropout_keep", "dropout_threshold"]


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
              compute_dtype=torch.float32, dropout_p=0.0, rng_state=None, dropout_batch_offset=0):
    """Attention over q [B, Nq, Hq, D], k/v [B, Nk, Hkv, D]. Returns out [B, Nq, Hq, D] (and lse [B, Hq, Nq]).

    dropout_p > 0: attention dropout with the mask of `dropout_keep` under rng_state (int64 [2], seed and
    offset); batch element b takes the mask of batch index b + dropout_batch_offset (varlen: the sequence)."""
    out, lse, _ = _attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                             alibi_slopes=alibi_slopes, softcap=softcap, key_padding_mask=key_padding_mask,
                             causal_align=causal_align, compute_dtype=compute_dtype, dropout_p=dropout_p,
                             rng_state=rng_state, dropout_batch_offset=dropout_batch_offset)
    return (out, lse) if return_lse else out


def attention_probs(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
                    softcap=0.0, causal_align="bottom_right", dropout_p=0.0, rng_state=None,
                    compute_dtype=torch.float32, dropout_batch_offset=0):
    """The attention probabilities [B, Hq, Nq, Nk] a call uses, flash-attn's S_dmask convention: with dropout,
    p / (1 - dropout_p) where kept and -p / (1 - dropout_p) where dropped (so ``relu`` of it is what multiplies
    v and ``>= 0`` the keep mask); without dropout, p. Entries no query sees are 0. For tests (Nq x Nk memory)."""
    _, _, probs = _attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window_size,
                             alibi_slopes=alibi_slopes, softcap=softcap, key_padding_mask=None,
                             causal_align=causal_align, compute_dtype=compute_dtype, dropout_p=dropout_p,
                             rng_state=rng_state, dropout_batch_offset=dropout_batch_offset, signed_probs=True)
    return probs


def _attention(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap, key_padding_mask,
               causal_align, compute_dtype, dropout_p, rng_state, dropout_batch_offset, signed_probs=False):
    info = _checks.check_attention(q, k, v, window_size=window_size, softcap=softcap,
                                   softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
                                   key_padding_mask=key_padding_mask)
    dropout_p = _checks.check_dropout(dropout_p, rng_state, q.device)
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
    if dropout_p > 0:
        bh = torch.arange(b * hq, device=q.device) + dropout_batch_offset * hq
        keep = dropout_keep(rng_state, dropout_p, bh, nq, nk).view(b, hq, nq, nk)
        scale = 1.0 / (1.0 - dropout_p)
        if signed_probs:
            probs = torch.where(keep, probs, -probs) * scale
        else:
            probs = probs * keep * scale
    out = torch.einsum("bhij,bjhd->bihd", probs.clamp_min(0) if signed_probs else probs, vc)
    return out, lse, probs


def zeros_like_output(shape, dtype, *inputs, fill=0.0):
    """A constant tensor that is part of the autograd graph of `inputs` with zero gradients, as a kernel's output
    for tokens that see nothing is: backward then reaches every input (and never NaN from their values)."""
    out = torch.full(shape, fill, dtype=dtype, device=inputs[0].device)
    never = torch.zeros((), dtype=torch.bool, device=out.device)
    for t in inputs:
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            out = out + torch.where(never, t.sum().to(dtype), torch.zeros((), dtype=dtype, device=out.device))
    return out


def varlen_bounds(cu, total):
    """[(start, end)] per sequence from cu_seqlens values as the kernels take them: each entry clamped into
    0..total, then a running max (so sequences never overlap). Valid cu_seqlens are unchanged."""
    c, top = [], 0
    for x in cu:
        top = max(top, min(max(x, 0), total))
        c.append(top)
    return list(zip(c, c[1:]))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                     causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
                     softcap=0.0, causal_align="bottom_right", return_lse=False,
                     compute_dtype=torch.float32, validate=True, dropout_p=0.0, rng_state=None):
    """Packed sequences: q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens int32 [B + 1].

    Returns out [total_q, Hq, D] (and lse [Hq, total_q], flash-attn's varlen layout). validate=False takes
    cu_seqlens values as the kernels do (transformer/_checks.py: clamped, non-decreasing bounds; max_seqlen
    not used). dropout_p > 0: sequence i takes the dropout mask of batch index i (see `dropout_keep`).
    """
    info = _checks.check_attention(q, k, v, varlen=True, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                   window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
                                   alibi_slopes=alibi_slopes)
    if validate:
        _checks.check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
        _checks.check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    bq = varlen_bounds(cu_seqlens_q.tolist(), q.shape[0])
    bk = varlen_bounds(cu_seqlens_k.tolist(), k.shape[0])
    dtype = compute_dtype or q.dtype
    lse_dtype = torch.float32 if compute_dtype is None else dtype
    hq, d = info["hq"], info["head_dim"]
    # Tokens in no sequence (or a sequence that sees no key): out 0, lse -inf.
    out = zeros_like_output((q.shape[0], hq, d), dtype, q, k, v)
    lse = zeros_like_output((hq, q.shape[0]), lse_dtype, q, k, v, fill=float("-inf"))
    for i, ((qa, qb), (ka, kb)) in enumerate(zip(bq, bk)):
        if kb == ka or qb == qa:
            continue
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        o, l = attention(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], causal=causal, softmax_scale=info["scale"],
                         window_size=window_size, alibi_slopes=slopes, softcap=softcap,
                         causal_align=causal_align, return_lse=True, compute_dtype=compute_dtype,
                         dropout_p=dropout_p, rng_state=rng_state, dropout_batch_offset=i)
        index = torch.arange(qa, qb, device=q.device)      # index_put keeps autograd through out
        out = out.index_put((index,), o[0])
        lse = lse.index_put((torch.arange(hq, device=q.device)[:, None], index[None, :]), l[0].to(lse_dtype))
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Attention dropout: the counter-based mask every backend regenerates
# ---------------------------------------------------------------------------------------------
#
# rng_state is an int64 tensor [2] = (seed, offset) on the inputs' device. Each attention element gets its
# uniform 16-bit draw from Philox4x32-10 (Salmon et al. 2011; the generator of curand and tl.philox):
#   key     = (seed mod 2^32, (seed >> 32) mod 2^32)
#   counter = (j >> 3, i, bh, offset mod 2^32)
#   w       = 16-bit half (j & 1) (0: low bits) of output word (j & 7) >> 1
# where bh = b * Hq + h (b the batch element, for varlen the sequence index; h the query head), i the query
# row and j the key column, both counted from the sequence's start. The element is dropped iff
# w < threshold = dropout_threshold(p) (= round(p * 2^16)), and kept values are scaled by 1 / (1 - p).
# One Philox call thus serves 8 consecutive keys of one row.

_MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57       # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85       # key schedule (Weyl) increments


def _mul32(a, b):
    """(hi, lo) 32-bit words of a * b for int64 tensors holding 32-bit unsigned values (no int64 overflow:
    the product is formed from 16-bit halves of a)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_part = a_lo * b                                  # < 2^48
    t = a_hi * b + (lo_part >> 16)                      # (a * b) >> 16, < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds=10):
    """Philox4x32-`rounds` of the counter (c0, c1, c2, c3) under the key (k0, k1), on int64 tensors holding
    32-bit unsigned values (broadcasting); returns the four output words the same way."""
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(x, dtype=torch.int64) & _MASK32 for x in (c0, c1, c2, c3, k0, k1))
    for _ in range(rounds):
        hi0, lo0 = _mul32(torch.full_like(c0, PHILOX_M0), c0)
        hi1, lo1 = _mul32(torch.full_like(c2, PHILOX_M1), c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p):
    """The 16-bit draws below which an element is dropped: round(p * 2^16), at most 2^16 - 1."""
    return min(int(round(float(dropout_p) * 65536.0)), 65535)


def dropout_keep(rng_state, dropout_p, bh, nq, nk):
    """Boolean keep mask [len(bh), Nq, Nk] of the elements (bh[n], i, j), i < Nq, j < Nk (see the mapping
    above); bh: an int64 tensor of b * Hq + h indices."""
    seed, offset = (int(x) for x in rng_state.tolist())
    dev = rng_state.device
    bh = torch.as_tensor(bh, dtype=torch.int64, device=dev).view(-1, 1, 1)
    i = torch.arange(nq, dtype=torch.int64, device=dev).view(1, -1, 1)
    j = torch.arange(nk, dtype=torch.int64, device=dev).view(1, 1, -1)
    words = philox4x32(j >> 3, i, bh, offset & _MASK32, seed & _MASK32, (seed >> 32) & _MASK32)
    words = [w.expand(bh.shape[0], nq, nk) for w in words]
    word = torch.where((j & 7) >> 1 == 0, words[0], torch.where((j & 7) >> 1 == 1, words[1],
                       torch.where((j & 7) >> 1 == 2, words[2], words[3])))
    w16 = (word >> (16 * (j & 1))) & 0xFFFF
    return w16 >= dropout_threshold(dropout_p)



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
# Quantized KV cache: 8-bit values with one fp32 scale per (token, kv head)
# ---------------------------------------------------------------------------------------------

KV_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}   # largest stored magnitude per format


def quantize_kv(x, kv_dtype):
    """Symmetric 8-bit quantization of keys or values x [..., Hkv, D] (any leading dims, any float dtype).

    Returns (xq, scale): xq of x's shape in torch.int8 ("int8") or torch.float8_e4m3fn ("fp8_e4m3"), scale fp32
    [..., Hkv], one per (token, head). In fp32: scale = amax over D of |x| / 127 (int8) or / 448 (fp8 e4m3), and
    1 where that is 0 (a zero row); xq = x / scale (IEEE division) rounded to nearest, ties to even, saturated
    to +-127 / +-448. The kernels' in-place append computes exactly this (bit for bit) for finite inputs.
    """
    _checks.check_kv_dtype(kv_dtype, allow_none=False)
    _checks.check_tensor("x", x, dtypes=_checks.FLOAT_DTYPES)
    if x.dim() < 2 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., Hkv, D] with D >= 1, got {tuple(x.shape)}")
    qmax = KV_QMAX[kv_dtype]
    xf = x.detach().float()
    scale = xf.abs().amax(dim=-1) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = (xf / scale[..., None]).clamp(-qmax, qmax)
    xq = y.round().to(torch.int8) if kv_dtype == "int8" else y.to(torch.float8_e4m3fn)   # both round half to even
    return xq, scale


def dequantize_kv(xq, scale):
    """fp32 values xq * scale of a quantized cache: xq [..., D] int8 / float8_e4m3fn, scale fp32 [...]."""
    _checks.check_tensor("xq", xq, dtypes=tuple(_checks.KV_DTYPES.values()))
    _checks.check_tensor("scale", scale, ndim=max(xq.dim() - 1, 0), dtypes=(torch.float32,))
    _checks.check_same_device("scale", scale, "xq", xq)
    if tuple(scale.shape) != tuple(xq.shape[:-1]):
        raise ValueError(f"scale must have shape {tuple(xq.shape[:-1])} (xq's without the last dim), "
                         f"got {tuple(scale.shape)}")
    return xq.float() * scale[..., None]


# ---------------------------------------------------------------------------------------------
# Decode attention over a KV cache
# ---------------------------------------------------------------------------------------------

def cache_positions(cache_seqlens_b, n, block_table_b, page_size):
    """(page, slot) indices of token positions 0..n-1 of one sequence (page = None when contiguous)."""
    pos = torch.arange(n, device=cache_seqlens_b.device)
    if block_table_b is None:
        return None, pos
    return block_table_b[pos // page_size].long(), pos % page_size


def rotary_q_per_token(causal, window_size, capacity):
    """Whether decode_attention's rotary tables rotate query i at cache_seqlens + i (causal, or a window side
    in 0..capacity-1) rather than every query at cache_seqlens (flash-attn's flash_attn_with_kvcache rule)."""
    return bool(causal) or any(0 <= w < capacity for w in window_size)


def rotary_decode(q, k, cache_seqlens, rotary_cos, rotary_sin, *, interleaved=False, q_per_token=True):
    """q [B, Sq, Hq, D] and k [B, Sq, Hkv, D] rotated as decode_attention does with rotary_cos / rotary_sin
    [seqlen_ro, rotary_dim / 2] (any float dtype, read as fp32): key i of sequence b at position
    cache_seqlens[b] + i, query i there too when q_per_token, else at cache_seqlens[b]; positions clamped to
    0..seqlen_ro-1. The rotation is `transformer.nn.rope.apply_rotary` (fp32 math, rounded to the input dtype
    once; pairs (x[j], x[j + rotary_dim / 2]), or (x[2j], x[2j + 1]) when interleaved, turned by row[j])."""
    from .nn.rope import apply_rotary
    seqlen_ro = rotary_cos.shape[0]
    cos = torch.cat((rotary_cos, rotary_cos), dim=-1).float()     # [seqlen_ro, rotary_dim]: RotaryEmbedding's layout
    sin = torch.cat((rotary_sin, rotary_sin), dim=-1).float()
    start = cache_seqlens.long()[:, None]
    steps = torch.arange(q.shape[1], device=q.device)
    pos_k = (start + steps).clamp(0, seqlen_ro - 1)
    pos_q = pos_k if q_per_token else start.expand(-1, q.shape[1]).clamp(0, seqlen_ro - 1)
    return (apply_rotary(q, cos[pos_q], sin[pos_q], interleaved=interleaved),
            apply_rotary(k, cos[pos_k], sin[pos_k], interleaved=interleaved))


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, k=None, v=None, block_table=None,
                     softmax_scale=None, causal=True, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                     return_lse=False, compute_dtype=torch.float32, validate=True, k_scale=None, v_scale=None,
                     rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    """Attention of q [B, Sq, Hq, D] over a KV cache.

    Contiguous cache: k_cache/v_cache [B, S_max, Hkv, D]. Paged cache: [num_pages, page_size, Hkv, D]
    with block_table [B, max_pages] int32 (token t of sequence b is at page block_table[b, t // page_size],
    slot t % page_size). cache_seqlens [B] int32 counts the tokens already cached. If k/v [B, Sq, Hkv, D]
    are given they are written into the cache (in place) at positions cache_seqlens .. cache_seqlens+Sq-1
    first. The Sq queries sit at the end of their sequence (bottom-right causal alignment).
    Returns out [B, Sq, Hq, D] (and lse [B, Hq, Sq]). validate=False takes cache_seqlens and block_table
    values as the kernels do (transformer/_checks.py: clamped lengths, invalid pages hold no visible token).
    Quantized cache: int8 / float8_e4m3fn k_cache, v_cache with fp32 k_scale, v_scale shaped like the cache
    without D; appended tokens are stored as ``quantize_kv(k, kv_dtype)`` (values and scales), and attention
    reads ``dequantize_kv(cache, scale)`` rounded to q's dtype when compute_dtype is None.
    Rotary embedding: rotary_cos / rotary_sin [seqlen_ro >= capacity, rotary_dim / 2] (k / v required) rotate q
    and k first, as `rotary_decode` with q_per_token = `rotary_q_per_token(causal, window_size, capacity)`; the
    cache stores the rotated (then quantized) keys.
    """
    info = _checks.check_decode(q, k_cache, v_cache, cache_seqlens, k, v, block_table, window_size=window_size,
                                softcap=softcap, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
                                k_scale=k_scale, v_scale=v_scale, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                rotary_interleaved=rotary_interleaved)
    kv_dtype = info["kv_dtype"]
    b, sq, hq, d = info["batch"], info["sq"], info["hq"], info["head_dim"]
    capacity, page_size, num_pages = info["capacity"], info["page_size"], k_cache.shape[0]
    appended = sq if k is not None else 0
    if validate:
        _checks.check_decode_values(cache_seqlens, block_table, num_pages, page_size, capacity, appended)
    if info["rotary_dim"]:
        q, k = rotary_decode(q, k, cache_seqlens, rotary_cos, rotary_sin, interleaved=rotary_interleaved,
                             q_per_token=rotary_q_per_token(causal, info["window"], capacity))
    lens = cache_seqlens.tolist()
    dtype = compute_dtype or q.dtype
    out = zeros_like_output((b, sq, hq, d), dtype, q, k_cache, v_cache, k, v)
    lse = zeros_like_output((b, hq, sq), dtype, q, k_cache, v_cache, k, v, fill=float("-inf"))
    for i in range(b):
        bt = block_table[i].long() if block_table is not None else None

        def locate(pos):   # (valid, page or None, slot) of cache positions `pos` (long tensor)
            if bt is None:
                return torch.ones_like(pos, dtype=torch.bool), None, pos
            page = bt[pos // page_size]
            return (page >= 0) & (page < num_pages), page.clamp(0, num_pages - 1), pos % page_size

        if k is not None:  # append new tokens in place, where the position and its page are valid
            pos = lens[i] + torch.arange(sq, device=q.device)
            inside = (pos >= 0) & (pos < capacity)
            valid, page, slot = locate(pos.clamp(0, capacity - 1))
            keep = (inside & valid).nonzero().flatten()
            with torch.no_grad():
                rows = (i, slot[keep]) if page is None else (page[keep], slot[keep])
                if kv_dtype is None:
                    k_cache[rows] = k[i, keep]
                    v_cache[rows] = v[i, keep]
                else:
                    (k_cache[rows], k_scale[rows]), (v_cache[rows], v_scale[rows]) = (
                        quantize_kv(k[i, keep], kv_dtype), quantize_kv(v[i, keep], kv_dtype))
        n = min(max(lens[i] + appended, 0), capacity)
        if n == 0:
            continue
        valid, page, slot = locate(torch.arange(n, device=q.device))
        rows = (i, slice(0, n)) if page is None else (page, slot)
        ki, vi = k_cache[rows], v_cache[rows]
        if kv_dtype is not None:   # the dequantized cache, in the dtype the attention computes in
            ki = dequantize_kv(ki, k_scale[rows]).to(compute_dtype or q.dtype)
            vi = dequantize_kv(vi, v_scale[rows]).to(compute_dtype or q.dtype)
        if not bool(valid.all()):   # tokens of invalid pages: not visible, and their (garbage) values not read
            ki = torch.where(valid[:, None, None], ki, torch.zeros((), dtype=ki.dtype, device=ki.device))
            vi = torch.where(valid[:, None, None], vi, torch.zeros((), dtype=vi.dtype, device=vi.device))
        slopes = alibi_slopes[i] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        qi = q[i:i + 1] if kv_dtype is None else q[i:i + 1].to(ki.dtype)
        o, l = attention(qi, ki[None], vi[None], causal=causal, softmax_scale=info["scale"],
                         window_size=window_size, alibi_slopes=slopes, softcap=softcap, key_padding_mask=valid[None],
                         return_lse=True, compute_dtype=compute_dtype)
        out = out.index_put((torch.tensor([i], device=q.device),), o)
        lse = lse.index_put((torch.tensor([i], device=q.device),), l.to(dtype))
    return (out, lse) if return_lse else out
