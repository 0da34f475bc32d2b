// Flash attention forward for Hopper (sm_90a): wgmma + TMA + mbarrier, warp-specialised. Notation and the
// mask / score helpers (key_range, keys_of_query, score) in attention/common.cuh; the same semantics as the
// sm_80 kernel (attention/fwd.cuh).
//
// One block = BM = 128 query rows of one (batch, query head), 3 warpgroups (384 threads):
//   warpgroup 0, the producer (setmaxnreg.dec): thread 0 loads the Q tile once, then the K and V tiles of BN keys
//     into two rings of S stages (K_j and V_j in stage j % S), all by 4-D TMA ([B][N][H][D] tensor maps; varlen:
//     [1][total][H][D], the row coordinate offset by the sequence start; rows past the tensor and columns past
//     head_dim arrive as zeros), in the order the consumers use them: K_0, K_1, V_0, K_2, V_1, ..., V_{n-1}.
//     A K (V) stage is refilled after its `empty_k` (`empty_v`) mbarrier completed (every consumer thread
//     arrived) and signals its `full_k` (`full_v`) mbarrier with the transaction bytes of the tile.
//   warpgroups 1 and 2, the consumers (setmaxnreg.inc): warpgroup c owns query rows 64(c-1) .. 64(c-1)+63. For key
//     tile j: S_j = Q K_j^T by wgmma m64nBNk16 with both operands in shared memory (K-major descriptors); scores in
//     the log2 domain (softcap, ALiBi; the band mask only on the tiles that cross its edges), online softmax in
//     registers (row max / sum over the quad with shuffles, exp2); P_j rounded to T in registers is the register
//     A operand of wgmma m64nDk16 for O = alpha O + P_j V_j (V in shared memory through an MN-major descriptor).
//     Schedule (FlashAttention-3's): in its turn for tile j a consumer issues S_j (one commit group), then
//     rescales O and issues P_{j-1} V_{j-1} (a second group), hands the turn to the other consumer, waits for
//     S_j only (wgmma.wait_group 1: K_j's stage is released) and runs the softmax of tile j while P_{j-1} V_{j-1}
//     is in flight, then waits for it (wait_group 0: V_{j-1}'s stage is released) and packs P_j. P_{n-1} V_{n-1}
//     follows the loop. The turns (named barriers 1 and 2, bar.sync by the warpgroup whose turn it is + bar.arrive
//     by the other, 256 threads) alternate the consumers' wgmma issues, so one consumer's softmax runs while the
//     tensor cores work on the other's products.
//   Varlen: the rows of a tile past the sequence are the next sequence's tokens. Query rows there only make
//   rows that are never stored; key rows get -inf scores (the band ends at the sequence end); V rows there are
//   zeroed in shared memory before P V (zero_tile_rows: 0 * inf or NaN would be NaN).
//   Epilogue: O normalised once, staged (128-byte swizzled, as Q) in the warpgroup's own rows of the Q tile and
//   written with 16-byte stores of the rows < rows_q; lse per row.
// Shared memory (dynamic, from a 1024-byte boundary), every tile 128-byte swizzled as [D / 64][rows][64]
// (one 128-byte row per 64 elements): Q [D/64][BM][64], K [S][D/64][BN][64], V [S][D/64][BN][64]. The mbarriers
// are static __shared__.
#pragma once

#include "attention/common.cuh"
#include "common/ptx_sm90.cuh"
#include "common/tma.h"

#if defined(TILEFORMER_EMULATE) || defined(TF_SM90A)
#define TF_ATTN_SM90_BODY 1
#endif

