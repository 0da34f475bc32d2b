"""Triton decode attention over a KV cache (flash-decoding): split-KV, GQA packing, paged/contiguous caches.

Semantics are those of ``transformer.reference.decode_attention``: q [B, Sq, Hq, D] (1 <= Sq <= 16) attends
over the first ``cache_seqlens[b] (+ Sq when appending)`` tokens of a contiguous cache [B, S_max, Hkv, D]
or a paged cache [num_pages, page_size, Hkv, D] addressed through block_table [B, max_pages] int32. The Sq
queries sit at the end of their sequence (bottom-right causal alignment).

Three kernels, launched on one stream, with no device-to-host copy anywhere (a decode step can be
captured in a CUDA graph):

* ``_decode_append``  -- when k/v are given, writes them into the cache (through the block table) at
  positions cache_seqlens[b] .. cache_seqlens[b] + Sq - 1. Positions outside the cache capacity are
  dropped (they cannot be checked on the host without a sync; ``validate=True`` of the public op does).
* ``_decode_split_kv`` -- grid (batch x KV head x M-block, split). One program serves ALL Hq/Hkv query
  heads and all Sq queries of its KV head: the (head, query) pairs are packed into the M dimension of a
  ``tl.dot`` tile, so each K/V element is read once per call (once per M-block when group * Sq exceeds
  the largest M tile). The visible KV range of a sequence (its length, minus what a left window hides) is
  cut into ``num_splits`` chunks of whole BLOCK_N tiles; a program never touches tiles past its
  sequence's length. A tile may span several pages: page ids are gathered per token.
* ``_decode_combine`` -- merges the splits' partial outputs with their log-sum-exps.

With ``num_splits == 1`` the split kernel writes the final output directly and no combine runs. The split
count and the reduction order depend only on the arguments' shapes and ``num_splits``, never on timing,
so results are bit-identical run to run. ``num_splits=0`` picks a count on the host from (batch, Hkv,
M-blocks, cache capacity, SM count); the SM count is read lazily at the first call and cached.

Quantized caches (int8 or fp8 e4m3 K/V with one fp32 scale per (token, KV head), ``k_scale`` / ``v_scale``
shaped like the cache without D): the split kernel loads the 8-bit tiles and their scales, dequantizes in
registers to q's dtype (x * scale, rounded once) and runs the same dot products; the append kernel quantizes
the new tokens in the same launch as ``transformer.reference.quantize_kv`` (amax over D / 127 or / 448, IEEE
division, round to nearest even, saturation), bit for bit. fp8 conversions use the hardware instructions on
sm_90+ (``cvt.rn.satfinite.e4m3x2.f32`` / ``cvt.rn.f16x2.e4m3x2``; Triton has no fp8e4nv below sm_89 and
rounds fp32 -> e4m3 through fp16 with rz on sm_89) and a bit-exact integer conversion elsewhere
(``_e4m3_bits`` / ``_e4m3_value``). Under the interpreter ``FP8_CONVERSION`` picks either path ("hw" runs
the interpreter's fp8 casts, made exact by triton_kernels/_interpreter.py).

Inference only: no backward.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._device import K_LN2, K_LOG2E, tanh
from ._utils import LOG2E, AotConfig, empty, interpreting, sm_count

__all__ = ["decode", "pick_num_splits", "aot_configs", "MAX_SPLITS", "KV_FORMATS"]

MAX_SPLITS = 128

# Cache formats (the KV_QUANT constexpr): 0 = 16-bit (q's dtype), 1 = int8, 2 = fp8 e4m3; largest magnitudes.
KV_FORMATS = {torch.int8: 1, torch.float8_e4m3fn: 2}
_QMAX = {1: 127.0, 2: 448.0}

# fp8 conversions under the interpreter: "hw" (Triton's fp8e4nv casts, the sm_90 path) or "sw" (the integer
# conversion of sm_80 / sm_89). On a GPU the device's capability decides (hw from sm_90).
FP8_CONVERSION = "hw"


# ---------------------------------------------------------------------------------------------
# 8-bit (de)quantization helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rint(x):
    """fp32 round to nearest integer, ties to even (exact: floor, differences and halvings of fp32 integers)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _e4m3_bits(y):
    """Bits (uint8) of fp32 y, |y| <= 448, as fp8 e4m3 rounded to nearest even (cvt.rn.satfinite of sm_90):
    below 2^-6 a subnormal m * 2^-9 (m = rint(|y| * 512), 8 being the smallest normal); above, the fp32 bits
    rounded to 3 mantissa bits (a carry moves to the next binade) with the exponent re-biased 127 -> 7."""
    bits = y.to(tl.int32, bitcast=True)
    a = tl.abs(y)
    ab = a.to(tl.int32, bitcast=True)
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - (120 << 3)
    code = tl.where(a < 0.015625, _rint(a * 512.0).to(tl.int32), normal)
    code = tl.minimum(code, 0x7E) | ((bits >> 24) & 0x80)
    return code.to(tl.uint8)


@triton.jit
def _e4m3_value(u):
    """fp32 value of fp8 e4m3 bits u (uint8), exactly: the bits placed in an fp16 (exponent field 4 -> 5 bits,
    so the fp16 is the value * 2^-8, subnormals included) times 256; 0x7F / 0xFF are NaN."""
    w = u.to(tl.uint16)
    h = (((w & 0x7F) << 7) | ((w & 0x80) << 8)).to(tl.float16, bitcast=True)
    return tl.where((w & 0x7F) == 0x7F, float("nan"), h.to(tl.float32) * 256.0)


