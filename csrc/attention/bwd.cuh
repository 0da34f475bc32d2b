// Flash attention backward, notation in attention/common.cuh. P is recomputed from the stored lse; a row that
// saw no key (lse = -inf) is read as lse = +inf, so its P, and its gradients, are exactly 0. Two paths:
//
// * deterministic (Params::dq_accum null): preprocess, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel; no atomics,
//   no block writes what another writes. Matrix products per (query tile, key tile) pair: 7 (dK/dV kernel:
//   S^T, dP^T, dV, dK; dQ kernel: S, dP again, dQ), i.e. executed / counted FLOPs 7 / 5 = 1.4.
// * atomic dQ (dq_accum: an fp32 [.., Hq, D] workspace like dq): preprocess, attn_bwd_dkdvdq_kernel (the
//   dK/dV kernel that also adds dQ += dS K for its key tile into dq_accum with fp32 atomicAdd), then
//   attn_bwd_dq_convert_kernel (dq = scale * dq_accum in dq's dtype). Products per tile pair: 5 (S^T, dP^T,
//   dV, dK, dQ), executed / counted 1.0; with the column split (D = 256: two D/2-column blocks per key tile)
//   S^T and dP^T are computed by both slices: 7 D-wide-equivalent products, 1.4 (the deterministic path
//   runs 9 there: 1.8). The order in which blocks' atomics land varies from run to run, so dQ does too (in
//   its last bits); dK, dV do not.
//
// * attn_bwd_preprocess_kernel: delta = rowsum(dO * O) - dlse (one warp per query row).
// * p.local_delta (every sequence has at most kLocalDeltaKeys = 16 keys, m-tile 0 of the dK/dV tile's warps): the
//   preprocess writes -dlse and attn_bwd_dkdvdq_kernel<..., LOCAL = true> adds rowsum(P o dP) from its tile,
//   with dS = P o (dP rowsum(P) - delta), the softmax gradient of P normalised by its own row sum. Equal to the
//   form below in exact arithmetic; in fp32 it leaves no difference of two summation orders of dO . V in dS:
//   with one key P = 1, and dS, dK, dQ are exactly 0, as they are in PyTorch. Such calls always take the atomic
//   path, which is then deterministic too: one key block per sequence, so every dQ element receives exactly one
//   atomic add (onto zero).
// * attn_bwd_dkdv_kernel: one block = BN = 16 * NWARPS keys of one (batch, KV head), over every query tile
//   (BM queries, double-buffered Q / dO tiles by cp.async) of every query head of its GQA group. Warps work in
//   pairs: warp w = 2 kp + hf owns the pair's keys 32 kp..32 kp + 31 (two 16-key m-tiles) and
//   phase 1 (dkdv_scores), queries hf BM/2..hf BM/2 + BM/2 - 1 of the tile:
//     S^T = K Q^T, P^T = exp2(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta); P^T and dS^T go as T to
//     shared memory (sP, sdS [BN][BM + 8]); one block barrier;
//   phase 2 (dkdv_accumulate), the pair's 32 keys x columns c0 + hf DC/2.. of dK, dV (registers), over the
//     whole tile: dV += P^T dO, dK += dS^T Q (P^T, dS^T as A fragments by ldmatrix).
//   Each B fragment (Q, dO) feeds both m-tiles. Shared-memory reads, ldmatrix.x4 per warp and query tile
//   (QB = BM / 2, CW = DC / 2): phase 1 D/16 k-steps x (4 + 2 QB/16) for D/16 x 8 QB/16 mma.m16n8k16, phase 2
//   BM/16 x (4 + 2 CW/16) for BM/16 x 8 CW/16 mma. With the tiles of launch.cuh (Config):
//     D 64  (BM 64, DC 64):  (32 + 32) / (64 + 64)    = 0.5    ldmatrix.x4 per mma
//     D 128 (BM 64, DC 128): (64 + 48) / (128 + 128)  = 0.4375 (dropout: BM 32, (48 + 24) / (64 + 64) = 0.5625)
//     D 256 (BM 32, DC 128): (96 + 24) / (128 + 64)   = 0.625
//   The dK/dV + dQ kernel adds the dQ product (dq_atomic_tile): D 64 20 / 32, D 128 40 / 64, D 256 20 / 32 per
//   warp and tile, so 0.525, 0.475, 0.625 overall (tests/test_cuda_attention_bwd_paths.py counts them in the
//   emulator).
//   Column split (DC < D, used for D > 128): two D-wide fp32 accumulators do not fit in a thread's 255
//   registers, so each block accumulates only a DC-wide column slice of dK, dV (grid.x = key tiles x D / DC);
//   S^T and dP^T (full-D contractions) are recomputed by every slice's block.
// * attn_bwd_dq_kernel: one block = BM = 16 * NWARPS queries of one (batch, query head), over its key tiles
//   (double-buffered K / V): S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
// * Dropout (the DROPOUT template flag of the dK/dV, dK/dV + dQ and dQ kernels; without it they are unchanged):
//   with Z the forward's keep mask (regenerated from rng_state: row_keep / col_keep, common.cuh) and
//   r = 1 / (1 - p), dV = (P o Z r)^T dO and dS = P o (Z r o dP - delta), delta = rowsum(dO o O) with O the
//   dropped output (as triton_kernels/attention_bwd.py).
// * attn_zero_tail_kernel: packed varlen tokens before the first sequence's start or from the last one's
//   end (a superset of the tokens in no sequence): rows 0 (lse -inf); the kernels that run after it overwrite
//   the rows that do belong to a sequence.
#pragma once

