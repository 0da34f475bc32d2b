// Flash attention forward (FA2 scheme on mma.sync m16n8k16), notation in attention/common.cuh.
//
// One block = BM = 16 * NWARPS query rows of one (batch, query head); warp w owns rows 16w..16w+15.
// Q is staged once in shared memory (with QREG its fragments then move into registers); K/V tiles of BN
// keys are double-buffered with cp.async (tile i + 1 streams in while tile i is multiplied). Per key tile and warp: S = Q K^T (A fragments of Q and B fragments
// of K by ldmatrix), scores scaled into the log2 domain (softcap, ALiBi; the band mask only on the tiles that
// cross its edges), online softmax in registers (row max / sum over the quad with shuffles, exp2), P rounded
// to T in registers and fed straight into O += P V (V fragments by ldmatrix .trans). O is normalised once
// at the end, staged through the warp's rows of the Q tile and written with 16-byte stores.
// DROPOUT (a template flag: the kernels without it are unchanged): after the row sums (which stay the undropped
// ones, so lse is too) the dropped elements of P are zeroed (the keep bits of row_keep, common.cuh) and O is
// scaled by drop_scale / l at the end.
#pragma once

#include "attention/common.cuh"

namespace tf::attention {

template <int D, int BM, int BN>
constexpr size_t fwd_smem_bytes() {
  return size_t(BM + 4 * BN) * (D + 8) * 2;   // Q + 2 x (K, V), 16-bit elements
}

// One key tile for one warp: S = Q K^T, softmax update, O += P V.
// QREG: the warp's Q fragments (all D / 16 k-steps) are held in registers, qf, loaded once per block, so S = Q K^T
// reads only K from shared memory (one ldmatrix.x4 per two mma instead of three per four); else (large D,
// where they do not fit) they are reloaded from the Q tile at every k-step.
template <bool MASKED, bool QREG, bool DROPOUT, typename T, int D, int BN>
TF_DEVICE void fwd_tile(const Params& p, const SeqInfo& si, const Scale& sc, const Dropout& dr, const T* sQw,
                        const uint32_t (&qf)[QREG ? D / 16 : 1][4], const T* sKb, const T* sVb, int n0, int row_lo,
                        float (&m_i)[2], float (&l_i)[2], float (&o)[D / 8][4], int lane) {
  constexpr int SD = D + 8;
  const int t = lane & 3;
  float s[BN / 8][4];
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) s[j][i] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    if constexpr (QREG) {
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = qf[kk][i];
    } else {
      ldm_a<SD>(a, sQw, 0, 16 * kk, lane);
    }
#pragma unroll
    for (int jj = 0; jj < BN / 16; ++jj) {
      uint32_t b[4];
      ldm_bt<SD>(b, sKb, 16 * jj, 16 * kk, lane);
      mma2<T>(s[2 * jj], s[2 * jj + 1], a, b);
    }
  }
  // Scores (log2 domain), masked where the tile crosses the band, and the row max.
  float mx[2] = {m_i[0], m_i[1]};
  const Band band[2] = {keys_of_query(p, si, row_lo), keys_of_query(p, si, row_lo + 8)};   // used if MASKED
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row_lo + (i >= 2 ? 8 : 0), col = n0 + 8 * j + 2 * t + (i & 1);
      float unused;
      float x = score(s[j][i], sc, row, col, si.off, unused);
      if (MASKED && !band[i >> 1].has(col)) x = -INFINITY;
      s[j][i] = x;
      mx[i >> 1] = fmaxf(mx[i >> 1], x);
    }
  float alpha[2], m_use[2];
  online_max_step(mx, m_i, alpha, m_use);
  float rs[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[j][i] = ptx::ex2_approx(s[j][i] - m_use[i >> 1]);
      rs[i >> 1] += s[j][i];
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) l_i[r] = l_i[r] * alpha[r] + rs[r];   // per-thread partial sums (quad-reduced at the end)
  if constexpr (DROPOUT) {   // P o keep (the 1 / (1 - p) is applied to O at the end)
    const RowKeep<BN> keep = row_keep<BN>(dr, n0, row_lo, lane);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (!keep.keep(j, i, t)) s[j][i] = 0.f;
  }
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    o[j][0] *= alpha[0];
    o[j][1] *= alpha[0];
    o[j][2] *= alpha[1];
    o[j][3] *= alpha[1];
  }
  // O += P V: P from registers, V fragments with ldmatrix .trans (V is [key][d] = B[k][n]).
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      ldm_b_trans<SD>(b, sVb, 16 * kk, 16 * dd, lane);
      mma2<T>(o[2 * dd], o[2 * dd + 1], a, b);
    }
  }
}

