"""Wan VAE decoders (Wan2.1's and Wan2.2's) that stream: one latent frame in, its RGB frames out, with a per-conv
causal cache so memory does not grow with video length (it grows with the frame size: 8.1 GiB of fp32 caches at
720p, 3.5 at 480p for Wan2.1; 6.0 GiB at 1280x704 for Wan2.2, whose peak there is 17.2 GiB untiled and 10.9 tiled,
beside 2.2 GB of fp32 weights: bench/vae_cache.py's method). Parity-tested against diffusers' AutoencoderKLWan.decode.

Wan2.2's VAE (TI2V-5B: 48 latent channels) differs in three ways: its up blocks are residual (a weightless DupUp3D
shortcut: channels rearranged into the upsampled pixels and frames, added to the blocks' output), its upsamplers
keep the channel count (Wan2.1's halve it), and the decoder outputs 3 x 2 x 2 channels that a 2 x 2 unpatchify
turns into pixels (16x spatial: 8x from the up blocks times the patch).

Legend: B batch, C channels, T frames, H/W height/width (latent or pixel, as named), P patch side.
Module names follow diffusers (decoder.up_blocks.0.resnets.1.conv1, post_quant_conv); original Wan2.1_VAE.pth and
Wan2.2_VAE.pth keys are mapped onto them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WanVAEDecoder", "DecoderSpec", "WAN21_LATENTS_MEAN", "WAN21_LATENTS_STD", "WAN22_LATENTS_MEAN",
           "WAN22_LATENTS_STD", "WAN22_VAE_CONFIG", "tile_cache_factor", "MAX_UP_BLOCKS", "MAX_RESNETS"]

WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
# Wan2.2 (48 channels): upstream's Wan2_2_VAE hard-codes them (wan/modules/vae2_2.py); the .pth does not carry them
WAN22_LATENTS_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                      -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                      -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                      -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                      -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                      0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
WAN22_LATENTS_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
                     0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
                     0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
                     0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                     0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]
_LATENTS = {16: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), 48: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}
# The TI2V-5B release's VAE as diffusers configures it (scripts/convert_wan_to_diffusers.py's vae22_diffusers_config):
# decoder dims 1024, 1024, 1024, 512, 256; 555e6 decoder parameters (Wan2.1's: 73e6). DecoderSpec.from_diffusers_config
# of it stands in for a Wan2.2-TI2V-5B folder that is not there yet (memory estimates).
WAN22_VAE_CONFIG = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                        patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16)

MAX_UP_BLOCKS, MAX_RESNETS = 8, 16  # a hostile file's indices must not make us build thousands of modules
MAX_WIDTH = 4096  # a config's base dim, each dim_mult, z_dim, patch_size: Wan's are 96..1024, 1..4, 16/48, 1..2

CACHE_T = 2  # frames of input each causal conv keeps from the previous chunk


class Cache(dict):
    """Per-module streaming state for one decode: module -> last input frames (or a marker). `bands`: this rank's
    share of a decode split over a process group (pipeline.vae_parallel.Bands), None when one rank decodes all.
    `first`: the next chunk is the stream's first (Wan2.2's shortcuts keep one frame of it, like its upsamplers)."""

    bands = None
    first = True


_FIRST_DONE = "first chunk done"


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (2*p frames before, none after); with a cache it continues the previous
    chunk: the cached frames stand in for (part of) the time padding."""

    def __init__(self, cin, cout, kernel, padding=0):
        super().__init__(cin, cout, kernel, padding=0)
        p = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad, self.space_pad = 2 * p[0], (p[2], p[2], p[1], p[1])

    def continue_from(self, prev: torch.Tensor | None, x_BCTHW: torch.Tensor, rows_padded: bool = False):
        if prev is not None:
            x_BCTHW = torch.cat([prev, x_BCTHW], dim=2)
        pad_t = self.time_pad - (prev.shape[2] if prev is not None else 0)
        left, right, top, bottom = self.space_pad
        pad = (left, right, 0, 0) if rows_padded else (left, right, top, bottom)
        return super().forward(F.pad(x_BCTHW, (*pad, pad_t, 0)))

    def forward(self, x_BCTHW: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        # Split over ranks by rows: the rows this conv reads beyond the band come from the neighbours (and are
        # cached with the band, since the next chunk's conv reads them over time too).
        banded = cache is not None and cache.bands is not None and self.space_pad[2] > 0
        if banded:
            x_BCTHW = cache.bands.halo(x_BCTHW)
        if cache is None or self.time_pad == 0:
            return self.continue_from(None, x_BCTHW, banded)
        prev = cache.get(self)
        new = x_BCTHW[:, :, -CACHE_T:]
        if new.shape[2] < CACHE_T and prev is not None:
            new = torch.cat([prev[:, :, -1:], new], dim=2)
        cache[self] = new.clone()
        return self.continue_from(prev, x_BCTHW, banded)


class RMSNorm(nn.Module):
    """normalize(x, dim=1) * sqrt(C) * gamma, over channels."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(xf, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = RMSNorm(cin, images=False)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = RMSNorm(cout, images=False)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cache):
        h = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), cache)
        return self.conv2(F.silu(self.norm2(x)), cache) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x_BCTHW, cache: Cache | None = None):
        B, C, T, H, W = x_BCTHW.shape
        x = x_BCTHW.transpose(1, 2).reshape(B * T, C, H, W)
        qkv = self.to_qkv(self.norm(x))
        bands = cache.bands if cache is not None else None
        # Split by rows: this rank's pixels are the queries, every pixel of the frame a key.
        kv = bands.whole(qkv[:, C:]) if bands is not None else qkv[:, C:]
        q = qkv[:, :C].reshape(B * T, 1, C, H * W).transpose(2, 3)
        k, v = kv.reshape(B * T, 1, 2 * C, -1).transpose(2, 3).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(B * T, C, H, W)
        return self.proj(out).view(B, T, C, H, W).transpose(1, 2) + x_BCTHW


class Upsample(nn.Module):
    """2x nearest spatial upsampling + conv to out_dim channels (Wan2.1: half of dim; Wan2.2: dim); in 3D mode a
    causal time conv doubles the frames first (skipped on the first chunk, which stays one frame)."""

    def __init__(self, dim: int, temporal: bool, out_dim: int | None = None):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                      nn.Conv2d(dim, dim // 2 if out_dim is None else out_dim, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x, cache):
        B, C, T, H, W = x.shape
        if self.time_conv is not None:
            state = cache.get(self)
            if state is None:  # first chunk: stays one frame; remember that it went by
                cache[self] = _FIRST_DONE
            else:
                prev = None if state is _FIRST_DONE else state
                new = x[:, :, -CACHE_T:]
                if new.shape[2] < CACHE_T:
                    lead = torch.zeros_like(new[:, :, -1:]) if prev is None else prev[:, :, -1:]
                    new = torch.cat([lead, new], dim=2)
                cache[self] = new.clone()
                y = self.time_conv.continue_from(prev, x)  # [B, 2C, T, H, W]: two output frames per input frame
                x = y.view(B, 2, C, T, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, T * 2, H, W)
        T = x.shape[2]
        y = self.resample[0](x.transpose(1, 2).reshape(B * T, C, H, W).float()).to(x.dtype)
        conv = self.resample[1]
        if cache.bands is not None:  # the neighbours' rows stand in for the conv's padding above and below
            y = F.conv2d(cache.bands.halo(y), conv.weight, conv.bias, padding=(0, conv.padding[1]))
        else:
            y = conv(y)
        return y.view(B, T, *y.shape[1:]).transpose(1, 2)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n_resnets: int, upsample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(cin if i == 0 else cout, cout) for i in range(n_resnets))
        self.upsamplers = None
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(cout, temporal=upsample == "upsample3d")])

    def forward(self, x, cache):
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.upsamplers[0](x, cache) if self.upsamplers is not None else x


class DupUp3D(nn.Module):
    """Wan2.2's weightless shortcut of an upsampling block: each input channel repeated, the copies laid out as the
    2 x 2 pixels (and, temporal, 2 frames) each input pixel becomes, out_dim channels left. On the stream's first
    chunk only the last of the frame copies is kept (one frame in, one out, as the upsampler's first chunk)."""

    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__()
        self.cout, self.ft = cout, 2 if temporal else 1
        assert cout * self.ft * 4 % cin == 0, (cin, cout)
        self.repeats = cout * self.ft * 4 // cin

    def forward(self, x_BCTHW: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        B, _, T, H, W = x_BCTHW.shape
        x = x_BCTHW.repeat_interleave(self.repeats, dim=1)
        # the repeated channels are (out channel, frame copy, row copy, column copy), the last three fastest
        x = x.view(B, self.cout, self.ft, 2, 2, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(B, self.cout, T * self.ft, H * 2, W * 2)
        return x[:, :, self.ft - 1 :] if first_chunk else x


class ResidualUpBlock(nn.Module):
    """Wan2.2's up block: residual blocks then an upsampler keeping the channels, plus the DupUp3D shortcut of the
    block's input (the last block neither upsamples nor has a shortcut)."""

    def __init__(self, cin: int, cout: int, n_resnets: int, upsample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResidualBlock(cin if i == 0 else cout, cout) for i in range(n_resnets))
        temporal = upsample == "upsample3d"
        self.upsampler = Upsample(cout, temporal, out_dim=cout) if upsample else None
        self.avg_shortcut = DupUp3D(cin, cout, temporal) if upsample else None

    def forward(self, x, cache):
        x_in = x
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is None:
            return x
        # the shortcut made last, added in place: one upsampled tensor fewer alive at the peak
        return self.upsampler(x, cache).add_(self.avg_shortcut(x_in, cache.first))


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x, cache):
        return self.resnets[1](self.attentions[0](self.resnets[0](x, cache), cache), cache)


@dataclass(frozen=True)
class DecoderSpec:
    """Decoder structure: what the released weights (or a diffusers config) imply."""

    z_dim: int = 16
    mid_dim: int = 384
    # (in channels, out channels, residual blocks, upsampling: 'upsample3d' | 'upsample2d' | None) per up block
    blocks: tuple = ((384, 384, 3, "upsample3d"), (192, 384, 3, "upsample3d"), (192, 192, 3, "upsample2d"),
                     (96, 96, 3, None))
    latents_mean: tuple = tuple(WAN21_LATENTS_MEAN)
    latents_std: tuple = tuple(WAN21_LATENTS_STD)
    is_residual: bool = False  # Wan2.2: ResidualUpBlock (DupUp3D shortcuts), upsamplers keep the channels
    patch_size: int = 1  # Wan2.2: 2, the decoder's 3 * P * P output channels are P x P pixels each

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> "DecoderSpec":
        """The decoder of an AutoencoderKLWan config.json (Wan2.1's or Wan2.2's). ValueError if it cannot be."""
        residual = bool(cfg.get("is_residual", False))
        patch = 1 if cfg.get("patch_size") is None else cfg["patch_size"]
        dim = cfg.get("decoder_base_dim") or cfg.get("base_dim", 96)
        mult = cfg.get("dim_mult", [1, 2, 4, 4])
        nres = cfg.get("num_res_blocks", 2)
        z = cfg.get("z_dim", 16)
        temporal = list(cfg.get("temperal_downsample", [False, True, True]))[::-1]
        for name, value, cap in (("patch_size", patch, MAX_WIDTH), ("decoder_base_dim/base_dim", dim, MAX_WIDTH),
                                 ("num_res_blocks", nres, MAX_RESNETS), ("z_dim", z, MAX_WIDTH)):
            if not _count(value, cap):
                raise ValueError(f"VAE config: {name} must be an integer from 1 to {cap}, got {_short(value)}")
        if not isinstance(mult, list) or not 0 < len(mult) <= MAX_UP_BLOCKS or not all(_count(v, MAX_WIDTH)
                                                                                      for v in mult):
            raise ValueError(f"VAE config: dim_mult must be a list of 1 to {MAX_UP_BLOCKS} integers from 1 to "
                             f"{MAX_WIDTH}, got {_short(mult)}")
        out = cfg.get("out_channels", 3)
        if out != 3 * patch * patch:
            raise ValueError(f"VAE config: out_channels {_short(out)} is not RGB times the {patch}x{patch} patch "
                             f"({3 * patch * patch})")
        if len(temporal) < len(mult) - 1:
            raise ValueError(f"VAE config: temperal_downsample has {len(temporal)} entries for {len(mult)} blocks")
        dims = [dim * u for u in [mult[-1], *mult[::-1]]]
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            up = None if i == len(mult) - 1 else ("upsample3d" if temporal[i] else "upsample2d")
            # Wan2.1's upsamplers halve the channels, Wan2.2's keep them
            blocks.append((cin // 2 if i > 0 and not residual else cin, cout, nres + 1, up))
        default_mean, default_std = _LATENTS.get(z, ([], []))
        mean = tuple(cfg.get("latents_mean") or default_mean)[:z]
        std = tuple(cfg.get("latents_std") or default_std)[:z]
        if len(mean) != z or len(std) != z:
            raise ValueError(f"VAE config: z_dim {z} needs {z} latents_mean and latents_std values, got "
                             f"{len(mean)} and {len(std)}")
        spec = cls(z, dims[0], tuple(blocks), mean, std, residual, patch)
        spec.check()
        return spec

    def check(self) -> None:
        """ValueError unless the modules can be built (a config or weight file names any shapes): every channel
        count and the patch at least 1 (a 0 divides by zero in the shortcut, the strides and the size checks), at
        most MAX_UP_BLOCKS up blocks of MAX_RESNETS + 1 residual blocks (num_res_blocks + 1, as diffusers builds)."""
        if self.z_dim < 1 or self.mid_dim < 1:
            raise ValueError(f"the decoder's input has {self.z_dim} latent and {self.mid_dim} mid channels; both "
                             f"must be at least 1")
        if self.patch_size < 1:
            raise ValueError(f"the decoder's output patch size is {self.patch_size}; it must be at least 1")
        if not 0 < len(self.blocks) <= MAX_UP_BLOCKS:
            raise ValueError(f"the decoder has {len(self.blocks)} up blocks; 1 to {MAX_UP_BLOCKS} are supported")
        for i, (cin, cout, n, _) in enumerate(self.blocks):
            if cin < 1 or cout < 1:
                raise ValueError(f"up block {i} has {cin} -> {cout} channels; each must be at least 1")
            if not 0 < n <= MAX_RESNETS + 1:
                raise ValueError(f"up block {i} has {n} residual blocks; 1 to {MAX_RESNETS + 1} are supported")
        if self.is_residual:
            for cin, cout, _, up in self.blocks:
                factor = (8 if up == "upsample3d" else 4) if up else 0
                if up and cout * factor % cin:
                    raise ValueError(f"a residual up block of {cin} -> {cout} channels cannot shortcut (its "
                                     f"{cout} x {factor} upsampled channels are no multiple of {cin})")

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(b[3] == "upsample3d" for b in self.blocks)

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent pixel: the up blocks' 2x each times the output patch."""
        return 2 ** sum(b[3] is not None for b in self.blocks) * self.patch_size


def _count(value, cap: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= cap


def _short(value) -> str:
    """repr(value) cut to 40 characters: a config's 2000-digit number or 200000-entry list stays one short line."""
    if isinstance(value, int) and value.bit_length() > 64:  # repr would print all its digits (or refuse to)
        return f"a {value.bit_length()}-bit integer"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class WanVAEDecoder(nn.Module):
    """``decode_stream(latents [1, z, T, h, w])`` yields uint8 RGB frames ``[s*h, s*w, 3]`` as they are decoded:
    1 for latent frame 0, then 4 per latent frame. Latents are in the DiT's normalised space."""

    def __init__(self, spec: DecoderSpec = DecoderSpec()):
        super().__init__()
        self.spec = spec
        self.post_quant_conv = CausalConv3d(spec.z_dim, spec.z_dim, 1)
        self.decoder = nn.Module()
        self.decoder.conv_in = CausalConv3d(spec.z_dim, spec.mid_dim, 3, padding=1)
        self.decoder.mid_block = MidBlock(spec.mid_dim)
        block = ResidualUpBlock if spec.is_residual else UpBlock
        self.decoder.up_blocks = nn.ModuleList(block(*b) for b in spec.blocks)
        out_dim = spec.blocks[-1][1]
        self.decoder.norm_out = RMSNorm(out_dim, images=False)
        self.decoder.conv_out = CausalConv3d(out_dim, 3 * spec.patch_size**2, 3, padding=1)
        self.register_buffer("latents_mean", torch.tensor(spec.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(spec.latents_std).view(1, -1, 1, 1, 1), persistent=False)
        self.tile_sample_min = 256  # pixels: tile size and stride when tiling (as diffusers)
        self.tile_sample_stride = 192
        self.tiling = False

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.float32) -> "WanVAEDecoder":
        """A diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors), a pipeline folder with vae/,
        the original Wan2.1_VAE.pth, or a folder holding it. Encoder weights are ignored."""
        from .vae_weights import load_vae_state

        spec, state = load_vae_state(Path(path))
        with torch.device("meta"):
            model = cls(spec)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True,
                              assign=True)
        model.latents_mean = torch.tensor(spec.latents_mean, device=device).view(1, -1, 1, 1, 1)
        model.latents_std = torch.tensor(spec.latents_std, device=device).view(1, -1, 1, 1, 1)
        return model.eval().requires_grad_(False)

    # -- decoding -----------------------------------------------------------------------------------------------

    def _decode_chunk(self, z_BCTHW: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One latent frame through the decoder: [B, 3 * P * P, n, H / P, W / P], not yet unpatchified or clamped."""
        d = self.decoder
        x = d.conv_in(self.post_quant_conv(z_BCTHW), cache)
        x = d.mid_block(x, cache)
        for block in d.up_blocks:
            x = block(x, cache)
        out = d.conv_out(F.silu(d.norm_out(x)), cache)
        cache.first = False
        return out

    def _pixels(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        """The decoder's output as RGB in [-1, 1]: [B, 3 * P * P, n, h, w] -> [B, 3, n, h * P, w * P]. Channel
        c * P * P + j * P + i is pixel (row i, column j) of its P x P patch (upstream's "(c r q) -> (h q) (w r)")."""
        P = self.spec.patch_size
        if P > 1:
            B, _, n, h, w = x_BCTHW.shape
            x_BCTHW = (x_BCTHW.view(B, 3, P, P, n, h, w).permute(0, 1, 4, 5, 3, 6, 2)
                       .reshape(B, 3, n, h * P, w * P))
        return x_BCTHW.clamp(-1, 1)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.latents_std.dtype) * self.latents_std + self.latents_mean

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor, *, group=None) -> Iterator[torch.Tensor]:
        """Decoded pixels [1, 3, n, H, W] in [-1, 1] per latent frame (n = 1 for the first, 4 after). With a
        process group of P > 1 ranks: this rank's band of rows [1, 3, n, R, W] (see decode_stream)."""
        yield from self._chunks(latents, self._bands(latents, group))

    def _bands(self, latents: torch.Tensor, group):
        """This rank's share of a decode over `group` (None: one rank decodes everything); checks the latents."""
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != self.spec.z_dim:
            raise ValueError(f"latents must be [1, {self.spec.z_dim}, T, h, w], got {tuple(latents.shape)}")
        import torch.distributed as dist

        if group is None or dist.get_world_size(group) == 1:
            return None
        from .vae_parallel import Bands

        return Bands(group, latents.shape[-2])

    @torch.no_grad()
    def _chunks(self, latents: torch.Tensor, bands) -> Iterator[torch.Tensor]:
        dtype = self.post_quant_conv.weight.dtype
        z = self.denormalize(latents.to(self.post_quant_conv.weight.device)).to(dtype)
        _, _, T, h, w = z.shape
        s = self.spec.spatial_stride
        tiled = self.tiling and (h * s > self.tile_sample_min or w * s > self.tile_sample_min)
        cache = Cache()
        if bands is not None:
            if tiled:
                raise ValueError("the VAE decode is split over the replica's ranks by rows or tiled on one rank, "
                                 "not both: turn model.vae_tiling or parallel.vae_parallel off")
            cache.bands = bands
            z = bands.mine(z)
        elif tiled:
            yield from self._tiled_chunks(z)
            return
        for t in range(T):
            yield self._pixels(self._decode_chunk(z[:, :, t : t + 1], cache))

    def _tiled_chunks(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """Overlapping spatial tiles decoded with a cache each and blended linearly (as diffusers' tiled_decode).

        What tiling bounds: the activations of one chunk, which depend on the tile size, not the frame size.
        What it does not: the causal caches. Each tile needs its own cache across every latent frame, so all of
        them live for the whole decode, and together they cover the overlapped area: tile_cache_factor(h, w)
        times the untiled cache (720p: 1.65x, 13.4 GiB vs 8.1 GiB in fp32; 480p: 1.66x, 5.8 vs 3.5 GiB). Still
        constant in the video's length, and the peak falls (720p: 14.4 vs 19.4 GiB; 480p: 6.7 vs 8.4 GiB): the
        activations saved outweigh the extra caches. See bench/vae_cache.py."""
        _, _, T, h, w = z.shape
        s, P = self.spec.spatial_stride, self.spec.patch_size
        if self.tile_sample_min % P or self.tile_sample_stride % P:
            raise ValueError(f"VAE tiles of {self.tile_sample_min} pixels every {self.tile_sample_stride}: both "
                             f"must be multiples of the decoder's {P}x{P} output patch")
        tile, stride = self.tile_sample_min // s, self.tile_sample_stride // s
        # tiles are blended before the unpatchify (as diffusers), so in the decoder's output pixels: P x P each
        tile_out, stride_out = self.tile_sample_min // P, self.tile_sample_stride // P
        blend = tile_out - stride_out
        origins = [(i, j) for i in range(0, h, stride) for j in range(0, w, stride)]
        caches = {o: Cache() for o in origins}
        rows_i = sorted({i for i, _ in origins})
        cols_j = sorted({j for _, j in origins})
        for t in range(T):
            tiles = {(i, j): self._decode_chunk(z[:, :, t : t + 1, i : i + tile, j : j + tile], caches[(i, j)])
                     for i, j in origins}
            out_rows = []
            for ri, i in enumerate(rows_i):
                row = []
                for ci, j in enumerate(cols_j):
                    cur = tiles[(i, j)]
                    if ri > 0:
                        cur = _blend(tiles[(rows_i[ri - 1], j)], cur, blend, dim=-2)
                    if ci > 0:
                        cur = _blend(tiles[(i, cols_j[ci - 1])], cur, blend, dim=-1)
                    tiles[(i, j)] = cur
                    row.append(cur[..., :stride_out, :stride_out])
                out_rows.append(torch.cat(row, dim=-1))
            yield self._pixels(torch.cat(out_rows, dim=-2)[..., : h * s // P, : w * s // P])

    def decode_stream(self, latents: torch.Tensor, *, group=None) -> Iterator[np.ndarray | None]:
        """uint8 RGB frames [H, W, 3], each as soon as it is decoded.

        With a process group of P > 1 ranks, every rank calls this with the same latents and iterates it to the
        end (each decoded chunk is a collective): each rank decodes a band of rows of every frame, rank 0 of the
        group yields the whole frames and the others yield None in their place (as many items). Exact: the same
        frames as the single-rank decode. Not with tiling (ValueError)."""
        bands = self._bands(latents, group)
        for chunk in self._chunks(latents, bands):
            frames = ((chunk[0].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # C n R W
            if bands is not None:
                frames = bands.whole(frames)
                if bands.rank != 0:
                    yield from [None] * frames.shape[1]
                    continue
            for frame in frames.permute(1, 2, 3, 0).cpu().numpy():
                yield frame

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """All frames at once, [1, 3, T', H, W] in [-1, 1] (for tests and comparisons)."""
        return torch.cat(list(self.decode_chunks(latents)), dim=2)


def tile_cache_factor(h: int, w: int, tile: int = 32, stride: int = 24) -> float:
    """Causal-cache bytes of the tiled decode over the untiled one, for h x w latents and tiles of `tile` latent
    pixels every `stride` (the defaults: 256-pixel tiles every 192 pixels): the tiles' areas, overlaps counted once
    per tile, over the frame's. 720p (90 x 160 latents): 1.65; 480p (60 x 104): 1.66."""
    def covered(n: int) -> int:
        return sum(min(tile, n - i) for i in range(0, n, stride))

    return covered(h) * covered(w) / (h * w)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b with its first `extent` rows (dim=-2) or columns (dim=-1) ramped in from a's last ones."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    ramp = torch.arange(extent, device=b.device, dtype=torch.float64) / extent
    shape = [1] * b.dim()
    shape[dim] = extent
    ramp = ramp.view(shape)
    b = b.clone()
    head = b.narrow(dim, 0, extent)
    head.copy_((a.narrow(dim, a.shape[dim] - extent, extent) * (1 - ramp) + head * ramp).to(b.dtype))
    return b
