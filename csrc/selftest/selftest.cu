// Launchers of the self-test kernels (compiled by nvcc for the GPU, by g++ for the emulator).
#include "selftest/selftest.h"

#include "common/launch.h"
#include "selftest/selftest.cuh"

namespace tf::selftest {

void mma_tile(DType dtype, const void* A, const void* B, const float* C, float* D, bool a_trans, bool b_trans,
              int variant, bool skip_wait, cudaStream_t stream) {
  const size_t smem = (256 + 128) * 2;
  if (dtype == DType::f16)
    launch(mma_tile_kernel<__half>, dim3(1), dim3(32), smem, stream, static_cast<const __half*>(A),
           static_cast<const __half*>(B), C, D, int(a_trans), int(b_trans), variant, int(skip_wait));
  else
    launch(mma_tile_kernel<__nv_bfloat16>, dim3(1), dim3(32), smem, stream, static_cast<const __nv_bfloat16*>(A),
           static_cast<const __nv_bfloat16*>(B), C, D, int(a_trans), int(b_trans), variant, int(skip_wait));
}

void warp_ops(const int* x, int* out, int n, int width, cudaStream_t stream) {
  launch(warp_ops_kernel, dim3(1), dim3(n), 0, stream, x, out, width);
}

void named_barrier(const int* x, int* out, int iters, int mode, cudaStream_t stream) {
  launch(named_barrier_kernel, dim3(1), dim3(256), 0, stream, x, out, iters, mode);
}

#ifdef TILEFORMER_EMULATE
void neighbour(float* out, int blocks, int threads, bool with_barrier, float base) {
  launch(neighbour_kernel, dim3(blocks), dim3(threads), 0, nullptr, out, int(with_barrier), base);
}

void divergent(int* out, int threads, int mode) {
  launch(divergent_kernel, dim3(1), dim3(threads), 0, nullptr, out, mode);
}

void bounds(gptr<const float> x, gptr<float> out, int64_t offset, int mode) {
  launch(bounds_kernel, dim3(1), dim3(32), 0, nullptr, x, out, offset, mode);
}

void emu_set_schedule(bool random, uint64_t seed) { emu::set_schedule(random, seed); }
void emu_set_schedule_lag(bool on) { emu::set_schedule_lag(on); }
uint64_t emu_mma_count() {
  std::lock_guard<std::mutex> lock(emu::globals().launch_mutex);
  return emu::globals().mma_count;
}
uint64_t emu_wgmma_count() {
  std::lock_guard<std::mutex> lock(emu::globals().launch_mutex);
  return emu::globals().wgmma_count;
}
uint64_t emu_ldmatrix_x4_count() {
  std::lock_guard<std::mutex> lock(emu::globals().launch_mutex);
  return emu::globals().ldmatrix_x4_count;
}
#endif

}  // namespace tf::selftest
