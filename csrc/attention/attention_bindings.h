// Torch bindings of the flash-attention kernels: torch.ops.<ns>.attn_fwd / attn_bwd / attn_head_dims. Both
// attention ops end in `bool deterministic=False` (the contract's deterministic_arg): attn_fwd ignores it, attn_bwd
// runs the atomic-dQ backward when it is false and the two-kernel deterministic one when it is true (calls with
// at most kLocalDeltaKeys keys per sequence always run the atomic one, deterministic there). Then both end
// in `float dropout_p=0., Tensor? rng_state=None` (the contract's dropout_arg): dropout_p > 0 applies the
// counter-based mask of rng_state (int64 [2] seed, offset on q's device, read by the kernels; attention.h).
// The op contract shared with the Triton backend, with the fakes and autograd, is transformer/ops/attention.py;
// the head-dim padding is in transformer/_cuda/attention.py. Any cu_seqlens values and any max_seqlen in
// 0..2^31-1024 are safe (attention/attention.h: clamped sequence bounds); nothing reads them on the host.
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "attention/attention.h"
#include "common/bindings.h"

namespace tf::attention_bindings {

using namespace tf::bind;

// A view the kernels can read with 16-byte cp.async (contiguous last dim, 16-byte aligned base, other
// strides multiples of 8 elements), or else a contiguous copy.
inline at::Tensor aligned(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.size(-1) <= 1 || t.stride(-1) == 1);
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.size(i) <= 1 || t.stride(i) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline int64_t stride_or0(const at::Tensor& t, int64_t i) { return t.size(i) <= 1 ? 0 : t.stride(i); }

struct Checked {
  tf::attention::Params p{};
  at::Tensor q, k, v, alibi, cu_q, cu_k, rng;
};

// dropout_p in [0, 1); for dropout_p > 0 rng_state an int64 [2] tensor on q's device (its values are read by
// the kernels, never here). Fills the dropout fields of c.p (rng_state null: no dropout).
inline void check_dropout(Checked& c, const at::Tensor& q, double dropout_p,
                          const std::optional<at::Tensor>& rng_state) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return;
  TORCH_CHECK_VALUE(rng_state.has_value(), "dropout_p > 0 needs rng_state, an int64 [2] tensor on ", q.device());
  check_device(*rng_state, "rng_state", &q);
  TORCH_CHECK_TYPE(rng_state->scalar_type() == at::kLong, "rng_state must be int64, got ", rng_state->scalar_type());
  TORCH_CHECK_VALUE(rng_state->numel() == 2, "rng_state must hold 2 values (seed, offset), got shape ",
                    rng_state->sizes());
  c.rng = rng_state->contiguous();
  c.p.rng_state = c.rng.data_ptr<int64_t>();
  // the 16-bit draws below which an element is dropped: round(p 2^16), at most 2^16 - 1 (reference.dropout_threshold)
  c.p.drop_thr = uint32_t(std::min<double>(std::nearbyint(dropout_p * 65536.0), 65535.0));
  c.p.drop_scale = float(1.0 / (1.0 - dropout_p));
}

