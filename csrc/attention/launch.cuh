// Per-(dtype, head dim) launchers of the attention kernels: tile configurations and grids. Included by the
// generated translation units attention/inst/{fwd,bwd}_d<D1>_d<D2>.cu (one per direction and head-dim pair, so
// MAX_JOBS compiles them in parallel); TF_ATTN_INSTANTIATE_{FWD,BWD}(D) instantiate both dtypes.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention/bwd.cuh"
#include "attention/fwd.cuh"
#include "attention/headdims.h"
#include "common/launch.h"

namespace tf::attention {

// Forward tiles, two variants (TILEFORMER_CUDA_ATTN_FWD_TILES selects one at run time, so a GPU run can time
// both; see fwd_tiles_w4()):
// * w8 (default): 8 warps x 16 query rows (each K/V tile in shared memory serves 128 queries, halving the
//   L2 -> SM traffic of 64-row blocks), 64-key tiles with the Q fragments held in registers up to D = 128
//   (K and V then cost one ldmatrix.x4 per two mma), 16-key tiles with Q re-read from shared memory above (a
//   32-key tile spills on sm_80 at D = 256). Registers sm_80/sm_90a: D64 136/138, D128 254/255, D256 215/225.
// * w4 (the first tiles): 4 warps x 16 rows, 64/32/16-key tiles up to D = 64/128/256, Q re-read at every
//   k-step (5 ldmatrix.x4 per 8 mma at D = 128); 2-3 blocks per SM. Registers D64 202/200, D128 183/213,
//   D256 236/247. All 0 spills, 0 stack.
template <int D, bool W4>
struct FwdTiles {
  static constexpr int kWarps = W4 ? 4 : 8, kM = 16 * kWarps;
  static constexpr int kN = W4 ? (D <= 64 ? 64 : D <= 128 ? 32 : 16) : (D <= 128 ? 64 : 16);
  static constexpr bool kQReg = !W4 && D <= 128;
};

// fwd_tiles_w4() (attention.h) reads TILEFORMER_CUDA_ATTN_FWD_TILES at every call.

// Backward tile shapes per padded head dim (4 warps). dK/dV (bwd.cuh): two warps per 32 keys, each computing
// the scores of half the query tile and accumulating half the block's columns; 64-query tiles up to D = 128
// (D = 128 with dropout: 32, spill-free), 32 above; above D = 128 each block accumulates a D/2-wide column
// slice (kDkdvC). Shared memory per block: 121 KiB at D = 128, 143 KiB at D = 256, so one block (4 warps) per
// SM on sm_80 and sm_90 there (the registers would allow two); D = 64: 73 KiB, two blocks. The dQ kernel
// accumulates a D-wide fp32 tile per warp, so it takes 32-key tiles above D = 64 and 16-key tiles above
// D = 128 to stay spill-free.
template <int D, bool DROPOUT = false>
struct Config {
  static constexpr int kWarps = 4;
  static constexpr int kDkdvM = D <= 64 || (D <= 128 && !DROPOUT) ? 64 : 32;   // dK/dV: query tile
  static constexpr int kDkdvN = 64;                                            // dK/dV: key tile (32 per pair)
  static constexpr int kDkdvC = D <= 128 ? D : D / 2;                          // dK/dV: columns per block
  static constexpr int kDqM = 64, kDqN = D <= 64 ? 64 : D <= 128 ? 32 : 16;   // dQ: query tile (16 per warp), key tile
};

inline unsigned grid_dim(int64_t n, int tile) { return static_cast<unsigned>((n + tile - 1) / tile); }

// Dropout (p.rng_state set) runs the DROPOUT instantiation of the w8 tiles whatever TILEFORMER_CUDA_ATTN_FWD_TILES
// says (one dropout forward per head dim and dtype).
template <typename T, int D>
void run_attn_fwd(const Params& p, cudaStream_t stream) {
  if constexpr (headdim_enabled(D)) {
    auto run = [&](auto tiles, auto dropout) {
      using F = decltype(tiles);
      launch(attn_fwd_kernel<T, D, F::kM, F::kN, F::kWarps, F::kQReg, decltype(dropout)::value>,
             dim3(grid_dim(p.max_q, F::kM), p.hq, p.batch), dim3(32 * F::kWarps), fwd_smem_bytes<D, F::kM, F::kN>(),
             stream, p);
    };
    if (p.rng_state)
      run(FwdTiles<D, false>{}, std::true_type{});
    else if (fwd_tiles_w4())
      run(FwdTiles<D, true>{}, std::false_type{});
    else
      run(FwdTiles<D, false>{}, std::false_type{});
  } else {
    throw std::invalid_argument("attention: head dim " + std::to_string(D) + " was not compiled in (build with "
                                "TILEFORMER_CUDA_HEADDIMS naming it)");
  }
}

// The backward's launches; DROPOUT: the dropout instantiations of the dK/dV, dK/dV + dQ and dQ kernels.
template <typename T, int D, bool DROPOUT>
void run_attn_bwd_kernels(const Params& p, cudaStream_t stream) {
  using C = Config<D, DROPOUT>;
  static_assert(kLocalDeltaKeys <= 16, "the first 16-key m-tile of the dK/dV tile");
  // max_q = 0 computes no query (dq rows unwritten, dk = dv = 0); max_k = 0 writes no dk / dv row.
  if (p.max_q > 0)
    launch(attn_bwd_preprocess_kernel<T>, dim3(grid_dim(p.max_q, 8), p.hq, p.batch), dim3(256), 0, stream, p);
  if (p.max_k > 0 && !p.dq_accum)
    launch(attn_bwd_dkdv_kernel<T, D, C::kDkdvC, C::kDkdvM, C::kDkdvN, C::kWarps, DROPOUT>,
           dim3(grid_dim(p.max_k, C::kDkdvN) * (D / C::kDkdvC), p.hkv, p.batch), dim3(32 * C::kWarps),
           dkdv_smem_bytes<D, C::kDkdvM, C::kDkdvN>(), stream, p);
  if (p.dq_accum) {   // atomic dQ: zero the accumulator, dK/dV + dQ, convert (attention.h)
    const int64_t n = p.total_q * p.hq * p.head_dim;   // a multiple of 8
    const unsigned blocks = static_cast<unsigned>(n / 8 / 256 + 1 < 65536 ? n / 8 / 256 + 1 : 65536);
    launch(attn_fill_zero_kernel<256>, dim3(blocks), dim3(256), 0, stream, p.dq_accum, n / 4);
    auto run = [&](auto local) {   // local: p.local_delta as a type (attention/bwd.cuh)
      launch(attn_bwd_dkdvdq_kernel<T, D, C::kDkdvC, C::kDkdvM, C::kDkdvN, C::kWarps, DROPOUT, decltype(local)::value>,
             dim3(grid_dim(p.max_k, C::kDkdvN) * (D / C::kDkdvC), p.hkv, p.batch), dim3(32 * C::kWarps),
             dkdv_smem_bytes<D, C::kDkdvM, C::kDkdvN>(), stream, p);
    };
    if (p.max_k > 0) {
      if (p.local_delta)
        run(std::true_type{});
      else
        run(std::false_type{});
    }
    launch(attn_bwd_dq_convert_kernel<T>, dim3(blocks), dim3(256), 0, stream, gptr<const float>(p.dq_accum),
           gcast<T>(p.dq), n / 8, p.scale);
    return;
  }
  if (p.max_q > 0)
    launch(attn_bwd_dq_kernel<T, D, C::kDqM, C::kDqN, C::kWarps, DROPOUT>,
           dim3(grid_dim(p.max_q, C::kDqM), p.hq, p.batch), dim3(32 * C::kWarps), dq_smem_bytes<D, C::kDqM, C::kDqN>(),
           stream, p);
}

template <typename T, int D>
void run_attn_bwd(const Params& p, cudaStream_t stream) {
  if constexpr (headdim_enabled(D)) {
    if (p.rng_state)
      run_attn_bwd_kernels<T, D, true>(p, stream);
    else
      run_attn_bwd_kernels<T, D, false>(p, stream);
  } else {
    throw std::invalid_argument("attention: head dim " + std::to_string(D) + " was not compiled in (build with "
                                "TILEFORMER_CUDA_HEADDIMS naming it)");
  }
}

}  // namespace tf::attention

#define TF_ATTN_INSTANTIATE_FWD(D)                                                                    \
  template void tf::attention::run_attn_fwd<__half, D>(const tf::attention::Params&, cudaStream_t);   \
  template void tf::attention::run_attn_fwd<__nv_bfloat16, D>(const tf::attention::Params&, cudaStream_t);
#define TF_ATTN_INSTANTIATE_BWD(D)                                                                    \
  template void tf::attention::run_attn_bwd<__half, D>(const tf::attention::Params&, cudaStream_t);   \
  template void tf::attention::run_attn_bwd<__nv_bfloat16, D>(const tf::attention::Params&, cudaStream_t);
