"""Triton flash attention as torch custom ops (torch.ops.tileformer_triton.attn_fwd / attn_bwd) and the
backend's entry functions. Kernels and launchers: triton_kernels/attention.py; the op schemas, fakes and
autograd: the shared contract, transformer/ops/attention.py. Both ops end in `deterministic` (the contract's
deterministic_arg): False (the default) accumulates dQ with atomic adds, True runs the bit-reproducible
two-kernel backward; attn_fwd only carries it to the backward. Both then end in `dropout_p, rng_state` (the
contract's dropout_arg): attention dropout with the counter-based mask of rng_state, regenerated in the backward."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from triton_kernels import attention as kernels

from .. import _checks
from ..ops import attention as contract

__all__ = ["flash_attention", "flash_attention_varlen", "padded_attention", "supports", "describe_path"]


@torch.library.custom_op("tileformer_triton::attn_fwd", mutates_args=())
def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
             cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
             max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int, softcap: float,
             bottom_right: bool, deterministic: bool = False, dropout_p: float = 0.0,
             rng_state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    return kernels.forward(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, window_left, window_right, softcap, bottom_right, dropout_p, rng_state)


@torch.library.custom_op("tileformer_triton::attn_bwd", mutates_args=())
def attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, dlse: Optional[torch.Tensor], alibi_slopes: Optional[torch.Tensor],
             cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
             max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int, softcap: float,
             bottom_right: bool, deterministic: bool = False, dropout_p: float = 0.0,
             rng_state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels.backward(dout, q, k, v, out, lse, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, softmax_scale, window_left, window_right, softcap, bottom_right,
                            deterministic=deterministic, dropout_p=dropout_p, rng_state=rng_state)


contract.register("tileformer_triton", deterministic_arg=True, dropout_arg=True)


def supports(call):
    """Limits of the Triton kernels beyond what the public describe checks (head dim 1..256, Hq % Hkv == 0,
    contiguous last dim): fp16/bf16 only; on a GPU, compute capability >= 8.0 (bf16, tuned configs). Attention
    dropout is served (the counter-based mask in every kernel)."""
    if call["dtype"] not in _checks.HALF_DTYPES:
        return f"the Triton kernel takes fp16/bf16 inputs, got {call['dtype']}"
    if call["device"].type == "cuda" and torch.cuda.get_device_capability(call["device"]) < (8, 0):
        return "the Triton kernel needs a GPU of compute capability >= 8.0"
    return None


def describe_path(call):
    """Which Triton forward kernel serves the call (shown by transformer.backends.explain): the portable one, or
    on sm_90 the tensor-descriptor (TMA) one, warp-specialized where the installed Triton can
    (triton_kernels.attention.forward_path)."""
    return kernels.describe_forward_path(call["device"])


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _checks.HALF_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16 for the Triton kernel, got {t.dtype}")
        if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def flash_attention(q, k, v, **kw):
    _check(q, k, v)
    return contract.flash_attention(torch.ops.tileformer_triton.attn_fwd, q, k, v, deterministic_arg=True,
                                    dropout_arg=True, **kw)


def flash_attention_varlen(q, k, v, *args, **kw):
    _check(q, k, v)
    return contract.flash_attention_varlen(torch.ops.tileformer_triton.attn_fwd, q, k, v, *args,
                                           deterministic_arg=True, dropout_arg=True, **kw)


def padded_attention(q, k, v, key_start, key_end, **kw):
    return contract.padded_attention(flash_attention_varlen, q, k, v, key_start, key_end, **kw)
