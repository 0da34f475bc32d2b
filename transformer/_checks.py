"""Argument validation shared by every public function and by the reference.

Each check raises ``TypeError`` (wrong type/dtype) or ``ValueError`` (wrong shape, device,
strides or limit) whose message names the argument and says what is allowed. Checks here
never copy device memory to the host: value checks that would (cu_seqlens monotone,
block_table entries in range) live in ``check_*_values`` and run when a caller passes
``validate=True``, which is the default for CPU tensors (``validate=None``).

Index values that are not checked follow one documented semantics on every backend, and no kernel
reads or writes outside its tensors for any of them:

* varlen ``cu_seqlens``: each entry is clamped into 0..total (the packed tokens of q or k), then replaced by
  the running max of the entries up to it, so sequence b spans [c[b], c[b + 1]) and sequences never
  overlap; tokens in no sequence give 0 (lse -inf, gradients 0). Outputs of queries past ``max_seqlen_q``
  (and gradients of keys past ``max_seqlen_k``) are unspecified when it is smaller than a sequence.
* padded attention ``key_start`` / ``key_end`` (and the modules' key lengths): start = clamp(start, 0, Nk),
  end = clamp(end, start, Nk).
* decode ``cache_seqlens``: the visible length is clamp(cache_seqlens[b] + appended, 0, capacity); an
  appended token at a position outside 0..capacity-1 is not written. ``block_table``: a page id outside
  0..num_pages-1 holds no visible token (it contributes nothing) and appends into it are dropped. A quantized
  cache follows the same rules for its 8-bit values and its scales alike (a dropped append writes neither).
"""
from __future__ import annotations

import math

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Quantized KV-cache formats (kv_dtype names) -> storage dtype; K/V carry one fp32 scale per (token, kv head).
KV_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
MAX_HEAD_DIM = 256
MAX_DECODE_QUERIES = 16


def _names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name, t, *, ndim=None, dtypes=None, last_dim_contiguous=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {t.dtype}")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride(-1) == 1), "
                         f"got strides {t.stride()}")
    return t


def check_same_device(name, t, ref_name, ref):
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_same_dtype(name, t, ref_name, ref):
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def check_index_tensor(name, t, ndim, ref_name, ref):
    check_tensor(name, t, ndim=ndim)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {t.dtype}")
    check_same_device(name, t, ref_name, ref)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_bool(name, value):
    """Flags (causal, deterministic, return_lse, prenorm, ...) must be real bools: "no" or 1 is not taken as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_validate(validate, ref):
    """validate=None: check index values when that needs no device-to-host copy (CPU tensors), except while
    torch.compile traces (reading values there would break the graph)."""
    if validate is None:
        return ref.device.type == "cpu" and not torch.compiler.is_compiling()
    return check_bool("validate", validate)


def check_lengths_tensor(name, t, batch, ref_name, ref):
    """A [B] int32/int64 tensor of per-sequence lengths or bounds on ref's device."""
    check_tensor(name, t, ndim=1)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 or int64, got {t.dtype}")
    if t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B]=[{batch}], got {tuple(t.shape)}")
    check_same_device(name, t, ref_name, ref)
    return t


