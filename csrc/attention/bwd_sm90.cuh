// Flash attention backward for Hopper (sm_90a): wgmma + TMA + mbarrier; the atomic-dQ backward of
// attention/bwd.cuh (preprocess, dK/dV + dQ, convert) with its dK/dV + dQ kernel replaced by attn_bwd_sm90_kernel.
// Notation and the mask / score helpers in attention/common.cuh; the same semantics as attn_bwd_dkdvdq_kernel
// without dropout and without the local delta.
//
// One block = BN = 128 keys of one (batch, KV head), 2 warpgroups (256 threads, so up to 255 registers per thread:
// a separate producer warpgroup would leave the others 240, and the D = 128 warpgroup needs about 250).
//   Loads: thread 0 loads the block's K and V tiles once, then the Q and dO tiles of BM = 64 queries of every
//   (query head of the GQA group, query tile) work item into a ring of S stages, one item ahead of the one being
//   computed, all by 4-D TMA ([B][N][H][D] tensor maps as the sm_90a forward; rows past the tensor and columns
//   past head_dim arrive as zeros); the 32 threads of warp 1 copy the item's lse (log2 domain, +inf for rows
//   past the sequence) and delta into the stage. Stage s is refilled after its `empty` mbarrier completed (all
//   256 threads arrived, their wgmmas reading it retired); its `full` mbarrier completes with the TMA bytes and
//   warp 1's 32 arrivals.
//   Warpgroup c owns keys n0 + 64c .. n0 + 64c + 63 and accumulates their dK, dV (64 x D fp32 each) in registers
//   over every work item:
//     S^T = K Q^T and dP^T = V dO^T: wgmma m64n64k16, both operands in shared memory (K-major descriptors);
//     P^T = exp2(S^T - lse), dS^T = P^T o (dP^T - delta) (softcap: o (1 - tanh^2)), in registers; exactly 0
//       outside the band, for keys past the sequence and for queries past it (on the tiles that cross an edge);
//       both stored as T into the warpgroup's own [64 keys][64 queries] tiles (128-byte rows, swizzled), then
//       fence.proxy.async and the warpgroup meets on its `ds_ready` mbarrier (128 arrivals, one phase per item);
//     dV += P^T dO and dK += dS^T Q: wgmma m64nDk16, P^T / dS^T K-major, dO / Q MN-major;
//     dQ = dS K: A = the dS^T tiles as MN-major operands, B = K MN-major, 64 columns at a time (wgmma m64n64k16),
//       each pair of columns added into dq_accum with one 8-byte fp32 reduction (ptx::red_add_v2). D = 128:
//       warpgroup c takes columns 64c .. 64c + 63 over all 128 keys, reading both warpgroups' dS^T after the
//       block met on the `ds_all` mbarrier (dS^T tiles double-buffered by item parity, so a warpgroup writing
//       the next item's never overwrites what the other still reads): one reduction per dQ element and key
//       block, as the sm_80 kernel. D = 64 (one 64-column chunk): each warpgroup over its own 64 keys, two
//       reductions per element.
//   Matrix products per tile pair: 5 (S^T, dP^T, dV, dK, dQ), each warpgroup's wgmma groups one after another
//   (the two warpgroups overlap through the warp schedulers).
//   Varlen: rows of a tile past the sequence are the neighbouring sequence's tokens; the 256 threads zero them in
//   shared memory (K and V once per block, Q and dO on the tiles that cross the sequence end; zero_tile_rows,
//   as the forward's V), so a neighbour's inf or NaN never reaches a product.
// Epilogue: dK (times the softmax scale) and dV written from registers with 4-byte stores of rows < seqlen_k,
// columns < head_dim.
// Shared memory (dynamic, from a 1024-byte boundary), every tile 128-byte swizzled as [D / 64][rows][64]: K, V
// [D/64][BN][64], Q and dO [S][D/64][BM][64], dS^T [2 parities][2 warpgroups][64][BM], P^T [2][64][BM]. lse /
// delta and the mbarriers are static.
#pragma once

#include "attention/bwd.cuh"
#include "attention/fwd_sm90.cuh"

