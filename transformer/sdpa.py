"""Drop-in ``scaled_dot_product_attention`` and attention over padded batches.

``scaled_dot_product_attention`` has the signature, layout ([..., H, L, E]) and semantics of
``torch.nn.functional.scaled_dot_product_attention`` (top-left ``is_causal``, boolean masks True =
"take part", float masks added to the scores). It is served by ``flash_attention`` (any backend the
dispatcher picks) when it can be, with no copies for [B, H, L, E] inputs (the [B, L, H, E] views the
kernels read are transposes). What is recognised:

* no mask, with or without ``is_causal`` (top-left, like SDPA);
* a boolean mask, or a float mask holding only 0 and -inf, that is a key-padding pattern: the same for
  every head and query row, and per batch element a single run of visible keys (left padding, right
  padding or both) -- served by ``padded_attention``;
* a mask equal to SDPA's causal pattern (lower triangle), served as ``is_causal``.

``dropout_p > 0`` is served by the same paths: the kernels apply attention dropout with their counter-based
mask (transformer/reference.py, ``dropout_keep``; seed drawn from the default generator of query's device), so
the dropped elements differ from PyTorch's random stream (the statistics are the same). A backend that cannot
apply that mask (the torch backend) is skipped for such calls by the dispatcher.

Everything else falls back to PyTorch's own function (documented, exact; with its own dropout): other masks,
broadcast batch dims, a value head dim different from the query's, head dims above 256, inputs with a
non-unit last stride, and masks met while ``torch.compile`` traces (recognising one reads its values).

``padded_attention`` (transformer/attention.py, re-exported here) is the building block the modules and
models use: attention in the flash-attn layout [B, N, H, D] where batch element b only sees keys
``key_start[b] <= j < key_end[b]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _checks
from .attention import attention, padded_attention

__all__ = ["scaled_dot_product_attention", "padded_attention", "key_run_bounds", "classify_sdpa_mask"]


# ---------------------------------------------------------------------------------------------
# Key runs
# ---------------------------------------------------------------------------------------------

def key_run_bounds(keep):
    """(start, end, ok) for a boolean keep mask [B, S]: per row, the first visible key and one past the
    last one (0, 0 for rows with none); ok is a host bool, True when every row's visible keys form one run.
    Costs one device-to-host copy."""
    s = keep.shape[-1]
    idx = torch.arange(s, device=keep.device)
    any_k = keep.any(dim=-1)
    start = torch.where(keep, idx, s).amin(dim=-1)
    end = torch.where(keep, idx + 1, 0).amax(dim=-1)
    start = torch.where(any_k, start, torch.zeros_like(start))
    count = keep.sum(dim=-1)
    ok = bool((count == end - start).all())
    return start.to(torch.int32), end.to(torch.int32), ok


# ---------------------------------------------------------------------------------------------
# Drop-in F.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------

def _keep_mask(attn_mask):
    """Boolean "take part" mask from an SDPA attn_mask, or None if it is a float mask with other values."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    zero, ninf = attn_mask == 0, attn_mask == float("-inf")
    if not bool((zero | ninf).all()):
        return None
    return zero


def classify_sdpa_mask(attn_mask, batch, heads, nq, nk):
    """Recognise an SDPA attn_mask (broadcastable to [B, H, Nq, Nk]).

    Returns ("none",), ("causal",) (SDPA's top-left lower triangle), ("keys", start, end) (a run of
    visible keys per batch element, same for every head and row) or ("other",). Reads the mask's values
    (one or two device-to-host copies).
    """
    m = _keep_mask(attn_mask)
    if m is None or m.dim() > 4:
        return ("other",)
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    if m.shape[1] != 1:  # per-head masks
        if not bool((m == m[:, :1]).all()):
            return ("other",)
        m = m[:, :1]
    if m.shape[-1] != nk:
        return ("other",)
    if m.shape[2] == nq and nq > 1 and not bool((m == m[:, :, :1]).all()):
        tril = torch.ones(nq, nk, dtype=torch.bool, device=m.device).tril()
        return ("causal",) if bool((m == tril).all()) else ("other",)
    keep = m[:, 0, 0, :].expand(batch, nk)
    if bool(keep.all()):
        return ("none",)
    start, end, ok = key_run_bounds(keep)
    return ("keys", start, end) if ok else ("other",)