def check_dropout(dropout_p, rng_state=None, device=None, name="dropout_p"):
    """dropout_p: a real number in [0, 1) (TypeError / ValueError naming it); with dropout_p > 0 and a device,
    rng_state an int64 tensor [2] on that device."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and device is not None:
        if not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.int64 or rng_state.shape != (2,):
            raise ValueError("rng_state must be an int64 tensor [2] (seed, offset) when dropout_p > 0, got "
                             f"{rng_state if not isinstance(rng_state, torch.Tensor) else tuple(rng_state.shape)}")
        if rng_state.device != device:
            raise ValueError(f"rng_state must be on the inputs' device ({device}), got {rng_state.device}")
    return float(dropout_p)


def check_window(window_size):
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(_is_int(w) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if w < -1:
            raise ValueError(f"window_size {side} must be -1 (unbounded) or >= 0, got {w}")
    return int(window_size[0]), int(window_size[1])


def check_softcap(softcap):
    if not _is_real(softcap):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be finite and >= 0 (0 disables it), got {softcap}")
    return float(softcap)


def check_scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return head_dim ** -0.5
    if not _is_real(softmax_scale):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale}")
    return float(softmax_scale)


def check_alibi(alibi_slopes, batch, hq, ref):
    if alibi_slopes is None:
        return None
    check_tensor("alibi_slopes", alibi_slopes, ndim=(1, 2), dtypes=(torch.float32,))
    check_same_device("alibi_slopes", alibi_slopes, "q", ref)
    ok = tuple(alibi_slopes.shape) in ((hq,), (batch, hq))
    if not ok:
        raise ValueError(f"alibi_slopes must have shape [Hq]=[{hq}] or [B, Hq]=[{batch}, {hq}], "
                         f"got {tuple(alibi_slopes.shape)}")
    return alibi_slopes


def check_kv_dtype(kv_dtype, name="kv_dtype", allow_none=True):
    """A quantized KV-cache format name ("int8", "fp8_e4m3"), or None (unquantized) where allowed."""
    if kv_dtype is None and allow_none:
        return None
    if not isinstance(kv_dtype, str) or kv_dtype not in KV_DTYPES:
        allowed = ", ".join(repr(k) for k in KV_DTYPES) + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be one of {allowed}, got {kv_dtype!r}")
    return kv_dtype


def kv_dtype_of(t):
    """The kv_dtype name of a quantized cache tensor's dtype, or None."""
    return next((n for n, dt in KV_DTYPES.items() if dt == t.dtype), None)


def check_kv_scales(k_cache, v_cache, k_scale, v_scale):
    """Scales of a quantized cache: fp32 [dims of the cache without D] on its device; none for a 16/32-bit cache.
    Returns the kv_dtype name (None: unquantized)."""
    kv_dtype = kv_dtype_of(k_cache)
    for name, s, cache in (("k_scale", k_scale, k_cache), ("v_scale", v_scale, v_cache)):
        if kv_dtype is None:
            if s is not None:
                raise ValueError(f"{name} is only for a quantized cache (int8 / float8_e4m3fn k_cache and v_cache), "
                                 f"but the cache is {k_cache.dtype}")
            continue
        if s is None:
            raise ValueError(f"{name} is required with a quantized ({kv_dtype}) cache: fp32 {name} of shape "
                             f"{tuple(cache.shape[:-1])} (one scale per token and kv head)")
        check_tensor(name, s, ndim=cache.dim() - 1, dtypes=(torch.float32,))
        check_same_device(name, s, "k_cache", k_cache)
        if tuple(s.shape) != tuple(cache.shape[:-1]):
            raise ValueError(f"{name} must have shape {tuple(cache.shape[:-1])} (the cache's without D), "
                             f"got {tuple(s.shape)}")
    return kv_dtype


def check_heads(hq, hkv, what="k"):
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"the number of query heads (q: {hq}) must be a multiple of the number of "
                         f"key/value heads ({what}: {hkv})")


def check_attention(q, k, v, *, varlen=False, cu_seqlens_q=None, cu_seqlens_k=None,
                    window_size=(-1, -1), softcap=0.0, softmax_scale=None, alibi_slopes=None,
                    key_padding_mask=None, dtypes=FLOAT_DTYPES):
    """Validate the arguments of flash attention (dense or varlen). Returns a small dict of sizes."""
    rank = 3 if varlen else 4
    layout = "[total, H, D]" if varlen else "[B, N, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=dtypes, last_dim_contiguous=True)
        if t.dim() != rank:
            raise ValueError(f"{name} must have layout {layout} ({rank} dims), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_same_device(name, t, "q", q)
        check_same_dtype(name, t, "q", q)
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"q, k and v must share the head dim, got q {q.shape[-1]}, k {k.shape[-1]}, "
                         f"v {v.shape[-1]}")
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) must be in 1..{MAX_HEAD_DIM}, got {d}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    check_heads(hq, hkv)
    if varlen:
        check_index_tensor("cu_seqlens_q", cu_seqlens_q, 1, "q", q)
        check_index_tensor("cu_seqlens_k", cu_seqlens_k, 1, "q", q)
        if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0] or cu_seqlens_q.shape[0] < 2:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have length batch+1 >= 2, got "
                             f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
        batch = cu_seqlens_q.shape[0] - 1
        nq = nk = None
    else:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k must have the batch size of q ({q.shape[0]}), got {k.shape[0]}")
        batch, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    window = check_window(window_size)
    cap = check_softcap(softcap)
    scale = check_scale(softmax_scale, d)
    check_alibi(alibi_slopes, batch, hq, q)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        if varlen or tuple(key_padding_mask.shape) != (batch, nk):
            raise ValueError(f"key_padding_mask must have shape [B, Nk]=[{batch}, {nk}] (dense layout only), "
                             f"got {tuple(key_padding_mask.shape)}")
        check_same_device("key_padding_mask", key_padding_mask, "q", q)
    return dict(batch=batch, nq=nq, nk=nk, hq=hq, hkv=hkv, head_dim=d, window=window, softcap=cap,
                scale=scale)