#include "attention/common.cuh"

namespace tf::attention {

// delta[row] = sum_d dO * O - dlse. Grid (cdiv(max_q, 8), Hq, B), 256 threads: one warp per query row.
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_preprocess_kernel(const Params p) {
  const int b = blockIdx.z, h = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SeqInfo si = seq_info(p, b);
  const int m = blockIdx.x * 8 + warp;
  if (m >= si.rows_q) return;   // whole warps leave: no block barrier here
  const int64_t b64 = p.varlen ? 0 : b, tok = si.q_start + m;
  const gptr<const T> O = gcast<const T>(p.out) + b64 * p.stride_ob + h * p.stride_oh + tok * p.stride_om;
  const gptr<const T> dO = gcast<const T>(p.dout) + b64 * p.stride_dob + h * p.stride_doh + tok * p.stride_dom;
  float acc = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) acc += to_float(O[d]) * to_float(dO[d]);
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(kFullMask, acc, s);
  if (lane == 0) {
    const int64_t li = p.varlen ? h * p.total_q + tok : (int64_t(b) * p.hq + h) * p.max_q + m;
    p.delta[li] = (p.local_delta ? 0.f : acc) - (p.dlse ? p.dlse[li] : 0.f);
  }
}

// lse (natural log, -inf for empty rows) -> log2 domain, +inf for empty rows and rows past the sequence.
TF_DEVICE float lse2_of(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// K, V [BN][SD]; 2 x (Q, dO) [BM][SD]; 2 x (lse2, delta) [BM] fp32; P^T, dS^T [BN][BM + 8].
template <int D, int BM, int BN>
constexpr size_t dkdv_smem_bytes() {
  return size_t(2 * BN + 4 * BM) * (D + 8) * 2 + 2 * 2 * BM * 4 + size_t(2 * BN) * (BM + 8) * 2;
}

// Phase 1 of one query tile for one warp: its pair's 32 keys (rows of sKw / sVw: two 16-key m-tiles, keys
// col_lo + 16 mt (+ 8) of this thread) x the warp's QB = BM / 2 queries (sQh, sdOh, sLh, sDlh: the tile's rows
// from the warp's first query mq0). Computes S^T = K Q^T and dP^T = V dO^T, then P^T (with dropout P^T o Z r)
// and dS^T = P^T o (Z r o dP^T - delta), and stores both as T into the warp's block [32][QB] of sP / sdS (sPw,
// sdSw; row stride BM + 8; dS^T rows of keys past the sequence as 0, for the dQ product). LOCAL (every key of
// the block is in pair 0's first m-tile): delta and rowsum(P) of each query column from the tile, summed over
// both m-tiles and the rows g (lanes xor 4, 8, 16).
template <bool MASKED, bool DROPOUT, bool LOCAL, typename T, int D, int BM>
TF_DEVICE void dkdv_scores(const Params& p, const SeqInfo& si, const Scale& sc, const Dropout& dr, const T* sKw,
                           const T* sVw, const T* sQh, const T* sdOh, const float* sLh, const float* sDlh, int mq0,
                           int col_lo, T* sPw, T* sdSw, int lane) {
  constexpr int SD = D + 8, SS = BM + 8, QB = BM / 2;
  const int t = lane & 3, g = lane >> 2;
  float s[2][QB / 8][4], dp[2][QB / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < QB / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[mt][j][i] = dp[mt][j][i] = 0.f;
  // DROPOUT: this thread's keep bits, bit (mt QB / 8 + j) 4 + i for element (mt, j, i) (below), computed before
  // the products so that the Philox rounds do not overlap the score accumulators.
  static_assert(!DROPOUT || QB <= 32, "one 32-bit word of keep bits per thread");
  uint32_t kbits = 0;
  if constexpr (DROPOUT) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const ColKeep<QB> keep = col_keep<QB>(dr, col_lo + 16 * mt, mq0, lane);
#pragma unroll
      for (int j = 0; j < QB / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) kbits |= uint32_t(keep.keep(j, i, g)) << ((mt * (QB / 8) + j) * 4 + i);
    }
  }
  // Per k-step: 2 ldmatrix.x4 (K or V, one per m-tile) + QB / 16 (Q or dO) per product, each B fragment feeding
  // both m-tiles. Not unrolled over k-steps: it keeps the fragment prefetch (and so the registers) small.
#pragma unroll 1
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a0[4], a1[4];
    ldm_a<SD>(a0, sKw, 0, 16 * kk, lane);
    ldm_a<SD>(a1, sKw, 16, 16 * kk, lane);
#pragma unroll
    for (int jj = 0; jj < QB / 16; ++jj) {
      uint32_t b[4];
      ldm_bt<SD>(b, sQh, 16 * jj, 16 * kk, lane);
      mma2<T>(s[0][2 * jj], s[0][2 * jj + 1], a0, b);
      mma2<T>(s[1][2 * jj], s[1][2 * jj + 1], a1, b);
    }
    ldm_a<SD>(a0, sVw, 0, 16 * kk, lane);
    ldm_a<SD>(a1, sVw, 16, 16 * kk, lane);
#pragma unroll
    for (int jj = 0; jj < QB / 16; ++jj) {
      uint32_t b[4];
      ldm_bt<SD>(b, sdOh, 16 * jj, 16 * kk, lane);
      mma2<T>(dp[0][2 * jj], dp[0][2 * jj + 1], a0, b);
      mma2<T>(dp[1][2 * jj], dp[1][2 * jj + 1], a1, b);
    }
  }
  // P^T and dS^T, element-wise (row = key, col = query): element (mt, j, i) is key col_lo + 16 mt + 8 (i >> 1),
  // query mq0 + 8 j + 2 t + (i & 1). prob reads the raw products s, dp of an element and returns P^T (o Z r);
  // pt: P^T, dpz: dP^T (o Z r), tc: tanh for the softcap.
  auto prob = [&](int mt, int j, int i, const Band (&band)[2], float& pt, float& dpz, float& tc) {
    const int cq = 8 * j + 2 * t + (i & 1), query = mq0 + cq;
    float x = score(s[mt][j][i], sc, query, col_lo + 16 * mt + (i >= 2 ? 8 : 0), si.off, tc);
    if ((MASKED || LOCAL) && !band[i >> 1].has(query)) x = -INFINITY;
    pt = ptx::ex2_approx(x - sLh[cq]);
    dpz = dp[mt][j][i];
    float ps = pt;
    if constexpr (DROPOUT) {
      const bool kept = (kbits >> ((mt * (QB / 8) + j) * 4 + i)) & 1u;
      dpz = kept ? dpz * p.drop_scale : 0.f;
      ps = kept ? pt * p.drop_scale : 0.f;
    }
    return ps;
  };
  // Rows g, g + 8 of m-tile mt, columns 2t, 2t + 1 of each 8-query tile: P^T into sP, dS^T into sdS.
  auto store = [&](int mt) {
    const bool ok0 = col_lo + 16 * mt < si.seqlen_k, ok1 = col_lo + 16 * mt + 8 < si.seqlen_k;
    T* rp = sPw + (16 * mt + g) * SS + 2 * t;
    T* rd = sdSw + (16 * mt + g) * SS + 2 * t;
#pragma unroll
    for (int j = 0; j < QB / 8; ++j) {
      *reinterpret_cast<uint32_t*>(rp + 8 * j) = ptx::pack2<T>(s[mt][j][0], s[mt][j][1]);
      *reinterpret_cast<uint32_t*>(rp + 8 * SS + 8 * j) = ptx::pack2<T>(s[mt][j][2], s[mt][j][3]);
      *reinterpret_cast<uint32_t*>(rd + 8 * j) = ok0 ? ptx::pack2<T>(dp[mt][j][0], dp[mt][j][1]) : 0u;
      *reinterpret_cast<uint32_t*>(rd + 8 * SS + 8 * j) = ok1 ? ptx::pack2<T>(dp[mt][j][2], dp[mt][j][3]) : 0u;
    }
  };
  if constexpr (LOCAL) {
    // Two passes over the raw products of m-tile 0: the column sums, then P^T and dS^T. Every key is below
    // kLocalDeltaKeys <= 16, so m-tile 1 (keys >= 16) and the other pairs see no key: P^T = dS^T = 0 there.
    static_assert(kLocalDeltaKeys <= 16, "LOCAL: every key in m-tile 0 of pair 0");
    const Band band[2] = {queries_of_key(p, si, col_lo), queries_of_key(p, si, col_lo + 8)};
#pragma unroll
    for (int j = 0; j < QB / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {   // query column 8 j + 2 t + e: elements e, e + 2 of m-tile 0
        float sp = 0.f, spd = 0.f;
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          float pt, dpz, tc;
          prob(0, j, e + 2 * u, band, pt, dpz, tc);
          sp += pt;
          spd += pt * dpz;
        }
#pragma unroll
        for (int x = 4; x < 32; x <<= 1) {   // the other rows g: lanes with the same t
          sp += __shfl_xor_sync(kFullMask, sp, x);
          spd += __shfl_xor_sync(kFullMask, spd, x);
        }
        const float delta = spd + sDlh[8 * j + 2 * t + e];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int i = e + 2 * u;
          float pt, dpz, tc;
          const float ps = prob(0, j, i, band, pt, dpz, tc);
          float ds = pt * (dpz * sp - delta);
          if (sc.cap2 != 0.f) ds *= 1.f - tc * tc;
          s[0][j][i] = ps;
          dp[0][j][i] = ds;
          s[1][j][i] = dp[1][j][i] = 0.f;
        }
      }
    store(0);
    store(1);
  } else {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const Band band[2] = {queries_of_key(p, si, col_lo + 16 * mt), queries_of_key(p, si, col_lo + 16 * mt + 8)};
#pragma unroll
      for (int j = 0; j < QB / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float pt, dpz, tc;
          const float ps = prob(mt, j, i, band, pt, dpz, tc);
          float ds = pt * (dpz - sDlh[8 * j + 2 * t + (i & 1)]);
          if (sc.cap2 != 0.f) ds *= 1.f - tc * tc;
          s[mt][j][i] = ps;
          dp[mt][j][i] = ds;
        }
      store(mt);
    }
  }
}