namespace tf::attention {

// Tile shapes of the sm_90a forward (head dims 64, 128, 256). Shared memory (fwd_sm90_smem_bytes): 81 KB at D = 64,
// 161 KB at 128, 193 KB at 256 (64-key tiles: the 256-column O accumulator takes 128 registers per thread).
template <int D>
struct Sm90FwdTiles {
  static_assert(D == 64 || D == 128 || D == 256, "the sm_90a forward is built for head dims 64, 128 and 256");
  static constexpr int kM = 128;                  // query rows per block (2 consumer warpgroups x 64)
  static constexpr int kN = D <= 128 ? 128 : 64;  // keys per K / V tile (the N of S = Q K^T)
  static constexpr int kStages = 2;       // K / V ring
  static constexpr int kThreads = 384;    // producer warpgroup + 2 consumer warpgroups
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;   // 128 * 24 + 256 * 240 <= 65536
};

constexpr int kSm90Chunk = 64;   // elements of one 128-byte swizzled row
constexpr int kSm90TurnBarrier = 1;   // named barriers 1, 2: the turns of consumer warpgroups 0, 1

template <int D, int BM, int BN, int S>
constexpr size_t fwd_sm90_smem_bytes() {
  return 1024 + size_t(BM + 2 * S * BN) * D * 2;   // alignment slack + Q + S x (K, V), 16-bit elements
}

// Byte offset of element (row, col) in a 128-byte-swizzled tile [D / 64][rows][64] starting at a 1024-byte
// boundary (the swizzle XORs bits 4-6 with bits 7-9: 16-byte chunks stay whole).
TF_DEVICE uint32_t sw128_offset(int rows, int row, int col) {
  const uint32_t off = uint32_t(col / kSm90Chunk) * uint32_t(rows) * 128 + uint32_t(row) * 128 + uint32_t(col % kSm90Chunk) * 2;
  return swizzle_addr(off, Swizzle::b128);
}

// Rows [valid, ROWS) of a [D / 64][ROWS][64] tile (128-byte rows) set to 0 by 256 threads (thread = 0 .. 255 among
// them), the writes ordered before the wgmmas' reads (fence.proxy.async), then the 256 meet on the mbarrier `done`
// (256 arrivals; `phase`: how many phases of `done` completed before). Whole 128-byte rows: the swizzle moves
// 16-byte chunks within a row. Varlen: rows of a tile past its sequence hold the next tokens (TMA zero-fills only
// past the tensor's end); their probabilities are 0, but 0 * inf or NaN is NaN in a product, so the kernels zero
// them (as the sm_80 kernels' cp.async zero fill).
template <int D, int ROWS>
TF_DEVICE void zero_tile_rows(void* tile, int valid, int thread, uint64_t* done, uint32_t phase) {
  constexpr int C = D / kSm90Chunk;
  const int per_chunk = (ROWS - valid) * 8;   // 16-byte pieces of the rows to zero in one 64-column chunk
  unsigned char* base = static_cast<unsigned char*>(tile);
  for (int e = thread; e < C * per_chunk; e += 256) {
    const int c = e / per_chunk, r = valid + (e % per_chunk) / 8, piece = e % 8;
    *reinterpret_cast<uint4*>(base + (c * ROWS + r) * 128 + piece * 16) = uint4{0u, 0u, 0u, 0u};
  }
  ptx::fence_proxy_async_shared();
  ptx::mbarrier_arrive(done);
  ptx::mbarrier_wait(done, phase & 1u);
}

// Scores of one key tile (log2 domain), masked where the tile crosses the band (or the sequence end), then the
// online softmax step: m_i / l_i updated, alpha = the factor for O, sacc = the probabilities P (fp32).
// sacc[4j + i] = S[row_lo + 8 (i >= 2)][n0 + 8j + 2t + (i & 1)].
template <int BN>
TF_DEVICE void softmax_tile(float (&sacc)[BN / 2], const SeqInfo& si, const Range& kr, const Scale& sc,
                            const Band (&band)[2], int row_lo, int n0, int t, float (&m_i)[2], float (&l_i)[2],
                            float (&alpha)[2]) {
  const bool masked = n0 < kr.full_lo || n0 >= kr.full_hi;
  float mx[2] = {m_i[0], m_i[1]};
#pragma unroll
  for (int r = 0; r < BN / 2; ++r) {
    const int i = r & 3, row = row_lo + (i >= 2 ? 8 : 0), col = n0 + 8 * (r >> 2) + 2 * t + (i & 1);
    float unused;
    float x = score(sacc[r], sc, row, col, si.off, unused);
    if (masked && !band[i >> 1].has(col)) x = -INFINITY;
    sacc[r] = x;
    mx[i >> 1] = fmaxf(mx[i >> 1], x);
  }
  float m_use[2];
  online_max_step(mx, m_i, alpha, m_use);
  float rs[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < BN / 2; ++r) {
    sacc[r] = ptx::ex2_approx(sacc[r] - m_use[(r & 3) >> 1]);
    rs[(r & 3) >> 1] += sacc[r];
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) l_i[r] = l_i[r] * alpha[r] + rs[r];   // per-thread partial sums (quad-reduced at the end)
}

// S = Q K^T for one key tile: D / 16 k-steps, both operands in shared memory, one commit group (not waited for).
template <typename T, int D, int BM, int BN>
TF_DEVICE void issue_qk(float (&sacc)[BN / 2], uint32_t q_addr, uint32_t k_addr) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ptx::wgmma_ss<T, BN, 0, 0>(sacc, ptx::desc_k_major(q_addr, BM, 16 * kk, Swizzle::b128),
                               ptx::desc_k_major(k_addr, BN, 16 * kk, Swizzle::b128), kk > 0 ? 1 : 0);
  ptx::wgmma_commit();
}

