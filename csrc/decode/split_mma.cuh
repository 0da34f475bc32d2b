// Tensor-core decode kernel (group * Sq > 4 rows per KV head): mma.sync m16n8k16, the query rows of one
// KV head (group heads x Sq queries) as the M dimension.
//
// Block = 4 warps = kWarpsM x (4 / kWarpsM): warp (wm, wn) owns rows 16 wm .. 16 wm + 15 of the block
// (Q fragments from shared memory by ldmatrix) and the 16-key chunks wn, wn + WN, ... of every K/V tile.
// Per chunk: S = Q K^T (D/16 k-steps x 2 n-tiles), mask + online softmax in registers (each lane holds
// rows g and g + 8), P (re-packed from the S accumulators as an A fragment) times V (ldmatrix.trans) into
// the fp32 accumulator [16 x D] of the warp. The WN warps sharing rows each keep their own softmax
// state; merge_and_store() combines them at the end. K/V come through the cp.async pipeline of
// decode/common.cuh: each tile is read from global memory once and serves every row of the block.
// KV: the cache format (KvFormat); an 8-bit cache's tiles arrive dequantized to T (KvPipe::dequant).
#pragma once

#include "decode/common.cuh"

namespace tf::decode {

template <typename T, int D_PAD, int KV>
__global__ void __launch_bounds__(kThreads) decode_mma_kernel(Params p, int warps_m, int m_blocks) {
  using Cfg = TileConfig<D_PAD>;
  using L = SmemLayout<D_PAD, KV>;
  constexpr int kRow = Cfg::kRow, kNt = D_PAD / 8, kKs = D_PAD / 16, kChunks16 = Cfg::kBlockN / 16;
  TF_DYNAMIC_SMEM(unsigned char, smem);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t4 = lane & 3;
  const int rows_blk = 16 * warps_m, warps_n = 4 / warps_m;
  const int wm = warp % warps_m, wn = warp / warps_m;
  const BlockCtx c = block_ctx<Cfg::kBlockN>(p, m_blocks, rows_blk);

  // Q tile [rows_blk][kRow]: zeros past the head dim and for rows past group * Sq.
  T* qs = reinterpret_cast<T*>(smem + L::kQ);
  {
    const gptr<const T> q = gcast<const T>(p.q) + int64_t(c.b) * p.stride_qb;
    for (int e = tid; e < rows_blk * D_PAD; e += kThreads) {
      const int m = e / D_PAD, d = e % D_PAD, row = c.row0 + m;
      T v = from_float<T>(0.f);
      if (row < c.rows && d < p.head_dim)
        v = q[int64_t(row % p.sq) * p.stride_qs + int64_t(c.h_kv * c.group + row / p.sq) * p.stride_qh + d];
      qs[m * kRow + d] = v;
    }
  }
  KvPipe<T, D_PAD, KV> pipe;
  pipe.init(p, c, smem, rows_blk);
  float* ml = reinterpret_cast<float*>(smem + L::ml(rows_blk));

  const ScoreParams sp = score_params(p);
  RowInfo ri[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) ri[r] = row_info(p, c, wm * 16 + g + 8 * r);

  float acc[kNt][4];
#pragma unroll
  for (int j = 0; j < kNt; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m_run[2] = {kNegInf, kNegInf}, l_run[2] = {0.f, 0.f};   // l: this lane's share of the row sum
  const T* q_frag_row = qs + (wm * 16 + (lane % 16)) * kRow + (lane / 16) * 8;   // ldmatrix.x4 A addresses

  run_pipeline(pipe, c.ntiles, [&](int t) {
    const T* kt = pipe.k_tile(t);
    const T* vt = pipe.v_tile(t);
    const int tile_key0 = c.start + t * Cfg::kBlockN;
    const uint64_t tile_mask = pipe.key_mask(t);
    for (int ch = wn; ch < kChunks16; ch += warps_n) {
      const int key0 = tile_key0 + ch * 16;
      if (key0 >= c.end) break;   // warp-uniform: the rest of the tile is past the range
      // Bits 0, 1 (n-tile 0) and 8, 9 (n-tile 1) of `vis`: this lane's keys in the tile's key mask.
      const uint32_t vis = uint32_t(tile_mask >> (ch * 16 + 2 * t4));
      // S = Q K^T for 16 rows x 16 keys.
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      const T* k_rows = kt + (ch * 16 + (lane / 16) * 8 + lane % 8) * kRow + ((lane / 8) & 1) * 8;
#pragma unroll
      for (int kk = 0; kk < kKs; ++kk) {
        uint32_t a[4], bk[4];
        ptx::ldmatrix_x4(a, q_frag_row + kk * 16);
        ptx::ldmatrix_x4(bk, k_rows + kk * 16);
        const uint32_t b0[2] = {bk[0], bk[1]}, b1[2] = {bk[2], bk[3]};
        ptx::mma_m16n8k16<T>(s[0], a, b0, s[0]);
        ptx::mma_m16n8k16<T>(s[1], a, b1, s[1]);
      }
      // Scores (log2 units), masks; s[nt][i] is row g + 8 (i >= 2), key key0 + 8 nt + 2 t4 + (i & 1).
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          s[nt][i] = score(s[nt][i] * sp.qk_scale, sp, ri[i >> 1], key0 + 8 * nt + 2 * t4 + (i & 1),
                           (vis >> (8 * nt + (i & 1))) & 1u);
      // Online softmax: the 4 lanes of a quad share each row.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        const float m_new = fmaxf(m_run[r], mx), ms = safe_max(m_new);
        const float alpha = ptx::ex2_approx(m_run[r] - ms);
        m_run[r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          s[nt][2 * r] = ptx::ex2_approx(s[nt][2 * r] - ms);
          s[nt][2 * r + 1] = ptx::ex2_approx(s[nt][2 * r + 1] - ms);
          sum += s[nt][2 * r] + s[nt][2 * r + 1];
        }
        l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
        for (int j = 0; j < kNt; ++j) {
          acc[j][2 * r] *= alpha;
          acc[j][2 * r + 1] *= alpha;
        }
      }
      // P (16 x 16 keys) as an A fragment: a[r] = rows g (+8 for r odd), keys 2 t4 (+8 for r >= 2).
      const uint32_t pa[4] = {ptx::pack2<T>(s[0][0], s[0][1]), ptx::pack2<T>(s[0][2], s[0][3]),
                              ptx::pack2<T>(s[1][0], s[1][1]), ptx::pack2<T>(s[1][2], s[1][3])};
      // O += P V: ldmatrix.x4.trans gives the B fragments of two 8-wide d tiles per 16 d.
      const T* v_rows = vt + (ch * 16 + ((lane / 8) & 1) * 8 + lane % 8) * kRow + (lane / 16) * 8;
#pragma unroll
      for (int nd = 0; nd < kKs; ++nd) {
        uint32_t bv[4];
        ptx::ldmatrix_x4_trans(bv, v_rows + nd * 16);
        const uint32_t b0[2] = {bv[0], bv[1]}, b1[2] = {bv[2], bv[3]};
        ptx::mma_m16n8k16<T>(acc[2 * nd], pa, b0, acc[2 * nd]);
        ptx::mma_m16n8k16<T>(acc[2 * nd + 1], pa, b1, acc[2 * nd + 1]);
      }
    }
  });

  // Partial states of the warps into shared memory (the K/V stages are free now), then merge.
  float* buf = reinterpret_cast<float*>(smem + L::kK);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(kFullMask, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(kFullMask, l_run[r], 2);
    const int m = wm * 16 + g + 8 * r, slot = wn * rows_blk + m;
    if (t4 == 0) {
      ml[slot * 2] = m_run[r];
      ml[slot * 2 + 1] = l_run[r];
    }
#pragma unroll
    for (int j = 0; j < kNt; ++j) {
      buf[slot * D_PAD + 8 * j + 2 * t4] = acc[j][2 * r];
      buf[slot * D_PAD + 8 * j + 2 * t4 + 1] = acc[j][2 * r + 1];
    }
  }
  __syncthreads();
  merge_and_store<T, D_PAD>(p, c, buf, ml, warps_n, rows_blk);
}

}  // namespace tf::decode