namespace tf::attention {

// Tile shapes of the sm_90a backward (head dims 64 and 128: at 256 the dK, dV accumulators alone would take
// 256 registers per thread). Shared memory (bwd_sm90_smem_bytes): 113 KB at D = 64, 177 KB at 128.
template <int D>
struct Sm90BwdTiles {
  static_assert(D == 64 || D == 128, "the sm_90a backward is built for head dims 64 and 128");
  static constexpr int kM = 64;           // queries per Q / dO tile (the N of S^T = K Q^T)
  static constexpr int kN = 128;          // keys per block (2 warpgroups x 64)
  static constexpr int kStages = 2;       // Q / dO ring
  static constexpr int kThreads = 256;    // 2 warpgroups (up to 255 registers per thread)
};

template <int D, int BM, int BN, int S>
constexpr size_t bwd_sm90_smem_bytes() {
  return 1024 + (size_t(2 * BN + 2 * S * BM) * D + 6 * 64 * BM) * 2;   // slack + K, V + S x (Q, dO) + 4 dS^T + 2 P^T
}

// v, opaque to the compiler: descriptors derived from it are recomputed at each use instead of being hoisted out
// of the work-item loop and held in registers next to the dK, dV accumulators.
TF_DEVICE uint32_t opaque(uint32_t v) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(v));
#endif
  return v;
}

// Work items: (query head gi of the group, query tile m0), tile-major per head.
TF_DEVICE void next_item(const Range& qr, int q_tiles, int BM, int& gi, int& m0) {
  if (m0 + BM >= qr.lo + q_tiles * BM) {
    ++gi;
    m0 = qr.lo;
  } else {
    m0 += BM;
  }
}

// Fill stage it % S with work item it (query head hk * group + gi, tile m0) once its previous item released it:
// thread 0 issues the Q and dO TMA loads (full[s] expects their bytes), the 32 threads of warp 1 copy lse (log2
// domain, +inf past the sequence) and delta and arrive on full[s]. Other threads do nothing.
template <typename T, int D, int BM, int S>
TF_DEVICE void bwd_sm90_issue(const Params& p, const SeqInfo& si, int b, int hk, int it, int gi, int m0,
                              const TmaDesc* tq, const TmaDesc* tdo, T* sQ, T* sdO, float (*sL)[BM],
                              float (*sDl)[BM], uint64_t* full, uint64_t* empty) {
  constexpr int C = D / kSm90Chunk;
  const int tid = threadIdx.x, s = it % S;
  const int64_t h = int64_t(hk) * p.group + gi;
  if (tid == 0) {
    ptx::mbarrier_wait(&empty[s], uint32_t(((it / S) & 1) ^ 1));   // the first pass finds fresh stages
    ptx::mbarrier_arrive_expect_tx(&full[s], uint32_t(2 * BM * D * 2));
    const int tb = p.varlen ? 0 : b;   // varlen: rows offset by the sequence starts
#pragma unroll
    for (int c = 0; c < C; ++c) {
      ptx::tma_load_4d(sQ + (s * C + c) * BM * kSm90Chunk, tq, c * kSm90Chunk, si.q_start + m0, int(h), tb, &full[s]);
      ptx::tma_load_4d(sdO + (s * C + c) * BM * kSm90Chunk, tdo, c * kSm90Chunk, si.q_start + m0, int(h), tb,
                       &full[s]);
    }
  } else if (tid / 32 == 1) {
    ptx::mbarrier_wait(&empty[s], uint32_t(((it / S) & 1) ^ 1));
    const int64_t lrow = p.varlen ? h * p.total_q + si.q_start + m0 : (int64_t(b) * p.hq + h) * p.max_q + m0;
#pragma unroll
    for (int r = tid % 32; r < BM; r += 32) {
      const bool ok = m0 + r < si.rows_q;
      sL[s][r] = ok ? lse2_of(p.lse[lrow + r]) : INFINITY;
      sDl[s][r] = ok ? p.delta[lrow + r] : 0.f;
    }
    ptx::mbarrier_arrive(&full[s]);
  }
}

