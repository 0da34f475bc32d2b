// Device pieces shared by the two decode kernels (decode/split_mma.cuh, decode/split_simt.cuh):
//
//   TileConfig / SmemLayout  tile sizes per padded head dim and the dynamic shared memory map
//   BlockCtx                 which (sequence, KV head, row block, split) a block serves and its KV range
//   KvPipe                   the K/V tile pipeline: page-table lookups one tile ahead into a small ring,
//                            16-byte cp.async copies (zero-filled past the range and for invalid pages) in
//                            kStages stages, and per tile a 64-bit mask of its keys that are visible at all
//                            (inside the block's range, on a valid page). Quantized caches (KV != 0): the
//                            stages hold the 8-bit rows, the ring also the rows' K and V scales (loaded with
//                            the page ids), and dequant(t) turns tile t into one 16-bit K and V tile of q's
//                            dtype (x * scale, rounded once), which the kernels read as they read a 16-bit
//                            cache's tiles
//   RowInfo / score()        per query row: position, ALiBi slope; score transform and visibility
//   merge_and_store()        merges the per-warp (or per-lane-group) partial softmax states through shared
//                            memory and writes out/lse, or the split partials for the combine kernel
//
// Scores live in log2 units: s2 = q.k * scale * log2(e) (or softcap * log2(e) * tanh(q.k * scale / softcap)),
// minus slope * log2(e) * |q_pos - key| with ALiBi, so every exponential is one ex2.
#pragma once

#include <type_traits>

#include "common/device.cuh"
#include "common/ptx.cuh"
#include "decode/decode.h"

