"""The embedded model's parts besides the WanDiT: a word-level text encoder, and a causal chunk autoencoder whose
latent frame 0 holds video frame 0 and latent frame k holds frames 4k-3..4k (as Wan's VAE), so each latent token
carries the object's motion within its chunk.

Legend: N prompts, L text_len, B clips, F frames, S pixels, z latent channels, T latent frames, s = S/4.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..dit import WanDiTConfig
from .data import split_words

__all__ = ["TinySpec", "TinyTextEncoder", "ChunkEncoder", "ChunkDecoder", "TinyDecoder", "frames_to_chunks"]

CHUNK = 4  # frames per latent frame after the first
STRIDE = 4  # pixels per latent pixel


@dataclass(frozen=True)
class TinySpec:
    """Everything needed to rebuild the embedded model (stored in the weights file's metadata)."""

    vocab: tuple = ()
    text_dim: int = 64
    text_len: int = 16
    text_layers: int = 2
    z_dim: int = 8
    dit: dict = field(default_factory=lambda: dict(dim=144, ffn_dim=384, num_heads=12, num_layers=4, in_dim=8,
                                                   out_dim=8, text_dim=64, freq_dim=64, patch_size=(1, 2, 2),
                                                   text_len=16))
    latents_mean: tuple = ()
    latents_std: tuple = ()

    def dit_config(self) -> WanDiTConfig:
        cfg = dict(self.dit)
        cfg["patch_size"] = tuple(cfg["patch_size"])
        return WanDiTConfig(**cfg)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TinySpec":
        data = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class TinyTextEncoder(nn.Module):
    """Words -> [N, L, text_dim]: embeddings + learned positions + a small transformer. As Wan's T5 handling: the
    real tokens and EOS are encoded under the mask, later rows are zeros."""

    PAD, EOS, UNK = 0, 1, 2

    def __init__(self, spec: TinySpec):
        super().__init__()
        self.vocab = {w: i + 3 for i, w in enumerate(spec.vocab)}
        self.text_len = spec.text_len
        self.embed = nn.Embedding(len(spec.vocab) + 3, spec.text_dim)
        self.pos = nn.Parameter(torch.randn(spec.text_len, spec.text_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(spec.text_dim, 4, spec.text_dim * 2, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, spec.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.text_dim)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(prompts), self.text_len), self.PAD, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens = [self.vocab.get(w, self.UNK) for w in split_words(prompt)][: self.text_len - 1] + [self.EOS]
            ids[i, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.PAD

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))
        return x * mask.unsqueeze(-1)

    @property
    def device(self) -> torch.device:
        return self.pos.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        return self.forward(ids.to(self.device), mask.to(self.device)).float()


def frames_to_chunks(clips_BFSSC: torch.Tensor) -> torch.Tensor:
    """uint8 clips [B, F, S, S, 3] (F = 4n+1) -> [B, T, 12, S, S] in [-1, 1]: chunk 0 is frame 0 four times."""
    x = clips_BFSSC.float() / 127.5 - 1
    x = x.permute(0, 1, 4, 2, 3)  # B F 3 S S
    first = x[:, :1].expand(-1, CHUNK, -1, -1, -1)
    rest = x[:, 1:]
    B, F, C, H, W = rest.shape
    chunks = torch.cat([first.unsqueeze(1), rest.reshape(B, F // CHUNK, CHUNK, C, H, W)], dim=1)
    return chunks.flatten(2, 3)  # B T (4*3) S S


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class ChunkEncoder(nn.Module):
    """[B, 12, S, S] (4 frames) -> [B, z, S/4, S/4]. Used for training only."""

    def __init__(self, z: int):
        super().__init__()
        self.net = nn.Sequential(_block(12, 48), nn.Conv2d(48, 64, 4, stride=2, padding=1), nn.SiLU(), _block(64, 64),
                                 nn.Conv2d(64, 96, 4, stride=2, padding=1), nn.SiLU(), _block(96, 96),
                                 nn.Conv2d(96, z, 3, padding=1))

    def forward(self, x):
        return self.net(x)


class ChunkDecoder(nn.Module):
    """[B, z, s, s] -> [B, 12, 4s, 4s] in [-1, 1]: four frames."""

    def __init__(self, z: int):
        super().__init__()
        self.net = nn.Sequential(_block(z, 96), _block(96, 96), nn.Upsample(scale_factor=2.0, mode="nearest"),
                                 _block(96, 64), nn.Upsample(scale_factor=2.0, mode="nearest"), _block(64, 48),
                                 nn.Conv2d(48, 12, 3, padding=1), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class TinyDecoder(nn.Module):
    """Streams frames like WanVAEDecoder: latent frame 0 -> 1 frame, every later latent frame -> 4 frames."""

    def __init__(self, spec: TinySpec):
        super().__init__()
        self.net = ChunkDecoder(spec.z_dim)
        self.register_buffer("latents_mean", torch.tensor(spec.latents_mean or [0.0] * spec.z_dim).view(1, -1, 1, 1))
        self.register_buffer("latents_std", torch.tensor(spec.latents_std or [1.0] * spec.z_dim).view(1, -1, 1, 1))

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """[1, z, T, s, s] normalised latents -> per latent frame, frames [n, 3, S, S] in [-1, 1]."""
        for t in range(latents.shape[2]):
            z = latents[:, :, t].to(self.latents_std) * self.latents_std + self.latents_mean
            frames = self.net(z)[0].unflatten(0, (CHUNK, 3))
            yield frames[-1:] if t == 0 else frames

    def decode_stream(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        for frames in self.decode_chunks(latents):
            pixels = ((frames.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            for frame in pixels.permute(0, 2, 3, 1).cpu().numpy():
                yield frame


