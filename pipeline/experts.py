"""Which expert of a two-expert model (Wan2.2 T2V-A14B) sits on the compute device (model.offload_idle_expert).

Both experts have the same architecture, so their parameters pair up one to one with equal shapes and dtypes. The
idle expert lives in pinned CPU memory (load_components puts the low-noise one there); at the switch the two trade
places tensor by tensor: the incoming expert's tensor is copied host-to-device into a fresh device tensor, the
outgoing one's device tensor device-to-host into the incoming one's pinned buffer, which the outgoing expert then
keeps as its own home. So no pinned memory is ever allocated again (pinning 27 GiB takes seconds), the host holds
one expert's bytes, and the device at most one tensor more than one expert while they swap. Copies are queued
non-blocking on the current stream (ordered: a pinned buffer is read before it is overwritten), then the device
is synchronised once before the new expert runs. All copies go on that one stream, so the host-to-device and
device-to-host halves do not overlap each other (PCIe could carry both directions at once); a second stream would
need events per tensor to keep a pinned buffer from being overwritten before it is read, for at most ~2x on a
once-per-video move.

A swap that fails partway (the device out of memory for a tensor, a failed copy) is undone: the tensors already
exchanged trade back, so both experts are whole again and the one resident before stays resident, then the error
is raised. If undoing fails too, the switch is broken: every later use() raises one RuntimeError (the experts are
then mixed between device and host; the replica must be rebuilt).

Denoising walks the timesteps downwards, so a request switches high -> low at most once; the next request's first
step moves the high-noise expert back. Without offloading (or on a CPU rank, where the idle expert is in host memory
anyway) nothing moves.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["ExpertSwitch"]

log = logging.getLogger(__name__)


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


class ExpertSwitch:
    """use(index) returns expert `index`, on the device; with `offload` it first trades places with the resident
    expert. `moves` lists this request's swaps as (outgoing, incoming) pairs (begin_request clears it).
    synchronize: waits for the queued copies (torch.cuda.synchronize on a GPU; tests pass a recorder)."""

    def __init__(self, experts: Sequence[nn.Module], device: torch.device, *, offload: bool, resident: int = 0,
                 synchronize: Callable[[], None] | None = None):
        """resident: the expert on the device now (load_components loads the high-noise one there)."""
        self.experts = list(experts)
        self.device = device
        self.offload = offload and len(self.experts) == 2
        self.synchronize = synchronize or (lambda: torch.cuda.synchronize(device))
        self.moves: list[tuple[int, int]] = []
        self.swaps = 0  # over the Runner's life
        self.resident = resident
        self.broken: str | None = None  # why a failed swap could not be undone
        if self.offload:
            a, b = (_tensors(e) for e in self.experts)
            assert len(a) == len(b), (len(a), len(b))
            for (na, ta), (nb, tb) in zip(a, b):
                assert na == nb and ta.shape == tb.shape and ta.dtype == tb.dtype, (na, nb, ta.shape, tb.shape)

    def begin_request(self) -> None:
        self.moves = []

    def use(self, index: int) -> nn.Module:
        if self.broken is not None:
            raise RuntimeError(f"the experts are unusable: {self.broken}; this replica must be rebuilt")
        if self.offload and index != self.resident:
            move = (self.resident, index)
            # timesteps only decrease: one switch per request, and one move back at the next request's start
            assert move not in self.moves, f"expert swap {move} twice in one request"
            self._swap(self.resident, index)
            self.moves.append(move)
            self.swaps += 1
            self.resident = index
        return self.experts[index]

    @torch.no_grad()
    def _swap(self, out: int, into: int) -> None:
        leaving, arriving = self.experts[out], self.experts[into]
        swapped: list[tuple[torch.Tensor, torch.Tensor]] = []  # (outgoing, incoming) parameters already exchanged
        pending = None  # (incoming's home, its device copy) while the home is being overwritten
        try:
            for (_, p_out), (_, p_in) in zip(_tensors(leaving), _tensors(arriving)):
                home = p_in.data  # pinned host memory
                resident = torch.empty_like(p_out.data)  # on the device, like the outgoing tensor
                resident.copy_(home, non_blocking=True)
                pending = home, resident
                home.copy_(p_out.data, non_blocking=True)  # queued after the read above on the same stream
                p_in.data, p_out.data = resident, home
                swapped.append((p_out, p_in))
                pending = None
            self.synchronize()
        except BaseException as e:
            try:
                self._undo(swapped, pending)
            except BaseException as undo_error:
                self.broken = (f"swapping expert {out} out for expert {into} failed ({type(e).__name__}: {e}) and "
                               f"undoing it failed too ({type(undo_error).__name__}: {undo_error})")
                log.error("%s", self.broken)
                e.add_note(f"undoing the expert swap failed too: {type(undo_error).__name__}: {undo_error}")
                raise e from undo_error  # the swap's own error, not the undo's
            log.warning("swapping expert %d out for expert %d failed (%s: %s); undone: expert %d stays on %s",
                        out, into, type(e).__name__, e, out, self.device)
            raise
        log.info("expert %d moved to CPU memory, expert %d to %s", out, into, self.device)

    @staticmethod
    def _undo(swapped: list[tuple[torch.Tensor, torch.Tensor]], pending) -> None:
        """Trade back what _swap exchanged. Blocking copies on the same stream, so they run after the queued ones;
        no device memory is allocated (the device may just have run out): each pair's device and host buffers trade
        contents through a host copy of one tensor."""
        if pending is not None:  # the outgoing tensor never left; its home may be half overwritten
            home, resident = pending
            home.copy_(resident)
        for p_out, p_in in reversed(swapped):
            home, resident = p_out.data, p_in.data  # host: the outgoing values; device: the incoming ones
            incoming = resident.to("cpu", copy=True)
            resident.copy_(home)
            home.copy_(incoming)
            p_out.data, p_in.data = resident, home
