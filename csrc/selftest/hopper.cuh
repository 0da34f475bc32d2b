// Self-test kernels of the sm_90a wrappers (common/ptx_sm90.cuh) and their emulation (tests/test_emulator_hopper.py).
// Built for the GPU (their sm_90a SASS holds HGMMA, UTMALDG, SYNCS; on an H100/H200 the same tests compare the
// hardware with torch) and for the emulator. In the sm_80 build the kernel bodies are a __trap(): the launchers
// (selftest/hopper.cu) refuse devices other than compute capability 9.0 and builds without sm_90 code.
#pragma once

#include "common/device.cuh"
#include "common/gmem.h"
#include "common/ptx_sm90.cuh"
#include "common/tma.h"

#if defined(TILEFORMER_EMULATE) || defined(TF_SM90A)
#define TF_HOPPER_BODY 1
#endif

namespace tf::selftest {

// The first 1024-byte boundary at or after the dynamic shared memory (the launchers add 1 KB): swizzle
// patterns repeat every 1024 bytes of shared-memory address, so tiles start on such a boundary.
TF_DEVICE unsigned char* aligned_smem(unsigned char* p) {
  return p + ((1024u - (ptx::smem_addr(p) & 1023u)) & 1023u);
}

struct WgmmaTestParams {
  gptr<const float> C;  // [64][N] fp32 (read when use_c)
  gptr<float> D;        // [64][N] fp32
  int K;                // 16 .. 64, a multiple of 16 and of the tile chunk (swizzle span / 2 elements; 8 unswizzled)
  int swizzle;          // tf::Swizzle of both tiles: the tensor maps and the descriptors
  int use_c;            // D = A B + C; else the first wgmma ignores the accumulator (scale-d = 0): D = A B
  int mutate;           // deliberate bugs: 1 B's stride byte offset 16 bytes short; 2 B's descriptor with another
                        // swizzle mode than the tile's; 3 no wgmma.fence before the first wgmma; 4 D stored
                        // without wgmma.wait_group; 5 no mbarrier wait before the wgmmas; 6 a TMA load into A's
                        // tile while the wgmmas reading it are in flight (3-6: emulator only)
};

// Deliberate bug m (mutate 3..6) of the emulated build; compiled out of the GPU code (they would hang it or read
// undefined registers there, and keep ptxas from pipelining the wgmmas).
TF_DEVICE bool emu_bug(int mutate, int m) {
#ifdef TILEFORMER_EMULATE
  return mutate == m;
#else
  (void)mutate;
  (void)m;
  return false;
#endif
}

// The k-steps of wgmma_kernel: Steps wgmmas over k0 = 0, 16, .. (one commit group each), then the waits.
template <typename T, int N, bool ARegs, bool BMnMajor, bool AMnMajor, int Steps>
TF_DEVICE void wgmma_steps(float (&d)[N / 2], const uint32_t (&a_frag)[4][4], uint32_t a_addr, uint32_t b_addr,
                           const WgmmaTestParams& p, const TmaDesc* tma_a, void* sA, uint64_t* bar) {
  const Swizzle sw = Swizzle(p.swizzle);
  const int c = swizzle_span(sw) / 2;
  ptx::fence_operand(d);
  if (!emu_bug(p.mutate, 3)) ptx::wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < Steps; ++ks) {
    const int k0 = 16 * ks;
    const uint64_t desc_a =
        AMnMajor ? ptx::desc_mn_major(a_addr, p.K, k0, sw) : ptx::desc_k_major(a_addr, 64, k0, sw);
    uint64_t desc_b = BMnMajor ? ptx::desc_mn_major(b_addr, p.K, k0, sw) : ptx::desc_k_major(b_addr, N, k0, sw);
    if (p.mutate == 1) desc_b -= uint64_t(1) << 32;                         // SBO 16 bytes short
    if (p.mutate == 2)                                                      // none <-> 32 B, swizzled -> none
      desc_b = (desc_b & ~(uint64_t(3) << 62)) | (uint64_t(sw == Swizzle::none ? 3 : 0) << 62);
    const int scale_d = (p.use_c || ks > 0) ? 1 : 0;
    if constexpr (ARegs) ptx::wgmma_rs<T, N, BMnMajor>(d, a_frag[ks], desc_b, scale_d);
    else ptx::wgmma_ss<T, N, AMnMajor, BMnMajor>(d, desc_a, desc_b, scale_d);
    ptx::wgmma_commit();
  }
  if (emu_bug(p.mutate, 6) && threadIdx.x == 0) {  // reuses A's buffer before the wgmmas reading it retired
    ptx::mbarrier_arrive_expect_tx(bar, uint32_t((AMnMajor ? p.K : 64) * c * 2));
    ptx::tma_load_2d(sA, tma_a, 0, 0, bar);
  }
  if (!emu_bug(p.mutate, 4)) {
    ptx::wgmma_wait<1>();
    ptx::wgmma_wait<0>();
  }
  ptx::fence_operand(d);
}