namespace tf::decode {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kThreads = 128;      // 4 warps per block, both kernels
constexpr int kSimtRows = 4;       // the CUDA-core kernel serves group * Sq <= 4 rows per KV head
constexpr float kNegInf = -__builtin_huge_valf();

template <int D_PAD>
struct TileConfig {
  static_assert(D_PAD % 16 == 0 && D_PAD <= 256, "padded head dim: a multiple of 16, at most 256");
  static constexpr int kBlockN = 64;                     // keys per K/V tile
  static constexpr int kStages = D_PAD <= 128 ? 3 : 2;   // cp.async pipeline depth
  static constexpr int kRow = D_PAD + 8;                 // smem row pitch (halves): +16 B against bank conflicts
  static constexpr int kChunks = D_PAD / 8;              // 16-byte chunks per row
  static constexpr int kMaxWarpsM = D_PAD <= 128 ? 4 : 2;  // tensor-core kernel: at most 16 * this rows per block
};

// Dynamic shared memory: K stages | V stages | (quantized: 8-bit K stages | 8-bit V stages) | Q tile (tensor-core
// kernel) | row ring | (quantized: scale ring) | (m, l) of partials | key masks. A 16-bit cache has kStages
// 16-bit K/V stages, a quantized one a single 16-bit K/V tile (the dequantized tile being computed on) and
// kStages 8-bit stages. After the main loop the K/V region (up to the Q tile) is reused as the fp32 merge
// buffer [parts][rows][D_PAD].
template <int D_PAD, int KV = 0>
struct SmemLayout {
  using Cfg = TileConfig<D_PAD>;
  static constexpr bool kQuant = KV != 0;
  static constexpr int kRawRow = D_PAD + 16;             // 8-bit stage row pitch (bytes): +16 B as kRow
  static constexpr size_t kStageBytes = size_t(Cfg::kBlockN) * Cfg::kRow * 2;
  static constexpr size_t kRawStageBytes = size_t(Cfg::kBlockN) * kRawRow;
  static constexpr int kTiles = kQuant ? 1 : Cfg::kStages;   // 16-bit K (and V) tiles
  static constexpr size_t kK = 0;
  static constexpr size_t kV = kK + kTiles * kStageBytes;
  static constexpr size_t kKRaw = kV + kTiles * kStageBytes;
  static constexpr size_t kVRaw = kKRaw + (kQuant ? Cfg::kStages * kRawStageBytes : 0);
  static constexpr size_t kQ = kVRaw + (kQuant ? Cfg::kStages * kRawStageBytes : 0);
  static constexpr int kMlFloats = 2 * 64;  // parts * rows <= 64 in both kernels
  static constexpr int kMaskSlots = 4;      // key masks of tiles t & 3: >= kStages + 1 (see run_pipeline)
  static_assert(kMaskSlots >= Cfg::kStages + 1 && (kMaskSlots & (kMaskSlots - 1)) == 0 && Cfg::kBlockN == 64,
                "one 64-bit key mask per tile, a power-of-two ring of them");
  TF_HOST_DEVICE static size_t ring(int q_rows) { return kQ + size_t(q_rows) * Cfg::kRow * 2; }
  TF_HOST_DEVICE static size_t scales(int q_rows) { return ring(q_rows) + size_t(Cfg::kStages) * Cfg::kBlockN * 8; }
  TF_HOST_DEVICE static size_t ml(int q_rows) {
    return scales(q_rows) + (kQuant ? size_t(Cfg::kStages) * Cfg::kBlockN * 8 : 0);
  }
  TF_HOST_DEVICE static size_t masks(int q_rows) { return ml(q_rows) + kMlFloats * 4; }
  TF_HOST_DEVICE static size_t bytes(int q_rows) { return masks(q_rows) + kMaskSlots * 8; }
  static_assert(kQ >= size_t(64) * D_PAD * 4, "merge buffer fits in the K/V region");
  static_assert(kRawStageBytes % 16 == 0 && kStageBytes % 16 == 0, "16-byte aligned stages");
};

// ---------------------------------------------------------------------------------------------
// Block context: grid = (B * Hkv * m_blocks, num_splits); the visible keys [lo, n) of the sequence are cut
// into num_splits chunks of whole tiles; this block owns keys [start, end) (possibly empty).
// ---------------------------------------------------------------------------------------------

struct BlockCtx {
  int b, h_kv, row0, rows, group;   // rows = group * Sq (this KV head's query rows); row0: first of the block
  int split, n, start, end, ntiles;
};

template <int BLOCK_N>
TF_DEVICE BlockCtx block_ctx(const Params& p, int m_blocks, int rows_per_block) {
  BlockCtx c;
  const int bx = blockIdx.x;
  const int m_blk = bx % m_blocks;
  c.h_kv = (bx / m_blocks) % p.hkv;
  c.b = bx / (m_blocks * p.hkv);
  c.group = p.hq / p.hkv;
  c.rows = c.group * p.sq;
  c.row0 = m_blk * rows_per_block;
  c.split = blockIdx.y;
  const int64_t n64 = int64_t(p.cache_seqlens[c.b]) + p.num_appended;   // any int32 value: no overflow
  const int n = n64 < 0 ? 0 : (n64 > p.capacity ? p.capacity : int(n64));
  c.n = n;
  int lo = 0;
  if (p.window_left >= 0) {
    lo = n - p.sq - p.window_left;
    lo = lo < 0 ? 0 : lo;
  }
  const int tiles = ceil_div(n - lo, BLOCK_N);
  const int per_split = ceil_div(tiles, p.num_splits);
  c.start = lo + c.split * per_split * BLOCK_N;
  const int stop = c.start + per_split * BLOCK_N;
  c.end = stop < n ? stop : n;
  c.ntiles = c.end > c.start ? ceil_div(c.end - c.start, BLOCK_N) : 0;
  return c;
}

// ---------------------------------------------------------------------------------------------
// K/V tile pipeline. Tile t holds keys start + t * BLOCK_N + [0, BLOCK_N) in stage t % kStages. The
// (page or batch, slot) pair of each key is looked up one tile ahead of its copy into ring[t % kStages]
// (a key past `end`, or on a page id outside [0, num_pages), gets page -1: its 16-byte chunks are
// zero-filled, never read), so page-table loads are off the copy path and each tile's lookups happen once
// per block, not once per chunk. Bit i of the tile's key mask (masks[t % kMaskSlots], a ballot of the
// lookups) is set iff key i has a page: the kernels' visibility test (score()) reads it, so keys past the
// range and keys of invalid pages are masked alike. Quantized caches: the lookup also loads the key's K and V
// scales into scale_ring (0 for a key without a page: its zero-filled row dequantizes to 0).
// ---------------------------------------------------------------------------------------------

template <typename T, int D_PAD, int KV = 0>
struct KvPipe {
  using Cfg = TileConfig<D_PAD>;
  using L = SmemLayout<D_PAD, KV>;
  static constexpr bool kQuant = KV != 0;
  using Elem = std::conditional_t<kQuant, uint8_t, T>;   // a cache element
  static constexpr int kElems16 = 16 / int(sizeof(Elem));  // elements per 16-byte chunk
  static constexpr int kChunks = D_PAD / kElems16;         // 16-byte chunks per row
  static constexpr int kStagePitch = kQuant ? L::kRawRow : Cfg::kRow;   // stage row pitch (elements)
  static constexpr int kMaskSlots = L::kMaskSlots;
  T* ks;                 // 16-bit: [kStages][BLOCK_N][kRow]; quantized: the dequantized tile [BLOCK_N][kRow]
  T* vs;
  Elem* kst;             // the stages the copies land in: ks / vs, or the 8-bit stages [kStages][BLOCK_N][kRawRow]
  Elem* vst;
  int2* ring;            // [kStages][BLOCK_N]
  float2* scale_ring;    // quantized: [kStages][BLOCK_N] (k scale, v scale)
  uint2* masks;          // [kMaskSlots]: 64-bit key masks (x: keys 0..31, y: keys 32..63)
  gptr<const Elem> kc;   // cache + h_kv * stride_kh
  gptr<const Elem> vc;
  gptr<const int> bt_row;   // block_table[b] or null
  gptr<const float> ksc;    // quantized: k_scale + h_kv * stride_ksh
  gptr<const float> vsc;
  int64_t skb, sks, svb, svs, sksb, skss, svsb, svss;
  int b, start, end, page_size, num_pages, head_dim;
  bool vec;

