// Launch of the split kernel for one padded head dim: the CUDA-core kernel for group * Sq <= 4 rows per
// KV head, else the tensor-core kernel with 16, 32 or 64 rows per block (more rows: several row blocks per
// KV head, each reading the KV range once), for each cache format (16-bit, int8, fp8 e4m3). Included by one
// decode_d<D>.cu per padded head dim, so the instances compile in separate translation units.
#pragma once

#include <stdexcept>
#include <string>

#include "common/launch.h"
#include "decode/instances.h"
#include "decode/split_mma.cuh"
#include "decode/split_simt.cuh"

namespace tf::decode {

template <typename T, int D_PAD, int KV>
void launch_split_typed(const Params& p, cudaStream_t stream) {
  using L = SmemLayout<D_PAD, KV>;
  const int group = p.hq / p.hkv;
  const SplitShape sh = split_shape(group, p.sq, D_PAD);
  const int64_t blocks = int64_t(p.batch) * p.hkv * sh.m_blocks;
  if (blocks > 2147483647) throw std::invalid_argument("decode_attention: B * Hkv * row blocks exceeds 2^31 - 1");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.num_splits));
  if (!sh.tensor_cores)
    launch(decode_simt_kernel<T, D_PAD, KV>, grid, dim3(kThreads), L::bytes(0), stream, p);
  else
    launch(decode_mma_kernel<T, D_PAD, KV>, grid, dim3(kThreads), L::bytes(16 * sh.warps_m), stream, p, sh.warps_m,
           sh.m_blocks);
}

template <typename T, int D_PAD>
void launch_split_format(const Params& p, cudaStream_t stream) {
  switch (p.kv) {
    case KvFormat::same: launch_split_typed<T, D_PAD, 0>(p, stream); break;
    case KvFormat::int8: launch_split_typed<T, D_PAD, 1>(p, stream); break;
    case KvFormat::fp8e4m3: launch_split_typed<T, D_PAD, 2>(p, stream); break;
    default: throw std::invalid_argument("decode_attention: unknown KV cache format");
  }
}

template <int D_PAD>
void launch_split(const Params& p, cudaStream_t stream) {
  if (p.dtype == DType::f16) launch_split_format<__half, D_PAD>(p, stream);
  else if (p.dtype == DType::bf16) launch_split_format<__nv_bfloat16, D_PAD>(p, stream);
  else throw std::invalid_argument(std::string("decode_attention: q must be float16 or bfloat16, got ") +
                                   dtype_name(p.dtype));
}

}  // namespace tf::decode
