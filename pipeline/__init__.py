"""Models (DiT, text encoder, VAE), samplers, weight loading and the per-rank Runner: pure torch, no Ray."""

from .dit import WanDiT, WanDiTConfig
from .parallel import apply_sequence_parallel
from .vae import WanVAEDecoder

__all__ = ["WanDiT", "WanDiTConfig", "WanVAEDecoder", "apply_sequence_parallel"]