  struct Entry {
    int2 row;      // (page or batch, slot), page -1: no row
    float2 scale;  // quantized: (k scale, v scale) of the row, 0 without a row
  };

  TF_DEVICE void init(const Params& p, const BlockCtx& c, unsigned char* smem, int q_rows) {
    ks = reinterpret_cast<T*>(smem + L::kK);
    vs = reinterpret_cast<T*>(smem + L::kV);
    if constexpr (kQuant) {
      kst = reinterpret_cast<Elem*>(smem + L::kKRaw);
      vst = reinterpret_cast<Elem*>(smem + L::kVRaw);
    } else {
      kst = ks;
      vst = vs;
    }
    ring = reinterpret_cast<int2*>(smem + L::ring(q_rows));
    scale_ring = reinterpret_cast<float2*>(smem + L::scales(q_rows));
    masks = reinterpret_cast<uint2*>(smem + L::masks(q_rows));
    kc = gcast<const Elem>(p.k_cache) + int64_t(c.h_kv) * p.stride_kh;
    vc = gcast<const Elem>(p.v_cache) + int64_t(c.h_kv) * p.stride_vh;
    bt_row = p.block_table ? p.block_table + int64_t(c.b) * p.stride_btb : nullptr;
    if constexpr (kQuant) {
      ksc = p.k_scale + int64_t(c.h_kv) * p.stride_ksh;
      vsc = p.v_scale + int64_t(c.h_kv) * p.stride_vsh;
      sksb = p.stride_ksb; skss = p.stride_kss; svsb = p.stride_vsb; svss = p.stride_vss;
    }
    skb = p.stride_kb; sks = p.stride_ks; svb = p.stride_vb; svs = p.stride_vs;
    b = c.b; start = c.start; end = c.end; page_size = p.page_size; num_pages = p.num_pages; head_dim = p.head_dim;
    vec = p.vec_loads;
  }

  // (page or batch, slot) of key i of tile t; page -1 past the block's range or on a page id outside
  // [0, num_pages). Reads block_table (a column < ceil(end / page_size)) when paged, and the key's scales
  // when quantized (only for a key with a row).
  TF_DEVICE Entry lookup(int t, int i) const {
    Entry e{make_int2(-1, 0), make_float2(0.f, 0.f)};
    const int key = start + t * Cfg::kBlockN + i;
    if (key >= end) return e;
    if (bt_row) {
      const int page = bt_row[key / page_size];
      e.row = make_int2(unsigned(page) < unsigned(num_pages) ? page : -1, key % page_size);
    } else {
      e.row = make_int2(b, key);
    }
    if constexpr (kQuant) {
      if (e.row.x >= 0)
        e.scale = make_float2(ksc[int64_t(e.row.x) * sksb + int64_t(e.row.y) * skss],
                              vsc[int64_t(e.row.x) * svsb + int64_t(e.row.y) * svss]);
    }
    return e;
  }

