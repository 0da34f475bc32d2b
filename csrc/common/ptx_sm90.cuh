// The sm_90a instructions (Hopper): wgmma.mma_async with shared-memory matrix descriptors, mbarrier, TMA
// (cp.async.bulk.tensor) loads / stores through a tensor map (common/tma.h), setmaxnreg, fence.proxy.async.
// Like common/ptx.cuh, each wrapper has its asm and its emulated branch (TILEFORMER_EMULATE, common/emu_hopper.h),
// so kernels that use them also run on the CPU. Device code compiled for an arch without the instructions (the
// sm_80 build of a file that also holds sm_90a kernels) gets __trap() instead: launchers must only launch these
// kernels on a compute capability 9.0 device (selftest/hopper.cu shows the check).
//
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16} (PTX ISA "Register Fragments" for .m64nNk16,
// "Shared Memory Matrix Layout", "Matrix Descriptor Format"). A warpgroup is 128 consecutive threads
// (4 warps); w = warp index in the warpgroup, g = lane >> 2, t = lane % 4:
//   A in registers (64 x 16): warp w holds rows 16w .. 16w+15 in the mma.m16n8k16 A layout:
//       a[r] = {A[16w + g + 8(r&1)][2t + 8(r>>1)], +1 col}
//   D (64 x N fp32), N/2 registers: d[4j + i] = D[16w + g + 8(i>=2)][8j + 2t + (i&1)], j = 0 .. N/8-1
//   A / B in shared memory: a 64-bit descriptor (make_smem_desc): start address, leading / stride byte offsets,
//       swizzle. K-major (trans 0): rows of the M / N dimension; MN-major (trans 1): M / N contiguous. The
//       canonical layouts (T = 8 16-bit elements = 16 bytes; W = swizzle span 32 / 64 / 128 bytes):
//       K-major,  none:      element (mn, k) at (mn%8)*16 + (mn/8)*SBO + (k/8)*LBO + (k%8)*2
//       K-major,  swizzled:  (mn%8)*W + (mn/8)*SBO + k*2                  (LBO unused; k < 16 within a row)
//       MN-major, none:      (mn%8)*2 + (mn/8)*SBO + (k%8)*16 + (k/8)*LBO
//       MN-major, swizzled:  (mn%(W/2))*2 + (mn/(W/2))*LBO + (k%8)*W + (k/8)*SBO
//       plus the start address, then the swizzle (common/tma.h swizzle_addr) on the absolute address; TMA
//       with the same swizzle writes exactly this layout for rows of W bytes.
// Shared-memory tiles addressed by descriptors and TMA boxes must lie in the dynamic shared memory (the emulator
// addresses shared memory as offsets into it); swizzled tiles start at a multiple of the pattern (1024 bytes for
// 128 B), since the descriptors here carry no base offset.
// Ordering: wgmma_fence() before the first wgmma of a batch and after touching A / D registers; wgmma_commit()
// closes a group; wgmma_wait<N>() waits until at most N groups are in flight; D registers are valid only after
// the wait that retires their group (the emulator writes them there; fence_operand keeps nvcc from moving
// register accesses across it).
#pragma once

#include <type_traits>

#include "common/device.cuh"
#include "common/ptx.cuh"
#include "common/tma.h"

#ifdef TILEFORMER_EMULATE
#include "common/emu_hopper.h"
// Emulated build: wrappers take the caller's file and line (default arguments) for the emulator's messages.
#define TF_SM90_SITE , const char *file = __builtin_FILE(), int line = __builtin_LINE()
#define TF_SM90_SITE_ONLY const char *file = __builtin_FILE(), int line = __builtin_LINE()
#else
#define TF_SM90_SITE
#define TF_SM90_SITE_ONLY
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TF_SM90 1
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TF_SM90A 1
#endif
#endif

namespace tf::ptx {

// Shared-memory address of p (the dynamic shared memory in the emulator).
TF_DEVICE uint32_t smem_addr(const void* p) {
#ifdef TILEFORMER_EMULATE
  return emu::smem_addr(p, "shared-memory address");
#else
  return smem_u32(p);
#endif
}

// 64-bit wgmma matrix descriptor: bits 0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45 stride
// byte offset >> 4, 49-51 base offset (0: tiles start at a multiple of the swizzle pattern), 62-63 swizzle
// (0 none, 1 128 B, 2 64 B, 3 32 B). For K-major swizzled operands LBO is unused (pass 16).
TF_HOST_DEVICE constexpr uint64_t make_smem_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes, Swizzle s) {
  const uint64_t code = s == Swizzle::none ? 0 : s == Swizzle::b128 ? 1 : s == Swizzle::b64 ? 2 : 3;
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo_bytes & 0x3FFFF) >> 4) << 16) |
         (uint64_t((sbo_bytes & 0x3FFFF) >> 4) << 32) | (code << 62);
}

