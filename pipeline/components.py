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

__all__ = ["Components", "TextEncoder", "FrameDecoder", "EncoderPlacement", "encoder_placement", "load_components",
           "resolve_dtype", "TEXT_ENCODER_DTYPE"]

# umt5-xxl runs in bfloat16 wherever it runs: its released weights are bfloat16 (nothing is gained by fp32), upstream
# Wan2.1 keeps it bfloat16 on CPU too (t5_cpu), and fp32 would double its 11.4 GB (10.6 GiB) to 22.7 GB. On a CPU
# with bf16 instructions it is also faster (tiny umt5, d_model 1024, 2 x 512 tokens, 2 threads on an AMD EPYC:
# 303 ms bf16 vs 521 ms fp32, 0.7% relative difference); on CPUs without them torch emulates bf16, slower.
TEXT_ENCODER_DTYPE = torch.bfloat16


class TextEncoder(Protocol):
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[N, text_len, text_dim] float32, zero rows past each prompt."""

    def to(self, device) -> "TextEncoder": ...


class FrameDecoder(Protocol):
    def decode_stream(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """uint8 RGB frames [H, W, 3], one at a time, from latents [1, z, T, h, w]."""


@dataclass(frozen=True)
class EncoderPlacement:
    """Where the text encoder lives between prompts (home) and where it encodes (run)."""

    home: torch.device
    run: torch.device

    @property
    def moves(self) -> bool:
        return self.home != self.run


def encoder_placement(text_encoder_device: str, offload: bool, device: torch.device) -> EncoderPlacement:
    """The one decision behind model.text_encoder_device and model.offload_text_encoder, for a rank on `device`:

    - text_encoder_device=cpu (or a CPU rank): lives and runs on the CPU, always; offloading is moot.
    - auto on a GPU with offload: lives in CPU memory, moves to the GPU only to encode, then back.
    - auto on a GPU without offload: lives and runs on the GPU.
    A CPU-configured encoder never touches the GPU."""
    cpu = torch.device("cpu")
    if text_encoder_device == "cpu" or device.type == "cpu":
        return EncoderPlacement(cpu, cpu)
    return EncoderPlacement(cpu if offload else device, device)


@dataclass
class Components:
    dit: WanDiT
    text_encoder: TextEncoder | None
    decoder: FrameDecoder | None
    z_dim: int
    temporal_stride: int
    spatial_stride: int
    text_placement: EncoderPlacement = EncoderPlacement(torch.device("cpu"), torch.device("cpu"))

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """[N, text_len, text_dim] float32 on the encoder's run device; the encoder is back home afterwards."""
        place, encoder = self.text_placement, self.text_encoder
        assert encoder is not None, "this rank loaded no text encoder"
        if place.moves:
            encoder.to(place.run)
        try:
            return encoder.encode(prompts)
        finally:
            if place.moves:
                encoder.to(place.home)

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


def bf16_native(device: torch.device) -> bool:
    """Whether the current CUDA card computes bf16 natively (sm80+, Ampere on). Before that torch emulates it and
    SDPA has no fused bf16 kernel: the math kernel's S x S scores would not fit a video's sequence."""
    if not torch.cuda.is_available():
        return True  # an estimate made without a GPU assumes a current card
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation (and counts emulation as support)
        return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """dtype=auto: bfloat16 on a GPU with native bf16, float16 on older GPUs (V100, T4), float32 on a CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if bf16_native(device) else torch.float16
    return getattr(torch, name)


def load_components(model: ModelConfig, *, device: torch.device, encode: bool, decode: bool,
                    attention_backend: str = "auto", shard_group=None, shard_text_group=None) -> Components:
    """The DiT (compute dtype per config, on `device`), plus the text encoder if `encode` (in bfloat16, loaded
    straight to its home, see encoder_placement) and the decoder if `decode`. model.path None loads the embedded
    tiny model. shard_group: the DiT's blocks sharded over it (pipeline.sharding; every rank of it loads
    together); shard_text_group: the umt5 encoder too (needs `encode`; the embedded model's few-MB encoder is
    never sharded)."""
    dtype = resolve_dtype(model.dtype, device)
    place = encoder_placement(model.text_encoder_device, model.offload_text_encoder, device)
    if model.path is None:
        from .tiny import load_tiny_components

        comp = load_tiny_components(device=device, dtype=dtype, encode=encode, decode=decode,
                                    attention_backend=attention_backend)
        if shard_group is not None:
            from .sharding import shard_dit

            shard_dit(comp.dit, shard_group)
        if comp.text_encoder is not None:
            comp.text_encoder.to(place.home)  # a few MB: its float32 is kept
        comp.text_placement = place
        return comp
    from .text_encoder import WanTextEncoder
    from .vae import WanVAEDecoder
    from .vae_weights import read_vae_spec

    path = Path(model.path).expanduser()
    if shard_group is not None:
        from .sharding import load_dit_sharded

        dit = load_dit_sharded(path, shard_group, device=device, dtype=dtype, attention_backend=attention_backend)
    else:
        dit = WanDiT.from_pretrained(path, device=device, dtype=dtype, attention_backend=attention_backend)
    spec = read_vae_spec(path)
    if spec.z_dim != dit.config.in_dim:
        raise ValueError(f"the VAE's {spec.z_dim} latent channels do not match the DiT's {dit.config.in_dim}")
    text_encoder = decoder = None
    if encode and shard_text_group is not None:
        from .sharding import load_text_encoder_sharded

        assert not place.moves, "a sharded encoder stays where its shards are (config forbids offloading it)"
        text_encoder = load_text_encoder_sharded(path, shard_text_group, device=place.home, dtype=TEXT_ENCODER_DTYPE,
                                                 text_len=dit.config.text_len)
    elif encode:
        text_encoder = WanTextEncoder.from_pretrained(path, device=place.home, dtype=TEXT_ENCODER_DTYPE,
                                                      text_len=dit.config.text_len)
    if text_encoder is not None and text_encoder.dim != dit.config.text_dim:
        raise ValueError(f"the text encoder's width {text_encoder.dim} does not match the DiT's text_dim "
                         f"{dit.config.text_dim}")
    if decode:
        decoder = WanVAEDecoder.from_pretrained(path, device=device, dtype=torch.float32)
        decoder.tiling = model.vae_tiling
    return Components(dit, text_encoder, decoder, spec.z_dim, spec.temporal_stride, spec.spatial_stride, place)
