// Device helpers shared by the flash-attention kernels (fwd.cuh, bwd.cuh): sequence geometry, the visible
// band, tile loads (cp.async into padded shared memory), mma.m16n8k16 fragments (ldmatrix), scores.
//
// Tiles in shared memory are row-major [rows][D + 8] (T elements): the 16-byte pad shifts consecutive rows by
// 4 banks, so the 8 row addresses of every ldmatrix 8x8 matrix hit 8 distinct 16-byte bank groups (no bank
// conflicts), for any D. Fragment layouts (common/ptx.cuh): g = lane >> 2, t = lane & 3; an accumulator
// c[4] of a 16x8 tile holds rows g (c[0], c[1]) and g + 8 (c[2], c[3]), columns 2t and 2t + 1.
#pragma once

#include <cmath>

#include "attention/attention.h"
#include "common/device.cuh"
#include "common/ptx.cuh"

namespace tf::attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

TF_DEVICE int imin(int a, int b) { return a < b ? a : b; }
TF_DEVICE int imax(int a, int b) { return a > b ? a : b; }
TF_DEVICE int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
TF_DEVICE int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
TF_DEVICE int64_t lcdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }   // a >= 0

// One (query sequence, key sequence) pair: packed token offsets (varlen; 0 dense), lengths, alignment offset,
// and the queries computed: rows [0, rows_q), rows_q = min(seqlen_q, max_q) (varlen: queries past max_q are
// not computed; dense: every query). Varlen token indices fit in 32 bits: total <= kMaxTokens (the bindings
// check it), so start + index < 2^31 for every index inside a sequence.
struct SeqInfo {
  int q_start, k_start;
  int seqlen_q, seqlen_k, off, rows_q;
};

// Sequence b of a packed batch: [clamp(cu[b], 0, total), clamp(cu[b + 1], start, total)), for any cu values.
TF_DEVICE void varlen_span(gptr<const int> cu, int b, int64_t total, int& start, int& len) {
  const int t = int(total);
  const int s = imin(imax(cu[b], 0), t);
  const int e = imin(imax(cu[b + 1], s), t);
  start = s;
  len = e - s;
}

TF_DEVICE SeqInfo seq_info(const Params& p, int b) {
  SeqInfo s;
  if (p.varlen) {
    varlen_span(p.cu_q, b, p.total_q, s.q_start, s.seqlen_q);
    varlen_span(p.cu_k, b, p.total_k, s.k_start, s.seqlen_k);
  } else {
    s.q_start = 0;
    s.k_start = 0;
    s.seqlen_q = p.max_q;
    s.seqlen_k = p.max_k;
  }
  s.off = p.bottom_right ? s.seqlen_k - s.seqlen_q : 0;
  s.rows_q = imin(s.seqlen_q, p.max_q);
  return s;
}

// Tiles [lo, full_lo) and [full_hi, hi) of a loop cross a band edge (masked); [full_lo, full_hi) are fully
// visible (no mask); tiles outside [lo, hi) see nothing and are skipped. All multiples of the tile size
// except hi (the sequence end).
struct Range {
  int lo, full_lo, full_hi, hi;
};

// Key tiles (BN keys) seen by the query rows m0..m_last (as triton_kernels/attention_fwd.py::_key_range).
TF_DEVICE Range key_range(const Params& p, const SeqInfo& s, int m0, int m_last, int BN) {
  int64_t lo = 0, hi = s.seqlen_k;
  if (p.mask_left) lo = lmax(int64_t(m0) + s.off - p.win_left, 0);
  if (p.mask_right) hi = lmin(int64_t(m_last) + s.off + p.win_right + 1, s.seqlen_k);
  lo = (lo / BN) * BN;
  hi = lmax(hi, lo);
  int64_t full_lo = lo;
  if (p.mask_left) full_lo = lmax(full_lo, lcdiv(lmax(int64_t(m_last) + s.off - p.win_left, 0), BN) * BN);
  full_lo = lmin(full_lo, hi);
  int64_t full_end = s.seqlen_k;   // every row must see the tile's last key, which must exist
  if (p.mask_right) full_end = lmin(full_end, int64_t(m0) + s.off + p.win_right + 1);
  int64_t full_hi = (lmax(full_end, 0) / BN) * BN;
  full_hi = lmax(lmin(full_hi, hi), full_lo);
  return {int(lo), int(full_lo), int(full_hi), int(hi)};
}

