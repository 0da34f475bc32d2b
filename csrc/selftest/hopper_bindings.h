// Torch bindings of the sm_90a self-test ops (tests/test_emulator_hopper.py): torch.ops.<ns>.selftest_wgmma,
// selftest_tma_copy, selftest_tma_load_4d, selftest_mbarrier, selftest_red_v2. On the GPU they run only on a
// compute capability 9.0 device.
#pragma once

#include "common/bindings.h"
#include "selftest/hopper.h"

namespace tf::hopper_bindings {

using namespace tf::bind;

// a: [a_rows <= 64, K] (rows a_rows .. 63 of the tile read as 0), or At [K, 64] with a_mn_major (n 64, not a_regs);
// b: [n, K] (Bt) or [K, n] (b_mn_major), fp16 or bf16; c: [64, n] fp32 or None (D = A B). swizzle: 0 none, 1 32 B,
// 2 64 B, 3 128 B. Returns d [64, n] fp32.
inline at::Tensor wgmma(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c, int64_t n,
                        int64_t swizzle, bool a_regs, bool b_mn_major, int64_t mutate, bool a_mn_major) {
  check_device(a, "a");
  check_device(b, "b", &a);
  const DType dt = dtype_of(a, "a");
  TORCH_CHECK_TYPE(dt != DType::f32, "a must be float16 or bfloat16, got float32");
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), "b must have a's dtype ", a.scalar_type(), ", got ",
                   b.scalar_type());
  TORCH_CHECK_VALUE(n == 64 || n == 128 || n == 256, "n must be 64, 128 or 256, got ", n);
  TORCH_CHECK_VALUE(swizzle >= 0 && swizzle <= 3, "swizzle must be 0 (none), 1 (32 B), 2 (64 B) or 3 (128 B), got ",
                    swizzle);
  const int64_t chunk = swizzle == 0 ? 8 : (8 << swizzle);
  TORCH_CHECK_VALUE(!a_mn_major || (n == 64 && !a_regs), "a_mn_major is built for n 64 with A in shared memory");
  TORCH_CHECK_VALUE(a.dim() == 2 && (a_mn_major ? a.size(1) == 64 : (a.size(0) >= 1 && a.size(0) <= 64)),
                    a_mn_major ? "a must be At [K, 64], got " : "a must be [rows <= 64, K], got ", a.sizes());
  const int64_t K = a_mn_major ? a.size(0) : a.size(1);
  TORCH_CHECK_VALUE(K >= 16 && K <= 64 && K % 16 == 0 && K % chunk == 0, "K must be 16..64, a multiple of 16 and "
                    "of the swizzle span (", chunk, " elements), got ", K);
  TORCH_CHECK_VALUE(b.sizes() == (b_mn_major ? at::IntArrayRef({K, n}) : at::IntArrayRef({n, K})), "b must have shape ",
                    b_mn_major ? "[K, n]" : "[n, K]", ", got ", b.sizes());
  TORCH_CHECK_VALUE(mutate >= 0 && mutate <= 6, "mutate must be 0..6, got ", mutate);
  TORCH_CHECK_VALUE(mutate <= 2 || kDeviceType == c10::DeviceType::CPU, "mutate 3 to 6 are emulator-only");
  check_contiguous(a, "a");
  check_contiguous(b, "b");
  if (c) {
    check_device(*c, "c", &a);
    TORCH_CHECK_TYPE(c->scalar_type() == at::kFloat, "c must be float32, got ", c->scalar_type());
    TORCH_CHECK_VALUE(c->sizes() == at::IntArrayRef({64, n}), "c must have shape [64, n], got ", c->sizes());
    check_contiguous(*c, "c");
  }
  DeviceGuard guard(a);
  at::Tensor d = empty({64, n}, at::kFloat, a);
  const KernelMemory memory({{"a", &a}, {"b", &b}, {"c", opt(c)}, {"d", &d}});
  tf::selftest::wgmma_tile(dt, a.data_ptr(), int(a.size(0)), b.data_ptr(), c ? c->data_ptr<float>() : nullptr,
                           d.data_ptr<float>(), int(n), int(K), int(swizzle), a_regs, b_mn_major, a_mn_major, bool(c),
                           int(mutate), stream_for(a));
  return d;
}