// Phase 2 of one query tile for one warp: dV += P^T dO and dK += dS^T Q for its pair's 32 keys (rows of sPw /
// sdSw, A fragments by ldmatrix) and the CW = DC / 2 columns c..c + CW - 1 (dO, Q are [query][d] = B[k][n]:
// ldmatrix .trans), over the tile's BM queries. Per 16-query k-step: 4 ldmatrix.x4 (P^T, dS^T of both
// m-tiles) + 2 CW / 16 (dO, Q) for 8 CW / 16 mma.
template <typename T, int D, int DC, int BM>
TF_DEVICE void dkdv_accumulate(const T* sPw, const T* sdSw, const T* sQb, const T* sdOb, int c,
                               float (&dk)[2][DC / 16][4], float (&dv)[2][DC / 16][4], int lane) {
  constexpr int SD = D + 8, SS = BM + 8, CW = DC / 2;
#pragma unroll 1
  for (int kk = 0; kk < BM / 16; ++kk) {
    uint32_t ap0[4], ap1[4], ad0[4], ad1[4];
    ldm_a<SS>(ap0, sPw, 0, 16 * kk, lane);
    ldm_a<SS>(ap1, sPw, 16, 16 * kk, lane);
    ldm_a<SS>(ad0, sdSw, 0, 16 * kk, lane);
    ldm_a<SS>(ad1, sdSw, 16, 16 * kk, lane);
#pragma unroll
    for (int dd = 0; dd < CW / 16; ++dd) {
      uint32_t b[4];
      ldm_b_trans<SD>(b, sdOb, 16 * kk, c + 16 * dd, lane);
      mma2<T>(dv[0][2 * dd], dv[0][2 * dd + 1], ap0, b);
      mma2<T>(dv[1][2 * dd], dv[1][2 * dd + 1], ap1, b);
      ldm_b_trans<SD>(b, sQb, 16 * kk, c + 16 * dd, lane);
      mma2<T>(dk[0][2 * dd], dk[0][2 * dd + 1], ad0, b);
      mma2<T>(dk[1][2 * dd], dk[1][2 * dd + 1], ad1, b);
    }
  }
}