// Query tiles (BM queries) among the computed rows [0, rows_q) that see the keys n0..n_last (as
// attention_bwd.py::_query_range). Query rows past rows_q need no mask: their lse is read as +inf, so their P
// is 0.
TF_DEVICE Range query_range(const Params& p, const SeqInfo& s, int n0, int n_last, int BM) {
  int64_t lo = 0, hi = s.rows_q;
  if (p.mask_right) lo = lmax(int64_t(n0) - s.off - p.win_right, 0);          // i >= j - off - right
  if (p.mask_left) hi = lmin(int64_t(n_last) - s.off + p.win_left + 1, s.rows_q);   // i <= j - off + left
  lo = (lo / BM) * BM;
  hi = lmax(hi, lo);
  int64_t full_lo = lo;
  if (p.mask_right) full_lo = lmax(full_lo, lcdiv(lmax(int64_t(n_last) - s.off - p.win_right, 0), BM) * BM);
  full_lo = lmin(full_lo, hi);
  int64_t full_hi = hi;
  if (p.mask_left) full_hi = lmin((lmax(int64_t(n0) - s.off + p.win_left + 1, 0) / BM) * BM, hi);
  full_hi = lmax(full_hi, full_lo);
  return {int(lo), int(full_lo), int(full_hi), int(hi)};
}

// Visible index interval [lo, hi] (32-bit, clamped; empty when lo > hi): the keys a query row sees, or the
// queries that see a key. Computed once per row / key, so the masked tiles compare two ints per element.
struct Band {
  int lo, hi;
  TF_DEVICE bool has(int x) const { return lo <= x && x <= hi; }
};

TF_DEVICE int clamp_int(int64_t x) { return int(lmin(lmax(x, -1), 2147483647)); }

TF_DEVICE Band keys_of_query(const Params& p, const SeqInfo& s, int row) {
  int64_t lo = 0, hi = int64_t(s.seqlen_k) - 1;
  if (p.mask_left) lo = lmax(lo, int64_t(row) + s.off - p.win_left);
  if (p.mask_right) hi = lmin(hi, int64_t(row) + s.off + p.win_right);
  return {clamp_int(lo), clamp_int(hi)};
}

TF_DEVICE Band queries_of_key(const Params& p, const SeqInfo& s, int key) {
  if (key >= s.seqlen_k) return {1, 0};
  int64_t lo = 0, hi = 2147483647;
  if (p.mask_right) lo = lmax(lo, int64_t(key) - s.off - p.win_right);   // j <= i + off + right
  if (p.mask_left) hi = lmin(hi, int64_t(key) - s.off + p.win_left);     // j >= i + off - left
  return {clamp_int(lo), clamp_int(hi)};
}

// Scores in the log2 domain from raw q.k products (see Scale). Also returns tanh(.) for the softcap
// derivative (1 - t^2) in the backward.
struct Scale {
  float qk;       // scale * log2(e), or scale / softcap with softcap
  float cap2;     // softcap * log2(e), or 0 (no softcap)
  float slope2;   // ALiBi slope * log2(e), or 0
};

TF_DEVICE Scale make_scale(const Params& p, int b, int h) {
  Scale sc;
  if (p.softcap > 0.f) {
    sc.qk = p.scale / p.softcap;
    sc.cap2 = p.softcap * kLog2e;
  } else {
    sc.qk = p.scale * kLog2e;
    sc.cap2 = 0.f;
  }
  sc.slope2 = p.alibi ? p.alibi[int64_t(b) * p.stride_ab + int64_t(h) * p.stride_ah] * kLog2e : 0.f;
  return sc;
}

// tanh(x) = 1 - 2 / (2^(2 x log2 e) + 1): exp2 only, saturates cleanly to +-1.
TF_DEVICE float tanh_fast(float x) {
  return 1.f - __fdividef(2.f, ptx::ex2_approx(x * (2.f * kLog2e)) + 1.f);
}

