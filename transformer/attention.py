"""Public flash-attention API: defaults, documentation and backend dispatch.

Every backend implements the canonical signatures below (already-validated, normalised
arguments; ``softmax_scale`` is a float, ``window_size`` a pair of ints):

    flash_attention(q, k, v, *, causal, softmax_scale, window_size, alibi_slopes, softcap,
                    deterministic, return_lse, causal_align, dropout_p, rng_state) -> out | (out, lse)
    flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           <same keywords>) -> out | (out, lse)
    padded_attention(q, k, v, key_start, key_end, *, <same keywords>) -> out | (out, lse)

``causal_align`` is "bottom_right" (flash-attn; the public default) or "top_left" (SDPA's is_causal).
Attention dropout: ``dropout_p`` in [0, 1); when > 0, ``rng_state`` is the int64 [2] (seed, offset) tensor on
q's device drawn here once per call (`dropout_rng_state`) from the caller's generator, so every backend
applies the same counter-based mask (transformer/reference.py, ``dropout_keep``); with 0 it is None.
``attention`` is the one entry of every dense or padded attention call in the package (flash_attention, the
SDPA drop-in, the modules and the models), so each is dispatched, and counted, the same way.
"""
from __future__ import annotations

import torch

from . import _checks, backends

__all__ = ["flash_attention", "flash_attention_varlen", "padded_attention", "attention", "dropout_rng_state"]


def _describe(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
              varlen=False, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
              softcap=0.0, deterministic=False, return_lse=False, causal_align="bottom_right", dropout_p=0.0,
              rng_state=None):
    info = _checks.check_attention(q, k, v, varlen=varlen, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                   window_size=window_size, softcap=softcap, softmax_scale=softmax_scale,
                                   alibi_slopes=alibi_slopes)
    if causal_align not in ("bottom_right", "top_left"):
        raise ValueError(f"causal_align must be 'bottom_right' or 'top_left', got {causal_align!r}")
    for name, flag in (("causal", causal), ("deterministic", deterministic), ("return_lse", return_lse)):
        _checks.check_bool(name, flag)
    if varlen:
        for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if not isinstance(m, int) or isinstance(m, bool) or m < 0:
                raise TypeError(f"{name} must be a non-negative int, got {m!r}")
    dropout_p = _checks.check_dropout(dropout_p, rng_state, q.device if rng_state is not None else None)
    return dict(device=q.device, dtype=q.dtype, head_dim=info["head_dim"], hq=info["hq"], hkv=info["hkv"],
                varlen=varlen, causal=causal, window=info["window"], alibi=alibi_slopes is not None,
                softcap=info["softcap"], deterministic=deterministic, return_lse=return_lse,
                causal_align=causal_align, dropout=dropout_p, requires_grad=torch.is_grad_enabled() and any(
                    t.requires_grad for t in (q, k, v)), scale=info["scale"])


def _describe_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
    return _describe(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, varlen=True, **kw)


def _describe_padded(q, k, v, key_start, key_end, **kw):
    call = _describe(q, k, v, **kw)
    _checks.check_lengths_tensor("key_start", key_start, q.shape[0], "q", q)
    _checks.check_lengths_tensor("key_end", key_end, q.shape[0], "q", q)
    return dict(call, padded=True)


backends.register_op("flash_attention", _describe)
backends.register_op("flash_attention_varlen", _describe_varlen)
backends.register_op("padded_attention", _describe_padded)


# --- dropout --------------------------------------------------------------------------------------

def dropout_rng_state(device, generator=None):
    """The (seed, offset) of one call's dropout mask: an int64 [2] tensor on `device`, drawn from `generator`
    (None: the default generator of the device), so the same generator state gives the same mask. The kernels
    read it from device memory (no host copy: CUDA-graph safe) and the backward regenerates the mask from it."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != torch.device(device).type:
            raise ValueError(f"generator must be a generator of the inputs' device ({device}), got one of "
                             f"{generator.device}")
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)


def _rng(q, dropout_p, generator, rng_state):
    """rng_state for the call: None without dropout, the caller's, or drawn from generator."""
    _checks.check_dropout(dropout_p)
    if dropout_p == 0:
        return None
    if rng_state is not None:
        _checks.check_dropout(dropout_p, rng_state, q.device)
        return rng_state
    return dropout_rng_state(q.device, generator)


