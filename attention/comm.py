"""The wire side of Ulysses: head layout, wire codecs, all-to-alls in both directions, and the fuse planner.

Legend: B batch, L local tokens (one rank's slice), S = P*L gathered tokens, H heads, h heads of one rank's
chunk, D head dim, P group size, W width of one wire row (one (token, head) vector), N rows.
"""

from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

E4M3_MAX = 448.0


# --------------------------------------------------------------------------------------------------------------
# Which heads live where


@dataclass(frozen=True)
class HeadLayout:
    """Heads of a P-rank group: rank r owns H//P heads, plus one if r < H%P, as one contiguous range; each
    rank's range is cut into `chunks` contiguous chunks the same way."""

    heads: int
    world: int
    chunks: int

    @functools.cached_property
    def counts(self) -> tuple[int, ...]:
        base, extra = divmod(self.heads, self.world)
        return tuple(base + (r < extra) for r in range(self.world))

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.counts:
            out.append(acc)
            acc += n
        return tuple(out)

    def chunk(self, rank: int, c: int) -> tuple[int, int]:
        """(first head, head count) of chunk c of `rank`'s heads."""
        n = self.counts[rank]
        base, extra = divmod(n, self.chunks)
        start = self.offsets[rank] + c * base + min(c, extra)
        return start, base + (c < extra)

    def live_chunks(self) -> list[int]:
        """Chunks that hold a head on some rank; every rank computes the same list."""
        return [c for c in range(self.chunks) if any(self.chunk(r, c)[1] for r in range(self.world))]


# --------------------------------------------------------------------------------------------------------------
# Wire codecs: how one [..., D] vector becomes a row of W wire elements and back