// Validates the common arguments of attn_fwd / attn_bwd (ValueError / TypeError naming the argument) and
// fills everything of Params but the output pointers.
inline Checked check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& alibi, const std::optional<at::Tensor>& cu_q,
                            const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale,
                            int64_t win_left, int64_t win_right, double softcap, bool bottom_right) {
  check_device(q, "q");
  check_device(k, "k", &q);
  check_device(v, "v", &q);
  const DType dt = dtype_of(q, "q");
  TORCH_CHECK_TYPE(dt != DType::f32, "q must be float16 or bfloat16 for the CUDA attention kernels, got float32");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "k and v must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  const bool varlen = cu_q.has_value();
  const int64_t rank = varlen ? 3 : 4;
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}})
    TORCH_CHECK_VALUE(t->dim() == rank, name, " must have ", rank, " dims (", varlen ? "[total, H, D]" : "[B, N, H, D]",
                      "), got shape ", t->sizes());
  const int64_t d = q.size(-1);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.size(-1) == d, "k must have q's head dim ", d, ", got ", k.size(-1));
  TORCH_CHECK_VALUE(d >= 8 && d % 8 == 0, "head dim (q.shape[-1]) must be a positive multiple of 8 for the CUDA "
                    "kernels (the Python wrapper pads other head dims), got ", d);
  TORCH_CHECK_VALUE(tf::attention::attn_padded_head_dim(int(d)) > 0, "head dim (q.shape[-1]) ", d,
                    " exceeds every head dim compiled into this build (TILEFORMER_CUDA_HEADDIMS)");
  const int64_t hq = q.size(-2), hkv = k.size(-2);
  TORCH_CHECK_VALUE(hkv >= 1 && hq % hkv == 0, "the number of query heads (", hq,
                    ") must be a multiple of the number of KV heads (", hkv, ")");
  TORCH_CHECK_VALUE(hq <= 65535, "at most 65535 query heads, got ", hq);
  TORCH_CHECK_VALUE(max_q >= 0 && max_k >= 0 && max_q <= tf::attention::kMaxTokens &&
                    max_k <= tf::attention::kMaxTokens,
                    "max_seqlen_q and max_seqlen_k must be in 0..2^31-1024, got ", max_q, " and ", max_k);
  TORCH_CHECK_VALUE(win_left >= -1 && win_right >= -1, "window sizes must be >= -1, got (", win_left, ", ",
                    win_right, ")");
  TORCH_CHECK_VALUE(softcap >= 0, "softcap must be >= 0, got ", softcap);
  int64_t batch;
  Checked c;
  if (varlen) {
    for (auto [t, name] : {std::pair{&*cu_q, "cu_seqlens_q"}, std::pair{&*cu_k, "cu_seqlens_k"}}) {
      check_device(*t, name, &q);
      TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, name, " must be int32, got ", t->scalar_type());
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) >= 2, name, " must be 1-D with batch + 1 >= 2 entries, got shape ",
                        t->sizes());
    }
    TORCH_CHECK_VALUE(cu_q->size(0) == cu_k->size(0), "cu_seqlens_q and cu_seqlens_k must have the same length, got ",
                      cu_q->size(0), " and ", cu_k->size(0));
    batch = cu_q->size(0) - 1;
    c.cu_q = cu_q->contiguous();
    c.cu_k = cu_k->contiguous();
    TORCH_CHECK_VALUE(q.size(0) <= tf::attention::kMaxTokens && k.size(0) <= tf::attention::kMaxTokens,
                      "varlen q and k must have at most 2^31-1024 packed tokens, got ", q.size(0), " and ", k.size(0));
  } else {
    batch = q.size(0);
    TORCH_CHECK_VALUE(k.size(0) == batch, "k must have q's batch size ", batch, ", got ", k.size(0));
    TORCH_CHECK_VALUE(max_q == q.size(1) && max_k == k.size(1), "max_seqlen_q / max_seqlen_k must equal Nq = ",
                      q.size(1), " and Nk = ", k.size(1), " for dense inputs, got ", max_q, " and ", max_k);
  }
  TORCH_CHECK_VALUE(batch <= 65535, "at most 65535 sequences, got ", batch);
  if (alibi) {
    check_device(*alibi, "alibi_slopes", &q);
    TORCH_CHECK_TYPE(alibi->scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", alibi->scalar_type());
    const bool ok = (alibi->dim() == 1 && alibi->size(0) == hq) ||
                    (alibi->dim() == 2 && alibi->size(0) == batch && alibi->size(1) == hq);
    TORCH_CHECK_VALUE(ok, "alibi_slopes must have shape [", hq, "] or [", batch, ", ", hq, "], got ", alibi->sizes());
    c.alibi = alibi->contiguous();
  }
  c.q = aligned(q);
  c.k = aligned(k);
  c.v = aligned(v);

  auto& p = c.p;
  const int o = varlen ? 1 : 0;   // dim shift: varlen tensors have no batch dim
  p.q = c.q.data_ptr();
  p.k = c.k.data_ptr();
  p.v = c.v.data_ptr();
  p.alibi = alibi ? c.alibi.data_ptr<float>() : nullptr;
  p.cu_q = varlen ? c.cu_q.data_ptr<int>() : nullptr;
  p.cu_k = varlen ? c.cu_k.data_ptr<int>() : nullptr;
  p.stride_qb = varlen ? 0 : stride_or0(c.q, 0);
  p.stride_qm = stride_or0(c.q, 1 - o);
  p.stride_qh = stride_or0(c.q, 2 - o);
  p.stride_kb = varlen ? 0 : stride_or0(c.k, 0);
  p.stride_kn = stride_or0(c.k, 1 - o);
  p.stride_kh = stride_or0(c.k, 2 - o);
  p.stride_vb = varlen ? 0 : stride_or0(c.v, 0);
  p.stride_vn = stride_or0(c.v, 1 - o);
  p.stride_vh = stride_or0(c.v, 2 - o);
  p.stride_ab = alibi && alibi->dim() == 2 ? hq : 0;
  p.stride_ah = 1;
  p.batch = int(batch);
  p.hq = int(hq);
  p.hkv = int(hkv);
  p.group = int(hq / hkv);
  p.max_q = int(max_q);
  p.max_k = int(max_k);
  p.total_q = varlen ? q.size(0) : batch * max_q;
  p.total_k = varlen ? k.size(0) : batch * max_k;
  p.head_dim = int(d);
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.win_left = int(std::max<int64_t>(win_left, 0));
  p.win_right = int(std::max<int64_t>(win_right, 0));
  p.mask_left = win_left >= 0;
  p.mask_right = win_right >= 0;
  p.bottom_right = bottom_right;
  p.varlen = varlen;
  p.dtype = dt;
  TORCH_CHECK_VALUE(win_left < (int64_t(1) << 31) && win_right < (int64_t(1) << 31),
                    "window sizes must be < 2^31 (use -1 for unbounded)");
  return c;
}

