// The two small decode kernels around the split kernel:
//
//   decode_append_kernel   writes the new k/v [B, Sq, Hkv, D] into the cache at positions cache_seqlens[b] + s
//                          (through the block table when paged); positions outside [0, capacity) and pages
//                          outside [0, num_pages) are dropped (they cannot be checked on the host without a
//                          sync; validate=True does).
//   decode_append_quant_kernel  the same for an int8 / fp8 e4m3 cache: one warp per (token, KV head) quantizes
//                          the row (transformer.reference.quantize_kv, bit for bit) and writes values and scale.
//   decode_append_rotary_kernel  decode_append_kernel with rotary tables (16-bit cache): rotates the new key and
//                          writes the rotated queries into q_rot (decode/decode.h); the quantizing kernel does the
//                          same under its ROTARY template flag.
//   decode_combine_kernel  merges the split partials of one (b, query head, query) row per warp: reads the
//                          split log-sum-exps, then every partial output exactly once (float4), in split order
//                          (deterministic): out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max).
#pragma once

#include "decode/common.cuh"

namespace tf::decode {

// Where token s of sequence b is appended: false when its position cache_seqlens[b] + s lies outside
// [0, capacity) or in a page id outside [0, num_pages) (the token is dropped), else its row of dim 0 (batch or
// page) and its slot.
TF_DEVICE bool append_slot(const AppendParams& p, int b, int s, int64_t& page, int64_t& slot) {
  const int64_t pos64 = int64_t(p.cache_seqlens[b]) + s;   // any int32 value: no overflow
  if (pos64 < 0 || pos64 >= p.capacity) return false;
  const int pos = int(pos64);
  page = b;
  slot = pos;
  if (p.block_table) {
    const int id = p.block_table[int64_t(b) * p.stride_btb + pos / p.page_size];
    if (unsigned(id) >= unsigned(p.num_pages)) return false;
    page = id;
    slot = pos % p.page_size;
  }
  return true;
}

// Grid (B * Sq, Hkv); bit-exact 16-bit copies (one kernel serves fp16 and bf16).
__global__ void __launch_bounds__(kThreads) decode_append_kernel(AppendParams p) {
  const int b = blockIdx.x / p.sq, s = blockIdx.x % p.sq, h = blockIdx.y;
  int64_t page, slot;
  if (!append_slot(p, b, s, page, slot)) return;   // no barrier in these kernels
  const gptr<const uint16_t> k = gcast<const uint16_t>(p.k) + int64_t(b) * p.stride_kb + int64_t(s) * p.stride_ks +
                                 int64_t(h) * p.stride_kh;
  const gptr<const uint16_t> v = gcast<const uint16_t>(p.v) + int64_t(b) * p.stride_vb + int64_t(s) * p.stride_vs +
                                 int64_t(h) * p.stride_vh;
  const gptr<uint16_t> kc = gcast<uint16_t>(p.k_cache) + page * p.stride_kcb + slot * p.stride_kcs +
                            int64_t(h) * p.stride_kch;
  const gptr<uint16_t> vc = gcast<uint16_t>(p.v_cache) + page * p.stride_vcb + slot * p.stride_vcs +
                            int64_t(h) * p.stride_vch;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    kc[d] = k[d];
    vc[d] = v[d];
  }
}

// fp32 value of element i of a rotary table.
TF_DEVICE float rotary_table(gptr<const void> t, DType dtype, int64_t i) {
  if (dtype == DType::f32) return gcast<const float>(t)[i];
  if (dtype == DType::f16) return to_float(gcast<const __half>(t)[i]);
  return to_float(gcast<const __nv_bfloat16>(t)[i]);
}

// Element d (value x, as fp32) of a row (row[0..head_dim)) rotated at table row pos (decode/decode.h).
template <typename T>
TF_DEVICE float rotate_element(const AppendParams& p, gptr<const T> row, int d, float x, int64_t pos) {
  if (d >= p.rotary_dim) return x;
  const int half = p.rotary_dim / 2;
  const bool first = p.rotary_interleaved ? (d & 1) == 0 : d < half;
  const int partner = p.rotary_interleaved ? d ^ 1 : (first ? d + half : d - half);
  const int j = p.rotary_interleaved ? d >> 1 : (first ? d : d - half);
  const float c = rotary_table(p.rotary_cos, p.rotary_dtype, pos * p.stride_cr + int64_t(j) * p.stride_cd);
  const float sn = rotary_table(p.rotary_sin, p.rotary_dtype, pos * p.stride_sr + int64_t(j) * p.stride_sd);
  const float xc = ptx::mul_rn(x, c), ys = ptx::mul_rn(to_float(row[partner]), sn);
  return first ? ptx::sub_rn(xc, ys) : ptx::add_rn(xc, ys);
}