// One warpgroup (cw = 0, 1): keys n0 + 64 cw .. of the block; threads 0 .. 63 also fill the ring. See the file
// comment.
template <typename T, int D, int BM, int BN, int S>
TF_DEVICE void bwd_sm90_warpgroup(const Params& p, const SeqInfo& si, const Range& qr, int q_tiles, int b, int hk,
                                 int n0, int cw, const TmaDesc* tq, const TmaDesc* tdo, T* sK, T* sV, T* sQ, T* sdO,
                                 T* sdS, float (*sL)[BM], float (*sDl)[BM], uint64_t* bar_kv, uint64_t* full,
                                 uint64_t* empty, uint64_t* zeroed, uint64_t* ds_ready, uint64_t* ds_all) {
  constexpr Swizzle SW = Swizzle::b128;
  constexpr int C = D / kSm90Chunk;
  constexpr bool kSplit = C % 2 == 0;   // dQ: warpgroup cw computes column chunks cw, cw + 2, .. over all BN keys
  const int ltid = threadIdx.x % 128, w = ltid / 32, lane = ltid % 32, g = lane >> 2, t = lane & 3;
  const int key_lo = n0 + 64 * cw + 16 * w + g;   // this thread's accumulator rows: keys key_lo, key_lo + 8
  // A operands: this warpgroup's 64 rows of each 128-row chunk of K / V (8192 bytes in: a multiple of 1024)
  const uint32_t k_addr = ptx::smem_addr(sK) + uint32_t(64 * cw) * 128;
  const uint32_t v_addr = ptx::smem_addr(sV) + uint32_t(64 * cw) * 128;
  // [64 keys][BM queries] tiles: dS^T of item parity par and warpgroup w at sdS + (2 par + w) 64 BM, P^T of this
  // warpgroup after the four dS^T tiles
  T* sPtw = sdS + (4 + cw) * 64 * BM;
  const uint32_t ds_base = ptx::smem_addr(sdS), pt_addr = ptx::smem_addr(sPtw);
  constexpr uint32_t kTileBytes = 64 * BM * 2;
  const bool key_tail = n0 + BN > si.seqlen_k;   // the block holds keys past the sequence

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int r = 0; r < D / 2; ++r) dk[r] = dv[r] = 0.f;

  uint32_t zphase = 0;   // phases of `zeroed` completed (uniform over the block)
  ptx::mbarrier_wait(bar_kv, 0);
  if (p.varlen && key_tail && si.k_start + si.seqlen_k < p.total_k) {   // tokens after the sequence's keys
    zero_tile_rows<D, BN>(sK, si.seqlen_k - n0, int(threadIdx.x), zeroed, zphase++);
    zero_tile_rows<D, BN>(sV, si.seqlen_k - n0, int(threadIdx.x), zeroed, zphase++);
  }

  const int64_t dq_row_stride = int64_t(p.hq) * p.head_dim;
  const int items = q_tiles * p.group;
  int gi = 0, m0 = qr.lo;
  for (int it = 0; it < items; ++it) {
    const int s = it % S;
    const int h = hk * p.group + gi;
    if (it + 1 < items && threadIdx.x < 64) {   // prefetch the next item into the other stage
      int gi1 = gi, m01 = m0;
      next_item(qr, q_tiles, BM, gi1, m01);
      bwd_sm90_issue<T, D, BM, S>(p, si, b, hk, it + 1, gi1, m01, tq, tdo, sQ, sdO, sL, sDl, full, empty);
    }
    ptx::mbarrier_wait(&full[s], uint32_t((it / S) & 1));
    T* sQs = sQ + s * BM * D;
    T* sdOs = sdO + s * BM * D;
    const bool q_tail = m0 + BM > si.rows_q;
    if (p.varlen && q_tail && si.q_start + si.rows_q < p.total_q) {   // tokens after the sequence's queries
      zero_tile_rows<D, BM>(sQs, si.rows_q - m0, int(threadIdx.x), zeroed, zphase++);
      zero_tile_rows<D, BM>(sdOs, si.rows_q - m0, int(threadIdx.x), zeroed, zphase++);
    }
    const uint32_t q_addr = opaque(ptx::smem_addr(sQs)), do_addr = opaque(ptx::smem_addr(sdOs));
    const uint32_t ka = opaque(k_addr), va = opaque(v_addr);
    const Scale sc = make_scale(p, b, h);

    // S^T = K Q^T and dP^T = V dO^T: D / 16 k-steps each, one commit group.
    float st[BM / 2], dpt[BM / 2];
#pragma unroll
    for (int r = 0; r < BM / 2; ++r) st[r] = dpt[r] = 0.f;
    ptx::fence_operand(st);
    ptx::fence_operand(dpt);
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ptx::wgmma_ss<T, BM, 0, 0>(st, ptx::desc_k_major(ka, BN, 16 * kk, SW),
                                 ptx::desc_k_major(q_addr, BM, 16 * kk, SW), kk > 0 ? 1 : 0);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ptx::wgmma_ss<T, BM, 0, 0>(dpt, ptx::desc_k_major(va, BN, 16 * kk, SW),
                                 ptx::desc_k_major(do_addr, BM, 16 * kk, SW), kk > 0 ? 1 : 0);
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::fence_operand(st);
    ptx::fence_operand(dpt);

    // P^T and dS^T: st[4j + i] = S^T[key_lo + 8 (i >= 2)][m0 + 8j + 2t + (i & 1)]. On tiles crossing the band,
    // the key sequence end or the query sequence end, elements outside are exactly 0 (selected, not computed).
    // Values first needed here are derived from copies made here (opaque: not moved above the wgmmas, where
    // they would be live next to the accumulators).
    const int kl = int(opaque(uint32_t(key_lo))), mq = int(opaque(uint32_t(m0)));
    const bool masked = mq < qr.full_lo || mq >= qr.full_hi || key_tail || q_tail;
    // the queries that see each of this thread's keys (empty past seqlen_k)
    const Band band[2] = {queries_of_key(p, si, kl), queries_of_key(p, si, kl + 8)};
    const float* sLs = sL[s];
    const float* sDs = sDl[s];
    // Each pair of elements (keys key_lo + 8 hf, queries m0 + 8j + 2t + {0, 1}) goes as T straight into this
    // warpgroup's P^T and dS^T tiles ([key][query], 128-byte rows swizzled): the A operands of dV += P^T dO and
    // dK += dS^T Q (K-major) and, through an MN-major descriptor, of dQ = dS K.
    const int par = it & 1;
    unsigned char* sps = reinterpret_cast<unsigned char*>(sPtw);
    unsigned char* sds = reinterpret_cast<unsigned char*>(sdS + (2 * par + cw) * 64 * BM);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float pt[2], ds[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = 4 * j + 2 * hf + e, cq = 8 * j + 2 * t + e, query = mq + cq;
          float tc;
          const float x = score(st[r], sc, query, kl + 8 * hf, si.off, tc);
          const bool ok = !masked || (band[hf].has(query) && query < si.rows_q);
          pt[e] = ok ? ptx::ex2_approx(x - sLs[cq]) : 0.f;
          ds[e] = ok ? pt[e] * (dpt[r] - sDs[cq]) : 0.f;
          if (sc.cap2 != 0.f) ds[e] *= 1.f - tc * tc;
        }
        const uint32_t off = sw128_offset(64, 16 * w + g + 8 * hf, 8 * j + 2 * t);
        *reinterpret_cast<uint32_t*>(sps + off) = ptx::pack2<T>(pt[0], pt[1]);
        *reinterpret_cast<uint32_t*>(sds + off) = ptx::pack2<T>(ds[0], ds[1]);
      }
    ptx::fence_proxy_async_shared();   // generic-proxy writes before the wgmmas' reads
    // Every thread of the warpgroup has written its elements (128 arrivals; one phase per item).
    ptx::mbarrier_arrive(&ds_ready[cw]);
    if constexpr (kSplit) ptx::mbarrier_arrive(ds_all);   // the other warpgroup's dQ reads this dS^T too
    ptx::mbarrier_wait(&ds_ready[cw], uint32_t(it & 1));

    // dV += P^T dO, dK += dS^T Q: BM / 16 k-steps each, dO and Q [query][d] as MN-major B operands.
    const uint32_t pa = opaque(pt_addr), da = opaque(ds_base + uint32_t(2 * par + cw) * kTileBytes);
    ptx::fence_operand(dv);
    ptx::fence_operand(dk);
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk)
      ptx::wgmma_ss<T, D, 0, 1>(dv, ptx::desc_k_major(pa, 64, 16 * kk, SW),
                                ptx::desc_mn_major(do_addr, BM, 16 * kk, SW), 1);
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk)
      ptx::wgmma_ss<T, D, 0, 1>(dk, ptx::desc_k_major(da, 64, 16 * kk, SW),
                                ptx::desc_mn_major(q_addr, BM, 16 * kk, SW), 1);
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    ptx::fence_operand(dv);
    ptx::fence_operand(dk);
    ptx::mbarrier_arrive(&empty[s]);   // this thread's wgmmas reading stage s (Q, dO) have retired

    // dQ = dS K into dq_accum (unscaled; the convert kernel multiplies by the softmax scale), 64 columns at a time
    // (wgmma m64n64k16; A = dS, query x key: the [key][query] dS^T tiles MN-major; B = K, key x d: [key][d] rows,
    // MN-major), then 8-byte fp32 reductions of rows < rows_q, columns < head_dim. kSplit (D = 128): this
    // warpgroup's column chunks over all BN keys (both warpgroups' dS^T, after the block met on ds_all): one
    // reduction per dQ element and key block. Otherwise (D = 64) every chunk over this warpgroup's 64 keys: one per
    // warpgroup.
    constexpr int kChunks = kSplit ? C / 2 : C, kKeys = kSplit ? BN : 64;
    if constexpr (kSplit) ptx::mbarrier_wait(ds_all, uint32_t(it & 1));
    const int64_t dq_base = (p.varlen ? 0 : int64_t(b) * p.max_q * dq_row_stride) + int64_t(h) * p.head_dim;
    const int row0 = m0 + 16 * w + g;   // this thread's dQ rows: row0, row0 + 8