template <typename T, int D, int BM, int BN, int NWARPS, bool QREG, bool DROPOUT = false>
__global__ void __launch_bounds__(NWARPS * 32) attn_fwd_kernel(const Params p) {
  static_assert(BM == 16 * NWARPS && BN % 16 == 0 && D % 16 == 0, "tile shapes");
  constexpr int SD = D + 8, NT = NWARPS * 32;
  TF_DYNAMIC_SMEM(T, smem);
  T* sQ = smem;                 // [BM][SD]
  T* sK = sQ + BM * SD;         // [2][BN][SD]
  T* sV = sK + 2 * BN * SD;     // [2][BN][SD]

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const SeqInfo si = seq_info(p, b);
  if (m0 >= si.rows_q) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t b64 = p.varlen ? 0 : b, hk = h / p.group;
  const gptr<const T> Q = gcast<const T>(p.q) + b64 * p.stride_qb + h * p.stride_qh + (si.q_start + m0) * p.stride_qm;
  const gptr<const T> K = gcast<const T>(p.k) + b64 * p.stride_kb + hk * p.stride_kh + si.k_start * p.stride_kn;
  const gptr<const T> V = gcast<const T>(p.v) + b64 * p.stride_vb + hk * p.stride_vh + si.k_start * p.stride_vn;
  const Scale sc = make_scale(p, b, h);
  Dropout dr{};
  if constexpr (DROPOUT) dr = make_dropout(p, b, h);

  const int m_last = imin(m0 + BM, si.rows_q) - 1;
  const Range kr = key_range(p, si, m0, m_last, BN);
  const int n_tiles = (kr.hi - kr.lo + BN - 1) / BN;

  load_tile<BM, D, NT>(sQ, Q, p.stride_qm, si.rows_q - m0, p.head_dim, tid);
  ptx::cp_async_commit();   // Q alone in the first group: QREG waits for it while the first K/V tile streams in
  if (n_tiles > 0) {
    load_tile<BN, D, NT>(sK, K + int64_t(kr.lo) * p.stride_kn, p.stride_kn, si.seqlen_k - kr.lo, p.head_dim, tid);
    load_tile<BN, D, NT>(sV, V + int64_t(kr.lo) * p.stride_vn, p.stride_vn, si.seqlen_k - kr.lo, p.head_dim, tid);
  }
  ptx::cp_async_commit();

  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[j][i] = 0.f;
  const int row_lo = m0 + 16 * warp + (lane >> 2);
  const T* sQw = sQ + 16 * warp * SD;
  const bool active = m0 + 16 * warp < si.rows_q;   // warp-uniform
  uint32_t qf[QREG ? D / 16 : 1][4];
  if constexpr (QREG) {
    ptx::cp_async_wait<1>();   // the Q group has landed (the K/V tile after it may still be in flight)
    __syncthreads();           // ... for every thread's share of the tile
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldm_a<SD>(qf[kk], sQw, 0, 16 * kk, lane);
  }

  for (int it = 0; it < n_tiles; ++it) {
    const int n0 = kr.lo + it * BN, buf = it & 1;
    if (it + 1 < n_tiles) {   // prefetch the next tile into the other buffer (freed by the last barrier)
      const int n1 = n0 + BN, nb = buf ^ 1;
      load_tile<BN, D, NT>(sK + nb * BN * SD, K + int64_t(n1) * p.stride_kn, p.stride_kn, si.seqlen_k - n1,
                           p.head_dim, tid);
      load_tile<BN, D, NT>(sV + nb * BN * SD, V + int64_t(n1) * p.stride_vn, p.stride_vn, si.seqlen_k - n1,
                           p.head_dim, tid);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKb = sK + buf * BN * SD;
    const T* sVb = sV + buf * BN * SD;
    if (!active) {   // every row of this warp lies past the sequence: it only helps load and synchronise
    } else if (n0 < kr.full_lo || n0 >= kr.full_hi) {
      fwd_tile<true, QREG, DROPOUT, T, D, BN>(p, si, sc, dr, sQw, qf, sKb, sVb, n0, row_lo, m_i, l_i, o, lane);
    } else {
      fwd_tile<false, QREG, DROPOUT, T, D, BN>(p, si, sc, dr, sQw, qf, sKb, sVb, n0, row_lo, m_i, l_i, o, lane);
    }
    __syncthreads();
  }
  ptx::cp_async_wait<0>();   // no tile at all: the Q copies must land before the epilogue reuses sQ
  __syncthreads();

  // Epilogue: normalise once; a row that saw no key has l = 0 -> out 0, lse -inf (never NaN).
  float inv[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_i[r];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    inv[r] = l > 0.f ? (DROPOUT ? p.drop_scale : 1.f) / l : 0.f;
    lse[r] = l > 0.f ? (m_i[r] + __log2f(l)) * kLn2 : -INFINITY;
  }
  T* sOw = const_cast<T*>(sQw);   // this warp's 16 rows of the Q tile, read only by this warp
  acc_to_smem<D, SD, T>(sOw, o, inv[0], inv[1], lane);
  __syncwarp();
  const int rows_left = si.rows_q - m0 - 16 * warp;
  const gptr<T> O = gcast<T>(p.out) + b64 * p.stride_ob + h * p.stride_oh +
                    (si.q_start + m0 + 16 * warp) * p.stride_om;
  store_rows16<D, SD, T>(O, p.stride_om, sOw, rows_left, p.head_dim, lane);
  if ((lane & 3) == 0) {
    // lse [B, Hq, Nq] or varlen [Hq, Tq], contiguous
    const gptr<float> L = p.lse + (p.varlen ? h * p.total_q + si.q_start : (int64_t(b) * p.hq + h) * p.max_q);
    const int r = row_lo - m0 - 16 * warp;   // = g
    if (r < rows_left) L[row_lo] = lse[0];
    if (r + 8 < rows_left) L[row_lo + 8] = lse[1];
  }
}

}  // namespace tf::attention
