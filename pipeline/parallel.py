"""Sequence parallelism applied to a built WanDiT, and the replica's (cfg, ring, ulysses) process-group mesh.

Legend: B batch, S tokens of the whole video, L tokens per rank (S padded up to a multiple of P, divided by P),
U ranks in a Ulysses group, R ranks in a ring, P = R*U ranks sharing one video's tokens (the sequence group).
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
    """Tokens split in P = R*U contiguous slices (the last padded with zeros); self-attention through
    ulysses_attention, which never attends to the padding, so the result equals the unsharded model's.

    With a ring group (Ulysses x Ring), the rank with ring index i and Ulysses index j holds slice i*U + j: the
    all-to-all runs inside the Ulysses group (one node) and ring attention across the ring (point to point, the
    hops that may cross nodes). Without one, R = 1 and slice j is the Ulysses group's rank j."""

    def __init__(self, group, *, backend: str = "auto", fuse_qkv="auto", fp8_comm: bool = False, head_chunks: int = 1,
                 ring_group=None, sequence_group=None):
        self.group, self.ring_group, self.sequence_group = group, ring_group, sequence_group
        self.ulysses = dist.get_world_size(group)
        self.ring = 1 if ring_group is None else dist.get_world_size(ring_group)
        ring_rank = 0 if ring_group is None else dist.get_rank(ring_group)
        self.world = self.ring * self.ulysses
        self.rank = ring_rank * self.ulysses + dist.get_rank(group)
        if sequence_group is not None and (dist.get_world_size(sequence_group), dist.get_rank(sequence_group)) != (
                self.world, self.rank):
            raise ValueError(f"sequence_group must hold the ring x Ulysses ranks with this rank at index {self.rank} "
                             f"of {self.world}, got index {dist.get_rank(sequence_group)} of "
                             f"{dist.get_world_size(sequence_group)}")
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
        x_BL = x_BL.contiguous()
        out_PBL = x_BL.new_empty((self.world, *x_BL.shape))
        if self.sequence_group is not None or self.ring == 1:  # slice i*U + j is the group's rank i*U + j
            _all_gather_dim0(out_PBL.view(-1, *x_BL.shape[1:]), x_BL, self.sequence_group or self.group)
        else:  # the Ulysses group's U slices make ring block i; the ring then gathers the R blocks in order
            block_UBL = x_BL.new_empty((self.ulysses, *x_BL.shape))
            _all_gather_dim0(block_UBL.view(-1, *x_BL.shape[1:]), x_BL, self.group)
            _all_gather_dim0(out_PBL.view(-1, *x_BL.shape[1:]), block_UBL.view(-1, *x_BL.shape[1:]), self.ring_group)
        return out_PBL.transpose(0, 1).flatten(1, 2)[:, :seq_len]

    def attend(self, q_BLHD, k_BLHD, v_BLHD, seq_len: int, layer: int) -> torch.Tensor:
        # Every layer of one forward sees the same shapes: checking them across ranks once (layer 0) is enough.
        return ulysses_attention(
            q_BLHD, k_BLHD, v_BLHD, group=self.group, seq_len=seq_len, fuse_qkv=self.fuse_qkv,
            fp8_comm=self.fp8_comm, head_chunks=self.head_chunks, backend=self.backend, validate=layer == 0,
            ring_group=self.ring_group,
        )


def apply_sequence_parallel(model: WanDiT, group, *, fuse_qkv="auto", fp8_comm: bool = False,
                            head_chunks: int = 1, ring_group=None, sequence_group=None) -> WanDiT:
    """Shard `model`'s tokens over `group` (the Ulysses group), or with `ring_group` over the ring x Ulysses ranks
    (Mesh.ulysses_group, Mesh.ring_group). Afterwards every rank calls the model with the same full inputs and gets
    the same full output as the unparallel model. Heads need not divide the Ulysses group's size.
    sequence_group: optional, the ring x Ulysses ranks in slice order (Mesh.sp_group): gathers then take one
    all_gather over it instead of one per group."""
    backend = getattr(model.layout, "backend", "auto")
    if ring_group is not None and dist.get_world_size(ring_group) == 1:
        ring_group = None  # a ring of one is no ring
    model.layout = UlyssesLayout(group, backend=backend, fuse_qkv=fuse_qkv, fp8_comm=fp8_comm, head_chunks=head_chunks,
                                 ring_group=ring_group, sequence_group=sequence_group)
    return model


@dataclass
class Mesh:
    """This rank's place in a replica of cfg x ring x ulysses ranks, Ulysses innermost (consecutive ranks, which
    placement keeps on one node): rank = cfg_rank * (R*U) + ring_rank * U + ulysses_rank.

    sp_group: the sequence group, the R*U ranks that share one video's tokens (same cfg branch); sp_rank, this
    rank's index in it (= ring_rank * U + ulysses_rank, the token slice it holds). cfg_group: the ranks holding the
    same tokens in the other branch (size cfg_degree). ulysses_group: the U ranks of the all-to-all (sp_group when
    ring_degree is 1); ring_group: the R ranks with this rank's cfg and Ulysses index (None when ring_degree is 1)."""

    cfg_degree: int
    ulysses_degree: int
    cfg_rank: int
    sp_rank: int
    sp_group: object
    cfg_group: object | None
    ring_degree: int = 1
    ring_rank: int = 0
    ulysses_rank: int = 0
    ulysses_group: object | None = None
    ring_group: object | None = None


def build_mesh(cfg_degree: int, ulysses_degree: int, timeout: timedelta | None = None, ring_degree: int = 1) -> Mesh:
    """Create the mesh's groups; every rank of the default group must call this with the same degrees (new_group
    is collective and must be called in the same order everywhere). timeout: of every collective in the groups
    (None: torch's default, 10 min on NCCL, 30 on gloo; the Runner passes runtime.collective_timeout_s)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    C, R, U = cfg_degree, ring_degree, ulysses_degree
    if min(C, R, U) < 1 or C * R * U != world:
        raise ValueError(f"cfg_degree {C} x ring_degree {R} x ulysses_degree {U} != world size {world}")
    P = R * U
    cfg_rank, sp_rank = divmod(rank, P)
    ring_rank, ulysses_rank = divmod(sp_rank, U)

    def groups(rank_lists: list[list[int]]):
        """One new_group per list (on every rank, in order); the one holding this rank."""
        mine = None
        for ranks in rank_lists:
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine = g
        return mine

    sp_group = groups([[c * P + s for s in range(P)] for c in range(C)])
    ulysses_group = ring_group = None
    if R == 1:
        ulysses_group = sp_group
    else:
        # A Ulysses group of one rank is a (trivial) group of its own; a ring over a whole cfg half is sp_group.
        ulysses_group = groups([[c * P + i * U + j for j in range(U)] for c in range(C) for i in range(R)])
        ring_group = sp_group if U == 1 else groups([[c * P + i * U + j for i in range(R)]
                                                     for c in range(C) for j in range(U)])
    cfg_group = groups([[c * P + s for c in range(C)] for s in range(P)]) if C > 1 else None
    return Mesh(C, U, cfg_rank, sp_rank, sp_group, cfg_group, ring_degree=R, ring_rank=ring_rank,
                ulysses_rank=ulysses_rank, ulysses_group=ulysses_group, ring_group=ring_group)
