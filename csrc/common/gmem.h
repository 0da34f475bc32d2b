// Global-memory pointers of kernel code: gptr<T> (a pointer to T in global memory) and gcast<U>(p) (the
// same address as a pointer to U).
//
// GPU build: gptr<T> is T* and gcast<U> a reinterpret_cast, so kernels compile to exactly the code they
// would with raw pointers.
// Emulated build (TILEFORMER_EMULATE): gptr<T> is tf::emu::GPtr<T>, a pointer whose dereferences (p[i],
// *p) check, while an op call has registered the tensors its kernels may touch (TILEFORMER_EMU_CHECK_BOUNDS=1;
// tf::bind::KernelMemory in common/bindings.h), that the whole access lies inside one of them; so does the
// cp.async wrapper of common/ptx.cuh for its source. An access outside every registered tensor throws
// std::runtime_error, which ends the emulated launch with a RuntimeError naming the kernel, the block, the
// thread, the address and the nearest tensor. Pointer arithmetic is not checked (kernels form addresses they
// do not use, e.g. the source of a zero-filled cp.async).
//
// The parameter structs of the kernels hold their global memory only as gptr, so in the emulated build a
// kernel cannot read or write a tensor except through a checked access: a raw dereference of a kernel
// parameter does not compile.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef TILEFORMER_EMULATE
#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#endif

namespace tf {

#ifdef TILEFORMER_EMULATE

namespace emu {

// [lo, hi) bytes of one tensor an op call's kernels may touch; name: the argument it was passed as.
struct MemRange {
  uintptr_t lo, hi;
  const char* name;
};

// The tensors of the op call running on this thread (set by tf::bind::KernelMemory), or null: no checks.
inline thread_local const std::vector<MemRange>* g_mem_ranges = nullptr;
// Index of the range that held the last checked access (a hint, validated before use): consecutive accesses
// mostly fall in the same tensor.
inline thread_local size_t g_mem_hit = 0;

[[noreturn]] __attribute__((noinline, cold)) inline void out_of_bounds(const void* ptr, size_t bytes,
                                                                        const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  const MemRange* best = nullptr;
  uintptr_t best_gap = ~uintptr_t(0);
  for (const MemRange& r : *g_mem_ranges) {
    const uintptr_t gap = a < r.lo ? r.lo - a : (a >= r.hi ? a - r.hi : 0);
    if (gap < best_gap) best_gap = gap, best = &r;
  }
  char buf[512];
  int n = std::snprintf(buf, sizeof(buf), "out-of-bounds %s of %zu bytes at %p: inside no tensor of this call", what,
                        bytes, ptr);
  if (best) {
    const long long off = static_cast<long long>(a - best->lo);   // two's complement: negative before the start
    std::snprintf(buf + n, sizeof(buf) - n, " (nearest: %s = [%p, +%zu bytes), the access is at byte offset %lld)",
                  best->name, reinterpret_cast<const void*>(best->lo), static_cast<size_t>(best->hi - best->lo), off);
  } else {
    std::snprintf(buf + n, sizeof(buf) - n, " (the call registered no tensor)");
  }
  throw std::runtime_error(buf);
}

// Checks that [ptr, ptr + bytes) lies inside one registered tensor (no-op while none are registered).
inline void check_access(const void* ptr, size_t bytes, const char* what) {
  const std::vector<MemRange>* ranges = g_mem_ranges;
  if (!ranges) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  const MemRange* r = ranges->data();
  const size_t n = ranges->size(), hit = g_mem_hit;
  if (hit < n && a >= r[hit].lo && a < r[hit].hi && bytes <= r[hit].hi - a) return;
  for (size_t i = 0; i < n; ++i)
    if (a >= r[i].lo && a < r[i].hi && bytes <= r[i].hi - a) {
      g_mem_hit = i;
      return;
    }
  out_of_bounds(ptr, bytes, what);
}

template <typename T>
class GPtr {
 public:
  GPtr() = default;
  GPtr(std::nullptr_t) {}
  GPtr(T* p) : p_(p) {}
  template <typename U>
    requires std::is_convertible_v<U*, T*>
  GPtr(GPtr<U> o) : p_(o.get()) {}

  T* get() const { return p_; }
  explicit operator bool() const { return p_ != nullptr; }

  GPtr operator+(int64_t i) const requires(!std::is_void_v<T>) { return GPtr(p_ + i); }
  GPtr operator-(int64_t i) const requires(!std::is_void_v<T>) { return GPtr(p_ - i); }
  GPtr& operator+=(int64_t i) requires(!std::is_void_v<T>) { p_ += i; return *this; }
  GPtr& operator-=(int64_t i) requires(!std::is_void_v<T>) { p_ -= i; return *this; }

  template <typename U = T>
    requires(!std::is_void_v<U>)
  U& operator[](int64_t i) const {
    check_access(p_ + i, sizeof(U), "global memory access");
    return p_[i];
  }
  template <typename U = T>
    requires(!std::is_void_v<U>)
  U& operator*() const {
    check_access(p_, sizeof(U), "global memory access");
    return *p_;
  }

 private:
  T* p_ = nullptr;
};

}  // namespace emu

template <typename T>
using gptr = emu::GPtr<T>;

template <typename U, typename T>
inline gptr<U> gcast(gptr<T> p) {
  return gptr<U>(reinterpret_cast<U*>(p.get()));
}

#else

template <typename T>
using gptr = T*;

template <typename U, typename T>
#ifdef __CUDACC__
__host__ __device__ __forceinline__
#else
inline
#endif
U* gcast(T* p) {
  return reinterpret_cast<U*>(p);
}

#endif

}  // namespace tf
