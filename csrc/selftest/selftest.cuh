// Self-test kernels of the PTX wrappers and the host emulation (tests/test_emulator.py).
// mma_tile_kernel and warp_ops_kernel are also built for the GPU (the static checks look for HMMA in
// mma_tile_kernel's SASS; on a GPU the same tests check the wrappers against the hardware).
#pragma once

#include "common/device.cuh"
#include "common/ptx.cuh"

namespace tf::selftest {

// D[16][8] = A[16][16] @ B[16][8] + C, one warp, through cp.async -> shared -> ldmatrix -> mma.
//   a_trans: A is given transposed (At[k][m], row-major), loaded with ldmatrix .trans
//   b_trans: B is given as B[k][n] row-major (loaded with .trans); else as Bt[n][k] (the "col" operand)
//   variant: 0 = A with one x4, B with one x2; 1 = A with four x1, B with two x1; 2 = A with two x2,
//            B with two x1
//   skip_wait: omit cp.async wait (a deliberate bug: must read poisoned shared memory)
template <typename T>
__global__ void __launch_bounds__(32) mma_tile_kernel(const T* __restrict__ A, const T* __restrict__ B,
                                                      const float* __restrict__ C, float* __restrict__ D,
                                                      int a_trans, int b_trans, int variant, int skip_wait) {
  TF_DYNAMIC_SMEM(T, smem);
  T* sA = smem;         // 16 x 16, as given (A or At)
  T* sB = smem + 256;   // 16 x 8 (B) or 8 x 16 (Bt), as given
  const int lane = threadIdx.x;
  ptx::cp_async_16(sA + 8 * lane, A + 8 * lane);                       // 32 chunks of 8 elements
  if (lane < 16) ptx::cp_async_16(sB + 8 * lane, B + 8 * lane);        // 16 chunks
  ptx::cp_async_commit();
  if (!skip_wait) ptx::cp_async_wait<0>();
  __syncthreads();

  // Row address this lane gives for 8x8 matrix `quad` (0..3 = A quadrants [r0-7,c0-7], [r8-15,c0-7],
  // [r0-7,c8-15], [r8-15,c8-15]) of A, row r of that 8x8 matrix.
  auto a_row = [&](int quad, int r) -> const T* {
    const int i0 = (quad & 1) * 8, k0 = (quad >> 1) * 8;
    return a_trans ? sA + (k0 + r) * 16 + i0     // At[k0 + r][i0 .. i0+7]
                   : sA + (i0 + r) * 16 + k0;    // A[i0 + r][k0 .. k0+7]
  };
  // Row address for B's 8x8 matrix j (k rows 8j..8j+7), row r.
  auto b_row = [&](int j, int r) -> const T* {
    return b_trans ? sB + (8 * j + r) * 8        // B[8j + r][0..7]
                   : sB + r * 16 + 8 * j;        // Bt[r][8j .. 8j+7]
  };
  uint32_t a[4], b[2];
  const int g8 = lane >> 3, r8 = lane & 7;
  if (variant == 0) {
    if (a_trans) ptx::ldmatrix_x4_trans(a, a_row(g8, r8));
    else ptx::ldmatrix_x4(a, a_row(g8, r8));
    if (b_trans) ptx::ldmatrix_x2_trans(b, b_row(g8 & 1, r8));
    else ptx::ldmatrix_x2(b, b_row(g8 & 1, r8));
  } else {
    if (variant == 1) {
      for (int q = 0; q < 4; ++q) {
        uint32_t r1[1];
        if (a_trans) ptx::ldmatrix_x1_trans(r1, a_row(q, r8));
        else ptx::ldmatrix_x1(r1, a_row(q, r8));
        a[q] = r1[0];
      }
    } else {
      for (int h = 0; h < 2; ++h) {  // quadrants 2h, 2h+1
        uint32_t r2[2];
        if (a_trans) ptx::ldmatrix_x2_trans(r2, a_row(2 * h + (g8 & 1), r8));
        else ptx::ldmatrix_x2(r2, a_row(2 * h + (g8 & 1), r8));
        a[2 * h] = r2[0];
        a[2 * h + 1] = r2[1];
      }
    }
    for (int j = 0; j < 2; ++j) {
      uint32_t r1[1];
      if (b_trans) ptx::ldmatrix_x1_trans(r1, b_row(j, r8));
      else ptx::ldmatrix_x1(r1, b_row(j, r8));
      b[j] = r1[0];
    }
  }
  const int g = lane >> 2, t = lane & 3;
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
  ptx::mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = d[i];
}

// Warp shuffles and votes; out has 10 ints per thread:
//   [0] __shfl_sync(x, (lane * 7 + 3) % width, width)  [1] __shfl_up_sync(x, 3, width)
//   [2] __shfl_down_sync(x, 5, width)                  [3] __shfl_xor_sync(x, 6 % width, width)
//   [4] __ballot_sync(x > 0) (as int)                   [5] __any_sync(x > 100)
//   [6] __all_sync(x > -100)                             [7] butterfly sum of float(x) over the warp
//   [8] lanes 0-15 only: __shfl_xor_sync(0x0000ffff, x, 1); other lanes -1
//   [9] __syncthreads_count(x > 0)
__global__ void warp_ops_kernel(const int* __restrict__ x, int* __restrict__ out, int width) {
  const int tid = threadIdx.x, lane = tid & 31;
  const int v = x[tid];
  int* o = out + 10 * tid;
  o[0] = __shfl_sync(kFullMask, v, (lane * 7 + 3) % width, width);
  o[1] = __shfl_up_sync(kFullMask, v, 3, width);
  o[2] = __shfl_down_sync(kFullMask, v, 5, width);
  o[3] = __shfl_xor_sync(kFullMask, v, 6 % width, width);
  o[4] = int(__ballot_sync(kFullMask, v > 0));
  o[5] = __any_sync(kFullMask, v > 100);
  o[6] = __all_sync(kFullMask, v > -100);
  float s = float(v);
  for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(kFullMask, s, m);
  o[7] = int(s);
  o[8] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 1) : -1;
  o[9] = __syncthreads_count(v > 0);
}

