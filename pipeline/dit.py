"""Wan2.1 text-to-video Diffusion Transformer. No distributed code: token sharding and attention are delegated to a
TokenLayout (local by default; pipeline.parallel installs the Ulysses one).

Legend: B batch, C model dim, S tokens of the whole video, L tokens on this rank, T text tokens, H heads,
D head dim, P patch vector (out_dim * pt * ph * pw), F/Hh/Ww latent frames/height/width.
State-dict names follow the original Wan2.1 release (blocks.0.self_attn.q.weight, head.modulation, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from attention import local_attention

__all__ = ["WanDiT", "WanDiTConfig", "TokenLayout", "LocalLayout", "StackInput"]


@dataclass(frozen=True)
class WanDiTConfig:
    """Architecture of a Wan2.1 DiT (what the weights' config.json says, in the original release's names)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    text_len: int = 512

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 for the 3-axis RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.out_dim * math.prod(self.patch_size)


# --------------------------------------------------------------------------------------------------------------
# Where the tokens live: the one seam through which parallelism plugs in


class TokenLayout(Protocol):
    def shard(self, x_BS: torch.Tensor) -> torch.Tensor:
        """This rank's tokens [B, L, ...] of a whole-sequence tensor [B, S, ...]."""

    def gather(self, x_BL: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The whole sequence [B, S, ...] from every rank's [B, L, ...]."""

    def attend(self, q_BLHD, k_BLHD, v_BLHD, seq_len: int, layer: int) -> torch.Tensor:
        """Self-attention over the whole sequence for this rank's query tokens."""

    def valid_tokens(self, seq_len: int) -> int:
        """How many of this rank's L tokens are real (the rest is padding)."""


class LocalLayout:
    """Every token on this device."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def shard(self, x_BS: torch.Tensor) -> torch.Tensor:
        return x_BS

    def gather(self, x_BL: torch.Tensor, seq_len: int) -> torch.Tensor:
        return x_BL

    def attend(self, q_BLHD, k_BLHD, v_BLHD, seq_len: int, layer: int) -> torch.Tensor:
        return local_attention(q_BLHD, k_BLHD, v_BLHD, backend=self.backend)

    def valid_tokens(self, seq_len: int) -> int:
        return seq_len


# --------------------------------------------------------------------------------------------------------------
# Building blocks


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def apply_rope(x_BLHD: torch.Tensor, cos_LD2: torch.Tensor, sin_LD2: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) by the token's angles, in fp32."""
    x1, x2 = x_BLHD.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos_LD2[:, None], sin_LD2[:, None]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x_BLHD.dtype)


