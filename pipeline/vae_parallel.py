"""The Wan VAE decode split over a process group by bands of rows, exactly.

Every rank holds a band of each frame's rows (bands may be uneven; they double with every 2x upsample). A 3x3
convolution needs one row above and below its band: `halo` all-gathers every rank's first and last rows and each
rank takes its neighbours' (zeros at the frame's edges, as the convolution's own padding). The mid-block attention
is global over a frame's pixels: `whole` all-gathers the bands so each rank attends its own queries to every key.
Everything else (RMS norm over channels, 1x1 and time-only convolutions, nearest upsampling; Wan2.2's DupUp3D
shortcuts and 2x2 unpatchify, which turn each pixel into its own 2x2 block) is per pixel. So each
rank computes exactly the rows the single-rank decode computes, and its causal caches hold only its band (plus the
halo rows). Frames come back to rank 0 of the group through one gather of uint8 rows per decoded chunk.

When the latent frame has fewer rows than the group has ranks, the ranks past the last row decode a copy of the
last band (and are never anyone's neighbour): every rank still enters every collective, in the same order.

Legend: B batch, C channels, T frames, R rows of this rank's band, H/W full height/width, P ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from configs import OdysseyConfig

from .parallel import _all_gather_dim0

__all__ = ["Bands", "band_rows", "splits_decode"]


def splits_decode(config: OdysseyConfig) -> bool:
    """Whether every rank of a replica decodes a band of rows (parallel.vae_parallel): a Wan VAE (the embedded
    model's small decoder stays on rank 0), more than one rank, no tiling (tiling decodes on rank 0 alone)."""
    return (config.parallel.vae_parallel and config.parallel.group_size > 1 and config.model.path is not None
            and not config.model.vae_tiling)


def band_rows(h: int, ranks: int) -> list[tuple[int, int]]:
    """[start, stop) latent rows of each rank: the first h % n bands one row taller, n = min(ranks, h) bands;
    ranks past them repeat the last band."""
    n = min(ranks, h)
    base, extra = divmod(h, n)
    bands, start = [], 0
    for r in range(n):
        stop = start + base + (r < extra)
        bands.append((start, stop))
        start = stop
    return bands + [bands[-1]] * (ranks - n)


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[P, *x.shape]: every rank's x (the same shape everywhere), in rank order."""
    out = x.new_empty((dist.get_world_size(group), *x.shape))
    _all_gather_dim0(out.view(-1, *x.shape[1:]), x.contiguous(), group)
    return out


class Bands:
    """This rank's rows of a decode over `group`, at every resolution the decoder passes through."""

    def __init__(self, group, latent_rows: int):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.latent_rows = latent_rows
        self.bands = band_rows(latent_rows, self.world)
        self.active = min(self.world, latent_rows)  # ranks that own rows; the rest repeat the last band

    def scale(self, x: torch.Tensor) -> int:
        """How many rows each latent row has become in x [..., R, W] (1, 2, 4, 8: the upsamples so far; 16 for
        Wan2.2's frames, its 2x2 patch unpatchified)."""
        start, stop = self.bands[self.rank]
        return x.shape[-2] // (stop - start)

    def _owner(self, row: int, scale: int) -> int:
        return next(r for r in range(self.active) if self.bands[r][0] * scale <= row < self.bands[r][1] * scale)

    def halo(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., R, W] with one more row above and below (dim -2): the neighbours', zeros at the frame's edges."""
        ends = torch.stack([x[..., 0, :], x[..., -1, :]])  # [2, ..., W]
        every = _all_gather(ends, self.group)  # [P, 2, ..., W]
        scale = self.scale(x)
        start, stop = (row * scale for row in self.bands[self.rank])
        full = self.latent_rows * scale
        above = every[self._owner(start - 1, scale), 1] if start > 0 else torch.zeros_like(ends[0])
        below = every[self._owner(stop, scale), 0] if stop < full else torch.zeros_like(ends[0])
        return torch.cat([above.unsqueeze(-2), x, below.unsqueeze(-2)], dim=-2)

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The full frame [..., H, W] from every rank's band [..., R, W] (bands padded to the tallest to gather)."""
        scale = self.scale(x)
        tallest = max(stop - start for start, stop in self.bands) * scale
        pad = x.new_zeros((*x.shape[:-2], tallest - x.shape[-2], x.shape[-1]))
        every = _all_gather(torch.cat([x, pad], dim=-2), self.group)
        parts = [every[r][..., : (self.bands[r][1] - self.bands[r][0]) * scale, :] for r in range(self.active)]
        return torch.cat(parts, dim=-2)

    def mine(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's band [..., R, W] of a full frame [..., H, W]."""
        scale = x.shape[-2] // self.latent_rows
        start, stop = self.bands[self.rank]
        return x[..., start * scale : stop * scale, :]
