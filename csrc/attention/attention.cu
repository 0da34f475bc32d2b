// Flash attention: head-dim / dtype dispatch to the per-instantiation launchers (attention/inst/*.cu) and the
// varlen tail fill. Compiled by nvcc (transformer._C) and by g++ against the host emulation (_C_emu).
#include "attention/attention.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
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

namespace {

std::atomic<int> g_sm90_verified{-1};

enum class FwdMode { automatic, sm80, sm90 };

// TILEFORMER_CUDA_ATTN_FWD (forward) or TILEFORMER_CUDA_ATTN_BWD (backward)
FwdMode kernel_mode(const char* var) {
  const char* v = std::getenv(var);
  if (!v || !*v || !std::strcmp(v, "auto")) return FwdMode::automatic;
  if (!std::strcmp(v, "sm80")) return FwdMode::sm80;
  if (!std::strcmp(v, "sm90")) return FwdMode::sm90;
  throw std::invalid_argument(std::string(var) + " must be \"auto\", \"sm80\" or \"sm90\", got \"" + v + "\"");
}

// The kernel a call runs under `var` when sm90 does or does not serve it (served: its reason is empty).
const char* pick_kernel(const char* var, bool served) {
  const FwdMode mode = kernel_mode(var);
  if (mode == FwdMode::sm80 || !served) return "sm80";
  if (mode == FwdMode::sm90) return "sm90";
#ifdef TILEFORMER_EMULATE
  return "sm80";
#else
  return g_sm90_verified.load() == 1 ? "sm90" : "sm80";
#endif
}

template <typename T>
void fwd_sm90_typed(const Params& p, cudaStream_t s, int d) {
  if (d == 64) return run_attn_fwd_sm90<T, 64>(p, s);
  if (d == 128) return run_attn_fwd_sm90<T, 128>(p, s);
  if (d == 256) return run_attn_fwd_sm90<T, 256>(p, s);
  throw std::invalid_argument("attention: no sm_90a forward for padded head dim " + std::to_string(d));
}

template <typename T>
void bwd_sm90_typed(const Params& p, cudaStream_t s, int d) {
  if (d == 64) return run_attn_bwd_sm90<T, 64>(p, s);
  if (d == 128) return run_attn_bwd_sm90<T, 128>(p, s);
  throw std::invalid_argument("attention: no sm_90a backward for padded head dim " + std::to_string(d));
}

}  // namespace

std::string attn_fwd_sm90_reason(int head_dim, bool varlen, int64_t max_k, bool dropout) {
  if (dropout) return "dropout: the sm_90a forward has no dropout mask";
  (void)varlen;   // the kernel serves packed sequences too (starts and lengths read from cu_seqlens)
  if (max_k == 0) return "max_seqlen_k = 0: no key to load";
  const int d = attn_padded_head_dim(head_dim);
  if (d == 0) return "head dim " + std::to_string(head_dim) + " exceeds every compiled head dim";
  if (d != 64 && d != 128 && d != 256)
    return "head dim " + std::to_string(head_dim) + " runs as " + std::to_string(d) +
           ": the sm_90a forward is built for padded head dims 64, 128 and 256";
  if (!(d == 64 ? attn_fwd_sm90_has_code<64>() : d == 128 ? attn_fwd_sm90_has_code<128>()
                                                          : attn_fwd_sm90_has_code<256>()))
    return "this build holds no sm_90a code of the forward (TILEFORMER_CUDA_ARCHS without 9.0a)";
#ifndef TILEFORMER_EMULATE
  int dev = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
  if (major != 9 || minor != 0)
    return "the sm_90a forward needs a compute capability 9.0 GPU; this one is " + std::to_string(major) + "." +
           std::to_string(minor);
#endif
  return "";
}

int attn_fwd_sm90_verified(int state) {
  if (state == 0 || state == 1) g_sm90_verified.store(state);
  return g_sm90_verified.load();
}

const char* attn_fwd_kernel(const Params& p) {
  return pick_kernel("TILEFORMER_CUDA_ATTN_FWD",
                     attn_fwd_sm90_reason(p.head_dim, p.varlen, p.max_k, bool(p.rng_state)).empty());
}

std::string attn_bwd_sm90_reason(int head_dim, bool varlen, int64_t max_k, bool dropout, bool deterministic,
                                 bool local_delta) {
  if (deterministic) return "deterministic: the sm_90a backward adds dQ with atomics";
  if (local_delta)
    return "at most " + std::to_string(kLocalDeltaKeys) + " keys per sequence: the one-tile sm_80 backward serves it";
  if (dropout) return "dropout: the sm_90a backward has no dropout mask";
  const int d = attn_padded_head_dim(head_dim);
  if (d != 0 && d != 64 && d != 128)
    return "head dim " + std::to_string(head_dim) + " runs as " + std::to_string(d) +
           ": the sm_90a backward is built for padded head dims 64 and 128";
  // the rest (build, device, max_seqlen_k) as the forward: the kernels come from the same 9.0a units
  return attn_fwd_sm90_reason(head_dim, varlen, max_k, false);
}

const char* attn_bwd_kernel(const Params& p) {
  return pick_kernel("TILEFORMER_CUDA_ATTN_BWD", attn_bwd_sm90_reason(p.head_dim, p.varlen, p.max_k, bool(p.rng_state),
                                                                      !p.dq_accum, p.local_delta).empty());
}

void attn_fwd(const Params& p, cudaStream_t s) {
  const int d = checked_head_dim(p, "attn_fwd");
  const bool half = p.dtype == DType::f16;
  if (p.varlen) {
    if (half) zero_tail<__half>(p.out, nullptr, p.lse, p, p.cu_q, p.total_q, p.hq, s);
    else zero_tail<__nv_bfloat16>(p.out, nullptr, p.lse, p, p.cu_q, p.total_q, p.hq, s);
  }
  (void)fwd_tiles_w4();   // a bad value fails whichever kernel runs
  const bool sm90 = !std::strcmp(attn_fwd_kernel(p), "sm90");
  if (p.batch == 0 || p.max_q == 0 || p.hq == 0) return;
  if (sm90) {
    if (half) fwd_sm90_typed<__half>(p, s, d);
    else fwd_sm90_typed<__nv_bfloat16>(p, s, d);
    return;
  }
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
  const bool sm90 = !std::strcmp(attn_bwd_kernel(p), "sm90");
  if (p.batch == 0 || p.hq == 0 || (p.max_q == 0 && p.max_k == 0)) return;
  if (sm90) {
    if (half) bwd_sm90_typed<__half>(p, s, d);
    else bwd_sm90_typed<__nv_bfloat16>(p, s, d);
    return;
  }
  if (half) bwd_typed<__half>(p, s, d);
  else bwd_typed<__nv_bfloat16>(p, s, d);
}

}  // namespace tf::attention