// load_tile for the per-item Q / dO tiles: thread tid copies chunk column ch = tid % CP (the 16-byte chunks per
// row, CH = D / 8, padded to a power of two CP; threads with ch >= CH copy nothing) of rows r0 = tid / CP,
// r0 + NT / CP, ... through one source pointer advanced by a fixed row step, so a thread keeps one 64-bit
// address per tile across the item loop rather than one per chunk.
constexpr int pow2_at_least(int x) { return x <= 1 ? 1 : 2 * pow2_at_least((x + 1) / 2); }

template <int ROWS, int D, int NT, typename T>
TF_DEVICE void load_rows(T* s, gptr<const T> g, int64_t stride, int rows_valid, int cols_valid, int tid) {
  constexpr int CH = D / 8, CP = pow2_at_least(CH), RS = NT / CP;
  static_assert(NT % CP == 0 && ROWS % RS == 0, "whole passes of NT / CP rows");
  const int r0 = tid / CP, ch = tid % CP;
  if (CH != CP && ch >= CH) return;
  const bool col_ok = ch * 8 < cols_valid;
  gptr<const T> src = g + r0 * stride + ch * 8;
  T* dst = s + r0 * (D + 8) + ch * 8;
#pragma unroll
  for (int i = 0; i < ROWS / RS; ++i) {
    const bool ok = col_ok && r0 + i * RS < rows_valid;
    ptx::cp_async_16_zfill(dst + i * RS * (D + 8), ok ? src : g, ok);
    src += RS * stride;
  }
}

// dK/dV work item (query head hk * group + gi, query tile m0..m0 + BM - 1): issue the cp.async loads of its Q
// and dO tiles and store its lse2 / delta rows (plain stores) into one buffer.
template <typename T, int D, int BM, int NT>
TF_DEVICE void dkdv_issue(const Params& p, const SeqInfo& si, int b, int hk, int gi, int m0, T* sQb, T* sdOb,
                          float* sLb, float* sDlb, int tid) {
  const int64_t b64 = p.varlen ? 0 : b, h = int64_t(hk) * p.group + gi, tok = si.q_start + m0;
  const gptr<const T> Q = gcast<const T>(p.q) + b64 * p.stride_qb + h * p.stride_qh + tok * p.stride_qm;
  const gptr<const T> dO = gcast<const T>(p.dout) + b64 * p.stride_dob + h * p.stride_doh + tok * p.stride_dom;
  load_rows<BM, D, NT>(sQb, Q, p.stride_qm, si.rows_q - m0, p.head_dim, tid);
  load_rows<BM, D, NT>(sdOb, dO, p.stride_dom, si.rows_q - m0, p.head_dim, tid);
  const int64_t lrow = p.varlen ? h * p.total_q + tok : (int64_t(b) * p.hq + h) * p.max_q + m0;
  for (int r = tid; r < BM; r += NT) {
    const bool ok = m0 + r < si.rows_q;
    sLb[r] = ok ? lse2_of(p.lse[lrow + r]) : INFINITY;
    sDlb[r] = ok ? p.delta[lrow + r] : 0.f;
  }
}

// dQ += dS K for one query tile (rows m0..m0 + BM - 1 of query head h) and the block's BN keys, columns
// c0..c0 + DC - 1, added with fp32 atomicAdd into dq_accum (unscaled; the convert kernel multiplies by the
// softmax scale). dS^T is in sdS ([BN][BM + 8], all warps' keys; A fragments by ldmatrix .trans), K in sK
// (B[k = key][n = d]: ldmatrix .trans). Warp w takes 16-row tile w % RT and the 16-column tiles w / RT,
// w / RT + NWARPS / RT, ... (RT = BM / 16), in chunks of at most kDqChunk column tiles (the accumulators of a
// chunk, 8 kDqChunk registers, sit next to dK, dV): (1 + NC) ldmatrix.x4 per 2 NC mma per key step of a chunk
// of NC column tiles.
constexpr int kDqChunk = 4;