class NativeCodec:
    """Rows are the vectors themselves, in the tensors' dtype."""

    name = "native"

    def wire(self, dtype: torch.dtype, head_dim: int) -> tuple[torch.dtype, int]:
        return dtype, head_dim

    def encode_into(self, dst_W: torch.Tensor, src_D: torch.Tensor) -> None:
        dst_W.copy_(src_D)

    def decode(self, rows_NW: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        return rows_NW


class FP8Codec:
    """float8 e4m3 payload plus one fp32 scale per vector, packed into one uint8 row: [D bytes | pad | 4 bytes].

    The scale is amax/448, so every vector uses e4m3's full range; rows stay 4-byte aligned so the scale can be
    read back as a float32 view without a copy. gloo cannot carry float8, so everything travels as uint8.
    """

    name = "fp8"

    @staticmethod
    def _scale_at(head_dim: int) -> int:
        return -(-head_dim // 4) * 4

    def wire(self, dtype: torch.dtype, head_dim: int) -> tuple[torch.dtype, int]:
        return torch.uint8, self._scale_at(head_dim) + 4

    def encode_into(self, dst_W: torch.Tensor, src_D: torch.Tensor) -> None:
        d, at = src_D.shape[-1], self._scale_at(src_D.shape[-1])
        x = src_D.float()
        scale = (x.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        dst_W[..., :d].view(torch.float8_e4m3fn).copy_(x / scale)  # the cast to fp8 happens in the copy
        dst_W[..., at : at + 4].copy_(scale.view(torch.uint8))

    def decode(self, rows_NW: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        at = self._scale_at(head_dim)
        payload_ND = rows_NW[:, :head_dim]
        scale_N1 = rows_NW[:, at : at + 4].view(torch.float32)
        if payload_ND.is_cuda:
            values_ND = payload_ND.view(torch.float8_e4m3fn).float()
        else:  # torch's fp8 -> fp32 cast is ~5x slower on CPU than a 256-entry table lookup
            values_ND = _e4m3_table().index_select(0, payload_ND.int().view(-1)).view(payload_ND.shape)
        return (values_ND * scale_N1).to(dtype)


@functools.cache
def _e4m3_table() -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


# --------------------------------------------------------------------------------------------------------------
# The two re-shardings


@dataclass
class _Pending:
    """One all-to-all in flight and how to read its receive buffer."""

    work: object
    recv_NW: torch.Tensor
    tensors: int = 1  # how many [B, L, h, D] tensors travel stacked in it


def _all_to_all(
    send_NW: torch.Tensor, send_rows: list[int], recv_rows: list[int], group, tensors: int = 1
) -> _Pending:
    recv_NW = send_NW.new_empty((sum(recv_rows), send_NW.shape[1]))
    work = dist.all_to_all_single(recv_NW, send_NW, recv_rows, send_rows, group=group, async_op=True)
    return _Pending(work, recv_NW, tensors)


class SeqToHead:
    """Sequence-sharded [B, L, H, D] tensors -> this rank's heads of chunk c over the whole sequence [B, S, h, D].

    fused: the tensors travel stacked in ONE all-to-all; otherwise one all-to-all each, all in flight at once.
    Both decode to identical contiguous tensors, so the attention that follows is bit-for-bit the same.
    """

    def __init__(self, layout: HeadLayout, rank: int, codec, fused: bool, group):
        self.layout, self.rank, self.codec, self.fused, self.group = layout, rank, codec, fused, group

    def start(self, xs: Sequence[torch.Tensor], c: int) -> list[_Pending]:
        groups = [list(xs)] if self.fused else [[x] for x in xs]
        return [self._start_one(g, c) for g in groups]

    def _start_one(self, xs: list[torch.Tensor], c: int) -> _Pending:
        B, L, _, D = xs[0].shape
        P, n = self.layout.world, len(xs)
        wire_dtype, W = self.codec.wire(xs[0].dtype, D)
        send_rows = [n * B * L * self.layout.chunk(j, c)[1] for j in range(P)]
        recv_rows = [n * B * L * self.layout.chunk(self.rank, c)[1]] * P
        send_NW = torch.empty((sum(send_rows), W), dtype=wire_dtype, device=xs[0].device)
        row = 0
        for j in range(P):  # destination-major: all of rank j's rows are one contiguous split
            start, h = self.layout.chunk(j, c)
            for x in xs:
                rows = B * L * h
                self.codec.encode_into(send_NW[row : row + rows].view(B, L, h, W), x[:, :, start : start + h])
                row += rows
        return _all_to_all(send_NW, send_rows, recv_rows, self.group, n)

    def finish(self, pending: list[_Pending], like: torch.Tensor, c: int) -> list[torch.Tensor]:
        B, L, _, D = like.shape
        P, h = self.layout.world, self.layout.chunk(self.rank, c)[1]
        out = []
        for p in pending:
            p.work.wait()
            x_NW = self.codec.decode(p.recv_NW, D, like.dtype)
            x_PnBLhD = x_NW.view(P, p.tensors, B, L, h, D)
            for t in range(p.tensors):
                # A view when B == 1 and unfused; otherwise one copy. Contiguous either way.
                out.append(x_PnBLhD[:, t].transpose(0, 1).reshape(B, P * L, h, D).contiguous())
        return out


class HeadToSeq:
    """This rank's attention output for chunk c [B, S, h, D] -> each rank's token slice of those heads; finish
    writes them into the [B, L, H, D] output."""

    def __init__(self, layout: HeadLayout, rank: int, codec, group):
        self.layout, self.rank, self.codec, self.group = layout, rank, codec, group

    def start(self, out_BShD: torch.Tensor, c: int) -> _Pending:
        B, S, h, D = out_BShD.shape
        P = self.layout.world
        L = S // P
        wire_dtype, W = self.codec.wire(out_BShD.dtype, D)
        send_NW = torch.empty((P * B * L * h, W), dtype=wire_dtype, device=out_BShD.device)
        self.codec.encode_into(
            send_NW.view(P, B, L, h, W), out_BShD.unflatten(1, (P, L)).transpose(0, 1)
        )
        recv_rows = [B * L * self.layout.chunk(j, c)[1] for j in range(P)]
        return _all_to_all(send_NW, [B * L * h] * P, recv_rows, self.group)

    def finish(self, pending: _Pending, out_BLHD: torch.Tensor, c: int) -> None:
        B, L, _, D = out_BLHD.shape
        pending.work.wait()
        x_ND = self.codec.decode(pending.recv_NW, D, out_BLHD.dtype)
        row = 0
        for j in range(self.layout.world):
            start, h = self.layout.chunk(j, c)
            out_BLHD[:, :, start : start + h] = x_ND[row : row + B * L * h].view(B, L, h, D)
            row += B * L * h


# --------------------------------------------------------------------------------------------------------------
# fuse_qkv="auto": measured once per group and message size, agreed by all ranks


_FUSE_PLANS: "weakref.WeakKeyDictionary[object, dict[tuple, bool]]" = weakref.WeakKeyDictionary()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_fuse(
    group, layout: HeadLayout, rank: int, codec, like: torch.Tensor, comm_device: torch.device
) -> bool:
    """Whether one fused all-to-all beats three for messages shaped like `like` [B, L, H, D] on this group.

    The first call for a (message-size bucket, dtype, codec, chunking) times both ways with the real shapes and
    takes the max over ranks (one all_reduce), so every rank makes the same choice; later calls are a dict lookup.
    """
    nbytes = like.numel() * like.element_size() // layout.chunks
    key = (like.device.type, like.dtype, codec.name, layout.heads, layout.chunks, nbytes.bit_length())
    plans = _FUSE_PLANS.setdefault(group, {})
    if key in plans:
        return plans[key]
    xs = [torch.randn_like(like) for _ in range(3)]
    best = {True: float("inf"), False: float("inf")}
    for trial in range(3):  # the first round is a warm-up
        for fused in (True, False):
            mover = SeqToHead(layout, rank, codec, fused, group)
            _sync(like.device)
            t0 = time.perf_counter()
            for c in layout.live_chunks():
                mover.finish(mover.start(xs, c), like, c)
            _sync(like.device)
            if trial:
                best[fused] = min(best[fused], time.perf_counter() - t0)
    times = torch.tensor([best[True], best[False]], dtype=torch.float64, device=comm_device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    plans[key] = bool(times[0] < times[1])
    return plans[key]
