// Flash attention launchers (attention/attention.cu + attention/inst/*.cu): plain parameters, no torch.
//
// Semantics (transformer/attention.py, identical to triton_kernels/attention*.py):
//   q [B, Nq, Hq, D] / varlen [Tq, Hq, D]; k, v [B, Nk, Hkv, D] / [Tk, Hkv, D]; Hq = group * Hkv, query head
//   h reads KV head h / group (GQA/MQA, no copies). Any element strides with a contiguous last dim; every
//   base pointer 16-byte aligned and every stride a multiple of 8 elements (cp.async), head_dim a multiple
//   of 8 (the Python side pads odd head dims, the bindings copy misaligned views).
//   Visibility: off = seqlen_k - seqlen_q (bottom_right) or 0; key j is visible to query i iff
//   i + off - win_left <= j (mask_left) and j <= i + off + win_right (mask_right); causal = right 0.
//   Score (natural log domain) s = scale * q.k, or softcap * tanh(scale * q.k / softcap), minus
//   slope * |i + off - j| (ALiBi). Rows with no visible key: out 0, lse -inf, gradients 0.
//   out like q (contiguous, dtype of q); lse fp32 [B, Hq, Nq] / [Hq, Tq], natural log.
//   Dropout (rng_state not null): P is multiplied by keep / (1 - p) before P V, keep being the counter-based
//   mask of transformer/reference.py's dropout_keep (Philox4x32-10, attention/common.cuh) under the seed and
//   offset read from rng_state on the device; lse is that of the undropped scores. The backward regenerates
//   the same mask.
// The backward: dK/dV per key tile over the query tiles of every query head of the GQA group; dQ either per
// query tile over its key tiles (dq_accum null: deterministic, no atomics) or, with dq_accum, added by the
// dK/dV blocks with fp32 atomics into dq_accum and converted at the end (5 matrix products per tile pair
// instead of 7; dq varies from run to run in its last bits). With dq_accum, rows of dq past max_q are 0.
// Varlen index values (any int32, no host sync, nothing read or written outside the tensors): for q and k
// separately, sequence b spans [s_b, e_b) with s_b = clamp(cu[b], 0, total), e_b = clamp(cu[b + 1], s_b, total).
// Tokens in no sequence: out 0, lse -inf, gradients 0. Sequences that overlap (non-monotone cu_seqlens) give
// unspecified values there. Queries of a sequence at index >= max_q (a max_seqlen_q smaller than the sequence)
// are not computed: their rows of out, lse and dq are not written and they contribute nothing to dk, dv; keys
// at index >= max_k may have their dk, dv rows unwritten (the forward and dq still see every key).
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/types.h"

namespace tf::attention {

// Longest sequence (tokens of q or k) the kernels index with 32 bits, with room for the tiles past its end.
constexpr int64_t kMaxTokens = (int64_t(1) << 31) - 1024;
// Backward: key counts up to this fit one warp's keys of the dK/dV tile.
constexpr int kLocalDeltaKeys = 16;

struct Params {
  // forward inputs / outputs
  gptr<const void> q;
  gptr<const void> k;
  gptr<const void> v;
  gptr<void> out;            // [.., Hq, D] contiguous, dtype of q (forward output; backward input)
  gptr<float> lse;           // fp32 [B, Hq, Nq] / [Hq, Tq] contiguous
  gptr<const float> alibi;   // fp32 slopes [Hq] or [B, Hq], or null
  gptr<const int> cu_q;      // int32 [B + 1] (varlen) or null
  gptr<const int> cu_k;
  // backward (null in the forward)
  gptr<const void> dout;     // like out (own strides)
  gptr<const float> dlse;    // fp32, lse's layout (contiguous), or null
  gptr<float> delta;         // fp32 workspace, lse's layout: rowsum(dO * O) - dlse
  gptr<void> dq;             // contiguous like q, k, v
  gptr<void> dk;
  gptr<void> dv;
  gptr<float> dq_accum;      // null: deterministic backward; else fp32 workspace of dq's shape (any contents,
                             // zeroed by attn_bwd; 16-byte aligned)
  // dropout (forward and backward)
  gptr<const int64_t> rng_state;   // int64 [2] (seed, offset) of the dropout mask, or null: no dropout
  uint32_t drop_thr;               // an element is dropped iff its 16-bit draw is < drop_thr (round(p 2^16))
  float drop_scale;                // 1 / (1 - p)

  // element strides (batch, token, head); the batch stride is ignored for varlen
  int64_t stride_qb, stride_qm, stride_qh;
  int64_t stride_kb, stride_kn, stride_kh;
  int64_t stride_vb, stride_vn, stride_vh;
  int64_t stride_ob, stride_om, stride_oh;     // out (and dout: stride_do*)
  int64_t stride_dob, stride_dom, stride_doh;
  int64_t stride_ab, stride_ah;                // alibi (stride_ab = 0 for [Hq] slopes)

