"""The flash-attention op contract shared by the Triton and CUDA backends: fake impls, autograd, entry functions.

Both backends define the same two ops (Triton: torch.ops.tileformer_triton.flash_attn_fwd / flash_attn_bwd;
CUDA: torch.ops.tileformer.attn_fwd / attn_bwd, emulated: torch.ops.tileformer_emu.*):

    fwd(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        window_left, window_right, softcap, bottom_right) -> (out, lse)
    bwd(dout, q, k, v, out, lse, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale, window_left, window_right, softcap, bottom_right) -> (dq, dk, dv)

q [B, Nq, Hq, D] (varlen [Tq, Hq, D] with int32 cu_seqlens), k / v [B, Nk, Hkv, D]; window_* = -1 means
unbounded (causal is window_right = 0); lse is fp32 [B, Hq, Nq] (varlen [Hq, Tq]), natural log; dlse (the
gradient of lse) may be None. `register` gives a namespace's ops their fakes and autograd;
`flash_attention` / `flash_attention_varlen` are the canonical entry functions over a forward op.
"""
from __future__ import annotations

import torch


def _fwd_fake(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
              window_left, window_right, softcap, bottom_right):
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              softmax_scale, window_left, window_right, softcap, bottom_right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, alibi, cu_q, cu_k, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi, cu_q, cu_k)
    ctx.params = params
    ctx.set_materialize_grads(False)


def _make_backward(ns, bwd_name):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi, cu_q, cu_k = ctx.saved_tensors
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        bwd = getattr(getattr(torch.ops, ns), bwd_name)
        dq, dk, dv = bwd(dout, q, k, v, out, lse, dlse, alibi, cu_q, cu_k, *ctx.params)
        return (dq, dk, dv) + (None,) * 10
    return backward


def register(ns: str, fwd_name: str, bwd_name: str):
    """Fakes and autograd of torch.ops.<ns>.<fwd_name> / <bwd_name> (call once per namespace)."""
    torch.library.register_fake(f"{ns}::{fwd_name}")(_fwd_fake)
    torch.library.register_fake(f"{ns}::{bwd_name}")(_bwd_fake)
    torch.library.register_autograd(f"{ns}::{fwd_name}", _make_backward(ns, bwd_name), setup_context=_setup_context)


def window(causal, window_size, max_q, max_k):
    """(left, right) for the kernels: causal folded into right = 0; windows wider than any sequence -> -1."""
    left, right = window_size
    if causal:
        right = 0
    wide = max_q + max_k
    return (-1 if left >= wide else left), (-1 if right >= wide else right)


def flash_attention(fwd, q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap, deterministic,
                    return_lse, causal_align):
    """Dense flash attention through the forward op `fwd`. deterministic: both backends always are (no atomics)."""
    nq, nk = q.shape[1], k.shape[1]
    left, right = window(causal, window_size, nq, nk)
    out, lse = fwd(q, k, v, alibi_slopes, None, None, nq, nk, float(softmax_scale), left, right, float(softcap),
                   causal_align == "bottom_right")
    return (out, lse) if return_lse else out


def flash_attention_varlen(fwd, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal,
                           softmax_scale, window_size, alibi_slopes, softcap, deterministic, return_lse,
                           causal_align):
    """Packed variable-length flash attention through the forward op `fwd`; lse is [Hq, total_q]."""
    left, right = window(causal, window_size, max_seqlen_q, max_seqlen_k)
    out, lse = fwd(q, k, v, alibi_slopes, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), int(max_seqlen_q),
                   int(max_seqlen_k), float(softmax_scale), left, right, float(softcap), causal_align == "bottom_right")
    return (out, lse) if return_lse else out
