"""The driver: joins or starts Ray, builds the replicas as the cluster makes room for them (asking its autoscaler),
keeps every replica that is up busy with the batch, writes each video as its frames stream in, and survives a lost
worker or node by rebuilding its replica (with backoff) and retrying the prompt; a prompt whose own error broke it
fails alone."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from configs import OdysseyConfig
from pipeline.request import Frame, GenerateRequest, Result

from .placement import PlacementError, WorkerShape, cluster_nodes, describe_layout, plan_placement, shortfall
from .manifest import append_manifest_line, record_config
from .progress import ProgressReporter, cache_note, make_reporter
from .replica import POLL_S, Replica, ReplicaFailed, RequestCancelled, RequestFailed, RequestRejected
from .token_file import secure_default_token
from .validate import check_batch, check_config
from .video import StreamingMP4

__all__ = ["Driver", "Job", "Outcome", "connect_ray", "check_model_folder"]

log = logging.getLogger(__name__)

CLOSE_JOIN_S = 120.0  # close() waits this long at most for the replica slot threads to end


@dataclass
class Job:
    index: int
    request: GenerateRequest  # resolved: every rank and every retry sees the same seed
    output: Path
    name: str = ""
    attempts: int = 0
    cancelled: bool = False  # set by Driver.cancel: a replica skips it, or stops it at the next agreed step


@dataclass
class Outcome:
    job: Job
    path: Path | None = None
    error: str | None = None
    result: Result | None = None
    timings: dict = field(default_factory=dict)
    replica: int | None = None  # the replica slot that served the last attempt
    nodes: list[str] | None = None  # that replica's node IP of each rank, in rank order

    @property
    def ok(self) -> bool:
        return self.path is not None


def connect_ray(address: str | None, num_cpus: int | None = None, *, ray_logs: bool = False) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); with neither, start a local one in this process (no
    dashboard). Returns True when this call initialised Ray (and so should shut it down).

    A local Ray's own start-up lines and warnings (its token-auth notice among them: the token stays on, Ray's
    default for a local cluster) are noise to someone who asked for a video: only its errors reach the terminal
    unless ray_logs (the CLI's --debug), which shows its INFO lines too. Joining a cluster keeps its warnings."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=True)
    else:
        secure_default_token()  # Ray would write ~/.ray/auth_token world-readable
        # "local": a new cluster in this process, never one a stale `ray start` left behind
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level=logging.INFO if ray_logs else logging.ERROR, configure_logging=True)
    return True


def check_model_folder(path, preset: str | None = None) -> None:
    """ValueError (one line, naming how to get the weights: download_hint, for the size `preset` says) unless the
    folder at `path` holds a Wan2.1 model: the DiT's config.json and safetensors headers, the text encoder's and
    the VAE's files, checked as their loaders check them, reading no weights. For a cluster that is this machine,
    before Ray starts (an empty folder must not cost a Ray start, nor show as 'no GPU' on a CPU box)."""
    from pipeline.weights import download_hint, hint_preset  # torch: only for a model folder

    if not Path(path).expanduser().exists():
        raise ValueError(f"model.path {path} does not exist: {download_hint(path, preset)}")
    from pipeline.text_encoder import locate
    from pipeline.vae_weights import _locate as locate_vae
    from pipeline.weights import read_dit_headers

    with hint_preset(preset):
        for check in (read_dit_headers, locate, locate_vae):
            check(Path(path).expanduser())


class Driver:
    """with Driver(config) as d: outcomes = d.run(jobs)

    One thread per replica slot builds its replica (waiting for the cluster to have room, asking the autoscaler
    for it), then serves jobs from the shared queue; the batch starts on the first replica up and the others join
    as their nodes arrive. A lost replica is rebuilt with exponential backoff, never given up while there is work."""

    def __init__(self, config: OdysseyConfig, *, address: str | None = None, manifest: Path | None = None,
                 progress: str | bool | None = "auto", on_event: Callable | None = None, persistent: bool = False,
                 ray_logs: bool = False, preset: str | None = None):
        """persistent: a service's driver: a replica that fails to start is retried for as long as the driver
        lives (only a config that can never work, a ValueError, is fatal), instead of failing the batch after
        runtime.scale_up_timeout_s without any replica. ray_logs: show a local Ray's own start-up lines and
        warnings (connect_ray). preset: the preset the config started from (the CLI's --config), so that the
        missing-weights hint names the repository of the size it says (the folder's name is the fallback)."""
        self.config, self.address, self.manifest, self.preset = config, address, manifest, preset
        self.persistent, self.ray_logs = persistent, ray_logs
        self.ray_init_s = 0.0  # starting (or joining) Ray in start(); 0 when Ray was up already
        self.started_at = 0.0  # wall clock when start() began
        self.reporter: ProgressReporter = make_reporter(progress)
        self.on_event = on_event  # on_event(job, event) for every event, on the driver's main thread
        self.stop = threading.Event()  # the driver is closing: streams end, builds give up
        self.replicas: list[Replica | None] = []
        self.shape: WorkerShape | None = None
        self.builds = 0  # replicas started so far, first builds and rebuilds
        self._slots: list[threading.Thread] = []
        self._serving: dict[int, tuple[Job, Replica]] = {}  # slot -> the job its replica runs now
        self._jobs: queue.Queue = queue.Queue()  # (run id, Job), taken by whichever replica is up and idle
        self._events: queue.Queue = queue.Queue()  # (run id, kind, job, payload), read by run() on the main thread
        self._changed = threading.Condition()
        self._fatal: BaseException | None = None
        self._no_replica_since = 0.0
        self._run_id = 0
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
        """Checks that need no cluster: the weights folder (when this machine is the cluster), that the model
        can use the configured step cache, and that this torch can shard weights when asked to."""
        import ray

        path = self.config.model.path
        # only when this machine is the cluster: in a Ray already joined (a Serve replica on the head) the weights
        # live on the workers' nodes, which check their own folder when they load
        if path is not None and self._local_cluster() and not ray.is_initialized():
            check_model_folder(path, self.preset)
        check_config(self.config)

    def _local_cluster(self) -> bool:
        """Whether start() will start a Ray on this machine (no cluster named)."""
        return self.address is None and not os.environ.get("RAY_ADDRESS")

    def start(self) -> None:
        """Plan, ask for what the cluster lacks, start every replica slot, and return once the first replica is up
        (or raise what stopped every replica from starting)."""
        self.validate()
        self.started_at, t0 = time.time(), time.perf_counter()
        import ray

        if self._local_cluster() and not ray.is_initialized():  # seconds of silence otherwise (lines mode)
            self.reporter.note(f"starting a local Ray ({os.cpu_count()} CPUs) ...")
        self._owns_ray = connect_ray(self.address, ray_logs=self.ray_logs)
        self.ray_init_s = time.perf_counter() - t0 if self._owns_ray else 0.0
        nodes = cluster_nodes()
        self.shape = plan_placement(self.config, nodes)
        par, rt = self.config.parallel, self.config.runtime
        missing = shortfall(self.shape, par.replicas, nodes)
        layout = describe_layout(self.config)
        if missing and self._owns_ray and not (self.address or os.environ.get("RAY_ADDRESS")):
            # the Ray this process just started on this machine: no autoscaler, it will never grow
            raise PlacementError(f"{layout} {missing} (Ray on this machine only; join a cluster with --address, "
                                 f"lower --replicas / --ulysses, or --set runtime.device=cpu)")
        if missing:
            # No request_resources: the replicas' pending placement groups are the autoscaler's demand already,
            # and they belong to this job (Ray removes them when the driver dies, even by SIGKILL), while a stored
            # request is cluster-wide, last writer wins, and outlives a killed driver, keeping GPU nodes up.
            log.warning("%s %s now: the pending placement groups ask the autoscaler (if the cluster has one) for "
                        "the rest; starting on the first replica placed, waiting up to %g s "
                        "(runtime.scale_up_timeout_s)", layout, missing, rt.scale_up_timeout_s)
        self.replicas = [None] * par.replicas
        ranks = par.group_size
        self.reporter.note(f"placing {par.replicas} replica{'s' * (par.replicas > 1)} of {ranks} "
                           f"rank{'s' * (ranks > 1)} and loading the model ...")
        self._no_replica_since = time.monotonic()
        self._slots = [threading.Thread(target=self._slot, args=(i,), daemon=True, name=f"odyssey-replica-{i}")
                       for i in range(par.replicas)]
        for t in self._slots:
            t.start()
        with self._changed:
            while self._fatal is None and not any(self.replicas):
                self._changed.wait(timeout=1.0)
        if self._fatal is not None:
            raise self._fatal

    def wait_ready(self, count: int | None = None, timeout_s: float | None = None) -> int:
        """Block until `count` replicas (default: all) are up, the timeout passes, or the driver fails; returns how
        many are up. run() does not need this: it starts on whichever replicas are up."""
        count = len(self.replicas) if count is None else count
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._fatal is None and sum(r is not None for r in self.replicas) < count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._changed.wait(timeout=1.0 if left is None else min(1.0, left))
            return sum(r is not None for r in self.replicas)

    def close(self) -> None:
        self.stop.set()
        for _ in self._slots:  # wake each slot thread waiting for a job now (not after POLL_S): not a run's job
            self._jobs.put((None, None))
        # Every wait of a slot thread notices the stop within POLL_S, or is bounded by a few seconds (a health
        # ping, a kill): the bound below is only a guard against a wedged Ray call.
        deadline = time.monotonic() + CLOSE_JOIN_S
        for t in self._slots:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._slots if t.is_alive()]
        if alive:
            log.warning("replica slot thread(s) %s still running after %g s; tearing down anyway", alive,
                        CLOSE_JOIN_S)
        with self._changed:  # in place: a slot thread still running indexes this list
            for i, r in enumerate(self.replicas):
                if r is not None:
                    r.kill()
                    self.replicas[i] = None
        if not alive:
            self._slots = []
        self.reporter.close()
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    # -- replica slots ------------------------------------------------------------------------------------------

    def _slot(self, slot: int) -> None:
        try:
            self._serve_slot(slot)
        except BaseException as e:  # noqa: BLE001 - a bug here must end the batch, not hang it
            log.exception("replica slot %d crashed", slot)
            self._set_fatal(RuntimeError(f"replica slot {slot} crashed: {type(e).__name__}: {e}"))

    def _set_fatal(self, error: BaseException) -> None:
        with self._changed:
            if self._fatal is None:
                self._fatal = error
                self._events.put((None, "fatal", None, error))
            self._changed.notify_all()

    def _serve_slot(self, slot: int) -> None:
        """One replica slot's thread: build the replica (again after a loss, with backoff), then serve jobs."""
        rt = self.config.runtime
        failures = 0
        while not self.stop.is_set() and self._fatal is None:
            replica = self.replicas[slot]
            if replica is None:
                if failures and self.stop.wait(_backoff(rt, failures)):
                    return
                try:
                    replica = Replica(slot, self.config, self.shape, self.stop).start()
                except BaseException as e:  # noqa: BLE001 - judged by _build_failed
                    if self.stop.is_set():
                        return
                    failures += 1
                    self._build_failed(slot, e, failures)
                    continue
                failures = 0
                if not self._replica_up(slot, replica):
                    return
            try:
                run_id, job = self._jobs.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if run_id != self._run_id:
                continue  # left over from a run that has returned
            with self._changed:
                if job.cancelled:
                    self._events.put((run_id, "cancelled", job, None))
                    continue
                self._serving[slot] = (job, replica)
            self._events.put((run_id, "start", job, (slot, replica.nodes, dict(replica.start_timings))))
            try:
                for event in replica.run(job.request):
                    self._events.put((run_id, "event", job, event))
            except RequestCancelled:  # its ranks stopped together: the group is in step
                self._events.put((run_id, "cancelled", job, None))
            except RequestRejected as e:  # every rank refused it in the first collective: the group is in step
                self._events.put((run_id, "failed", job, (f"rejected: {e}", 0)))
            except RequestFailed as e:  # the prompt's own error: retrying would fail again; ranks may be stuck
                self._replica_lost(slot, replica)
                self._events.put((run_id, "failed", job, (str(e), 0)))
            except BaseException as e:  # noqa: BLE001 - a death: the prompt deserves another replica
                self._replica_lost(slot, replica)
                retries = getattr(e, "retries", None)
                retries = rt.max_retries if retries is None else min(retries, rt.max_retries)
                self._events.put((run_id, "failed", job, (str(e), 0 if self.stop.is_set() else retries)))
            finally:
                with self._changed:
                    self._serving.pop(slot, None)

    def _replica_up(self, slot: int, replica: Replica) -> bool:
        with self._changed:
            if self.stop.is_set():
                replica.kill()
                return False
            self.replicas[slot] = replica
            self.builds += 1
            self._changed.notify_all()
        return True

    def _replica_lost(self, slot: int, replica: Replica) -> None:
        replica.kill()
        with self._changed:
            self.replicas[slot] = None
            if not any(self.replicas):
                self._no_replica_since = time.monotonic()

    def _build_failed(self, slot: int, error: BaseException, failures: int) -> None:
        """Keep trying (the slot is never retired) unless no replica at all is up and either the scale-up timeout
        has passed or the failure is the same deterministic one over and over: then the batch cannot run."""
        rt = self.config.runtime
        with self._changed:
            alone = not any(self.replicas)
            waited = time.monotonic() - self._no_replica_since
            deterministic = isinstance(error, ValueError) or getattr(error, "deterministic", False)
            fatal = alone and (isinstance(error, ValueError) or (not self.persistent and (
                waited >= rt.scale_up_timeout_s or (deterministic and failures > rt.max_retries))))
        if fatal:
            self._set_fatal(error if isinstance(error, ValueError) else
                            ReplicaFailed(f"no replica could be started in {waited:.0f} s: {error}"))
            return
        log.warning("replica %d could not be started (attempt %d): %s; trying again in %g s", slot, failures, error,
                    _backoff(rt, failures))

    # -- a service's queue ----------------------------------------------------------------------------------------

    def open_queue(self) -> int:
        """For a long-lived caller (a service) instead of run(): returns the queue's run id; then submit() jobs and
        read their events with next_event(). One open queue per driver, and no run() beside it."""
        self._run_id += 1
        return self._run_id

    def submit(self, run_id: int, job: Job) -> None:
        """Queue a job (again, after a failure) on the open queue; whichever replica is idle takes it."""
        self._jobs.put((run_id, job))

    def next_event(self, run_id: int, timeout_s: float) -> tuple[str, Job | None, object] | None:
        """The next (kind, job, payload) of the open queue, or None after timeout_s. kind: "start" (payload: the
        replica slot, its node IP of each rank, its start-up timings), "event" (a Progress, Frame, Preview or Result), "failed" ((message, retries it allows)),
        "cancelled", "fatal" (job None; payload: the error that stops every replica)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                rid, kind, job, payload = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if kind == "fatal" or rid == run_id:
                return kind, job, payload

    def cancel(self, job: Job) -> None:
        """Cancel a job: a queued one is skipped when a replica takes it ("cancelled" event); a running one stops
        at the next step its ranks agree on ("cancelled" event, the replica serves on)."""
        with self._changed:
            job.cancelled = True
            running = [replica for j, replica in self._serving.values() if j is job]
        for replica in running:
            replica.cancel(job.request.request_id)

    def replicas_up(self) -> int:
        with self._changed:
            return sum(r is not None for r in self.replicas)

    @property
    def fatal(self) -> BaseException | None:
        return self._fatal

    # -- the batch ----------------------------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Serve every job; returns one Outcome per job, in job order. Ctrl-C / SIGTERM stop cleanly: partial
        files are removed and the replicas are torn down by close()."""
        if self.stop.is_set():
            raise RuntimeError("this Driver was closed or interrupted")
        check_batch(jobs, self.config, self.manifest)  # one line, before anything is sent to a worker
        self._run_id += 1
        run_id = self._run_id
        outcomes: dict[int, Outcome] = {}
        if self._fatal is not None:
            self._fail_rest(jobs, outcomes, {}, f"no replica: {self._fatal}")
        for job in jobs:
            self._jobs.put((run_id, job))
        writers: dict[int, StreamingMP4] = {}
        marks: dict[int, dict] = {}  # per job: driver-side timestamps of the current attempt
        t_batch = time.perf_counter()
        previous_term = _raise_on_sigterm()
        try:
            while len(outcomes) < len(jobs):
                try:
                    rid, kind, job, payload = self._events.get(timeout=1.0)
                except queue.Empty:
                    continue
                if kind == "fatal":
                    self._fail_rest(jobs, outcomes, writers, f"no replica: {payload}")
                    break
                if rid != run_id or job.index in outcomes:
                    continue  # settled already (a Result arrived, or its video failed to write): never re-queued
                if kind == "start":
                    slot, nodes, start_timings = payload
                    marks[job.index] = {"started": time.perf_counter(), "queued_s": time.perf_counter() - t_batch,
                                        "replica": slot, "nodes": nodes, "startup": {
                                            "began_at": self.started_at, "ray_init_s": self.ray_init_s,
                                            **start_timings}}
                    self.reporter.start(job.index, job.name or job.request.prompt, slot, job.attempts)
                elif kind == "event":
                    self._on_event(job, payload, writers, outcomes, marks[job.index])
                elif kind == "failed":
                    message, retries = payload  # how many retries this kind of failure allows a prompt
                    if job.index in writers:
                        writers.pop(job.index).abort()
                    if job.attempts < retries:
                        log.warning("prompt %d failed (%s); retrying on another replica", job.index, message)
                        job.attempts += 1
                        self._jobs.put((run_id, job))
                    else:
                        outcomes[job.index] = Outcome(job, error=message)
                        self.reporter.finish(job.index, False, message)
        except BaseException:
            self.stop.set()  # Ctrl-C / SIGTERM: streams and builds end; close() tears the replicas down
            raise
        finally:
            self._run_id += 1  # whatever is still queued for this run is left over
            for w in writers.values():
                w.abort()
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
        return [outcomes[j.index] for j in jobs]

    def _fail_rest(self, jobs, outcomes, writers, message: str) -> None:
        for j in jobs:
            if j.index not in outcomes:
                if j.index in writers:
                    writers.pop(j.index).abort()
                outcomes[j.index] = Outcome(j, error=message)
                self.reporter.finish(j.index, False, message)

    def _on_event(self, job, event, writers, outcomes, mark) -> None:
        if self.on_event is not None:
            self.on_event(job, event)
        self.reporter.event(job.index, event)
        try:
            if isinstance(event, Frame):
                writer = writers.get(job.index)
                if writer is None:
                    writer = writers[job.index] = StreamingMP4(job.output, job.request.fps)
                    mark["driver_first_frame_s"] = time.perf_counter() - mark["started"]
                writer.append(event.image)
                if event.index == event.total - 1:
                    mark["last_frame_latency_s"] = time.time() - event.created_at
            elif isinstance(event, Result):
                self._commit(job, event, writers, outcomes, mark)
        except Exception as e:  # noqa: BLE001 - ffmpeg crash, disk full, rename: this video fails, not the batch
            if job.index in writers:
                writers.pop(job.index).abort()
            message = f"writing {job.output}: {type(e).__name__}: {e}"
            outcomes[job.index] = Outcome(job, error=message, replica=mark.get("replica"))
            self.reporter.finish(job.index, False, message)

    def _commit(self, job, event, writers, outcomes, mark) -> None:
        writer = writers.get(job.index)
        if writer is None:
            outcomes[job.index] = Outcome(job, error="the replica returned no frames", replica=mark.get("replica"))
            self.reporter.finish(job.index, False, "no frames")
            return
        t0 = time.perf_counter()
        with _signals_deferred():  # the file and its manifest line appear together, or neither does
            path = writer.commit()
            writers.pop(job.index)
            timings = {**event.timings, "driver_first_frame_s": mark.get("driver_first_frame_s"),
                       "last_frame_latency_s": mark.get("last_frame_latency_s"),
                       "write_close_s": time.perf_counter() - t0,
                       "driver_total_s": time.perf_counter() - mark["started"], "queued_s": mark["queued_s"],
                       # the driver's Ray start and the start-up phases of the replica that served this prompt
                       "startup": mark["startup"]}
            outcome = Outcome(job, path=path, result=event, timings=timings, replica=mark.get("replica"),
                              nodes=mark.get("nodes"))
            try:
                self._write_manifest(outcome)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            outcomes[job.index] = outcome
        self.reporter.finish(job.index, True, f"{path}{cache_note(event.cache)}")

    def _write_manifest(self, outcome: Outcome) -> None:
        if self.manifest is None:
            return
        job = outcome.job
        line = {
            "index": job.index, "name": job.name, "prompt": job.request.prompt, "seed": job.request.seed,
            "negative_prompt": job.request.negative_prompt, "output": str(outcome.path),
            "frames": outcome.result.num_frames, "attempts": job.attempts + 1,
            "request": dataclasses.asdict(job.request), "config": record_config(self.config),
            "timings": outcome.timings,
            "cache": outcome.result.cache,  # policy, threshold, computed_steps, steps, skipped; null when off
            "memory": outcome.result.memory,  # param_bytes, peak_bytes: one int per rank of the replica
            "placement": {"replica": outcome.replica, "nodes": outcome.nodes},
        }
        del line["request"]["prompt"]  # once is enough: it can be 10,000 characters
        append_manifest_line(self.manifest, line)


def _backoff(rt, failures: int) -> float:
    """Seconds before the next build after `failures` failed ones: doubling, capped (and no float overflow after a
    thousand failures of a slot that waits days for capacity)."""
    return min(rt.rebuild_backoff_s * 2.0 ** min(failures - 1, 30), rt.rebuild_backoff_max_s)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block is done (main thread only; elsewhere a no-op).

    Blocking the signals with pthread_sigmask is not enough: the kernel then delivers them to another thread
    (Ray's, the replica slots'), and Python still runs the handler on the main thread, inside the block. So the
    handlers themselves are swapped for ones that only take note, and the first signal noted is handed to the
    previous handler once the block is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, frame):
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signum, handler = held[0], previous[held[0]]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _raise_on_sigterm():
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt) while a batch runs; returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)
