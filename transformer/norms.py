"""Public LayerNorm / RMSNorm API: defaults, documentation and backend dispatch.

Canonical backend signatures (validated arguments):

    layer_norm(x, weight, bias, eps, *, residual, prenorm, residual_in_fp32) -> out | (out, h)
    rms_norm(x, weight, eps, *, residual, prenorm, residual_in_fp32)         -> out | (out, h)

h = x + residual (summed in fp32; stored in fp32 when residual_in_fp32, else in the residual's dtype, as
flash-attn's layer_norm_fn: the public functions pass residual_in_fp32=True for an fp32 residual).
out has x's dtype. Statistics are fp32.
"""
from __future__ import annotations

import torch

from . import _checks, backends

__all__ = ["layer_norm", "rms_norm"]


def _describe(x, weight=None, bias=None, eps=1e-5, *, residual=None, prenorm=False, residual_in_fp32=False,
              has_bias=True):
    n = _checks.check_norm(x, weight, bias, eps, residual, has_bias=has_bias)
    _checks.check_bool("prenorm", prenorm)
    _checks.check_bool("residual_in_fp32", residual_in_fp32)
    return dict(device=x.device, dtype=x.dtype, hidden=n, rows=x.numel() // n,
                weight_dtype=None if weight is None else weight.dtype,
                bias=bias is not None, residual=residual is not None, prenorm=prenorm,
                residual_in_fp32=residual_in_fp32)


def _describe_rms(x, weight=None, eps=1e-6, **kw):
    return _describe(x, weight, None, eps, has_bias=False, **kw)


backends.register_op("layer_norm", _describe)
backends.register_op("rms_norm", _describe_rms)


def _h_in_fp32(residual, residual_in_fp32):
    """h is stored in the residual's dtype (flash-attn's rule): an fp32 residual means an fp32 h, so its
    gradient (and the residual's) is not rounded to x's half precision."""
    _checks.check_bool("residual_in_fp32", residual_in_fp32)
    return residual_in_fp32 or (isinstance(residual, torch.Tensor) and residual.dtype == torch.float32)


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, prenorm=False, residual_in_fp32=False,
               backend="auto"):
    """LayerNorm over the last dim, optionally fused with a residual add.

    With ``residual``, h = x + residual is normalised; with ``prenorm=True`` returns (out, h) so a
    pre-norm block needs one kernel per norm (h in the residual's dtype, as flash-attn's ``layer_norm_fn``;
    in fp32 when ``residual_in_fp32``; in x's dtype without a residual unless ``residual_in_fp32``).
    x: [..., N] fp32/fp16/bf16; weight/bias: [N] (may be fp32 with half x). Returns out with x's dtype.
    """
    residual_in_fp32 = _h_in_fp32(residual, residual_in_fp32)
    call = _describe(x, weight, bias, eps, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    return backends.dispatch("layer_norm", call, backend, x, weight, bias, float(eps), residual=residual,
                             prenorm=bool(prenorm), residual_in_fp32=bool(residual_in_fp32))


def rms_norm(x, weight=None, eps=1e-6, *, residual=None, prenorm=False, residual_in_fp32=False, backend="auto"):
    """RMSNorm over the last dim: h * rsqrt(mean(h^2) + eps) * weight, h = x (+ residual).

    Same residual/prenorm semantics as `layer_norm`.
    """
    residual_in_fp32 = _h_in_fp32(residual, residual_in_fp32)
    call = _describe_rms(x, weight, eps, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    return backends.dispatch("rms_norm", call, backend, x, weight, float(eps), residual=residual,
                             prenorm=bool(prenorm), residual_in_fp32=bool(residual_in_fp32))
