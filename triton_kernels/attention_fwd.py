"""Flash attention in Triton, part 1: shared device helpers and the forward kernel.

Notation used by every attention kernel here (forward in this file, backward in attention_bwd.py):

* One sequence pair at a time: ``seqlen_q`` queries (row index i), ``seqlen_k`` keys (column index j).
  Dense batches give every sequence the same lengths (``Nq``, ``Nk``); varlen batches read them from
  ``cu_seqlens`` (``IS_VARLEN``), with the packed token offset added to the base pointers.
* Visibility: ``off = seqlen_k - seqlen_q`` (``BOTTOM_RIGHT``, flash-attn) or ``0`` (top-left, SDPA).
  Key j is visible to query i iff ``i + off - left <= j`` (only when ``MASK_LEFT``) and
  ``j <= i + off + right`` (only when ``MASK_RIGHT``). Causal is ``right = 0``; the host folds it in.
* Scores live in the log2 domain: ``s2 = log2(e) * s`` where ``s = scale * q.k`` (or
  ``softcap * tanh(scale * q.k / softcap)``) ``- slope * |i + off - j|``. ``exp2`` is the only
  transcendental in the inner loop; the stored log-sum-exp is in natural log.
* Loops over the other sequence are split in three: tiles crossing the band edges are masked, tiles
  fully inside the band run without any mask, tiles fully outside are never visited.
* Dropout (``HAS_DROPOUT``): P is multiplied by the keep mask of ``dropout_keep`` (_device.py; seed and offset
  read from ``RngState``, int64 [2] in device memory) before P @ V, and the output by ``drop_scale`` =
  1 / (1 - p) at the end; the row sums, so the log-sum-exp, stay undropped. The backward regenerates the mask.
* ``UPCAST`` (only under TRITON_INTERPRET=1, where bf16 arithmetic is broken): values are converted to
  fp32 right after each load, and products fed to ``tl.dot`` are rounded through the input dtype so the
  numerics match the compiled kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._device import K_LN2, K_LOG2E, dropout_keep, tanh


# ---------------------------------------------------------------------------------------------
# Helpers shared with attention_bwd.py
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load(ptrs, mask, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """Load a tile (masked elements read 0); fp32 under the interpreter's bf16 workaround."""
    if HAS_MASK:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> the input dtype for a tensor-core dot (kept as fp32 values when UPCAST)."""
    y = x.to(DTYPE)
    if UPCAST:
        y = y.to(tl.float32)
    return y


@triton.jit
def _seq_info(CuQ, CuK, b, Nq, Nk, IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """(first packed query token, seqlen_q, first packed key token, seqlen_k, alignment offset) of batch b.
    Varlen: cu_seqlens are non-decreasing and within the packed tokens (the launcher makes them so)."""
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        seqlen_q = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        seqlen_k = tl.load(CuK + b + 1) - k_start
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
    else:
        q_start = b.to(tl.int64) * 0
        k_start = b.to(tl.int64) * 0
        seqlen_q = Nq + b * 0
        seqlen_k = Nk + b * 0
    if BOTTOM_RIGHT:
        off = seqlen_k - seqlen_q
    else:
        off = seqlen_k * 0
    return q_start, seqlen_q, k_start, seqlen_k, off


@triton.jit
def dropout_state(RngState, HAS_DROPOUT: tl.constexpr):
    """(seed, offset) of the dropout mask, read from device memory (0, 0 without dropout)."""
    if HAS_DROPOUT:
        seed = tl.load(RngState)
        offset = tl.load(RngState + 1)
    else:
        seed = tl.zeros((), tl.int64)
        offset = tl.zeros((), tl.int64)
    return seed, offset


@triton.jit
def _scores(qk, rows, cols, off, qk_scale, softcap2, slope2,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Raw q.k products -> (scores in the log2 domain, tanh(...) for the softcap derivative).

    rows/cols broadcast against qk ([M, 1] x [1, N] in the forward and dQ kernels, transposed in dK/dV).
    qk_scale is scale*log2(e), or scale/softcap with softcap (then softcap2 = softcap*log2(e)).
    """
    if HAS_SOFTCAP:
        t = tanh(qk * qk_scale)
        s = t * softcap2
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        dist = (rows + off - cols).to(tl.float32)
        s = s - slope2 * tl.abs(dist)
    return s, t