def check_cu_seqlens_values(name, cu, total, max_seqlen=None, max_name="max_seqlen"):
    """Host-syncing value check (validate=True; the default for CPU tensors)."""
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {c[0]}")
    for i in range(1, len(c)):
        if c[i] < c[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}] = {c[i]} < {name}[{i - 1}] = {c[i - 1]}")
    if c[-1] > total:
        raise ValueError(f"{name}[{len(c) - 1}] = {c[-1]} exceeds the number of packed tokens ({total})")
    longest = max(b - a for a, b in zip(c, c[1:]))
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than the longest sequence of {name} ({longest})")


def check_key_bounds_values(start_name, start, end_name, end, nk):
    """Host-syncing check of padded-attention bounds: 0 <= start[b] <= end[b] <= nk."""
    s, e = start.tolist(), end.tolist()
    for i, (a, b) in enumerate(zip(s, e)):
        if not 0 <= a <= nk:
            raise ValueError(f"{start_name}[{i}] = {a} is outside 0..{nk} (the number of keys)")
        if not a <= b <= nk:
            raise ValueError(f"{end_name}[{i}] = {b} is outside {start_name}[{i}]..{nk} ({a}..{nk})")


def check_norm(x, weight, bias, eps, residual, *, has_bias=True):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    params = [("weight", weight)] + ([("bias", bias)] if has_bias else [])
    for name, p in params:
        if p is None:
            continue
        check_tensor(name, p, ndim=1, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
        if p.shape[0] != n:
            raise ValueError(f"{name} must have shape [{n}] (the last dim of x), got {tuple(p.shape)}")
        check_same_device(name, p, "x", x)
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"residual must have the dtype of x ({x.dtype}) or float32, got {residual.dtype}")
        check_same_device("residual", residual, "x", x)
    if not _is_real(eps):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    return n


def check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q, k, capacity):
    """Rotary tables of decode_attention: rotary_cos / rotary_sin [seqlen_ro, rotary_dim / 2] of a float dtype on
    q's device, rotary_dim even in 2..D, seqlen_ro >= the cache capacity (so every position a valid cache_seqlens
    gives is a row of the tables), k / v given (the tables rotate the appended keys). Returns rotary_dim (0: no
    tables)."""
    check_bool("rotary_interleaved", rotary_interleaved)
    if rotary_cos is None and rotary_sin is None:
        return 0
    if rotary_cos is None or rotary_sin is None:
        raise ValueError(f"rotary_cos and rotary_sin must be given together, got only "
                         f"{'rotary_cos' if rotary_sin is None else 'rotary_sin'}")
    if k is None:
        raise ValueError("rotary_cos / rotary_sin rotate the appended keys: pass k and v with them")
    d = q.shape[-1]
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES)
        check_same_device(name, t, "q", q)
    if rotary_sin.shape != rotary_cos.shape:
        raise ValueError(f"rotary_sin must have the shape of rotary_cos {tuple(rotary_cos.shape)}, got "
                         f"{tuple(rotary_sin.shape)}")
    seqlen_ro, half = rotary_cos.shape
    if not 1 <= half <= d // 2:
        raise ValueError(f"rotary_cos must have shape [seqlen_ro, rotary_dim / 2] with an even rotary_dim in 2..{d} "
                         f"(the head dim), got {tuple(rotary_cos.shape)}")
    if seqlen_ro < capacity:
        raise ValueError(f"rotary_cos / rotary_sin must have at least as many rows as the cache has positions "
                         f"({capacity}), got {seqlen_ro}")
    return 2 * half


