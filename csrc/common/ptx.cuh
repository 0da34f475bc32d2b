// Every inline PTX instruction the project uses, each with its asm (nvcc, __CUDA_ARCH__) and its
// emulated branch (TILEFORMER_EMULATE). The emulated branches implement the documented fragment
// layouts lane by lane (PTX ISA: "Matrix Fragments for mma.m16n8k16 with floating point type",
// "ldmatrix"), so a kernel that indexes fragments wrongly fails on the CPU as it would on a GPU.
//
// Notation: g = lane >> 2, t = lane % 4; a .b32 register holding two 16-bit values keeps the lower
// column (or k) index in its low half.
//   mma.m16n8k16 A (16x16, row): a[r] = {A[row][col], A[row][col+1]}, row = g (+8 for r = 1, 3),
//                                col = 2t (+8 for r = 2, 3)
//                B (16x8, col): b[r] = {B[k][g], B[k+1][g]}, k = 2t (+8 for r = 1)
//                C/D (16x8 f32): c[i], row = g (+8 for i >= 2), col = 2t + (i & 1)
//   ldmatrix.m8n8.x{1,2,4}.b16: lanes 8j..8j+7 give the 16-byte row addresses of matrix j; register j
//                receives {M_j[g][2t], M_j[g][2t+1]}; with .trans {M_j[2t][g], M_j[2t+1][g]}.
//                x4 over A's quadrants (rows 0-7|8-15) x (cols 0-7|8-15), in the order
//                [0-7,0-7], [8-15,0-7], [0-7,8-15], [8-15,8-15], yields exactly a[0..3].
#pragma once

#include <cstring>
#include <type_traits>

#include "common/device.cuh"
#include "common/gmem.h"

namespace tf::ptx {

// ---------------------------------------------------------------------------------------------
// Packing two fp32 values into one .b32 register of 16-bit values (low half = first argument)
// ---------------------------------------------------------------------------------------------

TF_DEVICE uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  std::memcpy(&u, &h, 4);
  return u;
}

TF_DEVICE uint32_t pack_bfloat162(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  std::memcpy(&u, &h, 4);
  return u;
}

// T = __half or __nv_bfloat16
template <typename T>
TF_DEVICE uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) return pack_half2(lo, hi);
  else return pack_bfloat162(lo, hi);
}

template <typename T>
TF_DEVICE float2 unpack2(uint32_t u) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h;
    std::memcpy(static_cast<void*>(&h), &u, 4);
    return __half22float2(h);
  } else {
    __nv_bfloat162 h;
    std::memcpy(static_cast<void*>(&h), &u, 4);
    return __bfloat1622float2(h);
  }
}

// 2^x, approximate (ex2.approx.ftz.f32: max rel. error 2^-22); exact exp2f when emulated.
TF_DEVICE float ex2_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// 1/x, approximate (rcp.approx.ftz.f32); exact when emulated.
TF_DEVICE float rcp_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.0f / x;
#endif
}