def rope_angles(grid: tuple[int, int, int], head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, D/2] of Wan's 3-axis RoPE for a (frames, height, width) token grid. The pairs are split
    time/height/width as (D - 4*(D//6), 2*(D//6), 2*(D//6)) channels; angles are computed in float64."""
    d_hw = 2 * (head_dim // 6)
    parts = []
    for axis, (n, d) in enumerate(zip(grid, (head_dim - 2 * d_hw, d_hw, d_hw))):
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
        ang = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        parts.append(ang.view(shape).expand(*grid, d // 2))
    angles = torch.cat(parts, dim=-1).reshape(-1, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def timestep_embedding(t_B: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoid of the timestep, cos first then sin, freqs 10000^(-i/half), computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t_B.device) / half)
    angles = torch.outer(t_B.double(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


class SelfAttention(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x_BLC, rope, layout: TokenLayout, seq_len: int, layer: int):
        q_BLHD = self.norm_q(self.q(x_BLC)).unflatten(-1, (self.heads, -1))
        k_BLHD = self.norm_k(self.k(x_BLC)).unflatten(-1, (self.heads, -1))
        v_BLHD = self.v(x_BLC).unflatten(-1, (self.heads, -1))
        q_BLHD, k_BLHD = apply_rope(q_BLHD, *rope), apply_rope(k_BLHD, *rope)
        out_BLHD = layout.attend(q_BLHD, k_BLHD, v_BLHD, seq_len, layer)
        return self.o(out_BLHD.flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, cfg: WanDiTConfig, backend: str):
        super().__init__()
        dim = cfg.dim
        self.heads, self.backend = cfg.num_heads, backend
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x_BLC, ctx_BTC):
        q_BLHD = self.norm_q(self.q(x_BLC)).unflatten(-1, (self.heads, -1))
        k_BTHD = self.norm_k(self.k(ctx_BTC)).unflatten(-1, (self.heads, -1))
        v_BTHD = self.v(ctx_BTC).unflatten(-1, (self.heads, -1))
        return self.o(local_attention(q_BLHD, k_BTHD, v_BTHD, backend=self.backend).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: WanDiTConfig, backend: str):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg, backend)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x_BLC, e0_B6C, ctx_BTC, rope, layout, seq_len, layer):
        """x is the fp32 residual stream; matmuls run in the weights' dtype."""
        dtype = self.ffn[0].weight.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e0_B6C).chunk(6, dim=1)
        h = (layer_norm(x_BLC, self.eps) * (1 + scale1) + shift1).to(dtype)
        x_BLC = x_BLC + self.self_attn(h, rope, layout, seq_len, layer).float() * gate1
        x_BLC = x_BLC + self.cross_attn(self.norm3(x_BLC).to(dtype), ctx_BTC).float()
        h = (layer_norm(x_BLC, self.eps) * (1 + scale2) + shift2).to(dtype)
        return x_BLC + self.ffn(h).float() * gate2


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.patch_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x_BLC, e_BC):
        shift, scale = (self.modulation + e_BC.unsqueeze(1)).chunk(2, dim=1)
        return self.head((layer_norm(x_BLC, self.eps) * (1 + scale) + shift).to(self.head.weight.dtype))


# --------------------------------------------------------------------------------------------------------------


class WanDiT(nn.Module):
    """Wan2.1 T2V DiT. ``model(latents [B, 16, F, H, W], timestep [B], context [B, T, text_dim])`` -> velocity
    ``[B, 16, F, H, W]`` (float32). ``forward_tokens`` runs on patch tokens so a caller can keep them sharded."""

    # Parameters that stay float32 whatever the compute dtype (as upstream and diffusers keep them).
    FP32_PARAMS = ("time_embedding.", "time_projection.", ".modulation", ".norm3.")

    def __init__(self, config: WanDiTConfig, attention_backend: str = "auto"):
        super().__init__()
        self.config = cfg = config
        self.layout: TokenLayout = LocalLayout(attention_backend)
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(Block(cfg, attention_backend) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self._rope_cache: dict = {}

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype: torch.dtype | None = None,
                        attention_backend: str = "auto") -> "WanDiT":
        """Load a diffusers model folder, a diffusers pipeline folder (transformer/) or an original Wan2.1 folder."""
        from .weights import load_dit

        return load_dit(path, device=device, dtype=dtype, attention_backend=attention_backend)

    # -- dtype ----------------------------------------------------------------------------------------------------

    @classmethod
    def keeps_fp32(cls, name: str) -> bool:
        return any(tag in f".{name}" for tag in cls.FP32_PARAMS)

    def to_compute_dtype(self, dtype: torch.dtype) -> "WanDiT":
        """Cast the matmul weights to dtype; modulation, norms and the time embedding stay float32."""
        for name, p in self.named_parameters():
            p.data = p.data.to(torch.float32 if self.keeps_fp32(name) else dtype)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.head.head.weight.dtype

    # -- tokens ---------------------------------------------------------------------------------------------------

    def grid(self, latents_shape) -> tuple[int, int, int]:
        """Token grid (frames, height, width) of latents [B, C, F, H, W]."""
        pt, ph, pw = self.config.patch_size
        _, _, f, h, w = latents_shape
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size {(f, h, w)} is not a multiple of the patch size {self.config.patch_size}")
        return f // pt, h // ph, w // pw

    def patchify(self, latents_BCFHW: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> patch tokens [B, S, P], tokens in (f, h, w) order, channels (pt, ph, pw, c)."""
        pt, ph, pw = self.config.patch_size
        f, h, w = self.grid(latents_BCFHW.shape)
        x = latents_BCFHW.unflatten(2, (f, pt)).unflatten(4, (h, ph)).unflatten(6, (w, pw))  # B C f pt h ph w pw
        return x.permute(0, 2, 4, 6, 3, 5, 7, 1).flatten(4).flatten(1, 3)

    def unpatchify(self, x_BSP: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x_BSP.reshape(x_BSP.shape[0], f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _rope(self, grid, device):
        key = (grid, str(device), id(self.layout))
        if key not in self._rope_cache:
            if len(self._rope_cache) > 8:
                self._rope_cache.clear()
            cos, sin = rope_angles(grid, self.config.head_dim, device)
            self._rope_cache[key] = (self.layout.shard(cos[None])[0], self.layout.shard(sin[None])[0])
        return self._rope_cache[key]

    # -- forward --------------------------------------------------------------------------------------------------

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        grid = self.grid(latents.shape)
        x_BLP = self.layout.shard(self.patchify(latents))
        v_BLP = self.forward_tokens(x_BLP, grid, timestep, context)
        return self.unpatchify(self.layout.gather(v_BLP, math.prod(grid)), grid)

    def forward_tokens(self, x_BLP: torch.Tensor, grid: tuple[int, int, int], timestep: torch.Tensor,
                       context: torch.Tensor) -> torch.Tensor:
        """Velocity of this rank's patch tokens [B, L, P] (layout.shard of patchify's output), float32."""
        s = self.embed(x_BLP, grid, timestep, context)
        return self.head_out(s, self.run_blocks(s, s.x_BLC))

    # The three stages of forward_tokens, for callers that decide between them (pipeline.step_cache reuses the
    # block stack's residual on some steps; the embeddings and the head always run).

    def embed(self, x_BLP: torch.Tensor, grid: tuple[int, int, int], timestep: torch.Tensor,
              context: torch.Tensor, tokens_BLC: torch.Tensor | None = None) -> "StackInput":
        """Everything the block stack reads: the embedded tokens (tokens_BLC when the caller already has
        embed_tokens(x_BLP): it does not depend on the text), time modulation, text and RoPE."""
        cfg = self.config
        timestep = timestep.reshape(-1).expand(x_BLP.shape[0]) if timestep.numel() == 1 else timestep
        e_BC = self.time_embedding(timestep_embedding(timestep, cfg.freq_dim))
        e0_B6C = self.time_projection(e_BC).unflatten(1, (6, cfg.dim))
        ctx_BTC = self.text_embedding(context.to(self.compute_dtype))
        x_BLC = self.embed_tokens(x_BLP) if tokens_BLC is None else tokens_BLC
        return StackInput(x_BLC, e_BC, e0_B6C, ctx_BTC, self._rope(grid, x_BLP.device), math.prod(grid))

    def embed_tokens(self, x_BLP: torch.Tensor) -> torch.Tensor:
        """Patch vectors [B, L, P] -> the fp32 residual stream [B, L, C] entering block 0."""
        # The patch embedding is a Conv3d with kernel == stride: a matmul on patch vectors (weights reordered to the
        # (pt, ph, pw, c) channel order that the head produces, so the sampler can step on tokens directly).
        w = self.patch_embedding.weight.permute(0, 2, 3, 4, 1).flatten(1)
        return F.linear(x_BLP.to(self.compute_dtype), w, self.patch_embedding.bias).float()

    def run_blocks(self, s: "StackInput", x_BLC: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The residual stream after blocks[start:stop] (fp32)."""
        stop = len(self.blocks) if stop is None else stop
        for i in range(start, stop):
            x_BLC = self.blocks[i](x_BLC, s.e0_B6C, s.ctx_BTC, s.rope, self.layout, s.seq_len, i)
        return x_BLC

    def head_out(self, s: "StackInput", x_BLC: torch.Tensor) -> torch.Tensor:
        """Velocity [B, L, P] (float32) from the block stack's output."""
        return self.head(x_BLC, s.e_BC).float()


@dataclass
class StackInput:
    """What WanDiT.embed computes once per forward: the stack's input tokens and its conditioning."""

    x_BLC: torch.Tensor  # fp32 residual stream entering block 0
    e_BC: torch.Tensor  # time embedding (the head's modulation input)
    e0_B6C: torch.Tensor  # time projection (every block's modulation input)
    ctx_BTC: torch.Tensor  # embedded text
    rope: tuple[torch.Tensor, torch.Tensor]
    seq_len: int
