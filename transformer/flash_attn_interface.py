"""flash-attn 2.8's Python interface over tileformer's ops.

Replace ``from flash_attn import ...`` (or ``from flash_attn.flash_attn_interface import ...``) with
``from transformer.flash_attn_interface import ...``. The seven functions have flash-attn's names, argument
order, defaults (``causal=False`` everywhere, ``flash_attn_with_kvcache`` included) and return conventions; each
also takes a keyword-only ``backend`` ("auto", "cuda", "triton", "torch", "reference") after flash-attn's
arguments. They call the public ops (`flash_attention`, `flash_attention_varlen`, `attention`,
`decode_attention`), so every call is validated, dispatched and counted like any other.

Differences from flash-attn, none silent:

* ``dropout_p > 0``: attention dropout in the kernels, as flash-attn (applied whenever > 0; pass 0.0 in
  evaluation), with tileformer's counter-based mask (transformer/reference.py, ``dropout_keep``; the seed is
  drawn from the default generator of q's device), so the dropped elements differ from flash-attn's. A value
  outside [0, 1) is a ValueError, a non-number a TypeError.
* ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``. S_dmask is None when ``dropout_p = 0``
  (flash-attn's return value then). With dropout it is [B, H, Sq, Sk] (varlen: [B, H, max_seqlen_q,
  max_seqlen_k], zero past each sequence) fp32, computed by the reference from the call's mask: the
  probabilities scaled by 1 / (1 - dropout_p), negative where dropped (flash-attn's sign convention: ``>= 0`` is
  the keep mask; flash-attn's entries are unscaled and its shape rounded up to 128). For tests: Sq x Sk memory.
* fp32 inputs are accepted (the torch and reference backends serve them); flash-attn takes fp16/bf16 only.
  Paged caches take any page size (flash-attn: multiples of 256); rotary tables may be any float dtype
  (flash-attn: q's dtype) and rotary_dim any even number up to the head dim (flash-attn: multiples of 16).
* Errors: where flash-attn's C++ checks raise RuntimeError, these functions raise `FlashAttnCompatError`,
  which derives from both ValueError and RuntimeError, so code written for either convention catches it
  (a ValueError from the ops below is re-raised as one). TypeErrors (wrong dtypes) stay TypeErrors.

``flash_attn_with_kvcache`` is a composition of the ops (flash-attn does it in one kernel):

* ``cache_seqlens``: an int, an int32 / int64 [B] tensor, or None (= every sequence fills the cache:
  S_max tokens, or max_pages * page_size for a paged cache; appending then needs explicit cache_seqlens).
* ``cache_batch_idx`` (contiguous cache [B_cache, S_max, Hkv, D]): the cache is read as a paged cache of
  B_cache pages of S_max tokens with ``block_table = cache_batch_idx[:, None]`` (no copy), so appends land in
  row cache_batch_idx[b]. Values outside 0..B_cache-1 raise ValueError when checked (CPU tensors); unchecked
  ones follow the paged rule (that row holds no visible token, appends to it are dropped).
* ``rotary_cos`` / ``rotary_sin`` [seqlen_ro, rotary_dim / 2]: q and the appended k are rotated as
  ``transformer.nn.rope.apply_rotary`` does (fp32 math, the modules' RoPE, bit for bit); k at positions
  cache_seqlens + i, q at cache_seqlens + i when causal or local (a window smaller than the cache) and at
  cache_seqlens otherwise, as flash-attn (cache_leftpad does not shift them). Where the appends run inside the
  decode calls, the tables go to ``decode_attention``, whose kernels rotate in the append's launch; otherwise
  (the cases of the next point) q and k are rotated by ``reference.rotary_decode`` before the calls. Positions
  past the table are clamped to its last row (only tokens that would fall outside the cache reach them).
* Appends: k / v with as many tokens as q go into the cache inside the decode call (the kernels' append).
  Otherwise (seqlen_new != Sq, more than 16 queries that are not causal, or cache_leftpad) they are appended
  first through ``decode_attention``'s in-place append (same quantization and index rules) with zero queries
  that see one key each (window (0, 0), output discarded), then q attends over the updated cache.
* More than 16 queries (``decode_attention``'s limit): causal queries run in chunks of 16 in order, each
  chunk seeing the cache up to its last query (the modules' chunked prefill); non-causal chunks without a
  window or ALiBi see the whole cache and are independent.
* ``cache_leftpad`` [B] (contiguous caches; flash-attn rejects it with block_table), and non-causal calls of
  more than 16 queries with a window or ALiBi: ``attention`` with a run of visible keys per sequence
  (key_start = cache_leftpad or 0, key_end = cache_seqlens + seqlen_new; causal, window and ALiBi aligned to
  the run's end, as flash-attn). With cache_batch_idx the rows are gathered first (a copy). With a paged
  cache the second case raises NotImplementedError.
"""
from __future__ import annotations

