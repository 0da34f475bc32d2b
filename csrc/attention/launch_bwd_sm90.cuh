// Launcher of the sm_90a attention backward (attention/bwd_sm90.cuh): the atomic-dQ backward's launches with
// attn_bwd_sm90_kernel in place of the sm_80 dK/dV + dQ kernel. Included by the generated units
// attention/inst/bwd_sm90_d<D>.cu; TF_ATTN_INSTANTIATE_BWD_SM90(D) instantiates both dtypes. attention.cu decides
// when it runs (attn_bwd_sm90_reason, TILEFORMER_CUDA_ATTN_BWD).
#pragma once

#include <stdexcept>
#include <string>

#include "attention/bwd_sm90.cuh"
#include "attention/launch_sm90.cuh"

namespace tf::attention {

template <typename T, int D>
void run_attn_bwd_sm90(const Params& p, cudaStream_t stream) {
  if constexpr (headdim_enabled(D) && (D == 64 || D == 128)) {
    using B = Sm90BwdTiles<D>;
    if (!p.dq_accum || p.rng_state || p.local_delta)
      throw std::invalid_argument("attention: the sm_90a backward serves the atomic-dQ backward without dropout and "
                                  "with more than kLocalDeltaKeys keys");
    if (p.max_q > 0)
      launch(attn_bwd_preprocess_kernel<T>, dim3(static_cast<unsigned>((p.max_q + 7) / 8), p.hq, p.batch), dim3(256), 0,
             stream, p);
    const int64_t n = p.total_q * p.hq * p.head_dim;   // a multiple of 8
    const unsigned blocks = static_cast<unsigned>(n / 8 / 256 + 1 < 65536 ? n / 8 / 256 + 1 : 65536);
    launch(attn_fill_zero_kernel<256>, dim3(blocks), dim3(256), 0, stream, p.dq_accum, n / 4);
    // varlen: [1][total][H][D] maps, rows offset by the sequence starts in the kernel. With no query token no
    // block has a work item and the Q / dO maps (over q's memory) are never used.
    const int64_t nq = p.varlen ? p.total_q : p.max_q, nk = p.varlen ? p.total_k : p.max_k;
    if (p.max_k > 0 && nk > 0) {
      const int batch = p.varlen ? 1 : p.batch;
      const TmaDesc tk = attn_tma_map(p.k, p.dtype, p.head_dim, nk, p.hkv, batch, p.stride_kn, p.stride_kh,
                                      p.stride_kb, B::kN);
      const TmaDesc tv = attn_tma_map(p.v, p.dtype, p.head_dim, nk, p.hkv, batch, p.stride_vn, p.stride_vh,
                                      p.stride_vb, B::kN);
      const bool no_queries = nq == 0;
      const TmaDesc tq = no_queries ? tk : attn_tma_map(p.q, p.dtype, p.head_dim, nq, p.hq, batch, p.stride_qm,
                                                        p.stride_qh, p.stride_qb, B::kM);
      const TmaDesc tdo = no_queries ? tk : attn_tma_map(p.dout, p.dtype, p.head_dim, nq, p.hq, batch,
                                                         p.stride_dom, p.stride_doh, p.stride_dob, B::kM);
      launch(attn_bwd_sm90_kernel<T, D, B::kM, B::kN, B::kStages>,
             dim3(static_cast<unsigned>((p.max_k + B::kN - 1) / B::kN), p.hkv, p.batch), dim3(B::kThreads),
             bwd_sm90_smem_bytes<D, B::kM, B::kN, B::kStages>(), stream, tq, tk, tv, tdo, p);
    }
    launch(attn_bwd_dq_convert_kernel<T>, dim3(blocks), dim3(256), 0, stream, gptr<const float>(p.dq_accum),
           gcast<T>(p.dq), n / 8, p.scale);
  } else {
    throw std::invalid_argument("attention: no sm_90a backward for head dim " + std::to_string(D) +
                                " (built for 64 and 128 when TILEFORMER_CUDA_HEADDIMS names them)");
  }
}

}  // namespace tf::attention

#define TF_ATTN_INSTANTIATE_BWD_SM90(D)                                                                   \
  template void tf::attention::run_attn_bwd_sm90<__half, D>(const tf::attention::Params&, cudaStream_t);   \
  template void tf::attention::run_attn_bwd_sm90<__nv_bfloat16, D>(const tf::attention::Params&, cudaStream_t);
