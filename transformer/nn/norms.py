"""Drop-in LayerNorm / RMSNorm modules running the fused kernels (transformer.layer_norm / rms_norm).

``transformer.nn.LayerNorm`` and ``transformer.nn.RMSNorm`` subclass ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm``:
same constructor arguments, parameter names, ``state_dict`` and ``isinstance`` behaviour. Their forward also
takes ``residual=`` (normalise h = x + residual in one kernel) and ``prenorm=True`` (return ``(out, h)``).
A multi-dim ``normalized_shape`` is handled by flattening the trailing dims into one hidden dim.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import norms

__all__ = ["LayerNorm", "RMSNorm"]


def _flatten(x, shape, residual):
    """x [..., *shape] -> [..., prod(shape)] (and residual alike); checks the trailing dims."""
    k = len(shape)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != tuple(shape):
        raise ValueError(f"x must end with normalized_shape {tuple(shape)}, got shape {tuple(x.shape)}")
    if residual is not None and isinstance(residual, torch.Tensor) and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if k == 1:
        return x, residual
    n = math.prod(shape)
    lead = x.shape[:x.dim() - k]
    return x.reshape(*lead, n), None if residual is None else residual.reshape(*lead, n)


def _unflatten(res, shape, prenorm):
    if prenorm:
        return res[0].reshape(shape), res[1].reshape(shape)
    return res.reshape(shape)


def _flat(p):
    return None if p is None else p.reshape(-1)


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm (same arguments and parameters) on the fused kernels; forward(x, residual, prenorm).

    backend: "auto" (default), "triton", "cuda", "torch" or "reference" (see transformer.backends).
    residual_in_fp32: with prenorm, return h in fp32 (the residual stream kept in full precision).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 *, residual_in_fp32=False, backend="auto"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.residual_in_fp32 = bool(residual_in_fp32)
        self.backend = backend

    def forward(self, x, residual=None, prenorm=False):
        x2, r2 = _flatten(x, self.normalized_shape, residual)
        res = norms.layer_norm(x2, _flat(self.weight), _flat(self.bias), self.eps, residual=r2, prenorm=prenorm,
                               residual_in_fp32=self.residual_in_fp32, backend=self.backend)
        return _unflatten(res, x.shape, prenorm) if x2 is not x else res


class RMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm (same arguments and parameters) on the fused kernels; forward(x, residual, prenorm).

    eps=None means torch.finfo(x.dtype).eps, as in torch.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None,
                 *, residual_in_fp32=False, backend="auto"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device,
                         dtype=dtype)
        self.residual_in_fp32 = bool(residual_in_fp32)
        self.backend = backend

    def forward(self, x, residual=None, prenorm=False):
        x2, r2 = _flatten(x, self.normalized_shape, residual)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        res = norms.rms_norm(x2, _flat(self.weight), eps, residual=r2, prenorm=prenorm,
                             residual_in_fp32=self.residual_in_fp32, backend=self.backend)
        return _unflatten(res, x.shape, prenorm) if x2 is not x else res
