"""Attention modules: ``Attention`` (the block modern LLMs use), ``CrossAttention`` and a drop-in
``MultiheadAttention`` for ``torch.nn.MultiheadAttention``.

All attention math goes through the ops (``transformer.attention.attention`` for dense and padded batches,
``flash_attention_varlen``, ``decode_attention``), so the dispatcher picks, and counts, the kernels.
Layout inside: flash-attn's [B, N, H, D].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks, reference
from ..attention import attention, flash_attention_varlen, padded_attention
from ..decode import decode_attention
from ..sdpa import classify_sdpa_mask, key_run_bounds
from .rope import RotaryEmbedding, apply_rotary

__all__ = ["Attention", "CrossAttention", "MultiheadAttention", "alibi_slopes"]


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): 2^(-8i/n) for n a power of two, interleaved otherwise."""
    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    if n_heads & (n_heads - 1) == 0:
        s = pow2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        s = pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(s, dtype=torch.float32)


def _int_arg(name, val, minimum=1):
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {val!r}")
    return val


def check_lengths(name, lengths, batch, n, ref):
    """[B] integer lengths of a right-padded batch, on ref's device; on CPU tensors (a free check; not while
    torch.compile traces) also 0 <= lengths[b] <= n. Unchecked values are clamped to 0..n by the attention ops."""
    _checks.check_lengths_tensor(name, lengths, batch, "x", ref)
    if _checks.check_validate(None, lengths):
        bad = ((lengths < 0) | (lengths > n)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(f"{name}[{i}] = {int(lengths[i])} is outside 0..{n} (the sequence length)")
    return lengths


def packed_positions(cu_seqlens, total):
    """(sequence index, position within the sequence) of each of `total` packed tokens, as long tensors."""
    tok = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), tok, right=True)
    return seq, tok - cu_seqlens.long()[seq]


