"""KV cache for generation: per-layer key/value storage, contiguous or paged.

Layouts are the ones ``decode_attention`` reads (flash-attn's ``flash_attn_with_kvcache``):

* contiguous: ``k[layer]``, ``v[layer]`` are [B, capacity, Hkv, D];
* paged: ``k[layer]``, ``v[layer]`` are [num_pages, page_size, Hkv, D] and ``block_table`` [B, pages_per_seq]
  int32 maps token t of sequence b to page ``block_table[b, t // page_size]``, slot ``t % page_size``.
  Pages are handed out from a pool at construction; by default sequence b's pages are interleaved with
  the other sequences' (page p of sequence b is page ``p * B + b``), so the indirection is really used.

``seqlens`` ([B] int32, on the device) counts the tokens cached per sequence; ``lengths`` is the same on the
host. Attention layers write new tokens (prefill: ``write``; decode: ``decode_attention`` appends in place)
and the model calls ``advance`` once after all layers have run.

Quantized cache (``kv_dtype="int8"`` or ``"fp8_e4m3"``): ``k[layer]`` / ``v[layer]`` hold 8-bit values (torch.int8 /
torch.float8_e4m3fn) and ``k_scale[layer]`` / ``v_scale[layer]`` one fp32 scale per (token, kv head), shaped like
the cache without D; ``write`` stores ``reference.quantize_kv`` of the keys/values (cast to ``dtype`` first, as
the decode kernels quantize q-dtype tokens), ``decode_attention`` takes ``**cache.scales(layer)`` and quantizes
its appends the same way. K and V take 1 byte per element plus 4 bytes per (token, head): 0.52x the bytes of a
16-bit cache at head dim 128. (Hugging Face transformers' cache API hands attention functions the
concatenated 16-bit keys/values returned by ``Cache.update``, so this cache cannot be plugged into HF models'
attention; use ``transformer.generate`` or HF's own QuantizedCache there.)
"""
from __future__ import annotations

import torch

from . import _checks
from .reference import quantize_kv

__all__ = ["KVCache"]


