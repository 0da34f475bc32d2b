// Torch binding of the decode kernels: torch.ops.<ns>.decode_attention. The op contract shared with the Triton
// backend, and the fake, are in transformer/ops/decode.py.
//
//   decode_attention(q, k_cache!, v_cache!, cache_seqlens, k?, v?, block_table?, alibi_slopes?, softmax_scale,
//                    window_left, window_right, softcap, num_splits, k_scale!?=None, v_scale!?=None,
//                    rotary_cos?=None, rotary_sin?=None, rotary_interleaved=False)
//       -> (out [B, Sq, Hq, D], lse [B, Hq, Sq])
//
// k_cache / v_cache: q's dtype, or int8 / float8_e4m3fn with fp32 k_scale / v_scale (the cache's shape without D,
// any strides), written with the quantized appends (decode/decode.h).
// rotary_cos / rotary_sin [seqlen_ro >= capacity, rotary_dim / 2] (float32 / float16 / bfloat16, any strides; k / v
// required): the append kernels rotate the new keys and write the rotated q into a buffer the split kernel reads
// (decode/decode.h); query i turns at cache_seqlens + i when a window side (causal: right 0) is in
// [0, capacity), else at cache_seqlens.
// window_* = -1 is unbounded (causal is window_right = 0); a window wider than the cache plus the new tokens
// sees every token, so sizes are clamped to that before they are narrowed to 32 bits.
// With k/v the new tokens are written into the caches in place first. num_splits = 0 picks a count on the host
// from shapes and the (cached) SM count: nothing here reads device memory on the host. Any values of
// cache_seqlens and block_table are safe (decode/decode.h: clamped lengths, invalid pages hold no visible
// token). cache_seqlens may have any stride and block_table any strides (cache_seqlens, and a block_table whose
// columns are not contiguous, are read through a contiguous copy; block_table's row stride is passed as is).
#pragma once

#include <algorithm>
#include <limits>
#include <optional>

#include "common/bindings.h"
#include "decode/decode.h"

namespace tf::decode_bindings {

using namespace tf::bind;

inline void check_half(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
                   " must be float16 or bfloat16 for the cuda decode kernel, got ", t.scalar_type());
}

inline void check_rank4(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(3) <= 1 || t.stride(3) == 1, name, " must have a contiguous last dim, got strides ",
                    t.strides());
}

// 16-byte cp.async is legal when every row of the cache starts on 16 bytes.
inline bool rows_aligned16(const at::Tensor& t) {
  const int64_t per = 16 / int64_t(t.element_size());   // elements per 16 bytes
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || t.size(3) % per != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (t.size(i) > 1 && t.stride(i) % per != 0) return false;
  return true;
}

inline tf::decode::KvFormat kv_format(const at::Tensor& cache) {
  if (cache.scalar_type() == at::kChar) return tf::decode::KvFormat::int8;
  if (cache.scalar_type() == at::kFloat8_e4m3fn) return tf::decode::KvFormat::fp8e4m3;
  return tf::decode::KvFormat::same;
}

// The scales of a quantized cache: fp32, the cache's shape without D, on q's device; absent for a 16-bit cache.
inline void check_scale(const std::optional<at::Tensor>& sc, const at::Tensor& cache, bool quantized, const char* name,
                        const at::Tensor& q) {
  if (!quantized) {
    TORCH_CHECK_VALUE(!sc.has_value(), name, " is only for a quantized (int8 / float8_e4m3fn) cache, got a ",
                      cache.scalar_type(), " cache");
    return;
  }
  TORCH_CHECK_VALUE(sc.has_value(), name, " is required with a quantized (", cache.scalar_type(), ") cache");
  check_device(*sc, name, &q);
  TORCH_CHECK_TYPE(sc->scalar_type() == at::kFloat, name, " must be float32, got ", sc->scalar_type());
  TORCH_CHECK_VALUE(sc->dim() == 3 && sc->sizes() == cache.sizes().slice(0, 3), name, " must have shape ",
                    cache.sizes().slice(0, 3), " (the cache's without D), got ", sc->sizes());
}

constexpr int64_t kMaxCapacity = (int64_t(1) << 31) - 1024;