// Descriptors of 16-bit tiles as TMA writes them with one box of [rows][c] per chunk of c contiguous elements
// (c = swizzle span / 2; 8 unswizzled): the tile is [chunks][rows][c], every row one span (16 bytes unswizzled),
// starting at a multiple of the swizzle pattern.
// K-major operand (A[M][K], or Bt[N][K] for trans-b 0; chunks along K): the rows x 16 slice at column k0.
TF_HOST_DEVICE constexpr uint64_t desc_k_major(uint32_t tile_addr, int rows, int k0, Swizzle s) {
  const uint32_t W = uint32_t(swizzle_span(s));
  const int c = int(W) / 2;
  return make_smem_desc(tile_addr + uint32_t(k0 / c) * uint32_t(rows) * W + uint32_t(k0 % c) * 2,
                        s == Swizzle::none ? uint32_t(rows) * 16 : 16,   // LBO: the next chunk (unswizzled only)
                        8 * W, s);                                       // SBO: the next 8 rows
}
// MN-major operand (B[K][N] with N contiguous, trans-b 1; chunks along N, each [k_rows][c]): rows k0 .. k0+15.
TF_HOST_DEVICE constexpr uint64_t desc_mn_major(uint32_t tile_addr, int k_rows, int k0, Swizzle s) {
  const uint32_t W = uint32_t(swizzle_span(s));
  return make_smem_desc(tile_addr + uint32_t(k0) * W,
                        s == Swizzle::none ? 8 * 16 : uint32_t(k_rows) * W,   // LBO: next 8 k-rows / next chunk
                        s == Swizzle::none ? uint32_t(k_rows) * 16 : 8 * W,   // SBO: next 8 columns / next 8 k-rows
                        s);
}

// ---------------------------------------------------------------------------------------------
// wgmma
// ---------------------------------------------------------------------------------------------

#ifdef TILEFORMER_EMULATE
namespace detail {
struct WgmmaArg {
  uint64_t desc_a, desc_b;
  const uint32_t* a;  // RS: the thread's 4 A registers
  int scale_d;
  uint64_t read_id;   // out: the shared memory this wgmma reads (emu::InflightRead)
  float c[128], out[128];
};

template <typename T>
inline float smem_elem(uint32_t addr) {
  T v;
  std::memcpy(static_cast<void*>(&v), emu::smem_at(addr, 2, "wgmma.mma_async operand read"), 2);
  return to_float(v);
}

template <typename T, int N, bool RS, int TransA, int TransB>
inline void wgmma_fn(void* const* args) {
  ++emu::globals().wgmma_count;
  const WgmmaArg& a0 = *static_cast<const WgmmaArg*>(args[0]);
  for (int i = 1; i < emu::kWarpgroupThreads; ++i) {
    const WgmmaArg& ai = *static_cast<const WgmmaArg*>(args[i]);
    if ((!RS && ai.desc_a != a0.desc_a) || ai.desc_b != a0.desc_b || (ai.scale_d != 0) != (a0.scale_d != 0))
      emu::fail("wgmma.mma_async: thread " + std::to_string(i) + " of the warpgroup passes other descriptors or "
                "scale-d than thread 0 (they must be warpgroup-uniform)");
  }
  if (!RS) emu::check_wgmma_desc(a0.desc_a, "A");
  emu::check_wgmma_desc(a0.desc_b, "B");
  static thread_local float A[64][16], B[16][N];
  uint32_t lo[2] = {~0u, ~0u}, hi[2] = {0, 0};  // operand bytes read: [lo, hi) of A (SS) and B
  auto read = [&](int which, uint32_t addr) {
    lo[which] = std::min(lo[which], addr);
    hi[which] = std::max(hi[which], addr + 2);
    return smem_elem<T>(addr);
  };
  if (RS) {
    for (int i = 0; i < emu::kWarpgroupThreads; ++i) {
      const int w = i / 32, g = (i & 31) >> 2, t = i & 3;
      for (int r = 0; r < 4; ++r) {
        const float2 v = unpack2<T>(static_cast<const WgmmaArg*>(args[i])->a[r]);
        const int row = 16 * w + g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        A[row][col] = v.x;
        A[row][col + 1] = v.y;
      }
    }
  } else {
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m][k] = read(0, emu::wgmma_elem_addr(a0.desc_a, TransA, m, k));
  }
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < N; ++n) B[k][n] = read(1, emu::wgmma_elem_addr(a0.desc_b, TransB, n, k));
  if (RS) lo[0] = hi[0] = 0;
  const uint64_t read_id = emu::add_inflight_read(lo, hi);
  for (int i = 0; i < emu::kWarpgroupThreads; ++i) {
    WgmmaArg& ai = *static_cast<WgmmaArg*>(args[i]);
    const int w = i / 32, g = (i & 31) >> 2, t = i & 3;
    for (int r = 0; r < N / 2; ++r) {
      const int q = r & 3, row = 16 * w + g + 8 * (q >> 1), col = 8 * (r >> 2) + 2 * t + (q & 1);
      float acc = 0.f;  // products of 16-bit inputs are exact in fp32
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      ai.out[r] = a0.scale_d ? acc + ai.c[r] : acc;
    }
    ai.read_id = read_id;
  }
}

