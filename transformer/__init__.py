"""tileformer: a Transformer whose hot paths are hand-written Triton and CUDA C++ kernels.

Public API (all ops take ``backend="auto" | "cuda" | "triton" | "torch" | "reference"``):

    transformer.flash_attention(q, k, v, causal=..., ...)        # flash-attn layout [B, N, H, D]
    transformer.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    transformer.decode_attention(q, k_cache, v_cache, cache_seqlens, ...)   # KV-cache decode, paged or not
    transformer.layer_norm(x, weight, bias, eps, residual=..., prenorm=...)
    transformer.rms_norm(x, weight, eps, residual=..., prenorm=...)
    transformer.scaled_dot_product_attention(query, key, value, ...)   # drop-in for F.scaled_dot_product_attention
    transformer.MultiheadAttention / transformer.Attention                # modules; transformer.models: the models
    transformer.LayerNorm / transformer.RMSNorm                           # drop-ins for torch.nn's (+ residual=, prenorm=)
    transformer.generate(model, input_ids, max_new_tokens, ...)          # KV-cache generation
    transformer.flash_attn_interface.flash_attn_func(q, k, v, ...)       # flash-attn 2.8's interface, same calls
    transformer.distributed.context_parallel_attention(q, k, v, group, scheme="ring" | "zigzag" | "ulysses")
                                                                          # sequence sharded over torch.distributed ranks

Importing this package never touches a GPU, Triton or the compiled extension.
"""
from . import backends, reference
from .attention import flash_attention, flash_attention_varlen
from .decode import decode_attention
from .norms import layer_norm, rms_norm
from .sdpa import scaled_dot_product_attention
from .kv_cache import KVCache
from .nn.attention import Attention, MultiheadAttention
from .nn.norms import LayerNorm, RMSNorm
from .generate import generate
from . import flash_attn_interface

__version__ = "0.1.0"


def __getattr__(name):
    # transformer.distributed (context parallelism) is imported on first use: it initialises nothing, but
    # `import transformer` stays free of it.
    if name == "distributed":
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["backends", "reference", "flash_attention", "flash_attention_varlen", "decode_attention",
           "layer_norm", "rms_norm", "scaled_dot_product_attention", "Attention", "MultiheadAttention", "KVCache",
           "generate", "LayerNorm", "RMSNorm", "flash_attn_interface"]
