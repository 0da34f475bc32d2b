// GQA decode attention over a KV cache (decode/decode.cu): plain parameter structs, no torch, no device code.
//
// Semantics (transformer/decode.py, transformer.reference.decode_attention): q [B, Sq, Hq, D] (1 <= Sq <= 16)
// attends over the first n_b = clamp(cache_seqlens[b] (+ Sq when k/v are appended), 0, capacity) tokens of a
// contiguous cache [B, S_max, Hkv, D] or a paged cache [num_pages, page_size, Hkv, D] addressed through
// block_table [B, max_pages] int32. Query i of a sequence sits at position n_b - Sq + i (bottom-right
// alignment). Query head h reads KV head h / (Hq / Hkv). Every tensor has a contiguous last dim; strides in
// elements.
// Any index values are safe (nothing is read or written outside the tensors, no host sync):
//   * appended token i of sequence b goes to position cache_seqlens[b] + i (64-bit sum); a position outside
//     [0, capacity) is not written;
//   * paged: token t of sequence b lives in page block_table[b, t / page_size]; a page id outside
//     [0, num_pages) holds no visible token (it contributes nothing, as if masked) and appends into it are
//     dropped; block_table[b, j] is read only for j = t / page_size of a visible position t < n_b or of an
//     appended position inside [0, capacity), never for the columns past them.
// Quantized caches (KvFormat int8 / fp8e4m3): k_cache / v_cache hold 8-bit values and k_scale / v_scale one fp32
// scale per (token, KV head), shaped like the cache without D; token t, head h is x[t, h, :] * scale[t, h]
// (transformer.reference.dequantize_kv), dequantized to q's dtype in the kernel. An append quantizes the new
// token as transformer.reference.quantize_kv (scale = amax / 127 or / 448 by IEEE division, 1 where 0; values
// x / scale, IEEE, clamped, rounded to nearest even) and writes values and scale under the rules above.
// Rotary embedding (AppendParams::rotary_dim > 0, tables rotary_cos / rotary_sin [seqlen_ro, rotary_dim / 2] of
// any float dtype): the append kernels rotate new key s of sequence b at position cache_seqlens[b] + s before
// it is stored or quantized (rounded to k's dtype first), and write query s of every query head, rotated at
// cache_seqlens[b] + s (q_per_token) or cache_seqlens[b], into q_rot, which the split kernel then reads as q.
// Pairs (j, j + rotary_dim / 2), or (2j, 2j + 1) when interleaved, turn by row[j]: x * c - y * s for the first
// of a pair, x * c + y * s for the second, each product and sum rounded once in fp32
// (transformer.nn.rope.apply_rotary, bit for bit); dims >= rotary_dim pass through. Table rows are clamped to
// [0, seqlen_ro) (seqlen_ro >= capacity is host-checked, so only invalid cache_seqlens reach the clamp); every
// query row is written whether or not its key lands in the cache.
#pragma once

#include "common/types.h"

