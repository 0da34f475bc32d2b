// Torch bindings of the LayerNorm / RMSNorm kernels: torch.ops.<ns>.norm_fwd / norm_bwd.
// Same contract as the Triton ops tileformer_triton::norm_fwd / norm_bwd (triton_kernels/norms.py);
// fakes and autograd: transformer/_cuda/norms.py.
#pragma once

#include <optional>

#include "common/bindings.h"
#include "norms/norms.h"

namespace tf::norms_bindings {

using namespace tf::bind;

// [..., n] -> [rows, n] with a contiguous last dim (a copy only when no such view exists).
inline at::Tensor rows_view(const at::Tensor& t, int64_t n) {
  at::Tensor t2 = t.reshape({-1, n});
  if (n > 1 && t2.stride(1) != 1) t2 = t2.contiguous();
  return t2;
}

inline int64_t row_stride(const at::Tensor& t2) { return t2.size(0) > 1 ? t2.stride(0) : t2.size(1); }

// The parameters' common storage type: x's dtype when every parameter has it, else fp32 (converting
// the parameters that differ). Returns (weight, bias, param dtype).
inline std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, DType> params(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t n) {
  auto check = [&](const std::optional<at::Tensor>& p, const char* name) {
    if (!p) return;
    check_device(*p, name, &x);
    dtype_of(*p, name);
    TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == n, name, " must have shape [", n, "] (the last dim of x), got ",
                      p->sizes());
  };
  check(weight, "weight");
  check(bias, "bias");
  const auto st = x.scalar_type();
  const bool same = (!weight || weight->scalar_type() == st) && (!bias || bias->scalar_type() == st);
  const at::ScalarType pt = same ? st : at::kFloat;
  auto conv = [&](const std::optional<at::Tensor>& p) -> std::optional<at::Tensor> {
    if (!p) return std::nullopt;
    return p->to(pt).contiguous();
  };
  return {conv(weight), conv(bias), same ? dtype_of(x, "x") : DType::f32};
}

