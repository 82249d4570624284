"""Live previews: a fixed linear map from latent channels to RGB, fitted once to whatever decoder is loaded.

Decoding the model's running estimate of the clean video with the real VAE every few steps would cost a large part
of a step (the decoder's causal caches alone are GiBs at 720p). A latent pixel, though, is close to a linear
code of the colour of the s x s pixels it decodes to, so RGB ~ A z + b on the latent grid is a recognisable
thumbnail for the cost of one [h*w, z] x [z, 3] product. A and b are fitted by least squares once, against the
decoder itself (its own denormalisation and clamp included: the fit goes through its public decode_stream), on a
few seeded random latents of two latent frames: the target is the second latent frame's video frames, averaged and
area-pooled, because a preview shows a video's middle latent frame, which a causal decoder (Wan's) decodes with
the frames before it in its cache, unlike the first one (on a random Wan decoder, a map fitted to first frames
correlates 0.16 with middle frames, one fitted to second frames 0.77).
The fitting latents imitate what a video's latents look like, not white noise: half are objects on a background
(a quiet field with a few discs, each one random latent vector), half smooth fields (coarse noise upsampled). On
the embedded model's own x0 estimates that fit gives 20.4 dB and a correlation of 0.73 against the real decode
pooled to the latent grid (white noise: 18 dB and 0.60; a linear map fitted on those very estimates, the best any
linear map can do there: 23 dB and 0.86); tests/test_preview.py holds both decoders to bounds. The fit decodes 6
latents of 2 x 8 x 8, a third of the pixels of the 8 of 2 x 12 x 12 it used to (those scored 21.1 dB / 0.76 on the
embedded model and 22.0 / 0.72 on a small random Wan decoder, against 20.4 / 0.73 and 20.4 / 0.65 now): 0.03 s of
CPU for the embedded decoder (0.07 before), 13 s of one CPU core for the full-size Wan2.1 decoder (37 s before); not
measured on a GPU. It runs once per decoder instance (fitted_previewer caches it), at the first preview
a request asks for, not at load (runtime.load_timeout_s and every load with previews off pay nothing).

Legend: z latent channels, T latent frames, h/w latent rows/columns, s the decoder's spatial stride, N pixels.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LatentPreviewer", "MAX_SIDE", "fitted_previewer", "preview_size"]

MAX_SIDE = 256  # pixels: the longest side of a preview image

FIT_SEED = 20261127
FIT_SAMPLES = 6  # latents [1, z, 2, size, size] decoded to fit: half objects on a background, half smooth fields
FIT_SIZE = 8  # latent pixels per side of each (the border is left out of the fit: padding shapes it); 6 x 8 costs a
# third of 8 x 12's decoding for 0.7 to 1.6 dB less on the decoders of tests/test_preview.py (4 x 8: 1.3 to 1.8 dB)

_FITTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # decoder -> {fit arguments: LatentPreviewer}
_FITTED_LOCK = threading.Lock()


def preview_size(h: int, w: int, spatial_stride: int) -> tuple[int, int]:
    """The preview's [rows, columns] for an h x w latent grid: the grid scaled by the largest factor, fractional,
    up to the decoder's stride (never larger than the video) that keeps the longest side <= MAX_SIDE; a grid
    already wider than MAX_SIDE is scaled down to fit. 720p (90 x 160 latents): 144 x 256."""
    scale = min(spatial_stride, MAX_SIDE / max(h, w))
    return max(1, min(MAX_SIDE, round(h * scale))), max(1, min(MAX_SIDE, round(w * scale)))


def fitted_previewer(decoder, z_dim: int, spatial_stride: int, temporal_stride: int, *,
                     device: torch.device | str = "cpu") -> "LatentPreviewer":
    """LatentPreviewer.fit of this decoder instance, fitted once and kept while the decoder lives (thread-safe:
    two Runners sharing a decoder fit it once)."""
    key = (z_dim, spatial_stride, temporal_stride, str(device))
    with _FITTED_LOCK:
        per_decoder = _FITTED.setdefault(decoder, {})
        if key not in per_decoder:
            per_decoder[key] = LatentPreviewer.fit(decoder, z_dim, spatial_stride, temporal_stride, device=device)
        return per_decoder[key]


@dataclass
class LatentPreviewer:
    """rgb = weight @ z + bias per latent pixel, in 8-bit levels (0..255), for latents in the DiT's normalised
    space."""

    weight_3z: torch.Tensor  # float32 [3, z]
    bias_3: torch.Tensor  # float32 [3]
    spatial_stride: int

    @classmethod
    @torch.no_grad()
    def fit(cls, decoder, z_dim: int, spatial_stride: int, temporal_stride: int, *,
            device: torch.device | str = "cpu", samples: int = FIT_SAMPLES, size: int = FIT_SIZE,
            seed: int = FIT_SEED) -> "LatentPreviewer":
        """Least squares of the decoder's RGB for a second latent frame (its temporal_stride video frames averaged,
        area-pooled to the latent grid) on its z_dim latent channels plus a constant, over `samples` seeded random
        latents [1, z, 2, size, size]: deterministic for a given decoder. The decoder is anything with
        decode_stream(latents [1, z, T, h, w]) -> uint8 [s*h, s*w, 3] frames, 1 for the first latent frame and
        temporal_stride for each later one (WanVAEDecoder, the embedded model's TinyDecoder)."""
        g = torch.Generator().manual_seed(seed)
        inputs, targets = [], []
        for i in range(samples):
            draw = _smooth if i % 2 else _objects
            first_zhw, z_zhw = draw(g, z_dim, size), draw(g, z_dim, size)
            latents = torch.stack([first_zhw, z_zhw], dim=1)[None].to(device)
            frames = list(decoder.decode_stream(latents))  # 1 + temporal_stride of [s*size, s*size, 3]
            assert len(frames) == 1 + temporal_stride, (len(frames), temporal_stride)
            mean_hw3 = torch.from_numpy(np.stack(frames[1:])).double().mean(0)
            rgb_3hw = F.avg_pool2d(mean_hw3.permute(2, 0, 1)[None], spatial_stride)[0]
            inner = (slice(None), slice(1, size - 1), slice(1, size - 1))
            inputs.append(z_zhw[inner].reshape(z_dim, -1).T.double())
            targets.append(rgb_3hw[inner].reshape(3, -1).T)
        z_Nz, rgb_N3 = torch.cat(inputs), torch.cat(targets)
        design = torch.cat([z_Nz, torch.ones(len(z_Nz), 1, dtype=torch.float64)], dim=1)
        solution = torch.linalg.lstsq(design, rgb_N3).solution  # [z + 1, 3]
        return cls(solution[:-1].T.float().contiguous().to(device), solution[-1].float().to(device), spatial_stride)

    def rgb(self, frame_zhw: torch.Tensor) -> torch.Tensor:
        """One latent frame [z, h, w] -> float32 [3, h, w] in 8-bit levels, unclamped (what tests compare)."""
        w = self.weight_3z.to(frame_zhw.device)
        return torch.einsum("cz,zhw->chw", w, frame_zhw.float()) + self.bias_3.to(frame_zhw.device)[:, None, None]

    @torch.no_grad()
    def image(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [1, z, T, h, w] (the DiT's normalised space) -> uint8 [h', w', 3] of the middle latent frame,
        longest side <= MAX_SIDE (preview_size: bilinear up, area down). A handful of small ops: on the embedded
        model a whole preview (with the Runner's share) is ~1% of its 10 ms step, per-op overhead most of it.
        Non-finite values (a diverging run) become black before the uint8 cast (NaN to uint8 is undefined on CUDA)."""
        assert latents.dim() == 5 and latents.shape[0] == 1, tuple(latents.shape)
        _, z, T, h, w = latents.shape
        frame_Nz = latents[0, :, T // 2].reshape(z, h * w).T.float()
        rgb_N3 = torch.addmm(self.bias_3.to(frame_Nz.device), frame_Nz, self.weight_3z.to(frame_Nz.device).T)
        rgb_3hw = rgb_N3.nan_to_num_(nan=0.0, posinf=255.0, neginf=0.0).T.reshape(1, 3, h, w)
        rows, cols = preview_size(h, w, self.spatial_stride)
        if rows < h:
            rgb_3hw = F.interpolate(rgb_3hw, size=(rows, cols), mode="area")
        elif rows > h:
            rgb_3hw = F.interpolate(rgb_3hw, size=(rows, cols), mode="bilinear", align_corners=False)
        return rgb_3hw[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _objects(g: torch.Generator, z: int, size: int) -> torch.Tensor:
    """[z, size, size]: a quiet background (std 0.3) with 2 to 5 discs of radius 1 to 4, each one vector (std 2):
    the shape of a video's latents, mostly flat with a few strong objects."""
    out_zhw = torch.randn((z, size, size), generator=g) * 0.3
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    for _ in range(int(torch.randint(2, 6, (1,), generator=g))):
        cy, cx = (torch.rand(2, generator=g) * size).tolist()
        radius = 1 + 3 * float(torch.rand(1, generator=g))
        disc_hw = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).float()
        out_zhw = out_zhw * (1 - disc_hw) + disc_hw * torch.randn((z, 1, 1), generator=g) * 2.0
    return out_zhw


def _smooth(g: torch.Generator, z: int, size: int) -> torch.Tensor:
    """[z, size, size]: noise on a 5 x 5 grid, bilinearly upsampled, each channel rescaled to unit variance."""
    coarse = torch.randn((1, z, 5, 5), generator=g)
    out_zhw = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)[0]
    return out_zhw / out_zhw.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