class Attention(nn.Module):
    """Self-attention with a fused QKV projection, GQA, RoPE, sliding window, ALiBi and a KV cache.

    Args:
        dim: model width. n_heads: query heads. n_kv_heads: key/value heads (default n_heads; n_heads must be
            a multiple). head_dim: default dim // n_heads.
        causal: decoder (True) or bidirectional (False) attention.
        rope_theta: RoPE base, or None for no rotary embedding. alibi: add ALiBi biases (use without RoPE).
        window_size: flash-attn style (left, right) sliding window; Mistral's window W is (W - 1, 0).
        softcap: tanh soft-capping of the scores (0 = off). bias: biases on the projections.
        dropout: attention dropout probability, applied to the attention probabilities in training mode only
            (fused into the kernels, as flash-attn's modules; decode steps never drop).
        backend: backend for every attention call ("auto" lets the dispatcher choose).

    forward(x, ...) takes one of:
        * x [B, N, dim] (optionally ``key_lengths`` [B]: right-padded batch, position j >= length is padding);
        * x [T, dim] packed sequences with ``cu_seqlens`` [B + 1] int32 and ``max_seqlen`` (host int);
        * either of those with ``cache`` (a KVCache) and ``layer`` to fill an empty cache (prefill), or
          x [B, S, dim] with a non-empty cache: decode step(s) through ``decode_attention`` (S > 16: causal
          chunks of 16 queries, chunked prefill; a quantized cache passes its scales), which appends the new
          keys/values in place. The caller advances the cache (``cache.advance``)
          once all layers have run.
    """

    def __init__(self, dim, n_heads, n_kv_heads=None, head_dim=None, *, causal=True, rope_theta=10000.0,
                 alibi=False, window_size=(-1, -1), softcap=0.0, bias=False, dropout=0.0, backend="auto", device=None,
                 dtype=None):
        super().__init__()
        _int_arg("dim", dim)
        _int_arg("n_heads", n_heads)
        self.dropout = _checks.check_dropout(dropout, name="dropout")
        n_kv_heads = n_heads if n_kv_heads is None else _int_arg("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads}), or pass head_dim")
            head_dim = dim // n_heads
        _int_arg("head_dim", head_dim)
        if rope_theta is not None and alibi:
            raise ValueError("alibi=True expects rope_theta=None (use one position scheme)")
        _checks.check_bool("causal", causal)
        _checks.check_window(window_size)
        _checks.check_softcap(softcap)
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = dim, n_heads, n_kv_heads, head_dim
        self.causal, self.window_size, self.softcap, self.backend = causal, tuple(window_size), softcap, backend
        fk = dict(device=device, dtype=dtype)
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias, **fk)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=bias, **fk)
        self.rope = RotaryEmbedding(head_dim, rope_theta, device=device) if rope_theta is not None else None
        if alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(n_heads).to(device), persistent=False)
        else:
            self.alibi_slopes = None

    def _qkv(self, x):
        qkv = self.wqkv(x).unflatten(-1, (self.n_heads + 2 * self.n_kv_heads, self.head_dim))
        hq, hkv = self.n_heads, self.n_kv_heads
        return qkv[..., :hq, :], qkv[..., hq:hq + hkv, :], qkv[..., hq + hkv:, :]

    def _rotate(self, q, k, positions):
        if self.rope is None:
            return q, k
        cos, sin = self.rope(positions)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _kw(self):
        return dict(softmax_scale=None, window_size=self.window_size, alibi_slopes=self.alibi_slopes,
                    softcap=self.softcap, backend=self.backend)

    def _dropout_p(self):
        """The attention dropout of a training-mode call (0 in eval mode)."""
        return self.dropout if self.training else 0.0

    def forward(self, x, *, key_lengths=None, cu_seqlens=None, max_seqlen=None, cache=None, layer=0):
        if cu_seqlens is not None:
            return self._forward_packed(x, cu_seqlens, max_seqlen, cache, layer)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, N, dim={self.dim}] (or [T, dim] with cu_seqlens), "
                             f"got {tuple(x.shape)}")
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        if cache is not None and not cache.empty:
            return self._decode(q, k, v, cache, layer)
        positions = torch.arange(n, device=x.device)
        q, k = self._rotate(q, k, positions)
        if key_lengths is not None:
            check_lengths("key_lengths", key_lengths, b, n, x)
            start = torch.zeros_like(key_lengths)
            out = padded_attention(q, k, v, start, key_lengths, causal=self.causal, causal_align="top_left",
                                   validate=False, dropout_p=self._dropout_p(), **self._kw())
        else:
            out = attention(q, k, v, causal=self.causal, dropout_p=self._dropout_p(), **self._kw())
        if cache is not None:
            bidx = torch.arange(b, device=x.device).repeat_interleave(n)
            cache.write(layer, k.flatten(0, 1), v.flatten(0, 1), bidx, positions.repeat(b))
        return self.wo(out.flatten(-2))

    def _forward_packed(self, x, cu_seqlens, max_seqlen, cache, layer):
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [T, dim={self.dim}] with cu_seqlens, got {tuple(x.shape)}")
        if cache is not None and not cache.empty:
            raise ValueError("cache must be empty for a packed (prefill) call; decode with x [B, S, dim]")
        q, k, v = self._qkv(x)
        seq, pos = packed_positions(cu_seqlens, x.shape[0])
        q, k = self._rotate(q, k, pos)
        slopes = self.alibi_slopes
        out = flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal,
                                     softmax_scale=None, window_size=self.window_size, alibi_slopes=slopes,
                                     softcap=self.softcap, dropout_p=self._dropout_p(), backend=self.backend)
        if cache is not None:
            cache.write(layer, k, v, seq, pos)
        return self.wo(out.flatten(-2))

    def _decode(self, q, k, v, cache, layer):
        b, s = q.shape[0], q.shape[1]
        if b != cache.batch_size:
            raise ValueError(f"x has batch {b} but the cache holds {cache.batch_size} sequences")
        rotary = {}
        if self.rope is not None:
            # Token i of the step sits at position seqlens + i. decode_attention rotates q and the appended k in the
            # call (RoPE tables over the cache's positions) when it turns query i at seqlens + i too: causal or
            # windowed calls, or one token; otherwise q and k are rotated here.
            rows = cache.k[layer].shape[1] * (cache.block_table.shape[1] if cache.block_table is not None else 1)
            if s == 1 or reference.rotary_q_per_token(self.causal, self.window_size, rows):
                cos, sin = self.rope.tables(rows)
                rotary = dict(rotary_cos=cos, rotary_sin=sin)
            else:
                q, k = self._rotate(q, k, cache.seqlens.long()[:, None] + torch.arange(s, device=q.device))
        # Causal: queries i.. of a chunk see the cache, the earlier chunks (appended by then) and their own
        # chunk up to themselves, as in one call; decode_attention takes at most MAX_DECODE_QUERIES queries.
        step = _checks.MAX_DECODE_QUERIES if self.causal else s
        outs = [decode_attention(q[:, i:i + step], cache.k[layer], cache.v[layer], cache.seqlens + i,
                                 k=k[:, i:i + step], v=v[:, i:i + step], block_table=cache.block_table,
                                 causal=self.causal, **cache.scales(layer), **rotary, **self._kw())
                for i in range(0, s, step)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self.wo(out.flatten(-2))

    def extra_repr(self):
        extra = f", window_size={self.window_size}" if self.window_size != (-1, -1) else ""
        extra += f", dropout={self.dropout}" if self.dropout else ""
        return (f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, alibi={self.alibi_slopes is not None}{extra}")


class CrossAttention(nn.Module):
    """Encoder-decoder attention: queries from x [B, N, dim], keys/values from memory [B, S, dim].

    ``memory_lengths`` [B] marks right padding of the memory. ``forward(x, kv=self.memory_kv(memory))`` reuses
    projected keys/values across decode steps; a step with N <= 16 queries runs through ``decode_attention``
    (the encoder states act as a contiguous, non-causal KV cache of length memory_lengths). ``dropout``:
    attention dropout in training mode (as `Attention`).
    """

    def __init__(self, dim, n_heads, *, bias=True, dropout=0.0, backend="auto", device=None, dtype=None):
        super().__init__()
        _int_arg("dim", dim)
        _int_arg("n_heads", n_heads)
        self.dropout = _checks.check_dropout(dropout, name="dropout")
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        self.dim, self.n_heads, self.head_dim, self.backend = dim, n_heads, dim // n_heads, backend
        fk = dict(device=device, dtype=dtype)
        self.wq = nn.Linear(dim, dim, bias=bias, **fk)
        self.wkv = nn.Linear(dim, 2 * dim, bias=bias, **fk)
        self.wo = nn.Linear(dim, dim, bias=bias, **fk)

    def memory_kv(self, memory):
        kv = self.wkv(memory).unflatten(-1, (2 * self.n_heads, self.head_dim))
        return kv[..., :self.n_heads, :], kv[..., self.n_heads:, :]

    def forward(self, x, memory=None, memory_lengths=None, *, kv=None):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, N, dim={self.dim}], got {tuple(x.shape)}")
        k, v = kv if kv is not None else self.memory_kv(memory)
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))
        b, n = q.shape[:2]
        p = self.dropout if self.training else 0.0
        if memory_lengths is None:
            out = attention(q, k, v, dropout_p=p, backend=self.backend)
        elif n <= 16 and not torch.is_grad_enabled() and p == 0:
            check_lengths("memory_lengths", memory_lengths, b, k.shape[1], x)
            out = decode_attention(q, k, v, memory_lengths.to(torch.int32), causal=False, validate=False,
                                   backend=self.backend)
        else:
            check_lengths("memory_lengths", memory_lengths, b, k.shape[1], x)
            out = padded_attention(q, k, v, torch.zeros_like(memory_lengths), memory_lengths, validate=False,
                                   dropout_p=p, backend=self.backend)
        return self.wo(out.flatten(-2))