template <typename T, int D, int DC, int BM, int BN, int NWARPS>
TF_DEVICE void dq_atomic_tile(const Params& p, const SeqInfo& si, int b, int h, int m0, int c0, const T* sdS,
                              const T* sK, int warp, int lane) {
  constexpr int SD = D + 8, SS = BM + 8, RT = BM / 16, WPR = NWARPS / RT, CT = DC / 16;
  constexpr int NCW = (CT + WPR - 1) / WPR, NCH = NCW < kDqChunk ? NCW : kDqChunk;
  static_assert(NWARPS % RT == 0, "query tile rows per warp");
  const int r = warp % RT, w0 = warp / RT;
  const int g = lane >> 2, t = lane & 3;
  const int64_t row_stride = int64_t(p.hq) * p.head_dim;
  const int64_t base = (p.varlen ? 0 : int64_t(b) * p.max_q * row_stride) + int64_t(h) * p.head_dim;
  const gptr<float> dqa = p.dq_accum;
#pragma unroll
  for (int ch = 0; ch < NCW; ch += NCH) {
    float acc[NCH][2][4];
#pragma unroll
    for (int jj = 0; jj < NCH; ++jj)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[jj][0][i] = acc[jj][1][i] = 0.f;
#pragma unroll 1
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      ldm_a_trans<SS>(a, sdS, 16 * r, 16 * kk, lane);
#pragma unroll
      for (int jj = 0; jj < NCH; ++jj) {
        const int j = w0 + (ch + jj) * WPR;
        if ((CT % WPR == 0 && NCW % NCH == 0) || (ch + jj < NCW && j < CT)) {
          uint32_t bf[4];
          ldm_b_trans<SD>(bf, sK, 16 * kk, c0 + 16 * j, lane);
          mma2<T>(acc[jj][0], acc[jj][1], a, bf);
        }
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + 16 * r + g + 8 * half;
      if (row >= si.rows_q) continue;
      const gptr<float> dst = dqa + base + int64_t(si.q_start + row) * row_stride;
#pragma unroll
      for (int jj = 0; jj < NCH; ++jj) {
        const int j = w0 + (ch + jj) * WPR;
        if ((CT % WPR == 0 && NCW % NCH == 0) || (ch + jj < NCW && j < CT)) {
#pragma unroll
          for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = c0 + 16 * j + 8 * n + 2 * t + e;
              if (col < p.head_dim) atomicAdd(dst + col, acc[jj][n][2 * half + e]);
            }
        }
      }
    }
  }
}

