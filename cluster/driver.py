"""The driver: joins or starts Ray, builds the replicas, keeps every replica busy with the batch, writes each video
as its frames stream in, and survives a lost worker by rebuilding its replica and retrying the prompt."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from configs import OdysseyConfig, to_dict
from pipeline.request import Frame, GenerateRequest, Result

from .placement import WorkerShape, cluster_nodes, plan_placement
from .progress import ProgressReporter, make_reporter
from .replica import Replica, ReplicaFailed, RequestRejected
from .video import StreamingMP4

__all__ = ["Driver", "Job", "Outcome", "connect_ray"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    index: int
    request: GenerateRequest  # resolved: every rank and every retry sees the same seed
    output: Path
    name: str = ""
    attempts: int = 0


@dataclass
class Outcome:
    job: Job
    path: Path | None = None
    error: str | None = None
    result: Result | None = None
    timings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.path is not None


def connect_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); with neither, start a local one in this process (no
    dashboard). Returns True when this call initialised Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, configure_logging=True)
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **quiet)
    else:
        # "local": a new cluster in this process, never one a stale `ray start` left behind
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **quiet)
    return True


class Driver:
    """with Driver(config) as d: outcomes = d.run(jobs)"""

    def __init__(self, config: OdysseyConfig, *, address: str | None = None, manifest: Path | None = None,
                 progress: str | bool | None = "auto", on_event: Callable | None = None):
        self.config, self.address, self.manifest = config, address, manifest
        self.reporter: ProgressReporter = make_reporter(progress)
        self.on_event = on_event  # on_event(job, event) for every event, on the driver's main thread
        self.stop = threading.Event()
        self.replicas: list[Replica | None] = []
        self.shape: WorkerShape | None = None
        self._owns_ray = False

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def __enter__(self) -> "Driver":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def validate(self) -> None:
        """Checks that need no cluster: the weights folder (when this machine is the cluster)."""
        path = self.config.model.path
        if path is not None and self.address is None and not os.environ.get("RAY_ADDRESS"):
            if not Path(path).expanduser().exists():
                raise ValueError(f"model.path {path} does not exist (download the weights there or "
                                 f"--set model.path=/path/to/Wan2.1-folder)")

    def start(self) -> None:
        self.validate()
        self._owns_ray = connect_ray(self.address)
        self.shape = plan_placement(self.config, cluster_nodes())
        n = self.config.parallel.replicas
        self.replicas = [None] * n
        errors: list[BaseException] = []

        def build(i):
            try:
                self.replicas[i] = Replica(i, self.config, self.shape, self.stop).start()
            except BaseException as e:  # noqa: BLE001 - collected and re-raised below
                errors.append(e)

        threads = [threading.Thread(target=build, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            first = errors[0]
            if isinstance(first, ValueError):
                raise first
            raise ReplicaFailed(f"could not start the replicas: {first}") from first

    def close(self) -> None:
        self.stop.set()
        for r in self.replicas:
            if r is not None:
                r.kill()
        self.replicas = []
        self.reporter.close()
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    # -- the batch ----------------------------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Serve every job; returns one Outcome per job, in job order. Ctrl-C / SIGTERM stop cleanly: partial
        files are removed and the replicas are torn down by close()."""
        pending: queue.Queue = queue.Queue()
        events: queue.Queue = queue.Queue()
        for job in jobs:
            pending.put(job)
        outcomes: dict[int, Outcome] = {}
        writers: dict[int, StreamingMP4] = {}
        marks: dict[int, dict] = {}  # per job: driver-side timestamps of the current attempt
        t_batch = time.perf_counter()
        workers = [threading.Thread(target=self._serve, args=(slot, pending, events), daemon=True)
                   for slot in range(len(self.replicas))]
        alive = len(workers)
        previous_term = _raise_on_sigterm()
        try:
            for w in workers:
                w.start()
            while len(outcomes) < len(jobs):
                try:
                    kind, job, payload = events.get(timeout=1.0)
                except queue.Empty:
                    continue
                if kind == "start":
                    marks[job.index] = {"started": time.perf_counter(), "queued_s": time.perf_counter() - t_batch}
                    self.reporter.start(job.index, job.name or job.request.prompt, payload, job.attempts)
                elif kind == "event":
                    self._on_event(job, payload, writers, outcomes, marks[job.index])
                elif kind == "failed":
                    message, retryable = payload
                    if job.index in writers:
                        writers.pop(job.index).abort()
                    if retryable and job.attempts < self.config.runtime.max_retries:
                        log.warning("prompt %d failed (%s); retrying on a rebuilt replica", job.index, message)
                        job.attempts += 1
                        pending.put(job)
                    else:
                        outcomes[job.index] = Outcome(job, error=message)
                        self.reporter.finish(job.index, False, message)
                elif kind == "lost":  # job is the replica's slot here
                    alive -= 1
                    log.error("replica %s is gone: %s", job, payload)
                    if alive == 0:
                        for j in jobs:
                            if j.index not in outcomes:
                                outcomes[j.index] = Outcome(j, error=f"no replica left: {payload}")
        finally:
            self.stop.set()
            for _ in workers:
                pending.put(None)
            for w in writers.values():
                w.abort()
            for w in workers:
                w.join(timeout=5)
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            self.stop.clear()
        return [outcomes[j.index] for j in jobs]

    def _on_event(self, job, event, writers, outcomes, mark) -> None:
        if self.on_event is not None:
            self.on_event(job, event)
        self.reporter.event(job.index, event)
        if isinstance(event, Frame):
            writer = writers.get(job.index)
            if writer is None:
                writer = writers[job.index] = StreamingMP4(job.output, job.request.fps)
                mark["driver_first_frame_s"] = time.perf_counter() - mark["started"]
            writer.append(event.image)
            if event.index == event.total - 1:
                mark["last_frame_latency_s"] = time.time() - event.created_at
        elif isinstance(event, Result):
            writer = writers.get(job.index)
            if writer is None:
                outcomes[job.index] = Outcome(job, error="the replica returned no frames")
                self.reporter.finish(job.index, False, "no frames")
                return
            t0 = time.perf_counter()
            with _signals_deferred():  # the file and its manifest line appear together, or neither does
                path = writer.commit()
                writers.pop(job.index)
                timings = {**event.timings, "driver_first_frame_s": mark.get("driver_first_frame_s"),
                           "last_frame_latency_s": mark.get("last_frame_latency_s"),
                           "write_close_s": time.perf_counter() - t0,
                           "driver_total_s": time.perf_counter() - mark["started"], "queued_s": mark["queued_s"]}
                outcome = outcomes[job.index] = Outcome(job, path=path, result=event, timings=timings)
                self._write_manifest(outcome)
            self.reporter.finish(job.index, True, str(path))

    def _write_manifest(self, outcome: Outcome) -> None:
        if self.manifest is None:
            return
        job = outcome.job
        line = {
            "index": job.index, "name": job.name, "prompt": job.request.prompt, "seed": job.request.seed,
            "negative_prompt": job.request.negative_prompt, "output": str(outcome.path),
            "frames": outcome.result.num_frames, "attempts": job.attempts + 1,
            "request": dataclasses.asdict(job.request), "config": to_dict(self.config), "timings": outcome.timings,
        }
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        with open(self.manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def _serve(self, slot: int, pending: queue.Queue, events: queue.Queue) -> None:
        """One replica's thread: take a job when idle, stream its events, rebuild the replica after a failure."""
        while not self.stop.is_set():
            job = pending.get()
            if job is None:
                return
            replica = self.replicas[slot]
            if replica is None:
                try:
                    replica = self.replicas[slot] = Replica(slot, self.config, self.shape, self.stop).start()
                except BaseException as e:  # noqa: BLE001
                    pending.put(job)
                    events.put(("lost", slot, str(e)))
                    return
            events.put(("start", job, slot))
            try:
                for event in replica.run(job.request):
                    events.put(("event", job, event))
            except RequestRejected as e:
                events.put(("failed", job, (f"rejected: {e}", False)))
            except BaseException as e:  # noqa: BLE001 - any other failure loses the replica
                replica.kill()
                self.replicas[slot] = None
                events.put(("failed", job, (str(e), not self.stop.is_set())))


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block is done (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _raise_on_sigterm():
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt) while a batch runs; returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)