  // Threads 0..BLOCK_N-1 (warps 0 and 1, whole): store key tid's entry of tile t into ring slot `slot`, and
  // the tile's key mask into masks[t % kMaskSlots].
  TF_DEVICE void publish(int t, int slot, const Entry& e) {
    const int tid = threadIdx.x;
    ring[slot * Cfg::kBlockN + tid] = e.row;
    if constexpr (kQuant) scale_ring[slot * Cfg::kBlockN + tid] = e.scale;
    const unsigned m = __ballot_sync(kFullMask, e.row.x >= 0);
    if (tid % 32 == 0) reinterpret_cast<unsigned*>(masks + (t & (kMaskSlots - 1)))[tid / 32] = m;
  }

  // Key mask of tile t (bit i: key i of the tile is in the range, on a valid page). Written one tile ahead
  // (run_pipeline): read it in compute(t).
  TF_DEVICE uint64_t key_mask(int t) const {
    const uint2 m = masks[t & (kMaskSlots - 1)];
    return uint64_t(m.x) | (uint64_t(m.y) << 32);
  }

  // Every thread: look up the first kStages tiles (threads < BLOCK_N), barrier, issue kStages - 1 tiles.
  TF_DEVICE void prologue(int ntiles) {
    const int tid = threadIdx.x;
    if (tid < Cfg::kBlockN) {   // warps 0 and 1, whole (the ballot in publish)
#pragma unroll
      for (int s = 0; s < Cfg::kStages; ++s) publish(s, s, lookup(s, tid));
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < Cfg::kStages - 1; ++s) issue(s, ntiles);
  }

  // Copy tile t (if it exists) into its stage, then commit a group (empty past the last tile, so the
  // wait counts stay uniform). The ring entry of tile t must be visible (written before a barrier).
  TF_DEVICE void issue(int t, int ntiles) {
    if (t < ntiles) {
      const int stage = t % Cfg::kStages;
      const int2* rows = ring + stage * Cfg::kBlockN;
      Elem* kd = kst + stage * Cfg::kBlockN * kStagePitch;
      Elem* vd = vst + stage * Cfg::kBlockN * kStagePitch;
      constexpr int kTotal = Cfg::kBlockN * kChunks;
#pragma unroll 1   // unrolled, ptxas spilled one register of the d80 CUDA-core kernel on sm_80
      for (int c = threadIdx.x; c < kTotal; c += kThreads) {
        const int r = c / kChunks, col = (c % kChunks) * kElems16;
        const int2 rp = rows[r];
        const bool ok = rp.x >= 0 && col < head_dim;
        const int64_t ko = ok ? int64_t(rp.x) * skb + int64_t(rp.y) * sks + col : 0;
        const int64_t vo = ok ? int64_t(rp.x) * svb + int64_t(rp.y) * svs + col : 0;
        Elem* kdst = kd + r * kStagePitch + col;
        Elem* vdst = vd + r * kStagePitch + col;
        if (vec) {
          ptx::cp_async_16_zfill(kdst, kc + ko, ok);
          ptx::cp_async_16_zfill(vdst, vc + vo, ok);
        } else {  // rows not 16-byte aligned (odd strides or head dims): element loads, zeros past the row
#pragma unroll
          for (int e = 0; e < kElems16; ++e) {
            const bool in = ok && col + e < head_dim;
            kdst[e] = in ? kc[ko + e] : Elem{};
            vdst[e] = in ? vc[vo + e] : Elem{};
          }
        }
      }
    }
    ptx::cp_async_commit();
  }

