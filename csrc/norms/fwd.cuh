// LayerNorm / RMSNorm forward kernel (one template serves both; see norms/norms.h for the semantics).
//
//   T    storage type of x / out (float, __half, __nv_bfloat16); P: weight/bias type (T or float)
//   TPR  threads per row: 32 = one warp per row, 4 rows per 128-thread block (small hidden sizes);
//        > 32 = one row per block of TPR threads (large hidden sizes)
//   kVecs > 0: the row lives in registers (kVecs slots of VEC elements per thread; the launcher
//        guarantees ceil(n / VEC) <= kVecs * TPR), x and residual are read once;
//        0: any n: a statistics pass, then a normalise pass that reads x (+ residual) again (from L2)
#pragma once

#include "norms/common.cuh"
#include "norms/norms.h"

namespace tf::norms {

template <typename T, typename P, int TPR, int kVecs>
__global__ void __launch_bounds__(TPR == 32 ? 128 : TPR, 1) norm_fwd_kernel(FwdParams p, bool vec_ok) {
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int kRowsPerBlock = TPR == 32 ? 4 : 1;
  const int lt = threadIdx.x % TPR;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / TPR;
  if (kRowsPerBlock > 1 && row >= p.rows) return;  // one warp per row: no block barrier below
  const int n = p.n, nslots = ceil_div(n, VEC);
  const T* x = static_cast<const T*>(p.x) + row * p.stride_x;
  const void* res = p.residual ? row_ptr<T>(p.residual, p.residual_f32, row, p.stride_res) : nullptr;
  void* h_out = p.h ? row_ptr<T>(p.h, p.h_f32, row, p.stride_h) : nullptr;
  T* out = static_cast<T*>(p.out) + row * p.stride_out;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);

  // h = x (+ residual) in fp32 for slot j; written out when asked.
  auto load_h = [&](int j, float (&v)[VEC]) {
    load_vec<T, VEC>(x, j * VEC, n, vec_ok, v);
    if (res) {
      float r[VEC];
      load_any<T, VEC>(res, p.residual_f32, j * VEC, n, vec_ok, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] += r[k];
    }
  };

  // Statistics of the shifted row h - c with c = h[0] (LayerNorm; RMSNorm: c = 0). The shifted values
  // are O(std), so their fp32 mean is accurate to a few ulps of the std, not of the mean; mean = c + ms
  // is then rounded once. Without the shift the Chan merges round the mean to ulp(mean) at every step,
  // which at mean 1e4 / std 1 costs about one ulp (1e-3) of output accuracy -- more than PyTorch's
  // pairwise sum loses.
  float c = 0.f;
  if (!p.is_rms && n > 0) {
    c = to_float(x[0]);
    if (res) c += p.residual_f32 ? static_cast<const float*>(res)[0] : to_float(static_cast<const T*>(res)[0]);
  }
  auto shifted_stats = [&](const float (&v)[VEC], int count) {
    float sv[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sv[k] = v[k] - c;
    return slot_stats(sv, count, p.is_rms);
  };

  Stats st{0.f, 0.f, 0.f};
  float cache[kVecs > 0 ? kVecs : 1][VEC];
  if constexpr (kVecs > 0) {
#pragma unroll
    for (int s = 0; s < kVecs; ++s) {
      const int j = lt + s * TPR;
      if (j < nslots) {
        load_h(j, cache[s]);
        if (h_out) store_any<T, VEC>(h_out, p.h_f32, j * VEC, n, vec_ok, cache[s]);
        st = merge(st, shifted_stats(cache[s], n - j * VEC));
      }
    }
  } else {
    for (int j = lt; j < nslots; j += TPR) {
      float v[VEC];
      load_h(j, v);
      if (h_out) store_any<T, VEC>(h_out, p.h_f32, j * VEC, n, vec_ok, v);
      st = merge(st, shifted_stats(v, n - j * VEC));
    }
  }
  st = row_reduce<TPR>(st);
  const float ms = p.is_rms ? 0.f : st.mean;   // mean of h - c
  const float mean = c + ms;
  const float rstd = rsqrtf(st.m2 / float(n) + p.eps);
  if (lt == 0) {
    if (p.mean) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  auto normalise = [&](int j, float (&v)[VEC]) {
    float wv[VEC], bv[VEC];
    if (w) load_vec<P, VEC>(w, j * VEC, n, vec_ok, wv);
    if (b) load_vec<P, VEC>(b, j * VEC, n, vec_ok, bv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float y = ((v[k] - c) - ms) * rstd;
      if (w) y *= wv[k];
      if (b) y += bv[k];
      v[k] = y;
    }
    store_vec<T, VEC>(out, j * VEC, n, vec_ok, v);
  };
  if constexpr (kVecs > 0) {
#pragma unroll
    for (int s = 0; s < kVecs; ++s) {
      const int j = lt + s * TPR;
      if (j < nslots) normalise(j, cache[s]);
    }
  } else {
    for (int j = lt; j < nslots; j += TPR) {
      float v[VEC];
      load_h(j, v);
      normalise(j, v);
    }
  }
}

}  // namespace tf::norms
