// Flash attention: head-dim / dtype dispatch to the per-instantiation launchers (attention/inst/*.cu) and the
// varlen tail fill. Compiled by nvcc (transformer._C) and by g++ against the host emulation (_C_emu).
#include "attention/attention.h"

#include <stdexcept>
#include <string>

#include "attention/bwd.cuh"
#include "attention/headdims.h"
#include "common/launch.h"

namespace tf::attention {

int attn_head_dims(int* dims, int cap) {
  int n = 0;
  for (int d : kSourceHeadDims)
    if (headdim_enabled(d)) {
      if (n < cap) dims[n] = d;
      ++n;
    }
  return n;
}

int attn_padded_head_dim(int head_dim) {
  for (int d : kSourceHeadDims)
    if (headdim_enabled(d) && d >= head_dim) return d;
  return 0;
}

namespace {

template <typename T>
void fwd_typed(const Params& p, cudaStream_t s, int d) {
  switch (d) {
    case 32: return run_attn_fwd<T, 32>(p, s);
    case 64: return run_attn_fwd<T, 64>(p, s);
    case 96: return run_attn_fwd<T, 96>(p, s);
    case 128: return run_attn_fwd<T, 128>(p, s);
    case 192: return run_attn_fwd<T, 192>(p, s);
    case 256: return run_attn_fwd<T, 256>(p, s);
    default: throw std::invalid_argument("attention: no kernel for padded head dim " + std::to_string(d));
  }
}

template <typename T>
void bwd_typed(const Params& p, cudaStream_t s, int d) {
  switch (d) {
    case 32: return run_attn_bwd<T, 32>(p, s);
    case 64: return run_attn_bwd<T, 64>(p, s);
    case 96: return run_attn_bwd<T, 96>(p, s);
    case 128: return run_attn_bwd<T, 128>(p, s);
    case 192: return run_attn_bwd<T, 192>(p, s);
    case 256: return run_attn_bwd<T, 256>(p, s);
    default: throw std::invalid_argument("attention: no kernel for padded head dim " + std::to_string(d));
  }
}

int checked_head_dim(const Params& p, const char* what) {
  if (p.dtype != DType::f16 && p.dtype != DType::bf16)
    throw std::invalid_argument(std::string(what) + ": q, k, v must be float16 or bfloat16");
  if (p.head_dim < 8 || p.head_dim % 8)
    throw std::invalid_argument(std::string(what) + ": head_dim must be a positive multiple of 8");
  const int d = attn_padded_head_dim(p.head_dim);
  if (!d) throw std::invalid_argument(std::string(what) + ": head dim " + std::to_string(p.head_dim) +
                                      " exceeds the compiled head dims (TILEFORMER_CUDA_HEADDIMS)");
  return d;
}

// Packed tokens in no sequence: their rows of x (and y) 0, of lse -inf (attn_zero_tail_kernel zeroes a
// superset; the attention kernels, launched after it, write the rows of every sequence).
template <typename T>
void zero_tail(gptr<void> x, gptr<void> y, gptr<float> lse, const Params& p, gptr<const int> cu, int64_t total,
               int heads, cudaStream_t s) {
  if (total <= 0) return;
  launch(attn_zero_tail_kernel<T>, dim3(static_cast<unsigned>((total + 15) / 16)), dim3(128), 0, s, gcast<T>(x),
         gcast<T>(y), lse, cu, p.batch, total, heads, p.head_dim);
}

}  // namespace

void attn_fwd(const Params& p, cudaStream_t s) {
  const int d = checked_head_dim(p, "attn_fwd");
  const bool half = p.dtype == DType::f16;
  if (p.varlen) {
    if (half) zero_tail<__half>(p.out, nullptr, p.lse, p, p.cu_q, p.total_q, p.hq, s);
    else zero_tail<__nv_bfloat16>(p.out, nullptr, p.lse, p, p.cu_q, p.total_q, p.hq, s);
  }
  if (p.batch == 0 || p.max_q == 0 || p.hq == 0) return;
  if (half) fwd_typed<__half>(p, s, d);
  else fwd_typed<__nv_bfloat16>(p, s, d);
}

void attn_bwd(const Params& p, cudaStream_t s) {
  const int d = checked_head_dim(p, "attn_bwd");
  const bool half = p.dtype == DType::f16;
  if (p.varlen) {
    if (half) {
      zero_tail<__half>(p.dq, nullptr, nullptr, p, p.cu_q, p.total_q, p.hq, s);
      zero_tail<__half>(p.dk, p.dv, nullptr, p, p.cu_k, p.total_k, p.hkv, s);
    } else {
      zero_tail<__nv_bfloat16>(p.dq, nullptr, nullptr, p, p.cu_q, p.total_q, p.hq, s);
      zero_tail<__nv_bfloat16>(p.dk, p.dv, nullptr, p, p.cu_k, p.total_k, p.hkv, s);
    }
  }
  if (p.batch == 0 || p.hq == 0 || (p.max_q == 0 && p.max_k == 0)) return;
  if (half) bwd_typed<__half>(p, s, d);
  else bwd_typed<__nv_bfloat16>(p, s, d);
}

}  // namespace tf::attention