// Two warpgroups (256 threads) take turns through named barriers, as the consumers of the sm_90a attention forward
// do: barrier 1 + w is warpgroup w's turn, completed by its 128 bar.sync threads and the other warpgroup's 128
// bar.arrive threads. Warpgroup 1 arrives on barrier 1 once before its loop (warpgroup 0 takes the first turn) and
// after every turn but its last (warpgroup 0 has none left), so every arrival is consumed by a bar.sync. In its
// turn `it`, thread 0 of warpgroup w appends 2 x[it] + w to out (a shared counter): out alternates
// 2 x[0], 2 x[0] + 1, 2 x[1], ... exactly when the turns alternate.
// mode (emulator-only bugs, they hang or race on a GPU): 1 warpgroup 1 skips the first arrive (both wait: deadlock);
// 2 warpgroup 1 also arrives after its last turn (arrivals left pending at exit); 3 warpgroup 1 swaps the two ids.
__global__ void __launch_bounds__(256) named_barrier_kernel(const int* __restrict__ x, int* __restrict__ out,
                                                            int iters, int mode) {
  __shared__ int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  const int w = threadIdx.x / 128;
  const int mine = mode == 3 && w == 1 ? 2 - w : 1 + w, other = mode == 3 && w == 1 ? 1 + w : 2 - w;
  if (w == 1 && iters > 0 && mode != 1) ptx::named_barrier_arrive(1, 256);
  for (int it = 0; it < iters; ++it) {
    ptx::named_barrier_sync(mine, 256);
    if (threadIdx.x % 128 == 0) {
      const int k = count;
      out[k] = 2 * x[it] + w;
      count = k + 1;
    }
    if (w == 0 || it < iters - 1 || mode == 2) ptx::named_barrier_arrive(other, 256);
  }
}

#ifdef TILEFORMER_EMULATE
// Emulator-only kernels with deliberate bugs (they would hang or race on a GPU).

// out[b * n + t] = value written by thread t - 1 (t > 0) or t (t = 0): correct only with the barrier.
// In thread order the missing barrier goes unnoticed (thread t - 1 runs first); random order catches it.
__global__ void neighbour_kernel(float* __restrict__ out, int with_barrier, float base) {
  __shared__ float s[1024];
  const int t = threadIdx.x;
  s[t] = base + 1000.f * blockIdx.x + t;
  if (with_barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = s[t > 0 ? t - 1 : 0];
}

// mode 0: threads >= 16 return before a __syncthreads; 1: two different __syncthreads (divergent);
// 2: lane 5 skips a full-warp shuffle.
__global__ void divergent_kernel(int* __restrict__ out, int mode) {
  const int t = threadIdx.x;
  if (mode == 0) {
    if (t >= 16) return;
    __syncthreads();
  } else if (mode == 1) {
    if (t < 8) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else {
    if ((t & 31) != 5) out[t] = __shfl_sync(kFullMask, t, 0);
  }
  out[t] = t;
}

// One access at x + offset / out + offset (elements), by thread 0 of one warp: mode 0 loads x[offset] into
// out[0]; 1 stores x[0] to out[offset]; 2 copies x[offset .. offset + 3] by a 16-byte cp.async into out[0..3].
// With the bounds check on (TILEFORMER_EMU_CHECK_BOUNDS=1) an offset outside the tensors fails the launch.
__global__ void bounds_kernel(gptr<const float> x, gptr<float> out, int64_t offset, int mode) {
  __shared__ float s[4];
  if (threadIdx.x != 0) return;
  if (mode == 0) {
    out[0] = x[offset];
  } else if (mode == 1) {
    out[offset] = x[0];
  } else {
    ptx::cp_async_16(s, x + offset);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    for (int i = 0; i < 4; ++i) out[i] = s[i];
  }
}
#endif

}  // namespace tf::selftest
