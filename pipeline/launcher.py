"""A plain torch.multiprocessing launcher for a Runner group (no Ray): for tests, benchmarks and debugging."""

from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Iterator

import torch
import torch.multiprocessing as mp

from configs import OdysseyConfig

from .request import Event, GenerateRequest, RequestRejectedError, Result

__all__ = ["LocalLauncher"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank, world, init_method, config, threads, options, requests, events) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    try:
        from .runner import Runner

        runner = Runner(config, rank, world, init_method)
        for name, value in options.items():
            setattr(runner, name, value)
        events.put((rank, "ready", runner.load_s))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        events.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
        return
    while (request := requests.get()) is not None:
        try:
            for event in runner.generate(request):
                if rank == 0 or isinstance(event, Result):
                    events.put((rank, "event", event))
        except BaseException as e:  # noqa: BLE001
            events.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
    runner.close()


class LocalLauncher:
    """`with LocalLauncher(config) as group: for event in group.generate(request): ...`

    Starts one process per rank on this machine (gloo on loopback, or NCCL with one GPU per rank), loads the models
    once, and streams rank 0's events per request."""

    def __init__(self, config: OdysseyConfig, *, threads_per_rank: int = 1, timeout_s: float = 600,
                 runner_options: dict | None = None):
        """runner_options: Runner attributes to set after construction (keep_latents_sharded, return_latents)."""
        self.config, self.world, self.timeout_s = config, config.parallel.group_size, timeout_s
        ctx = mp.get_context("spawn")
        self.events = ctx.Queue()
        self.requests = [ctx.Queue() for _ in range(self.world)]
        init = f"tcp://127.0.0.1:{_free_port()}"
        self.procs = [ctx.Process(target=_serve, daemon=True,
                                  args=(r, self.world, init, config, threads_per_rank, runner_options or {},
                                        self.requests[r], self.events))
                      for r in range(self.world)]
        for p in self.procs:
            p.start()
        self.load_s = max(self._expect("ready") for _ in range(self.world))

    def _get(self):
        try:
            return self.events.get(timeout=self.timeout_s)
        except queue.Empty:
            self.close()
            raise TimeoutError(f"no word from the Runner group in {self.timeout_s} s") from None

    def _expect(self, kind: str):
        rank, got, payload = self._get()
        if got == "error":
            self._raise(rank, payload)
        assert got == kind, (got, kind)
        return payload

    def _raise(self, rank, payload):
        name, message, tb = payload
        if name == "RequestRejectedError":  # refused in the first collective: every rank said no, the group is intact
            raise RequestRejectedError(message)
        self.close()
        raise RuntimeError(f"rank {rank} failed: {name}: {message}\n{tb}")

    def generate(self, request: GenerateRequest) -> Iterator[Event]:
        """Rank 0's events for one request (resolved here, so every rank gets the same seed)."""
        request = request if request.is_resolved else request.resolve(self.config)
        for q in self.requests:
            q.put(request)
        results = 0
        errors = []
        while results + len(errors) < self.world:
            rank, kind, payload = self._get()
            if kind == "error":
                errors.append((rank, payload))
                continue
            if isinstance(payload, Result):
                results += 1
                if rank != 0:
                    continue
            yield payload
        if errors:
            self._raise(*errors[0])

    def close(self) -> None:
        for q in self.requests:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def __enter__(self) -> "LocalLauncher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