def check_decode(q, k_cache, v_cache, cache_seqlens, k=None, v=None, block_table=None,
                 window_size=(-1, -1), softcap=0.0, softmax_scale=None, alibi_slopes=None,
                 dtypes=FLOAT_DTYPES, k_scale=None, v_scale=None, rotary_cos=None, rotary_sin=None,
                 rotary_interleaved=False):
    check_tensor("q", q, ndim=4, dtypes=dtypes, last_dim_contiguous=True)
    b, sq, hq, d = q.shape
    if sq < 1 or sq > MAX_DECODE_QUERIES:
        raise ValueError(f"q must have 1..{MAX_DECODE_QUERIES} queries per sequence (q.shape[1]), got {sq}")
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) must be in 1..{MAX_HEAD_DIM}, got {d}")
    quantized = isinstance(k_cache, torch.Tensor) and kv_dtype_of(k_cache) is not None
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, ndim=4, dtypes=tuple(KV_DTYPES.values()) if quantized else dtypes,
                     last_dim_contiguous=True)
        check_same_device(name, t, "q", q)
        if quantized:   # 8-bit caches of one format, read with q's dtype
            check_same_dtype(name, t, "k_cache", k_cache)
        else:
            check_same_dtype(name, t, "q", q)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    if k_cache.shape[-1] != d:
        raise ValueError(f"k_cache head dim must equal q's ({d}), got {k_cache.shape[-1]}")
    hkv = k_cache.shape[2]
    check_heads(hq, hkv, "k_cache")
    paged = block_table is not None
    if paged:
        check_index_tensor("block_table", block_table, 2, "q", q)
        if block_table.shape[0] != b:
            raise ValueError(f"block_table must have shape [B={b}, max_pages], got {tuple(block_table.shape)}")
        page_size = k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache must have shape [B={b}, S_max, Hkv, D] (or pass block_table for a "
                             f"paged cache), got {tuple(k_cache.shape)}")
        page_size = None
        capacity = k_cache.shape[1]
    check_index_tensor("cache_seqlens", cache_seqlens, 1, "q", q)
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens must have shape [B={b}], got {tuple(cache_seqlens.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, ndim=4, dtypes=dtypes, last_dim_contiguous=True)
            check_same_device(name, t, "q", q)
            check_same_dtype(name, t, "q", q)
            if tuple(t.shape) != (b, sq, hkv, d):
                raise ValueError(f"{name} must have shape [B, Sq, Hkv, D]=[{b}, {sq}, {hkv}, {d}], "
                                 f"got {tuple(t.shape)}")
        if sq > capacity:
            raise ValueError(f"the cache holds at most {capacity} tokens per sequence, too few to append "
                             f"{sq} new tokens (k)")
    window = check_window(window_size)
    cap = check_softcap(softcap)
    scale = check_scale(softmax_scale, d)
    check_alibi(alibi_slopes, b, hq, q)
    kv_dtype = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    rotary_dim = check_rotary(rotary_cos, rotary_sin, rotary_interleaved, q, k, capacity)
    return dict(batch=b, sq=sq, hq=hq, hkv=hkv, head_dim=d, paged=paged, page_size=page_size,
                capacity=capacity, window=window, softcap=cap, scale=scale, kv_dtype=kv_dtype, rotary_dim=rotary_dim)


def check_decode_values(cache_seqlens, block_table, num_pages, page_size, capacity, appended):
    """Host-syncing value checks (validate=True; the default for CPU tensors)."""
    lens = cache_seqlens.tolist()
    for i, n in enumerate(lens):
        if n < 0 or n + appended > capacity:
            raise ValueError(f"cache_seqlens[{i}] = {n} (+{appended} appended) is outside the cache "
                             f"capacity 0..{capacity}")
        if block_table is not None:
            used = block_table[i, : -(-(n + appended) // page_size)].tolist()
            bad = [p for p in used if p < 0 or p >= num_pages]
            if bad:
                raise ValueError(f"block_table[{i}] refers to pages {bad[:4]} outside 0..{num_pages - 1}")