// D[64][N] = A[64][K] B[K][N] (+ C), one warpgroup. ARegs: A from registers (wgmma RS, fragments read from the
// swizzled tile) instead of shared memory (SS); BMnMajor: B given as B[K][N] (N contiguous, trans-b = 1) instead
// of Bt[N][K] (trans-b = 0); AMnMajor (SS only): A given as At[K][64] (M contiguous, trans-a = 1). Thread 0 loads both tiles with 2-D TMA, one box of [rows][c] per chunk of c
// contiguous elements (c = one swizzle span; 8 unswizzled), all signalled on one mbarrier; then K/16 wgmmas
// (one commit group each) into N/2 fp32 registers per thread, stored in the D fragment layout.
// Shared memory, from a 1024-byte boundary: the mbarrier (1 KB page), A as [K/c][64][c] (M-major: [64/c][K][c]),
// B as [K/c][N][c] (K-major) or [N/c][K][c] (N-major); each row of c elements is one swizzle span.
template <typename T, int N, bool ARegs, bool BMnMajor, bool AMnMajor>
__global__ void __launch_bounds__(128, 1) wgmma_kernel(const __grid_constant__ TmaDesc tma_a,
                                                       const __grid_constant__ TmaDesc tma_b, WgmmaTestParams p) {
#ifdef TF_HOPPER_BODY
  TF_DYNAMIC_SMEM(unsigned char, smem_raw);
  unsigned char* smem = aligned_smem(smem_raw);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  unsigned char* sA = smem + 1024;
  unsigned char* sB = sA + 64 * p.K * 2;  // a multiple of 1024 bytes
  const Swizzle sw = Swizzle(p.swizzle);
  const uint32_t W = swizzle_span(sw);    // bytes per tile row
  const int c = int(W) / 2;               // elements per tile row
  const int tid = threadIdx.x;
  if (tid == 0) {
    ptx::mbarrier_init(bar, 1);
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    ptx::mbarrier_arrive_expect_tx(bar, uint32_t((64 + N) * p.K * 2));
    const int a_rows = AMnMajor ? p.K : 64, a_chunks = (AMnMajor ? 64 : p.K) / c;
    for (int j = 0; j < a_chunks; ++j) ptx::tma_load_2d(sA + j * a_rows * W, &tma_a, j * c, 0, bar);
    const int b_rows = BMnMajor ? p.K : N, b_chunks = (BMnMajor ? N : p.K) / c;
    for (int j = 0; j < b_chunks; ++j) ptx::tma_load_2d(sB + j * b_rows * W, &tma_b, j * c, 0, bar);
  }
  if (!emu_bug(p.mutate, 5)) ptx::mbarrier_wait(bar, 0);

  const uint32_t a_addr = ptx::smem_addr(sA), b_addr = ptx::smem_addr(sB);
  const int w = tid / 32, g = (tid & 31) >> 2, t = tid & 3;
  // RS: this thread's A fragments of every k-step, read from the swizzled tile (element (m, k) at
  // (k / c) * 64 * W + m * W + (k % c) * 2; two k-neighbours share one 16-byte chunk).
  constexpr int kMaxSteps = 4;
  uint32_t a_frag[kMaxSteps][4];
#pragma unroll
  for (int ks = 0; ks < kMaxSteps; ++ks) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int m = 16 * w + g + 8 * (r & 1), k = 16 * ks + 2 * t + 8 * (r >> 1);
      const uint32_t off = uint32_t(k / c) * 64 * W + uint32_t(m) * W + uint32_t(k % c) * 2;
      a_frag[ks][r] = ARegs && ks * 16 < p.K
                          ? *reinterpret_cast<const uint32_t*>(sA + (swizzle_addr(a_addr + off, sw) - a_addr))
                          : 0u;
    }
  }

  float d[N / 2];
