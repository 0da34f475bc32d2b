// The first include of every kernel header (.cuh): CUDA types and keywords for nvcc, or the host
// emulation (common/emu.h) when the extension is built with TILEFORMER_EMULATE for the CPU.
// Kernel headers include no torch header and use only what this file and common/ptx.cuh provide.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef TILEFORMER_EMULATE
#include "common/emu.h"
// Dynamic shared memory: one buffer per launch, 128-byte aligned, poisoned with 0xFF per block.
#define TF_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::tf::emu::dynamic_smem())
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// extern __shared__ arrays must have one type across the program: declare bytes, cast per kernel.
#define TF_DYNAMIC_SMEM(T, name)                                        \
  extern __shared__ __align__(128) unsigned char tf_dynamic_smem_[];    \
  T* name = reinterpret_cast<T*>(tf_dynamic_smem_)
#endif

#define TF_DEVICE __device__ __forceinline__
#define TF_HOST_DEVICE __host__ __device__ __forceinline__

namespace tf {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
TF_HOST_DEVICE T ceil_div(T a, T b) { return (a + b - 1) / b; }

// fp32 <-> storage type conversions used by every kernel (T = float, __half, __nv_bfloat16).
template <typename T> TF_DEVICE float to_float(T v);
template <> TF_DEVICE float to_float<float>(float v) { return v; }
template <> TF_DEVICE float to_float<__half>(__half v) { return __half2float(v); }
template <> TF_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> TF_DEVICE T from_float(float v);
template <> TF_DEVICE float from_float<float>(float v) { return v; }
template <> TF_DEVICE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> TF_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace tf
