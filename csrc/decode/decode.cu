// Decode attention launchers: append, split heuristic, split kernel (decode_d<D>.cu) + combine.
// Compiled by nvcc (transformer._C) and by g++ against the host emulation (transformer._C_emu).
#include "decode/decode.h"

#include <atomic>
#include <stdexcept>
#include <string>

#include "common/launch.h"
#include "decode/combine.cuh"
#include "decode/instances.h"

namespace tf::decode {
namespace {

// SM count of the current device, queried on first use and cached per device (no sync, capturable).
int cached_num_sms(cudaStream_t stream) {
#ifdef TILEFORMER_EMULATE
  return num_sms(stream);
#else
  static std::atomic<int> cache[64];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) return num_sms(stream);
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    n = num_sms(stream);
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
#endif
}

void check_common(int batch, int sq, int hkv, int head_dim, const char* who) {
  if (batch < 0 || sq < 1 || hkv < 1) throw std::invalid_argument(std::string(who) + ": bad sizes");
  if (head_dim < 1 || head_dim > 256)
    throw std::invalid_argument(std::string(who) + ": head dim must be in 1..256, got " + std::to_string(head_dim));
}

}  // namespace

int partial_dim(int head_dim) {
  if (head_dim < 1 || head_dim > 256)
    throw std::invalid_argument("decode_attention: head dim must be in 1..256, got " + std::to_string(head_dim));
  return head_dim <= 64 ? 64 : head_dim <= 80 ? 80 : head_dim <= 96 ? 96 : head_dim <= 128 ? 128 : 256;
}

bool uses_tensor_cores(int group, int sq) { return group * sq > 4; }

// flash-attn's wave-efficiency rule (as triton_kernels/decode.py): split only when the blocks fill less
// than 80% of the SMs; at most kMaxSplits, the SM count, and one split per 4 tiles of the capacity; then
// the smallest split count whose wave efficiency is within 85% of the best.
int plan_num_splits(int batch, int hkv, int group, int sq, int head_dim, int capacity, cudaStream_t stream) {
  const SplitShape sh = split_shape(group, sq, partial_dim(head_dim));
  const int64_t blocks = int64_t(batch) * hkv * sh.m_blocks;
  const int sms = cached_num_sms(stream);
  int64_t max_splits = ceil_div<int64_t>(capacity, 4 * 64);
  max_splits = max_splits < kMaxSplits ? max_splits : kMaxSplits;
  max_splits = max_splits < sms ? max_splits : sms;
  if (blocks <= 0 || double(blocks) >= 0.8 * sms || max_splits <= 1) return 1;
  double best = 0.0;
  double eff[kMaxSplits + 1];
  for (int s = 1; s <= max_splits; ++s) {
    const double waves = double(blocks * s) / sms;
    eff[s] = waves / double(ceil_div<int64_t>(blocks * s, sms));
    best = eff[s] > best ? eff[s] : best;
  }
  for (int s = 1; s <= max_splits; ++s)
    if (eff[s] >= 0.85 * best) return s;
  return 1;
}

