// Launchers of the sm_90a self-test kernels (selftest/hopper.cu; kernels in selftest/hopper.cuh). On the GPU
// they throw std::runtime_error unless the device has compute capability 9.0 and the extension holds sm_90a code.
#pragma once

#include "common/types.h"

namespace tf::selftest {

// D[64][N] = A[a_rows][K] (rows a_rows .. 63 read as 0: TMA out-of-bounds fill) @ B (+ C); B given as Bt[N][K]
// or, with b_mn_major, as B[K][N]; with a_mn_major (N = 64, shared-memory A) A is given as At[K][64]. dtype f16 or
// bf16; N in {64, 128, 256}; see wgmma_kernel.
void wgmma_tile(DType dtype, const void* A, int a_rows, const void* B, const float* C, float* D, int N, int K,
                int swizzle, bool a_regs, bool b_mn_major, bool a_mn_major, bool use_c, int mutate,
                cudaStream_t stream);

// 16-bit src[src_rows][src_cols] -> tile[box_rows][box_cols] (TMA load at column x0, row y0) -> dst[dst_rows][dst_cols]
// (TMA store at x1, y1); rank3: through 3-D maps [rows / 2][2][cols] (rows, box_rows, y0, y1 even); see
// tma_copy_kernel.
void tma_copy(const void* src, int src_rows, int src_cols, void* dst, int dst_rows, int dst_cols, void* tile,
              int box_rows, int box_cols, int x0, int y0, int x1, int y1, int swizzle, bool skip_wait, bool rank3,
              cudaStream_t stream);

// 16-bit src [B][N][H][D] (sizes {B, N, H, D}, element strides {sb, sn, sh, 1}: a strided view as the attention
// forward's tensor maps take) -> tile[box_rows][box_cols]: one 4-D TMA load of the box [1][box_rows][1][box_cols]
// at column x0, row y0, head h0, batch b0 (elements outside the tensor read as 0); see tma_copy_kernel.
void tma_load_4d(const void* src, const int64_t* sizes, const int64_t* strides, void* tile, int box_rows,
                 int box_cols, int x0, int y0, int h0, int b0, int swizzle, cudaStream_t stream);

// out[128] from x[iters][128] through the producer / consumer mbarrier ring; see mbarrier_pingpong_kernel.
void mbarrier_pingpong(const float* x, float* out, int iters, int mode, cudaStream_t stream);

// out[2 pairs] (zeroed here) += the n pairs of x[2 n], pair i into pair i % pairs, by ptx::red_add_v2; see
// red_v2_kernel.
void red_add_v2(const float* x, float* out, int n, int pairs, cudaStream_t stream);

}  // namespace tf::selftest
