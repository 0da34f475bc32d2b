"""Batched autoregressive generation with a KV cache.

``generate(model, input_ids, max_new_tokens, ...)``: the prompts (ragged allowed) are packed and prefilled
in one ``flash_attention_varlen`` pass that also fills the KV cache; each further token is one decode step
through ``decode_attention`` over the cache (contiguous or paged), which appends the new keys/values in
place. Works with any model exposing ``make_cache``, ``hidden_states`` and ``lm_head`` like
``transformer.models.DecoderOnly``.
"""
from __future__ import annotations

import torch

from . import _checks
from .models.layers import lengths_to_cu_seqlens

__all__ = ["generate", "sample_next"]


def _filter_top_k(logits, k):
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits, p):
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs                 # mass of the strictly more likely tokens
    remove_sorted = before >= p                           # the most likely token is always kept
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next token ids [B] from logits [B, V]: argmax when temperature == 0, else sampled after top-k/top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = _filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = _filter_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(max_new_tokens, temperature, top_k, top_p, eos_token_id, cache, page_size, kv_dtype=None):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"temperature must be a float >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")
    if eos_token_id is not None and (not isinstance(eos_token_id, int) or eos_token_id < 0):
        raise ValueError(f"eos_token_id must be None or a token id >= 0, got {eos_token_id!r}")
    if cache not in ("contiguous", "paged", None):
        raise ValueError(f"cache must be 'contiguous', 'paged' or None (no cache: re-run the full sequence), "
                         f"got {cache!r}")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
    _checks.check_kv_dtype(kv_dtype)
    if kv_dtype is not None and cache is None:
        raise ValueError(f"kv_dtype={kv_dtype!r} quantizes the KV cache: it needs cache='contiguous' or 'paged', "
                         f"got cache=None")


def _check_ids(prompts, vocab_size):
    """Token ids within 0..vocab_size-1 (an embedding lookup would fail with a bare IndexError)."""
    if vocab_size is None:
        return
    for i, p in enumerate(prompts):
        bad = ((p < 0) | (p >= vocab_size)).nonzero()
        if bad.numel():
            j = int(bad[0, 0])
            raise ValueError(f"input_ids[{i}][{j}] = {int(p[j])} is not a token id of the model (0..{vocab_size - 1})")


def _prompts(input_ids, device):
    """List of 1-D int64 tensors from a [B, N] tensor or a list of 1-D tensors / lists of ints."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [B, N] or a list of prompts, "
                             f"got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token per prompt, got shape "
                             f"{tuple(input_ids.shape)}")
        return [row.long() for row in input_ids.to(device)]
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise ValueError("input_ids must be an integer tensor [B, N] or a non-empty list of prompts")
    out = []
    for i, p in enumerate(input_ids):
        t = torch.as_tensor(p, device=device)
        if t.dim() != 1 or t.is_floating_point() or t.numel() == 0:
            raise ValueError(f"input_ids[{i}] must be a non-empty 1-D sequence of token ids, got {tuple(t.shape)}")
        out.append(t.long())
    return out


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None, *,
             generator=None, pad_token_id=None, cache="contiguous", page_size=16, kv_dtype=None):
    """Generate up to max_new_tokens per prompt.

    Args:
        model: a ``DecoderOnly`` (or any module with make_cache / hidden_states / lm_head).
        input_ids: [B, N] int tensor, or a list of B prompts of different lengths (1-D tensors or lists).
        temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled after top_k / top_p.
        top_k, top_p: keep the k most likely tokens / the nucleus of probability top_p.
        eos_token_id: a sequence stops after producing it (generation stops when all have).
        generator: torch.Generator for reproducible sampling.
        pad_token_id: fills finished sequences in the tensor result (default eos_token_id, else 0).
        cache: "contiguous" or "paged" KV cache (page_size tokens per page); None re-runs the whole
            sequence for every token (slow; the reference the cached path must agree with).
        kv_dtype: None, or "int8" / "fp8_e4m3": a quantized KV cache (8-bit keys/values with fp32 scales per
            token and kv head; see KVCache). The prompt's attention uses its unquantized keys/values; every
            later token reads the quantized cache.
    Returns a [B, N + T] tensor (T = tokens generated by the longest-running sequence) for tensor input,
    or a list of 1-D tensors (prompt + its generated tokens, through eos) for list input.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p, eos_token_id, cache, page_size, kv_dtype)
    device = next(model.parameters()).device
    prompts = _prompts(input_ids, device)
    _check_ids(prompts, getattr(getattr(model, "config", None), "vocab_size", None))
    lengths = [int(p.numel()) for p in prompts]
    b = len(prompts)
    capacity = max(lengths) + max_new_tokens
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_len is not None and capacity > max_len:
        raise ValueError(f"input_ids: the longest prompt ({max(lengths)} tokens) + max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's max_seq_len ({max_len})")
    was_training = model.training
    model.eval()
    try:
        new = _run(model, prompts, lengths, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
                   cache, page_size, capacity, kv_dtype)
    finally:
        model.train(was_training)
    n_new = new.shape[1]
    if isinstance(input_ids, torch.Tensor):
        return torch.cat([torch.stack(prompts), new], dim=1)
    out = []
    for i in range(b):
        toks = new[i]
        if eos_token_id is not None:
            hit = (toks == eos_token_id).nonzero()
            if len(hit):
                toks = toks[: int(hit[0]) + 1]
        out.append(torch.cat([prompts[i], toks[:n_new]]))
    return out


def _run(model, prompts, lengths, max_new_tokens, temperature, top_k, top_p, eos, generator, cache_kind,
         page_size, capacity, kv_dtype=None):
    b, device = len(prompts), prompts[0].device
    pad = eos if eos is not None else 0
    cu = lengths_to_cu_seqlens(lengths, device)
    last = cu[1:].long() - 1
    packed = torch.cat(prompts)
    tokens = torch.empty(b, 0, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return tokens
    done = torch.zeros(b, dtype=torch.bool, device=device)
    if cache_kind is None:
        def step_logits(seqs_cat, cu_now, last_now):
            h = model.hidden_states(seqs_cat, cu_seqlens=cu_now, max_seqlen=int((cu_now[1:] - cu_now[:-1]).max()))
            return model.lm_head(h[last_now])
        logits = step_logits(packed, cu, last)
    else:
        kv = model.make_cache(b, capacity, page_size=page_size if cache_kind == "paged" else None,
                              **({"kv_dtype": kv_dtype} if kv_dtype is not None else {}))
        h = model.hidden_states(packed, cu_seqlens=cu, max_seqlen=max(lengths), cache=kv)   # prefill
        logits = model.lm_head(h[last])
    for step in range(max_new_tokens):
        nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if eos is not None:
            done = done | (nxt == eos)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        if cache_kind is None:
            seqs = [torch.cat([p, tokens[i]]) for i, p in enumerate(prompts)]
            cu_now = lengths_to_cu_seqlens([len(s) for s in seqs], device)
            logits = step_logits(torch.cat(seqs), cu_now, cu_now[1:].long() - 1)
        else:
            h = model.hidden_states(nxt[:, None], cache=kv)                              # decode step
            logits = model.lm_head(h[:, -1])
    return tokens
