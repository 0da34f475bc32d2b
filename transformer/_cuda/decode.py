"""CUDA decode attention over a KV cache (csrc/decode/): the backend's entry function.

Op (both namespaces, see transformer/_cuda/__init__.py): the decode contract shared with the Triton backend
(transformer/ops/decode.py), which also gives it its fake.
"""
from __future__ import annotations

from ..ops import decode as contract
from . import ops

__all__ = ["decode_attention", "register", "supports"]

register = contract.register     # the fake, per namespace (called once per namespace by ops())


def supports(call):
    return contract.supports(call, "cuda decode kernel")


def decode_attention(q, k_cache, v_cache, cache_seqlens, **kw):
    return contract.decode_attention(ops(q.device).decode_attention, q, k_cache, v_cache, cache_seqlens, **kw)
