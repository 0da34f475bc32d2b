"""CUDA LayerNorm / RMSNorm (csrc/norms/): the canonical entry functions over torch.ops.tileformer(_emu).

Fakes and autograd are those of the shared op contract (transformer/ops/norms.py), the same as the
Triton ops':

    norm_fwd(x, weight, bias, residual, eps, is_rms, store_h, residual_in_fp32) -> (out, h, mean, rstd)
    norm_bwd(dy, dh, x, residual, weight, mean, rstd, is_rms, dx_dtype, dres_dtype, dw_dtype, db_dtype)
        -> (dx, dres, dw, db)           # dres / dw / db are empty [0] tensors when their dtype is None

h = x (+ residual) summed in fp32, stored (store_h) in fp32 when residual_in_fp32 else in x's dtype;
mean ([0] for RMSNorm) and rstd are fp32 per row. dW / dB are deterministic (two-stage reduction).
"""
from __future__ import annotations

from ..ops import norms as contract
from . import ops

__all__ = ["layer_norm", "rms_norm", "register", "supports"]

MAX_HIDDEN = 65536     # the largest hidden size tested

register = contract.register     # fakes + autograd per namespace (called once per namespace by ops())


def supports(call):
    """The CUDA norms (csrc/norms) take any float dtype mix the public API allows; hidden 1..MAX_HIDDEN."""
    if call["hidden"] > MAX_HIDDEN:
        return f"hidden size {call['hidden']} exceeds {MAX_HIDDEN}, the largest the CUDA norm kernels serve"
    return None


def layer_norm(x, weight, bias, eps, *, residual, prenorm, residual_in_fp32):
    return contract.layer_norm(ops(x.device), x, weight, bias, eps, residual=residual, prenorm=prenorm,
                               residual_in_fp32=residual_in_fp32)


def rms_norm(x, weight, eps, *, residual, prenorm, residual_in_fp32):
    return contract.rms_norm(ops(x.device), x, weight, eps, residual=residual, prenorm=prenorm,
                             residual_in_fp32=residual_in_fp32)
