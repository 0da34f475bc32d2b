"""Flash attention in Triton, part 2: the backward kernels (notation in attention_fwd.py).

* ``_attn_bwd_preprocess``: delta = rowsum(dO * O) (minus dLSE when the log-sum-exp itself receives a
  gradient: d lse / d s = p, so it folds into the same term).
* ``_attn_bwd_dkdv``: one program per BLOCK_N keys of one KV head; it loops over the query heads of its
  GQA group and over the query tiles that see these keys, accumulating dK and dV in registers. With
  ``ATOMIC_DQ`` (the default, non-deterministic backward) it also adds each tile pair's dS K into a zeroed
  fp32 dQ accumulator with atomic adds, so S, P, dP and dS are computed once per tile pair: 5 products
  (S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q, dQ^T += K^T dS^T);
  ``_attn_bwd_dq_convert`` then writes dq = accumulator * scale in the inputs' dtype.
* ``_attn_bwd_dq`` (deterministic backward): one program per BLOCK_M queries of one query head, looping over
  the visible keys; it recomputes S, P, dP and dS (7 products per tile pair in all).

Without ``ATOMIC_DQ`` no program writes what another writes and there are no atomics, so gradients are
bit-identical from run to run. With it, the order of the fp32 adds into a dQ row varies between runs (dq may
differ in its last bits); dk and dv are still written by one program each. P is recomputed from the stored
log-sum-exp; a row that saw no key (lse = -inf) is treated as lse = +inf, so its P, and its gradients, are
exactly 0. Dropout (``HAS_DROPOUT``, flash-attn 2's derivation): with Z the keep mask of the forward
(regenerated from the same counters, ``dropout_keep``) and r = 1 / (1 - p), dV = (P o Z r)^T dO and
dS = P o (Z r o dP - delta), where dP = dO V^T and delta = rowsum(dO o O) with O the dropped output (equal to
rowsum(P o Z r o dP)).

``LOCAL_DELTA`` (the dK/dV kernel without ATOMIC_DQ and the dQ kernel, when every sequence's keys fit their one
key tile): delta is taken from the tile itself, delta = rowsum(P o dP) - dlse, and dS = P o (dP rowsum(P) -
delta), the softmax gradient of P normalised by its own row sum (what PyTorch's softmax backward computes from
its output). Equal to the form above in exact arithmetic; in fp32 it does not leave the rounding difference of
two summation orders of dO . V (dP from the product, rowsum(dO o O) from the preprocess) in dS: with one key,
P = 1 and the true dS, dK, dQ are exactly 0, and so are these. ``_zero_tail`` writes the outputs of packed varlen
tokens past ``cu_seqlens[-1]`` (out/grads 0, lse -inf).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._device import K_LOG2E, dropout_keep, tanh
from .attention_fwd import _key_range, _load, _round_to, _scores, _seq_info, _visible, dropout_state


@triton.jit
def _attn_bwd_preprocess(
    Out, DO, DLse, Delta, CuQ,          # delta has lse's layout; dlse (HAS_DLSE) its own strides
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh, stride_lm,
    stride_glb, stride_glh, stride_glm,
    Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr, LOCAL_DELTA: tl.constexpr,
):
    """delta = rowsum(dO o O) - dlse; with LOCAL_DELTA only -dlse (the gradient kernels add the row sum)."""
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
    if LOCAL_DELTA:
        delta = tl.zeros([BLOCK_M], tl.float32)
    else:
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
    """[lo, hi): the query tiles (lo a multiple of BLOCK_M) that see any of the keys n0..n_last."""
    lo = n0 * 0
    hi = seqlen_q
    if MASK_RIGHT:   # j <= i + off + right  <=>  i >= j - off - right
        lo = tl.maximum(n0 - off - win_right, 0)
    if MASK_LEFT:    # j >= i + off - left   <=>  i <= j - off + left
        hi = tl.minimum(n_last - off + win_left + 1, seqlen_q)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q_head, DO_head, L_head, D_head, DQ_head, n0, cols, offs_m, offs_d, lo, hi,
                seqlen_q, seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right,
                stride_qm, stride_dom, stride_lm, stride_dqm, seed, offset, bh, drop_thr, drop_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, UPCAST: tl.constexpr,
                LOCAL_DELTA: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles lo, lo+BLOCK_M, ... < hi of one query head;
    ATOMIC_DQ: also add each tile's (dS K)^T = K^T dS^T into the fp32 dQ accumulator.

    Works on transposed tiles (keys are rows: S^T, P^T, dP^T, dS^T are [BLOCK_N, BLOCK_M]), so P^T and dS^T
    feed the dV and dK products straight from registers. Register budget: per-query values (lse, delta)
    span the tile's columns, so they are folded into the accumulators the products start from (S^T starts
    at -lse / scale, dP^T at -delta), and the window test reads per-key offsets against the loop-invariant
    column index; one loop for every tile (the window test is a compare and a select per element) keeps
    fewer values live than separate masked and unmasked loops. Keys past the sequence (zero rows of K, V)
    have P clamped to <= 1 (exp2 of min(s, 0); every real P is <= 1 already), so their dS stays finite and
    their zero K rows add nothing to dQ; their dK, dV rows are never stored."""
    q_offs = offs_m[:, None] * stride_qm + offs_d[None, :]       # Q tile [BLOCK_M, BLOCK_D]
    do_offs = offs_m[:, None] * stride_dom + offs_d[None, :]     # dO tile [BLOCK_M, BLOCK_D]
    Q_tile = Q_head + lo.to(tl.int64) * stride_qm               # scalar 64-bit tile pointers
    DO_tile = DO_head + lo.to(tl.int64) * stride_dom
    if ATOMIC_DQ:
        dqt_offs = offs_d[:, None] + offs_m[None, :] * stride_dqm    # dQ^T tile [BLOCK_D, BLOCK_M]
        DQ_tile = DQ_head + lo.to(tl.int64) * stride_dqm
    d_ok = offs_d < HEAD_DIM
    for m0 in range(lo, hi, BLOCK_M):
        row_ok = offs_m < seqlen_q - m0
        io_mask = row_ok[:, None] & d_ok[None, :]
        q = _load(Q_tile + q_offs, io_mask, True, UPCAST)
        do = _load(DO_tile + do_offs, io_mask, True, UPCAST)
        rows = m0 + offs_m
        lse = tl.load(L_head + rows * stride_lm, mask=row_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * K_LOG2E   # empty / padded rows: P = 0
        delta = tl.load(D_head + rows * stride_lm, mask=row_ok, other=0.0)
        if HAS_DROPOUT:          # keep mask Z^T [BLOCK_N, BLOCK_M]; dP^T o Z r - delta
            keep = tl.trans(dropout_keep(seed, offset, bh, rows, n0, drop_thr, BLOCK_M, BLOCK_N))
            dpt = tl.where(keep, tl.dot(v, tl.trans(do)) * drop_scale, 0.0)
            if not LOCAL_DELTA:
                dpt = dpt - delta[None, :]
        elif LOCAL_DELTA:
            dpt = tl.dot(v, tl.trans(do))                                                        # dP^T
        else:
            dpt = tl.dot(v, tl.trans(do), tl.broadcast_to(-delta[None, :], (BLOCK_N, BLOCK_M)))  # dP^T - delta
        rel = cols - off - m0    # key j, query m0 + i: i + off - j = offs_m - rel
        if HAS_SOFTCAP:
            init = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        else:
            init = tl.broadcast_to(-lse2[None, :] / qk_scale, (BLOCK_N, BLOCK_M))
        if MASK_RIGHT:           # j <= i + off + right
            init = tl.where((rel - win_right)[:, None] <= offs_m[None, :], init, float("-inf"))
        if MASK_LEFT:            # j >= i + off - left
            init = tl.where((rel + win_left)[:, None] >= offs_m[None, :], init, float("-inf"))
        qkt = tl.dot(k, tl.trans(q), init)                    # S^T (minus lse), -inf outside the window
        if HAS_SOFTCAP:
            tt = tanh(qkt * qk_scale)
            st = tt * softcap2 - lse2[None, :]
            if MASK_LEFT or MASK_RIGHT:
                st = tl.where(qkt == float("-inf"), float("-inf"), st)
        else:
            st = qkt * qk_scale
        if HAS_ALIBI:
            st = st - slope2 * tl.abs((offs_m[None, :] - rel[:, None]).to(tl.float32))
        pt = tl.math.exp2(tl.minimum(st, 0.0))                              # P^T
        if LOCAL_DELTA:          # this tile holds every key of the rows: delta and rowsum(P) from it
            pt = tl.where((cols < seqlen_k)[:, None], pt, 0.0)
            delta_t = tl.sum(pt * dpt, 0) + delta
            dpt = dpt * tl.sum(pt, 0)[None, :] - delta_t[None, :]
        if HAS_DROPOUT:
            pt16 = _round_to(tl.where(keep, pt * drop_scale, 0.0), DO_head.dtype.element_ty, UPCAST)
        else:
            pt16 = _round_to(pt, DO_head.dtype.element_ty, UPCAST)
        if HAS_SOFTCAP:
            pt = pt * (1.0 - tt * tt)
        dst = _round_to(pt * dpt, Q_head.dtype.element_ty, UPCAST)          # dS^T
        dv = tl.dot(pt16, do, dv)                                           # P^T dO
        dk = tl.dot(dst, q, dk)                                             # dS^T Q
        if ATOMIC_DQ:
            dqt = tl.dot(tl.trans(k), dst)                                  # (dS K)^T = K^T dS^T
            tl.atomic_add(DQ_tile + dqt_offs, dqt, sem="relaxed")   # no mask: DQAcc is padded (see kernel)
            DQ_tile += BLOCK_M * stride_dqm
        Q_tile += BLOCK_M * stride_qm
        DO_tile += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV,   # dk/dv laid out like k/v (own strides); delta like lse
    DQAcc,                             # ATOMIC_DQ: zeroed fp32 dQ accumulator, [B, Nq + BLOCK_M, Hq, BLOCK_D] or
                                       # [Tq + BLOCK_M, Hq, BLOCK_D] (varlen): padded so tiles add unmasked
    Alibi, CuQ, CuK, RngState,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_dqab, stride_dqam, stride_dqah,
    stride_lb, stride_lh, stride_lm,
    stride_ab, stride_ah,
    Nq, Nk, qk_scale, softcap2, sm_scale, win_left, win_right, drop_thr, drop_scale, tune_key,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    UPCAST: tl.constexpr, LOCAL_DELTA: tl.constexpr,
):
    """One program = BLOCK_N keys of one (batch, KV head). Grid (cdiv(max Nk, BLOCK_N), Hkv, B).
    ATOMIC_DQ: the program also adds dS K of every tile pair it visits into DQAcc (unscaled). A tile's rows
    past its sequence (and columns past HEAD_DIM) add exact zeros (their dS and K columns are 0), into the
    padding or the next packed sequence, so the adds need no mask."""
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
    lo, hi = _query_range(n0, n_last, seqlen_q, off, win_left, win_right, BLOCK_M, MASK_LEFT, MASK_RIGHT)
    slope2 = 0.0
    seed, offset = dropout_state(RngState, HAS_DROPOUT)
    for g in range(GROUP):  # the query heads sharing this KV head: GQA reduction stays in registers
        h64 = hk64 * GROUP + g
        bh = b * (tl.num_programs(1) * GROUP) + hk * GROUP + g
        Q_head = Q + b64 * stride_qb + h64 * stride_qh + q_start * stride_qm
        DO_head = DO + b64 * stride_dob + h64 * stride_doh + q_start * stride_dom
        L_head = Lse + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        D_head = Delta + b64 * stride_lb + h64 * stride_lh + q_start * stride_lm
        DQ_head = DQAcc + b64 * stride_dqab + h64 * stride_dqah + q_start * stride_dqam
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + b64 * stride_ab + h64 * stride_ah) * K_LOG2E
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_head, DO_head, L_head, D_head, DQ_head, n0, cols, offs_m, offs_d, lo,
                             hi, seqlen_q, seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right,
                             stride_qm, stride_dom, stride_lm, stride_dqam, seed, offset, bh, drop_thr, drop_scale,
                             HEAD_DIM, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                             ATOMIC_DQ, UPCAST, LOCAL_DELTA)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + tok * stride_dkn
             + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + tok * stride_dvn
             + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K_head, V_head, rows, offs_n, offs_d, lo, hi,
              seqlen_k, off, qk_scale, softcap2, slope2, win_left, win_right, stride_kn, stride_vn,
              seed, offset, bh, drop_thr, drop_scale,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, LOCAL_DELTA: tl.constexpr):
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
        if HAS_DROPOUT:   # dP o Z r
            dp = tl.where(dropout_keep(seed, offset, bh, rows, n0, drop_thr, BLOCK_M, BLOCK_N), dp * drop_scale, 0.0)
        if LOCAL_DELTA:   # the rows' only key tile (its padding keys are MASKED: p = 0)
            ds = p * (dp * tl.sum(p, 1)[:, None] - (tl.sum(p * dp, 1) + delta)[:, None])
        else:
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
    Alibi, CuQ, CuK, RngState,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh, stride_lm,
    stride_ab, stride_ah,
    Nq, Nk, qk_scale, softcap2, sm_scale, win_left, win_right, drop_thr, drop_scale, tune_key,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    LOCAL_DELTA: tl.constexpr,
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
    seed, offset = dropout_state(RngState, HAS_DROPOUT)
    bh = b * tl.num_programs(1) + h

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = _key_range(m0, m_last, seqlen_k, off, win_left, win_right, BLOCK_N,
                                          MASK_LEFT, MASK_RIGHT)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, rows, offs_n, offs_d, lo, full_lo, seqlen_k, off,
                   qk_scale, softcap2, slope2, win_left, win_right, stride_kn, stride_vn, seed, offset, bh, drop_thr,
                   drop_scale, True, EVEN_D, HEAD_DIM, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP,
                   HAS_ALIBI, HAS_DROPOUT, UPCAST, LOCAL_DELTA)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, rows, offs_n, offs_d, full_lo, full_hi, seqlen_k, off,
                   qk_scale, softcap2, slope2, win_left, win_right, stride_kn, stride_vn, seed, offset, bh, drop_thr,
                   drop_scale, False, EVEN_D, HEAD_DIM, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP,
                   HAS_ALIBI, HAS_DROPOUT, UPCAST, LOCAL_DELTA)
    dq = _dq_inner(dq, q, do, lse2, delta, K_head, V_head, rows, offs_n, offs_d, full_hi, hi, seqlen_k, off,
                   qk_scale, softcap2, slope2, win_left, win_right, stride_kn, stride_vn, seed, offset, bh, drop_thr,
                   drop_scale, True, EVEN_D, HEAD_DIM, BLOCK_M, BLOCK_N, MASK_LEFT, MASK_RIGHT, HAS_SOFTCAP,
                   HAS_ALIBI, HAS_DROPOUT, UPCAST, LOCAL_DELTA)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + tok * stride_dqm
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _attn_bwd_dq_convert(DQAcc, DQ, n_rows, sm_scale,
                         stride_ab, stride_at, stride_ah, stride_db, stride_dt, stride_dh,
                         HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """DQ[b, t, h, :HEAD_DIM] = DQAcc[b, t, h, :HEAD_DIM] * sm_scale in DQ's dtype for t < n_rows (Nq; varlen:
    Tq with one batch). Grid (cdiv(n_rows, BLOCK_T), heads, batch)."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc = tl.load(DQAcc + b * stride_ab + h * stride_ah + t[:, None] * stride_at + offs_d[None, :], mask=mask,
                  other=0.0)
    tl.store(DQ + b * stride_db + h * stride_dh + t[:, None] * stride_dt + offs_d[None, :],
             (acc * sm_scale).to(DQ.dtype.element_ty), mask=mask)


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