template <typename T, int N, bool RS, int TransA, int TransB>
inline void wgmma(float* d, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, int scale_d, const char* file,
                  int line) {
  if (!emu::fiber_hopper().wgmma_fenced)
    emu::fail("wgmma.mma_async without a wgmma.fence since the kernel started or the last wgmma.wait_group "
              "(the accumulator / A registers are not fenced)");
  WgmmaArg arg;
  arg.desc_a = desc_a;
  arg.desc_b = desc_b;
  arg.a = a;
  arg.scale_d = scale_d;
  emu::wgmma_acc_in(d, N / 2, arg.c);
  emu::group_collective(wgmma_fn<T, N, RS, TransA, TransB>, &arg, "wgmma.mma_async", file, line);
  emu::PendingAcc p;
  p.d = d;
  p.n = N / 2;
  p.read_id = arg.read_id;
  std::memcpy(p.v, arg.out, sizeof(float) * (N / 2));
  emu::fiber_hopper().wgmma_groups.back().push_back(p);
}
}  // namespace detail
#endif

// Accumulator register lists of the asm statements (N / 2 = 32, 64, 128 registers).
#define TF_WGMMA_D32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define TF_WGMMA_D64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, " \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define TF_WGMMA_D128 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, " \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, " \
  "%65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, " \
  "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, " \
  "%106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, " \
  "%124, %125, %126, %127}"
#define TF_F4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define TF_F16(d, i) TF_F4(d, i), TF_F4(d, i + 4), TF_F4(d, i + 8), TF_F4(d, i + 12)
#define TF_F32(d, i) TF_F16(d, i), TF_F16(d, i + 16)
#define TF_F64(d, i) TF_F32(d, i), TF_F32(d, i + 32)
#define TF_F128(d, i) TF_F64(d, i), TF_F64(d, i + 64)
// SS: operands after the accumulators: desc-a, desc-b, scale-d, trans-a, trans-b.
#define TF_WGMMA_SS(SHAPE, TY, DREGS, IA, IB, IS, ITA, ITB)                                                   \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" IS ", 0;\nwgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " DREGS \
  ", %" IA ", %" IB ", p, 1, 1, %" ITA ", %" ITB ";\n}\n"
// RS: a0..a3, desc-b, scale-d, trans-b.
#define TF_WGMMA_RS(SHAPE, TY, DREGS, I0, I1, I2, I3, IB, IS, ITB)                                            \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" IS ", 0;\nwgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " DREGS \
  ", {%" I0 ", %" I1 ", %" I2 ", %" I3 "}, %" IB ", p, 1, 1, %" ITB ";\n}\n"
#define TF_WGMMA_SS_CASE(NN, DREGS, FOPS, IA, IB, IS, ITA, ITB)                                                  \
  if constexpr (N == NN) {                                                                                       \
    if constexpr (std::is_same_v<T, __half>)                                                                     \
      asm volatile(TF_WGMMA_SS("m64n" #NN "k16", "f16", DREGS, IA, IB, IS, ITA, ITB)                            \
                   : FOPS(d, 0) : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TransA), "n"(TransB) : "memory"); \
    else                                                                                                         \
      asm volatile(TF_WGMMA_SS("m64n" #NN "k16", "bf16", DREGS, IA, IB, IS, ITA, ITB)                           \
                   : FOPS(d, 0) : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TransA), "n"(TransB) : "memory"); \
  }