// IEEE fp32 a OP b rounded to nearest even, each on its own (the .rn form: never contracted into an fma, no flush
// to zero, unaffected by --use_fast_math, which turns the / operator into an approximate division); the exact
// fp32 operation when emulated. mul_rn / add_rn / sub_rn give the products and sums of torch's element-wise
// fp32 ops bit for bit.
#ifdef __CUDA_ARCH__
#define TF_FP32_RN(name, inst, op)                                          \
  TF_DEVICE float name(float a, float b) {                                  \
    float y;                                                                \
    asm(inst " %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));                    \
    return y;                                                               \
  }
#else
#define TF_FP32_RN(name, inst, op) \
  TF_DEVICE float name(float a, float b) { return a op b; }
#endif
TF_FP32_RN(div_rn, "div.rn.f32", /)
TF_FP32_RN(mul_rn, "mul.rn.f32", *)
TF_FP32_RN(add_rn, "add.rn.f32", +)
TF_FP32_RN(sub_rn, "sub.rn.f32", -)
#undef TF_FP32_RN

// ---------------------------------------------------------------------------------------------
// fp8 e4m3 (OCP e4m3fn: bias 7, no infinities, 0x7F / 0xFF NaN, largest 448) <-> fp32. sm_89+: cvt;
// sm_80 and the emulator: the integer conversions below, bit for bit the same results.
// ---------------------------------------------------------------------------------------------

// The value of e4m3 bits b (exact): e == 0 -> m * 2^-9 (subnormal), else 2^(e - 7) * (1 + m / 8).
TF_DEVICE float e4m3_to_float_sw(uint32_t b) {
  const uint32_t e = (b >> 3) & 15u, m = b & 7u;
  float mag = e == 0 ? float(m) * 0.001953125f : __int_as_float(int(((e + 120u) << 23) | (m << 20)));
  if ((b & 0x7Fu) == 0x7Fu) mag = __int_as_float(0x7FC00000);
  return (b & 0x80u) ? -mag : mag;
}

// e4m3 bits of x rounded to nearest even, saturated to +-448 (as cvt.rn.satfinite.e4m3x2.f32; x finite): below
// 2^-6 a subnormal rint(|x| * 512) (8 being the smallest normal), above, the fp32 bits rounded to 3 mantissa
// bits (a carry moves to the next binade) with the exponent re-biased 127 -> 7.
TF_DEVICE uint32_t float_to_e4m3_sw(float x) {
  const uint32_t bits = uint32_t(__float_as_int(x)), ab = bits & 0x7FFFFFFFu;
  uint32_t code;
  if (ab < 0x3C800000u) code = uint32_t(rintf(__int_as_float(int(ab)) * 512.f));   // |x| < 2^-6
  else code = ((ab + 0x7FFFFu + ((ab >> 20) & 1u)) >> 20) - (120u << 3);
  code = code < 0x7Eu ? code : 0x7Eu;
  return code | ((bits >> 24) & 0x80u);
}

// Two e4m3 values (bits 0-7 and 8-15 of v) as fp32 (exact).
// The int8 values of bytes 0 and 1 of v, exactly: (b ^ 0x80) is b + 128 as an unsigned byte; placed in the
// low mantissa bits of 2^23 it reads 2^23 + b + 128, and subtracting 2^23 + 128 leaves b (no I2F).
TF_DEVICE float2 s8x2_to_float2(uint32_t v) {
  const uint32_t u = (v ^ 0x8080u);
  return make_float2(__uint_as_float(0x4B000000u | (u & 0xFFu)) - 8388736.f,
                     __uint_as_float(0x4B000000u | ((u >> 8) & 0xFFu)) - 8388736.f);
}

TF_DEVICE float2 e4m3x2_to_float2(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(static_cast<unsigned short>(v & 0xFFFFu)));
  __half2 h;
  std::memcpy(static_cast<void*>(&h), &h2, 4);
  return __half22float2(h);
#else
  return make_float2(e4m3_to_float_sw(v & 0xFFu), e4m3_to_float_sw((v >> 8) & 0xFFu));
#endif
}

// e4m3 bits of lo (bits 0-7) and hi (bits 8-15), rounded to nearest even and saturated (lo, hi finite).
TF_DEVICE uint32_t float2_to_e4m3x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return float_to_e4m3_sw(lo) | (float_to_e4m3_sw(hi) << 8);
#endif
}

#ifndef TILEFORMER_EMULATE
TF_DEVICE uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16
// ---------------------------------------------------------------------------------------------

#ifdef TILEFORMER_EMULATE
namespace detail {
struct LdmIn { const unsigned char* row; };

template <int N, bool Trans>
inline void ldmatrix_fn(emu::WarpState& w, uint32_t) {
  if (N == 4) ++emu::globals().ldmatrix_x4_count;
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* out = &emu::slot_out<uint32_t>(w, lane);
    const int g = lane >> 2, t = lane & 3;
    for (int j = 0; j < N; ++j) {
      uint16_t lo, hi;
      if (!Trans) {  // {M_j[g][2t], M_j[g][2t+1]}
        const unsigned char* row = emu::slot_in<LdmIn>(w, 8 * j + g).row;
        std::memcpy(&lo, row + 2 * (2 * t), 2);
        std::memcpy(&hi, row + 2 * (2 * t + 1), 2);
      } else {       // {M_j[2t][g], M_j[2t+1][g]}
        std::memcpy(&lo, emu::slot_in<LdmIn>(w, 8 * j + 2 * t).row + 2 * g, 2);
        std::memcpy(&hi, emu::slot_in<LdmIn>(w, 8 * j + 2 * t + 1).row + 2 * g, 2);
      }
      out[j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

template <int N, bool Trans>
inline void ldmatrix(uint32_t* r, const void* row_ptr, const char* what) {
  auto& me = emu::slot_in<LdmIn>(emu::warp_state(), emu::cur().lane);
  me.row = static_cast<const unsigned char*>(row_ptr);
  if (emu::cur().lane < 8 * N && (reinterpret_cast<uintptr_t>(row_ptr) & 15))
    emu::fail(std::string(what) + ": row address not 16-byte aligned");
  emu::warp_collective(ldmatrix_fn<N, Trans>, kFullMask, what, __FILE__, __LINE__);
  std::memcpy(r, emu::warp_state().out[emu::cur().lane], 4 * N);
}
}  // namespace detail
#endif

// Each lane passes the address of one 16-byte row (lanes 8j..8j+7: rows 0..7 of matrix j).
TF_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* row_ptr) {
#ifdef TILEFORMER_EMULATE
  detail::ldmatrix<1, false>(r, row_ptr, "ldmatrix.x1");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(row_ptr)));
#endif
}

TF_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row_ptr) {
#ifdef TILEFORMER_EMULATE
  detail::ldmatrix<2, false>(r, row_ptr, "ldmatrix.x2");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row_ptr)));
#endif
}

