"""The models one rank needs, loaded once from the config: the DiT everywhere, the text encoder and the decoder
only where they run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from configs import ModelConfig

from .dit import WanDiT

__all__ = ["Components", "TextEncoder", "FrameDecoder", "load_components", "resolve_dtype"]


class TextEncoder(Protocol):
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[N, text_len, text_dim] float32, zero rows past each prompt."""

    def to(self, device) -> "TextEncoder": ...


class FrameDecoder(Protocol):
    def decode_stream(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """uint8 RGB frames [H, W, 3], one at a time, from latents [1, z, T, h, w]."""


@dataclass
class Components:
    dit: WanDiT
    text_encoder: TextEncoder | None
    decoder: FrameDecoder | None
    z_dim: int
    temporal_stride: int
    spatial_stride: int

    @property
    def text_len(self) -> int:
        return self.dit.config.text_len

    @property
    def text_dim(self) -> int:
        return self.dit.config.text_dim

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """[1, z, T, h, w] for a video, or ValueError if the model cannot make that size."""
        ts, ss = self.temporal_stride, self.spatial_stride
        pt, ph, pw = self.dit.config.patch_size
        if (frames - 1) % ts:
            raise ValueError(f"frames must be {ts}n+1 for this model, got {frames}")
        if height % (ss * ph) or width % (ss * pw):
            raise ValueError(f"height and width must be multiples of {ss * ph} for this model, got {height}x{width}")
        T = (frames - 1) // ts + 1
        if T % pt:
            raise ValueError(f"{T} latent frames are not a multiple of the temporal patch size {pt}")
        return (1, self.z_dim, T, height // ss, width // ss)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_components(model: ModelConfig, *, device: torch.device, encode: bool, decode: bool,
                    attention_backend: str = "auto") -> Components:
    """The DiT (compute dtype per config, on `device`), plus the text encoder if `encode` and the decoder if
    `decode`. model.path None loads the embedded tiny model."""
    dtype = resolve_dtype(model.dtype, device)
    if model.path is None:
        from .tiny import load_tiny_components

        return load_tiny_components(device=device, dtype=dtype, encode=encode, decode=decode,
                                    attention_backend=attention_backend)
    from .text_encoder import WanTextEncoder
    from .vae import WanVAEDecoder
    from .vae_weights import read_vae_spec

    path = Path(model.path).expanduser()
    dit = WanDiT.from_pretrained(path, device=device, dtype=dtype, attention_backend=attention_backend)
    spec = read_vae_spec(path)
    if spec.z_dim != dit.config.in_dim:
        raise ValueError(f"the VAE's {spec.z_dim} latent channels do not match the DiT's {dit.config.in_dim}")
    text_encoder = decoder = None
    if encode:
        te_device = torch.device("cpu") if model.text_encoder_device == "cpu" else device
        te_dtype = torch.bfloat16 if te_device.type == "cuda" else torch.float32
        text_encoder = WanTextEncoder.from_pretrained(path, device=te_device, dtype=te_dtype,
                                                      text_len=dit.config.text_len)
        if text_encoder.dim != dit.config.text_dim:
            raise ValueError(f"the text encoder's width {text_encoder.dim} does not match the DiT's text_dim "
                             f"{dit.config.text_dim}")
    if decode:
        decoder = WanVAEDecoder.from_pretrained(path, device=device, dtype=torch.float32)
        decoder.tiling = model.vae_tiling
    return Components(dit, text_encoder, decoder, spec.z_dim, spec.temporal_stride, spec.spatial_stride)