// A TMA box of 16-bit elements: [box_rows][box_cols], rows of box_cols = the swizzle span when swizzled.
inline void check_box(int64_t box_rows, int64_t box_cols, int64_t swizzle) {
  TORCH_CHECK_VALUE(swizzle >= 0 && swizzle <= 3, "swizzle must be 0..3, got ", swizzle);
  TORCH_CHECK_VALUE(box_rows >= 1 && box_rows <= 256 && box_cols >= 8 && box_cols <= 256 && box_cols % 8 == 0,
                    "box_rows must be in 1..256, box_cols a multiple of 8 in 8..256");
  TORCH_CHECK_VALUE(swizzle == 0 || box_cols == (8 << swizzle), "a swizzled box has rows of the swizzle span: "
                    "box_cols must be ", 8 << swizzle);
}

// x: [R, C] fp16 source, y: [R2, C2] fp16 destination (written in place where the stored box lands). Returns the
// loaded box [box_rows, box_cols] as the threads read it. rank3: the same through 3-D tensor maps.
inline at::Tensor tma_copy(const at::Tensor& x, const at::Tensor& y, int64_t x0, int64_t y0, int64_t x1, int64_t y1,
                           int64_t box_rows, int64_t box_cols, int64_t swizzle, bool skip_wait, bool rank3) {
  check_device(x, "x");
  check_device(y, "y", &x);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf && y.scalar_type() == at::kHalf, "x and y must be float16");
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2, "x and y must be 2-D");
  check_box(box_rows, box_cols, swizzle);
  TORCH_CHECK_VALUE(x.size(1) % 8 == 0 && y.size(1) % 8 == 0, "rows of x and y must be multiples of 16 bytes");
  TORCH_CHECK_VALUE(!rank3 || (x.size(0) % 2 == 0 && y.size(0) % 2 == 0 && box_rows % 2 == 0 && y0 % 2 == 0 &&
                               y1 % 2 == 0),
                    "rank3 views rows in pairs: rows of x and y, box_rows, y0, y1 must be even");
  check_contiguous(x, "x");
  check_contiguous(y, "y");
  TORCH_CHECK_VALUE(!skip_wait || kDeviceType == c10::DeviceType::CPU, "skip_wait is emulator-only");
  DeviceGuard guard(x);
  at::Tensor tile = at::empty({box_rows, box_cols}, x.options());
  const KernelMemory memory({{"x", &x}, {"y", &y}, {"tile", &tile}});
  tf::selftest::tma_copy(x.data_ptr(), int(x.size(0)), int(x.size(1)), y.data_ptr(), int(y.size(0)), int(y.size(1)),
                         tile.data_ptr(), int(box_rows), int(box_cols), int(x0), int(y0), int(x1), int(y1),
                         int(swizzle), skip_wait, rank3, stream_for(x));
  return tile;
}