TF_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
#ifdef TILEFORMER_EMULATE
  detail::ldmatrix<4, false>(r, row_ptr, "ldmatrix.x4");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row_ptr)));
#endif
}

TF_DEVICE void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row_ptr) {
#ifdef TILEFORMER_EMULATE
  detail::ldmatrix<1, true>(r, row_ptr, "ldmatrix.x1.trans");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(row_ptr)));
#endif
}

TF_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_ptr) {
#ifdef TILEFORMER_EMULATE
  detail::ldmatrix<2, true>(r, row_ptr, "ldmatrix.x2.trans");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row_ptr)));
#endif
}

TF_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
#ifdef TILEFORMER_EMULATE
  detail::ldmatrix<4, true>(r, row_ptr, "ldmatrix.x4.trans");
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row_ptr)));
#endif
}

// ---------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32:  D = A * B + C
// ---------------------------------------------------------------------------------------------

#ifdef TILEFORMER_EMULATE
namespace detail {
struct MmaIn { uint32_t a[4]; uint32_t b[2]; float c[4]; };

template <typename T>
inline void mma_fn(emu::WarpState& w, uint32_t) {
  ++emu::globals().mma_count;
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaIn& in = emu::slot_in<MmaIn>(w, lane);
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r) {
      const float2 v = unpack2<T>(in.a[r]);
      const int row = g + ((r & 1) ? 8 : 0), col = 2 * t + ((r & 2) ? 8 : 0);
      A[row][col] = v.x;
      A[row][col + 1] = v.y;
    }
    for (int r = 0; r < 2; ++r) {
      const float2 v = unpack2<T>(in.b[r]);
      const int k = 2 * t + (r ? 8 : 0);
      B[k][g] = v.x;
      B[k + 1][g] = v.y;
    }
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = in.c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    float* d = &emu::slot_out<float>(w, lane);
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      float acc = 0.f;  // products of 16-bit inputs are exact in fp32
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[i] = acc + C[row][col];
    }
  }
}
}  // namespace detail
#endif

// T = __half or __nv_bfloat16. d may alias c.
template <typename T>
TF_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma inputs are fp16 or bf16");
#ifdef TILEFORMER_EMULATE
  auto& in = emu::slot_in<detail::MmaIn>(emu::warp_state(), emu::cur().lane);
  std::memcpy(in.a, a, sizeof(in.a));
  std::memcpy(in.b, b, sizeof(in.b));
  std::memcpy(in.c, c, sizeof(in.c));
  emu::warp_collective(detail::mma_fn<T>, kFullMask, "mma.sync.m16n8k16", __FILE__, __LINE__);
  std::memcpy(d, emu::warp_state().out[emu::cur().lane], 16);
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copies in commit groups.
// Emulated copies happen at the wait that retires their group, so reading the destination before
// cp_async_wait (+ __syncthreads for other threads' copies) sees stale shared memory, as on a GPU.
// ---------------------------------------------------------------------------------------------

// 16 bytes, L2 only (.cg); both addresses 16-byte aligned.
TF_DEVICE void cp_async_16(void* smem_dst, gptr<const void> gmem_src) {
#ifdef TILEFORMER_EMULATE
  emu::cp_async(smem_dst, gmem_src.get(), 16, 16);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src));
#endif
}

// As cp_async_16, but when !pred nothing is read (gmem_src may be out of bounds) and the 16
// destination bytes are zero-filled (src-size 0).
TF_DEVICE void cp_async_16_zfill(void* smem_dst, gptr<const void> gmem_src, bool pred) {
#ifdef TILEFORMER_EMULATE
  emu::cp_async(smem_dst, gmem_src.get(), 16, pred ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               ::"r"(smem_u32(smem_dst)), "l"(gmem_src), "r"(pred ? 16 : 0));
#endif
}

TF_DEVICE void cp_async_commit() {
#ifdef TILEFORMER_EMULATE
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
TF_DEVICE void cp_async_wait() {
#ifdef TILEFORMER_EMULATE
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

TF_DEVICE void cp_async_wait_all() { cp_async_wait<0>(); }

// ---------------------------------------------------------------------------------------------
// Named barriers (PTX "bar / barrier"): barrier `id` in 1..15 (0 is __syncthreads') counting `count` threads, a
// multiple of 32. A phase completes when `count` threads have arrived through either instruction; bar.sync waits
// for that (and orders the memory accesses of the participants), bar.arrive only counts. Every thread of a warp
// executes them (.aligned), so a warp counts 32.
// ---------------------------------------------------------------------------------------------

#ifdef TILEFORMER_EMULATE
TF_DEVICE void named_barrier_sync(int id, int count, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
  emu::named_barrier(id, count, true, file, line);
}
TF_DEVICE void named_barrier_arrive(int id, int count, const char* file = __builtin_FILE(),
                                    int line = __builtin_LINE()) {
  emu::named_barrier(id, count, false, file, line);
}
#else
TF_DEVICE void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
TF_DEVICE void named_barrier_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
#endif

}  // namespace tf::ptx