#define TF_WGMMA_RS_CASE(NN, DREGS, FOPS, I0, I1, I2, I3, IB, IS, ITB)                                            \
  if constexpr (N == NN) {                                                                                        \
    if constexpr (std::is_same_v<T, __half>)                                                                      \
      asm volatile(TF_WGMMA_RS("m64n" #NN "k16", "f16", DREGS, I0, I1, I2, I3, IB, IS, ITB)                      \
                   : FOPS(d, 0) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d),          \
                     "n"(TransB) : "memory");                                                                     \
    else                                                                                                          \
      asm volatile(TF_WGMMA_RS("m64n" #NN "k16", "bf16", DREGS, I0, I1, I2, I3, IB, IS, ITB)                     \
                   : FOPS(d, 0) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d),          \
                     "n"(TransB) : "memory");                                                                     \
  }

template <typename T, int N>
constexpr void check_wgmma_types() {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "wgmma inputs are fp16 or bf16");
  static_assert(N == 64 || N == 128 || N == 256, "wgmma wrappers exist for N = 64, 128, 256");
}

// D (64 x N) = A (64 x 16, shared memory, desc_a) * B (16 x N, shared memory, desc_b) + (scale_d ? D : 0).
// TransA / TransB: 0 K-major, 1 M- / N-major. Warpgroup-uniform descriptors and scale_d.
template <typename T, int N, int TransA = 0, int TransB = 0>
TF_DEVICE void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d TF_SM90_SITE) {
  check_wgmma_types<T, N>();
#ifdef TILEFORMER_EMULATE
  detail::wgmma<T, N, false, TransA, TransB>(d, nullptr, desc_a, desc_b, scale_d, file, line);
#elif defined(TF_SM90A)
  TF_WGMMA_SS_CASE(64, TF_WGMMA_D32, TF_F32, "32", "33", "34", "35", "36")
  TF_WGMMA_SS_CASE(128, TF_WGMMA_D64, TF_F64, "64", "65", "66", "67", "68")
  TF_WGMMA_SS_CASE(256, TF_WGMMA_D128, TF_F128, "128", "129", "130", "131", "132")
#else
  __trap();
#endif
}

// D (64 x N) = A (64 x 16, registers a[4] in the layout above) * B (shared memory) + (scale_d ? D : 0).
template <typename T, int N, int TransB = 0>
TF_DEVICE void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d TF_SM90_SITE) {
  check_wgmma_types<T, N>();
#ifdef TILEFORMER_EMULATE
  detail::wgmma<T, N, true, 0, TransB>(d, a, 0, desc_b, scale_d, file, line);
#elif defined(TF_SM90A)
  TF_WGMMA_RS_CASE(64, TF_WGMMA_D32, TF_F32, "32", "33", "34", "35", "36", "37", "38")
  TF_WGMMA_RS_CASE(128, TF_WGMMA_D64, TF_F64, "64", "65", "66", "67", "68", "69", "70")
  TF_WGMMA_RS_CASE(256, TF_WGMMA_D128, TF_F128, "128", "129", "130", "131", "132", "133", "134")
#else
  __trap();
#endif
}

