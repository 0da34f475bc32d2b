"""Triton LayerNorm / RMSNorm as torch custom ops (torch.ops.tileformer_triton.norm_fwd / norm_bwd) and the
backend's entry functions. Kernels and launchers: triton_kernels/norms.py; the op schemas, fakes and
autograd: the shared contract, transformer/ops/norms.py."""
from __future__ import annotations

from typing import Optional

import torch

from triton_kernels import norms as kernels

from ..ops import norms as contract

__all__ = ["layer_norm", "rms_norm", "supports"]


@torch.library.custom_op("tileformer_triton::norm_fwd", mutates_args=())
def norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             residual: Optional[torch.Tensor], eps: float, is_rms: bool, store_h: bool,
             residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.forward(x, weight, bias, residual, eps, is_rms, store_h, residual_in_fp32)


@torch.library.custom_op("tileformer_triton::norm_bwd", mutates_args=())
def norm_bwd(dy: torch.Tensor, dh: Optional[torch.Tensor], x: torch.Tensor, residual: Optional[torch.Tensor],
             weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, is_rms: bool,
             dx_dtype: torch.dtype, dres_dtype: Optional[torch.dtype], dw_dtype: Optional[torch.dtype],
             db_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.backward(dy, dh, x, residual, weight, mean, rstd, is_rms, dx_dtype, dres_dtype, dw_dtype,
                            db_dtype)


contract.register("tileformer_triton")


def supports(call):
    """The Triton norms take any float dtype mix the public API allows, any row stride (contiguous last dim);
    hidden 1..MAX_HIDDEN, rows <= 2^31 - 1024 (int32 row indices)."""
    if call["hidden"] > kernels.MAX_HIDDEN:
        return f"hidden size {call['hidden']} exceeds {kernels.MAX_HIDDEN}, the largest the Triton norm kernels serve"
    if call["rows"] > 2 ** 31 - 1024:
        return f"{call['rows']} rows: the Triton norm kernels index rows with int32 (at most 2^31 - 1024)"
    return None


def layer_norm(x, weight, bias, eps, *, residual, prenorm, residual_in_fp32):
    return contract.layer_norm(torch.ops.tileformer_triton, x, weight, bias, eps, residual=residual,
                               prenorm=prenorm, residual_in_fp32=residual_in_fp32)


def rms_norm(x, weight, eps, *, residual, prenorm, residual_in_fp32):
    return contract.rms_norm(torch.ops.tileformer_triton, x, weight, eps, residual=residual, prenorm=prenorm,
                             residual_in_fp32=residual_in_fp32)