// Table row of token s of sequence b: cache_seqlens[b] + s clamped to [0, seqlen_ro).
TF_DEVICE int64_t rotary_row(const AppendParams& p, int b, int s) {
  const int64_t pos = int64_t(p.cache_seqlens[b]) + s;
  return pos < 0 ? 0 : pos >= p.seqlen_ro ? p.seqlen_ro - 1 : pos;
}

// Query s of sequence b, head h, rotated into q_rot; threads t, t + n, ... of the row.
template <typename T>
TF_DEVICE void rotate_query(const AppendParams& p, int b, int s, int h, int t, int n) {
  const int64_t pos = rotary_row(p, b, p.q_per_token ? s : 0);
  const gptr<const T> q = gcast<const T>(p.q) + int64_t(b) * p.stride_qb + int64_t(s) * p.stride_qs +
                          int64_t(h) * p.stride_qh;
  const gptr<T> out = gcast<T>(p.q_rot) + int64_t(b) * p.stride_rb + int64_t(s) * p.stride_rs +
                      int64_t(h) * p.stride_rh;
  for (int d = t; d < p.head_dim; d += n) out[d] = from_float<T>(rotate_element(p, q, d, to_float(q[d]), pos));
}

// Grid (B * Sq, max(Hq, Hkv)): block y rotates query head y (y < Hq) and appends KV head y (y < Hkv), its key
// rotated and rounded to T.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_append_rotary_kernel(AppendParams p) {
  const int b = blockIdx.x / p.sq, s = blockIdx.x % p.sq, h = blockIdx.y;
  if (h < p.hq) rotate_query<T>(p, b, s, h, threadIdx.x, kThreads);
  if (h >= p.hkv) return;   // no barrier in this kernel
  int64_t page, slot;
  if (!append_slot(p, b, s, page, slot)) return;   // no barrier in these kernels
  const int64_t row = rotary_row(p, b, s);
  const gptr<const T> k = gcast<const T>(p.k) + int64_t(b) * p.stride_kb + int64_t(s) * p.stride_ks +
                          int64_t(h) * p.stride_kh;
  const gptr<const T> v = gcast<const T>(p.v) + int64_t(b) * p.stride_vb + int64_t(s) * p.stride_vs +
                          int64_t(h) * p.stride_vh;
  const gptr<T> kc = gcast<T>(p.k_cache) + page * p.stride_kcb + slot * p.stride_kcs + int64_t(h) * p.stride_kch;
  const gptr<T> vc = gcast<T>(p.v_cache) + page * p.stride_vcb + slot * p.stride_vcs + int64_t(h) * p.stride_vch;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    kc[d] = from_float<T>(rotate_element(p, k, d, to_float(k[d]), row));
    vc[d] = v[d];
  }
}