// s2 (log2 domain) of a raw product qk at (row, col); t = tanh(.) with softcap (else unused).
TF_DEVICE float score(float qk, const Scale& sc, int row, int col, int off, float& t) {
  float s;
  if (sc.cap2 != 0.f) {
    t = tanh_fast(qk * sc.qk);
    s = t * sc.cap2;
  } else {
    t = 0.f;
    s = qk * sc.qk;
  }
  if (sc.slope2 != 0.f) s -= sc.slope2 * fabsf(float(row + off - col));
  return s;
}

// ---------------------------------------------------------------------------------------------
// Attention dropout: the counter-based mask of transformer/reference.py (dropout_keep)
// ---------------------------------------------------------------------------------------------
//
// Element (bh, i, j) (bh = b * Hq + h, b the batch element or varlen sequence, h the query head; i the query
// row, j the key column, both counted from the sequence start) takes Philox4x32-10 under the key (seed mod 2^32,
// seed >> 32) of the counter (j >> 3, i, bh, offset mod 2^32), and from it the 16-bit half j & 1 (0: low) of
// output word (j & 7) >> 1; it is dropped iff that half is < drop_thr. One Philox call thus serves the 8 keys of
// one key group (j >> 3) of one row: keep_byte returns them as 8 bits.

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;   // round multipliers
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;   // key schedule (Weyl) increments

// Philox4x32-10 of the counter c under the key (k0, k1), in place. The 32 x 32 -> 64-bit products are plain
// integer multiplies (one mul.wide.u32 on the GPU).
TF_DEVICE void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(kPhiloxM0) * c[0], p1 = uint64_t(kPhiloxM1) * c[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0), hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c[0] = hi1 ^ c[1] ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ k1;
    c[3] = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The mask of one (batch element, query head): key and counter words read from rng_state, bh, threshold.
struct Dropout {
  uint32_t k0, k1;    // seed mod 2^32, (seed >> 32) mod 2^32
  uint32_t offset;    // offset mod 2^32
  uint32_t bh;        // b * Hq + h
  uint32_t thr;       // drop_thr
};

// Reads (seed, offset) from p.rng_state (device memory: the launch is CUDA-graph safe); bh of head h of b.
TF_DEVICE Dropout make_dropout(const Params& p, int b, int h) {
  const uint64_t seed = uint64_t(p.rng_state[0]), offset = uint64_t(p.rng_state[1]);
  return {uint32_t(seed), uint32_t(seed >> 32), uint32_t(offset), uint32_t(int64_t(b) * p.hq + h), p.drop_thr};
}

// Keep bits of keys 8 group .. 8 group + 7 of query row `row`: bit b set iff key 8 group + b is kept.
TF_DEVICE uint32_t keep_byte(const Dropout& d, uint32_t group, uint32_t row) {
  uint32_t c[4] = {group, row, d.bh, d.offset};
  philox4x32_10(c, d.k0, d.k1);
  uint32_t m = 0;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    m |= uint32_t((c[w] & 0xFFFFu) >= d.thr) << (2 * w);
    m |= uint32_t((c[w] >> 16) >= d.thr) << (2 * w + 1);
  }
  return m;
}

// Keep bits of one warp's 16 x BN score tile in the accumulator layout (s[j][i]: query row_lo + 8 (i >> 1),
// key n0 + 8 j + 2 t + (i & 1); n0 a multiple of 8). The 4 lanes of a quad share a row pair and so the 2 BN / 8
// Philox calls of its rows: lane t makes calls c = 4 k + t (row half c / (BN / 8), key group c % (BN / 8)),
// packs their keep bytes into one word (byte k) and the quad exchanges the words with 4 shuffles.
template <int BN>
struct RowKeep {
  uint32_t w[4];   // w[u]: the word of quad lane u
  TF_DEVICE bool keep(int j, int i, int t) const {   // element s[j][i] of lane t
    const int c = (i >> 1) * (BN / 8) + j;
    return (w[c & 3] >> (8 * (c >> 2) + 2 * t + (i & 1))) & 1u;
  }
};

template <int BN>
TF_DEVICE RowKeep<BN> row_keep(const Dropout& d, int n0, int row_lo, int lane) {
  constexpr int NJ = BN / 8, PER = 2 * NJ / 4;
  static_assert(BN % 16 == 0 && PER <= 4, "one 32-bit word of keep bytes per lane");
  const int t = lane & 3;
  uint32_t mine = 0;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int c = 4 * k + t, r = c / NJ, j = c % NJ;
    mine |= keep_byte(d, uint32_t(n0 / 8 + j), uint32_t(row_lo + 8 * r)) << (8 * k);
  }
  RowKeep<BN> m;
