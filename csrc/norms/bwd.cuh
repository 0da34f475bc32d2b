// LayerNorm / RMSNorm backward kernels. With xhat = (h - mean) * rstd (RMSNorm: h * rstd), g = w * dy:
//   dh = rstd * (g - xhat * c1 - c2) + dh_prenorm,  c1 = mean(xhat * g),  c2 = mean(g) (RMSNorm: 0)
//   dW = sum_rows dy * xhat,  dB = sum_rows dy
// dx = dh in x's dtype; dres = dh again (in the residual's dtype) when asked.
// dW / dB are deterministic: each block (or row group) writes fp32 column partial sums to its own row
// of a [partial_rows, n] buffer, and norm_reduce_kernel sums the rows in a fixed order.
//
// Kernels (T, P, TPR, kVecs as in fwd.cuh):
//   norm_bwd_kernel      persistent, the row in registers (kVecs > 0): x, dy read once
//   norm_row_sums_kernel large n, step 1: c1, c2 per row (one row per block)
//   norm_bwd_cols_kernel large n, step 2: 2-D grid (row groups x column chunks): dx and partials
//   norm_reduce_kernel   column sums of the partials
#pragma once

#include "norms/common.cuh"
#include "norms/norms.h"

namespace tf::norms {

// h, dy and xhat of slot j of a row; g = w * dy.
template <typename T, typename P, int VEC>
struct BwdRow {
  const void* x;
  const void* res;
  const T* dy;
  float mean, rstd;

  TF_DEVICE void load(const BwdParams& p, int j, bool vec_ok, float (&xhat)[VEC], float (&dyv)[VEC]) const {
    load_any<T, VEC>(x, p.x_f32, j * VEC, p.n, vec_ok, xhat);
    if (res) {
      float r[VEC];
      load_any<T, VEC>(res, p.residual_f32, j * VEC, p.n, vec_ok, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) xhat[k] += r[k];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) xhat[k] = (xhat[k] - mean) * rstd;
    load_vec<T, VEC>(dy, j * VEC, p.n, vec_ok, dyv);
  }
};

template <typename T, typename P, int VEC>
TF_DEVICE BwdRow<T, P, VEC> bwd_row(const BwdParams& p, int64_t row) {
  return {row_ptr<T>(p.x, p.x_f32, row, p.stride_x),
          p.residual ? row_ptr<T>(p.residual, p.residual_f32, row, p.stride_res) : nullptr,
          static_cast<const T*>(p.dy) + row * p.stride_dy, p.mean ? p.mean[row] : 0.f, p.rstd[row]};
}

// dx (and dres) of slot j from xhat, g and the row constants.
template <typename T, int VEC>
TF_DEVICE void store_dx(const BwdParams& p, int64_t row, int j, bool vec_ok, const float (&xhat)[VEC],
                        const float (&g)[VEC], float c1, float c2, float rstd) {
  float dx[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) dx[k] = (g[k] - (xhat[k] * c1 + c2)) * rstd;
  if (p.dh) {
    float d[VEC];
    load_any<T, VEC>(row_ptr<T>(p.dh, p.dh_f32, row, p.stride_dh), p.dh_f32, j * VEC, p.n, vec_ok, d);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dx[k] += d[k];
  }
  store_vec<T, VEC>(static_cast<T*>(p.dx) + row * p.stride_dx, j * VEC, p.n, vec_ok, dx);
  if (p.dres) store_any<T, VEC>(row_ptr<T>(p.dres, p.dres_f32, row, p.stride_dres), p.dres_f32, j * VEC, p.n, vec_ok, dx);
}

template <typename T, typename P, int VEC>
TF_DEVICE void times_weight(const P* w, int j, int n, bool vec_ok, const float (&dy)[VEC], float (&g)[VEC]) {
  if (w) {
    load_vec<P, VEC>(w, j * VEC, n, vec_ok, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] *= dy[k];
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] = dy[k];
  }
}

