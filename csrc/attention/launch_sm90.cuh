// Launcher of the sm_90a attention forward (attention/fwd_sm90.cuh): tensor maps, grid, shared memory. Included
// by the generated units attention/inst/fwd_sm90_d<D>.cu; TF_ATTN_INSTANTIATE_FWD_SM90(D) instantiates both
// dtypes. attention.cu decides when it runs (attn_fwd_sm90_reason, TILEFORMER_CUDA_ATTN_FWD).
#pragma once

#include <stdexcept>
#include <string>

#include "attention/fwd_sm90.cuh"
#include "attention/headdims.h"
#include "common/launch.h"
#include "common/tma.h"

namespace tf::attention {

inline const void* host_ptr(gptr<const void> p) {
#ifdef TILEFORMER_EMULATE
  return p.get();
#else
  return p;
#endif
}

// 4-D tensor map over a [B][N][H][head_dim] tensor (varlen: [1][total][H][head_dim]; element strides sb, sn, sh,
// 0 for a dimension of size 1) with boxes of [1][rows][1][64] elements, 128-byte swizzled. Elements past N or
// head_dim load as 0.
inline TmaDesc attn_tma_map(gptr<const void> base, DType dtype, int head_dim, int64_t n, int64_t heads,
                            int64_t batch, int64_t sn, int64_t sh, int64_t sb, int rows) {
  const int64_t dims[4] = {head_dim, n, heads, batch};
  // a size-1 dimension is never stepped: any stride the map accepts (one 16-byte unit) serves it
  const int64_t strides[4] = {1, sn > 0 ? sn : 8, sh > 0 ? sh : 8, sb > 0 ? sb : 8};
  const int box[4] = {kSm90Chunk, rows, 1, 1};
  return make_tma_desc(host_ptr(base), dtype, 4, dims, strides, box, Swizzle::b128);
}

template <typename T, int D>
void run_attn_fwd_sm90(const Params& p, cudaStream_t stream) {
  if constexpr (headdim_enabled(D)) {
    using F = Sm90FwdTiles<D>;
    if (p.max_k < 1 || p.max_q < 1)
      throw std::invalid_argument("attention: the sm_90a forward takes max_seqlen_q, max_seqlen_k >= 1");
    if (p.varlen && p.total_q == 0) return;   // no query token: nothing to compute
    // varlen: [1][total][H][D] maps, rows offset by the sequence starts in the kernel. With no key token at all
    // every sequence has 0 keys: no K / V tile is loaded, and the maps (over q's memory) are never used.
    const int64_t nq = p.varlen ? p.total_q : p.max_q, nk = p.varlen ? p.total_k : p.max_k;
    const int batch = p.varlen ? 1 : p.batch;
    const bool no_keys = nk == 0;
    const TmaDesc tq = attn_tma_map(p.q, p.dtype, p.head_dim, nq, p.hq, batch, p.stride_qm, p.stride_qh,
                                    p.stride_qb, F::kM);
    const TmaDesc tk = no_keys ? tq : attn_tma_map(p.k, p.dtype, p.head_dim, nk, p.hkv, batch, p.stride_kn,
                                                   p.stride_kh, p.stride_kb, F::kN);
    const TmaDesc tv = no_keys ? tq : attn_tma_map(p.v, p.dtype, p.head_dim, nk, p.hkv, batch, p.stride_vn,
                                                   p.stride_vh, p.stride_vb, F::kN);
    launch(attn_fwd_sm90_kernel<T, D, F::kM, F::kN, F::kStages>,
           dim3(static_cast<unsigned>((p.max_q + F::kM - 1) / F::kM), p.hq, p.batch), dim3(F::kThreads),
           fwd_sm90_smem_bytes<D, F::kM, F::kN, F::kStages>(), stream, tq, tk, tv, p);
  } else {
    throw std::invalid_argument("attention: head dim " + std::to_string(D) + " was not compiled in (build with "
                                "TILEFORMER_CUDA_HEADDIMS naming it)");
  }
}

// The GPU build: the code the current device runs for the kernel is its sm_90a code (a build with
// TILEFORMER_CUDA_ARCHS naming 9.0a; plain 9.0 code of it is a __trap()): asked once per process, of the
// device current then, by attn_fwd_sm90_probe_kernel (one 4-byte allocation, one synchronising copy).
template <int D>
bool attn_fwd_sm90_has_code() {
  if constexpr (headdim_enabled(D)) {
#ifdef TILEFORMER_EMULATE
    return true;
#else
    using F = Sm90FwdTiles<D>;
    static const bool has = [] {
      cudaFuncAttributes attr{};
      if (cudaFuncGetAttributes(&attr, attn_fwd_sm90_kernel<__half, D, F::kM, F::kN, F::kStages>) != cudaSuccess ||
          attr.binaryVersion != 90) {
        (void)cudaGetLastError();
        return false;
      }
      int* flag = nullptr;
      int host = 0;
      bool ok = cudaMalloc(&flag, sizeof(int)) == cudaSuccess;
      if (ok) {
        try {
          launch(attn_fwd_sm90_probe_kernel<D>, dim3(1), dim3(1), 0, cudaStream_t(nullptr), gptr<int>(flag));
          ok = cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
        } catch (const std::runtime_error&) {
          ok = false;
        }
        (void)cudaFree(flag);
      }
      (void)cudaGetLastError();
      return ok && host == 1;
    }();
    return has;
#endif
  } else {
    return false;
  }
}

}  // namespace tf::attention

#define TF_ATTN_INSTANTIATE_FWD_SM90(D)                                                                    \
  template bool tf::attention::attn_fwd_sm90_has_code<D>();                                              \
  template void tf::attention::run_attn_fwd_sm90<__half, D>(const tf::attention::Params&, cudaStream_t);   \
  template void tf::attention::run_attn_fwd_sm90<__nv_bfloat16, D>(const tf::attention::Params&, cudaStream_t);
