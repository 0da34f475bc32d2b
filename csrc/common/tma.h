// Tensor maps for TMA (cp.async.bulk.tensor, common/ptx_sm90.cuh): tf::TmaDesc and the one host function that
// builds one, tf::make_tma_desc, called by launchers (.cu).
//   GPU build: a CUtensorMap encoded by cuTensorMapEncodeTiled, looked up at run time through
//              cudaGetDriverEntryPointByVersion (no link-time libcuda dependency). Kernels take it as
//              `const __grid_constant__ tf::TmaDesc` and pass its address to the TMA wrappers.
//   Emulated build: a plain struct (base, dims, strides, box, element size, swizzle) read by common/emu_hopper.h.
// Out-of-bounds elements of a load are filled with zeros; out-of-bounds elements of a store are not written.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/device.cuh"
#include "common/types.h"

#ifndef TILEFORMER_EMULATE
#include <cuda.h>
#endif

namespace tf {

// Swizzle of 16-byte chunks in shared memory, as TMA writes and wgmma reads it: bits [4, 4 + s) of the byte
// address are XORed with bits [7, 7 + s) (s = 1, 2, 3 for 32, 64, 128 bytes); the pattern repeats every
// 256 / 512 / 1024 bytes, so tiles start at multiples of that.
enum class Swizzle : int { none = 0, b32 = 1, b64 = 2, b128 = 3 };

// Bytes of one swizzled row (32 / 64 / 128); 16 (one chunk) without swizzle.
TF_HOST_DEVICE constexpr int swizzle_span(Swizzle s) { return 16 << int(s); }

TF_HOST_DEVICE constexpr uint32_t swizzle_addr(uint32_t addr, Swizzle s) {
  return addr ^ (((addr >> 7) & ((1u << int(s)) - 1u)) << 4);
}

constexpr int kTmaMaxRank = 5;

#ifdef TILEFORMER_EMULATE
struct TmaDesc {
  const void* base = nullptr;
  int rank = 0, elem_bytes = 0;
  int64_t dims[kTmaMaxRank] = {};     // elements, innermost first
  int64_t strides[kTmaMaxRank] = {};  // bytes; strides[0] = elem_bytes
  int box[kTmaMaxRank] = {};
  Swizzle swizzle = Swizzle::none;
};
#else
using TmaDesc = CUtensorMap;
#endif

// A tensor map over `base` (16-byte aligned): dims[0] is the innermost, contiguous dimension; strides[d] (d >= 1)
// in elements, each a multiple of 16 bytes; box: the tile one load / store moves (box[d] in 1..256;
// box[0] * element bytes a multiple of 16, and equal to the swizzle span when swizzled). Throws
// std::invalid_argument on a bad argument, std::runtime_error when the driver rejects the map.
inline TmaDesc make_tma_desc(const void* base, DType dtype, int rank, const int64_t* dims, const int64_t* strides,
                             const int* box, Swizzle swizzle) {
  const int elem = dtype == DType::f32 ? 4 : 2;
  auto bad = [](const std::string& m) { throw std::invalid_argument("make_tma_desc: " + m); };
  if (rank < 1 || rank > kTmaMaxRank) bad("rank must be in 1..5, got " + std::to_string(rank));
  if (reinterpret_cast<uintptr_t>(base) & 15) bad("base must be 16-byte aligned");
  for (int d = 0; d < rank; ++d) {
    if (dims[d] < 1 || dims[d] > (int64_t(1) << 32)) bad("dims[" + std::to_string(d) + "] out of range");
    if (box[d] < 1 || box[d] > 256) bad("box[" + std::to_string(d) + "] must be in 1..256");
    if (d > 0 && ((strides[d] * elem) % 16 != 0 || strides[d] < 1))
      bad("strides[" + std::to_string(d) + "] * element bytes must be a positive multiple of 16");
  }
  if ((box[0] * elem) % 16) bad("box[0] * element bytes must be a multiple of 16");
  if (swizzle != Swizzle::none && box[0] * elem != swizzle_span(swizzle))
    bad("box[0] * element bytes must equal the swizzle span (" + std::to_string(swizzle_span(swizzle)) + " bytes)");
#ifdef TILEFORMER_EMULATE
  TmaDesc t;
  t.base = base;
  t.rank = rank;
  t.elem_bytes = elem;
  for (int d = 0; d < rank; ++d) {
    t.dims[d] = dims[d];
    t.strides[d] = d == 0 ? elem : strides[d] * elem;
    t.box[d] = box[d];
  }
  t.swizzle = swizzle;
  return t;
#else
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static Encode encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess || status != cudaDriverEntryPointSuccess || !fn)
      throw std::runtime_error("make_tma_desc: cuTensorMapEncodeTiled not found in the CUDA driver (needs 12.0+)");
    return reinterpret_cast<Encode>(fn);
  }();
  cuuint64_t gdim[kTmaMaxRank], gstride[kTmaMaxRank];
  cuuint32_t bdim[kTmaMaxRank], estride[kTmaMaxRank];
  for (int d = 0; d < rank; ++d) {
    gdim[d] = cuuint64_t(dims[d]);
    if (d > 0) gstride[d - 1] = cuuint64_t(strides[d] * elem);
    bdim[d] = cuuint32_t(box[d]);
    estride[d] = 1;
  }
  const CUtensorMapDataType type = dtype == DType::f32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                   : dtype == DType::f16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                         : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUtensorMapSwizzle sw = swizzle == Swizzle::b128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                : swizzle == Swizzle::b64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                : swizzle == Swizzle::b32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                          : CU_TENSOR_MAP_SWIZZLE_NONE;
  TmaDesc t;
  const CUresult r = encode(&t, type, cuuint32_t(rank), const_cast<void*>(base), gdim, gstride, bdim, estride,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw std::runtime_error("make_tma_desc: cuTensorMapEncodeTiled failed with CUresult " +
                                                  std::to_string(int(r)));
  return t;
#endif
}

}  // namespace tf