// The dK/dV kernel (DQ = false) and the dK/dV + atomic dQ kernel (DQ = true) share this body.
template <bool DQ, bool DROPOUT, typename T, int D, int DC, int BM, int BN, int NWARPS, bool LOCAL = false>
TF_DEVICE void dkdv_body(const Params& p) {
  static_assert(BN == 16 * NWARPS && NWARPS % 2 == 0 && BM % 32 == 0 && D % 16 == 0 && DC % 32 == 0 &&
                D % DC == 0, "tile shapes");
  constexpr int SD = D + 8, SS = BM + 8, NT = NWARPS * 32, CW = DC / 2, QB = BM / 2;
  TF_DYNAMIC_SMEM(T, smem);
  T* sK = smem;                  // [BN][SD]
  T* sV = sK + BN * SD;          // [BN][SD]
  T* sQ = sV + BN * SD;          // [2][BM][SD]
  T* sdO = sQ + 2 * BM * SD;     // [2][BM][SD]
  float* sL = reinterpret_cast<float*>(sdO + 2 * BM * SD);   // [2][BM] lse2
  float* sDl = sL + 2 * BM;                                  // [2][BM] delta
  T* sP = reinterpret_cast<T*>(sDl + 2 * BM);                // [BN][BM + 8] P^T (with dropout P^T o Z r)
  T* sdS = sP + BN * SS;                                     // [BN][BM + 8] dS^T

  const int b = blockIdx.z, hk = blockIdx.y, n0 = int(blockIdx.x / (D / DC)) * BN;
  const int c0 = int(blockIdx.x % (D / DC)) * DC;   // this block's column slice of dK, dV
  const SeqInfo si = seq_info(p, b);
  if (n0 >= si.seqlen_k || c0 >= p.head_dim) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t b64 = p.varlen ? 0 : b;
  const gptr<const T> K = gcast<const T>(p.k) + b64 * p.stride_kb + hk * p.stride_kh + (si.k_start + n0) * p.stride_kn;
  const gptr<const T> V = gcast<const T>(p.v) + b64 * p.stride_vb + hk * p.stride_vh + (si.k_start + n0) * p.stride_vn;
  load_tile<BN, D, NT>(sK, K, p.stride_kn, si.seqlen_k - n0, p.head_dim, tid);
  load_tile<BN, D, NT>(sV, V, p.stride_vn, si.seqlen_k - n0, p.head_dim, tid);
  ptx::cp_async_commit();

  const int n_last = imin(n0 + BN, si.seqlen_k) - 1;
  const Range qr = query_range(p, si, n0, n_last, BM);
  const int q_tiles = (qr.hi - qr.lo + BM - 1) / BM, q_end = qr.lo + q_tiles * BM;
  const int items = q_tiles * p.group;   // (query head of the group, query tile), tile-major per head

  if (items > 0) dkdv_issue<T, D, BM, NT>(p, si, b, hk, 0, qr.lo, sQ, sdO, sL, sDl, tid);
  ptx::cp_async_commit();

  // Warp w = 2 kp + hf of pair kp owns keys 32 kp..32 kp + 31 (two 16-key m-tiles): phase 1 over the queries
  // hf QB..hf QB + QB - 1 of each tile, phase 2 (dK, dV accumulators) over the columns c0 + hf CW..+ CW - 1.
  const int kp = warp / 2, hf = warp % 2, c = c0 + hf * CW;
  float dk[2][CW / 8][4], dv[2][CW / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < CW / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) dk[mt][j][i] = dv[mt][j][i] = 0.f;
  const T* sKw = sK + 32 * kp * SD;
  const T* sVw = sV + 32 * kp * SD;
  T* sPw = sP + 32 * kp * SS;
  T* sdSw = sdS + 32 * kp * SS;
  const int col_lo = n0 + 32 * kp + (lane >> 2);   // this thread's first key (then + 8, + 16, + 24)

  int gi = 0, m0 = qr.lo;   // the item's query head (of the group) and query tile
  for (int it = 0; it < items; ++it) {
    const int buf = it & 1;
    const bool last_tile = m0 + BM >= q_end;
    const int gi_next = last_tile ? gi + 1 : gi, m0_next = last_tile ? qr.lo : m0 + BM;
    if (it + 1 < items) {
      dkdv_issue<T, D, BM, NT>(p, si, b, hk, gi_next, m0_next, sQ + (buf ^ 1) * BM * SD, sdO + (buf ^ 1) * BM * SD,
                               sL + (buf ^ 1) * BM, sDl + (buf ^ 1) * BM, tid);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
    const Scale sc = make_scale(p, b, hk * p.group + gi);
    Dropout dr{};   // read per item: not held across the loop
    if constexpr (DROPOUT) dr = make_dropout(p, b, hk * p.group + gi);
    const T* sQb = sQ + buf * BM * SD;
    const T* sdOb = sdO + buf * BM * SD;
    const float* sLh = sL + buf * BM + hf * QB;
    const float* sDlh = sDl + buf * BM + hf * QB;
    if (m0 < qr.full_lo || m0 >= qr.full_hi)
      dkdv_scores<true, DROPOUT, LOCAL, T, D, BM>(p, si, sc, dr, sKw, sVw, sQb + hf * QB * SD, sdOb + hf * QB * SD,
                                                  sLh, sDlh, m0 + hf * QB, col_lo, sPw + hf * QB, sdSw + hf * QB, lane);
    else
      dkdv_scores<false, DROPOUT, LOCAL, T, D, BM>(p, si, sc, dr, sKw, sVw, sQb + hf * QB * SD, sdOb + hf * QB * SD,
                                                   sLh, sDlh, m0 + hf * QB, col_lo, sPw + hf * QB, sdSw + hf * QB, lane);
    __syncthreads();   // P^T, dS^T of the whole tile are in sP, sdS
    dkdv_accumulate<T, D, DC, BM>(sPw, sdSw, sQb, sdOb, c, dk, dv, lane);
    if constexpr (DQ) dq_atomic_tile<T, D, DC, BM, BN, NWARPS>(p, si, b, hk * p.group + gi, m0, c0, sdS, sK, warp, lane);
    __syncthreads();
    gi = gi_next;
    m0 = m0_next;
  }
  ptx::cp_async_wait<0>();   // no query tile: K / V copies must land before the epilogue reuses sK / sV
  __syncthreads();

  // dK = scale * sum dS^T Q; stage through this warp's block (its pair's rows, its columns) of sK / sV, 16-byte
  // stores (dk, dv contiguous).
  const int64_t row_stride = int64_t(p.hkv) * p.head_dim;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const int r0 = 32 * kp + 16 * mt;   // the m-tile's first row in the block
    T* sdKw = sK + r0 * SD + c;
    T* sdVw = sV + r0 * SD + c;
    acc_to_smem<CW, SD, T>(sdKw, dk[mt], p.scale, p.scale, lane);
    acc_to_smem<CW, SD, T>(sdVw, dv[mt], 1.f, 1.f, lane);
    __syncwarp();
    const int rows_left = si.seqlen_k - n0 - r0;
    const int64_t base = (p.varlen ? 0 : int64_t(b) * p.max_k * row_stride) + (si.k_start + n0 + r0) * row_stride +
                         hk * p.head_dim + c;
    store_rows16<CW, SD, T>(gcast<T>(p.dk) + base, row_stride, sdKw, rows_left, p.head_dim - c, lane);
    store_rows16<CW, SD, T>(gcast<T>(p.dv) + base, row_stride, sdVw, rows_left, p.head_dim - c, lane);
  }
}

template <typename T, int D, int DC, int BM, int BN, int NWARPS, bool DROPOUT = false>
__global__ void __launch_bounds__(NWARPS * 32) attn_bwd_dkdv_kernel(const Params p) {
  dkdv_body<false, DROPOUT, T, D, DC, BM, BN, NWARPS>(p);
}