inline std::tuple<at::Tensor, at::Tensor> decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& block_table, const std::optional<at::Tensor>& alibi_slopes,
    double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    int64_t num_splits, const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved) {
  check_device(q, "q");
  check_half(q, "q");
  check_rank4(q, "q");
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(Sq >= 1 && Sq <= 16, "q must have 1..16 queries per sequence (q.shape[1]), got ", Sq);
  TORCH_CHECK_VALUE(D >= 1 && D <= 256, "head dim (q.shape[-1]) must be in 1..256, got ", D);
  const tf::decode::KvFormat kv = kv_format(k_cache);
  const bool quantized = kv != tf::decode::KvFormat::same;
  for (auto [t, name] : {std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"}}) {
    check_device(*t, name, &q);
    check_rank4(*t, name);
    if (quantized) {
      TORCH_CHECK_TYPE(t->scalar_type() == k_cache.scalar_type(), name, " must have k_cache's dtype ",
                       k_cache.scalar_type(), ", got ", t->scalar_type());
    } else {
      TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(),
                       " (or be int8 / float8_e4m3fn with k_scale / v_scale), got ", t->scalar_type());
    }
  }
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape, got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  check_scale(k_scale, k_cache, quantized, "k_scale", q);
  check_scale(v_scale, v_cache, quantized, "v_scale", q);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "k_cache head dim must equal q's (", D, "), got ", k_cache.size(3));
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "the number of query heads (q: ", Hq,
                    ") must be a multiple of the number of key/value heads (k_cache: ", Hkv, ")");
  const bool paged = block_table.has_value();
  int64_t page_size = 1, capacity = k_cache.size(1);
  at::Tensor bt;
  if (paged) {
    check_device(*block_table, "block_table", &q);
    TORCH_CHECK_TYPE(block_table->scalar_type() == at::kInt, "block_table must be int32, got ",
                     block_table->scalar_type());
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == B, "block_table must have shape [B=", B,
                      ", max_pages], got ", block_table->sizes());
    bt = block_table->size(1) <= 1 || block_table->stride(1) == 1 ? *block_table : block_table->contiguous();
    page_size = k_cache.size(1);
    capacity = bt.size(1) * page_size;
    TORCH_CHECK_VALUE(page_size >= 1, "k_cache page size (k_cache.shape[1]) must be >= 1");
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == B, "k_cache must have shape [B=", B,
                      ", S_max, Hkv, D] (or pass block_table for a paged cache), got ", k_cache.sizes());
  }
  // 32-bit token indices in the kernels, with room for the tiles past the end of a range.
  TORCH_CHECK_VALUE(capacity <= kMaxCapacity, "the cache capacity per sequence must be at most 2^31 - 1024, got ",
                    capacity);
  const int num_pages = int(std::min<int64_t>(k_cache.size(0), std::numeric_limits<int>::max()));
  check_device(cache_seqlens, "cache_seqlens", &q);
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ",
                   cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens must have shape [B=", B,
                    "], got ", cache_seqlens.sizes());
  const at::Tensor lens = cache_seqlens.contiguous();
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), "k and v must be given together (new tokens to append) or both be None");
  if (k) {
    for (auto [t, name] : {std::pair{&*k, "k"}, std::pair{&*v, "v"}}) {
      check_device(*t, name, &q);
      check_rank4(*t, name);
      TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                       t->scalar_type());
      TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({B, Sq, Hkv, D}), name, " must have shape [B, Sq, Hkv, D]=[",
                        B, ", ", Sq, ", ", Hkv, ", ", D, "], got ", t->sizes());
    }
    TORCH_CHECK_VALUE(Sq <= capacity, "the cache holds at most ", capacity, " tokens per sequence, too few to append ",
                      Sq, " new tokens (k)");
  }
  if (alibi_slopes) {
    check_device(*alibi_slopes, "alibi_slopes", &q);
    TORCH_CHECK_TYPE(alibi_slopes->scalar_type() == at::kFloat, "alibi_slopes must be float32, got ",
                     alibi_slopes->scalar_type());
    const bool ok = (alibi_slopes->dim() == 1 && alibi_slopes->size(0) == Hq) ||
                    (alibi_slopes->dim() == 2 && alibi_slopes->size(0) == B && alibi_slopes->size(1) == Hq);
    TORCH_CHECK_VALUE(ok, "alibi_slopes must have shape [Hq]=[", Hq, "] or [B, Hq]=[", B, ", ", Hq, "], got ",
                      alibi_slopes->sizes());
  }
  const bool rotary = rotary_cos.has_value() || rotary_sin.has_value();
  if (rotary) {
    TORCH_CHECK_VALUE(rotary_cos.has_value() && rotary_sin.has_value(), "rotary_cos and rotary_sin must be given "
                      "together");
    TORCH_CHECK_VALUE(k.has_value(), "rotary_cos / rotary_sin rotate the appended keys: pass k and v with them");
    for (auto [t, name] : {std::pair{&*rotary_cos, "rotary_cos"}, std::pair{&*rotary_sin, "rotary_sin"}}) {
      check_device(*t, name, &q);
      dtype_of(*t, name);
      TORCH_CHECK_VALUE(t->dim() == 2 && t->sizes() == rotary_cos->sizes() && t->size(0) >= capacity &&
                        t->size(1) >= 1 && 2 * t->size(1) <= D, name, " must have shape [seqlen_ro >= ", capacity,
                        ", rotary_dim / 2 <= ", D / 2, "] (rotary_cos's), got ", t->sizes());
    }
    TORCH_CHECK_TYPE(rotary_sin->scalar_type() == rotary_cos->scalar_type(), "rotary_sin must have rotary_cos's "
                     "dtype ", rotary_cos->scalar_type(), ", got ", rotary_sin->scalar_type());
    TORCH_CHECK_VALUE(Hq <= 65535, "rotary embeddings take at most 65535 query heads, got ", Hq);
  }
  TORCH_CHECK_VALUE(softmax_scale > 0, "softmax_scale must be > 0, got ", softmax_scale);
  TORCH_CHECK_VALUE(softcap >= 0, "softcap must be >= 0, got ", softcap);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "window_size entries must be >= -1, got (", window_left,
                    ", ", window_right, ")");
  TORCH_CHECK_VALUE(num_splits >= 0 && num_splits <= tf::decode::kMaxSplits, "num_splits must be in 0..",
                    tf::decode::kMaxSplits, " (0 = choose automatically), got ", num_splits);

  DeviceGuard guard(q);
  const cudaStream_t stream = stream_for(q);
  const DType dt = dtype_of(q, "q");
  at::Tensor out = empty({B, Sq, Hq, D}, q.scalar_type(), q);
  at::Tensor lse = empty({B, Hq, Sq}, at::kFloat, q);
  if (B == 0) return {out, lse};
  at::Tensor q_rot = rotary ? empty({B, Sq, Hq, D}, q.scalar_type(), q) : at::Tensor();   // the rotated q

  const int group = int(Hq / Hkv);
  int splits = int(num_splits);
  if (splits == 0) splits = tf::decode::plan_num_splits(int(B), int(Hkv), group, int(Sq), int(D), int(capacity), stream);
  const int d_pad = tf::decode::partial_dim(int(D));
  const int64_t part_rows = splits > 1 ? B * Hq * Sq * splits : 0;
  at::Tensor out_part = empty({part_rows * d_pad}, at::kFloat, q);
  at::Tensor lse_part = empty({part_rows}, at::kFloat, q);
  const KernelMemory memory({{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"cache_seqlens", &lens},
                             {"k", opt(k)}, {"v", opt(v)}, {"block_table", paged ? &bt : nullptr},
                             {"alibi_slopes", opt(alibi_slopes)}, {"out", &out}, {"lse", &lse},
                             {"out_part", &out_part}, {"lse_part", &lse_part}, {"k_scale", opt(k_scale)},
                             {"v_scale", opt(v_scale)}, {"rotary_cos", opt(rotary_cos)},
                             {"rotary_sin", opt(rotary_sin)}, {"q_rot", rotary ? &q_rot : nullptr}});
  const auto scale_strides = [&](const std::optional<at::Tensor>& sc, int64_t& sb, int64_t& ss, int64_t& sh) {
    sb = sc ? sc->stride(0) : 0;
    ss = sc ? sc->stride(1) : 0;
    sh = sc ? sc->stride(2) : 0;
  };

  if (k) {
    tf::decode::AppendParams a{};
    a.k = k->data_ptr();
    a.v = v->data_ptr();
    a.k_cache = k_cache.data_ptr();
    a.v_cache = v_cache.data_ptr();
    a.cache_seqlens = lens.data_ptr<int>();
    a.block_table = paged ? bt.data_ptr<int>() : nullptr;
    a.stride_kb = k->stride(0); a.stride_ks = k->stride(1); a.stride_kh = k->stride(2);
    a.stride_vb = v->stride(0); a.stride_vs = v->stride(1); a.stride_vh = v->stride(2);
    a.stride_kcb = k_cache.stride(0); a.stride_kcs = k_cache.stride(1); a.stride_kch = k_cache.stride(2);
    a.stride_vcb = v_cache.stride(0); a.stride_vcs = v_cache.stride(1); a.stride_vch = v_cache.stride(2);
    a.stride_btb = paged ? bt.stride(0) : 0;
    a.k_scale = k_scale ? k_scale->data_ptr<float>() : nullptr;
    a.v_scale = v_scale ? v_scale->data_ptr<float>() : nullptr;
    scale_strides(k_scale, a.stride_ksb, a.stride_kss, a.stride_ksh);
    scale_strides(v_scale, a.stride_vsb, a.stride_vss, a.stride_vsh);
    a.batch = int(B); a.sq = int(Sq); a.hkv = int(Hkv); a.head_dim = int(D);
    a.capacity = int(capacity);
    a.page_size = int(page_size);
    a.num_pages = num_pages;
    a.dtype = dt;
    a.kv = kv;
    if (rotary) {
      a.q = q.data_ptr();
      a.q_rot = q_rot.data_ptr();
      a.rotary_cos = rotary_cos->data_ptr();
      a.rotary_sin = rotary_sin->data_ptr();
      a.stride_qb = q.stride(0); a.stride_qs = q.stride(1); a.stride_qh = q.stride(2);
      a.stride_rb = q_rot.stride(0); a.stride_rs = q_rot.stride(1); a.stride_rh = q_rot.stride(2);
      a.stride_cr = rotary_cos->stride(0); a.stride_cd = rotary_cos->stride(1);
      a.stride_sr = rotary_sin->stride(0); a.stride_sd = rotary_sin->stride(1);
      a.hq = int(Hq);
      a.rotary_dim = int(2 * rotary_cos->size(1));
      a.seqlen_ro = int(std::min<int64_t>(rotary_cos->size(0), std::numeric_limits<int>::max()));
      a.rotary_interleaved = rotary_interleaved;
      const auto local = [&](int64_t w) { return w >= 0 && w < capacity; };
      a.q_per_token = local(window_left) || local(window_right);
      a.rotary_dtype = dtype_of(*rotary_cos, "rotary_cos");
    }
    tf::decode::decode_append(a, stream);
  }
  const at::Tensor& q_in = rotary ? q_rot : q;   // what the split kernel reads

  tf::decode::Params p{};
  p.q = q_in.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cache_seqlens = lens.data_ptr<int>();
  p.block_table = paged ? bt.data_ptr<int>() : nullptr;
  p.alibi = alibi_slopes ? alibi_slopes->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_part = splits > 1 ? out_part.data_ptr<float>() : nullptr;
  p.lse_part = splits > 1 ? lse_part.data_ptr<float>() : nullptr;
  p.stride_qb = q_in.stride(0); p.stride_qs = q_in.stride(1); p.stride_qh = q_in.stride(2);
  p.stride_kb = k_cache.stride(0); p.stride_ks = k_cache.stride(1); p.stride_kh = k_cache.stride(2);
  p.stride_vb = v_cache.stride(0); p.stride_vs = v_cache.stride(1); p.stride_vh = v_cache.stride(2);
  p.stride_btb = paged ? bt.stride(0) : 0;
  p.k_scale = k_scale ? k_scale->data_ptr<float>() : nullptr;
  p.v_scale = v_scale ? v_scale->data_ptr<float>() : nullptr;
  scale_strides(k_scale, p.stride_ksb, p.stride_kss, p.stride_ksh);
  scale_strides(v_scale, p.stride_vsb, p.stride_vss, p.stride_vsh);
  p.stride_ab = alibi_slopes && alibi_slopes->dim() == 2 ? alibi_slopes->stride(0) : 0;
  p.stride_ah = alibi_slopes ? alibi_slopes->stride(-1) : 0;
  p.stride_ob = out.stride(0); p.stride_os = out.stride(1); p.stride_oh = out.stride(2);
  p.batch = int(B); p.sq = int(Sq); p.hq = int(Hq); p.hkv = int(Hkv); p.head_dim = int(D);
  p.capacity = int(capacity);
  p.page_size = int(page_size);
  p.num_pages = num_pages;
  p.num_appended = k ? int(Sq) : 0;
  p.softmax_scale = float(softmax_scale);
  p.softcap = float(softcap);
  const int64_t widest = std::min<int64_t>(capacity + Sq, std::numeric_limits<int>::max());
  p.window_left = window_left < 0 ? -1 : int(std::min(window_left, widest));
  p.window_right = window_right < 0 ? -1 : int(std::min(window_right, widest));
  p.num_splits = splits;
  p.vec_loads = rows_aligned16(k_cache) && rows_aligned16(v_cache);
  p.dtype = dt;
  p.kv = kv;
  tf::decode::decode_attention(p, stream);
  return {out, lse};
}

inline void define(torch::Library& m) {
  m.def("decode_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k, "
        "Tensor? v, Tensor? block_table, Tensor? alibi_slopes, float softmax_scale, int window_left, "
        "int window_right, float softcap, int num_splits, Tensor(c!)? k_scale=None, Tensor(d!)? v_scale=None, "
        "Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=False) -> (Tensor, Tensor)");
}

inline void impl(torch::Library& m) { m.impl("decode_attention", &decode_attention); }

}  // namespace tf::decode_bindings
