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
#include <initializer_list>
#include <optional>
#include <limits>
#include <utility>
#include <vector>

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

// The tensors an op call's kernels may touch, named as the op's arguments. Create one after allocating the
// outputs and workspaces, before the first launch, listing every tensor whose pointer reaches a kernel (the
// tensor actually passed: a contiguous copy, not the argument it was made from).
// Emulated build with TILEFORMER_EMU_CHECK_BOUNDS=1: while it lives, every global-memory access of the
// kernels (common/gmem.h) must lie inside one of these tensors' extents (the bytes from the lowest to the
// highest element of the view, not the whole storage), else the launch fails with a RuntimeError naming the
// kernel and the address. TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE=<name> leaves that tensor out (tests use it
// to prove an op's accesses are checked). GPU build, or the variable unset: nothing.
class KernelMemory {
 public:
  using Entry = std::pair<const char*, const at::Tensor*>;   // (name, tensor or null for an absent optional)

#ifdef TILEFORMER_EMULATE
  explicit KernelMemory(std::initializer_list<Entry> tensors) {
    const char* on = std::getenv("TILEFORMER_EMU_CHECK_BOUNDS");
    if (!on || std::strcmp(on, "1") != 0) return;
    const char* exclude = std::getenv("TILEFORMER_EMU_CHECK_BOUNDS_EXCLUDE");
    for (const Entry& e : tensors) {
      const at::Tensor* t = e.second;
      if (!t || !t->defined() || t->numel() == 0) continue;
      if (exclude && std::strcmp(exclude, e.first) == 0) continue;
      int64_t lo = 0, hi = 0;   // element offsets of the lowest and highest element from data_ptr
      for (int64_t d = 0; d < t->dim(); ++d) {
        const int64_t span = (t->size(d) - 1) * t->stride(d);
        (span < 0 ? lo : hi) += span;
      }
      const uintptr_t base = reinterpret_cast<uintptr_t>(t->data_ptr());
      const int64_t item = int64_t(t->element_size());
      ranges_.push_back({base + uintptr_t(lo * item), base + uintptr_t((hi + 1) * item), e.first});
    }
    prev_ = emu::g_mem_ranges;
    emu::g_mem_ranges = &ranges_;
    active_ = true;
  }
  ~KernelMemory() {
    if (active_) emu::g_mem_ranges = prev_;
  }

 private:
  std::vector<emu::MemRange> ranges_;
  const std::vector<emu::MemRange>* prev_ = nullptr;
  bool active_ = false;

 public:
#else
  explicit KernelMemory(std::initializer_list<Entry>) {}
#endif
  KernelMemory(const KernelMemory&) = delete;
  KernelMemory& operator=(const KernelMemory&) = delete;
};

// Entry of an optional tensor (absent: null).
inline const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

}  // namespace tf::bind