TF_DEVICE void wgmma_fence() {
#ifdef TILEFORMER_EMULATE
  emu::fiber_hopper().wgmma_fenced = true;
#elif defined(TF_SM90A)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

TF_DEVICE void wgmma_commit() {
#ifdef TILEFORMER_EMULATE
  emu::fiber_hopper().wgmma_groups.emplace_back();
#elif defined(TF_SM90A)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// Wait until at most N committed wgmma groups of this warpgroup are in flight.
template <int N>
TF_DEVICE void wgmma_wait() {
#ifdef TILEFORMER_EMULATE
  emu::wgmma_wait(N);
#elif defined(TF_SM90A)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// Keeps nvcc from moving reads / writes of accumulator registers across wgmma_fence / wgmma_wait.
template <int K>
TF_DEVICE void fence_operand(float (&d)[K]) {
#ifndef TILEFORMER_EMULATE
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

// ---------------------------------------------------------------------------------------------
// setmaxnreg (warpgroup-uniform; count in 24..256, a multiple of 8). The emulator checks that all 128
// threads of the warpgroup execute the same setmaxnreg; registers themselves are not modelled.
// ---------------------------------------------------------------------------------------------

#ifdef TILEFORMER_EMULATE
namespace detail {
struct MaxnregArg { int count; bool inc; };
inline void setmaxnreg_fn(void* const* args) {
  const MaxnregArg& a0 = *static_cast<const MaxnregArg*>(args[0]);
  for (int i = 1; i < emu::kWarpgroupThreads; ++i) {
    const MaxnregArg& ai = *static_cast<const MaxnregArg*>(args[i]);
    if (ai.count != a0.count || ai.inc != a0.inc)
      emu::fail("setmaxnreg: thread " + std::to_string(i) + " of the warpgroup requests a different count or "
                "direction than thread 0 (setmaxnreg must be warpgroup-uniform)");
  }
}
}  // namespace detail
#endif

template <int Count, bool Inc>
TF_DEVICE void setmaxnreg(TF_SM90_SITE_ONLY) {
  static_assert(Count >= 24 && Count <= 256 && Count % 8 == 0, "setmaxnreg: count in 24..256, a multiple of 8");
#ifdef TILEFORMER_EMULATE
  detail::MaxnregArg arg{Count, Inc};
  emu::group_collective(detail::setmaxnreg_fn, &arg, Inc ? "setmaxnreg.inc" : "setmaxnreg.dec", file, line);
#elif defined(TF_SM90A)
  if constexpr (Inc) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Count));
  else asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Count));
#else
  __trap();
#endif
}
#ifdef TILEFORMER_EMULATE
template <int Count> TF_DEVICE void setmaxnreg_inc(TF_SM90_SITE_ONLY) { setmaxnreg<Count, true>(file, line); }
template <int Count> TF_DEVICE void setmaxnreg_dec(TF_SM90_SITE_ONLY) { setmaxnreg<Count, false>(file, line); }
#else
template <int Count> TF_DEVICE void setmaxnreg_inc() { setmaxnreg<Count, true>(); }
template <int Count> TF_DEVICE void setmaxnreg_dec() { setmaxnreg<Count, false>(); }
#endif

// ---------------------------------------------------------------------------------------------
// mbarrier (a uint64_t in shared memory, 8-byte aligned)
// ---------------------------------------------------------------------------------------------

TF_DEVICE void mbarrier_init(uint64_t* bar, int count) {
#ifdef TILEFORMER_EMULATE
  emu::mbarrier_init(bar, count);
#elif defined(TF_SM90)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#else
  __trap();
#endif
}

// Makes initialised mbarriers visible to the other threads and the async proxy (then __syncthreads).
TF_DEVICE void fence_mbarrier_init() {
#if !defined(TILEFORMER_EMULATE) && defined(TF_SM90)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

TF_DEVICE void mbarrier_arrive(uint64_t* bar) {
#ifdef TILEFORMER_EMULATE
  emu::mbarrier_arrive(bar, 1);
#elif defined(TF_SM90)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#else
  __trap();
#endif
}

// Adds `bytes` to the transaction count of the current phase, then arrives.
TF_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef TILEFORMER_EMULATE
  emu::mbarrier_expect_tx(bar, bytes);
  emu::mbarrier_arrive(bar, 1);
#elif defined(TF_SM90)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#else
  __trap();
#endif
}

// True once the phase with parity `parity` has completed (the emulator suspends until it has).
TF_DEVICE bool mbarrier_try_wait(uint64_t* bar, uint32_t parity TF_SM90_SITE) {
#ifdef TILEFORMER_EMULATE
  return emu::mbarrier_try_wait_parity(bar, parity, file, line);
#elif defined(TF_SM90)
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  return ok != 0;
#else
  __trap();
  return false;
#endif
}