// Partial sums of one thread's columns (slots lt, lt + TPR, ...) to row prow of the partial buffers.
template <int VEC>
TF_DEVICE void store_partials(const BwdParams& p, int64_t prow, int j, const float (&dw)[VEC], const float (&db)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int c = j * VEC + k;
    if (c < p.n) {
      if (p.dw_part) p.dw_part[prow * p.n + c] = dw[k];
      if (p.db_part) p.db_part[prow * p.n + c] = db[k];
    }
  }
}

// Persistent: block b serves row groups b, b + gridDim.x, ... (a group = the block's 1 or 4 rows) and
// writes its column partial sums to row b of the partial buffers.
template <typename T, typename P, int TPR, int kVecs>
__global__ void __launch_bounds__(TPR == 32 ? 128 : TPR) norm_bwd_kernel(BwdParams p, bool vec_ok) {
  static_assert(kVecs > 0, "norm_bwd_kernel keeps the row in registers");
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int kRowsPerBlock = TPR == 32 ? 4 : 1;
  const int lt = threadIdx.x % TPR, sub = threadIdx.x / TPR;
  const int n = p.n, nslots = ceil_div(n, VEC);
  const P* w = static_cast<const P*>(p.weight);
  float dw[kVecs][VEC], db[kVecs][VEC];
#pragma unroll
  for (int s = 0; s < kVecs; ++s)
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[s][k] = db[s][k] = 0.f;

  const int64_t groups = ceil_div<int64_t>(p.rows, kRowsPerBlock);
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t row = grp * kRowsPerBlock + sub;
    if (kRowsPerBlock > 1 && row >= p.rows) break;  // one warp per row: no block barrier in the loop
    const BwdRow<T, P, VEC> r = bwd_row<T, P, VEC>(p, row);
    float xhat[kVecs][VEC], g[kVecs][VEC];
    float2 sums = make_float2(0.f, 0.f);
#pragma unroll
    for (int s = 0; s < kVecs; ++s) {
      const int j = lt + s * TPR;
      if (j < nslots) {
        float dy[VEC];
        r.load(p, j, vec_ok, xhat[s], dy);
        times_weight<T, P, VEC>(w, j, n, vec_ok, dy, g[s]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const bool valid = j * VEC + k < n;  // padding: dy = 0 but xhat != 0
          sums.x += valid ? xhat[s][k] * g[s][k] : 0.f;
          sums.y += g[s][k];
          dw[s][k] += valid ? dy[k] * xhat[s][k] : 0.f;
          db[s][k] += dy[k];
        }
      }
    }
    sums = row_sum2<TPR>(sums);
    const float c1 = sums.x / float(n), c2 = p.is_rms ? 0.f : sums.y / float(n);
#pragma unroll
    for (int s = 0; s < kVecs; ++s) {
      const int j = lt + s * TPR;
      if (j < nslots) store_dx<T, VEC>(p, row, j, vec_ok, xhat[s], g[s], c1, c2, r.rstd);
    }
  }
  if constexpr (kRowsPerBlock == 1) {
#pragma unroll
    for (int s = 0; s < kVecs; ++s) {
      const int j = lt + s * TPR;
      if (j < nslots) store_partials<VEC>(p, blockIdx.x, j, dw[s], db[s]);
    }
  } else {  // sum the warps' column partials in shared memory (fixed order): one partial row per block
    constexpr int kCols = kVecs * TPR * VEC;
    __shared__ float red[2][kRowsPerBlock][kCols];
#pragma unroll
    for (int s = 0; s < kVecs; ++s)
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int c = (lt + s * TPR) * VEC + k;
        if (c < n) {
          red[0][sub][c] = dw[s][k];
          red[1][sub][c] = db[s][k];
        }
      }
    __syncthreads();
    for (int c = threadIdx.x; c < n; c += kRowsPerBlock * TPR) {
      float sw = 0.f, sb = 0.f;
#pragma unroll
      for (int r = 0; r < kRowsPerBlock; ++r) {
        sw += red[0][r][c];
        sb += red[1][r][c];
      }
      if (p.dw_part) p.dw_part[int64_t(blockIdx.x) * n + c] = sw;
      if (p.db_part) p.db_part[int64_t(blockIdx.x) * n + c] = sb;
    }
  }
}

