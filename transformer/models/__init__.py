"""Models built from the public ops: decoder-only LM, encoder-decoder (the original Transformer), encoder-only."""
from .decoder_only import DecoderOnly, DecoderOnlyConfig
from .encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from .encoder_only import EncoderOnly, EncoderOnlyConfig
from .training import InverseSqrtSchedule, inverse_sqrt_lr, label_smoothed_cross_entropy

__all__ = ["DecoderOnly", "DecoderOnlyConfig", "EncoderDecoder", "EncoderDecoderConfig", "EncoderOnly",
           "EncoderOnlyConfig", "label_smoothed_cross_entropy", "inverse_sqrt_lr", "InverseSqrtSchedule"]