void decode_append(const AppendParams& p, cudaStream_t stream) {
  check_common(p.batch, p.sq, p.hkv, p.head_dim, "decode_append");
  if (p.dtype != DType::f16 && p.dtype != DType::bf16)
    throw std::invalid_argument(std::string("decode_append: k must be float16 or bfloat16, got ") + dtype_name(p.dtype));
  if (p.page_size < 1) throw std::invalid_argument("decode_append: page_size must be >= 1");
  if (p.batch == 0) return;
  if (int64_t(p.batch) * p.sq > 2147483647 || p.hkv > 65535)
    throw std::invalid_argument("decode_append: B * Sq must be < 2^31 and Hkv <= 65535");
  const bool rotary = p.rotary_dim > 0;
  if (rotary) {
    if (!p.q || !p.q_rot || !p.rotary_cos || !p.rotary_sin || p.seqlen_ro < 1 || p.rotary_dim % 2 != 0 ||
        p.rotary_dim > p.head_dim || p.hq < p.hkv || p.hq > 65535)
      throw std::invalid_argument("decode_append: rotary needs q, q_rot, tables of >= 1 rows, an even rotary_dim "
                                  "<= head_dim and Hkv <= Hq <= 65535");
  }
  const int heads = rotary ? p.hq : p.hkv;   // blocks (16-bit) or warps (quantizing) per token
  const dim3 rows(static_cast<unsigned>(p.batch * p.sq));
  const bool f16 = p.dtype == DType::f16;
  if (p.kv == KvFormat::same) {
    const dim3 grid(rows.x, static_cast<unsigned>(heads));
    if (!rotary) launch(decode_append_kernel, grid, dim3(kThreads), 0, stream, p);
    else if (f16) launch(decode_append_rotary_kernel<__half>, grid, dim3(kThreads), 0, stream, p);
    else launch(decode_append_rotary_kernel<__nv_bfloat16>, grid, dim3(kThreads), 0, stream, p);
    return;
  }
  if (!p.k_scale || !p.v_scale) throw std::invalid_argument("decode_append: a quantized cache needs k_scale / v_scale");
  const dim3 grid(rows.x, static_cast<unsigned>(ceil_div(heads, kThreads / 32)));   // a warp per head
  if (p.kv == KvFormat::int8) {
    if (f16) launch(rotary ? decode_append_quant_kernel<__half, 1, true> : decode_append_quant_kernel<__half, 1>,
                    grid, dim3(kThreads), 0, stream, p);
    else launch(rotary ? decode_append_quant_kernel<__nv_bfloat16, 1, true>
                       : decode_append_quant_kernel<__nv_bfloat16, 1>, grid, dim3(kThreads), 0, stream, p);
  } else if (p.kv == KvFormat::fp8e4m3) {
    if (f16) launch(rotary ? decode_append_quant_kernel<__half, 2, true> : decode_append_quant_kernel<__half, 2>,
                    grid, dim3(kThreads), 0, stream, p);
    else launch(rotary ? decode_append_quant_kernel<__nv_bfloat16, 2, true>
                       : decode_append_quant_kernel<__nv_bfloat16, 2>, grid, dim3(kThreads), 0, stream, p);
  } else {
    throw std::invalid_argument("decode_append: unknown KV cache format");
  }
}

void decode_attention(const Params& p, cudaStream_t stream) {
  check_common(p.batch, p.sq, p.hkv, p.head_dim, "decode_attention");
  if (p.hq % p.hkv != 0) throw std::invalid_argument("decode_attention: Hq must be a multiple of Hkv");
  if (p.num_splits < 1 || p.num_splits > kMaxSplits)
    throw std::invalid_argument("decode_attention: num_splits must be in 1.." + std::to_string(kMaxSplits) +
                                ", got " + std::to_string(p.num_splits));
  if (p.page_size < 1) throw std::invalid_argument("decode_attention: page_size must be >= 1");
  if (p.num_splits > 1 && (!p.out_part || !p.lse_part))
    throw std::invalid_argument("decode_attention: num_splits > 1 needs the out_part / lse_part workspace");
  if (p.kv != KvFormat::same && (!p.k_scale || !p.v_scale))
    throw std::invalid_argument("decode_attention: a quantized cache needs k_scale / v_scale");
  if (p.batch == 0) return;
  switch (partial_dim(p.head_dim)) {
    case 64: launch_split_d64(p, stream); break;
    case 80: launch_split_d80(p, stream); break;
    case 96: launch_split_d96(p, stream); break;
    case 128: launch_split_d128(p, stream); break;
    default: launch_split_d256(p, stream); break;
  }
  if (p.num_splits > 1) {
    const int64_t rows = int64_t(p.batch) * p.hq * p.sq;
    const int64_t blocks = ceil_div<int64_t>(rows, kThreads / 32);
    if (blocks > 2147483647) throw std::invalid_argument("decode_attention: too many rows for the combine grid");
    const int d_pad = partial_dim(p.head_dim);
    if (p.dtype == DType::f16)
      launch(decode_combine_kernel<__half>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p, d_pad);
    else
      launch(decode_combine_kernel<__nv_bfloat16>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p,
             d_pad);
  }
}

}  // namespace tf::decode