// x: [B, N, H, D] fp16, any strides with a contiguous last dim (each other stride a multiple of 8 elements,
// 16-byte aligned start): the layout of the attention forward's 4-D tensor maps. Returns the box
// [box_rows, box_cols] loaded at (column x0, row y0, head h0, batch b0), elements outside x read as 0.
inline at::Tensor tma_load_4d(const at::Tensor& x, int64_t x0, int64_t y0, int64_t h0, int64_t b0, int64_t box_rows,
                              int64_t box_cols, int64_t swizzle) {
  check_device(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf, "x must be float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4 && x.numel() > 0, "x must be a non-empty [B, N, H, D] tensor, got ", x.sizes());
  check_box(box_rows, box_cols, swizzle);
  TORCH_CHECK_VALUE(x.stride(3) == 1 && x.size(3) % 8 == 0, "x must have a contiguous last dim of a multiple of 8");
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK_VALUE(x.stride(d) % 8 == 0 && x.stride(d) > 0, "x's strides must be positive multiples of 8 elements, "
                      "got ", x.strides());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must start 16-byte aligned");
  DeviceGuard guard(x);
  at::Tensor tile = at::empty({box_rows, box_cols}, x.options());
  const KernelMemory memory({{"x", &x}, {"tile", &tile}});
  const int64_t sizes[4] = {x.size(0), x.size(1), x.size(2), x.size(3)};
  const int64_t strides[4] = {x.stride(0), x.stride(1), x.stride(2), 1};
  tf::selftest::tma_load_4d(x.data_ptr(), sizes, strides, tile.data_ptr(), int(box_rows), int(box_cols), int(x0),
                            int(y0), int(h0), int(b0), int(swizzle), stream_for(x));
  return tile;
}

// x: [iters >= 1, 128] fp32. Returns [128] fp32. mode 1 and 2 (deliberate bugs) only in the emulator.
inline at::Tensor mbarrier(const at::Tensor& x, int64_t mode) {
  check_device(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) >= 1 && x.size(1) == 128, "x must be [iters, 128], got ", x.sizes());
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2, got ", mode);
  TORCH_CHECK_VALUE(mode == 0 || kDeviceType == c10::DeviceType::CPU, "modes 1 and 2 hang a GPU: emulator-only");
  check_contiguous(x, "x");
  DeviceGuard guard(x);
  at::Tensor out = empty({128}, at::kFloat, x);
  const KernelMemory memory({{"x", &x}, {"out", &out}});
  tf::selftest::mbarrier_pingpong(x.data_ptr<float>(), out.data_ptr<float>(), int(x.size(0)), int(mode),
                                  stream_for(x));
  return out;
}

// x: [n, 2] fp32 -> [pairs, 2]: the sum of the rows i with i % pairs equal, by 8-byte reductions (red_add_v2).
inline at::Tensor red_v2(const at::Tensor& x, int64_t pairs) {
  check_device(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == 2 && x.size(0) >= 1 && x.size(0) <= (1 << 24),
                    "x must be [n, 2] with 1 <= n <= 2^24, got ", x.sizes());
  TORCH_CHECK_VALUE(pairs >= 1 && pairs <= x.size(0), "pairs must be in 1..n, got ", pairs);
  check_contiguous(x, "x");
  DeviceGuard guard(x);
  at::Tensor out = at::zeros({pairs, 2}, x.options());
  const KernelMemory memory({{"x", &x}, {"out", &out}});
  tf::selftest::red_add_v2(x.data_ptr<float>(), out.data_ptr<float>(), int(x.size(0)), int(pairs), stream_for(x));
  return out;
}

inline void define(torch::Library& m) {
  m.def("selftest_wgmma(Tensor a, Tensor b, Tensor? c, int n, int swizzle, bool a_regs, bool b_mn_major, "
        "int mutate, bool a_mn_major=False) -> Tensor");
  m.def("selftest_tma_copy(Tensor x, Tensor(a!) y, int x0, int y0, int x1, int y1, int box_rows, int box_cols, "
        "int swizzle, bool skip_wait, bool rank3) -> Tensor");
  m.def("selftest_tma_load_4d(Tensor x, int x0, int y0, int h0, int b0, int box_rows, int box_cols, int swizzle) "
        "-> Tensor");
  m.def("selftest_mbarrier(Tensor x, int mode) -> Tensor");
  m.def("selftest_red_v2(Tensor x, int pairs) -> Tensor");
}

inline void impl(torch::Library& m) {
  m.impl("selftest_wgmma", &wgmma);
  m.impl("selftest_tma_copy", &tma_copy);
  m.impl("selftest_tma_load_4d", &tma_load_4d);
  m.impl("selftest_mbarrier", &mbarrier);
  m.impl("selftest_red_v2", &red_v2);
}

}  // namespace tf::hopper_bindings