  int batch, hq, hkv, group;
  int max_q, max_k;          // dense Nq, Nk; varlen: bounds of the sequence lengths (grid size), <= kMaxTokens
  int64_t total_q, total_k;  // packed tokens (varlen: rows of q / k, <= kMaxTokens; dense: B * N)
  int head_dim;              // multiple of 8, <= the instantiated padded head dim
  float scale;               // softmax scale
  float softcap;             // 0: none
  int win_left, win_right;   // used when mask_left / mask_right
  bool mask_left, mask_right, bottom_right, varlen;
  bool local_delta;          // backward: max_k <= kLocalDeltaKeys (then dq_accum is set too): delta and
                             // rowsum(P) from the dK/dV + dQ kernel's tile (attention/bwd.cuh)
  DType dtype;               // f16 or bf16
};

// Head dims with compiled kernels (TILEFORMER_HEADDIMS at build time; default 64,128), ascending.
// Writes at most `cap` of them to dims and returns how many exist.
int attn_head_dims(int* dims, int cap);

// The instantiated head dim a head_dim (1..256) runs with: the smallest one >= head_dim, or 0 if none.
int attn_padded_head_dim(int head_dim);

void attn_fwd(const Params& p, cudaStream_t stream);   // fills p.out, p.lse
void attn_bwd(const Params& p, cudaStream_t stream);   // fills p.delta, p.dq, p.dk, p.dv

// Per-(dtype, padded head dim) entry points, one translation unit each (attention/inst/*.cu).
template <typename T, int D> void run_attn_fwd(const Params& p, cudaStream_t stream);
template <typename T, int D> void run_attn_bwd(const Params& p, cudaStream_t stream);

// The sm_90a forward (attention/fwd_sm90.cuh: wgmma + TMA + mbarrier; inst/fwd_sm90_d<D>.cu), D = 64, 128, 256.
// attn_fwd picks the forward kernel by TILEFORMER_CUDA_ATTN_FWD, read at every call:
//   "auto" (default, also unset or empty): sm90 on a GPU when attn_fwd_sm90_reason is empty and the hardware
//       check passed (attn_fwd_sm90_verified: the Python side runs the sm_90a self-tests once and reports);
//       the sm_80 kernel otherwise, and always in the emulator;
//   "sm90": sm90 wherever attn_fwd_sm90_reason is empty (the emulator included), the sm_80 kernel elsewhere;
//   "sm80": the sm_80 kernel. Any other value: std::invalid_argument naming the variable.
template <typename T, int D> void run_attn_fwd_sm90(const Params& p, cudaStream_t stream);
template <int D> bool attn_fwd_sm90_has_code();   // the build holds the kernel's sm_90 code (GPU) / the head dim

// "" when the sm_90a forward serves a call with this head dim (before padding), layout and max_seqlen_k (< 0:
// not known) and dropout on this build and the current device; else why not (the call then runs the sm_80 kernel).
std::string attn_fwd_sm90_reason(int head_dim, bool varlen, int64_t max_k, bool dropout = false);

// The hardware check of the sm_90a forward under "auto": -1 not run (the initial state), 0 failed, 1 passed.
// state 0 or 1 records a result; any other value only reads. Returns the state.
int attn_fwd_sm90_verified(int state);

// The forward kernel attn_fwd runs for p: "sm90" or "sm80" (throws on a bad TILEFORMER_CUDA_ATTN_FWD).
const char* attn_fwd_kernel(const Params& p);

// The sm_90a backward (attention/bwd_sm90.cuh: wgmma + TMA + mbarrier; inst/bwd_sm90_d<D>.cu), D = 64, 128: the
// atomic-dQ backward (p.dq_accum set) without dropout and without the local delta. attn_bwd picks it by
// TILEFORMER_CUDA_ATTN_BWD, read at every call, with the values and rules of TILEFORMER_CUDA_ATTN_FWD ("auto" runs
// it on a GPU whose sm_90a self-tests passed: attn_fwd_sm90_verified, the same instructions).
template <typename T, int D> void run_attn_bwd_sm90(const Params& p, cudaStream_t stream);

// "" when the sm_90a backward serves a backward call with this head dim (before padding), max_seqlen_k,
// dropout, determinism and local delta on this build and the current device; else why not.
std::string attn_bwd_sm90_reason(int head_dim, bool varlen, int64_t max_k, bool dropout, bool deterministic,
                                 bool local_delta);

// The backward kernel attn_bwd runs for p: "sm90" or "sm80" (throws on a bad TILEFORMER_CUDA_ATTN_BWD).
const char* attn_bwd_kernel(const Params& p);

// TILEFORMER_CUDA_ATTN_FWD_TILES = "w8" (default, also when unset or empty) or "w4": the sm_80 forward's tiles
// (launch.cuh FwdTiles); read at every call (attn_fwd checks it even when the sm_90a forward runs).
inline bool fwd_tiles_w4() {
  const char* v = std::getenv("TILEFORMER_CUDA_ATTN_FWD_TILES");
  if (!v || !*v || !std::strcmp(v, "w8")) return false;
  if (!std::strcmp(v, "w4")) return true;
  throw std::invalid_argument(std::string("TILEFORMER_CUDA_ATTN_FWD_TILES must be \"w8\" or \"w4\", got \"") + v + "\"");
}

}  // namespace tf::attention