# --- public functions -----------------------------------------------------------------------------

def flash_attention(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), alibi_slopes=None,
                    softcap=0.0, deterministic=False, return_lse=False, dropout_p=0.0, generator=None,
                    rng_state=None, backend="auto"):
    """Fused attention, flash-attn layout and semantics.

    Args:
        q: [B, Nq, Hq, D]; k, v: [B, Nk, Hkv, D] with Hq a multiple of Hkv (GQA/MQA). fp16/bf16 for the
            kernels (fp32 is served by the torch/reference backends). Any strides with a contiguous last dim.
        causal: query i sees key j iff j <= i + Nk - Nq (bottom-right aligned, as flash-attn >= 2.1).
        softmax_scale: defaults to 1/sqrt(D).
        window_size: (left, right) sliding window, -1 = unbounded, aligned like causal.
        alibi_slopes: fp32 [Hq] or [B, Hq]; adds -slope * |i + Nk - Nq - j| to the scores.
        softcap: if > 0, scores become softcap * tanh(scores / softcap) (before ALiBi).
        deterministic: bit-identical gradients run to run. False (the default, as flash-attn) lets a backend
            accumulate dq with atomic adds (the Triton backend does: 5 matrix products per tile pair instead of
            7), so dq may differ in its last bits between runs.
        return_lse: also return the log-sum-exp [B, Hq, Nq] (fp32, natural log).
        dropout_p: attention dropout probability in [0, 1) (as flash-attn, applied whenever > 0: pass 0.0 in
            evaluation). Probabilities are dropped with a counter-based Philox mask and kept ones scaled by
            1 / (1 - dropout_p); the backward regenerates the mask (none is stored). lse stays the undropped one.
        generator: torch.Generator of q's device the mask's seed is drawn from (None: the device's default).
        rng_state: instead of drawing, the int64 [2] (seed, offset) tensor on q's device of a mask to reproduce
            (`dropout_rng_state`; transformer.reference.dropout_keep is the mask it gives).
        backend: "auto", "cuda", "triton", "torch" or "reference" (see transformer.backends).

    Returns out [B, Nq, Hq, D] (dtype of q), or (out, lse). Rows with no visible key give 0 (lse -inf).
    """
    return attention(q, k, v, causal=causal, causal_align="bottom_right", softmax_scale=softmax_scale,
                     window_size=window_size, alibi_slopes=alibi_slopes, softcap=softcap,
                     deterministic=deterministic, return_lse=return_lse, dropout_p=dropout_p, generator=generator,
                     rng_state=rng_state, backend=backend)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                           softmax_scale=None, window_size=(-1, -1), alibi_slopes=None, softcap=0.0,
                           deterministic=False, return_lse=False, dropout_p=0.0, generator=None, rng_state=None,
                           validate=None, backend="auto"):
    """Attention over packed variable-length sequences (flash-attn's varlen API).

    q: [total_q, Hq, D], k/v: [total_k, Hkv, D]; sequence i is q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] and
    likewise for k/v; cu_seqlens_* int32 [B + 1]; max_seqlen_* are host ints bounding the lengths.
    Other arguments as `flash_attention` (sequence i takes the dropout mask of batch element i).
    Returns out [total_q, Hq, D] (and lse [Hq, total_q]).
    validate: check the cu_seqlens values (start at 0, non-decreasing, within the packed tokens, bounded by
    max_seqlen_*), which costs a device-to-host copy; None (default) checks CPU tensors only. Unchecked values
    never make a kernel read or write outside its tensors (clamped bounds, transformer/_checks.py).
    """
    kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
              softcap=softcap, deterministic=deterministic, return_lse=return_lse, dropout_p=dropout_p)
    call = _describe_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw)
    if _checks.check_validate(validate, q):
        _checks.check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
        _checks.check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    kw.update(softmax_scale=call["scale"], window_size=call["window"], softcap=call["softcap"],
              causal_align="bottom_right", dropout_p=call["dropout"],
              rng_state=_rng(q, call["dropout"], generator, rng_state))
    return backends.dispatch("flash_attention_varlen", call, backend, q, k, v, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, **kw)


