// LayerNorm / RMSNorm launchers (norms/norms.cu): plain parameter structs, no torch, no device code.
//
// Semantics (transformer/norms.py): h = x (+ residual), summed in fp32; LayerNorm out = (h - mean) * rstd
// * w + b, RMSNorm out = h * rstd * w (mean = 0); out in x's dtype; h stored when asked (fp32 or x's
// dtype); mean (LayerNorm) and rstd saved in fp32 for the backward. Every tensor has a contiguous last
// dim and an arbitrary row stride (elements). Parameters (weight, bias) have x's dtype or fp32.
#pragma once

#include "common/types.h"

namespace tf::norms {

struct FwdParams {
  const void* x;          // [rows, n] dtype
  const void* residual;   // [rows, n] dtype or fp32 (residual_f32), or null
  const void* weight;     // [n] param_dtype or null
  const void* bias;       // [n] param_dtype or null
  void* out;              // [rows, n] dtype
  void* h;                // [rows, n] dtype or fp32 (h_f32), or null
  float* mean;            // [rows] (LayerNorm) or null
  float* rstd;            // [rows]
  int64_t stride_x, stride_res, stride_out, stride_h;  // row strides, elements
  int64_t rows;
  int n;
  float eps;
  bool is_rms, residual_f32, h_f32;
  DType dtype, param_dtype;  // param_dtype: dtype or f32
};

struct BwdParams {
  const void* dy;         // [rows, n] dtype (gradient of out)
  const void* dh;         // [rows, n] dtype or fp32 (dh_f32): gradient of the prenorm h, or null
  const void* x;          // [rows, n] dtype or fp32 (x_f32): x, or the saved fp32 h (then residual is null)
  const void* residual;   // [rows, n] dtype or fp32 (residual_f32), or null
  const void* weight;     // [n] param_dtype or null
  const float* mean;      // [rows] (LayerNorm) or null
  const float* rstd;      // [rows]
  void* dx;               // [rows, n] dtype
  void* dres;             // [rows, n] fp32 (dres_f32) or dtype, or null: a second copy of dx for the residual
  float* dw_part;         // [plan.partial_rows, n] fp32 workspace, or null (no weight gradient)
  float* db_part;         // [plan.partial_rows, n] fp32 workspace, or null (no bias gradient)
  float* row_sums;        // [2, rows] fp32 workspace (plan.row_sums), or null
  float* dw;              // [n] fp32 result, or null
  float* db;              // [n] fp32 result, or null
  int64_t stride_dy, stride_dh, stride_x, stride_res, stride_dx, stride_dres;
  int64_t rows;
  int n;
  bool is_rms, x_f32, residual_f32, dh_f32, dres_f32;
  DType dtype, param_dtype;
};

// Workspace the backward needs for (rows, n, dtype), allocated by the caller.
struct BwdPlan {
  int64_t partial_rows;   // rows of the dW / dB partial-sum buffers ([partial_rows, n] fp32 each)
  bool row_sums;          // needs the [2, rows] fp32 row_sums buffer
};

void norm_fwd(const FwdParams& p, cudaStream_t stream);
BwdPlan norm_bwd_plan(int64_t rows, int n, DType dtype, cudaStream_t stream);
void norm_bwd(const BwdParams& p, const BwdPlan& plan, cudaStream_t stream);

}  // namespace tf::norms