inline std::vector<int64_t> lse_shape(const tf::attention::Params& p) {
  if (p.varlen) return {p.hq, p.total_q};
  return {p.batch, p.hq, p.max_q};
}

inline std::tuple<at::Tensor, at::Tensor> attn_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right,
    double softcap, bool bottom_right, bool deterministic, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  (void)deterministic;   // carried to the backward by the autograd
  Checked c = check_common(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, window_left, window_right, softcap, bottom_right);
  check_dropout(c, q, dropout_p, rng_state);
  DeviceGuard guard(q);
  at::Tensor out = empty(q.sizes(), q.scalar_type(), q);
  at::Tensor lse = empty(lse_shape(c.p), at::kFloat, q);
  auto& p = c.p;
  const int o = p.varlen ? 1 : 0;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.stride_ob = p.varlen ? 0 : stride_or0(out, 0);
  p.stride_om = stride_or0(out, 1 - o);
  p.stride_oh = stride_or0(out, 2 - o);
  const KernelMemory memory({{"q", &c.q}, {"k", &c.k}, {"v", &c.v}, {"alibi_slopes", &c.alibi},
                             {"cu_seqlens_q", &c.cu_q}, {"cu_seqlens_k", &c.cu_k}, {"rng_state", &c.rng},
                             {"out", &out}, {"lse", &lse}});
  if (out.numel() > 0 || lse.numel() > 0) tf::attention::attn_fwd(p, stream_for(q));
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right,
    double softcap, bool bottom_right, bool deterministic, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  Checked c = check_common(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, window_left, window_right, softcap, bottom_right);
  check_dropout(c, q, dropout_p, rng_state);
  auto& p = c.p;
  check_device(dout, "dout", &q);
  check_device(out, "out", &q);
  check_device(lse, "lse", &q);
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape ",
                    q.sizes(), ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "dout and out must have q's dtype ", q.scalar_type());
  const auto ls = lse_shape(p);
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(ls), "lse must have shape ", at::IntArrayRef(ls), ", got ",
                    lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  at::Tensor dlse_c;
  if (dlse) {
    check_device(*dlse, "dlse", &q);
    TORCH_CHECK_VALUE(dlse->sizes() == lse.sizes(), "dlse must have lse's shape ", lse.sizes(), ", got ",
                      dlse->sizes());
    dlse_c = dlse->to(at::kFloat).contiguous();
  }
  DeviceGuard guard(q);
  const at::Tensor dout_c = aligned(dout), out_c = out.contiguous(), lse_c = lse.contiguous();
  at::Tensor dq = empty(q.sizes(), q.scalar_type(), q);
  at::Tensor dk = empty(k.sizes(), k.scalar_type(), q);
  at::Tensor dv = empty(v.sizes(), v.scalar_type(), q);
  at::Tensor delta = empty(ls, at::kFloat, q);
  // deterministic = false, and every call whose sequences have at most kLocalDeltaKeys keys (then one atomic add
  // per element: deterministic too; see attention/bwd.cuh): dQ by fp32 atomics into this workspace (zeroed by the
  // launcher)
  p.local_delta = p.max_k <= tf::attention::kLocalDeltaKeys;
  const bool atomic = !deterministic || p.local_delta;
  at::Tensor dq_accum = atomic ? empty(q.sizes(), at::kFloat, q) : at::Tensor();
  const int o = p.varlen ? 1 : 0;
  p.out = out_c.data_ptr();
  p.lse = lse_c.data_ptr<float>();
  p.stride_ob = p.varlen ? 0 : stride_or0(out_c, 0);
  p.stride_om = stride_or0(out_c, 1 - o);
  p.stride_oh = stride_or0(out_c, 2 - o);
  p.dout = dout_c.data_ptr();
  p.stride_dob = p.varlen ? 0 : stride_or0(dout_c, 0);
  p.stride_dom = stride_or0(dout_c, 1 - o);
  p.stride_doh = stride_or0(dout_c, 2 - o);
  p.dlse = dlse ? dlse_c.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_accum = atomic ? dq_accum.data_ptr<float>() : nullptr;
  if (!p.varlen && (p.max_q == 0 || p.max_k == 0)) {   // nothing attends: every gradient is 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const KernelMemory memory({{"q", &c.q}, {"k", &c.k}, {"v", &c.v}, {"alibi_slopes", &c.alibi},
                             {"cu_seqlens_q", &c.cu_q}, {"cu_seqlens_k", &c.cu_k}, {"rng_state", &c.rng},
                             {"dout", &dout_c}, {"out", &out_c},
                             {"lse", &lse_c}, {"dlse", dlse ? &dlse_c : nullptr}, {"delta", &delta}, {"dq", &dq},
                             {"dk", &dk}, {"dv", &dv}, {"dq_accum", atomic ? &dq_accum : nullptr}});
  tf::attention::attn_bwd(p, stream_for(q));
  return {dq, dk, dv};
}