template <typename T, int D, int DC, int BM, int BN, int NWARPS, bool DROPOUT = false, bool LOCAL = false>
__global__ void __launch_bounds__(NWARPS * 32) attn_bwd_dkdvdq_kernel(const Params p) {
  dkdv_body<true, DROPOUT, T, D, DC, BM, BN, NWARPS, LOCAL>(p);
}

// x[0, 4 n4) = 0 (fp32, 16-byte aligned). Grid-stride, NT threads (a template: defined in every unit).
template <int NT>
__global__ void __launch_bounds__(NT) attn_fill_zero_kernel(gptr<float> x, int64_t n4) {
  for (int64_t i = int64_t(blockIdx.x) * NT + threadIdx.x; i < n4; i += int64_t(gridDim.x) * NT)
    *gcast<float4>(x + 4 * i) = make_float4(0.f, 0.f, 0.f, 0.f);
}

// dq[0, 8 n8) = T(scale * acc) (acc fp32, 16-byte aligned; dq 16-byte aligned). Grid-stride, 256 threads.
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_dq_convert_kernel(gptr<const float> acc, gptr<T> dq, int64_t n8,
                                                                  float scale) {
  for (int64_t i = int64_t(blockIdx.x) * 256 + threadIdx.x; i < n8; i += int64_t(gridDim.x) * 256) {
    const float4 a = *gcast<const float4>(acc + 8 * i), c = *gcast<const float4>(acc + 8 * i + 4);
    uint4 o;
    o.x = ptx::pack2<T>(a.x * scale, a.y * scale);
    o.y = ptx::pack2<T>(a.z * scale, a.w * scale);
    o.z = ptx::pack2<T>(c.x * scale, c.y * scale);
    o.w = ptx::pack2<T>(c.z * scale, c.w * scale);
    *gcast<uint4>(dq + 8 * i) = o;
  }
}

template <int D, int BM, int BN>
constexpr size_t dq_smem_bytes() {   // Q, dO [BM][SD]; 2 x (K, V) [BN][SD]
  return size_t(2 * BM + 4 * BN) * (D + 8) * 2;
}

// One key tile for one warp's 16 queries: accumulate dQ.
template <bool MASKED, bool DROPOUT, typename T, int D, int BN>
TF_DEVICE void dq_tile(const Params& p, const SeqInfo& si, const Scale& sc, const Dropout& dr, const T* sQw,
                       const T* sdOw, const T* sKb, const T* sVb, int n0, int row_lo, const float (&lse2)[2],
                       const float (&delta)[2], float (&dq)[D / 8][4], int lane) {
  constexpr int SD = D + 8;
  const int t = lane & 3;
  float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.f;
  // S = Q K^T and dP = dO V^T (K, V are [key][d] = Bt[n][k])
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t aq[4], ado[4];
    ldm_a<SD>(aq, sQw, 0, 16 * kk, lane);
    ldm_a<SD>(ado, sdOw, 0, 16 * kk, lane);
#pragma unroll
    for (int jj = 0; jj < BN / 16; ++jj) {
      uint32_t b[4];
      ldm_bt<SD>(b, sKb, 16 * jj, 16 * kk, lane);
      mma2<T>(s[2 * jj], s[2 * jj + 1], aq, b);
      ldm_bt<SD>(b, sVb, 16 * jj, 16 * kk, lane);
      mma2<T>(dp[2 * jj], dp[2 * jj + 1], ado, b);
    }
  }
  const Band band[2] = {keys_of_query(p, si, row_lo), keys_of_query(p, si, row_lo + 8)};   // used if MASKED
  RowKeep<BN> keep;
  if constexpr (DROPOUT) keep = row_keep<BN>(dr, n0, row_lo, lane);
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = i >> 1, row = row_lo + 8 * r, col = n0 + 8 * j + 2 * t + (i & 1);
      float tc;
      float x = score(s[j][i], sc, row, col, si.off, tc);
      if (MASKED && !band[r].has(col)) x = -INFINITY;
      float dpz = dp[j][i];   // with dropout Z r o dP
      if constexpr (DROPOUT) dpz = keep.keep(j, i, t) ? dpz * p.drop_scale : 0.f;
      float ds = ptx::ex2_approx(x - lse2[r]) * (dpz - delta[r]);
      if (sc.cap2 != 0.f) ds *= 1.f - tc * tc;
      s[j][i] = ds;
    }
  // dQ += dS K (K is [key][d] = B[k][n]: ldmatrix .trans)
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    uint32_t a[4];
    acc_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t b[4];
      ldm_b_trans<SD>(b, sKb, 16 * kk, 16 * dd, lane);
      mma2<T>(dq[2 * dd], dq[2 * dd + 1], a, b);
    }
  }
}