import contextlib
import operator

import torch

from . import _checks, reference
from .attention import attention, dropout_rng_state, flash_attention, flash_attention_varlen
from .decode import decode_attention
from .ops.decode import MAX_SPLITS

__all__ = ["FlashAttnCompatError", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
           "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_with_kvcache"]


class FlashAttnCompatError(ValueError, RuntimeError):
    """A bad argument where flash-attn raises RuntimeError (its C++ checks): catch it as either."""


@contextlib.contextmanager
def _flash_attn_errors():
    try:
        yield
    except FlashAttnCompatError:
        raise
    except ValueError as e:
        raise FlashAttnCompatError(str(e)) from e


# --- argument conversion -------------------------------------------------------------------------

def _rng(q, dropout_p):
    """(dropout_p as a float, the call's rng_state or None): drawn here so S_dmask can show the call's mask."""
    p = _checks.check_dropout(dropout_p)
    return p, (dropout_rng_state(q.device) if p > 0 and isinstance(q, torch.Tensor) else None)


def _window(window_size):
    """flash-attn takes any pair (tuple, list, or a 2-element integer tensor as its tests pass)."""
    if isinstance(window_size, torch.Tensor):
        window_size = window_size.tolist()
    if isinstance(window_size, (tuple, list)):
        return tuple(int(w) if isinstance(w, torch.Tensor) else w for w in window_size)
    return window_size


def _softcap(softcap):
    """flash-attn: anything <= 0 disables soft-capping."""
    if isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and softcap <= 0:
        return 0.0
    return softcap


def _host_int(name, x):
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None


def _unpack(name, t, n, ndim, layout):
    """Views q, k, v (n=3) or k, v (n=2) of a packed tensor along dim -3."""
    _checks.check_tensor(name, t, ndim=ndim)
    if t.shape[-3] != n:
        raise FlashAttnCompatError(f"{name} must have layout {layout} (size {n} at dim -3), got {tuple(t.shape)}")
    return t.unbind(dim=-3)


def _s_dmask(q, k, v, p, rng, kw):
    """flash-attn's S_dmask for a dense call with dropout (see the module docstring)."""
    with torch.no_grad():
        return reference.attention_probs(q, k, v, dropout_p=p, rng_state=rng, **kw)


def _s_dmask_varlen(q, k, v, cu_q, cu_k, max_q, max_k, p, rng, kw):
    """S_dmask [B, H, max_seqlen_q, max_seqlen_k] of a varlen call, sequence i with the mask of batch index i."""
    batch, hq = cu_q.shape[0] - 1, q.shape[1]
    s = torch.zeros(batch, hq, max_q, max_k, dtype=torch.float32, device=q.device)
    bq = reference.varlen_bounds(cu_q.tolist(), q.shape[0])
    bk = reference.varlen_bounds(cu_k.tolist(), k.shape[0])
    with torch.no_grad():
        for i, ((qa, qb), (ka, kb)) in enumerate(zip(bq, bk)):
            if qb > qa and kb > ka:
                slopes = kw["alibi_slopes"]
                one = dict(kw, alibi_slopes=slopes[i] if slopes is not None and slopes.dim() == 2 else slopes)
                s[i, :, :qb - qa, :kb - ka] = reference.attention_probs(
                    q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], dropout_p=p, rng_state=rng,
                    dropout_batch_offset=i, **one)[0]
    return s


