"""nn.Module wrappers around the public ops."""
from .attention import Attention, CrossAttention, MultiheadAttention
from .rope import RotaryEmbedding, apply_rotary

__all__ = ["Attention", "CrossAttention", "MultiheadAttention", "RotaryEmbedding", "apply_rotary"]
