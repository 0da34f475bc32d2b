"""Flash attention in Triton, part 2: the backward kernels (notation in attention_fwd.py).

* ``_attn_bwd_preprocess``: delta = rowsum(dO * O) (minus dLSE when the log-sum-exp itself receives a
  gradient: d lse / d s = p, so it folds into the same term).
* ``_attn_bwd_dkdv``: one program per BLOCK_N keys of one KV head; it loops over the query heads of its
  GQA group and over the query tiles that see these keys, accumulating dK and dV in registers.
* ``_attn_bwd_dq``: one program per BLOCK_M queries of one query head, looping over the visible keys.

No program writes what another writes and there are no atomics, so gradients are bit-identical from run
to run (``deterministic=True`` costs nothing). P is recomputed from the stored log-sum-exp; a row that
saw no key (lse = -inf) is treated as lse = +inf, so its P, and its gradients, are exactly 0.
``_zero_tail`` writes the outputs of packed varlen tokens past ``cu_seqlens[-1]`` (out/grads 0, lse -inf).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._device import K_LOG2E
from .attention_fwd import _key_range, _load, _round_to, _scores, _seq_info, _visible


@triton.jit
def _attn_bwd_preprocess(
    Out, DO, DLse, Delta, CuQ,          # delta has lse's layout; dlse (HAS_DLSE) its own strides
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh, stride_lm,
    stride_glb, stride_glh, stride_glm,
    Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q, _, _, _ = _seq_info(CuQ, CuQ, b, Nq, Nq, IS_VARLEN, False)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    tok = q_start + m0
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = m0 + offs_m < seqlen_q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + tok * stride_om
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + tok * stride_dom
                 + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + b64 * stride_glb + h64 * stride_glh + (tok + offs_m) * stride_glm,
                         mask=row_ok, other=0.0)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + (tok + offs_m) * stride_lm, delta, mask=row_ok)


@triton.jit
def _query_range(n0, n_last, seqlen_q, off, win_left, win_right, BLOCK_M: tl.constexpr,
                 MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """Query tiles that see keys n0..n_last: [lo, full_lo) masked, [full_lo, full_hi) no mask, [full_hi, hi)
    masked. Rows past seqlen_q need no score mask here: their P is 0 (lse read as +inf)."""
    lo = n0 * 0
    hi = seqlen_q
    if MASK_RIGHT:   # j <= i + off + right  <=>  i >= j - off - right
        lo = tl.maximum(n0 - off - win_right, 0)
    if MASK_LEFT:    # j >= i + off - left   <=>  i <= j - off + left
        hi = tl.minimum(n_last - off + win_left + 1, seqlen_q)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, lo)
    full_lo = lo
    if MASK_RIGHT:
        full_lo = tl.maximum(full_lo, tl.cdiv(tl.maximum(n_last - off - win_right, 0), BLOCK_M) * BLOCK_M)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = hi
    if MASK_LEFT:
        full_hi = tl.minimum((tl.maximum(n0 - off + win_left + 1, 0) // BLOCK_M) * BLOCK_M, hi)
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q_head, DO_head, L_head, D_head, cols, offs_m, offs_d, lo, hi,
                seqlen_q, seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right,
                stride_qm, stride_dom, stride_lm,
                MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles lo, lo+BLOCK_M, ... < hi of one query head."""
    qt_offs = offs_m[None, :] * stride_qm + offs_d[:, None]      # Q^T tile [BLOCK_D, BLOCK_M]
    do_offs = offs_m[:, None] * stride_dom + offs_d[None, :]     # dO tile [BLOCK_M, BLOCK_D]
    Q_tile = Q_head + lo.to(tl.int64) * stride_qm               # scalar 64-bit tile pointers
    DO_tile = DO_head + lo.to(tl.int64) * stride_dom
    d_ok = offs_d < HEAD_DIM
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < seqlen_q
        qt = _load(Q_tile + qt_offs, row_ok[None, :] & d_ok[:, None], True, UPCAST)
        lse = tl.load(L_head + rows * stride_lm, mask=row_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * K_LOG2E
        qkt = tl.dot(k, qt)                                                  # [BLOCK_N, BLOCK_M]
        st, tt = _scores(qkt, rows[None, :], cols[:, None], off, qk_scale, softcap2, slope2,
                         HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            vis = _visible(rows[None, :], cols[:, None], seqlen_k, off, win_left, win_right,
                           MASK_LEFT, MASK_RIGHT)
            st = tl.where(vis, st, float("-inf"))
        pt = tl.math.exp2(st - lse2[None, :])
        do = _load(DO_tile + do_offs, row_ok[:, None] & d_ok[None, :], True, UPCAST)
        dv = tl.dot(_round_to(pt, DO_head.dtype.element_ty, UPCAST), do, dv)
        delta = tl.load(D_head + rows * stride_lm, mask=row_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk = tl.dot(_round_to(dst, Q_head.dtype.element_ty, UPCAST), tl.trans(qt), dk)
        Q_tile += BLOCK_M * stride_qm
        DO_tile += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV,   # dk/dv laid out like k/v (own strides); delta like lse
    Alibi, CuQ, CuK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh, stride_lm,
    stride_ab, stride_ah,
    Nq, Nk, qk_scale, softcap2, sm_scale, win_left, win_right, tune_key,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program = BLOCK_N keys of one (batch, KV head). Grid (cdiv(max Nk, BLOCK_N), Hkv, B)."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k, off = _seq_info(CuQ, CuK, b, Nq, Nk, IS_VARLEN, BOTTOM_RIGHT)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + offs_n
    kv_mask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    tok = k_start + n0
    k = _load(K + b64 * stride_kb + hk64 * stride_kh + tok * stride_kn
              + offs_n[:, None] * stride_kn + offs_d[None, :], kv_mask, True, UPCAST)
    v = _load(V + b64 * stride_vb + hk64 * stride_vh + tok * stride_vn
              + offs_n[:, None] * stride_vn + offs_d[None, :], kv_mask, True, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    n_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    lo, full_lo, full_hi, hi = _query_range(n0, n_last, seqlen_q, off, win_left, win_right, BLOCK_M,
                                            MASK_LEFT, MASK_RIGHT)
    slope2 = 0.0
    for g in range(GROUP):  # the query heads sharing this KV head: GQA reduction stays in registers
        h64 = hk64 * GROUP + g
        Q_head = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
        DO_head = DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
        L_head = Lse + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        D_head = Delta + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + b64 * stride_ab + h64 * stride_ah) * K_LOG2E
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, L_head, D_head, cols, offs_m, offs_d, lo, full_lo,
                             seqlen_q, seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right,
                             stride_qm, stride_dom, stride_lm, True, HEAD_DIM, BLOCK_M,
                             MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, UPCAST)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, L_head, D_head, cols, offs_m, offs_d, full_lo,
                             full_hi, seqlen_q, seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right,
                             stride_qm, stride_dom, stride_lm, False, HEAD_DIM, BLOCK_M,
                             MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, UPCAST)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, L_head, D_head, cols, offs_m, offs_d, full_hi, hi,
                             seqlen_q, seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right,
                             stride_qm, stride_dom, stride_lm, True, HEAD_DIM, BLOCK_M,
                             MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, UPCAST)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + tok * stride_dkn
             + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + tok * stride_dvn
             + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K_head, V_head, rows, offs_n, offs_d, lo, hi,
              seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right, stride_kn, stride_vn,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles lo, lo+BLOCK_N, ... < hi."""
    kt_offs = offs_n[None, :] * stride_kn + offs_d[:, None]      # K^T tile [BLOCK_D, BLOCK_N]
    vt_offs = offs_n[None, :] * stride_vn + offs_d[:, None]      # V^T tile [BLOCK_D, BLOCK_N]
    K_tile = K_head + lo.to(tl.int64) * stride_kn                # scalar 64-bit tile pointers
    V_tile = V_head + lo.to(tl.int64) * stride_vn
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        tmask = (cols[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM)
        kt = _load(K_tile + kt_offs, tmask, MASKED or not EVEN_D, UPCAST)
        qk = tl.dot(q, kt)
        s, t = _scores(qk, rows[:, None], cols[None, :], off, qk_scale, softcap2, slope2, HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            vis = _visible(rows[:, None], cols[None, :], seqlen_k, off, win_left, win_right, MASK_LEFT, MASK_RIGHT)
            s = tl.where(vis, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        vt = _load(V_tile + vt_offs, tmask, MASKED or not EVEN_D, UPCAST)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(_round_to(ds, K_head.dtype.element_ty, UPCAST), tl.trans(kt), dq)
        K_tile += BLOCK_N * stride_kn
        V_tile += BLOCK_N * stride_vn
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ,       # dq laid out like q (own strides)
    Alibi, CuQ, CuK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh, stride_lm,
    stride_ab, stride_ah,
    Nq, Nk, qk_scale, softcap2, sm_scale, win_left, win_right, tune_key,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program = BLOCK_M queries of one (batch, query head). Grid (cdiv(max Nq, BLOCK_M), Hq, B).
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
    tok = q_start + m0
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < seqlen_q
    io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = _load(Q + b64 * stride_qb + h64 * stride_qh + tok * stride_qm
              + offs_m[:, None] * stride_qm + offs_d[None, :], io_mask, True, UPCAST)
    do = _load(DO + b64 * stride_dob + h64 * stride_doh + tok * stride_dom
               + offs_m[:, None] * stride_dom + offs_d[None, :], io_mask, True, UPCAST)
    l_rows = b64 * stride_lb + h64 * stride_lh + (tok + offs_m) * stride_lm
    lse = tl.load(Lse + l_rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * K_LOG2E
    delta = tl.load(Delta + l_rows, mask=row_ok, other=0.0)
    K_head = K + b64 * stride_kb + hk64 * stride_kh + k_start * stride_kn
    V_head = V + b64 * stride_vb + hk64 * stride_vh + k_start * stride_vn
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b64 * stride_ab + h64 * stride_ah) * K_LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = _key_range(m0, m_last, seqlen_k, off, win_left, win_right, BLOCK_N,
                                          MASK_LEFT, MASK_RIGHT)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, rows, offs_n, offs_d, lo, full_lo, seqlen_k, off,
                   qk_scale, softcap2, slope2, win_left, win_right, stride_kn, stride_vn, True, EVEN_D, HEAD_DIM,
                   BLOCK_N, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, UPCAST)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, rows, offs_n, offs_d, full_lo, full_hi, seqlen_k, off,
                   qk_scale, softcap2, slope2, win_left, win_right, stride_kn, stride_vn, False, EVEN_D, HEAD_DIM,
                   BLOCK_N, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, UPCAST)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, rows, offs_n, offs_d, full_hi, hi, seqlen_k, off,
                   qk_scale, softcap2, slope2, win_left, win_right, stride_kn, stride_vn, True, EVEN_D, HEAD_DIM,
                   BLOCK_N, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + tok * stride_dqm
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _zero_tail(X, Y, Lse, Cu, n_seqs, total, n_heads,
               stride_xt, stride_xh, stride_yt, stride_yh, stride_lh, stride_lt,
               HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
               HAS_Y: tl.constexpr, HAS_LSE: tl.constexpr):
    """Packed tokens before cu[0] or from cu[n_seqs] on belong to no sequence: X (and Y) rows 0, Lse -inf.
    Grid (cdiv(total, BLOCK_T),); programs with nothing to zero return at once."""
    t0 = tl.program_id(0) * BLOCK_T
    head = tl.load(Cu)
    tail = tl.load(Cu + n_seqs)
    if (t0 >= head) & (t0 + BLOCK_T <= tail):
        return
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    toks = t0 + offs_t
    t_ok = ((toks < head) | (toks >= tail)) & (toks < total)
    mask = t_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    t64 = toks.to(tl.int64)
    zeros = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for h in range(n_heads):
        tl.store(X + t64[:, None] * stride_xt + h * stride_xh + offs_d[None, :],
                 zeros.to(X.dtype.element_ty), mask=mask)
        if HAS_Y:
            tl.store(Y + t64[:, None] * stride_yt + h * stride_yh + offs_d[None, :],
                     zeros.to(Y.dtype.element_ty), mask=mask)
        if HAS_LSE:
            tl.store(Lse + h * stride_lh + t64 * stride_lt, tl.full([BLOCK_T], float("-inf"), tl.float32),
                     mask=t_ok)