# --- dense and varlen attention ------------------------------------------------------------------

def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
           return_attn_probs, backend):
    p, rng = _rng(q, dropout_p)
    _checks.check_bool("return_attn_probs", return_attn_probs)
    kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=_window(window_size), alibi_slopes=alibi_slopes,
              softcap=_softcap(softcap))
    with _flash_attn_errors():
        res = flash_attention(q, k, v, deterministic=deterministic, return_lse=return_attn_probs, dropout_p=p,
                              rng_state=rng, backend=backend, **kw)
        if not return_attn_probs:
            return res
        return res[0], res[1], (_s_dmask(q, k, v, p, rng, kw) if p > 0 else None)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
            window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table, backend):
    p, rng = _rng(q, dropout_p)
    _checks.check_bool("return_attn_probs", return_attn_probs)
    max_seqlen_q, max_seqlen_k = _host_int("max_seqlen_q", max_seqlen_q), _host_int("max_seqlen_k", max_seqlen_k)
    kw = dict(causal=causal, softmax_scale=softmax_scale, window_size=_window(window_size), alibi_slopes=alibi_slopes,
              softcap=_softcap(softcap))
    with _flash_attn_errors():
        if block_table is not None:
            k, v = _gather_pages(q, k, v, cu_seqlens_k, block_table)
        res = flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     deterministic=deterministic, return_lse=return_attn_probs, dropout_p=p,
                                     rng_state=rng, backend=backend, **kw)
        if not return_attn_probs:
            return res
        s_dmask = None
        if p > 0:
            s_dmask = _s_dmask_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, p, rng, kw)
        return res[0], res[1], s_dmask