#pragma unroll 1
    for (int ci = 0; ci < kChunks; ++ci) {
      const int c = kSplit ? cw + 2 * ci : ci;
      float dq[32];
#pragma unroll
      for (int r = 0; r < 32; ++r) dq[r] = 0.f;
      // B: rows of the keys summed over (all BN, or this warpgroup's 64) in chunk c
      const uint32_t kc_addr = opaque(ptx::smem_addr(sK) + uint32_t(c * BN + (kSplit ? 0 : 64 * cw)) * 128);
      const uint32_t dsa = opaque(ds_base + uint32_t(2 * par) * kTileBytes);   // this parity's dS^T tiles
      ptx::fence_operand(dq);
      ptx::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        const int wt = kSplit ? kk / 4 : cw;   // the warpgroup whose dS^T holds keys 16 kk ..
        ptx::wgmma_ss<T, 64, 1, 1>(dq, ptx::desc_mn_major(dsa + uint32_t(wt) * kTileBytes, 64, 16 * (kk % 4), SW),
                                   ptx::desc_mn_major(kc_addr, BN, 16 * kk, SW), kk > 0 ? 1 : 0);
      }
      ptx::wgmma_commit();
      ptx::wgmma_wait<0>();
      ptx::fence_operand(dq);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = row0 + 8 * hf;
        if (row >= si.rows_q) continue;
        const gptr<float> dst = p.dq_accum + dq_base + int64_t(si.q_start + row) * dq_row_stride + c * kSm90Chunk;