#pragma unroll
  for (int u = 0; u < 4; ++u) m.w[u] = __shfl_sync(kFullMask, mine, (lane & ~3) | u);
  return m;
}

// Keep bits of one warp's transposed 16 x BM tile (the dK/dV kernel's S^T: s[j][i] of lane (g, t) is key
// key_lo + 8 (i >> 1) (key_lo = 16-key block start + g), query m0 + 8 j + 2 t + (i & 1)). The 8 lanes of one t
// share the 2 BM / 4 calls of their queries and the two key groups of the warp: lane g makes calls c = 8 k + g
// (key group c / (BM / 4), query 8 ((c >> 1) % (BM / 8)) + 2 t + (c & 1)), packs their keep bytes into one word
// and the 8 lanes exchange the words with 8 shuffles.
template <int BM>
struct ColKeep {
  uint32_t w[8];   // w[u]: the word of lane 4 u + t
  TF_DEVICE bool keep(int j, int i, int g) const {   // element s[j][i] of lane (g, t)
    const int c = ((i >> 1) * (BM / 8) + j) * 2 + (i & 1);
    return (w[c & 7] >> (8 * (c >> 3) + g)) & 1u;
  }
};

template <int BM>
TF_DEVICE ColKeep<BM> col_keep(const Dropout& d, int key_lo, int m0, int lane) {
  constexpr int PER = BM / 16;
  static_assert(BM % 16 == 0 && PER <= 4, "one 32-bit word of keep bytes per lane");
  const int g = lane >> 2, t = lane & 3, group0 = (key_lo - g) / 8;
  uint32_t mine = 0;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int c = 8 * k + g, kg = c / (BM / 4), j = (c >> 1) % (BM / 8);
    mine |= keep_byte(d, uint32_t(group0 + kg), uint32_t(m0 + 8 * j + 2 * t + (c & 1))) << (8 * k);
  }
  ColKeep<BM> m;
#pragma unroll
  for (int u = 0; u < 8; ++u) m.w[u] = __shfl_sync(kFullMask, mine, 4 * u + t);
  return m;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles and fragments
// ---------------------------------------------------------------------------------------------

// cp.async ROWS x D tile rows [0, rows_valid) x columns [0, cols_valid) of g (row stride `stride` elements)
// into s ([ROWS][D + 8]); the rest is zero-filled. Every thread of the block (NT) takes part.
template <int ROWS, int D, int NT, typename T>
TF_DEVICE void load_tile(T* s, gptr<const T> g, int64_t stride, int rows_valid, int cols_valid, int tid) {
  constexpr int CH = D / 8;   // 16-byte chunks per row
#pragma unroll
  for (int i = 0; i < (ROWS * CH + NT - 1) / NT; ++i) {
    const int c = tid + i * NT;
    if (ROWS * CH % NT == 0 || c < ROWS * CH) {
      const int r = c / CH, ch = c % CH;
      const bool ok = r < rows_valid && ch * 8 < cols_valid;
      ptx::cp_async_16_zfill(s + r * (D + 8) + ch * 8, ok ? g + r * stride + ch * 8 : g, ok);
    }
  }
}

// Store rows [0, rows_valid) x columns [0, cols_valid) of a 16 x NC shared tile (row stride SD) to global
// memory (row stride `stride`, 16-byte aligned rows), one warp, 16-byte stores. NC = D, or the DC-wide column
// slice of a column-split kernel (s and g then point at the slice's first column).
template <int NC, int SD, typename T>
TF_DEVICE void store_rows16(gptr<T> g, int64_t stride, const T* s, int rows_valid, int cols_valid, int lane) {
  constexpr int CH = NC / 8;
#pragma unroll
  for (int i = 0; i < (16 * CH + 31) / 32; ++i) {
    const int c = lane + i * 32;
    if (16 * CH % 32 == 0 || c < 16 * CH) {
      const int r = c / CH, ch = c % CH;
      if (r < rows_valid && ch * 8 < cols_valid)
        *gcast<uint4>(g + r * stride + ch * 8) = *reinterpret_cast<const uint4*>(s + r * SD + ch * 8);
    }
  }
}

