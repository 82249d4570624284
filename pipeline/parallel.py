"""Sequence parallelism applied to a built WanDiT, and the (cfg, ulysses) process-group mesh.

Legend: B batch, S tokens of the whole video, L tokens per rank (S padded up to a multiple of P, divided by P),
P ranks in the Ulysses group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from attention import ulysses_attention

from .dit import WanDiT

__all__ = ["UlyssesLayout", "apply_sequence_parallel", "Mesh", "build_mesh"]


def _all_gather_dim0(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


class UlyssesLayout:
    """Tokens split in P contiguous slices (the last padded with zeros); self-attention through ulysses_attention,
    which never attends to the padding, so the result equals the unsharded model's."""

    def __init__(self, group, *, backend: str = "auto", fuse_qkv="auto", fp8_comm: bool = False, head_chunks: int = 1):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.backend, self.fuse_qkv, self.fp8_comm, self.head_chunks = backend, fuse_qkv, fp8_comm, head_chunks

    def local_len(self, seq_len: int) -> int:
        return -(-seq_len // self.world)

    def shard(self, x_BS: torch.Tensor) -> torch.Tensor:
        S = x_BS.shape[1]
        L = self.local_len(S)
        start, stop = self.rank * L, min((self.rank + 1) * L, S)
        part = x_BS[:, start:stop]
        if part.shape[1] == L:
            return part.contiguous()
        pad = x_BS.new_zeros((x_BS.shape[0], L - part.shape[1], *x_BS.shape[2:]))
        return torch.cat([part, pad], dim=1)

    def valid_tokens(self, seq_len: int) -> int:
        L = self.local_len(seq_len)
        return max(0, min(L, seq_len - self.rank * L))

    def gather(self, x_BL: torch.Tensor, seq_len: int) -> torch.Tensor:
        if self.world == 1:
            return x_BL[:, :seq_len]
        out_PBL = x_BL.new_empty((self.world, *x_BL.shape))
        _all_gather_dim0(out_PBL.view(-1, *x_BL.shape[1:]), x_BL.contiguous(), self.group)
        return out_PBL.transpose(0, 1).flatten(1, 2)[:, :seq_len]

    def attend(self, q_BLHD, k_BLHD, v_BLHD, seq_len: int, layer: int) -> torch.Tensor:
        # Every layer of one forward sees the same shapes: checking them across ranks once (layer 0) is enough.
        return ulysses_attention(
            q_BLHD, k_BLHD, v_BLHD, group=self.group, seq_len=seq_len, fuse_qkv=self.fuse_qkv,
            fp8_comm=self.fp8_comm, head_chunks=self.head_chunks, backend=self.backend, validate=layer == 0,
        )


def apply_sequence_parallel(model: WanDiT, group, *, fuse_qkv="auto", fp8_comm: bool = False,
                            head_chunks: int = 1) -> WanDiT:
    """Shard `model`'s tokens over `group`. Afterwards every rank calls the model with the same full inputs and
    gets the same full output as the unparallel model. Heads need not divide the group size."""
    backend = getattr(model.layout, "backend", "auto")
    model.layout = UlyssesLayout(group, backend=backend, fuse_qkv=fuse_qkv, fp8_comm=fp8_comm, head_chunks=head_chunks)
    return model


@dataclass
class Mesh:
    """This rank's place in a (cfg, ulysses) mesh: rank = cfg_rank * ulysses_degree + sp_rank.

    sp_group: the ranks that share one video's tokens (same cfg branch); cfg_group: the ranks holding the same
    tokens in the other branch (size cfg_degree)."""

    cfg_degree: int
    ulysses_degree: int
    cfg_rank: int
    sp_rank: int
    sp_group: object
    cfg_group: object | None


def build_mesh(cfg_degree: int, ulysses_degree: int, timeout: timedelta | None = None) -> Mesh:
    """Create the mesh's groups; every rank of the default group must call this with the same degrees (new_group
    is collective and must be called in the same order everywhere). timeout: of every collective in the groups
    (None: torch's default, 10 min on NCCL, 30 on gloo; the Runner passes runtime.collective_timeout_s)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if cfg_degree * ulysses_degree != world:
        raise ValueError(f"cfg_degree {cfg_degree} x ulysses_degree {ulysses_degree} != world size {world}")
    sp_group = cfg_group = None
    for c in range(cfg_degree):
        g = dist.new_group([c * ulysses_degree + s for s in range(ulysses_degree)], timeout=timeout)
        if rank // ulysses_degree == c:
            sp_group = g
    if cfg_degree > 1:
        for s in range(ulysses_degree):
            g = dist.new_group([c * ulysses_degree + s for c in range(cfg_degree)], timeout=timeout)
            if rank % ulysses_degree == s:
                cfg_group = g
    return Mesh(cfg_degree, ulysses_degree, rank // ulysses_degree, rank % ulysses_degree, sp_group, cfg_group)