# ---------------------------------------------------------------------------------------------
# Drop-in torch.nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------

def _allowed(mask):
    """Boolean "may attend" mask from an MHA mask (bool True = masked out, or additive float); None if the
    float mask holds values other than 0 and -inf."""
    if mask.dtype == torch.bool:
        return ~mask
    zero, ninf = mask == 0, mask == float("-inf")
    return zero if bool((zero | ninf).all()) else None


class MultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention``: same constructor, forward, parameter names and
    ``state_dict`` keys, so ``load_state_dict`` from a torch module works and outputs match torch's.

    The kernel path serves ``need_weights=False`` calls whose masks are recognised: no mask, a causal
    ``attn_mask`` (or the ``is_causal`` hint) and/or a ``key_padding_mask`` whose kept keys form one run per
    batch element (with causal: right padding). In training mode it applies attention dropout (``dropout``)
    in the kernels (their counter-based mask, so not torch's random stream). Everything else --
    ``need_weights=True`` (torch's default; weights are computed by torch), other masks, unbatched inputs, ``torch.compile`` tracing with masks -- runs torch's own
    ``nn.MultiheadAttention.forward`` on these parameters, so the result is torch's.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        _int_arg("embed_dim", embed_dim)
        _int_arg("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        dropout = _checks.check_dropout(dropout, name="dropout")
        fk = dict(device=device, dtype=dtype)
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads, self.dropout, self.batch_first = num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **fk))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **fk))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **fk))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.backend = "auto"
        self._reset_parameters()

    def _reset_parameters(self):  # as torch.nn.MultiheadAttention
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def _torch_forward(self, *args, **kwargs):
        return nn.MultiheadAttention.forward(self, *args, **kwargs)

    def _projections(self, query, key, value):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            if query is key and key is value:
                return F.linear(query, w, self.in_proj_bias).chunk(3, dim=-1)
            wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _plan(self, key_padding_mask, attn_mask, is_causal, b, nq, nk):
        """('dense', causal) / ('padded', start, end, causal) for the kernel path, or None to fall back."""
        if torch.compiler.is_compiling() and (key_padding_mask is not None or (attn_mask is not None and not is_causal)):
            return None
        causal = False
        if attn_mask is not None:
            if is_causal and key_padding_mask is None:
                causal = True  # torch uses the is_causal hint as is (need_weights=False)
            elif attn_mask.dim() != 2:
                return None
            else:
                allowed = _allowed(attn_mask)
                if allowed is None:
                    return None
                kind = classify_sdpa_mask(allowed, b, 1, nq, nk)
                if kind[0] not in ("none", "causal"):
                    return None
                causal = kind[0] == "causal"
        if key_padding_mask is None:
            return ("dense", causal)
        keep = _allowed(key_padding_mask)
        if keep is None or keep.shape != (b, nk):
            return None
        start, end, ok = key_run_bounds(keep)
        if not ok or (causal and bool((start != 0).any())):
            return None
        return ("padded", start, end, causal)

    def _check_key_padding_mask(self, query, key, key_padding_mask):
        """torch asserts on a wrong-shaped mask; this names the argument: [B, S] batched, [S] unbatched."""
        if key_padding_mask is None or not isinstance(key, torch.Tensor):
            return
        _checks.check_tensor("key_padding_mask", key_padding_mask)
        if key.dim() == 3:
            src_len = key.shape[1] if self.batch_first else key.shape[0]
            batch = key.shape[0] if self.batch_first else key.shape[1]
            want = (batch, src_len)
        else:
            want = (key.shape[0],)
        if tuple(key_padding_mask.shape) != want:
            raise ValueError(f"key_padding_mask must have shape {list(want)} ({'[B, S]' if len(want) == 2 else '[S]'}"
                             f" of key), got {tuple(key_padding_mask.shape)}")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        self._check_key_padding_mask(query, key, key_padding_mask)
        args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if (need_weights or query.dim() != 3 or key.dim() != 3
                or value.dim() != 3 or self.bias_k is not None or self.add_zero_attn or query.shape[-1] != self.embed_dim):
            return self._torch_forward(*args)
        if is_causal and attn_mask is None:
            return self._torch_forward(*args)  # torch raises its error for this combination
        if self.batch_first:
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = (t.transpose(0, 1) for t in (query, key, value))
        b, nq, nk = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        if k_in.shape[0] != b or v_in.shape[:2] != k_in.shape[:2]:
            return self._torch_forward(*args)
        plan = self._plan(key_padding_mask, attn_mask, is_causal, b, nq, nk)
        if plan is None:
            return self._torch_forward(*args)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in self._projections(q_in, k_in, v_in))
        p = self.dropout if self.training else 0.0
        if plan[0] == "padded":
            out = padded_attention(q, k, v, plan[1], plan[2], causal=plan[3], causal_align="top_left",
                                   dropout_p=p, backend=self.backend)
        else:
            out = attention(q, k, v, causal=plan[1], causal_align="top_left", dropout_p=p, backend=self.backend)
        if not self.batch_first:
            out = out.transpose(0, 1)             # [L, B, H, D]: out_proj then writes torch's contiguous [L, B, E]
        return self.out_proj(out.flatten(-2)), None