@triton.jit
def _dequant(xq, scale, KV_QUANT: tl.constexpr, FP8_HW: tl.constexpr):
    """fp32 x * scale of an 8-bit tile [N, D] and its per-row scales [N]."""
    if KV_QUANT == 1:
        x = xq.to(tl.float32)
    elif FP8_HW:
        x = xq.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        x = _e4m3_value(xq)
    return x * scale[:, None]


@triton.jit
def _quant(x, mask, KV_QUANT: tl.constexpr, FP8_HW: tl.constexpr):
    """(8-bit values, scales) of x [H, D] fp32 (masked elements ignored), as reference.quantize_kv: per row
    scale = amax / qmax (IEEE division), 1 where that is 0; x / scale (IEEE), clamped, rounded to nearest even."""
    QMAX: tl.constexpr = 127.0 if KV_QUANT == 1 else 448.0
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), 1)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    scale = tl.where(scale == 0.0, 1.0, scale)
    y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if KV_QUANT == 1:
        xq = _rint(y).to(tl.int8)
    elif FP8_HW:
        xq = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        xq = _e4m3_bits(y)
    return xq, scale


# ---------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rotary(x, Rows, offs_d, mask, Cos, Sin, pos, stride_cr, stride_cd, stride_sr, stride_sd,
            ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """x [H, D] (fp32, loaded from Rows[:, None] + offs_d[None, :] under mask) with its first ROTARY_DIM dims
    turned by row pos of the tables Cos / Sin [seqlen_ro, ROTARY_DIM / 2], as transformer.nn.rope.apply_rotary:
    the first element of a pair becomes x * cos - y * sin, the second x * cos + y * sin (y its partner), each
    product and the sum rounded once in fp32 (a launch with rotary disables fp fusion: mul.rn / add.rn / sub.rn,
    no fma). Dims >= ROTARY_DIM pass through."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    if INTERLEAVED:      # pairs (2j, 2j + 1)
        partner = offs_d ^ 1
        idx = offs_d // 2
        first = (offs_d % 2) == 0
    else:                # pairs (j, j + HALF)
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        idx = tl.where(first, offs_d, offs_d - HALF)
    rot = offs_d < ROTARY_DIM
    y = tl.load(Rows[:, None] + partner[None, :], mask=mask & rot[None, :], other=0.0).to(tl.float32)
    c = tl.load(Cos + pos * stride_cr + idx * stride_cd, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(Sin + pos * stride_sr + idx * stride_sd, mask=rot, other=0.0).to(tl.float32)
    xc = x * c[None, :]
    ys = y * s[None, :]
    return tl.where(rot[None, :], tl.where(first[None, :], xc - ys, xc + ys), x)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _decode_append(
    K, V, KCache, VCache, CacheSeqlens, BlockTable, KScale, VScale,
    Q, QRot, Cos, Sin,                        # rotary: q [B, Sq, Hq, D] -> QRot (contiguous), tables (ROTARY_DIM > 0)
    stride_kb, stride_ks, stride_kh,          # new k [B, Sq, Hkv, D]
    stride_vb, stride_vs, stride_vh,          # new v [B, Sq, Hkv, D]
    stride_kcb, stride_kcs, stride_kch,       # k cache: dim 0 is the batch (contiguous) or the page (paged)
    stride_vcb, stride_vcs, stride_vch,
    stride_ksb, stride_kss, stride_ksh,       # k_scale [B or pages, S_max or page_size, Hkv] (quantized caches)
    stride_vsb, stride_vss, stride_vsh,
    stride_cs,                                # cache_seqlens [B]
    stride_btb, stride_btp,                   # block_table [B, max_pages]
    stride_qb, stride_qs, stride_qh,          # q (rotary)
    stride_rb, stride_rs, stride_rh,          # QRot
    stride_cr, stride_cd, stride_sr, stride_sd,   # rotary_cos / rotary_sin [seqlen_ro, ROTARY_DIM / 2]
    Sq, Hkv, D,
    capacity,                                 # tokens per sequence the cache can hold
    page_size, num_pages,
    Hq, seqlen_ro,                            # rotary: query heads, table rows
    q_per_token,                              # rotary: query s turns at cache_seqlens + s (1) or cache_seqlens (0)
    PAGED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_QUANT: tl.constexpr,                   # 0: copy (16-bit cache); 1 / 2: quantize to int8 / fp8 e4m3
    FP8_HW: tl.constexpr,
    ROTARY_DIM: tl.constexpr = 0,             # 0: no rotary; else the rotated dims (even, <= D)
    INTERLEAVED: tl.constexpr = False,        # rotary pairs (2j, 2j + 1), else (j, j + ROTARY_DIM / 2)
):
    """Program (b * Sq + s, head block): copy (or quantize, with its scale) token s of sequence b, BLOCK_H KV
    heads, into the cache. A position outside 0..capacity-1, or in a page outside 0..num_pages-1, is not
    written (neither values nor scales). With ROTARY_DIM > 0 the key is rotated at position cache_seqlens[b] + s
    and rounded to k's dtype before it is stored (or quantized), and query s of BLOCK_H query heads is rotated
    into QRot (every query row is written, whether or not its key lands in the cache); table rows are clamped to
    0..seqlen_ro-1."""
    pid = tl.program_id(0)
    b = pid // Sq
    s = pid % Sq
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    pos = tl.load(CacheSeqlens + b.to(tl.int64) * stride_cs).to(tl.int64) + s
    if ROTARY_DIM > 0:
        last_row = seqlen_ro - 1
        pos_k = tl.minimum(tl.maximum(pos, 0), last_row)
        pos_q = tl.minimum(tl.maximum(pos - s * (1 - q_per_token), 0), last_row)
        q_mask = (offs_h[:, None] < Hq) & (offs_d[None, :] < D)
        q_rows = Q + b.to(tl.int64) * stride_qb + s * stride_qs + offs_h * stride_qh
        qn = tl.load(q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        qn = _rotary(qn, q_rows, offs_d, q_mask, Cos, Sin, pos_q, stride_cr, stride_cd, stride_sr, stride_sd,
                     ROTARY_DIM, INTERLEAVED)
        tl.store(QRot + b.to(tl.int64) * stride_rb + s * stride_rs + offs_h[:, None] * stride_rh + offs_d[None, :],
                 qn.to(QRot.dtype.element_ty), mask=q_mask)
    in_cache = (pos >= 0) & (pos < capacity)
    pos = tl.where(in_cache, pos, 0)
    if PAGED:
        page = tl.load(BlockTable + b.to(tl.int64) * stride_btb + (pos // page_size) * stride_btp, mask=in_cache,
                       other=-1)
        in_cache = in_cache & (page >= 0) & (page < num_pages)
        outer, slot = page.to(tl.int64), (pos % page_size).to(tl.int64)
    else:
        outer, slot = b.to(tl.int64), pos
    row_kc = outer * stride_kcb + slot * stride_kcs
    row_vc = outer * stride_vcb + slot * stride_vcs
    mask = in_cache & (offs_h[:, None] < Hkv) & (offs_d[None, :] < D)
    hd_k = offs_h[:, None] * stride_kh + offs_d[None, :]
    hd_v = offs_h[:, None] * stride_vh + offs_d[None, :]
    kn = tl.load(K + b.to(tl.int64) * stride_kb + s * stride_ks + hd_k, mask=mask, other=0.0)
    vn = tl.load(V + b.to(tl.int64) * stride_vb + s * stride_vs + hd_v, mask=mask, other=0.0)
    if ROTARY_DIM > 0:
        k_rows = K + b.to(tl.int64) * stride_kb + s * stride_ks + offs_h * stride_kh
        kn = _rotary(kn.to(tl.float32), k_rows, offs_d, mask, Cos, Sin, pos_k, stride_cr, stride_cd, stride_sr,
                     stride_sd, ROTARY_DIM, INTERLEAVED).to(K.dtype.element_ty)
    if KV_QUANT != 0:
        head_ok = in_cache & (offs_h < Hkv)
        kn, k_sc = _quant(kn.to(tl.float32), mask, KV_QUANT, FP8_HW)
        vn, v_sc = _quant(vn.to(tl.float32), mask, KV_QUANT, FP8_HW)
        tl.store(KScale + outer * stride_ksb + slot * stride_kss + offs_h * stride_ksh, k_sc, mask=head_ok)
        tl.store(VScale + outer * stride_vsb + slot * stride_vss + offs_h * stride_vsh, v_sc, mask=head_ok)
    tl.store(KCache + row_kc + offs_h[:, None] * stride_kch + offs_d[None, :], kn, mask=mask)
    tl.store(VCache + row_vc + offs_h[:, None] * stride_vch + offs_d[None, :], vn, mask=mask)


@triton.jit
def _decode_split_kv(
    Q, KCache, VCache, CacheSeqlens, BlockTable, Alibi, KScale, VScale,
    Out, Lse,                                 # final out [B, Sq, Hq, D], lse [B, Hq, Sq] (when not SPLIT)
    OutPart, LsePart,                         # partials [B, Hq, Sq, splits, D], [B, Hq, Sq, splits] fp32
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,          # k cache: dim 0 is the batch (contiguous) or the page (paged)
    stride_vb, stride_vs, stride_vh,
    stride_ksb, stride_kss, stride_ksh,       # k_scale (quantized caches): the cache's dims without D
    stride_vsb, stride_vss, stride_vsh,
    stride_cs,                                # cache_seqlens [B]
    stride_btb, stride_btp,                   # block_table [B, max_pages]
    stride_ab, stride_ah,                     # alibi slopes [Hq] (stride_ab = 0) or [B, Hq]
    stride_ob, stride_os, stride_oh,
    qk_scale,                                 # softmax_scale * log2(e), or softmax_scale with HAS_SOFTCAP
    softcap,
    window_left, window_right,                # >= 0 where MASK_LEFT / MASK_RIGHT (causal = right 0)
    Sq, Hkv,
    group,                                    # Hq // Hkv
    num_appended,                             # Sq when k/v were appended, else 0
    capacity, page_size, num_pages, num_splits,
    HEAD_DIM: tl.constexpr,
    PAGED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    ALIGNED: tl.constexpr,                    # cache rows start on 16 bytes: vector loads (host-checked)
    SPLIT: tl.constexpr,                      # write partials (num_splits > 1) or the final result
    UPCAST: tl.constexpr,                     # interpreter only: bf16 -> fp32 right after loads
    M_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_QUANT: tl.constexpr = 0,               # cache format: 0 16-bit (q's dtype), 1 int8, 2 fp8 e4m3 (+ scales)
    FP8_HW: tl.constexpr = False,             # fp8 conversions by cvt (sm_90+), else the integer conversion
):
    pid = tl.program_id(0)                    # (b, h_kv, M-block), M-block fastest
    split = tl.program_id(1)
    b = pid // (Hkv * M_BLOCKS)
    h_kv = (pid // M_BLOCKS) % Hkv
    hq_total = group * Hkv

    # Rows of the M tile: row m is query i = m % Sq of query head g = m // Sq of this KV head's group.
    offs_m = (pid % M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < group * Sq
    g = offs_m // Sq
    qi = offs_m % Sq
    h_q = h_kv * group + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # Keys visible to some query of this sequence: [lo, n). Query i sits at position n - Sq + i.
    n = tl.load(CacheSeqlens + b.to(tl.int64) * stride_cs).to(tl.int64) + num_appended
    n = tl.minimum(tl.maximum(n, 0), capacity).to(tl.int32)     # any cache_seqlens: 0..capacity
    q_pos = n - Sq + qi
    lo = 0
    if MASK_LEFT:
        lo = tl.maximum(n - Sq - window_left, 0)
    tiles = tl.cdiv(n - lo, BLOCK_N)
    tiles_per_split = tl.cdiv(tiles, num_splits)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, n)

    q = tl.load(Q + b.to(tl.int64) * stride_qb + qi[:, None] * stride_qs + h_q[:, None] * stride_qh
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h_q * stride_ah, mask=row_ok, other=0.0) * K_LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = h_kv * stride_kh
    v_head = h_kv * stride_vh
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < end
        if PAGED:   # a page id outside 0..num_pages-1 holds no visible token: nothing is read from it
            page = tl.load(BlockTable + b.to(tl.int64) * stride_btb + (cols // page_size) * stride_btp, mask=col_ok,
                           other=-1)
            col_ok = col_ok & (page >= 0) & (page < num_pages)
            outer, slot = page.to(tl.int64), (cols % page_size).to(tl.int64)
        else:
            outer, slot = b.to(tl.int64), cols.to(tl.int64)
        k_row = outer * stride_kb + slot * stride_ks
        v_row = outer * stride_vb + slot * stride_vs
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k_ptrs = KCache + k_row[:, None] + k_head + offs_d[None, :]
        v_ptrs = VCache + v_row[:, None] + v_head + offs_d[None, :]
        if ALIGNED:   # 16 bytes: 8 16-bit or 16 8-bit elements
            k_ptrs = tl.max_contiguous(tl.multiple_of(k_ptrs, [1, 16]), [1, 16 if KV_QUANT != 0 else 8])
            v_ptrs = tl.max_contiguous(tl.multiple_of(v_ptrs, [1, 16]), [1, 16 if KV_QUANT != 0 else 8])
        k = tl.load(k_ptrs, mask=kv_mask, other=0)
        if KV_QUANT != 0:   # dequantize in registers: x * scale rounded to q's dtype, as the cache would hold it
            k_sc = tl.load(KScale + outer * stride_ksb + slot * stride_kss + h_kv * stride_ksh, mask=col_ok,
                           other=0.0)
            k = _dequant(k, k_sc, KV_QUANT, FP8_HW).to(Q.dtype.element_ty)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale                     # (BLOCK_M, BLOCK_N), log2 units
        if HAS_SOFTCAP:
            s = (softcap * K_LOG2E) * tanh(s / softcap)
        if HAS_ALIBI:
            s -= slope[:, None] * tl.abs(q_pos[:, None] - cols[None, :]).to(tl.float32)
        visible = col_ok[None, :] & row_ok[:, None]
        if MASK_RIGHT:
            visible &= cols[None, :] <= q_pos[:, None] + window_right
        if MASK_LEFT:
            visible &= cols[None, :] >= q_pos[:, None] - window_left
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)      # rows that see nothing yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=kv_mask, other=0)
        if KV_QUANT != 0:
            v_sc = tl.load(VScale + outer * stride_vsb + slot * stride_vss + h_kv * stride_vsh, mask=col_ok,
                           other=0.0)
            v = _dequant(v, v_sc, KV_QUANT, FP8_HW).to(Q.dtype.element_ty)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(Q.dtype.element_ty).to(v.dtype), v, acc * alpha[:, None])   # p rounded as on a GPU
        m_i = m_new

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse2 = tl.where(empty_row, float("-inf"), m_i + tl.log2(tl.where(empty_row, 1.0, l_i)))
    row = (b * hq_total + h_q) * Sq + qi                           # flat index into [B, Hq, Sq]
    if SPLIT:
        part = row.to(tl.int64) * num_splits + split
        tl.store(OutPart + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LsePart + part, lse2, mask=row_ok)
    else:
        tl.store(Out + b.to(tl.int64) * stride_ob + qi[:, None] * stride_os + h_q[:, None] * stride_oh
                 + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + row, lse2 * K_LN2, mask=row_ok)


@triton.jit
def _decode_combine(
    OutPart, LsePart, Out, Lse,
    stride_ob, stride_os, stride_oh,
    Hq, Sq, D, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program per (b, query head, query): out = sum_s w_s * out_s / sum_s w_s with w_s = 2^(lse_s - max)."""
    row = tl.program_id(0)                                         # flat index into [B, Hq, Sq]
    b = row // (Hq * Sq)
    h = (row // Sq) % Hq
    qi = row % Sq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    base = row.to(tl.int64) * num_splits
    lse = tl.load(LsePart + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)                  # no split saw a key: weights 0, no NaN
    den = tl.sum(tl.exp2(lse - m_safe), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):                                 # fixed order: deterministic
        w = tl.exp2(tl.load(LsePart + base + s) - m_safe)
        acc += w * tl.load(OutPart + (base + s) * D + offs_d, mask=offs_d < D, other=0.0)
    empty_row = den == 0.0
    out = acc / tl.where(empty_row, 1.0, den)
    lse_out = tl.where(empty_row, float("-inf"), m_safe + tl.log2(tl.where(empty_row, 1.0, den)))
    tl.store(Out + b.to(tl.int64) * stride_ob + qi * stride_os + h * stride_oh + offs_d,
             out.to(Out.dtype.element_ty), mask=offs_d < D)
    tl.store(Lse + row, lse_out * K_LN2)


# ---------------------------------------------------------------------------------------------
# Configuration (host side, no device access except the cached SM count)
# ---------------------------------------------------------------------------------------------

def _blocks(head_dim, group, sq):
    """(BLOCK_M, M_BLOCKS, BLOCK_N, BLOCK_D, num_warps, num_stages) of the split kernel: one config per shape."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    m_max = 64 if block_d <= 128 else 32
    rows = group * sq
    block_m = min(m_max, max(16, triton.next_power_of_2(rows)))
    block_n = 64 if block_d <= 128 else 32
    num_warps = 8 if max(block_m, block_n) * block_d >= 64 * 128 else 4
    num_stages = 3 if block_d <= 128 else 2
    return block_m, triton.cdiv(rows, block_m), block_n, block_d, num_warps, num_stages


def pick_num_splits(batch, hkv, m_blocks, capacity, block_n, num_sms):
    """Split count from shapes only (flash-attn's wave-efficiency rule): enough programs to fill the SMs,
    each split keeping >= 4 KV tiles, never more than MAX_SPLITS. Deterministic for given arguments."""
    ctas = batch * hkv * m_blocks
    max_splits = min(MAX_SPLITS, num_sms, triton.cdiv(capacity, 4 * block_n))
    if ctas >= 0.8 * num_sms or max_splits <= 1:
        return 1
    eff = [(ctas * s / num_sms) / math.ceil(ctas * s / num_sms) for s in range(1, max_splits + 1)]
    best = max(eff)
    return next(s for s, e in enumerate(eff, start=1) if e >= 0.85 * best)


# ---------------------------------------------------------------------------------------------
# Launcher (checks, allocation, launch)
# ---------------------------------------------------------------------------------------------

def _aligned(head_dim, *caches):
    """True when every cache row (head_dim contiguous elements) starts on 16 bytes: 128-bit loads are safe."""
    per = 16 // caches[0].element_size()
    return head_dim % per == 0 and all(c.data_ptr() % 16 == 0 and all(st % per == 0 for st in c.stride()[:-1])
                                       for c in caches)


_CAPABILITY = {}


def _fp8_hw(device):
    """Whether fp8 conversions use Triton's fp8e4nv casts: sm_90+ on a GPU (cvt.rn.satfinite.e4m3x2.f32, exact),
    FP8_CONVERSION under the interpreter."""
    if device.type != "cuda":
        if FP8_CONVERSION not in ("hw", "sw"):
            raise ValueError(f"triton_kernels.decode.FP8_CONVERSION must be 'hw' or 'sw', got {FP8_CONVERSION!r}")
        return FP8_CONVERSION == "hw"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)
    return _CAPABILITY[idx] >= (9, 0)


def _check_scales(k_cache, v_cache, k_scale, v_scale):
    """KV_QUANT of the caches (0, 1, 2); scales fp32 [dims of the cache without D] of a quantized cache."""
    quant = KV_FORMATS.get(k_cache.dtype, 0)
    if quant == 0:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale / v_scale are only for int8 / float8_e4m3fn caches, got a {k_cache.dtype} cache")
        return 0
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    for name, sc, cache in (("k_scale", k_scale, k_cache), ("v_scale", v_scale, v_cache)):
        if sc is None:
            raise ValueError(f"{name} is required with a {k_cache.dtype} cache")
        if sc.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {sc.dtype}")
        if tuple(sc.shape) != tuple(cache.shape[:-1]) or sc.device != cache.device:
            raise ValueError(f"{name} must have shape {tuple(cache.shape[:-1])} on {cache.device}, got "
                             f"{tuple(sc.shape)} on {sc.device}")
    return quant


def _check_rotary(q, k, rotary_cos, rotary_sin, capacity):
    """rotary_dim of tables [seqlen_ro >= capacity, rotary_dim / 2] of a float dtype on q's device (k given)."""
    if k is None:
        raise ValueError("rotary_cos / rotary_sin rotate the appended keys: pass k and v with them")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if t is None or t.dim() != 2 or t.device != q.device or t.dtype not in (torch.float16, torch.bfloat16,
                                                                                 torch.float32):
            raise ValueError(f"{name} must be a float16/bfloat16/float32 [seqlen_ro, rotary_dim / 2] tensor on "
                             f"{q.device}, got {None if t is None else (tuple(t.shape), t.dtype, t.device)}")
    if rotary_sin.shape != rotary_cos.shape or not 1 <= rotary_cos.shape[1] <= q.shape[-1] // 2 \
            or rotary_cos.shape[0] < capacity:
        raise ValueError(f"rotary_cos / rotary_sin must both have shape [seqlen_ro >= {capacity}, rotary_dim / 2 <= "
                         f"{q.shape[-1] // 2}], got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
    return 2 * rotary_cos.shape[1]


def decode(q, k_cache, v_cache, cache_seqlens, k, v, block_table, alibi_slopes, softmax_scale, window_left,
           window_right, softcap, num_splits, k_scale=None, v_scale=None, rotary_cos=None, rotary_sin=None,
           rotary_interleaved=False):
    """(out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32, natural log); appends k / v into the caches first when given.

    window_left / window_right: -1 unbounded (causal is window_right = 0); softcap 0 = off; num_splits 0 picks
    a count from the shapes and the SM count. k_scale / v_scale: the fp32 scales of an int8 / float8_e4m3fn
    cache (the cache's shape without D), written with the quantized appends. rotary_cos / rotary_sin
    [seqlen_ro, rotary_dim / 2] (with k / v): the append kernel rotates the new keys and q (into a buffer the
    split kernel reads) in its launch; query i turns at cache_seqlens + i when a window side (causal: right 0)
    is in 0..capacity-1, else at cache_seqlens."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float16 or bfloat16 for the triton decode kernel, got {q.dtype}")
    quant = _check_scales(k_cache, v_cache, k_scale, v_scale)
    fp8_hw = quant == 2 and _fp8_hw(q.device)
    if quant == 2:   # fp8 bits as uint8: the kernels convert them (Triton has no fp8e4nv below sm_89)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    batch, sq, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    dev = q.device
    upcast = interpreting() and q.dtype == torch.bfloat16
    block_m, m_blocks, block_n, block_d, num_warps, num_stages = _blocks(d, group, sq)
    if not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 0..{MAX_SPLITS} (0 = choose automatically), got {num_splits}")
    if num_splits == 0:
        num_splits = pick_num_splits(batch, hkv, m_blocks, capacity, block_n, sm_count(dev))
    bt = block_table if paged else cache_seqlens                   # placeholder pointer when not paged
    bt_strides = (block_table.stride(0), block_table.stride(1)) if paged else (0, 0)
    num_pages = k_cache.shape[0]
    out = empty((batch, sq, hq, d), q.dtype, dev)
    lse = empty((batch, hq, sq), torch.float32, dev)
    if quant:
        scales, scale_strides = (k_scale, v_scale), (*k_scale.stride(), *v_scale.stride())
    else:
        scales, scale_strides = (lse, lse), (0,) * 6               # placeholder pointers, never read

    rotary_dim = 0
    if rotary_cos is not None:
        rotary_dim = _check_rotary(q, k, rotary_cos, rotary_sin, capacity)
        q_rot = empty(q.shape, q.dtype, dev)
        rot_args = (q, q_rot, rotary_cos, rotary_sin)
        rot_strides = (*q.stride()[:3], *q_rot.stride()[:3], *rotary_cos.stride(), *rotary_sin.stride())
        q_per_token = int(any(0 <= w < capacity for w in (window_left, window_right)))
        seqlen_ro = rotary_cos.shape[0]
    else:
        rot_args, rot_strides, q_per_token, seqlen_ro = (q, q, lse, lse), (0,) * 10, 0, 1   # placeholders
    if k is not None:
        heads = hq if rotary_dim else hkv
        # rotary: a smaller tile per program (the partner elements and table rows are registers too)
        block_h = min(triton.next_power_of_2(heads), max(1, (1024 if rotary_dim else 4096) // block_d))
        _decode_append[(batch * sq, triton.cdiv(heads, block_h))](
            k, v, k_cache, v_cache, cache_seqlens, bt, *scales, *rot_args,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *scale_strides, cache_seqlens.stride(0),
            *bt_strides, *rot_strides, sq, hkv, d, capacity, page_size, num_pages, hq, seqlen_ro, q_per_token,
            PAGED=paged, BLOCK_H=block_h, BLOCK_D=block_d, KV_QUANT=quant, FP8_HW=fp8_hw, ROTARY_DIM=rotary_dim,
            INTERLEAVED=bool(rotary_interleaved), num_warps=4, enable_fp_fusion=not rotary_dim)
    if rotary_dim:
        q = q_rot

    split = num_splits > 1
    if split:
        out_part = empty((batch, hq, sq, num_splits, d), torch.float32, dev)
        lse_part = empty((batch, hq, sq, num_splits), torch.float32, dev)
    else:
        out_part, lse_part = out, lse                              # unused
    alibi = alibi_slopes if alibi_slopes is not None else lse
    stride_ab = (alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0) if alibi_slopes is not None else 0
    stride_ah = alibi_slopes.stride(-1) if alibi_slopes is not None else 0
    has_softcap = softcap > 0
    qk_scale = softmax_scale if has_softcap else softmax_scale * LOG2E
    _decode_split_kv[(batch * hkv * m_blocks, num_splits)](
        q, k_cache, v_cache, cache_seqlens, bt, alibi, *scales, out, lse, out_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *scale_strides, cache_seqlens.stride(0),
        *bt_strides,
        stride_ab, stride_ah, out.stride(0), out.stride(1), out.stride(2),
        qk_scale, softcap if has_softcap else 1.0, max(window_left, 0), max(window_right, 0),
        sq, hkv, group, sq if k is not None else 0, capacity, page_size, num_pages, num_splits,
        HEAD_DIM=d, PAGED=paged, MASK_LEFT=window_left >= 0, MASK_RIGHT=window_right >= 0,
        HAS_SOFTCAP=has_softcap, HAS_ALIBI=alibi_slopes is not None, ALIGNED=_aligned(d, k_cache, v_cache),
        SPLIT=split, UPCAST=upcast,
        M_BLOCKS=m_blocks, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, KV_QUANT=quant, FP8_HW=fp8_hw,
        num_warps=num_warps, num_stages=num_stages)
    if split:
        _decode_combine[(batch * hq * sq,)](
            out_part, lse_part, out, lse, out.stride(0), out.stride(1), out.stride(2),
            hq, sq, d, num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=1)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Shipped configurations for the static report (benchmarks/kernel_report.py)
# ---------------------------------------------------------------------------------------------

_CACHE_PTR = {0: None, 1: "*i8", 2: "*u8"}    # the cache pointer type per KV_QUANT (None: q's dtype)


def _split_signature(dtype, paged, quant=0):
    t = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    kv = _CACHE_PTR[quant] or f"*{t}"
    sig = {"Q": f"*{t}", "KCache": kv, "VCache": kv, "CacheSeqlens": "*i32", "BlockTable": "*i32",
           "Alibi": "*fp32", "KScale": "*fp32", "VScale": "*fp32", "Out": f"*{t}", "Lse": "*fp32",
           "OutPart": "*fp32", "LsePart": "*fp32"}
    for name in ("stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_vb",
                 "stride_vs", "stride_vh", "stride_ksb", "stride_kss", "stride_ksh", "stride_vsb", "stride_vss",
                 "stride_vsh", "stride_cs", "stride_btb", "stride_btp", "stride_ab", "stride_ah",
                 "stride_ob", "stride_os", "stride_oh"):
        sig[name] = "i32"
    sig.update(qk_scale="fp32", softcap="fp32")
    for name in ("window_left", "window_right", "Sq", "Hkv", "group", "num_appended", "capacity", "page_size",
                 "num_pages", "num_splits"):
        sig[name] = "i32"
    for name in ("HEAD_DIM", "PAGED", "MASK_LEFT", "MASK_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "ALIGNED", "SPLIT",
                 "UPCAST", "M_BLOCKS", "BLOCK_M", "BLOCK_N", "BLOCK_D", "KV_QUANT", "FP8_HW"):
        sig[name] = "constexpr"
    return sig


def _quant_variants(quant):
    """(name suffix, FP8_HW, archs) of a cache format: fp8 converts by cvt on sm_90 and in software on sm_80."""
    if quant == 2:
        return [(" fp8-sw", False, (80,)), (" fp8-hw", True, (90,))]
    return [(" int8", False, (80, 90))] if quant == 1 else [("", False, (80, 90))]


def aot_configs():
    """Split kernel for D in {64, 128, 256, 80} x group sizes x paged/contiguous, the 8-bit caches (int8, fp8
    e4m3: software conversions on sm_80, cvt on sm_90) at the decode shapes that matter, plus append (16-bit
    and quantizing) and combine. Interpreter byte counts (tests/test_kv_quant.py): an int8 / fp8 cache makes
    the split kernel load 0.52x the bytes of a 16-bit one at D 128, group 8, 4k tokens (8 bits per element
    plus a 4-byte scale per token and head)."""
    cfgs = []
    cases = [(128, 8, 1, torch.bfloat16, paged, True) for paged in (False, True)]
    cases += [(128, 1, 1, torch.float16, False, False), (128, 16, 4, torch.bfloat16, True, True),
              (64, 4, 1, torch.float16, True, True), (64, 7, 4, torch.bfloat16, False, False),
              (80, 8, 1, torch.bfloat16, True, True), (256, 8, 1, torch.bfloat16, False, True),
              (256, 64, 1, torch.float16, True, True)]
    for d, group, sq, dtype, paged, split in cases:
        block_m, m_blocks, block_n, block_d, warps, stages = _blocks(d, group, sq)
        consts = dict(HEAD_DIM=d, PAGED=paged, MASK_LEFT=False, MASK_RIGHT=True, HAS_SOFTCAP=False,
                      HAS_ALIBI=False, ALIGNED=d % 8 == 0, SPLIT=split, UPCAST=False, M_BLOCKS=m_blocks,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, KV_QUANT=0, FP8_HW=False)
        name = (f"decode_split_kv d{d} g{group} sq{sq} {str(dtype)[6:]} {'paged' if paged else 'contig'}"
                f"{' split' if split else ''} M{block_m}xN{block_n}")
        cfgs.append(AotConfig(name=name, kernel=_decode_split_kv, signature=_split_signature(dtype, paged),
                              constexprs=consts, num_warps=warps, num_stages=stages))
    # all features on (window, softcap, ALiBi) at the most register-hungry shape
    block_m, m_blocks, block_n, block_d, warps, stages = _blocks(256, 8, 4)
    consts = dict(HEAD_DIM=256, PAGED=True, MASK_LEFT=True, MASK_RIGHT=True, HAS_SOFTCAP=True,
                  HAS_ALIBI=True, ALIGNED=True, SPLIT=True, UPCAST=False, M_BLOCKS=m_blocks,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, KV_QUANT=0, FP8_HW=False)
    cfgs.append(AotConfig(name=f"decode_split_kv d256 g8 sq4 bf16 paged all-features M{block_m}xN{block_n}",
                          kernel=_decode_split_kv, signature=_split_signature(torch.bfloat16, True),
                          constexprs=consts, num_warps=warps, num_stages=stages))
    # 8-bit caches: the long-context decode shapes (group 8, D 128 paged), a CUDA-core-like small group, D 256
    for quant in (1, 2):
        for d, group, sq, dtype, paged, split in ((128, 8, 1, torch.bfloat16, True, True),
                                                  (128, 8, 4, torch.float16, False, False),
                                                  (64, 1, 1, torch.float16, True, True),
                                                  (256, 8, 1, torch.bfloat16, True, True)):
            block_m, m_blocks, block_n, block_d, warps, stages = _blocks(d, group, sq)
            for suffix, hw, archs in _quant_variants(quant):
                consts = dict(HEAD_DIM=d, PAGED=paged, MASK_LEFT=False, MASK_RIGHT=True, HAS_SOFTCAP=False,
                              HAS_ALIBI=False, ALIGNED=d % 16 == 0, SPLIT=split, UPCAST=False, M_BLOCKS=m_blocks,
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, KV_QUANT=quant, FP8_HW=hw)
                name = (f"decode_split_kv d{d} g{group} sq{sq} {str(dtype)[6:]} {'paged' if paged else 'contig'}"
                        f"{' split' if split else ''}{suffix} M{block_m}xN{block_n}")
                cfgs.append(AotConfig(name=name, kernel=_decode_split_kv,
                                      signature=_split_signature(dtype, paged, quant), constexprs=consts,
                                      num_warps=warps, num_stages=stages, archs=archs))
    for d, dtype in ((128, torch.bfloat16), (256, torch.float16)):
        t = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        sig = {"OutPart": "*fp32", "LsePart": "*fp32", "Out": f"*{t}", "Lse": "*fp32", "stride_ob": "i32",
               "stride_os": "i32", "stride_oh": "i32", "Hq": "i32", "Sq": "i32", "D": "i32", "num_splits": "i32",
               "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}
        cfgs.append(AotConfig(name=f"decode_combine d{d} {t} S<={MAX_SPLITS}", kernel=_decode_combine,
                              signature=sig, constexprs=dict(BLOCK_S=MAX_SPLITS, BLOCK_D=d), num_warps=1,
                              num_stages=1))
    # append: 16-bit and quantizing, without rotary and with it (rotate half and interleaved; BLOCK_H 8 at D 128,
    # the launcher's block of heads with rotary)
    for paged, quant, rotary, interleaved in ((False, 0, 0, False), (True, 0, 0, False), (True, 1, 0, False),
                                              (True, 2, 0, False), (False, 0, 128, False), (True, 0, 64, True),
                                              (True, 1, 128, False), (True, 2, 128, True)):
        kv = _CACHE_PTR[quant] or "*bf16"
        sig = {"K": "*bf16", "V": "*bf16", "KCache": kv, "VCache": kv, "CacheSeqlens": "*i32",
               "BlockTable": "*i32", "KScale": "*fp32", "VScale": "*fp32", "Q": "*bf16", "QRot": "*bf16",
               "Cos": "*fp32", "Sin": "*fp32"}
        for name in ("stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_kcb",
                     "stride_kcs", "stride_kch", "stride_vcb", "stride_vcs", "stride_vch", "stride_ksb", "stride_kss",
                     "stride_ksh", "stride_vsb", "stride_vss", "stride_vsh", "stride_cs", "stride_btb",
                     "stride_btp", "stride_qb", "stride_qs", "stride_qh", "stride_rb", "stride_rs", "stride_rh",
                     "stride_cr", "stride_cd", "stride_sr", "stride_sd", "Sq", "Hkv", "D", "capacity", "page_size",
                     "num_pages", "Hq", "seqlen_ro", "q_per_token"):
            sig[name] = "i32"
        sig.update(PAGED="constexpr", BLOCK_H="constexpr", BLOCK_D="constexpr", KV_QUANT="constexpr",
                   FP8_HW="constexpr", ROTARY_DIM="constexpr", INTERLEAVED="constexpr")
        rot = f" rotary{rotary}{' interleaved' if interleaved else ''}" if rotary else ""
        for suffix, hw, archs in _quant_variants(quant):
            cfgs.append(AotConfig(name=f"decode_append d128 {'paged' if paged else 'contig'}{suffix}{rot}",
                                  kernel=_decode_append, signature=sig,
                                  constexprs=dict(PAGED=paged, BLOCK_H=8, BLOCK_D=128,
                                                  KV_QUANT=quant, FP8_HW=hw, ROTARY_DIM=rotary,
                                                  INTERLEAVED=interleaved),
                                  num_warps=4, num_stages=1, archs=archs,
                                  options={"enable_fp_fusion": False} if rotary else {}))
    return cfgs