@triton.jit
def _visible(rows, cols, seqlen_k, off, win_left, win_right,
             MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """True where key `cols` exists and lies inside the window of query `rows` (broadcasting)."""
    vis = cols < seqlen_k
    if MASK_RIGHT:
        vis = vis & (cols <= rows + off + win_right)
    if MASK_LEFT:
        vis = vis & (cols >= rows + off - win_left)
    return vis


@triton.jit
def _key_range(m0, m_last, seqlen_k, off, win_left, win_right, BLOCK_N: tl.constexpr,
               MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """Key tiles for the query rows m0..m_last: [lo, full_lo) masked, [full_lo, full_hi) fully visible
    (no mask), [full_hi, hi) masked. Tiles outside [lo, hi) see nothing and are skipped."""
    lo = m0 * 0
    hi = seqlen_k
    if MASK_LEFT:
        lo = tl.maximum(m0 + off - win_left, 0)
    if MASK_RIGHT:
        hi = tl.minimum(m_last + off + win_right + 1, seqlen_k)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = lo
    if MASK_LEFT:  # every row of the block must see the tile's first key
        full_lo = tl.maximum(full_lo, tl.cdiv(tl.maximum(m_last + off - win_left, 0), BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    full_end = seqlen_k   # ... and the tile's last key, which must exist
    if MASK_RIGHT:
        full_end = tl.minimum(full_end, m0 + off + win_right + 1)
    full_hi = (tl.maximum(full_end, 0) // BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_head, V_head, rows, offs_n, offs_d, lo, hi,
               seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right, stride_kn, stride_vn,
               seed, offset, bh, drop_thr,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over key tiles lo, lo+BLOCK_N, ... < hi (MASKED: tiles crossing a band edge)."""
    # Scalar 64-bit tile pointers advance tile by tile (a long sequence can exceed 2^31 elements);
    # in-tile offsets are loop-invariant int32 (fewer registers than tensors of pointers).
    kt_offs = offs_n[None, :] * stride_kn + offs_d[:, None]      # K^T tile [BLOCK_D, BLOCK_N]
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :]       # V tile [BLOCK_N, BLOCK_D]
    K_tile = K_head + lo.to(tl.int64) * stride_kn
    V_tile = V_head + lo.to(tl.int64) * stride_vn
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        kmask = (cols[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM)
        kt = _load(K_tile + kt_offs, kmask, MASKED or not EVEN_D, UPCAST)
        qk = tl.dot(q, kt)
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
        vmask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        v = _load(V_tile + v_offs, vmask, MASKED or not EVEN_D, UPCAST)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:   # the row sum l_i above is the undropped one
            p = tl.where(dropout_keep(seed, offset, bh, rows, n0, drop_thr, BLOCK_M, BLOCK_N), p, 0.0)
        acc = tl.dot(_round_to(p, V_head.dtype.element_ty, UPCAST), v, acc)
        m_i = m_new
        K_tile += BLOCK_N * stride_kn
        V_tile += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse,                 # q [B, Nq, Hq, D] / [Tq, Hq, D]; out like q; lse [B, Hq, Nq] / [Hq, Tq] fp32
    Alibi, CuQ, CuK,                   # fp32 slopes [Hq] or [B, Hq] (HAS_ALIBI); int32 [B+1] (IS_VARLEN)
    RngState,                          # int64 [2] dropout (seed, offset) (HAS_DROPOUT)
    stride_qb, stride_qm, stride_qh,   # element strides; *_b is 0 for varlen (token offsets come from cu_seqlens)
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh, stride_lm,
    stride_ab, stride_ah,              # alibi strides (stride_ab = 0 for shared [Hq] slopes)
    Nq, Nk,                            # dense sequence lengths (ignored when IS_VARLEN)
    qk_scale, softcap2,                # see _scores
    win_left, win_right,               # window (causal folded in: right = 0); used when MASK_LEFT/RIGHT
    drop_thr, drop_scale,              # dropout: 16-bit threshold, 1 / (1 - p) (HAS_DROPOUT)
    tune_key,                          # log2 length bucket: only an autotune key
    GROUP: tl.constexpr,               # Hq // Hkv
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, query head). Grid (cdiv(max Nq, BLOCK_M), Hq, B).
    The last query tiles (the longest key loops under causal masking) are scheduled first."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k, off = _seq_info(CuQ, CuK, b, Nq, Nk, IS_VARLEN, BOTTOM_RIGHT)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    hk = h // GROUP
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), hk.to(tl.int64)
    # int64 base offsets: B*H*N*D may exceed 2^31; in-tile offsets stay int32.
    Q_blk = Q + b64 * stride_qb + h64 * stride_qh + (q_start + m0) * stride_qm
    O_blk = Out + b64 * stride_ob + h64 * stride_oh + (q_start + m0) * stride_om
    K_head = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    V_head = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn
    L_blk = Lse + b64 * stride_lb + h64 * stride_lh + (q_start + m0) * stride_lm

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < seqlen_q
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = _load(Q_blk + offs_m[:, None] * stride_qm + offs_d[None, :], io_mask, True, UPCAST)
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
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_head, V_head, rows, offs_n, offs_d, lo, full_lo,
                               seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right, stride_kn,
                               stride_vn, seed, offset, bh, drop_thr, True, EVEN_D, HEAD_DIM, BLOCK_M, BLOCK_N,
                               MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_head, V_head, rows, offs_n, offs_d, full_lo, full_hi,
                               seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right, stride_kn,
                               stride_vn, seed, offset, bh, drop_thr, False, EVEN_D, HEAD_DIM, BLOCK_M, BLOCK_N,
                               MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_head, V_head, rows, offs_n, offs_d, full_hi, hi,
                               seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right, stride_kn,
                               stride_vn, seed, offset, bh, drop_thr, True, EVEN_D, HEAD_DIM, BLOCK_M, BLOCK_N,
                               MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)

    # Normalise once. A row that saw no key has l = 0: out 0, lse -inf (never NaN).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * drop_scale
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * K_LN2)
    tl.store(O_blk + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty), mask=io_mask)
    tl.store(L_blk + offs_m * stride_lm, lse, mask=row_ok)
