"""SPWorker: the Ray actor that owns one GPU (or a share of CPU) and hosts one rank's Runner.

A thin shell: every method is a typed step of the lifecycle (create -> rendezvous -> load models -> serve), the
Runner knows nothing of Ray, and all collectives run on the one thread that serves generate/run.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Iterator

import ray
import torch

from configs import OdysseyConfig
from pipeline.request import Event, GenerateRequest, Result

__all__ = ["SPWorker", "WorkerInfo", "AcceleratorMissing"]


class AcceleratorMissing(RuntimeError):
    """Ray gave this worker a GPU that torch cannot use: a fault of that node (driver, container), not of the config,
    so the driver builds the replica again (it may land elsewhere) instead of ending the batch."""


@dataclass(frozen=True)
class WorkerInfo:
    node_id: str
    ip: str
    gpu_ids: tuple
    pid: int


@ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"control": 1})
class SPWorker:
    """One rank of one replica. Create with .options(num_gpus=..., num_cpus=..., scheduling_strategy=<its
    placement-group bundle>). Lifecycle and generation calls run one at a time on the default thread (so
    collectives keep one order); health() runs on the "control" thread and answers while a generation runs.
    max_restarts=0: a restarted rank has no process group; the driver rebuilds the whole replica instead."""

    def __init__(self, config: OdysseyConfig, threads: int = 0):
        self.config = config
        self.runner = None
        self.rank = -1
        self._store = None  # rank 0's TCPStore server (open_store)
        self.started = time.time()
        if threads:
            torch.set_num_threads(threads)  # a fractional CPU share must not spin up one thread per core

    def info(self) -> WorkerInfo:
        """Where this worker landed. Checks first that a worker Ray gave a GPU can use it: otherwise the model would
        silently run on CPU (a driver/toolkit mismatch, a container without the GPU mounted)."""
        gpu_ids = tuple(sorted(str(g) for g in ray.get_gpu_ids()))
        node_id, ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
        if gpu_ids and self.config.runtime.accelerator_check and not torch.cuda.is_available():
            raise AcceleratorMissing(
                f"Ray gave this worker GPU(s) {list(gpu_ids)} on node {ip} ({node_id[:12]}) but torch sees no CUDA "
                f"device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__} "
                f"built for CUDA {torch.version.cuda}): check the node's driver and torch build "
                f"(runtime.accelerator_check=false is only for clusters with fake GPU resources)")
        return WorkerInfo(node_id, ip, gpu_ids, os.getpid())

    def open_store(self) -> tuple[str, int]:
        """Rank 0 only: start the group's TCPStore on a port the OS picks and keep it bound, so no other process can
        take the port between choosing and using it. Returns (host, port) for the other ranks."""
        from datetime import timedelta

        import torch.distributed as dist

        ip = ray.util.get_node_ip_address()
        # TCPStore(ip, 0, is_master=True) would listen on every interface: bind the node's address ourselves and
        # hand the listening socket over. The store owns it from then on (closes it when it goes).
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind((ip, 0))
            listener.listen()
            port = listener.getsockname()[1]
            self._store = dist.TCPStore(ip, port, is_master=True, wait_for_workers=False,
                                        master_listen_fd=listener.fileno(),
                                        timeout=timedelta(seconds=self.config.runtime.collective_timeout_s))
            listener.detach()
        return ip, port

    def rendezvous(self, rank: int, world_size: int, host: str, port: int) -> None:
        """Join the replica's process group through rank 0's store; every rank must be called at once."""
        from datetime import timedelta

        import torch.distributed as dist

        from pipeline.runner import Runner

        self.rank = rank
        if rank == 0:
            store = self._store
        else:
            store = dist.TCPStore(host, port, is_master=False,
                                  timeout=timedelta(seconds=self.config.runtime.collective_timeout_s))
        self.runner = Runner(self.config, rank, world_size, store=store, load=False)

    def load_models(self) -> float:
        return self.runner.load_models()

    def join(self, rank: int, world_size: int, host: str | None = None, port: int | None = None
             ) -> tuple[WorkerInfo, float, float]:
        """rendezvous + load_models in one call, every rank at once (each runs the same collectives in the same
        order, as when the two are separate calls): one round trip fewer per replica start. A one-rank replica
        passes no address: its rank opens its own store, so its whole start (info included) is this one call.
        Returns (info(), seconds to join the group, seconds to load the models)."""
        info = self.info()
        t0 = time.perf_counter()
        if host is None:
            assert world_size == 1, "only a one-rank replica joins without rank 0's store address"
            host, port = self.open_store()
        self.rendezvous(rank, world_size, host, port)
        joined = time.perf_counter() - t0
        return info, joined, self.load_models()

    def stream(self, request: GenerateRequest) -> Iterator[Event]:
        """Rank 0: every event, as a Ray generator, as soon as it happens."""
        yield from self.runner.generate(request)

    def run(self, request: GenerateRequest) -> Result:
        """Ranks > 0: take part in the generation; only the final Result comes back."""
        result = None
        for event in self.runner.generate(request):
            if isinstance(event, Result):
                result = event
        return result

    @ray.method(concurrency_group="control")
    def cancel(self, request_id: str) -> None:
        """Stop `request_id` (running or still to come) at the next step every rank agrees on; on the control
        thread, so it lands while a generation runs."""
        if self.runner is not None:
            self.runner.cancel(request_id)

    @ray.method(concurrency_group="control")
    def health(self) -> dict:
        request_id, stage, step, total = self.runner.progress if self.runner else (None, "starting", 0, 0)
        return {"rank": self.rank, "pid": os.getpid(), "request_id": request_id, "stage": stage, "step": step,
                "total": total, "uptime_s": time.time() - self.started}

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.close()