// Large n, step 1: row_sums[row] = c1, row_sums[rows + row] = c2. One row per block of TPR threads.
template <typename T, typename P, int TPR>
__global__ void __launch_bounds__(TPR) norm_row_sums_kernel(BwdParams p, bool vec_ok) {
  constexpr int VEC = 16 / int(sizeof(T));
  const int64_t row = blockIdx.x;
  const int n = p.n, nslots = ceil_div(n, VEC);
  const P* w = static_cast<const P*>(p.weight);
  const BwdRow<T, P, VEC> r = bwd_row<T, P, VEC>(p, row);
  float2 sums = make_float2(0.f, 0.f);
  for (int j = threadIdx.x; j < nslots; j += TPR) {
    float xhat[VEC], dy[VEC], g[VEC];
    r.load(p, j, vec_ok, xhat, dy);
    times_weight<T, P, VEC>(w, j, n, vec_ok, dy, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      sums.x += j * VEC + k < n ? xhat[k] * g[k] : 0.f;
      sums.y += g[k];
    }
  }
  sums = row_sum2<TPR>(sums);
  if (threadIdx.x == 0) {
    p.row_sums[row] = sums.x / float(n);
    p.row_sums[p.rows + row] = p.is_rms ? 0.f : sums.y / float(n);
  }
}

// Large n, step 2: block (i, c) handles rows [i * rows_per_group, ...) x slots [c * TPR, (c + 1) * TPR):
// dx, and the dW / dB partials of its columns to row i of the partial buffers.
template <typename T, typename P, int TPR>
__global__ void __launch_bounds__(TPR) norm_bwd_cols_kernel(BwdParams p, bool vec_ok, int64_t rows_per_group) {
  constexpr int VEC = 16 / int(sizeof(T));
  const int n = p.n, nslots = ceil_div(n, VEC);
  const int j = blockIdx.y * TPR + threadIdx.x;
  if (j >= nslots) return;  // no barrier in this kernel
  const P* w = static_cast<const P*>(p.weight);
  const int64_t row0 = int64_t(blockIdx.x) * rows_per_group;
  const int64_t row1 = row0 + rows_per_group < p.rows ? row0 + rows_per_group : p.rows;
  float wv[VEC];
  if (w) load_vec<P, VEC>(w, j * VEC, n, vec_ok, wv);
  KahanSum dws[VEC], dbs[VEC];   // rows_per_group can be in the hundreds: compensated sums
  for (int64_t row = row0; row < row1; ++row) {
    const BwdRow<T, P, VEC> r = bwd_row<T, P, VEC>(p, row);
    float xhat[VEC], dy[VEC], g[VEC];
    r.load(p, j, vec_ok, xhat, dy);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      g[k] = w ? wv[k] * dy[k] : dy[k];
      dws[k].add(j * VEC + k < n ? dy[k] * xhat[k] : 0.f);
      dbs[k].add(dy[k]);
    }
    store_dx<T, VEC>(p, row, j, vec_ok, xhat, g, p.row_sums[row], p.row_sums[p.rows + row], r.rstd);
  }
  float dw[VEC], db[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    dw[k] = dws[k].value();
    db[k] = dbs[k].value();
  }
  store_partials<VEC>(p, blockIdx.x, j, dw, db);
}

// out[c] = sum over r of part[r][c], r = 0, 1, ... in order (deterministic), compensated (the persistent
// kernels leave one partial row per block: hundreds). One thread per column.
__global__ void __launch_bounds__(256) norm_reduce_kernel(const float* __restrict__ part, int64_t rows, int n,
                                                          float* __restrict__ out) {
  const int c = blockIdx.x * 256 + threadIdx.x;
  if (c >= n) return;
  KahanSum acc;
  for (int64_t r = 0; r < rows; ++r) acc.add(part[r * n + c]);
  out[c] = acc.value();
}

}  // namespace tf::norms