namespace tf::decode {

// Largest split count (the combine kernel keeps a sequence's split weights in shared memory).
constexpr int kMaxSplits = 128;

// Storage of the K/V cache: 16-bit values of q's dtype, or 8-bit values with fp32 scales per (token, KV head).
enum class KvFormat : int { same = 0, int8 = 1, fp8e4m3 = 2 };

struct AppendParams {
  gptr<const void> k;             // [B, Sq, Hkv, D] new keys
  gptr<const void> v;             // [B, Sq, Hkv, D] new values
  gptr<void> k_cache;             // contiguous [B, S_max, Hkv, D] or paged [num_pages, page_size, Hkv, D]
  gptr<void> v_cache;
  gptr<const int> cache_seqlens;  // [B]
  gptr<const int> block_table;    // [B, max_pages] or null (contiguous)
  gptr<float> k_scale;            // quantized caches: [B, S_max, Hkv] or [num_pages, page_size, Hkv]; else null
  gptr<float> v_scale;
  int64_t stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh;
  int64_t stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch;
  int64_t stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh;
  int64_t stride_btb;
  int batch, sq, hkv, head_dim;
  int capacity;                   // tokens one sequence can hold (S_max, or max_pages * page_size)
  int page_size;                  // 1 when contiguous
  int num_pages;                  // paged: k_cache.shape[0] (valid page ids 0..num_pages-1)
  DType dtype;                    // of k / v: f16 or bf16
  KvFormat kv;                    // of the caches: same (copy) or int8 / fp8e4m3 (quantize)
  // Rotary embedding (rotary_dim > 0; else the pointers are null)
  gptr<const void> q;             // [B, Sq, Hq, D], k's dtype
  gptr<void> q_rot;               // [B, Sq, Hq, D] rotated q
  gptr<const void> rotary_cos;    // [seqlen_ro, rotary_dim / 2], rotary_dtype
  gptr<const void> rotary_sin;
  int64_t stride_qb, stride_qs, stride_qh, stride_rb, stride_rs, stride_rh;
  int64_t stride_cr, stride_cd, stride_sr, stride_sd;
  int hq;                         // query heads
  int rotary_dim;                 // even, <= head_dim; 0: no rotary
  int seqlen_ro;                  // table rows (>= 1)
  bool rotary_interleaved;        // pairs (2j, 2j + 1), else (j, j + rotary_dim / 2)
  bool q_per_token;               // query s at cache_seqlens + s, else at cache_seqlens
  DType rotary_dtype;             // of the tables
};

struct Params {
  gptr<const void> q;             // [B, Sq, Hq, D]
  gptr<const void> k_cache;       // as AppendParams
  gptr<const void> v_cache;
  gptr<const int> cache_seqlens;  // [B]
  gptr<const int> block_table;    // [B, max_pages] or null (contiguous)
  gptr<const float> alibi;        // [Hq] (stride_ab = 0) or [B, Hq], or null
  gptr<void> out;                 // [B, Sq, Hq, D] dtype
  gptr<float> lse;                // [B, Hq, Sq] natural log; -inf for rows that see no key
  gptr<float> out_part;           // [B * Hq * Sq, num_splits, partial_dim(D)] fp32 workspace (num_splits > 1)
  gptr<float> lse_part;           // [B * Hq * Sq, num_splits] fp32 workspace, log2 units (num_splits > 1)
  gptr<const float> k_scale;      // quantized caches: as AppendParams; else null
  gptr<const float> v_scale;
  int64_t stride_qb, stride_qs, stride_qh;
  int64_t stride_kb, stride_ks, stride_kh;   // k cache: dim 0 is the batch (contiguous) or the page (paged)
  int64_t stride_vb, stride_vs, stride_vh;
  int64_t stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh;   // scales (quantized)
  int64_t stride_btb;
  int64_t stride_ab, stride_ah;
  int64_t stride_ob, stride_os, stride_oh;
  int batch, sq, hq, hkv, head_dim;
  int capacity, page_size;
  int num_pages;                  // paged: k_cache.shape[0] (valid page ids 0..num_pages-1)
  int num_appended;          // Sq when k/v were appended before this call, else 0
  float softmax_scale;
  float softcap;             // 0: none
  int window_left;           // -1: unbounded
  int window_right;          // -1: unbounded (causal is window_right = 0)
  int num_splits;            // >= 1 (resolve 0 with plan_num_splits first)
  bool vec_loads;            // every cache row starts on 16 bytes: 16-byte cp.async (else element loads)
  DType dtype;               // of q (and of a 16-bit cache): f16 or bf16
  KvFormat kv;               // of the caches
};

// Padded head dim of the kernel instance serving head_dim (64, 80, 96, 128 or 256): the last dim of
// the out_part workspace. Throws std::invalid_argument for head_dim outside 1..256.
int partial_dim(int head_dim);

// Split count for num_splits = 0 from shapes only (batch, Hkv, rows per KV head, cache capacity) and
// the SM count (queried once per device and cached): no device-to-host copy, CUDA-graph capturable.
// A given result is a pure function of its arguments, so a fixed shape always splits the same way.
int plan_num_splits(int batch, int hkv, int group, int sq, int head_dim, int capacity, cudaStream_t stream);

// Whether the tensor-core kernel (group * Sq > 4) or the CUDA-core kernel serves these shapes.
bool uses_tensor_cores(int group, int sq);

void decode_append(const AppendParams& p, cudaStream_t stream);
// Split kernel (+ the combine kernel when num_splits > 1).
void decode_attention(const Params& p, cudaStream_t stream);

}  // namespace tf::decode
