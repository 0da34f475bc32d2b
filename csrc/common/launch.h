// tf::launch: the one way .cu launchers start a kernel, so the same launcher source runs on a GPU
// (nvcc: <<<grid, block, smem, stream>>>, error check, opt-in to >48 KB dynamic shared memory) or on
// the CPU (g++ with TILEFORMER_EMULATE: common/emu.h runs the grid block by block). Launch errors
// throw std::runtime_error; the torch bindings turn that into a Python RuntimeError.
#pragma once

#include <stdexcept>
#include <string>

#include "common/device.cuh"

namespace tf {

#ifdef TILEFORMER_EMULATE

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "tf::launch: wrong number of kernel arguments");
  (void)stream;
  emu::launch(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { kernel(KArgs(args)...); });
}

// Number of SMs of the current device (launchers size persistent grids / reduction buffers with it).
// The emulator reports a small number, so multi-block reductions are still exercised.
inline int num_sms(cudaStream_t) { return 3; }

#else

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "tf::launch: wrong number of kernel arguments");
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
               "tf::launch: cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  kernel<<<grid, block, smem, stream>>>(KArgs(args)...);
  check_cuda(cudaGetLastError(), "tf::launch: kernel launch failed");
}

inline int num_sms(cudaStream_t) {
  int dev = 0, n = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return n;
}

#endif

}  // namespace tf