inline std::vector<int64_t> attn_head_dims() {
  int dims[16];
  const int n = tf::attention::attn_head_dims(dims, 16);
  return std::vector<int64_t>(dims, dims + (n < 16 ? n : 16));
}

// "" when the sm_90a forward can serve (head dim, varlen, max_seqlen_k; -1: not known, dropout) here, else why
// not.
inline std::string attn_fwd_sm90_reason(int64_t head_dim, bool varlen, int64_t max_seqlen_k, bool dropout) {
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= 1024, "head_dim must be in 1..1024, got ", head_dim);
  return tf::attention::attn_fwd_sm90_reason(int(head_dim), varlen, max_seqlen_k, dropout);
}

// The same for the sm_90a backward (and deterministic).
inline std::string attn_bwd_sm90_reason(int64_t head_dim, bool varlen, int64_t max_seqlen_k, bool dropout,
                                        bool deterministic) {
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= 1024, "head_dim must be in 1..1024, got ", head_dim);
  const bool local = max_seqlen_k >= 0 && max_seqlen_k <= tf::attention::kLocalDeltaKeys;   // as attn_bwd
  return tf::attention::attn_bwd_sm90_reason(int(head_dim), varlen, max_seqlen_k, dropout, deterministic, local);
}

inline int64_t attn_fwd_sm90_verified(int64_t state) {
  return tf::attention::attn_fwd_sm90_verified(int(state));
}

inline void define(torch::Library& m) {
  m.def("attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, int window_right, float softcap, "
        "bool bottom_right, bool deterministic=False, float dropout_p=0., Tensor? rng_state=None) -> (Tensor, Tensor)");
  m.def("attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
        "Tensor? alibi_slopes, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
        "float softmax_scale, int window_left, int window_right, float softcap, bool bottom_right, "
        "bool deterministic=False, float dropout_p=0., Tensor? rng_state=None) -> (Tensor, Tensor, Tensor)");
  // Tensor-less: which head dims this build instantiated (the dispatcher pads up to one of them).
  m.def("attn_head_dims() -> int[]", &attn_head_dims);
  // Tensor-less: the sm_90a forward's limits on this build / device (attention.h), and its hardware check state
  // (-1 not run, 0 failed, 1 passed; state 0 / 1 records a result, -1 only reads).
  m.def("attn_fwd_sm90_reason(int head_dim, bool varlen, int max_seqlen_k, bool dropout=False) -> str",
        &attn_fwd_sm90_reason);
  m.def("attn_fwd_sm90_verified(int state) -> int", &attn_fwd_sm90_verified);
  m.def("attn_bwd_sm90_reason(int head_dim, bool varlen, int max_seqlen_k, bool dropout=False, "
        "bool deterministic=False) -> str", &attn_bwd_sm90_reason);
}

inline void impl(torch::Library& m) {
  m.impl("attn_fwd", &attn_fwd);
  m.impl("attn_bwd", &attn_bwd);
}

}  // namespace tf::attention_bindings