// O = alpha O + P V for one key tile: O rescaled in registers, then BN / 16 k-steps with P as the register A operand
// and V [key][d] as the MN-major B operand, one commit group (not waited for). O must not be in flight.
template <typename T, int D, int BN>
TF_DEVICE void issue_pv(float (&o)[D / 2], const uint32_t (&pa)[BN / 16][4], const float (&alpha)[2],
                        uint32_t v_addr) {
  ptx::fence_operand(o);
#pragma unroll
  for (int r = 0; r < D / 2; ++r) o[r] *= alpha[(r & 3) >> 1];
  ptx::fence_operand(o);
  ptx::wgmma_fence();   // O was written since the last fence
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
    ptx::wgmma_rs<T, D, 1>(o, pa[kk], ptx::desc_mn_major(v_addr, BN, 16 * kk, Swizzle::b128), 1);
  ptx::wgmma_commit();
}

// Keeps nvcc from moving accesses of the P fragments across the wgmma issue / wait that use them.
template <int R>
TF_DEVICE void fence_fragments(uint32_t (&pa)[R][4]) {
#ifndef TILEFORMER_EMULATE
#pragma unroll
  for (int k = 0; k < R; ++k)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(pa[k][r])::"memory");
#else
  (void)pa;
#endif
}

// P (fp32, sacc) as wgmma A fragments: k-step kk covers keys 16kk .. 16kk+15 = accumulators 8kk .. 8kk+7.
template <typename T, int BN>
TF_DEVICE void pack_p(uint32_t (&pa)[BN / 16][4], const float (&sacc)[BN / 2]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) pa[kk][r] = ptx::pack2<T>(sacc[8 * kk + 2 * r], sacc[8 * kk + 2 * r + 1]);
}

// One consumer warpgroup: rows m0 + 64 cw .. of the block; see the file comment.
template <typename T, int D, int BM, int BN, int S>
TF_DEVICE void fwd_sm90_consumer(const Params& p, const SeqInfo& si, const Range& kr, int n_tiles, int b, int h,
                                 int m0, int cw, T* sQ, T* sK, T* sV, uint64_t* bar_q, uint64_t* full_k,
                                 uint64_t* full_v, uint64_t* empty_k, uint64_t* empty_v, uint64_t* v_zeroed) {
  const int ltid = threadIdx.x % 128, w = ltid / 32, lane = ltid % 32, g = lane >> 2, t = lane & 3;
  const Scale sc = make_scale(p, b, h);
  const int row_lo = m0 + 64 * cw + 16 * w + g;   // this thread's rows: row_lo, row_lo + 8
  const Band band[2] = {keys_of_query(p, si, row_lo), keys_of_query(p, si, row_lo + 8)};
  // A operand: this warpgroup's 64 rows inside each 128-row chunk of Q (8192 bytes in: a multiple of 1024).
  const uint32_t q_addr = ptx::smem_addr(sQ) + uint32_t(64 * cw) * 128;
  // Turns of the two consumer warpgroups (named barriers kSm90TurnBarrier + cw, 256 threads each): warpgroup cw
  // issues its wgmmas of tile it after bar.sync on its own barrier and hands the turn on with bar.arrive on the
  // other's. Warpgroup 1 arrives once before tile 0 (warpgroup 0 goes first) and after every tile but its last
  // (warpgroup 0 has no turn left), so every arrival meets a bar.sync.
  const int turn_mine = kSm90TurnBarrier + cw, turn_other = kSm90TurnBarrier + 1 - cw;
  if (cw == 1 && n_tiles > 0) ptx::named_barrier_arrive(kSm90TurnBarrier, 256);

  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f}, alpha[2] = {1.f, 1.f};
  float o[D / 2];
