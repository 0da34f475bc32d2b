"""CUDA flash attention (csrc/attention/): the build's head dims, head-dim padding and the entry functions.

Ops (both namespaces, see transformer/_cuda/__init__.py); their fakes and autograd are those of the op
contract shared with the Triton backend (transformer/ops/attention.py):

    attn_fwd(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             window_left, window_right, softcap, bottom_right, deterministic=False, dropout_p=0.,
             rng_state=None) -> (out, lse)
    attn_bwd(dout, q, k, v, out, lse, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
             max_seqlen_k, softmax_scale, window_left, window_right, softcap, bottom_right,
             deterministic=False, dropout_p=0., rng_state=None) -> (dq, dk, dv)
    attn_head_dims() -> list[int]      # head dims compiled into this build (TILEFORMER_CUDA_HEADDIMS)

window_* = -1 means unbounded (causal is window_right = 0); lse is fp32 [B, Hq, Nq] (varlen [Hq, Tq]), natural
log. The kernels take head dims that are multiples of 8 up to a compiled one and round the tile up to it;
other head dims are zero-padded here (F.pad, differentiable), which changes neither scores nor outputs.
Both ops end in ``deterministic=False`` (the contract's deterministic_arg): False (the default) runs the
backward that adds dQ with fp32 atomics inside the dK/dV kernel (5 matrix products per tile pair), True the
bit-reproducible two-kernel backward (7); attn_fwd only carries it to the backward. Both then end in
``dropout_p=0., rng_state=None`` (the contract's dropout_arg): attention dropout with the counter-based mask of
rng_state (int64 [2] seed, offset on q's device; transformer/reference.py, ``dropout_keep``), read by the
kernels from device memory and regenerated in the backward (the same mask as the Triton kernels').
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks, backends
from ..ops import attention as contract
from . import namespace_name, ops

__all__ = ["flash_attention", "flash_attention_varlen", "padded_attention", "head_dims", "head_dim_reason",
           "register", "supports"]

def register(ns):
    """Fakes + autograd of the namespace's attention ops (called once per namespace by ops())."""
    contract.register(ns, deterministic_arg=True, dropout_arg=True)


# ---------------------------------------------------------------------------------------------
# Which head dims this build serves (asked by transformer.attention's supports predicate)
# ---------------------------------------------------------------------------------------------

_HEAD_DIMS: dict = {}


@backends._constant_under_compile
def head_dims(device_type: str) -> tuple:
    """Head dims compiled into the extension serving `device_type` ("cuda" or "cpu" = emulated)."""
    if device_type not in _HEAD_DIMS:
        dev = torch.device(device_type)
        _HEAD_DIMS[device_type] = tuple(int(d) for d in ops(dev).attn_head_dims())
    return _HEAD_DIMS[device_type]


def _round8(d):
    return (d + 7) // 8 * 8


def head_dim_reason(device: torch.device, head_dim: int):
    """None if some compiled head dim can hold `head_dim` (padded to a multiple of 8), else the reason."""
    try:
        dims = head_dims(device.type)
    except (RuntimeError, AttributeError) as e:   # an extension built before the attention ops existed
        return f"the CUDA attention ops are unavailable in this build ({type(e).__name__}: {e})"
    if not dims or _round8(head_dim) > max(dims):
        built = ", ".join(map(str, dims)) or "none"
        return (f"the CUDA attention kernels of this build ({namespace_name(device)}) are compiled for head dims "
                f"{built} (TILEFORMER_CUDA_HEADDIMS); head dim {head_dim} needs one >= {_round8(head_dim)}")
    return None


def supports(call):
    """Limits of csrc/attention beyond what the public describe checks: fp16/bf16 only; the head dim is
    zero-padded to a multiple of 8 and runs with the smallest compiled head dim that holds it
    (TILEFORMER_CUDA_HEADDIMS at build time; default 64, 128 and 256, so any head dim up to 256); on a GPU,
    compute capability >= 8.0 (mma.sync bf16, cp.async, ldmatrix). Every other feature (GQA/MQA, causal either
    alignment, windows, ALiBi, softcap, lse, varlen, strided inputs, either backward, attention dropout with the
    mask of the Triton kernels and the reference) is served."""
    if call["dtype"] not in _checks.HALF_DTYPES:
        return f"the CUDA kernel takes fp16/bf16 inputs, got {call['dtype']}"
    if call["device"].type == "cuda" and torch.cuda.get_device_capability(call["device"]) < (8, 0):
        return "the CUDA kernel needs a GPU of compute capability >= 8.0"
    return head_dim_reason(call["device"], call["head_dim"])


# ---------------------------------------------------------------------------------------------
# Canonical entry functions (called by transformer.attention through the dispatcher)
# ---------------------------------------------------------------------------------------------

def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _checks.HALF_DTYPES:
            raise TypeError(f"{name} must be float16 or bfloat16 for the CUDA kernels (fp16/bf16), got {t.dtype}")
    reason = head_dim_reason(q.device, q.shape[-1])
    if reason:
        raise ValueError(reason)


def _pad(t, d8):
    """Zero-pad the head dim to d8 (a multiple of 8): the 16-byte copies of the kernels need it."""
    return t if t.shape[-1] == d8 else F.pad(t, (0, d8 - t.shape[-1]))


def _fwd(q, k, v, *args):
    """The attention forward op of q's device, head dims zero-padded to a multiple of 8 (the kernels' 16-byte
    copies need it; F.pad is differentiable, so the backward sees the padded op)."""
    d = q.shape[-1]
    d8 = _round8(d)
    out, lse = ops(q.device).attn_fwd(_pad(q, d8), _pad(k, d8), _pad(v, d8), *args)
    return (out if d8 == d else out[..., :d]), lse


def flash_attention(q, k, v, **kw):
    _check(q, k, v)
    return contract.flash_attention(_fwd, q, k, v, deterministic_arg=True, dropout_arg=True, **kw)


def flash_attention_varlen(q, k, v, *args, **kw):
    _check(q, k, v)
    return contract.flash_attention_varlen(_fwd, q, k, v, *args, deterministic_arg=True, dropout_arg=True, **kw)


def padded_attention(q, k, v, key_start, key_end, **kw):
    return contract.padded_attention(flash_attention_varlen, q, k, v, key_start, key_end, **kw)