#pragma unroll
  for (int r = 0; r < N / 2; ++r) {
    const int row = 16 * w + g + 8 * ((r & 3) >> 1), col = 8 * (r >> 2) + 2 * t + (r & 1);
    d[r] = p.use_c ? p.C[row * N + col] : 0.f;
  }
  // One code path per number of k-steps: each ends with its wgmma.wait, so no register copies of in-flight
  // accumulators (a runtime loop exit would merge them) keep ptxas from pipelining the wgmmas.
  switch (p.K / 16) {
    case 1: wgmma_steps<T, N, ARegs, BMnMajor, AMnMajor, 1>(d, a_frag, a_addr, b_addr, p, &tma_a, sA, bar); break;
    case 2: wgmma_steps<T, N, ARegs, BMnMajor, AMnMajor, 2>(d, a_frag, a_addr, b_addr, p, &tma_a, sA, bar); break;
    case 3: wgmma_steps<T, N, ARegs, BMnMajor, AMnMajor, 3>(d, a_frag, a_addr, b_addr, p, &tma_a, sA, bar); break;
    default: wgmma_steps<T, N, ARegs, BMnMajor, AMnMajor, 4>(d, a_frag, a_addr, b_addr, p, &tma_a, sA, bar); break;
  }
  ptx::fence_operand(d);
#pragma unroll
  for (int r = 0; r < N / 2; ++r) {
    const int row = 16 * w + g + 8 * ((r & 3) >> 1), col = 8 * (r >> 2) + 2 * t + (r & 1);
    p.D[row * N + col] = d[r];
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_80, or sm_90 without the arch-specific features (built for 9.0 instead of 9.0a)
#endif
}

struct TmaCopyParams {
  gptr<uint16_t> tile;  // [box_rows][box_cols]: the loaded box as threads read it (un-swizzled)
  int x0, y0;           // load coordinates (column, row) in the source
  int x1, y1;           // store coordinates in the destination
  int box_rows, box_cols;
  int swizzle;          // of both tensor maps
  int skip_wait;        // read the box without waiting on the mbarrier (a deliberate bug)
  int rank;             // 2: [rows][cols] maps; 3: views [rows / 2][2][cols], load / store at (x, y % 2, y / 2);
                        // 4: the source map is [B][N][H][cols] ([1][box_rows][1][box_cols] boxes), loaded at
                        // (x0, y0, h0, b0), and nothing is stored
  int h0, b0;           // rank 4: head and batch coordinates of the load
};

