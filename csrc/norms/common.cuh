// Device helpers of the norm kernels: vectorised row access, mean/M2 statistics, row reductions.
//
// A row is processed in "slots" of VEC = 16 / sizeof(T) consecutive elements; thread lt of the TPR
// threads serving a row owns slots lt, lt + TPR, lt + 2 TPR, ... When every pointer and row stride
// allows it (vec_ok) a full slot is moved with 16-byte loads/stores (two for fp32 data of a half
// row); the last, partial slot of a row and unaligned rows use scalar accesses.
#pragma once

#include <cstring>

#include "common/device.cuh"

namespace tf::norms {

template <typename U, int VEC>
TF_DEVICE void load_vec(const U* __restrict__ row, int base, int n, bool vec_ok, float (&v)[VEC]) {
  constexpr int kPer = 16 / int(sizeof(U));             // elements per 16-byte access
  static_assert(VEC % kPer == 0, "a slot is a whole number of 16-byte accesses");
  if (vec_ok && base + VEC <= n) {
#pragma unroll
    for (int l = 0; l < VEC / kPer; ++l) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + base + l * kPer);
      U e[kPer];
      std::memcpy(static_cast<void*>(e), &raw, 16);
#pragma unroll
      for (int k = 0; k < kPer; ++k) v[l * kPer + k] = to_float(e[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = base + k < n ? to_float(row[base + k]) : 0.f;
  }
}

template <typename U, int VEC>
TF_DEVICE void store_vec(U* __restrict__ row, int base, int n, bool vec_ok, const float (&v)[VEC]) {
  constexpr int kPer = 16 / int(sizeof(U));
  static_assert(VEC % kPer == 0, "a slot is a whole number of 16-byte accesses");
  if (vec_ok && base + VEC <= n) {
#pragma unroll
    for (int l = 0; l < VEC / kPer; ++l) {
      U e[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) e[k] = from_float<U>(v[l * kPer + k]);
      uint4 raw;
      std::memcpy(&raw, static_cast<const void*>(e), 16);
      *reinterpret_cast<uint4*>(row + base + l * kPer) = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (base + k < n) row[base + k] = from_float<U>(v[k]);
  }
}

// A row stored as T or as fp32 (is_f32), chosen at run time (uniform branch).
template <typename T, int VEC>
TF_DEVICE void load_any(const void* row, bool is_f32, int base, int n, bool vec_ok, float (&v)[VEC]) {
  if (is_f32) load_vec<float, VEC>(static_cast<const float*>(row), base, n, vec_ok, v);
  else load_vec<T, VEC>(static_cast<const T*>(row), base, n, vec_ok, v);
}

template <typename T, int VEC>
TF_DEVICE void store_any(void* row, bool is_f32, int base, int n, bool vec_ok, const float (&v)[VEC]) {
  if (is_f32) store_vec<float, VEC>(static_cast<float*>(row), base, n, vec_ok, v);
  else store_vec<T, VEC>(static_cast<T*>(row), base, n, vec_ok, v);
}

template <typename T>
TF_DEVICE const void* row_ptr(const void* base, bool is_f32, int64_t row, int64_t stride) {
  return is_f32 ? static_cast<const void*>(static_cast<const float*>(base) + row * stride)
                : static_cast<const void*>(static_cast<const T*>(base) + row * stride);
}

template <typename T>
TF_DEVICE void* row_ptr(void* base, bool is_f32, int64_t row, int64_t stride) {
  return const_cast<void*>(row_ptr<T>(static_cast<const void*>(base), is_f32, row, stride));
}

// A compensated (Kahan) running sum. The dW / dB column sums of the looped backward run over a whole row group
// in one thread (hundreds of rows when the grid has few groups) and the partial rows are reduced in order; a
// plain fp32 running sum then errs ~sqrt(rows) ulps, several times PyTorch's pairwise sum (seen: 4.6e-5 vs its
// 1.1e-5 on dW of a 257 x 65536 fp32 RMSNorm). Kahan keeps the error at ~1 ulp whatever the row count.
struct KahanSum {
  float s = 0.f, c = 0.f;   // sum, and the low-order part lost so far (negated)
  TF_DEVICE void add(float v) {
    const float y = v - c;
    const float t = s + y;
    c = (t - s) - y;
    s = t;
  }
  TF_DEVICE float value() const { return s - c; }
};

// ---------------------------------------------------------------------------------------------
// Statistics: (count, mean, M2 = sum of squared deviations), merged with Chan et al.'s formula, so
// the variance has no cancellation. RMSNorm keeps mean = 0 and M2 = sum of squares (the merge then
// reduces to a sum).
// ---------------------------------------------------------------------------------------------

struct Stats {
  float n, mean, m2;
};

TF_DEVICE Stats merge(const Stats& a, const Stats& b) {
  if (a.n == 0.f) return b;
  if (b.n == 0.f) return a;
  const float n = a.n + b.n, delta = b.mean - a.mean, fb = b.n / n;
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

// Statistics of the first min(count, VEC) values of one slot (count = elements left in the row).
template <int VEC>
TF_DEVICE Stats slot_stats(const float (&v)[VEC], int count, bool is_rms) {
  if (count <= 0) return {0.f, 0.f, 0.f};
  if (count > VEC) count = VEC;
  float s = 0.f;
  if (!is_rms) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) s += k < count ? v[k] : 0.f;
    s /= float(count);
  }
  float m2 = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float d = v[k] - s;
    m2 += k < count ? d * d : 0.f;
  }
  return {float(count), s, m2};
}

// ---------------------------------------------------------------------------------------------
// Reductions over the TPR threads of a row (TPR = 32: one warp per row; TPR > 32: the whole block).
// Every thread of the row gets the same result (lane / warp 0's, broadcast). For TPR > 32 every
// thread of the block must call it (it has __syncthreads), and it ends with a barrier so the shared
// buffer can be reused by the next call.
// ---------------------------------------------------------------------------------------------

TF_DEVICE Stats warp_reduce(Stats s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o{__shfl_down_sync(kFullMask, s.n, off), __shfl_down_sync(kFullMask, s.mean, off),
            __shfl_down_sync(kFullMask, s.m2, off)};
    s = merge(s, o);
  }
  return {__shfl_sync(kFullMask, s.n, 0), __shfl_sync(kFullMask, s.mean, 0), __shfl_sync(kFullMask, s.m2, 0)};
}

