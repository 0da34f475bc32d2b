// Torch-facing helpers shared by the per-op binding headers (<op>/<op>_bindings.h). Included only by
// csrc/bindings.cpp, which is compiled twice:
//   GPU build  (transformer._C):     ops in torch.ops.tileformer, implemented for the CUDA dispatch key;
//   emu build  (transformer._C_emu): csrc/emu_bindings.cpp defines TILEFORMER_EMULATE and includes
//                                    bindings.cpp: ops in torch.ops.tileformer_emu, for the CPU key.
// Every input check is written once, here or in the op's binding header, and raises ValueError
// (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE) naming the argument.
#pragma once

#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "common/types.h"

#ifdef TILEFORMER_EMULATE
#define TF_NS tileformer_emu
#define TF_DISPATCH_KEY CPU
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define TF_NS tileformer
#define TF_DISPATCH_KEY CUDA
#endif

// TORCH_LIBRARY pastes its namespace argument: expand TF_NS first.
#define TF_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define TF_LIBRARY(m) TF_LIBRARY_(TF_NS, m)
#define TF_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define TF_LIBRARY_IMPL(m) TF_LIBRARY_IMPL_(TF_NS, TF_DISPATCH_KEY, m)

namespace tf::bind {

#ifdef TILEFORMER_EMULATE
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
constexpr const char* kDeviceName = "CPU (TILEFORMER_EMULATE_CUDA host emulation)";
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
constexpr const char* kDeviceName = "CUDA";
#endif

// Sets the current device for the launch (GPU); nothing to do in the emulator.
struct DeviceGuard {
#ifdef TILEFORMER_EMULATE
  explicit DeviceGuard(const at::Tensor&) {}
#else
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
#endif
};

inline cudaStream_t stream_for(const at::Tensor& t) {
#ifdef TILEFORMER_EMULATE
  (void)t;
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor* same_as = nullptr) {
  TORCH_CHECK_VALUE(t.device().type() == kDeviceType, name, " must be a ", kDeviceName, " tensor, got ",
                    t.device());
  if (same_as) TORCH_CHECK_VALUE(t.device() == same_as->device(), name, " must be on ", same_as->device(),
                                 ", got ", t.device());
}

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::f32;
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

inline bool poisoning() {
  static const bool on = [] {
    const char* s = std::getenv("TILEFORMER_POISON");
    return s && std::strcmp(s, "1") == 0;
  }();
  return on;
}

// Output allocation: torch.empty, filled with NaN under TILEFORMER_POISON=1 (tests), so an element a
// kernel forgets to write fails the comparison.
inline at::Tensor empty(at::IntArrayRef shape, at::ScalarType dtype, const at::Tensor& like) {
  at::Tensor t = at::empty(shape, like.options().dtype(dtype));
  if (poisoning() && at::isFloatingType(dtype)) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

}  // namespace tf::bind