#pragma unroll
        for (int j = 0; j < 8; ++j) {   // head_dim is a multiple of 8: both columns of a pair exist, or neither
          const int col = 8 * j + 2 * t;
          if (c * kSm90Chunk + col < p.head_dim)
            ptx::red_add_v2(dst + col, dq[4 * j + 2 * hf], dq[4 * j + 2 * hf + 1]);
        }
      }
    }
    next_item(qr, q_tiles, BM, gi, m0);
  }

  // Epilogue: rows < seqlen_k, columns < head_dim of dK (times the softmax scale) and dV; dk, dv are
  // contiguous [.., Nk, Hkv, head_dim] (varlen [Tk, Hkv, head_dim]).
  const int64_t k_row_stride = int64_t(p.hkv) * p.head_dim;
  const int64_t k_base = (p.varlen ? 0 : int64_t(b) * p.max_k * k_row_stride) + int64_t(hk) * p.head_dim;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int key = key_lo + 8 * hf;
    if (key >= si.seqlen_k) continue;
    const gptr<T> DK = gcast<T>(p.dk) + k_base + int64_t(si.k_start + key) * k_row_stride;
    const gptr<T> DV = gcast<T>(p.dv) + k_base + int64_t(si.k_start + key) * k_row_stride;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int col = 8 * j + 2 * t;
      if (col >= p.head_dim) continue;
      *gcast<uint32_t>(DK + col) = ptx::pack2<T>(dk[4 * j + 2 * hf] * p.scale, dk[4 * j + 2 * hf + 1] * p.scale);
      *gcast<uint32_t>(DV + col) = ptx::pack2<T>(dv[4 * j + 2 * hf], dv[4 * j + 2 * hf + 1]);
    }
  }
}

