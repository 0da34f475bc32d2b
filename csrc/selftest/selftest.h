// Launchers of the self-test kernels (selftest/selftest.cu); see selftest/selftest.cuh.
#pragma once

#include "common/types.h"

namespace tf::selftest {

// D[16][8] = A @ B + C in fp32; A, B fp16 or bf16 (layouts: see mma_tile_kernel).
void mma_tile(DType dtype, const void* A, const void* B, const float* C, float* D, bool a_trans, bool b_trans,
              int variant, bool skip_wait, cudaStream_t stream);
// out[n * 10] from x[n] (n threads, one block); see warp_ops_kernel.
void warp_ops(const int* x, int* out, int n, int width, cudaStream_t stream);
// out[2 * iters] from x[iters]: two warpgroups alternating turns through named barriers; see named_barrier_kernel.
void named_barrier(const int* x, int* out, int iters, int mode, cudaStream_t stream);

#ifdef TILEFORMER_EMULATE
void neighbour(float* out, int blocks, int threads, bool with_barrier, float base);
void divergent(int* out, int threads, int mode);
// bounds_kernel (selftest/selftest.cuh): one load / store / cp.async at an element offset.
void bounds(gptr<const float> x, gptr<float> out, int64_t offset, int mode);
// Scheduling of the emulated threads for the next launches (common/emu.h): random order or in order.
void emu_set_schedule(bool random, uint64_t seed);
// The random schedule with one lagging warpgroup per block (common/emu.h set_schedule_lag).
void emu_set_schedule_lag(bool on);
// Warp-level mma.sync m16n8k16 executed by emulated kernels since the extension was loaded.
uint64_t emu_mma_count();
// Warpgroup-level wgmma.mma_async (any N) executed by emulated kernels since the extension was loaded.
uint64_t emu_wgmma_count();
// Warp-level ldmatrix .x4 (plain or .trans) executed by emulated kernels since the extension was loaded.
uint64_t emu_ldmatrix_x4_count();
#endif

}  // namespace tf::selftest