  // Quantized: the 8-bit stage of tile t (landed, every thread past a barrier) -> the 16-bit K and V tiles,
  // x * scale rounded to T; the caller puts a barrier between this and the reads of the tiles.
  TF_DEVICE void dequant(int t) {
    if constexpr (kQuant) {
      const int stage = t % Cfg::kStages;
      const Elem* kr = kst + stage * Cfg::kBlockN * kStagePitch;
      const Elem* vr = vst + stage * Cfg::kBlockN * kStagePitch;
      const float2* sc = scale_ring + stage * Cfg::kBlockN;
      constexpr int kTotal = 2 * Cfg::kBlockN * kChunks;   // 16-value chunks of K, then V
#pragma unroll 1
      for (int c = threadIdx.x; c < kTotal; c += kThreads) {
        const bool is_v = c >= Cfg::kBlockN * kChunks;
        const int cc = is_v ? c - Cfg::kBlockN * kChunks : c;
        const int r = cc / kChunks, col = (cc % kChunks) * 16;
        const uint4 raw = *reinterpret_cast<const uint4*>((is_v ? vr : kr) + r * kStagePitch + col);
        const float2 s2 = sc[r];
        const float s = is_v ? s2.y : s2.x;
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
        uint32_t out[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t two = w[i] >> (16 * h);   // bytes 2h, 2h + 1 of word i
            float2 f;
            if constexpr (KV == int(KvFormat::int8))
              f = ptx::s8x2_to_float2(two);
            else
              f = ptx::e4m3x2_to_float2(two);
            out[2 * i + h] = ptx::pack2<T>(f.x * s, f.y * s);
          }
        }
        uint4* dst = reinterpret_cast<uint4*>((is_v ? vs : ks) + r * Cfg::kRow + col);
        dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
        dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
      }
    }
  }

  TF_DEVICE const T* k_tile(int t) const {
    return kQuant ? ks : ks + (t % Cfg::kStages) * Cfg::kBlockN * Cfg::kRow;
  }
  TF_DEVICE const T* v_tile(int t) const {
    return kQuant ? vs : vs + (t % Cfg::kStages) * Cfg::kBlockN * Cfg::kRow;
  }
};