template <typename T, int D, int BM, int BN, int NWARPS, bool DROPOUT = false>
__global__ void __launch_bounds__(NWARPS * 32) attn_bwd_dq_kernel(const Params p) {
  static_assert(BM == 16 * NWARPS && BN % 16 == 0 && D % 16 == 0, "tile shapes");
  constexpr int SD = D + 8, NT = NWARPS * 32;
  TF_DYNAMIC_SMEM(T, smem);
  T* sQ = smem;                  // [BM][SD]
  T* sdO = sQ + BM * SD;         // [BM][SD]
  T* sK = sdO + BM * SD;         // [2][BN][SD]
  T* sV = sK + 2 * BN * SD;      // [2][BN][SD]

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const SeqInfo si = seq_info(p, b);
  if (m0 >= si.rows_q) return;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t b64 = p.varlen ? 0 : b, hk = h / p.group, tok = si.q_start + m0;
  const gptr<const T> Q = gcast<const T>(p.q) + b64 * p.stride_qb + h * p.stride_qh + tok * p.stride_qm;
  const gptr<const T> dO = gcast<const T>(p.dout) + b64 * p.stride_dob + h * p.stride_doh + tok * p.stride_dom;
  const gptr<const T> K = gcast<const T>(p.k) + b64 * p.stride_kb + hk * p.stride_kh + si.k_start * p.stride_kn;
  const gptr<const T> V = gcast<const T>(p.v) + b64 * p.stride_vb + hk * p.stride_vh + si.k_start * p.stride_vn;
  const Scale sc = make_scale(p, b, h);
  Dropout dr{};
  if constexpr (DROPOUT) dr = make_dropout(p, b, h);
  const int m_last = imin(m0 + BM, si.rows_q) - 1;
  const Range kr = key_range(p, si, m0, m_last, BN);
  const int n_tiles = (kr.hi - kr.lo + BN - 1) / BN;

  load_tile<BM, D, NT>(sQ, Q, p.stride_qm, si.rows_q - m0, p.head_dim, tid);
  load_tile<BM, D, NT>(sdO, dO, p.stride_dom, si.rows_q - m0, p.head_dim, tid);
  if (n_tiles > 0) {
    load_tile<BN, D, NT>(sK, K + int64_t(kr.lo) * p.stride_kn, p.stride_kn, si.seqlen_k - kr.lo, p.head_dim, tid);
    load_tile<BN, D, NT>(sV, V + int64_t(kr.lo) * p.stride_vn, p.stride_vn, si.seqlen_k - kr.lo, p.head_dim, tid);
  }
  ptx::cp_async_commit();

  const int row_lo = m0 + 16 * warp + (lane >> 2);
  const int64_t lrow = p.varlen ? h * p.total_q + si.q_start : (int64_t(b) * p.hq + h) * p.max_q;
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool ok = row_lo + 8 * r < si.rows_q;
    lse2[r] = ok ? lse2_of(p.lse[lrow + row_lo + 8 * r]) : INFINITY;
    delta[r] = ok ? p.delta[lrow + row_lo + 8 * r] : 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) dq[j][i] = 0.f;
  const T* sQw = sQ + 16 * warp * SD;
  const T* sdOw = sdO + 16 * warp * SD;

  for (int it = 0; it < n_tiles; ++it) {
    const int n0 = kr.lo + it * BN, buf = it & 1;
    if (it + 1 < n_tiles) {
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
    if (n0 < kr.full_lo || n0 >= kr.full_hi)
      dq_tile<true, DROPOUT, T, D, BN>(p, si, sc, dr, sQw, sdOw, sKb, sVb, n0, row_lo, lse2, delta, dq, lane);
    else
      dq_tile<false, DROPOUT, T, D, BN>(p, si, sc, dr, sQw, sdOw, sKb, sVb, n0, row_lo, lse2, delta, dq, lane);
    __syncthreads();
  }
  ptx::cp_async_wait<0>();
  __syncthreads();

  T* sdQw = const_cast<T*>(sQw);   // this warp's rows of the Q tile
  acc_to_smem<D, SD, T>(sdQw, dq, p.scale, p.scale, lane);
  __syncwarp();
  const int64_t row_stride = int64_t(p.hq) * p.head_dim;   // dq is contiguous like q
  const int64_t base = (p.varlen ? 0 : int64_t(b) * p.max_q * row_stride) + (tok + 16 * warp) * row_stride +
                       h * p.head_dim;
  store_rows16<D, SD, T>(gcast<T>(p.dq) + base, row_stride, sdQw, si.rows_q - m0 - 16 * warp, p.head_dim, lane);
}

// x (and y) [total, heads, head_dim] contiguous: rows of tokens t < clamp(cu[0], 0, total) or
// t >= clamp(cu[n_seqs], 0, total) set to 0; lse [heads, total] (if not null) to -inf. Every token in no
// sequence is among them (sequence b is [s_b, max(s_b, s_{b+1})) with s_b = clamp(cu[b], 0, total): a token
// t >= s_0 with t < s_{n_seqs} lies in the sequence whose start steps over it). Grid (cdiv(total, 16)), 128
// threads.
template <typename T>
__global__ void __launch_bounds__(128) attn_zero_tail_kernel(gptr<T> x, gptr<T> y, gptr<float> lse,
                                                             gptr<const int> cu, int n_seqs, int64_t total,
                                                             int heads, int head_dim) {
  const int64_t first = lmin(lmax(int64_t(cu[0]), 0), total), last = lmin(lmax(int64_t(cu[n_seqs]), 0), total);
  const int64_t t0 = int64_t(blockIdx.x) * 16;
  const int64_t row = int64_t(heads) * head_dim;
  for (int64_t t = t0; t < lmin(t0 + 16, total); ++t) {
    if (t >= first && t < last) continue;
    for (int64_t i = threadIdx.x; i < row; i += 128) {
      x[t * row + i] = from_float<T>(0.f);
      if (y) y[t * row + i] = from_float<T>(0.f);
    }
    if (lse)
      for (int hh = threadIdx.x; hh < heads; hh += 128) lse[hh * total + t] = -INFINITY;
  }
}

}  // namespace tf::attention
