// CUDA-core decode kernel (group * Sq <= 4 rows per KV head): fp32 dot products with warp reductions.
//
// A lane group of LG lanes (LG = 8, 16 or 32: the power of two >= D_PAD / 8) serves one key at a time,
// each lane holding 8 consecutive elements (16 bytes of the K/V row in shared memory) of it; a block has
// KG = 4 * 32 / LG such groups, group kg taking keys kg, kg + KG, ... of every tile. A lane keeps its
// 8 elements of every query row of the block (pre-scaled, fp32) and of the output accumulator; q.k is a
// sum over the group's lanes by xor shuffles, so every lane of the group sees the score and updates its
// own slice of the online softmax. The KG groups' partial states are merged at the end by
// merge_and_store(). K/V come through the cp.async pipeline of decode/common.cuh (KV: the cache format; an
// 8-bit cache's tiles arrive dequantized to T).
#pragma once

#include "decode/common.cuh"

namespace tf::decode {

template <typename T>
TF_DEVICE void load8(const T* src, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(src);   // 16-byte shared-memory load
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = ptx::unpack2<T>(w[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// Blocks per SM the register budget is sized for: 3 (<= 168 registers); 2 at D_PAD 256, whose 8-bit caches'
// pipeline does not fit in 168 registers without a spill (191 used at 2).
template <int D_PAD>
constexpr int kSimtMinBlocks = D_PAD >= 256 ? 2 : 3;

template <typename T, int D_PAD, int KV>
__global__ void __launch_bounds__(kThreads, kSimtMinBlocks<D_PAD>) decode_simt_kernel(Params p) {
  using Cfg = TileConfig<D_PAD>;
  using L = SmemLayout<D_PAD, KV>;
  constexpr int R = kSimtRows, kRow = Cfg::kRow, NCH = Cfg::kChunks;
  constexpr int LG = NCH <= 8 ? 8 : (NCH <= 16 ? 16 : 32);
  constexpr int KG = kThreads / LG;                 // key groups per block
  constexpr int KPG = Cfg::kBlockN / KG;            // keys per group per tile
  constexpr int KB = KPG < 8 ? KPG : 8;             // keys scored before one softmax update
  static_assert(Cfg::kBlockN % KG == 0 && KPG % KB == 0 && KG * R * 2 <= L::kMlFloats, "tile split");
  TF_DYNAMIC_SMEM(unsigned char, smem);
  const int tid = threadIdx.x, lane = tid % 32;
  const int ci = lane % LG, kg = tid / LG;
  const bool has_chunk = ci < NCH;
  const BlockCtx c = block_ctx<Cfg::kBlockN>(p, 1, R);
  const int nrows = c.rows < R ? c.rows : R;

  KvPipe<T, D_PAD, KV> pipe;
  pipe.init(p, c, smem, 0);
  float* ml = reinterpret_cast<float*>(smem + L::ml(0));

  const ScoreParams sp = score_params(p);
  RowInfo ri[R];
  float q[R][8], acc[R][8], m_run[R], l_run[R];
  {
    const gptr<const T> qb = gcast<const T>(p.q) + int64_t(c.b) * p.stride_qb;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      ri[r] = row_info(p, c, r);
      const int hq = c.h_kv * c.group + r / p.sq;
      const gptr<const T> qr = qb + int64_t(r % p.sq) * p.stride_qs + int64_t(hq) * p.stride_qh;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int d = ci * 8 + e;
        q[r][e] = (r < nrows && has_chunk && d < p.head_dim) ? to_float(qr[d]) * sp.qk_scale : 0.f;
        acc[r][e] = 0.f;
      }
      m_run[r] = kNegInf;
      l_run[r] = 0.f;
    }
  }

  run_pipeline(pipe, c.ntiles, [&](int t) {
    const T* kt = pipe.k_tile(t) + ci * 8;
    const T* vt = pipe.v_tile(t) + ci * 8;
    const int tile_key0 = c.start + t * Cfg::kBlockN;
    const uint64_t vis = pipe.key_mask(t) >> kg;   // bit j * KG: key kg + j * KG of the tile
#pragma unroll
    for (int jb = 0; jb < KPG / KB; ++jb) {
      float s[KB][R];
#pragma unroll
      for (int j = 0; j < KB; ++j) {
        const int jl = kg + (jb * KB + j) * KG;   // key of the tile
        float kf[8];
        if (has_chunk) load8<T>(kt + jl * kRow, kf);
        else {
#pragma unroll
          for (int e = 0; e < 8; ++e) kf[e] = 0.f;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          s[j][r] = kNegInf;
          if (r < nrows) {   // block-uniform
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) dot = fmaf(q[r][e], kf[e], dot);
#pragma unroll
            for (int off = LG / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(kFullMask, dot, off);
            s[j][r] = score(dot, sp, ri[r], tile_key0 + jl, (vis >> ((jb * KB + j) * KG)) & 1u);
          }
        }
      }
      // Online softmax update over these KB keys, then acc += p v.
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float mx = kNegInf;
#pragma unroll
        for (int j = 0; j < KB; ++j) mx = fmaxf(mx, s[j][r]);
        const float m_new = fmaxf(m_run[r], mx), ms = safe_max(m_new);
        const float alpha = ptx::ex2_approx(m_run[r] - ms);
        m_run[r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < KB; ++j) {
          s[j][r] = ptx::ex2_approx(s[j][r] - ms);
          sum += s[j][r];
        }
        l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
      }
      if (has_chunk) {
#pragma unroll
        for (int j = 0; j < KB; ++j) {
          float vf[8];
          load8<T>(vt + (kg + (jb * KB + j) * KG) * kRow, vf);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(s[j][r], vf[e], acc[r][e]);
        }
      }
    }
  });

  // Partial states of the key groups into shared memory (the K/V stages are free now), then merge.
  float* buf = reinterpret_cast<float*>(smem + L::kK);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int slot = kg * R + r;
    if (ci == 0) {
      ml[slot * 2] = m_run[r];
      ml[slot * 2 + 1] = l_run[r];
    }
    if (has_chunk) {
#pragma unroll
      for (int e = 0; e < 8; ++e) buf[slot * D_PAD + ci * 8 + e] = acc[r][e];
    }
  }
  __syncthreads();
  merge_and_store<T, D_PAD>(p, c, buf, ml, KG, R);
}

}  // namespace tf::decode
