"""Models built from the public ops: decoder-only LM, encoder-decoder (the original Transformer), encoder-only."""
from .decoder_only import DecoderOnly, DecoderOnlyConfig

__all__ = ["DecoderOnly", "DecoderOnlyConfig"]
