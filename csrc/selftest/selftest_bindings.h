// Torch bindings of the self-test ops (tests/test_emulator.py): torch.ops.<ns>.selftest_*.
#pragma once

#include "common/bindings.h"
#include "selftest/selftest.h"

namespace tf::selftest_bindings {

using namespace tf::bind;

// a: [16, 16] (At when a_trans), b: [8, 16] (Bt) or [16, 8] (B when b_trans), c: [16, 8] fp32.
inline at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool a_trans, bool b_trans,
                      int64_t variant, bool skip_wait) {
  check_device(a, "a");
  check_device(b, "b", &a);
  check_device(c, "c", &a);
  const DType dt = dtype_of(a, "a");
  TORCH_CHECK_TYPE(dt != DType::f32, "a must be float16 or bfloat16, got float32");
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), "b must have a's dtype ", a.scalar_type(), ", got ",
                   b.scalar_type());
  TORCH_CHECK_TYPE(c.scalar_type() == at::kFloat, "c must be float32, got ", c.scalar_type());
  TORCH_CHECK_VALUE(a.sizes() == at::IntArrayRef({16, 16}), "a must have shape [16, 16], got ", a.sizes());
  TORCH_CHECK_VALUE(b.sizes() == (b_trans ? at::IntArrayRef({16, 8}) : at::IntArrayRef({8, 16})),
                    "b must have shape ", b_trans ? "[16, 8] (b_trans)" : "[8, 16]", ", got ", b.sizes());
  TORCH_CHECK_VALUE(c.sizes() == at::IntArrayRef({16, 8}), "c must have shape [16, 8], got ", c.sizes());
  TORCH_CHECK_VALUE(variant >= 0 && variant <= 2, "variant must be 0, 1 or 2, got ", variant);
  check_contiguous(a, "a");
  check_contiguous(b, "b");
  check_contiguous(c, "c");
  DeviceGuard guard(a);
  at::Tensor d = empty({16, 8}, at::kFloat, a);
  tf::selftest::mma_tile(dt, a.data_ptr(), b.data_ptr(), c.data_ptr<float>(), d.data_ptr<float>(), a_trans,
                         b_trans, int(variant), skip_wait, stream_for(a));
  return d;
}

// x: [n] int32, n a multiple of 32 in 32..1024; width a power of two in 1..32. Returns [n, 10] int32.
inline at::Tensor warp_ops(const at::Tensor& x, int64_t width) {
  check_device(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kInt, "x must be int32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) % 32 == 0 && x.size(0) >= 32 && x.size(0) <= 1024,
                    "x must be 1-D with a multiple of 32 elements in 32..1024, got ", x.sizes());
  TORCH_CHECK_VALUE(width >= 1 && width <= 32 && (width & (width - 1)) == 0,
                    "width must be a power of two in 1..32, got ", width);
  check_contiguous(x, "x");
  DeviceGuard guard(x);
  at::Tensor out = at::empty({x.size(0), 10}, x.options());
  tf::selftest::warp_ops(x.data_ptr<int>(), out.data_ptr<int>(), int(x.size(0)), int(width), stream_for(x));
  return out;
}

// x: int32 [iters >= 1]. Returns int32 [2 * iters]. Modes 1..3 (deliberate bugs) only in the emulator.
inline at::Tensor named_barrier(const at::Tensor& x, int64_t mode) {
  check_device(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kInt, "x must be int32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) >= 1 && x.size(0) <= 4096, "x must be 1-D with 1..4096 elements, got ",
                    x.sizes());
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 3, "mode must be 0, 1, 2 or 3, got ", mode);
  TORCH_CHECK_VALUE(mode == 0 || kDeviceType == c10::DeviceType::CPU, "modes 1 to 3 hang or race a GPU: emulator-only");
  check_contiguous(x, "x");
  DeviceGuard guard(x);
  at::Tensor out = at::empty({2 * x.size(0)}, x.options());
  out.fill_(-1);
  tf::selftest::named_barrier(x.data_ptr<int>(), out.data_ptr<int>(), int(x.size(0)), int(mode), stream_for(x));
  return out;
}

#ifdef TILEFORMER_EMULATE
inline at::Tensor neighbour(int64_t blocks, int64_t threads, bool with_barrier, double base) {
  TORCH_CHECK_VALUE(blocks >= 1 && threads >= 1 && threads <= 1024, "blocks >= 1 and threads in 1..1024");
  at::Tensor out = at::empty({blocks, threads}, at::TensorOptions().dtype(at::kFloat));
  tf::selftest::neighbour(out.data_ptr<float>(), int(blocks), int(threads), with_barrier, float(base));
  return out;
}

inline at::Tensor divergent(int64_t threads, int64_t mode) {
  TORCH_CHECK_VALUE(threads >= 1 && threads <= 1024, "threads must be in 1..1024, got ", threads);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2, got ", mode);
  at::Tensor out = at::zeros({threads}, at::TensorOptions().dtype(at::kInt));
  tf::selftest::divergent(out.data_ptr<int>(), int(threads), int(mode));
  return out;
}

inline void set_schedule(bool random, int64_t seed) { tf::selftest::emu_set_schedule(random, uint64_t(seed)); }
inline void set_schedule_lag(bool on) { tf::selftest::emu_set_schedule_lag(on); }
inline int64_t mma_count() { return int64_t(tf::selftest::emu_mma_count()); }
inline int64_t wgmma_count() { return int64_t(tf::selftest::emu_wgmma_count()); }
inline int64_t ldmatrix_x4_count() { return int64_t(tf::selftest::emu_ldmatrix_x4_count()); }

// x: float32 (any view); returns out (4 float32, zeros unless written). See bounds_kernel.
inline at::Tensor bounds(const at::Tensor& x, int64_t offset, int64_t mode) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2, got ", mode);
  at::Tensor out = at::zeros({4}, x.options());
  const KernelMemory memory({{"x", &x}, {"out", &out}});
  tf::selftest::bounds(x.data_ptr<float>(), out.data_ptr<float>(), offset, int(mode));
  return out;
}
#endif

inline void define(torch::Library& m) {
  m.def("selftest_mma(Tensor a, Tensor b, Tensor c, bool a_trans, bool b_trans, int variant, bool skip_wait) -> Tensor");
  m.def("selftest_warp_ops(Tensor x, int width) -> Tensor");
  m.def("selftest_named_barrier(Tensor x, int mode) -> Tensor");
#ifdef TILEFORMER_EMULATE
  // Tensor-less test ops: one catch-all kernel each.
  m.def("selftest_neighbour(int blocks, int threads, bool with_barrier, float base) -> Tensor", &neighbour);
  m.def("selftest_divergent(int threads, int mode) -> Tensor", &divergent);
  m.def("emu_set_schedule(bool random, int seed) -> ()", &set_schedule);
  m.def("emu_set_schedule_lag(bool on) -> ()", &set_schedule_lag);
  m.def("emu_mma_count() -> int", &mma_count);
  m.def("emu_wgmma_count() -> int", &wgmma_count);
  m.def("emu_ldmatrix_x4_count() -> int", &ldmatrix_x4_count);
  m.def("selftest_bounds(Tensor x, int offset, int mode) -> Tensor");
#endif
}

inline void impl(torch::Library& m) {
  m.impl("selftest_mma", &mma);
  m.impl("selftest_warp_ops", &warp_ops);
  m.impl("selftest_named_barrier", &named_barrier);
#ifdef TILEFORMER_EMULATE
  m.impl("selftest_bounds", &bounds);
#endif
}

}  // namespace tf::selftest_bindings
