"""Hugging Face transformers integration: our attention as ``attn_implementation="tileformer"``.

    import transformer.integrations.hf as tf_hf
    tf_hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="tileformer")

``register()`` adds ``attention_forward`` to transformers' ``AttentionInterface`` and, for the masks, reuses
the flash-attention mask builder (``AttentionMaskInterface``): our function receives either no mask (plain
causal / bidirectional attention) or the 2-D padding mask [B, kv_len]. Both map onto our ops:

* no mask: ``flash_attention`` with bottom-right causal alignment (so prefill over a non-empty cache and
  single-token decode steps are right), GQA without repeating K/V, sliding window, softcap;
* a padding mask whose tokens form one run per row (left padding, as ``generate`` uses; or right padding
  in a prefill): ``padded_attention`` (varlen kernels where available);
* anything else (holes in the mask, attention dropout while training) falls back to PyTorch's SDPA with the
  equivalent boolean mask (documented; exact).

transformers is optional: importing this module does not import it; ``register()`` raises ImportError with
an explanation when it is missing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import flash_attention, padded_attention
from ..sdpa import key_run_bounds

__all__ = ["register", "attention_forward", "NAME"]

NAME = "tileformer"


def _fallback(q, k, v, keep, causal, scale, dropout, window, training):
    """q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; keep [B, Lk] bool or None. Exact, via torch SDPA."""
    lq, lk = q.shape[1], k.shape[1]
    i = torch.arange(lq, device=q.device).view(-1, 1) + (lk - lq)
    j = torch.arange(lk, device=q.device).view(1, -1)
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask & (j <= i)
    if window[0] >= 0:
        mask = mask & (j >= i - window[0])
    mask = mask[None, None]
    if keep is not None:
        mask = mask & keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout if training else 0.0, scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, softcap=None, **kwargs):
    """transformers' attention-function signature: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] ->
    (out [B, Lq, Hq, D], None). Attention weights are never returned."""
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='tileformer' does not return attention weights; use 'eager'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))    # [B, L, H, D] views, no copies
    lq, lk = q.shape[1], k.shape[1]
    window = (-1, -1)
    if sliding_window is not None and lk > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    cap = float(softcap) if softcap else 0.0
    training = module.training
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected the 2-D padding mask of the 'tileformer' mask function, "
                         f"got shape {tuple(attention_mask.shape)}")
    if dropout > 0 and training:
        keep = None if attention_mask is None else attention_mask.bool()[:, -lk:]
        return _fallback(q, k, v, keep, causal, scaling, dropout, window, training), None
    if attention_mask is None:
        out = flash_attention(q, k, v, causal=bool(causal), softmax_scale=scaling, window_size=window, softcap=cap)
        return out, None
    keep = attention_mask.bool()[:, -lk:]
    start, end, ok = key_run_bounds(keep)
    align = "bottom_right"
    if ok and (causal or window != (-1, -1)) and not bool((end == lk).all()):
        # Right padding: absolute and in-run positions agree only in a prefill (Lq == Lk) starting at 0.
        ok = lq == lk and not bool((start != 0).any())
        align = "top_left"
    if not ok:
        if cap > 0:
            raise ValueError("attention_mask: softcap with a padding mask that is not one run per row is not "
                             "supported by attn_implementation='tileformer'")
        return _fallback(q, k, v, keep, causal, scaling, 0.0, window, training), None
    out = padded_attention(q, k, v, start, end, causal=bool(causal), causal_align=align, softmax_scale=scaling,
                           window_size=window, softcap=cap)
    return out, None


def register(name: str = NAME):
    """Register ``attention_forward`` (and the flash-style 2-D mask builder) with transformers under `name`."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as e:
        raise ImportError("transformer.integrations.hf needs the optional dependency 'transformers' "
                          "(pip install transformers)") from e
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
