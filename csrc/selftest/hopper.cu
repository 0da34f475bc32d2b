// Launchers of the sm_90a self-test kernels (selftest/hopper.cuh): tensor maps built on the host
// (tf::make_tma_desc), then one block each.
#include "selftest/hopper.h"

#include <string>

#include "common/launch.h"
#include "common/tma.h"
#include "selftest/hopper.cuh"

namespace tf::selftest {

namespace {

// The kernels' code exists for sm_90a only (the sm_80 build holds empty bodies).
template <typename Kernel>
void require_sm90a(Kernel kernel, const char* what) {
#ifdef TILEFORMER_EMULATE
  (void)kernel;
  (void)what;
#else
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (major != 9 || minor != 0)
    throw std::runtime_error(std::string(what) + ": the sm_90a self-test kernels need a compute capability 9.0 GPU "
                             "(H100 / H200); this device is " + std::to_string(major) + "." + std::to_string(minor));
  cudaFuncAttributes attr{};
  check_cuda(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes");
  if (attr.binaryVersion != 90)
    throw std::runtime_error(std::string(what) + ": the extension holds no sm_90a code for this kernel (built "
                             "with TILEFORMER_CUDA_ARCHS without 9.0a)");
#endif
}

// A row-major [rows][outer] matrix with boxes of [box_rows][c] (c = chunk elements: one swizzle span, 8
// unswizzled): wgmma_kernel loads its tiles chunk by chunk.
TmaDesc chunked_map(const void* base, DType dtype, int rows, int outer, int box_rows, Swizzle sw) {
  const int64_t dims[2] = {outer, rows};
  const int64_t strides[2] = {1, outer};
  const int box[2] = {swizzle_span(sw) / 2, box_rows};
  return make_tma_desc(base, dtype, 2, dims, strides, box, sw);
}

template <typename T, int N, bool ARegs, bool BMnMajor, bool AMnMajor = false>
void wgmma_launch(const TmaDesc& ta, const TmaDesc& tb, const WgmmaTestParams& p, size_t smem, cudaStream_t stream) {
  require_sm90a(wgmma_kernel<T, N, ARegs, BMnMajor, AMnMajor>, "selftest_wgmma");
  launch(wgmma_kernel<T, N, ARegs, BMnMajor, AMnMajor>, dim3(1), dim3(128), smem, stream, ta, tb, p);
}

// A M-major is built for N = 64 only (the bindings check it).
template <typename T, int N>
void wgmma_dispatch_ab(bool a_regs, bool b_mn_major, bool a_mn_major, const TmaDesc& ta, const TmaDesc& tb,
                       const WgmmaTestParams& p, size_t smem, cudaStream_t stream) {
  if (a_mn_major) {
    if constexpr (N == 64) {
      if (b_mn_major) wgmma_launch<T, N, false, true, true>(ta, tb, p, smem, stream);
      else wgmma_launch<T, N, false, false, true>(ta, tb, p, smem, stream);
    }
  } else if (a_regs) {
    if (b_mn_major) wgmma_launch<T, N, true, true>(ta, tb, p, smem, stream);
    else wgmma_launch<T, N, true, false>(ta, tb, p, smem, stream);
  } else {
    if (b_mn_major) wgmma_launch<T, N, false, true>(ta, tb, p, smem, stream);
    else wgmma_launch<T, N, false, false>(ta, tb, p, smem, stream);
  }
}

template <typename T>
void wgmma_dispatch(int N, bool a_regs, bool b_mn_major, bool a_mn_major, const TmaDesc& ta, const TmaDesc& tb,
                    const WgmmaTestParams& p, size_t smem, cudaStream_t stream) {
  if (N == 64) wgmma_dispatch_ab<T, 64>(a_regs, b_mn_major, a_mn_major, ta, tb, p, smem, stream);
  else if (N == 128) wgmma_dispatch_ab<T, 128>(a_regs, b_mn_major, a_mn_major, ta, tb, p, smem, stream);
  else wgmma_dispatch_ab<T, 256>(a_regs, b_mn_major, a_mn_major, ta, tb, p, smem, stream);
}

// One block; shared memory: 1 KB alignment slack, the mbarrier's 1 KB, the box.
void launch_tma_copy(const TmaDesc& ts, const TmaDesc& td, const TmaCopyParams& p, cudaStream_t stream) {
  launch(tma_copy_kernel, dim3(1), dim3(128), 2048 + size_t(p.box_rows) * p.box_cols * 2, stream, ts, td, p);
}

}  // namespace

void wgmma_tile(DType dtype, const void* A, int a_rows, const void* B, const float* C, float* D, int N, int K,
                int swizzle, bool a_regs, bool b_mn_major, bool a_mn_major, bool use_c, int mutate,
                cudaStream_t stream) {
  const Swizzle sw = Swizzle(swizzle);
  const TmaDesc ta = a_mn_major ? chunked_map(A, dtype, K, 64, K, sw) : chunked_map(A, dtype, a_rows, K, 64, sw);
  const TmaDesc tb = b_mn_major ? chunked_map(B, dtype, K, N, K, sw) : chunked_map(B, dtype, N, K, N, sw);
  WgmmaTestParams p{C, D, K, swizzle, int(use_c), mutate};
  const size_t smem = 1024 + 1024 + size_t(64 + N) * K * 2;
  if (dtype == DType::f16) wgmma_dispatch<__half>(N, a_regs, b_mn_major, a_mn_major, ta, tb, p, smem, stream);
  else wgmma_dispatch<__nv_bfloat16>(N, a_regs, b_mn_major, a_mn_major, ta, tb, p, smem, stream);
}

void tma_copy(const void* src, int src_rows, int src_cols, void* dst, int dst_rows, int dst_cols, void* tile,
              int box_rows, int box_cols, int x0, int y0, int x1, int y1, int swizzle, bool skip_wait, bool rank3,
              cudaStream_t stream) {
  require_sm90a(tma_copy_kernel, "selftest_tma_copy");
  const Swizzle sw = Swizzle(swizzle);
  // 2-D: [rows][cols]; 3-D: the same memory as [rows / 2][2][cols] (rows even), the box as [box_rows / 2][2][cols]
  const int rank = rank3 ? 3 : 2;
  const int box[3] = {box_cols, rank3 ? 2 : box_rows, box_rows / 2};
  const int64_t src_dims[3] = {src_cols, rank3 ? 2 : src_rows, src_rows / 2};
  const int64_t dst_dims[3] = {dst_cols, rank3 ? 2 : dst_rows, dst_rows / 2};
  const int64_t src_strides[3] = {1, src_cols, 2 * src_cols}, dst_strides[3] = {1, dst_cols, 2 * dst_cols};
  const TmaDesc ts = make_tma_desc(src, DType::f16, rank, src_dims, src_strides, box, sw);
  const TmaDesc td = make_tma_desc(dst, DType::f16, rank, dst_dims, dst_strides, box, sw);
  TmaCopyParams p{static_cast<uint16_t*>(tile), x0, y0, x1, y1, box_rows, box_cols, swizzle, int(skip_wait), rank,
                  0, 0};
  launch_tma_copy(ts, td, p, stream);
}

void tma_load_4d(const void* src, const int64_t* sizes, const int64_t* strides, void* tile, int box_rows,
                 int box_cols, int x0, int y0, int h0, int b0, int swizzle, cudaStream_t stream) {
  require_sm90a(tma_copy_kernel, "selftest_tma_load_4d");
  // [B][N][H][D] as the attention forward's maps: dims innermost first, element strides (d, n, h, b)
  const int64_t dims[4] = {sizes[3], sizes[1], sizes[2], sizes[0]};
  const int64_t elem_strides[4] = {1, strides[1], strides[2], strides[0]};
  const int box[4] = {box_cols, box_rows, 1, 1};
  const TmaDesc ts = make_tma_desc(src, DType::f16, 4, dims, elem_strides, box, Swizzle(swizzle));
  TmaCopyParams p{static_cast<uint16_t*>(tile), x0, y0, 0, 0, box_rows, box_cols, swizzle, 0, 4, h0, b0};
  launch_tma_copy(ts, ts, p, stream);   // no store: the destination map is not used
}

void mbarrier_pingpong(const float* x, float* out, int iters, int mode, cudaStream_t stream) {
  require_sm90a(mbarrier_pingpong_kernel, "selftest_mbarrier");
  launch(mbarrier_pingpong_kernel, dim3(1), dim3(256), 0, stream, MbarrierTestParams{x, out, iters, mode});
}

void red_add_v2(const float* x, float* out, int n, int pairs, cudaStream_t stream) {
  require_sm90a(red_v2_kernel, "selftest_red_v2");
  launch(red_v2_kernel, dim3(static_cast<unsigned>((n + 255) / 256)), dim3(256), 0, stream, gptr<const float>(x),
         gptr<float>(out), n, pairs);
}

}  // namespace tf::selftest