inline const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps, bool is_rms, bool store_h, bool residual_in_fp32) {
  check_device(x, "x");
  const DType dt = dtype_of(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, "x must have a non-empty last dimension, got shape ", x.sizes());
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
  TORCH_CHECK_VALUE(!(is_rms && bias), "bias must be None for RMSNorm");
  const int64_t n = x.size(-1);
  TORCH_CHECK_VALUE(n <= (int64_t(1) << 30), "the last dim of x must be at most 2^30, got ", n);
  if (residual) {
    check_device(*residual, "residual", &x);
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "residual must have the shape of x ", x.sizes(), ", got ",
                      residual->sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type() || residual->scalar_type() == at::kFloat,
                     "residual must have the dtype of x (", x.scalar_type(), ") or float32, got ",
                     residual->scalar_type());
  }
  auto [w, b, pdt] = params(x, weight, bias, n);
  DeviceGuard guard(x);
  const at::Tensor x2 = rows_view(x, n);
  const int64_t rows = x2.size(0);
  std::optional<at::Tensor> r2;
  if (residual) r2 = rows_view(*residual, n);
  const at::ScalarType h_type = residual_in_fp32 ? at::kFloat : x.scalar_type();
  at::Tensor out = empty({rows, n}, x.scalar_type(), x);
  at::Tensor h = store_h ? empty({rows, n}, h_type, x) : empty({0}, h_type, x);
  at::Tensor mean = empty({is_rms ? 0 : rows}, at::kFloat, x);
  at::Tensor rstd = empty({rows}, at::kFloat, x);

  tf::norms::FwdParams p{};
  p.x = x2.data_ptr();
  p.residual = ptr_or_null(r2);
  p.weight = ptr_or_null(w);
  p.bias = ptr_or_null(b);
  p.out = out.data_ptr();
  p.h = store_h ? h.data_ptr() : nullptr;
  p.mean = is_rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.stride_x = row_stride(x2);
  p.stride_res = r2 ? row_stride(*r2) : 0;
  p.stride_out = n;
  p.stride_h = n;
  p.rows = rows;
  p.n = int(n);
  p.eps = float(eps);
  p.is_rms = is_rms;
  p.residual_f32 = r2 && r2->scalar_type() == at::kFloat;
  p.h_f32 = h_type == at::kFloat;
  p.dtype = dt;
  p.param_dtype = pdt;
  tf::norms::norm_fwd(p, stream_for(x));

  auto lead = x.sizes().slice(0, x.dim() - 1);
  return {out.view(x.sizes()), store_h ? h.view(x.sizes()) : h, is_rms ? mean : mean.view(lead), rstd.view(lead)};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& x,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool is_rms, at::ScalarType dx_dtype, std::optional<at::ScalarType> dres_dtype,
    std::optional<at::ScalarType> dw_dtype, std::optional<at::ScalarType> db_dtype) {
  check_device(dy, "dy");
  check_device(x, "x", &dy);
  const DType dt = dtype_of(dy, "dy");
  const int64_t n = x.dim() >= 1 ? x.size(-1) : 0;
  TORCH_CHECK_VALUE(n >= 1 && dy.sizes() == x.sizes(), "dy must have the shape of x ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dx_dtype == dy.scalar_type(), "dx_dtype must be dy's dtype ", dy.scalar_type(), ", got ", dx_dtype);
  auto check_t_or_f32 = [&](const at::Tensor& t, const char* name) {
    check_device(t, name, &dy);
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == dy.scalar_type() || t.scalar_type() == at::kFloat, name,
                     " must have dy's dtype (", dy.scalar_type(), ") or float32, got ", t.scalar_type());
  };
  check_t_or_f32(x, "x");
  if (dh) check_t_or_f32(*dh, "dh");
  if (residual) check_t_or_f32(*residual, "residual");
  if (dres_dtype)
    TORCH_CHECK_TYPE(*dres_dtype == dy.scalar_type() || *dres_dtype == at::kFloat,
                     "dres_dtype must be dy's dtype or float32, got ", *dres_dtype);
  auto [w, unused_b, pdt] = params(dy, weight, std::nullopt, n);
  (void)unused_b;
  const int64_t rows = x.numel() / n;
  check_device(rstd, "rstd", &dy);
  TORCH_CHECK_TYPE(rstd.scalar_type() == at::kFloat && (is_rms || mean.scalar_type() == at::kFloat),
                   "mean and rstd must be float32");
  TORCH_CHECK_VALUE(rstd.numel() == rows && (is_rms || mean.numel() == rows), "mean and rstd must have ", rows,
                    " elements (one per row), got ", mean.numel(), " and ", rstd.numel());
  DeviceGuard guard(dy);
  const at::Tensor rstd_c = rstd.contiguous(), mean_c = is_rms ? mean : mean.contiguous();
  const at::Tensor x2 = rows_view(x, n), dy2 = rows_view(dy, n);
  std::optional<at::Tensor> dh2, r2;
  if (dh) dh2 = rows_view(*dh, n);
  if (residual) r2 = rows_view(*residual, n);
  at::Tensor dx = empty({rows, n}, dx_dtype, dy);
  at::Tensor dres = dres_dtype ? empty({rows, n}, *dres_dtype, dy) : empty({0}, dx_dtype, dy);
  at::Tensor dw = empty({dw_dtype ? n : 0}, at::kFloat, dy);
  at::Tensor db = empty({db_dtype ? n : 0}, at::kFloat, dy);
  const cudaStream_t stream = stream_for(dy);
  const tf::norms::BwdPlan plan = tf::norms::norm_bwd_plan(rows, int(n), dt, stream);
  at::Tensor dw_part = empty({dw_dtype ? plan.partial_rows : 0, n}, at::kFloat, dy);
  at::Tensor db_part = empty({db_dtype ? plan.partial_rows : 0, n}, at::kFloat, dy);
  at::Tensor row_sums = empty({plan.row_sums ? 2 * rows : 0}, at::kFloat, dy);

  if (rows == 0) {  // no rows: zero gradients of the parameters
    dw.zero_();
    db.zero_();
  }
  tf::norms::BwdParams p{};
  p.dy = dy2.data_ptr();
  p.dh = dh2 ? dh2->data_ptr() : nullptr;
  p.x = x2.data_ptr();
  p.residual = ptr_or_null(r2);
  p.weight = ptr_or_null(w);
  p.mean = is_rms ? nullptr : mean_c.data_ptr<float>();
  p.rstd = rstd_c.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.dres = dres_dtype ? dres.data_ptr() : nullptr;
  p.dw_part = dw_dtype ? dw_part.data_ptr<float>() : nullptr;
  p.db_part = db_dtype ? db_part.data_ptr<float>() : nullptr;
  p.row_sums = plan.row_sums ? row_sums.data_ptr<float>() : nullptr;
  p.dw = dw_dtype ? dw.data_ptr<float>() : nullptr;
  p.db = db_dtype ? db.data_ptr<float>() : nullptr;
  p.stride_dy = row_stride(dy2);
  p.stride_dh = dh2 ? row_stride(*dh2) : 0;
  p.stride_x = row_stride(x2);
  p.stride_res = r2 ? row_stride(*r2) : 0;
  p.stride_dx = n;
  p.stride_dres = n;
  p.rows = rows;
  p.n = int(n);
  p.is_rms = is_rms;
  p.x_f32 = x.scalar_type() == at::kFloat;
  p.residual_f32 = r2 && r2->scalar_type() == at::kFloat;
  p.dh_f32 = dh2 && dh2->scalar_type() == at::kFloat;
  p.dres_f32 = dres_dtype && *dres_dtype == at::kFloat;
  p.dtype = dt;
  p.param_dtype = pdt;
  tf::norms::norm_bwd(p, plan, stream);

  return {dx.view(x.sizes()), dres_dtype ? dres.view(x.sizes()) : dres,
          dw_dtype && *dw_dtype != at::kFloat ? dw.to(*dw_dtype) : dw,
          db_dtype && *db_dtype != at::kFloat ? db.to(*db_dtype) : db};
}

inline void define(torch::Library& m) {
  m.def("norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool is_rms, bool store_h, "
        "bool residual_in_fp32) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("norm_bwd(Tensor dy, Tensor? dh, Tensor x, Tensor? residual, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool is_rms, ScalarType dx_dtype, ScalarType? dres_dtype, ScalarType? dw_dtype, ScalarType? db_dtype) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

inline void impl(torch::Library& m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
}

}  // namespace tf::norms_bindings