// The main loop of both kernels: for each tile t, wait for it, issue tile t + kStages - 1, prefetch the
// page ids (and scales) of tile t + kStages, (quantized: dequantize tile t into the 16-bit tiles, barrier,)
// run compute(t) on the tile, publish the prefetched entries and key mask. Ends with every copy retired and
// a barrier, so the caller may reuse the stages. The mask of tile t + kStages goes to slot
// (t + kStages) % kMaskSlots, which held the mask of a tile <= t - 1 (kMaskSlots >= kStages + 1): every
// thread finished reading it before this iteration's barrier. Quantized: the first barrier also ends every
// read of the 16-bit tiles by compute(t - 1), so dequant(t) may overwrite them; the scales of tile t in
// ring slot t % kStages are read by dequant(t) before the second barrier, and replaced only after it.
template <typename T, int D_PAD, int KV, typename F>
TF_DEVICE void run_pipeline(KvPipe<T, D_PAD, KV>& pipe, int ntiles, F&& compute) {
  using Cfg = TileConfig<D_PAD>;
  using Entry = typename KvPipe<T, D_PAD, KV>::Entry;
  const int tid = threadIdx.x;
  pipe.prologue(ntiles);
  for (int t = 0; t < ntiles; ++t) {
    ptx::cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();  // tile t landed for every thread; everyone is done with tile t - 1's stage
    pipe.issue(t + Cfg::kStages - 1, ntiles);
    Entry next{make_int2(-1, 0), make_float2(0.f, 0.f)};
    if (tid < Cfg::kBlockN) next = pipe.lookup(t + Cfg::kStages, tid);
    if constexpr (KV != 0) {
      pipe.dequant(t);
      __syncthreads();  // the 16-bit tiles of tile t are complete
    }
    compute(t);
    // Slot t % kStages held tile t's rows, whose copies were issued an iteration ago: free.
    if (tid < Cfg::kBlockN) pipe.publish(t + Cfg::kStages, t % Cfg::kStages, next);
  }
  ptx::cp_async_wait_all();
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Query rows and scores
// ---------------------------------------------------------------------------------------------

struct ScoreParams {
  float qk_scale;  // scale * log2(e), or scale / softcap with softcap
  float cap2;      // softcap * log2(e), 0 without softcap
  int left, right; // window (-1 unbounded); causal folded into right = 0 by the launcher
};

TF_DEVICE ScoreParams score_params(const Params& p) {
  ScoreParams s;
  const bool cap = p.softcap > 0.f;
  s.qk_scale = cap ? p.softmax_scale / p.softcap : p.softmax_scale * kLog2e;
  s.cap2 = cap ? p.softcap * kLog2e : 0.f;
  s.left = p.window_left;
  s.right = p.window_right;
  return s;
}

struct RowInfo {
  int q_pos;       // position of the query in its sequence (n - Sq + i)
  float slope2;    // ALiBi slope * log2(e), 0 without ALiBi
  bool ok;         // a real row (row < group * Sq)
};

// Row m of the block (row0 + m of this KV head: query head h_kv * group + (row / Sq), query row % Sq).
TF_DEVICE RowInfo row_info(const Params& p, const BlockCtx& c, int m) {
  RowInfo r;
  const int row = c.row0 + m;
  r.ok = row < c.rows;
  const int qi = row % p.sq, hq = c.h_kv * c.group + row / p.sq;
  r.q_pos = c.n - p.sq + qi;
  r.slope2 = (p.alibi && r.ok) ? p.alibi[int64_t(c.b) * p.stride_ab + int64_t(hq) * p.stride_ah] * kLog2e : 0.f;
  return r;
}

// tanh from ex2 (exact limits +-1); accurate to a few ulp of fp32, far below the inputs' rounding.
TF_DEVICE float tanh_ex2(float x) { return 1.f - 2.f / (ptx::ex2_approx(x * (2.f * kLog2e)) + 1.f); }

// Score of (row, key) in log2 units, or -inf where the key is not visible. `dot` is q.k already multiplied
// by qk_scale; key_ok: the key's bit of its tile's key mask (in the block's range, on a valid page).
TF_DEVICE float score(float dot, const ScoreParams& sp, const RowInfo& r, int key, bool key_ok) {
  bool vis = r.ok && key_ok;
  if (sp.right >= 0) vis = vis && key <= r.q_pos + sp.right;
  if (sp.left >= 0) vis = vis && key >= r.q_pos - sp.left;
  float s = sp.cap2 > 0.f ? sp.cap2 * tanh_ex2(dot) : dot;
  const int dist = r.q_pos > key ? r.q_pos - key : key - r.q_pos;
  s -= r.slope2 * float(dist);
  return vis ? s : kNegInf;
}

// exp2(x - m) for the online softmax, with m = -inf (a row that saw nothing yet) treated as 0: no NaN.
TF_DEVICE float safe_max(float m) { return m == kNegInf ? 0.f : m; }

// ---------------------------------------------------------------------------------------------
// Epilogue: merge `parts` partial states (m in log2 units, unnormalised acc, l) per row; write the final
// out (dtype) and lse (natural log), or the split partial (normalised fp32, lse in log2 units).
// buf: [parts][rows_blk][D_PAD] fp32, ml: [parts][rows_blk][2]. Every thread calls it.
// ---------------------------------------------------------------------------------------------

template <typename T, int D_PAD>
TF_DEVICE void merge_and_store(const Params& p, const BlockCtx& c, const float* buf, const float* ml, int parts,
                               int rows_blk) {
  const int d_total = p.head_dim;
  const bool split = p.num_splits > 1;
  for (int e = threadIdx.x; e < rows_blk * d_total; e += kThreads) {
    const int m = e / d_total, d = e % d_total;
    const int row = c.row0 + m;
    if (row >= c.rows) continue;
    float mx = kNegInf;
    for (int q = 0; q < parts; ++q) mx = fmaxf(mx, ml[(q * rows_blk + m) * 2]);
    const float ms = safe_max(mx);
    float l = 0.f, acc = 0.f;
    for (int q = 0; q < parts; ++q) {   // fixed order: deterministic
      const float w = ptx::ex2_approx(ml[(q * rows_blk + m) * 2] - ms);
      l += w * ml[(q * rows_blk + m) * 2 + 1];
      acc += w * buf[(q * rows_blk + m) * D_PAD + d];
    }
    const bool empty = !(l > 0.f);
    const float o = empty ? 0.f : acc / l;
    const float lse2 = empty ? kNegInf : ms + log2f(l);
    const int qi = row % p.sq, hq = c.h_kv * c.group + row / p.sq;
    const int64_t flat = (int64_t(c.b) * p.hq + hq) * p.sq + qi;   // index into [B, Hq, Sq]
    if (split) {
      const int64_t part = flat * p.num_splits + c.split;
      p.out_part[part * D_PAD + d] = o;
      if (d == 0) p.lse_part[part] = lse2;
    } else {
      const gptr<T> out = gcast<T>(p.out);
      out[int64_t(c.b) * p.stride_ob + int64_t(qi) * p.stride_os + int64_t(hq) * p.stride_oh + d] = from_float<T>(o);
      if (d == 0) p.lse[flat] = empty ? kNegInf : lse2 * kLn2;
    }
  }
}

}  // namespace tf::decode