#pragma unroll
  for (int r = 0; r < D / 2; ++r) o[r] = 0.f;
  float sacc[BN / 2];        // S of the current tile (written by wgmma with scale-d 0), then its P in fp32
#pragma unroll
  for (int r = 0; r < BN / 2; ++r) sacc[r] = 0.f;
  uint32_t pa[BN / 16][4];   // P of the previous tile: the A operand of its P V

  ptx::mbarrier_wait(bar_q, 0);
  if (n_tiles > 0) {   // tile 0: S_0 only
    ptx::mbarrier_wait(&full_k[0], 0);
    ptx::named_barrier_sync(turn_mine, 256);
    ptx::fence_operand(sacc);
    ptx::wgmma_fence();
    issue_qk<T, D, BM, BN>(sacc, q_addr, ptx::smem_addr(sK));
    if (cw == 0 || n_tiles > 1) ptx::named_barrier_arrive(turn_other, 256);
    ptx::wgmma_wait<0>();
    ptx::fence_operand(sacc);
    ptx::mbarrier_arrive(&empty_k[0]);   // this thread's wgmmas reading K_0 have retired
    softmax_tile<BN>(sacc, si, kr, sc, band, row_lo, kr.lo, t, m_i, l_i, alpha);
    pack_p<T, BN>(pa, sacc);
  }
  for (int it = 1; it < n_tiles; ++it) {
    const int s = it % S, sp = (it - 1) % S, n0 = kr.lo + it * BN;   // sp: the stage of tile it - 1
    ptx::mbarrier_wait(&full_k[s], uint32_t((it / S) & 1));
    ptx::named_barrier_sync(turn_mine, 256);
    // S_it = Q K_it^T, then O = alpha O + P_{it-1} V_{it-1}: two commit groups in flight.
    ptx::fence_operand(sacc);
    ptx::wgmma_fence();
    issue_qk<T, D, BM, BN>(sacc, q_addr, ptx::smem_addr(sK + s * BN * D));
    ptx::mbarrier_wait(&full_v[sp], uint32_t(((it - 1) / S) & 1));
    fence_fragments(pa);
    issue_pv<T, D, BN>(o, pa, alpha, ptx::smem_addr(sV + sp * BN * D));
    if (cw == 0 || it < n_tiles - 1) ptx::named_barrier_arrive(turn_other, 256);
    // Softmax of tile it while P_{it-1} V_{it-1} runs: wait for the older group (S_it) only.
    ptx::wgmma_wait<1>();
    ptx::fence_operand(sacc);
    ptx::mbarrier_arrive(&empty_k[s]);   // this thread's wgmmas reading K_it have retired
    softmax_tile<BN>(sacc, si, kr, sc, band, row_lo, n0, t, m_i, l_i, alpha);
    ptx::wgmma_wait<0>();
    ptx::fence_operand(o);
    fence_fragments(pa);
    ptx::mbarrier_arrive(&empty_v[sp]);   // ... and those reading V_{it-1}
    pack_p<T, BN>(pa, sacc);
  }
  if (n_tiles > 0) {   // P V of the last tile, outside the turns
    const int it = n_tiles - 1, s = it % S, n0 = kr.lo + it * BN;
    ptx::mbarrier_wait(&full_v[s], uint32_t((it / S) & 1));
    // Only the last tile of a block can pass the sequence end (kr.hi <= seqlen_k).
    if (p.varlen && n0 + BN > si.seqlen_k && si.k_start + si.seqlen_k < p.total_k)
      // V rows past the key sequence: the consumers (threads 128 .. 383) zero them; only the last key tile of a
      // block crosses the sequence end, so `v_zeroed` completes one phase
      zero_tile_rows<D, BN>(sV + s * BN * D, si.seqlen_k - n0, int(threadIdx.x) - 128, v_zeroed, 0);
    fence_fragments(pa);
    issue_pv<T, D, BN>(o, pa, alpha, ptx::smem_addr(sV + s * BN * D));
    ptx::wgmma_wait<0>();
    ptx::fence_operand(o);
    fence_fragments(pa);
    ptx::mbarrier_arrive(&empty_v[s]);
  }

  // Epilogue: normalise once; a row that saw no key has l = 0 -> out 0, lse -inf (never NaN).
  float inv[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_i[r];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    lse[r] = l > 0.f ? (m_i[r] + __log2f(l)) * kLn2 : -INFINITY;
  }
  // Stage this warp's 16 rows in its rows of the Q tile (read only by this warpgroup's wgmmas, all retired),
  // swizzled as Q, then 16-byte stores of rows < rows_q, columns < head_dim.
  unsigned char* sq = reinterpret_cast<unsigned char*>(sQ);
  const int tr = 64 * cw + 16 * w + g;   // row in the Q tile
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      *reinterpret_cast<uint32_t*>(sq + sw128_offset(BM, tr + 8 * hf, 8 * j + 2 * t)) =
          ptx::pack2<T>(o[4 * j + 2 * hf] * inv[hf], o[4 * j + 2 * hf + 1] * inv[hf]);
  __syncwarp();
  const int64_t b64 = b;
  const gptr<T> O = gcast<T>(p.out) + b64 * p.stride_ob + h * p.stride_oh + int64_t(si.q_start) * p.stride_om;
  constexpr int CH = D / 8;   // 16-byte chunks per row