// A fragment (16 x 16, row-major rows r0.., k columns k0..) of a [rows][SD] shared tile.
template <int SD, typename T>
TF_DEVICE void ldm_a(uint32_t (&a)[4], const T* s, int r0, int k0, int lane) {
  ptx::ldmatrix_x4(a, s + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + k0 + (lane >> 4) * 8);
}

// B fragments of two 8-column n-tiles (n0.., n0+8..) for one k-step (k0..k0+15), from a tile stored as
// Bt[n][k] (rows = n): b[0..1] n-tile 0, b[2..3] n-tile 1.
template <int SD, typename T>
TF_DEVICE void ldm_bt(uint32_t (&b)[4], const T* s, int n0, int k0, int lane) {
  ptx::ldmatrix_x4(b, s + (n0 + (lane & 7) + (lane >> 4) * 8) * SD + k0 + ((lane >> 3) & 1) * 8);
}

// As ldm_bt, from a tile stored as B[k][n] (rows = k): ldmatrix .trans.
template <int SD, typename T>
TF_DEVICE void ldm_b_trans(uint32_t (&b)[4], const T* s, int k0, int n0, int lane) {
  ptx::ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + n0 + (lane >> 4) * 8);
}

// A fragment (16 x 16: rows m0.., k columns k0..) of a tile stored transposed, At[k][m] (rows = k):
// ldmatrix .trans; matrices in a[]'s order (m 0-7 / 8-15 x k 0-7, then k 8-15).
template <int SD, typename T>
TF_DEVICE void ldm_a_trans(uint32_t (&a)[4], const T* s, int m0, int k0, int lane) {
  ptx::ldmatrix_x4_trans(a, s + (k0 + (lane & 7) + (lane >> 4) * 8) * SD + m0 + ((lane >> 3) & 1) * 8);
}

template <typename T>
TF_DEVICE void mma2(float (&c0)[4], float (&c1)[4], const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
  ptx::mma_m16n8k16<T>(c0, a, b0, c0);
  ptx::mma_m16n8k16<T>(c1, a, b1, c1);
}

// The A fragment of k-step kk (16 columns) of a 16 x N fp32 accumulator tile acc[N / 8][4] (the P / dS
// trick: an mma output is converted in registers into the next mma's input, no shared memory).
template <typename T>
TF_DEVICE void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = ptx::pack2<T>(c0[0], c0[1]);
  a[1] = ptx::pack2<T>(c0[2], c0[3]);
  a[2] = ptx::pack2<T>(c1[0], c1[1]);
  a[3] = ptx::pack2<T>(c1[2], c1[3]);
}

// Write a 16 x NC fp32 accumulator (acc[NC / 8][4], times `mul` per row half) as T into a shared tile of row
// stride SD (columns [0, NC) from s).
template <int NC, int SD, typename T>
TF_DEVICE void acc_to_smem(T* s, const float (&acc)[NC / 8][4], float mul_lo, float mul_hi, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < NC / 8; ++j) {
    *reinterpret_cast<uint32_t*>(s + g * SD + 8 * j + 2 * t) = ptx::pack2<T>(acc[j][0] * mul_lo, acc[j][1] * mul_lo);
    *reinterpret_cast<uint32_t*>(s + (g + 8) * SD + 8 * j + 2 * t) = ptx::pack2<T>(acc[j][2] * mul_hi, acc[j][3] * mul_hi);
  }
}

// One step of the online softmax for the two rows a thread holds in the m16n8 accumulator layout (row_lo and
// row_lo + 8, each spread over the 4 lanes of a quad): mx[r] (this tile's row maxima over the thread's columns)
// becomes the quad's maximum; alpha[r] = 2^(m_i - new max) rescales the running sums and outputs; m_use[r] is the
// maximum to subtract from this tile's scores (0 for a row that has seen only -inf, keeping exp2 off
// (-inf) - (-inf)); m_i[r] becomes the new running maximum.
TF_DEVICE void online_max_step(float mx[2], float m_i[2], float alpha[2], float m_use[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 2));
    m_use[r] = mx[r] == -INFINITY ? 0.f : mx[r];
    alpha[r] = ptx::ex2_approx(m_i[r] - m_use[r]);
    m_i[r] = mx[r];
  }
}

}  // namespace tf::attention