def _gather_pages(q, k_cache, v_cache, cu_seqlens_k, block_table):
    """Packed keys/values [total_k, Hkv, D] of a paged cache (a copy): token t of sequence b is slot
    t % page_size of page block_table[b, t // page_size]. Reads cu_seqlens_k and block_table on the host (the
    packed size depends on them) and checks them there."""
    for name, t in (("k", k_cache), ("v", v_cache)):
        _checks.check_tensor(name, t, ndim=4, last_dim_contiguous=True)
        _checks.check_same_device(name, t, "q", q)
    if k_cache.shape != v_cache.shape:
        raise FlashAttnCompatError(f"k and v must have the same shape, got {tuple(k_cache.shape)} and "
                                   f"{tuple(v_cache.shape)}")
    _checks.check_index_tensor("block_table", block_table, 2, "q", q)
    _checks.check_index_tensor("cu_seqlens_k", cu_seqlens_k, 1, "q", q)
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    batch, max_pages = block_table.shape
    if cu_seqlens_k.shape[0] != batch + 1:
        raise FlashAttnCompatError(f"block_table must have shape [B, max_pages] with B = len(cu_seqlens_k) - 1 = "
                                   f"{cu_seqlens_k.shape[0] - 1}, got {tuple(block_table.shape)}")
    cu = cu_seqlens_k.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise FlashAttnCompatError(f"cu_seqlens_k must start at 0 and be non-decreasing, got {cu}")
    table = block_table.tolist()
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        if b - a > max_pages * page_size:
            raise FlashAttnCompatError(f"block_table: sequence {i} has {b - a} keys, more than its {max_pages} "
                                       f"pages of {page_size} hold")
        bad = [p for p in table[i][: -(-(b - a) // page_size)] if not 0 <= p < num_pages]
        if bad:
            raise FlashAttnCompatError(f"block_table[{i}] refers to pages {bad[:4]} outside 0..{num_pages - 1}")
    cu_long = cu_seqlens_k.long()
    tok = torch.arange(cu[-1], device=q.device)
    seq = torch.searchsorted(cu_long[1:], tok, right=True)
    pos = tok - cu_long[seq]
    page = block_table.long()[seq, pos // page_size]
    return k_cache[page, pos % page_size], v_cache[page, pos % page_size]


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend="auto"):
    """flash-attn's flash_attn_func: q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (H a multiple of Hkv); causal and
    window bottom-right aligned; alibi_slopes fp32 [H] or [B, H]; softcap > 0 enables soft-capping.
    Returns out [B, Sq, H, D], or (out, softmax_lse [B, H, Sq] fp32, S_dmask) with return_attn_probs (S_dmask: None
    without dropout, see the module docstring). dropout_p > 0: attention dropout in the kernels.
    Differentiable (deterministic: bit-identical gradients)."""
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, backend)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              backend="auto"):
    """flash_attn_func on qkv [B, S, 3, H, D] (views, no copies); gradients flow into qkv."""
    q, k, v = _unpack("qkv", qkv, 3, 5, "[B, S, 3, H, D]")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             backend="auto"):
    """flash_attn_func on q [B, Sq, H, D] and kv [B, Sk, 2, Hkv, D] (views, no copies)."""
    k, v = _unpack("kv", kv, 2, 5, "[B, Sk, 2, Hkv, D]")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, backend)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, backend="auto"):
    """flash-attn's flash_attn_varlen_func: q [total_q, H, D], k/v [total_k, Hkv, D], cu_seqlens_* int32
    [B + 1], max_seqlen_* ints. Returns out [total_q, H, D], or (out, softmax_lse [H, total_q], S_dmask).

    block_table [B, max_pages] int32 (paged prefill): k/v are then a paged cache [num_pages, page_size, Hkv, D]
    and sequence b's keys are its first cu_seqlens_k[b + 1] - cu_seqlens_k[b] tokens. They are gathered into
    packed k/v (a copy; cu_seqlens_k and block_table are read and checked on the host) before the varlen call."""
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table, backend)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, backend="auto"):
    """flash_attn_varlen_func on qkv [total, 3, H, D] (views) with one cu_seqlens / max_seqlen for q and k."""
    q, k, v = _unpack("qkv", qkv, 3, 4, "[total, 3, H, D]")
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs, None, backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    backend="auto"):
    """flash_attn_varlen_func on q [total_q, H, D] and kv [total_k, 2, Hkv, D] (views)."""
    k, v = _unpack("kv", kv, 2, 4, "[total_k, 2, Hkv, D]")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                   causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, None, backend)


# --- attention over a KV cache -------------------------------------------------------------------

def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            backend="auto"):
    """flash-attn's flash_attn_with_kvcache (forward only): q [B, Sq, H, D] over k_cache / v_cache
    [B_cache, S_max, Hkv, D] (or paged [num_pages, page_size, Hkv, D] with block_table [B, max_pages] int32),
    after appending k / v [B, seqlen_new, Hkv, D] in place at cache_seqlens. Returns out [B, Sq, H, D], or
    (out, softmax_lse [B, H, Sq] fp32) with return_softmax_lse. See the module docstring for how each argument
    is served."""
    with _flash_attn_errors():
        return _with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                             cache_leftpad, block_table, softmax_scale, causal, _window(window_size),
                             _softcap(softcap), rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse,
                             backend)