#pragma unroll
  for (int i = 0; i < 16 * CH / 32; ++i) {
    const int c = lane + 32 * i, r = c / CH, col = (c % CH) * 8;
    const int row = m0 + 64 * cw + 16 * w + r;
    if (row < si.rows_q && col < p.head_dim)
      *gcast<uint4>(O + int64_t(row) * p.stride_om + col) =
          *reinterpret_cast<const uint4*>(sq + sw128_offset(BM, 64 * cw + 16 * w + r, col));
  }
  if (t == 0) {
    // lse [B, Hq, Nq] or varlen [Hq, Tq], contiguous
    const gptr<float> L = p.lse + (p.varlen ? h * p.total_q + si.q_start : (b64 * p.hq + h) * p.max_q);
    if (row_lo < si.rows_q) L[row_lo] = lse[0];
    if (row_lo + 8 < si.rows_q) L[row_lo + 8] = lse[1];
  }
}

// tq / tk / tv: 4-D tensor maps over q [B][Nq][Hq][head_dim], k / v [B][Nk][Hkv][head_dim] (varlen: B = 1,
// N = the packed tokens) with boxes [1][rows][1][64], 128-byte swizzled.
template <typename T, int D, int BM, int BN, int S>
__global__ void __launch_bounds__(384, 1) attn_fwd_sm90_kernel(const __grid_constant__ TmaDesc tq,
                                                               const __grid_constant__ TmaDesc tk,
                                                               const __grid_constant__ TmaDesc tv, const Params p) {
#ifdef TF_ATTN_SM90_BODY
  static_assert(BM == 128 && D % kSm90Chunk == 0 && BN % 16 == 0 && BN <= 256, "tile shapes");
  using Tiles = Sm90FwdTiles<D>;
  constexpr int C = D / kSm90Chunk;
  TF_DYNAMIC_SMEM(unsigned char, smem_raw);
  unsigned char* smem = smem_raw + ((1024u - (ptx::smem_addr(smem_raw) & 1023u)) & 1023u);
  T* sQ = reinterpret_cast<T*>(smem);   // [C][BM][64]
  T* sK = sQ + BM * D;                  // [S][C][BN][64]
  T* sV = sK + S * BN * D;              // [S][C][BN][64]
  __shared__ uint64_t bar_q, full_k[S], full_v[S], empty_k[S], empty_v[S], v_zeroed;

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const SeqInfo si = seq_info(p, b);
  if (m0 >= si.rows_q) return;
  const int m_last = imin(m0 + BM, si.rows_q) - 1;
  const Range kr = key_range(p, si, m0, m_last, BN);
  const int n_tiles = (kr.hi - kr.lo + BN - 1) / BN;
  const int tid = threadIdx.x, wg = tid / 128;
  if (tid == 0) {
    ptx::mbarrier_init(&bar_q, 1);
    for (int s = 0; s < S; ++s) {
      ptx::mbarrier_init(&full_k[s], 1);
      ptx::mbarrier_init(&full_v[s], 1);
      ptx::mbarrier_init(&empty_k[s], 256);   // every consumer thread
      ptx::mbarrier_init(&empty_v[s], 256);
    }
    ptx::mbarrier_init(&v_zeroed, 256);
    ptx::fence_mbarrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    ptx::setmaxnreg_dec<Tiles::kProducerRegs>();
    if (tid == 0) {
      const int hk = h / p.group, tb = p.varlen ? 0 : b;   // varlen: rows offset by the sequence starts
      ptx::mbarrier_arrive_expect_tx(&bar_q, uint32_t(BM * D * 2));
#pragma unroll
      for (int c = 0; c < C; ++c)
        ptx::tma_load_4d(sQ + c * BM * kSm90Chunk, &tq, c * kSm90Chunk, si.q_start + m0, h, tb, &bar_q);
      // K_0, then K_j before V_{j-1} (the order the consumers use them), then V_{n-1}.
      for (int j = 0; j <= n_tiles; ++j) {
        if (j < n_tiles) {
          const int s = j % S, n0 = si.k_start + kr.lo + j * BN;
          ptx::mbarrier_wait(&empty_k[s], uint32_t(((j / S) & 1) ^ 1));   // the first pass finds fresh stages
          ptx::mbarrier_arrive_expect_tx(&full_k[s], uint32_t(BN * D * 2));
#pragma unroll
          for (int c = 0; c < C; ++c)
            ptx::tma_load_4d(sK + (s * C + c) * BN * kSm90Chunk, &tk, c * kSm90Chunk, n0, hk, tb, &full_k[s]);
        }
        if (j > 0) {
          const int jv = j - 1, s = jv % S, n0 = si.k_start + kr.lo + jv * BN;
          ptx::mbarrier_wait(&empty_v[s], uint32_t(((jv / S) & 1) ^ 1));
          ptx::mbarrier_arrive_expect_tx(&full_v[s], uint32_t(BN * D * 2));
#pragma unroll
          for (int c = 0; c < C; ++c)
            ptx::tma_load_4d(sV + (s * C + c) * BN * kSm90Chunk, &tv, c * kSm90Chunk, n0, hk, tb, &full_v[s]);
        }
      }
    }
  } else {
    ptx::setmaxnreg_inc<Tiles::kConsumerRegs>();
    fwd_sm90_consumer<T, D, BM, BN, S>(p, si, kr, n_tiles, b, h, m0, wg - 1, sQ, sK, sV, &bar_q, full_k, full_v,
                                       empty_k, empty_v, &v_zeroed);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_80, or sm_90 without the arch-specific features (built for 9.0 instead of 9.0a)
#endif
}

// Writes 1 where the sm_90a code of attn_fwd_sm90_kernel exists (a build naming 9.0a), 0 where this is other code
// (sm_80, or plain sm_90 whose attn_fwd_sm90_kernel body is __trap()): the launcher asks it before the first use.
template <int D>
__global__ void attn_fwd_sm90_probe_kernel(gptr<int> out) {
#if defined(TF_ATTN_SM90_BODY)
  *out = 1;
#else
  *out = 0;
#endif
}

}  // namespace tf::attention
