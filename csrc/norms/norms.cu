// LayerNorm / RMSNorm launchers: pick a kernel configuration from the hidden size, launch.
// Compiled by nvcc (transformer._C) and by g++ against the host emulation (transformer._C_emu).
#include "norms/norms.h"

#include <stdexcept>
#include <string>

#include "common/launch.h"
#include "norms/bwd.cuh"
#include "norms/fwd.cuh"

namespace tf::norms {
namespace {

// Slots (VEC = 16 / sizeof(T) elements) a row configuration keeps in registers: TPR threads x kVecs.
constexpr int kFwdWarpSlots = 32 * 4, kFwdBlockSlots = 256 * 4, kFwdBigSlots = 512 * 8;
constexpr int kBwdWarpSlots = 32 * 2, kBwdBlockSlots = 256 * 2, kBwdBigSlots = 512 * 2;
constexpr int kLoopThreads = 1024, kColsThreads = 256;

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// 16-byte accesses are legal when every base pointer and every row start is 16-byte aligned.
bool rows_aligned(const void* ptr, int64_t stride, bool is_f32, int elem_bytes) {
  if (!ptr) return true;
  const int bytes = is_f32 ? 4 : elem_bytes;
  return aligned16(ptr) && (stride * bytes) % 16 == 0;
}

int elem_bytes(DType d) { return d == DType::f32 ? 4 : 2; }

template <typename T, typename P>
void fwd_typed(const FwdParams& p, cudaStream_t stream) {
  constexpr int VEC = 16 / int(sizeof(T));
  const int eb = sizeof(T);
  const bool vec_ok = rows_aligned(p.x, p.stride_x, false, eb) && rows_aligned(p.out, p.stride_out, false, eb) &&
                      rows_aligned(p.residual, p.stride_res, p.residual_f32, eb) &&
                      rows_aligned(p.h, p.stride_h, p.h_f32, eb) && (!p.weight || aligned16(p.weight)) &&
                      (!p.bias || aligned16(p.bias));
  const int64_t slots = ceil_div(p.n, VEC);
  const unsigned rows = static_cast<unsigned>(p.rows);
  if (slots <= kFwdWarpSlots)
    launch(norm_fwd_kernel<T, P, 32, 4>, dim3(static_cast<unsigned>(ceil_div<int64_t>(p.rows, 4))), dim3(128), 0,
           stream, p, vec_ok);
  else if (slots <= kFwdBlockSlots)
    launch(norm_fwd_kernel<T, P, 256, 4>, dim3(rows), dim3(256), 0, stream, p, vec_ok);
  else if (slots <= kFwdBigSlots)
    launch(norm_fwd_kernel<T, P, 512, 8>, dim3(rows), dim3(512), 0, stream, p, vec_ok);
  else
    launch(norm_fwd_kernel<T, P, kLoopThreads, 0>, dim3(rows), dim3(kLoopThreads), 0, stream, p, vec_ok);
}

// Persistent blocks of the fused backward: enough to fill every SM, never more than row groups.
int64_t fused_blocks(int64_t groups, int threads, cudaStream_t stream) {
  const int64_t per_sm = 2048 / threads;
  const int64_t want = int64_t(num_sms(stream)) * per_sm;
  return groups < want ? groups : want;
}

struct BwdConfig {
  int kind;                 // 0: warp per row, 1: block per row, 2: big block per row, 3: looped (two steps)
  int64_t grid;             // persistent blocks (kinds 0-2) or row groups (kind 3)
  int64_t rows_per_group;   // kind 3
  int64_t col_blocks;       // kind 3
};

BwdConfig bwd_config(int64_t rows, int n, DType dtype, cudaStream_t stream) {
  const int VEC = 16 / elem_bytes(dtype);
  const int64_t slots = ceil_div<int64_t>(n, VEC);
  if (slots <= kBwdWarpSlots) return {0, fused_blocks(ceil_div<int64_t>(rows, 4), 128, stream), 0, 0};
  if (slots <= kBwdBlockSlots) return {1, fused_blocks(rows, 256, stream), 0, 0};
  if (slots <= kBwdBigSlots) return {2, fused_blocks(rows, 512, stream), 0, 0};
  const int64_t col_blocks = ceil_div<int64_t>(slots, kColsThreads);
  const int64_t want = ceil_div<int64_t>(int64_t(num_sms(stream)) * 8, col_blocks);
  int64_t groups = rows < want ? rows : want;
  const int64_t rows_per_group = ceil_div<int64_t>(rows, groups);
  groups = ceil_div<int64_t>(rows, rows_per_group);
  return {3, groups, rows_per_group, col_blocks};
}

template <typename T, typename P>
void bwd_typed(const BwdParams& p, const BwdConfig& cfg, cudaStream_t stream) {
  const int eb = sizeof(T);
  const bool vec_ok = rows_aligned(p.dy, p.stride_dy, false, eb) && rows_aligned(p.dx, p.stride_dx, false, eb) &&
                      rows_aligned(p.x, p.stride_x, p.x_f32, eb) &&
                      rows_aligned(p.residual, p.stride_res, p.residual_f32, eb) &&
                      rows_aligned(p.dh, p.stride_dh, p.dh_f32, eb) &&
                      rows_aligned(p.dres, p.stride_dres, p.dres_f32, eb) && (!p.weight || aligned16(p.weight));
  const dim3 grid(static_cast<unsigned>(cfg.grid));
  switch (cfg.kind) {
    case 0: launch(norm_bwd_kernel<T, P, 32, 2>, grid, dim3(128), 0, stream, p, vec_ok); break;
    case 1: launch(norm_bwd_kernel<T, P, 256, 2>, grid, dim3(256), 0, stream, p, vec_ok); break;
    case 2: launch(norm_bwd_kernel<T, P, 512, 2>, grid, dim3(512), 0, stream, p, vec_ok); break;
    default:
      launch(norm_row_sums_kernel<T, P, kLoopThreads>, dim3(static_cast<unsigned>(p.rows)), dim3(kLoopThreads), 0,
             stream, p, vec_ok);
      launch(norm_bwd_cols_kernel<T, P, kColsThreads>,
             dim3(static_cast<unsigned>(cfg.grid), static_cast<unsigned>(cfg.col_blocks)), dim3(kColsThreads), 0,
             stream, p, vec_ok, cfg.rows_per_group);
  }
  const dim3 rgrid(static_cast<unsigned>(ceil_div(p.n, 256)));
  if (p.dw_part) launch(norm_reduce_kernel, rgrid, dim3(256), 0, stream, (const float*)p.dw_part, cfg.grid, p.n, p.dw);
  if (p.db_part) launch(norm_reduce_kernel, rgrid, dim3(256), 0, stream, (const float*)p.db_part, cfg.grid, p.n, p.db);
}

// Instantiate for (x dtype, param dtype) with param dtype = x dtype or fp32.
template <template <typename, typename> class F, typename... Args>
void dispatch(DType dtype, DType param_dtype, Args&&... args) {
  if (param_dtype != dtype && param_dtype != DType::f32)
    throw std::invalid_argument(std::string("norms: parameters must have x's dtype or float32, got ") +
                                dtype_name(param_dtype) + " for x " + dtype_name(dtype));
  const bool pf = param_dtype == DType::f32;
  switch (dtype) {
    case DType::f32: return F<float, float>::run(args...);
    case DType::f16: return pf ? F<__half, float>::run(args...) : F<__half, __half>::run(args...);
    case DType::bf16:
      return pf ? F<__nv_bfloat16, float>::run(args...) : F<__nv_bfloat16, __nv_bfloat16>::run(args...);
  }
}

template <typename T, typename P>
struct Fwd {
  static void run(const FwdParams& p, cudaStream_t s) { fwd_typed<T, P>(p, s); }
};
template <typename T, typename P>
struct Bwd {
  static void run(const BwdParams& p, const BwdConfig& c, cudaStream_t s) { bwd_typed<T, P>(p, c, s); }
};

}  // namespace

void norm_fwd(const FwdParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return;
  if (p.n < 1) throw std::invalid_argument("norm_fwd: n must be >= 1");
  if (p.rows > 2147483647) throw std::invalid_argument("norm_fwd: more than 2^31 - 1 rows");
  dispatch<Fwd>(p.dtype, p.param_dtype, p, stream);
}

BwdPlan norm_bwd_plan(int64_t rows, int n, DType dtype, cudaStream_t stream) {
  if (rows <= 0) return {0, false};
  const BwdConfig cfg = bwd_config(rows, n, dtype, stream);
  return {cfg.grid, cfg.kind == 3};
}

void norm_bwd(const BwdParams& p, const BwdPlan& plan, cudaStream_t stream) {
  if (p.rows <= 0) return;
  if (p.rows > 2147483647) throw std::invalid_argument("norm_bwd: more than 2^31 - 1 rows");
  const BwdConfig cfg = bwd_config(p.rows, p.n, p.dtype, stream);
  if (cfg.grid != plan.partial_rows || (cfg.kind == 3) != plan.row_sums || (plan.row_sums && !p.row_sums))
    throw std::invalid_argument("norm_bwd: workspace does not match norm_bwd_plan(rows, n, dtype)");
  dispatch<Bwd>(p.dtype, p.param_dtype, p, cfg, stream);
}

}  // namespace tf::norms