// tq / tk / tv / tdo: 4-D tensor maps over q, dout [B][Nq][Hq][head_dim], k / v [B][Nk][Hkv][head_dim] (varlen:
// B = 1, N = the packed tokens) with boxes [1][rows][1][64], 128-byte swizzled. Launched with the atomic-dQ
// Params of the sm_80 backward (dq_accum zeroed, delta from attn_bwd_preprocess_kernel).
template <typename T, int D, int BM, int BN, int S>
__global__ void __launch_bounds__(256, 1) attn_bwd_sm90_kernel(const __grid_constant__ TmaDesc tq,
                                                               const __grid_constant__ TmaDesc tk,
                                                               const __grid_constant__ TmaDesc tv,
                                                               const __grid_constant__ TmaDesc tdo, const Params p) {
#ifdef TF_ATTN_SM90_BODY
  static_assert(BM == 64 && BN == 128 && D % kSm90Chunk == 0, "tile shapes");
  constexpr int C = D / kSm90Chunk;
  TF_DYNAMIC_SMEM(unsigned char, smem_raw);
  unsigned char* smem = smem_raw + ((1024u - (ptx::smem_addr(smem_raw) & 1023u)) & 1023u);
  T* sK = reinterpret_cast<T*>(smem);   // [C][BN][64]
  T* sV = sK + BN * D;                  // [C][BN][64]
  T* sQ = sV + BN * D;                  // [S][C][BM][64]
  T* sdO = sQ + S * BM * D;             // [S][C][BM][64]
  T* sdS = sdO + S * BM * D;            // dS^T [2 item parities][2 warpgroups][64][BM], then P^T [2][64][BM]
  __shared__ float sL[S][BM], sDl[S][BM];
  __shared__ uint64_t bar_kv, full[S], empty[S], zeroed, ds_ready[2], ds_all;

  const int b = blockIdx.z, hk = blockIdx.y, n0 = blockIdx.x * BN;
  const SeqInfo si = seq_info(p, b);
  if (n0 >= si.seqlen_k) return;
  const int n_last = imin(n0 + BN, si.seqlen_k) - 1;
  const Range qr = query_range(p, si, n0, n_last, BM);
  const int q_tiles = (qr.hi - qr.lo + BM - 1) / BM;
  const int items = q_tiles * p.group;
  const int tid = threadIdx.x, wg = tid / 128;
  if (tid == 0) {
    ptx::mbarrier_init(&bar_kv, 1);
    for (int s = 0; s < S; ++s) {
      ptx::mbarrier_init(&full[s], 1 + 32);   // thread 0's expect_tx arrival + warp 1's lse / delta copy
      ptx::mbarrier_init(&empty[s], 256);     // every thread
    }
    ptx::mbarrier_init(&zeroed, 256);
    ptx::mbarrier_init(&ds_ready[0], 128);
    ptx::mbarrier_init(&ds_ready[1], 128);
    ptx::mbarrier_init(&ds_all, 256);
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (tid == 0) {   // K and V once
    const int tb = p.varlen ? 0 : b;
    ptx::mbarrier_arrive_expect_tx(&bar_kv, uint32_t(2 * BN * D * 2));
#pragma unroll
    for (int c = 0; c < C; ++c) {
      ptx::tma_load_4d(sK + c * BN * kSm90Chunk, &tk, c * kSm90Chunk, si.k_start + n0, hk, tb, &bar_kv);
      ptx::tma_load_4d(sV + c * BN * kSm90Chunk, &tv, c * kSm90Chunk, si.k_start + n0, hk, tb, &bar_kv);
    }
  }
  if (items > 0 && tid < 64)
    bwd_sm90_issue<T, D, BM, S>(p, si, b, hk, 0, 0, qr.lo, &tq, &tdo, sQ, sdO, sL, sDl, full, empty);
  bwd_sm90_warpgroup<T, D, BM, BN, S>(p, si, qr, q_tiles, b, hk, n0, wg, &tq, &tdo, sK, sV, sQ, sdO, sdS, sL, sDl,
                                     &bar_kv, full, empty, &zeroed, ds_ready, &ds_all);
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_80, or sm_90 without the arch-specific features (built for 9.0 instead of 9.0a)
#endif
}

}  // namespace tf::attention