// Grid (B * Sq, ceil(Hkv / 4)) (ROTARY: ceil(max(Hq, Hkv) / 4), warp w of block y also rotating query head
// 4 y + w); warp w of block y serves KV head 4 y + w, lane l elements 8 l .. 8 l + 7 (D <= 256).
// scale = amax / qmax (div.rn), 1 where 0; value = x / scale (div.rn) clamped to +-qmax, rounded to nearest even.
// The early returns are warp-uniform (position, page, head): the shuffles see whole warps.
template <typename T, int KV, bool ROTARY = false>
__global__ void __launch_bounds__(kThreads) decode_append_quant_kernel(AppendParams p) {
  constexpr float kQmax = KV == int(KvFormat::int8) ? 127.f : 448.f;
  const int b = blockIdx.x / p.sq, s = blockIdx.x % p.sq;
  const int h = blockIdx.y * (kThreads / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if constexpr (ROTARY) {
    if (h < p.hq) rotate_query<T>(p, b, s, h, lane, 32);
  }
  if (h >= p.hkv) return;
  int64_t page, slot;
  if (!append_slot(p, b, s, page, slot)) return;   // no barrier in these kernels
#pragma unroll 1
  for (int which = 0; which < 2; ++which) {   // k, then v
    const gptr<const T> src = which == 0
        ? gcast<const T>(p.k) + int64_t(b) * p.stride_kb + int64_t(s) * p.stride_ks + int64_t(h) * p.stride_kh
        : gcast<const T>(p.v) + int64_t(b) * p.stride_vb + int64_t(s) * p.stride_vs + int64_t(h) * p.stride_vh;
    const gptr<uint8_t> dst = which == 0
        ? gcast<uint8_t>(p.k_cache) + page * p.stride_kcb + slot * p.stride_kcs + int64_t(h) * p.stride_kch
        : gcast<uint8_t>(p.v_cache) + page * p.stride_vcb + slot * p.stride_vcs + int64_t(h) * p.stride_vch;
    float x[8];
    float amax = 0.f;
    [[maybe_unused]] const int64_t row = ROTARY && which == 0 ? rotary_row(p, b, s) : 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int d = lane * 8 + e;
      x[e] = d < p.head_dim ? to_float(src[d]) : 0.f;
      if constexpr (ROTARY) {   // the key rotated and rounded to T, then quantized
        if (which == 0 && d < p.head_dim) x[e] = to_float(from_float<T>(rotate_element(p, src, d, x[e], row)));
      }
      amax = fmaxf(amax, fabsf(x[e]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, off));
    float scale = ptx::div_rn(amax, kQmax);
    scale = scale == 0.f ? 1.f : scale;
    float y[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] = fminf(fmaxf(ptx::div_rn(x[e], scale), -kQmax), kQmax);
    uint32_t q[8];
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
      if constexpr (KV == int(KvFormat::int8)) {
        q[e] = uint32_t(int(rintf(y[e]))) & 0xFFu;
        q[e + 1] = uint32_t(int(rintf(y[e + 1]))) & 0xFFu;
      } else {
        const uint32_t two = ptx::float2_to_e4m3x2(y[e], y[e + 1]);
        q[e] = two & 0xFFu;
        q[e + 1] = two >> 8;
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (lane * 8 + e < p.head_dim) dst[lane * 8 + e] = uint8_t(q[e]);
    if (lane == 0) {
      if (which == 0) p.k_scale[page * p.stride_ksb + slot * p.stride_kss + int64_t(h) * p.stride_ksh] = scale;
      else p.v_scale[page * p.stride_vsb + slot * p.stride_vss + int64_t(h) * p.stride_vsh] = scale;
    }
  }
}

// One warp per row of [B, Hq, Sq]; 4 rows per block. d_pad: last dim of out_part (a multiple of 16, <= 256).
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(Params p, int d_pad) {
  __shared__ float weights[kThreads / 32][kMaxSplits];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + warp;
  if (row >= int64_t(p.batch) * p.hq * p.sq) return;   // warp-level work only: no block barrier
  const int splits = p.num_splits;
  const gptr<const float> lse = p.lse_part + row * splits;
  float mx = kNegInf;
  for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, lse[s]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
  const float ms = safe_max(mx);
  float den = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float w = ptx::ex2_approx(lse[s] - ms);
    weights[warp][s] = w;
    den += w;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) den += __shfl_xor_sync(kFullMask, den, off);
  __syncwarp();

  // Lane owns float4 columns lane and lane + 32 (d_pad <= 256).
  const gptr<const float> part = p.out_part + row * splits * d_pad;
  float4 acc[2] = {make_float4(0.f, 0.f, 0.f, 0.f), make_float4(0.f, 0.f, 0.f, 0.f)};
  const int d4_count = ceil_div(p.head_dim, 4);
  for (int s = 0; s < splits; ++s) {
    const float w = weights[warp][s];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int d4 = lane + 32 * k;
      if (d4 < d4_count) {
        const float4 o = *gcast<const float4>(part + int64_t(s) * d_pad + 4 * d4);
        acc[k].x += w * o.x;
        acc[k].y += w * o.y;
        acc[k].z += w * o.z;
        acc[k].w += w * o.w;
      }
    }
  }
  const bool empty = !(den > 0.f);
  const float inv = empty ? 0.f : 1.f / den;
  const int qi = int(row % p.sq), hq = int((row / p.sq) % p.hq), b = int(row / (int64_t(p.sq) * p.hq));
  const gptr<T> out = gcast<T>(p.out) + int64_t(b) * p.stride_ob + int64_t(qi) * p.stride_os +
                      int64_t(hq) * p.stride_oh;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int d4 = lane + 32 * k;
    const float o[4] = {acc[k].x * inv, acc[k].y * inv, acc[k].z * inv, acc[k].w * inv};
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (4 * d4 + i < p.head_dim) out[4 * d4 + i] = from_float<T>(empty ? 0.f : o[i]);
  }
  if (lane == 0) p.lse[row] = empty ? kNegInf : (ms + log2f(den)) * kLn2;
}

}  // namespace tf::decode