// Waits for the phase with parity `parity` (start with 0 and flip it after each completed phase).
TF_DEVICE void mbarrier_wait(uint64_t* bar, uint32_t parity TF_SM90_SITE) {
#ifdef TILEFORMER_EMULATE
  emu::mbarrier_try_wait_parity(bar, parity, file, line);
#else
  while (!mbarrier_try_wait(bar, parity)) {
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// TMA: cp.async.bulk.tensor loads (complete_tx on an mbarrier) and stores (bulk groups)
// ---------------------------------------------------------------------------------------------

// Loads the box at coordinates (c0 innermost, c1[, c2]) of the tensor map into smem_dst (128-byte aligned;
// swizzled as the map says); elements outside the tensor read as 0; complete_tx(box bytes) on bar.
TF_DEVICE void tma_load_2d(void* smem_dst, const TmaDesc* desc, int c0, int c1, uint64_t* bar) {
#ifdef TILEFORMER_EMULATE
  const int c[2] = {c0, c1};
  emu::tma_load(smem_dst, desc, c, 2, bar);
#elif defined(TF_SM90)
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1, {%3, %4}], [%2];\n"
               ::"r"(smem_addr(smem_dst)), "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
               : "memory");
#else
  __trap();
#endif
}

TF_DEVICE void tma_load_3d(void* smem_dst, const TmaDesc* desc, int c0, int c1, int c2, uint64_t* bar) {
#ifdef TILEFORMER_EMULATE
  const int c[3] = {c0, c1, c2};
  emu::tma_load(smem_dst, desc, c, 3, bar);
#elif defined(TF_SM90)
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1, {%3, %4, %5}], [%2];\n"
               ::"r"(smem_addr(smem_dst)), "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1),
                 "r"(c2)
               : "memory");
#else
  __trap();
#endif
}

// 4-D: a [B][N][H][D]-shaped tensor (D innermost) read one (row tile, head, batch) box at a time.
TF_DEVICE void tma_load_4d(void* smem_dst, const TmaDesc* desc, int c0, int c1, int c2, int c3, uint64_t* bar) {
#ifdef TILEFORMER_EMULATE
  const int c[4] = {c0, c1, c2, c3};
  emu::tma_load(smem_dst, desc, c, 4, bar);
#elif defined(TF_SM90)
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1, {%3, %4, %5, %6}], [%2];\n"
               ::"r"(smem_addr(smem_dst)), "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1),
                 "r"(c2), "r"(c3)
               : "memory");
#else
  __trap();
#endif
}

// Stores the box in smem_src to the tensor at (c0, c1[, c2]); elements outside the tensor are not written.
// Shared-memory writes by threads must be made visible first: fence_proxy_async_shared() (+ a barrier).
TF_DEVICE void tma_store_2d(const TmaDesc* desc, int c0, int c1, const void* smem_src) {
#ifdef TILEFORMER_EMULATE
  const int c[2] = {c0, c1};
  emu::tma_store(desc, c, 2, smem_src);
#elif defined(TF_SM90)
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n"
               ::"l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(smem_src)), "r"(c0), "r"(c1) : "memory");
#else
  __trap();
#endif
}

TF_DEVICE void tma_store_3d(const TmaDesc* desc, int c0, int c1, int c2, const void* smem_src) {
#ifdef TILEFORMER_EMULATE
  const int c[3] = {c0, c1, c2};
  emu::tma_store(desc, c, 3, smem_src);
#elif defined(TF_SM90)
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n"
               ::"l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(smem_src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
#else
  __trap();
#endif
}

TF_DEVICE void bulk_commit() {
#ifdef TILEFORMER_EMULATE
  emu::bulk_commit();
#elif defined(TF_SM90)
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}

// Wait until at most N committed bulk groups of this thread are in flight (the stores have landed; the
// emulator writes global memory here).
template <int N>
TF_DEVICE void bulk_wait() {
#ifdef TILEFORMER_EMULATE
  emu::bulk_wait(N);
#elif defined(TF_SM90)
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// p[0] += a, p[1] += b in global memory as one 8-byte fp32 reduction (red.global.add.v2.f32, relaxed, gpu
// scope; sm_90): half the reductions of two atomicAdd. p is 8-byte aligned. The emulator adds the two in turn.
TF_DEVICE void red_add_v2(gptr<float> p, float a, float b) {
#ifdef TILEFORMER_EMULATE
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#elif defined(TF_SM90)
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  __trap();
#endif
}

// Orders this thread's generic-proxy shared-memory accesses with later async-proxy ones (TMA store, wgmma
// reading what threads wrote). A no-op in the emulator, whose async operations read shared memory when they run.
TF_DEVICE void fence_proxy_async_shared() {
#if !defined(TILEFORMER_EMULATE) && defined(TF_SM90)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace tf::ptx