def _with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                  block_table, softmax_scale, causal, window, softcap, rotary_interleaved, alibi_slopes, num_splits,
                  return_lse, backend):
    _checks.check_tensor("q", q, ndim=4, dtypes=_checks.FLOAT_DTYPES, last_dim_contiguous=True)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.check_tensor(name, t, ndim=4, last_dim_contiguous=True)
    for name, flag in (("causal", causal), ("rotary_interleaved", rotary_interleaved),
                       ("return_softmax_lse", return_lse)):
        _checks.check_bool(name, flag)
    window = _checks.check_window(window)
    if not isinstance(num_splits, int) or isinstance(num_splits, bool):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    num_splits = min(max(num_splits, 0), MAX_SPLITS)     # a performance hint: any value gives the same result
    b, sq = q.shape[0], q.shape[1]
    if (k is None) != (v is None):
        raise FlashAttnCompatError("k and v must be given together (new tokens to append) or both be None")
    if k is not None:
        _checks.check_tensor("k", k, ndim=4)
    snew = 0 if k is None else k.shape[1]
    check = _checks.check_validate(None, q)     # value checks that need no device-to-host copy

    # Which cache rows / pages each batch entry reads.
    if block_table is not None:
        if cache_batch_idx is not None:
            raise FlashAttnCompatError("cache_batch_idx is not supported with a paged KV cache (block_table)")
        if cache_leftpad is not None:
            raise FlashAttnCompatError("cache_leftpad is not supported with a paged KV cache (block_table)")
        _checks.check_index_tensor("block_table", block_table, 2, "q", q)
    elif cache_batch_idx is not None or k_cache.shape[0] > b:
        # A contiguous cache [B_cache, S_max, Hkv, D] read through row indices is a paged cache of B_cache pages of
        # S_max tokens; flash-attn reads rows 0..B-1 of a larger cache when no cache_batch_idx is given.
        if cache_batch_idx is None:
            cache_batch_idx = torch.arange(b, dtype=torch.int32, device=q.device)
        _checks.check_lengths_tensor("cache_batch_idx", cache_batch_idx, b, "q", q)
        if check:
            bad = ((cache_batch_idx < 0) | (cache_batch_idx >= k_cache.shape[0])).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise FlashAttnCompatError(f"cache_batch_idx[{i}] = {int(cache_batch_idx[i])} is outside "
                                           f"0..{k_cache.shape[0] - 1} (the rows of k_cache)")
        block_table = cache_batch_idx.clamp(-1, k_cache.shape[0]).to(torch.int32).view(b, 1)
    else:
        cache_batch_idx = None
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if snew > capacity:
        raise FlashAttnCompatError(f"k has {snew} new tokens, more than the cache holds per sequence ({capacity})")

    # cache_seqlens: int, int32/int64 tensor or None (a full cache).
    if cache_seqlens is None:
        if k is not None:
            raise FlashAttnCompatError("cache_seqlens is required when k and v are given (where to append them)")
        seqlens = torch.full((b,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity - snew:
            raise FlashAttnCompatError(f"cache_seqlens = {cache_seqlens} (+{snew} appended) is outside the cache "
                                       f"capacity 0..{capacity}")
        seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        _checks.check_lengths_tensor("cache_seqlens", cache_seqlens, b, "q", q)
        # int64 values far outside the cache stay outside it (same visible length, same dropped appends) in int32
        seqlens = cache_seqlens.clamp(-2 ** 30, 2 ** 30).to(torch.int32)
    if paged and cache_batch_idx is None and cache_seqlens is not None:
        # flash-attn checks this on the host for paged caches (its kernels would index block_table out of bounds).
        longest = int(seqlens.max()) + snew
        if longest > capacity:
            raise FlashAttnCompatError(f"block_table: max(cache_seqlens) + seqlen_new = {longest} exceeds the "
                                       f"capacity the block_table addresses ({block_table.shape[1]} pages x "
                                       f"{k_cache.shape[1]} tokens = {capacity})")

    # Rotary embedding of q and the appended k, at their positions in the sequence.
    rotary = {}
    if rotary_cos is not None or rotary_sin is not None:
        _checks.check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q, k, capacity)
        rotary = dict(rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved)

    kw = dict(softmax_scale=softmax_scale, window_size=window, alibi_slopes=alibi_slopes, softcap=softcap,
              backend=backend)
    step = _checks.MAX_DECODE_QUERIES
    if k is not None and snew == sq and (sq <= step or causal) and cache_leftpad is None:
        # Appends inside the decode calls: chunk i appends its tokens and sees the cache up to them; the rotary
        # tables turn each chunk's keys and queries in the call (query i of chunk c at seqlens + c + i when causal).
        kw.update(num_splits=num_splits, causal=causal, return_lse=return_lse, **rotary)
        res = [decode_attention(q[:, i:i + step], k_cache, v_cache, seqlens + i, k=k[:, i:i + step],
                                v=v[:, i:i + step], block_table=block_table, **kw) for i in range(0, sq, step)]
        return _cat(res, return_lse)
    if rotary:   # the appends and queries below run apart: rotate first
        q, k = reference.rotary_decode(q, k, seqlens, rotary_cos, rotary_sin, interleaved=rotary_interleaved,
                                       q_per_token=reference.rotary_q_per_token(causal, window, capacity))
    dense = cache_leftpad is not None or (sq > step and not causal and (window != (-1, -1) or alibi_slopes is not None))
    if dense:
        return _attend_dense(q, k_cache, v_cache, k, v, seqlens, cache_batch_idx, cache_leftpad, block_table, causal,
                             return_lse, kw, check)
    kw.update(num_splits=num_splits, causal=causal, return_lse=return_lse)
    if k is not None:
        _append(k_cache, v_cache, seqlens, k, v, block_table, backend)
    total = seqlens + snew
    res = []
    for i in range(0, sq, step):
        c = min(step, sq - i)
        # causal: the chunk's last query sits at position total - sq + i + c - 1 (flash-attn's bottom-right rule)
        visible = (total - (sq - i - c)).clamp_min(0) if causal else total
        res.append(decode_attention(q[:, i:i + c], k_cache, v_cache, visible, block_table=block_table, **kw))
    return _cat(res, return_lse)


def _cat(res, return_lse):
    if len(res) == 1:
        return res[0]
    if return_lse:
        return torch.cat([r[0] for r in res], dim=1), torch.cat([r[1] for r in res], dim=2)
    return torch.cat(res, dim=1)


def _append(k_cache, v_cache, seqlens, k, v, block_table, backend):
    """Write k / v [B, seqlen_new, Hkv, D] into the cache at seqlens.. through decode_attention's in-place append
    (the kernels' append and index rules), with zero queries that each see one key (output discarded)."""
    step = _checks.MAX_DECODE_QUERIES
    for i in range(0, k.shape[1], step):
        kc = k[:, i:i + step]
        decode_attention(torch.zeros(kc.shape, dtype=kc.dtype, device=kc.device), k_cache, v_cache, seqlens + i,
                         k=kc, v=v[:, i:i + step], block_table=block_table, causal=True, window_size=(0, 0),
                         backend=backend)


def _attend_dense(q, k_cache, v_cache, k, v, seqlens, cache_batch_idx, cache_leftpad, block_table, causal,
                  return_lse, kw, check):
    """Attention over a run of visible keys per sequence: key_start = cache_leftpad (or 0), key_end = cache_seqlens
    + seqlen_new (clamped to the cache), causal / window / ALiBi aligned to the run's end."""
    b = q.shape[0]
    if block_table is not None and cache_batch_idx is None:
        raise NotImplementedError("window_size / alibi_slopes with causal=False and more than "
                                  f"{_checks.MAX_DECODE_QUERIES} queries over a paged cache (block_table)")
    capacity = k_cache.shape[1]
    end = (seqlens + (0 if k is None else k.shape[1])).clamp(0, capacity)
    if cache_leftpad is None:
        start = torch.zeros_like(end)
    else:
        _checks.check_lengths_tensor("cache_leftpad", cache_leftpad, b, "q", q)
        if check:
            bad = ((cache_leftpad < 0) | (cache_leftpad > end)).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise FlashAttnCompatError(f"cache_leftpad[{i}] = {int(cache_leftpad[i])} is outside "
                                           f"0..{int(end[i])} (cache_seqlens[{i}] + seqlen_new)")
        start = cache_leftpad.to(torch.int32)
    if k is not None:
        _append(k_cache, v_cache, seqlens, k, v, block_table, kw["backend"])
    if cache_batch_idx is not None:        # rows cache_batch_idx[b] (a copy)
        rows = cache_batch_idx.long().clamp(0, k_cache.shape[0] - 1)
        k_cache, v_cache = k_cache.index_select(0, rows), v_cache.index_select(0, rows)
    return attention(q, k_cache, v_cache, key_start=start, key_end=end, causal=causal, causal_align="bottom_right",
                     return_lse=return_lse, validate=False, **kw)