def _check_sdpa_args(query, key, value, dropout_p, is_causal, scale, enable_gqa, attn_mask):
    for name, t in (("query", query), ("key", key), ("value", value)):
        _checks.check_tensor(name, t, dtypes=_checks.FLOAT_DTYPES)
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions [..., L, E], got shape {tuple(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        _checks.check_same_device(name, t, "query", query)
        _checks.check_same_dtype(name, t, "query", query)
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key must have the embedding dim of query ({query.shape[-1]}), got {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"value must have key's sequence length ({key.shape[-2]}), got {value.shape[-2]}")
    if query.dim() >= 3 and key.dim() >= 3:
        hq, hkv = query.shape[-3], key.shape[-3]
        if hq != hkv and not enable_gqa:
            raise ValueError(f"query has {hq} heads and key {hkv}: pass enable_gqa=True for grouped-query attention")
        if enable_gqa and hq % hkv != 0:
            raise ValueError(f"query heads ({hq}) must be a multiple of key heads ({hkv}) with enable_gqa")
    _checks.check_dropout(dropout_p)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if attn_mask is not None:
        _checks.check_tensor("attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        _checks.check_same_device("attn_mask", attn_mask, "query", query)
        if is_causal:
            raise ValueError("attn_mask must be None when is_causal=True (as in F.scaled_dot_product_attention)")
        target = tuple(query.shape[:-1]) + (key.shape[-2],)
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), target)
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[..., L, S]={list(target)}") from None


def _as_4d(t):
    """[..., H, L, E] -> [B, H, L, E] view-or-copy with the leading dims flattened (None if not 3+ dims)."""
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.dim() == 4:
        return t
    return t.reshape(-1, *t.shape[-3:])


def _kernel_path_reason(query, key, value):
    if query.dim() < 3 or query.dim() != key.dim() or key.dim() != value.dim():
        return "inputs of different ranks (or without a head dim)"
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        return "broadcast batch dims"
    if value.shape[-1] != query.shape[-1]:
        return "value head dim differs from query's"
    if query.shape[-1] > _checks.MAX_HEAD_DIM:
        return f"head dim above {_checks.MAX_HEAD_DIM}"
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in (query, key, value)):
        return "an input with a non-unit last stride"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend="auto"):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` served by our kernels where possible.

    query [..., Hq, L, E], key [..., Hkv, S, E], value [..., Hkv, S, Ev]; ``is_causal`` is top-left aligned
    (query i sees keys j <= i); ``attn_mask`` is boolean (True = take part) or additive, broadcastable to
    [..., Hq, L, S]: a float mask of any floating dtype (PyTorch takes float32 or query's dtype as they are; any
    other floating dtype is cast to float32 first); ``enable_gqa`` allows Hq a multiple of Hkv. Returns [..., Hq, L, Ev].
    See the module docstring for which calls run on ``flash_attention`` (dropout_p > 0 included: the kernels'
    mask) and which fall back to PyTorch. ``backend`` picks the backend of the kernel path (see transformer.backends).
    """
    _check_sdpa_args(query, key, value, dropout_p, is_causal, scale, enable_gqa, attn_mask)
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype not in (query.dtype, torch.float32):
        attn_mask = attn_mask.float()    # PyTorch takes a float mask in float32 or in query's dtype

    def fallback():
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    if _kernel_path_reason(query, key, value) is not None:
        return fallback()
    lead = query.shape[:-3]
    q4, k4, v4 = _as_4d(query), _as_4d(key), _as_4d(value)
    b, hq, nq, d = q4.shape
    nk = k4.shape[2]
    kind = ("causal",) if is_causal else ("none",)
    if attn_mask is not None:
        if torch.compiler.is_compiling() or query.dim() > 4:
            return fallback()
        kind = classify_sdpa_mask(attn_mask, b, hq, nq, nk)
        if kind[0] == "other":
            return fallback()
    q, k, v = (t.transpose(1, 2) for t in (q4, k4, v4))        # [B, N, H, E] views, no copies
    softmax_scale = scale
    if kind[0] == "keys":
        out = padded_attention(q, k, v, kind[1], kind[2], softmax_scale=softmax_scale, dropout_p=dropout_p,
                               backend=backend)
    else:
        out = attention(q, k, v, causal=kind[0] == "causal", causal_align="top_left", softmax_scale=softmax_scale,
                        dropout_p=dropout_p, backend=backend)
    out = out.transpose(1, 2)                                    # [B, Hq, L, E]
    return out.reshape(*lead, hq, nq, d) if query.dim() != 4 else out