template <int TPR>
TF_DEVICE Stats row_reduce(Stats s) {
  s = warp_reduce(s);
  if constexpr (TPR > 32) {
    __shared__ float red[3][32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      red[0][warp] = s.n;
      red[1][warp] = s.mean;
      red[2][warp] = s.m2;
    }
    __syncthreads();
    Stats t = lane < TPR / 32 ? Stats{red[0][lane], red[1][lane], red[2][lane]} : Stats{0.f, 0.f, 0.f};
    s = warp_reduce(t);   // every warp reduces the same values in the same order: identical results
    __syncthreads();      // red[] is free again
  }
  return s;
}

TF_DEVICE float2 warp_sum2(float2 v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    v.x += __shfl_down_sync(kFullMask, v.x, off);
    v.y += __shfl_down_sync(kFullMask, v.y, off);
  }
  return make_float2(__shfl_sync(kFullMask, v.x, 0), __shfl_sync(kFullMask, v.y, 0));
}

// Sum of two values over the TPR threads of a row, in a fixed order (deterministic).
template <int TPR>
TF_DEVICE float2 row_sum2(float2 v) {
  v = warp_sum2(v);
  if constexpr (TPR > 32) {
    __shared__ float red[2][32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      red[0][warp] = v.x;
      red[1][warp] = v.y;
    }
    __syncthreads();
    v = warp_sum2(lane < TPR / 32 ? make_float2(red[0][lane], red[1][lane]) : make_float2(0.f, 0.f));
    __syncthreads();
  }
  return v;
}

}  // namespace tf::norms