class KVCache:
    """Key/value storage for ``n_layers`` attention layers and ``batch_size`` sequences.

    Args:
        n_layers, batch_size, n_kv_heads, head_dim: sizes.
        capacity: most tokens per sequence (prompt + generated).
        dtype, device: of the cached keys/values.
        page_size: None for a contiguous cache, else the tokens per page (any size >= 1).
        num_pages: size of the page pool (paged only; default: just enough for every sequence at capacity).
        kv_dtype: None (keys/values stored in ``dtype``), "int8" or "fp8_e4m3" (8-bit values + fp32 scales per
            token and kv head; ``dtype`` is then the dtype the keys/values are written and read in).
    """

    def __init__(self, n_layers, batch_size, capacity, n_kv_heads, head_dim, *, dtype=torch.float32, device=None,
                 page_size=None, num_pages=None, kv_dtype=None):
        for name, val in (("n_layers", n_layers), ("batch_size", batch_size), ("capacity", capacity),
                          ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        self.kv_dtype = _checks.check_kv_dtype(kv_dtype)
        self.n_layers, self.batch_size, self.capacity = n_layers, batch_size, capacity
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.page_size = page_size
        if page_size is None:
            if num_pages is not None:
                raise ValueError("num_pages is only meaningful with page_size (a paged cache)")
            shape = (batch_size, capacity, n_kv_heads, head_dim)
            self.block_table = None
        else:
            if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
                raise ValueError(f"page_size must be an int >= 1 or None, got {page_size!r}")
            per_seq = -(-capacity // page_size)
            needed = per_seq * batch_size
            num_pages = needed if num_pages is None else num_pages
            if not isinstance(num_pages, int) or num_pages < needed:
                raise ValueError(f"num_pages must be an int >= {needed} (batch_size x pages per sequence), "
                                 f"got {num_pages!r}")
            shape = (num_pages, page_size, n_kv_heads, head_dim)
            p = torch.arange(per_seq, dtype=torch.int32).view(1, -1)
            b = torch.arange(batch_size, dtype=torch.int32).view(-1, 1)
            self.block_table = (p * batch_size + b).to(self.device)          # interleaved pages
        store = _checks.KV_DTYPES[self.kv_dtype] if self.kv_dtype else dtype
        self.k = [torch.zeros(shape, dtype=store, device=self.device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=self.device) for _ in range(n_layers)]
        self.k_scale = self.v_scale = None
        if self.kv_dtype:   # scale 1 for the empty slots: they dequantize to 0
            self.k_scale = [torch.ones(shape[:3], dtype=torch.float32, device=self.device) for _ in range(n_layers)]
            self.v_scale = [torch.ones(shape[:3], dtype=torch.float32, device=self.device) for _ in range(n_layers)]
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self.lengths = [0] * batch_size

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @property
    def quantized(self) -> bool:
        return self.kv_dtype is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value storage of every layer (values + scales)."""
        ts = self.k + self.v + (self.k_scale + self.v_scale if self.quantized else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def scales(self, layer):
        """``decode_attention`` keywords of layer's cache: {k_scale, v_scale} when quantized, else {}."""
        return dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer]) if self.quantized else {}

    @property
    def empty(self) -> bool:
        return not any(self.lengths)

    def reset(self):
        self.seqlens.zero_()
        self.lengths = [0] * self.batch_size

    def check_room(self, new_lengths, name="input_ids"):
        """Raise ValueError (naming `name`) if appending new_lengths[b] tokens would overflow the cache."""
        for b, (have, add) in enumerate(zip(self.lengths, new_lengths)):
            if have + add > self.capacity:
                raise ValueError(f"{name}: sequence {b} needs {have + add} cached tokens, more than the cache "
                                 f"capacity ({self.capacity})")

    def write(self, layer, k, v, batch_idx, positions):
        """Store tokens k/v [T, Hkv, D] (float tensors) of sequences batch_idx [T] at positions [T] (long tensors);
        a quantized cache stores reference.quantize_kv(k.to(dtype)) (values and scales)."""
        for name, t in (("k", k), ("v", v)):
            _checks.check_tensor(name, t, ndim=3, dtypes=_checks.FLOAT_DTYPES)
        kc, vc = self.k[layer], self.v[layer]
        with torch.no_grad():
            if self.block_table is None:
                rows = (batch_idx, positions)
            else:
                rows = (self.block_table.long()[batch_idx, positions // self.page_size], positions % self.page_size)
            if not self.quantized:
                kc[rows] = k.to(self.dtype)
                vc[rows] = v.to(self.dtype)
            else:
                kc[rows], self.k_scale[layer][rows] = quantize_kv(k.to(self.dtype), self.kv_dtype)
                vc[rows], self.v_scale[layer][rows] = quantize_kv(v.to(self.dtype), self.kv_dtype)

    def advance(self, n):
        """Count n new tokens per sequence (an int, or a list of B ints) after every layer has written them."""
        counts = [n] * self.batch_size if isinstance(n, int) else list(n)
        if len(counts) != self.batch_size:
            raise ValueError(f"n must be an int or {self.batch_size} ints, got {len(counts)}")
        self.check_room(counts, "n")
        self.lengths = [a + c for a, c in zip(self.lengths, counts)]
        self.seqlens += torch.tensor(counts, dtype=torch.int32, device=self.device)

    def __repr__(self):
        kind = f"paged(page_size={self.page_size}, num_pages={self.k[0].shape[0]})" if self.paged else "contiguous"
        return (f"KVCache({kind}, layers={self.n_layers}, batch={self.batch_size}, capacity={self.capacity}, "
                f"kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}"
                f"{f', kv_dtype={self.kv_dtype!r}' if self.quantized else ''})")
