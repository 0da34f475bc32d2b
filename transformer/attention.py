"""Public flash-attention API: defaults, documentation and backend dispatch.

Every backend implements the canonical signatures below (already-validated, normalised
arguments; ``softmax_scale`` is a float, ``window_size`` a pair of ints):

    flash_attention(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap,
                    deterministic, return_lse, causal_align) -> out | (out, lse)
    flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           <same keywords>) -> out | (out, lse)

``causal_align`` is "bottom_right" (flash-attn; the public default) or "top_left" (SDPA's is_causal).
"""
from __future__ import annotations

import torch

from . import _checks, backends

__all__ = ["flash_attention", "flash_attention_varlen"]


def _describe(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
              varlen=False, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
              softcap=0.0, deterministic=False, return_lse=False, causal_align="bottom_right"):
    info = _checks.check_attention(q, k, v, varlen=varlen, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                   window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
                                   alibi_slopes=alibi_slopes)
    if causal_align not in ("bottom_right", "top_left"):
        raise ValueError(f"causal_align must be 'bottom_right' or 'top_left', got {causal_align!r}")
    if varlen:
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if not isinstance(m, int) or isinstance(m, bool) or m < 0:
                raise TypeError(f"{name} must be a non-negative int, got {m!r}")
    return dict(device=q.device, dtype=q.dtype, head_dim=info["head_dim"], hq=info["hq"], hkv=info["hkv"],
                varlen=varlen, causal=bool(causal), window=info["window"], alibi=alibi_slopes is not None,
                softcap=info["softcap"], deterministic=bool(deterministic), return_lse=bool(return_lse),
                causal_align=causal_align, requires_grad=torch.is_grad_enabled() and any(
                    t.requires_grad for t in (q, k, v)), scale=info["scale"])


def _describe_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
    return _describe(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, varlen=True, **kw)


# --- backend capabilities (the only place that knows them) ----------------------------------------

def _torch_supports(call):
    if call["softcap"] > 0:
        return "F.scaled_dot_product_attention has no softcap"
    if call["return_lse"]:
        return "F.scaled_dot_product_attention does not return the log-sum-exp"
    if call["deterministic"] and call["device"].type == "cuda" and call["requires_grad"]:
        return "SDPA's CUDA backward is not guaranteed deterministic"
    return None


def _triton_supports(call):
    """Limits of triton_kernels/attention.py beyond what _describe checks (head dim 1..256, Hq % Hkv == 0,
    contiguous last dim): fp16/bf16 only; on a GPU, compute capability >= 8.0 (bf16, tuned configs)."""
    if call["dtype"] not in _checks.HALF_DTYPES:
        return f"the Triton kernel takes fp16/bf16 inputs, got {call['dtype']}"
    if call["device"].type == "cuda" and torch.cuda.get_device_capability(call["device"]) < (8, 0):
        return "the Triton kernel needs a GPU of compute capability >= 8.0"
    return None


def _cuda_supports(call):
    """Limits of csrc/attention (transformer/_cuda/attention.py) beyond what _describe checks: fp16/bf16 only;
    the head dim is zero-padded to a multiple of 8 and runs with the smallest compiled head dim that holds it
    (TILEFORMER_CUDA_HEADDIMS at build time; default 64, 128 and 256, so any head dim up to 256); on a GPU, compute
    capability >= 8.0 (mma.sync bf16, cp.async, ldmatrix). Every other feature (GQA/MQA, causal either
    alignment, windows, ALiBi, softcap, lse, varlen, strided inputs, deterministic backward) is served."""
    if call["dtype"] not in _checks.HALF_DTYPES:
        return f"the CUDA kernel takes fp16/bf16 inputs, got {call['dtype']}"
    if call["device"].type == "cuda" and torch.cuda.get_device_capability(call["device"]) < (8, 0):
        return "the CUDA kernel needs a GPU of compute capability >= 8.0"
    from ._cuda import attention as _cuda_attention
    return _cuda_attention.head_dim_reason(call["device"], call["head_dim"])


backends.register_op("flash_attention", _describe, order=("triton", "cuda", "torch", "reference"))
backends.register_op("flash_attention_varlen", _describe_varlen, order=("triton", "cuda", "torch", "reference"))
for _op in ("flash_attention", "flash_attention_varlen"):
    backends.register_impl(_op, "reference", f"transformer._impl_reference:{_op}")
    backends.register_impl(_op, "torch", f"transformer._impl_torch:{_op}", _torch_supports)
    backends.register_impl(_op, "triton", f"triton_kernels.attention:{_op}", _triton_supports)
    backends.register_impl(_op, "cuda", f"transformer._cuda.attention:{_op}", _cuda_supports)


# --- public functions -----------------------------------------------------------------------------

def flash_attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
                    softcap=0.0, deterministic=False, return_lse=False, backend="auto"):
    """Fused attention, flash-attn layout and semantics.

    Args:
        q: [B, Nq, Hq, D]; k, v: [B, Nk, Hkv, D] with Hq a multiple of Hkv (GQA/MQA). fp16/bf16 for the
            kernels (fp32 is served by the torch/reference backends). Any strides with a contiguous last dim.
        causal: query i sees key j iff j <= i + Nk - Nq (bottom-right aligned, as flash-attn >= 2.1).
        softmax_scale: defaults to 1/sqrt(D).
        window_size: (left, right) sliding window, -1 = unbounded, aligned like causal.
        alibi_slopes: fp32 [Hq] or [B, Hq]; adds -slope * |i + Nk - Nq - j| to the scores.
        softcap: if > 0, scores become softcap * tanh(scores / softcap) (before ALiBi).
        deterministic: bit-identical gradients run to run.
        return_lse: also return the log-sum-exp [B, Hq, Nq] (fp32, natural log).
        backend: "auto", "cuda", "triton", "torch" or "reference" (see transformer.backends).

    Returns out [B, Nq, Hq, D] (dtype of q), or (out, lse). Rows with no visible key give 0 (lse -inf).
    """
    kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
              softcap=softcap, deterministic=deterministic, return_lse=return_lse)
    call = _describe(q, k, v, **kw)
    kw.update(softmax_scale=call["scale"], window_size=call["window"], softcap=call["softcap"],
              causal_align="bottom_right")
    return backends.dispatch("flash_attention", call, backend, q, k, v, **kw)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                           softmax_scale=None, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                           deterministic=False, return_lse=False, validate=False, backend="auto"):
    """Attention over packed variable-length sequences (flash-attn's varlen API).

    q: [total_q, Hq, D], k/v: [total_k, Hkv, D]; sequence i is q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] and
    likewise for k/v; cu_seqlens_* int32 [B + 1]; max_seqlen_* are host ints bounding the lengths.
    Other arguments as `flash_attention`. Returns out [total_q, Hq, D] (and lse [Hq, total_q]).
    validate=True also checks cu_seqlens values (costs a device-to-host copy).
    """
    kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
              softcap=softcap, deterministic=deterministic, return_lse=return_lse)
    call = _describe_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw)
    if validate:
        _checks.check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0])
        _checks.check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    kw.update(softmax_scale=call["scale"], window_size=call["window"], softcap=call["softcap"],
              causal_align="bottom_right")
    return backends.dispatch("flash_attention_varlen", call, backend, q, k, v, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, **kw)