// One 2-D (3-D, 4-D) TMA load (16-bit elements, out-of-bounds elements read as 0) into a swizzled box, the box
// written out by the threads through tf::swizzle_addr, then (ranks 2, 3) one TMA store of the box of the same
// rank (out-of-bounds elements skipped).
__global__ void __launch_bounds__(128) tma_copy_kernel(const __grid_constant__ TmaDesc tma_src,
                                                       const __grid_constant__ TmaDesc tma_dst, TmaCopyParams p) {
#ifdef TF_HOPPER_BODY
  TF_DYNAMIC_SMEM(unsigned char, smem_raw);
  unsigned char* smem = aligned_smem(smem_raw);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  unsigned char* box = smem + 1024;
  const Swizzle sw = Swizzle(p.swizzle);
  const int tid = threadIdx.x, n = p.box_rows * p.box_cols;
  if (tid == 0) {
    ptx::mbarrier_init(bar, 1);
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (tid == 0) {
    ptx::mbarrier_arrive_expect_tx(bar, uint32_t(n * 2));
    if (p.rank == 4) ptx::tma_load_4d(box, &tma_src, p.x0, p.y0, p.h0, p.b0, bar);
    else if (p.rank == 3) ptx::tma_load_3d(box, &tma_src, p.x0, p.y0 % 2, p.y0 / 2, bar);
    else ptx::tma_load_2d(box, &tma_src, p.x0, p.y0, bar);
  }
  if (!p.skip_wait) ptx::mbarrier_wait(bar, 0);
  const uint32_t base = ptx::smem_addr(box);
  for (int e = tid; e < n; e += blockDim.x)
    p.tile[e] = *reinterpret_cast<const uint16_t*>(box + (swizzle_addr(base + uint32_t(e) * 2, sw) - base));
  __syncthreads();
  if (tid == 0 && p.rank != 4) {
    ptx::fence_proxy_async_shared();
    if (p.rank == 3) ptx::tma_store_3d(&tma_dst, p.x1, p.y1 % 2, p.y1 / 2, box);
    else ptx::tma_store_2d(&tma_dst, p.x1, p.y1, box);
    ptx::bulk_commit();
    ptx::bulk_wait<0>();
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_80, or sm_90 without the arch-specific features (built for 9.0 instead of 9.0a)
#endif
}

struct MbarrierTestParams {
  gptr<const float> x;  // [iters][128]
  gptr<float> out;      // [128]: out[i] = fold over it of (acc * 0.5 + x[it][i])
  int iters;
  int mode;             // 0 correct; emulator-only bugs: 1 the full barriers expect 33 arrivals (32 come: the
                        // consumers' wait never completes); 2 setmaxnreg not warpgroup-uniform
};

// Producer / consumer over a 2-stage ring: warpgroup 1 (warp 4 writes, setmaxnreg.dec) fills stage it % 2 after
// waiting on empty[s], then arrives on full[s] (32 arrivals); warpgroup 0 (setmaxnreg.inc) waits on full[s],
// folds the stage into its accumulator and arrives on empty[s] (128 arrivals). Every barrier runs through
// iters / 2 phases; the waits use the phase parities ((it / 2) & 1, flipped for the producer's first pass).
__global__ void __launch_bounds__(256, 1) mbarrier_pingpong_kernel(MbarrierTestParams p) {
#ifdef TF_HOPPER_BODY
  __shared__ __align__(16) float stage[2][128];
  __shared__ uint64_t full[2], empty[2];
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < 2; ++s) {
      ptx::mbarrier_init(&full[s], p.mode == 1 ? 33 : 32);
      ptx::mbarrier_init(&empty[s], 128);
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
  if (tid >= 128) {
    if (p.mode == 2 && tid >= 160) ptx::setmaxnreg_dec<48>();
    else ptx::setmaxnreg_dec<40>();
    if (tid < 160) {
      const int lane = tid - 128;
      for (int it = 0; it < p.iters; ++it) {
        const int s = it & 1;
        ptx::mbarrier_wait(&empty[s], ((it >> 1) & 1) ^ 1);
        for (int j = 0; j < 4; ++j) stage[s][4 * lane + j] = p.x[int64_t(it) * 128 + 4 * lane + j];
        ptx::mbarrier_arrive(&full[s]);
      }
    }
  } else {
    ptx::setmaxnreg_inc<232>();
    float acc = 0.f;
    for (int it = 0; it < p.iters; ++it) {
      const int s = it & 1;
      ptx::mbarrier_wait(&full[s], (it >> 1) & 1);
      acc = acc * 0.5f + stage[s][tid];
      ptx::mbarrier_arrive(&empty[s]);
    }
    p.out[tid] = acc;
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // sm_80, or sm_90 without the arch-specific features (built for 9.0 instead of 9.0a)
#endif
}

// red_add_v2 (the sm_90a backward's dQ reductions): thread i of the grid adds the pair x[2i], x[2i + 1] into
// out[2 (i % pairs)], out[2 (i % pairs) + 1] (out zeroed; many threads and blocks reduce into each pair).
__global__ void __launch_bounds__(256) red_v2_kernel(gptr<const float> x, gptr<float> out, int n, int pairs) {
#ifdef TF_HOPPER_BODY
  const int i = int(blockIdx.x) * 256 + int(threadIdx.x);
  if (i < n) ptx::red_add_v2(out + 2 * (i % pairs), x[2 * i], x[2 * i + 1]);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

}  // namespace tf::selftest