def padded_attention(q, k, v, key_start, key_end, *, causal=False, causal_align="bottom_right",
                     softmax_scale=None, window_size=(-1, -1), alibi_slopes=None, softcap=0.0, dropout_p=0.0,
                     generator=None, validate=None, backend="auto"):
    """Attention where batch element b sees only keys ``key_start[b] <= j < key_end[b]``.

    Args:
        q: [B, Nq, Hq, D]; k, v: [B, Nk, Hkv, D] (flash-attn layout, GQA allowed).
        key_start, key_end: [B] int32/int64 on q's device, 0 <= start <= end <= Nk. validate=True checks
            that (a device-to-host copy; None, the default, checks CPU tensors only); unchecked values are
            clamped to it.
        causal, window_size, alibi_slopes: aligned *within the run* of visible keys: with
            ``causal_align="bottom_right"`` the last query sits at the last visible key (left padding,
            KV caches); with ``"top_left"`` query i sits at run key i (right padding with Nq == Nk).
        softmax_scale, softcap, dropout_p, generator, backend: as `flash_attention` (batch element b takes the
            dropout mask of varlen sequence 3b + 1, keys counted from key_start[b]: see below).
    Returns [B, Nq, Hq, D]. Query rows that see no key give 0. The kernel backends run it as varlen attention
    over 3 sequences per batch element (keys before the run, the run with all of b's queries, keys after it)
    with no device-to-host copy; the torch backend as one masked SDPA call.
    """
    return attention(q, k, v, key_start=key_start, key_end=key_end, causal=causal, causal_align=causal_align,
                     softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
                     softcap=softcap, dropout_p=dropout_p, generator=generator, validate=validate, backend=backend)


def attention(q, k, v, *, key_start=None, key_end=None, causal=False, causal_align="bottom_right",
              softmax_scale=None, window_size=(-1, -1), alibi_slopes=None, softcap=0.0, deterministic=False,
              return_lse=False, dropout_p=0.0, generator=None, rng_state=None, validate=None, backend="auto"):
    """The package's one entry for dense ([B, N, H, D]) attention: `flash_attention` semantics with the causal
    alignment as a parameter ("bottom_right" or "top_left") and, with key_start / key_end, a run of visible
    keys per batch element (`padded_attention`). Validates, draws the dropout rng_state, then dispatches op
    "flash_attention" or "padded_attention"."""
    kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=window_size, alibi_slopes=alibi_slopes,
              softcap=softcap, deterministic=deterministic, return_lse=return_lse, causal_align=causal_align,
              dropout_p=dropout_p)
    padded = key_start is not None or key_end is not None
    if padded:
        call = _describe_padded(q, k, v, key_start, key_end, **kw)
        if _checks.check_validate(validate, q):
            _checks.check_key_bounds_values("key_start", key_start, "key_end", key_end, k.shape[1])
    else:
        call = _describe(q, k, v, **kw)
    kw.update(softmax_scale=call["scale"], window_size=call["window"], softcap=call["softcap"],
              dropout_p=call["dropout"], rng_state=_rng(q, call["dropout"], generator, rng_state))
    if padded:
        return backends.dispatch("padded_attention", call, backend, q, k, v, key_start, key_end, **kw)
    return backends.dispatch("flash_attention", call, backend, q, k, v, **kw)
