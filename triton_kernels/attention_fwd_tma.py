"""Flash attention in Triton, forward through tensor descriptors (sm_90: TMA loads/stores, wgmma).

The same computation, notation and numerics as the portable forward (attention_fwd.py, whose helpers it
shares); what differs is how tiles move:

* Q, K, V are loaded and O is stored through device-side tensor descriptors (``tl.make_tensor_descriptor``),
  which compile on sm_90 to TMA (``cp.async.bulk.tensor`` completing on an ``mbarrier``). Each program builds
  one descriptor per tensor over its own sequence and head: a 2-D view [seqlen, HEAD_DIM] with the token
  stride, based at the sequence's first token. A box that crosses the view's end reads zeros (rows past
  seqlen, columns past HEAD_DIM) and a store is clipped to the view, so neither a varlen batch's neighbouring
  sequence nor the padding of the head-dim tile is ever touched, and no load needs a mask.
* Key loops. Without ``WARP_SPEC``: the portable kernel's three loops (tiles crossing a band edge masked, the
  others not), software-pipelined over ``num_stages`` K/V buffers. With ``WARP_SPEC``: one
  ``tl.range(..., warp_specialize=True)`` loop over every visited tile, each masked -- the sm_90
  warp-specialization pass partitions a single loop whose results only the epilogue reads (a chain of loops
  fails to compile, triton 3.8) -- split by the compiler into a producer warpgroup issuing the TMA loads and
  consumer warpgroups running wgmma and the softmax, ``setmaxnreg`` moving registers to the consumers.
  Both visit the same tiles in the same order with the same arithmetic as the portable kernel (masking a fully
  visible tile changes nothing): under the interpreter all three give the same bits.

Requirements (checked by the launcher, attention.py): base pointers 16-byte aligned and every stride but the
last a multiple of 16 bytes; the descriptor workspace comes from ``triton.set_allocator`` on a GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._device import K_LN2, K_LOG2E, dropout_keep
from .attention_fwd import _key_range, _round_to, _scores, _seq_info, _visible, dropout_state


@triton.jit
def _tile(desc, row, UPCAST: tl.constexpr):
    """One box of a descriptor at (row, 0); fp32 under the interpreter's bf16 workaround."""
    x = desc.load([row, 0])
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_desc, v_desc, n0, rows, offs_n, seqlen_k, off, qk_scale, softcap2, slope2,
              win_left, win_right, seed, offset, bh, drop_thr, DTYPE: tl.constexpr, MASKED: tl.constexpr,
              MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of the online softmax (MASKED: a tile crossing a band edge or the sequence end)."""
    cols = n0 + offs_n
    k = _tile(k_desc, n0, UPCAST)
    qk = tl.dot(q, k.T)
    s, _ = _scores(qk, rows[:, None], cols[None, :], off, qk_scale, softcap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
    if MASKED:
        vis = _visible(rows[:, None], cols[None, :], seqlen_k, off, win_left, win_right, MASK_LEFT, MASK_RIGHT)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a row may still have seen nothing: keep exp2 away from (-inf) - (-inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _tile(v_desc, n0, UPCAST)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:   # the row sum l_i above is the undropped one
        p = tl.where(dropout_keep(seed, offset, bh, rows, n0, drop_thr, p.shape[0], p.shape[1]), p, 0.0)
    acc = tl.dot(_round_to(p, DTYPE, UPCAST), v, acc)
    return acc, l_i, m_new


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, k_desc, v_desc, lo, hi, rows, offs_n, seqlen_k, off, qk_scale, softcap2, slope2,
              win_left, win_right, seed, offset, bh, drop_thr, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, WARP_SPEC: tl.constexpr):
    """Key tiles lo, lo+BLOCK_N, ... < hi. The warp-specialized loop is spelled only when WARP_SPEC, so a Triton
    whose tl.range lacks the argument still compiles the other variant."""
    if WARP_SPEC:
        for n0 in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_desc, v_desc, n0, rows, offs_n, seqlen_k, off, qk_scale,
                                      softcap2, slope2, win_left, win_right, seed, offset, bh, drop_thr, DTYPE,
                                      MASKED, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)
    else:
        for n0 in tl.range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_desc, v_desc, n0, rows, offs_n, seqlen_k, off, qk_scale,
                                      softcap2, slope2, win_left, win_right, seed, offset, bh, drop_thr, DTYPE,
                                      MASKED, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma(
    Q, K, V, Out, Lse,                 # as _attn_fwd (attention_fwd.py): same arguments, same layouts
    Alibi, CuQ, CuK, RngState,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh, stride_lm,
    stride_ab, stride_ah,
    Nq, Nk,
    qk_scale, softcap2,
    win_left, win_right,
    drop_thr, drop_scale,
    tune_key,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    WARP_SPEC: tl.constexpr,           # warp-specialized key loops (producer: TMA; consumers: wgmma + softmax)
):
    """One program = BLOCK_M query rows of one (batch, query head); grid and schedule as _attn_fwd."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k, off = _seq_info(CuQ, CuK, b, Nq, Nk, IS_VARLEN, BOTTOM_RIGHT)
    m0 = pid_m * BLOCK_M
    # No early return for tiles past a varlen sequence's end (the warp-specialization pass takes only structured
    # control flow): their key loops are empty and the clipped store writes nothing.
    active = m0 < seqlen_q
    hk = h // GROUP
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    # One [seqlen, HEAD_DIM] view per tensor of this sequence and head (int64 bases: B*H*N*D may exceed 2^31).
    # An empty sequence gets a 1-row view (a descriptor's dims must be positive) that is never read from nor
    # written to: no key tile is visited, and an inactive tile stores at the row past the view's end.
    n_q = tl.maximum(seqlen_q, 1)
    n_k = tl.maximum(seqlen_k, 1)
    q_desc = tl.make_tensor_descriptor(Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm,
                                       shape=[n_q, HEAD_DIM], strides=[stride_qm, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    o_desc = tl.make_tensor_descriptor(Out + b64 * stride_ob + h64 * stride_oh + q_start * stride_om,
                                       shape=[n_q, HEAD_DIM], strides=[stride_om, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn,
                                       shape=[n_k, HEAD_DIM], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn,
                                       shape=[n_k, HEAD_DIM], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    L_blk = Lse + b64 * stride_lb + h64 * stride_lh + (q_start + m0) * stride_lm
    DTYPE: tl.constexpr = V.dtype.element_ty

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows = m0 + offs_m
    q = _tile(q_desc, m0, UPCAST)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b64 * stride_ab + h64 * stride_ah) * K_LOG2E
    seed, offset = dropout_state(RngState, HAS_DROPOUT)
    bh = b * tl.num_programs(1) + h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = _key_range(m0, m_last, seqlen_k, off, win_left, win_right, BLOCK_N,
                                          MASK_LEFT, MASK_RIGHT)
    hi = tl.where(active, hi, lo)
    if WARP_SPEC:
        # One key loop, every tile masked: the warp-specialization pass partitions a single loop whose results
        # feed only the epilogue (a chain of loops fails to compile).
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_desc, v_desc, lo, hi, rows, offs_n, seqlen_k, off,
                                  qk_scale, softcap2, slope2, win_left, win_right, seed, offset, bh, drop_thr, DTYPE,
                                  BLOCK_N, True, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, True)
    else:
        full_lo = tl.minimum(full_lo, hi)
        full_hi = tl.minimum(full_hi, hi)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_desc, v_desc, lo, full_lo, rows, offs_n, seqlen_k, off,
                                  qk_scale, softcap2, slope2, win_left, win_right, seed, offset, bh, drop_thr, DTYPE,
                                  BLOCK_N, True, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, False)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_desc, v_desc, full_lo, full_hi, rows, offs_n, seqlen_k,
                                  off, qk_scale, softcap2, slope2, win_left, win_right, seed, offset, bh, drop_thr, DTYPE,
                                  BLOCK_N, False, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, False)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_desc, v_desc, full_hi, hi, rows, offs_n, seqlen_k, off,
                                  qk_scale, softcap2, slope2, win_left, win_right, seed, offset, bh, drop_thr, DTYPE,
                                  BLOCK_N, True, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, False)

    # Normalise once. A row that saw no key has l = 0: out 0, lse -inf (never NaN).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * drop_scale
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * K_LN2)
    o_desc.store([tl.where(active, m0, n_q), 0], out.to(Out.dtype.element_ty))
    tl.store(L_blk + offs_m * stride_lm, lse, mask=rows < seqlen_q)
