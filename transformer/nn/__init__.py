"""nn.Module wrappers around the public ops."""
from .attention import Attention, CrossAttention, MultiheadAttention
from .norms import LayerNorm, RMSNorm
from .rope import RotaryEmbedding, apply_rotary

__all__ = ["Attention", "CrossAttention", "MultiheadAttention", "LayerNorm", "RMSNorm", "RotaryEmbedding",
           "apply_rotary"]
