"""A pool of spawned processes that form one gloo group and run test functions on every rank.

Spawning and rendezvous cost ~1-2 s per world size, so the pool is kept for the whole session and every test
just ships a function (by reference) to all ranks. A timeout or crash tears the pool down, so a broken group never
leaks into the next test.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

RUN_TIMEOUT_S = 120


class RankError(AssertionError):
    """One or more ranks raised; carries every failing rank's traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, init_method: str, tasks, results, threads: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, (type(e).__name__, str(e), traceback.format_exc())))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world: int, threads: int = 1):
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        init = f"tcp://127.0.0.1:{free_port()}"
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, init, self.tasks[r], self.results, threads), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        self.broken = False

    def run_each(self, fn, *args, timeout: float = RUN_TIMEOUT_S, **kwargs) -> list[tuple[bool, object]]:
        """fn(*args, **kwargs) on every rank; [(ok, value or (type, message, traceback))] by rank."""
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out: list = [None] * self.world
        try:
            for _ in range(self.world):
                rank, ok, value = self.results.get(timeout=timeout)
                out[rank] = (ok, value)
        except Exception:
            self.close(force=True)
            raise TimeoutError(f"{fn.__name__} did not finish on all {self.world} ranks in {timeout} s") from None
        return out

    def run(self, fn, *args, **kwargs) -> list:
        """fn on every rank; its return values by rank, or RankError with the failing ranks' tracebacks."""
        out = self.run_each(fn, *args, **kwargs)
        failed = [(r, v) for r, (ok, v) in enumerate(out) if not ok]
        if failed:
            raise RankError("\n".join(f"--- rank {r}: {t}: {m}\n{tb}" for r, (t, m, tb) in failed))
        return [v for _, v in out]

    def close(self, force: bool = False) -> None:
        self.broken = True
        if not force:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
