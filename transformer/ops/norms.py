"""The norm op contract shared by the Triton and CUDA backends: fake impls, autograd, entry functions.

Every kernel backend defines the same two ops in its namespace (torch.ops.<ns>.norm_fwd / norm_bwd):

    norm_fwd(x, weight, bias, residual, eps, is_rms, store_h, residual_in_fp32) -> (out, h, mean, rstd)
    norm_bwd(dy, dh, x, residual, weight, mean, rstd, is_rms, dx_dtype, dres_dtype, dw_dtype, db_dtype)
        -> (dx, dres, dw, db)           # dres / dw / db are empty [0] tensors when their dtype is None

h = x (+ residual) summed in fp32, stored (store_h) in fp32 when residual_in_fp32 else in x's dtype;
mean ([0] for RMSNorm) and rstd are fp32 per row. `register(ns)` gives a namespace's ops their fakes
and autograd; `layer_norm` / `rms_norm` are the canonical entry functions over a namespace's ops.
"""
from __future__ import annotations

import torch


def _fwd_fake(x, weight, bias, residual, eps, is_rms, store_h, residual_in_fp32):
    lead = x.shape[:-1]
    h_dtype = torch.float32 if residual_in_fp32 else x.dtype
    return (x.new_empty(x.shape), x.new_empty(x.shape if store_h else (0,), dtype=h_dtype),
            x.new_empty((0,) if is_rms else lead, dtype=torch.float32), x.new_empty(lead, dtype=torch.float32))


def _bwd_fake(dy, dh, x, residual, weight, mean, rstd, is_rms, dx_dtype, dres_dtype, dw_dtype, db_dtype):
    n = x.shape[-1]
    return (x.new_empty(x.shape, dtype=dx_dtype),
            x.new_empty(x.shape if dres_dtype is not None else (0,), dtype=dres_dtype or dx_dtype),
            x.new_empty((n,) if dw_dtype is not None else (0,), dtype=dw_dtype or torch.float32),
            x.new_empty((n,) if db_dtype is not None else (0,), dtype=db_dtype or torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms, store_h, residual_in_fp32 = inputs
    out, h, mean, rstd = output
    if residual is not None and store_h and h.dtype == torch.float32:
        saved_x, saved_r = h, None               # the exact fp32 sum: backward reads one tensor
    else:
        saved_x, saved_r = x, residual           # backward adds the residual again in fp32
    ctx.save_for_backward(saved_x, saved_r, weight, mean, rstd)
    ctx.is_rms, ctx.store_h = is_rms, store_h
    ctx.x_dtype = x.dtype
    ctx.res_dtype = None if residual is None else residual.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _make_backward(ns):
    def backward(ctx, dout, dh, _dmean, _drstd):
        x, residual, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        if dout is None:
            dout = torch.zeros(x.shape, dtype=ctx.x_dtype, device=x.device)
        dres_dtype = ctx.res_dtype if need_r and ctx.res_dtype != ctx.x_dtype else None
        dx, dres, dw, db = getattr(torch.ops, ns).norm_bwd(
            dout, dh if ctx.store_h else None, x, residual, weight, mean, rstd, ctx.is_rms, ctx.x_dtype,
            dres_dtype, weight.dtype if need_w and weight is not None else None,
            ctx.bias_dtype if need_b else None)
        dresidual = None
        if need_r:
            dresidual = dres if dres_dtype is not None else dx   # same value: shared like AddBackward's grads
        return (dx if need_x else None, dw if need_w else None, db if need_b else None, dresidual,
                None, None, None, None)
    return backward


def register(ns: str):
    """Fakes and autograd of torch.ops.<ns>.norm_fwd / norm_bwd (call once per namespace)."""
    torch.library.register_fake(f"{ns}::norm_fwd")(_fwd_fake)
    torch.library.register_fake(f"{ns}::norm_bwd")(_bwd_fake)
    torch.library.register_autograd(f"{ns}::norm_fwd", _make_backward(ns), setup_context=_setup_context)


def layer_norm(ops, x, weight, bias, eps, *, residual, prenorm, residual_in_fp32):
    out, h, _, _ = ops.norm_fwd(x, weight, bias, residual, float(eps), False, bool(prenorm), bool(residual_in_fp32))
    return (out, h) if prenorm else out


def rms_norm(ops, x, weight, eps, *, residual, prenorm, residual_in_fp32):
    out, h, _, _ = ops.norm_fwd(x, weight, None, residual, float(eps), True, bool(prenorm), bool(residual_in_fp32))
    return (out, h) if prenorm else out
