"""One replica: a placement group with one bundle per Ulysses group (cfg x ring bundles; bundle g = cfg_rank * R +
ring_rank, always on one node), its SPWorkers with ranks assigned after placement (bundle g's members are ranks
g*U .. g*U+U-1, consecutive in Ulysses order, as pipeline.parallel.build_mesh expects), and the event stream of one
request at a time.

Failures are told apart, because they call for different cures:
- ReplicaFailed: a worker or node died, or the replica could not be placed/started in time. The replica is gone;
  its prompt is retried on a rebuilt one.
- RequestFailed: a worker raised while serving (out of memory on an oversized prompt, a collective timeout). The
  prompt fails with that message and is not retried (it would fail again); the replica is rebuilt because the
  other ranks may be stuck in a collective.
- RequestRejected: every rank refused the request in its first collective (RequestRejectedError from
  Runner._agree, and only that: a ValueError raised later may leave other ranks in a collective, so it is a
  RequestFailed); the replica is intact.
- RequestCancelled: the request was cancelled (Replica.cancel) and its ranks stopped together at a step they agreed
  on; the replica is intact.
Ray's memory monitor killing a worker (OutOfMemoryError) is a ReplicaFailed whose prompt is retried at most once: the
pressure may have come from elsewhere on the node, or from the prompt itself.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Iterator

import ray
from ray.exceptions import (GetTimeoutError, NodeDiedError, ObjectLostError, OutOfMemoryError, OwnerDiedError,
                            RayActorError, RayError, RayTaskError, WorkerCrashedError)
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import SPWorker
from configs import OdysseyConfig
from pipeline.memory import MemoryBusy
from pipeline.request import Event, GenerateRequest, RequestCancelledError, RequestRejectedError

from .placement import WorkerShape, cluster_nodes, cluster_totals

__all__ = ["Replica", "ReplicaFailed", "RequestFailed", "RequestRejected", "RequestCancelled", "DEATHS"]

log = logging.getLogger(__name__)
_ids = itertools.count()

POLL_S = 0.5  # how often a waiting driver thread looks up from ray.wait (stop requests, liveness)
# A process or node is gone: the group is broken for good, but the same request may well succeed elsewhere.
DEATHS = (RayActorError, NodeDiedError, WorkerCrashedError, OwnerDiedError, ObjectLostError)


class ReplicaFailed(RuntimeError):
    """The replica is gone (a rank died, or it could not be placed or started in time); retry elsewhere.
    deterministic: a worker raised while starting (not a death), so starting again will likely fail the same way.
    retries: at most this many retries of the prompt (None: runtime.max_retries)."""

    def __init__(self, message: str, deterministic: bool = False, retries: int | None = None):
        super().__init__(message)
        self.deterministic, self.retries = deterministic, retries


class RequestFailed(RuntimeError):
    """A rank raised while serving this request: the request fails for good; the replica must be rebuilt."""


class RequestRejected(ValueError):
    """Every rank refused the request (invalid for this model); the replica is intact."""


class RequestCancelled(RuntimeError):
    """The request was cancelled and its ranks stopped together; the replica is intact."""


def _cause(err: Exception) -> Exception:
    """The worker-side exception inside a RayTaskError."""
    return getattr(err, "cause", None) or err


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip().rstrip(":")


class Replica:
    def __init__(self, index: int, config: OdysseyConfig, shape: WorkerShape, stop: threading.Event):
        self.index, self.config, self.shape, self.stop = index, config, shape, stop
        self.name = f"odyssey-r{index}-{next(_ids)}"
        self.pg = None
        self.workers: list = []  # by rank
        self.infos: list = []
        self.load_s = 0.0
        self.start_timings: dict[str, float] = {}  # seconds per start-up phase, as the driver saw them

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> "Replica":
        """Reserve (waiting up to runtime.scale_up_timeout_s for the resources to exist), place, rank, rendezvous,
        load. Raises ReplicaFailed on any failure, ValueError when the config can never work here (cleans up)."""
        shape, rt = self.shape, self.config.runtime
        n = shape.group_size * shape.groups
        timings, t0 = self.start_timings, time.perf_counter()

        def phase(name: str) -> None:
            nonlocal t0
            now = time.perf_counter()
            timings[name], t0 = now - t0, now

        try:
            bundles = shape.bundles()
            # PACK/STRICT_PACK across the bundles; a bundle (one Ulysses group) is always on one node, so a replica
            # spans nodes only along its ring and between its cfg halves.
            self.pg = placement_group(bundles, strategy=shape.strategy, name=self.name)
            self._wait(self.pg.ready(), rt.scale_up_timeout_s, lambda: (
                f"waited {rt.scale_up_timeout_s:g} s (runtime.scale_up_timeout_s) for {bundles} ({shape.strategy}); "
                f"the cluster has {_have()}"))
            phase("placement_s")
            workers, where = [], []
            for g in range(shape.groups):
                for m in range(shape.group_size):
                    workers.append(SPWorker.options(
                        num_gpus=shape.num_gpus, num_cpus=shape.worker_cpus(g, m), name=f"{self.name}-w{len(where)}",
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=g),
                    ).remote(self.config, shape.worker_threads(g, m)))
                    where.append((g, m))
            self.workers = list(workers)  # killed by kill() if anything below fails
            if n == 1:  # nothing to order: start, store, group and models in one call (one round trip)
                total = rt.placement_timeout_s + rt.collective_timeout_s + 30 + rt.load_timeout_s
                info, timings["rendezvous_s"], self.load_s = self._wait(workers[0].join.remote(0, 1), total, lambda: (
                    f"its worker did not start, join and load the models in {total:g} s"))
                self.infos = [info]
                phase("actors_s")
                timings["actors_s"] -= timings["rendezvous_s"] + self.load_s
                timings["load_s"] = self.load_s
            else:
                self._start_group(workers, where, timings, phase)
            # visible by default: where each rank runs is what an operator checks first when a video is slow
            log.warning("replica %d up: %s, models loaded in %.1f s", self.index,
                        describe_ranks(self.config, self.nodes, shape.strategy), self.load_s)
            return self
        except BaseException:
            self.kill()
            raise

    def _start_group(self, workers, where, timings, phase) -> None:
        """Several ranks: where each landed (info), ranks in placement order, then rank 0's store and every rank's
        join (rendezvous + load) at once."""
        shape, rt = self.shape, self.config.runtime
        n = len(workers)
        infos = self._wait([w.info.remote() for w in workers], rt.placement_timeout_s,
                           lambda: f"workers did not start in {rt.placement_timeout_s:g} s")
        phase("actors_s")
        # Ranks after placement: bundle g (one Ulysses group, one node) gets ranks g*U .. g*U+U-1 in GPU order,
        # so rank = cfg_rank*(R*U) + ring_rank*U + ulysses_rank; rank 0 is the worker of bundle 0 that holds
        # the encoder's extra CPUs.
        order = sorted(range(n), key=lambda i: (where[i][0], where[i][1] != 0 or not shape.encoder_cpus,
                                                _gpu_order(infos[i].gpu_ids), infos[i].pid))
        self.workers, self.infos = [workers[i] for i in order], [infos[i] for i in order]
        host, port = self._wait(self.workers[0].open_store.remote(), 60, lambda: "rank 0 could not open a store")
        total = rt.collective_timeout_s + 30 + rt.load_timeout_s
        joined = self._wait([w.join.remote(r, n, host, port) for r, w in enumerate(self.workers)], total,
                            lambda: f"joining the group at {host}:{port} and loading the models took over {total:g} s")
        phase("rendezvous_s")
        self.load_s = timings["load_s"] = max(j[2] for j in joined)
        timings["rendezvous_s"] -= self.load_s  # the store, the group, the round trips: the rest of the call

    @property
    def nodes(self) -> list[str]:
        """The node IP of each rank, in rank order."""
        return [i.ip for i in self.infos]

    def _wait(self, refs, timeout_s: float, what):
        """ray.get with a deadline that still notices a stop request within POLL_S."""
        deadline = time.monotonic() + timeout_s
        pending = refs if isinstance(refs, list) else [refs]
        while True:
            if self.stop.is_set():
                raise ReplicaFailed(f"replica {self.index}: stopped")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReplicaFailed(f"replica {self.index}: {what()}")
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=min(POLL_S, left))
            failed = [r for r in ready if self._failed(r)]
            if len(ready) < len(pending) and not failed:
                continue
            try:
                # a failed ref surfaces its error now, without waiting for ranks that may hang behind it
                values = ray.get(failed[:1] or pending, timeout=max(1.0, left))
            except GetTimeoutError:
                raise ReplicaFailed(f"replica {self.index}: {what()}") from None
            except DEATHS as e:
                # a worker whose constructor raised (a bad image, an ImportError) will raise again: no waiting
                raise ReplicaFailed(f"replica {self.index}: a worker died while starting: {_describe(e)}",
                                    deterministic=bool(getattr(e, "actor_init_failed", False))) from None
            except OutOfMemoryError as e:  # Ray's memory monitor: the node was short, maybe only for now
                raise ReplicaFailed(f"replica {self.index}: killed while starting: {_describe(e)}") from None
            except RayTaskError as e:
                cause = _cause(e)
                if isinstance(cause, MemoryBusy):  # a killed predecessor still holds the GPU: it will let go
                    raise ReplicaFailed(f"replica {self.index}: {_describe(cause)}") from None
                if isinstance(cause, ValueError):  # the config or the weights can never work: tell the user
                    raise cause from None
                raise ReplicaFailed(f"replica {self.index}: {_describe(cause)}", deterministic=True) from None
            return values if isinstance(refs, list) else values[0]

    @staticmethod
    def _failed(ref) -> bool:
        try:
            ray.get(ref, timeout=0)
            return False
        except GetTimeoutError:
            return False
        except Exception:  # noqa: BLE001 - any error will be raised by the ray.get in _wait
            return True

    def kill(self) -> None:
        """Kill every worker (a rank stuck in a collective included) and free the placement group."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self.workers = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None

    def pids(self) -> list[int]:
        return [i.pid for i in self.infos]

    def cancel(self, request_id: str) -> None:
        """Ask every rank to stop `request_id` (fire and forget): run() then raises RequestCancelled within about
        one denoising step; a request that already finished is not affected."""
        for w in self.workers:
            try:
                w.cancel.remote(request_id)
            except Exception:  # noqa: BLE001 - a dead rank ends the request anyway
                pass

    def health(self, timeout_s: float = 5.0) -> list[dict]:
        return ray.get([w.health.remote() for w in self.workers], timeout=timeout_s)

    # -- serving ------------------------------------------------------------------------------------------------

    def run(self, request: GenerateRequest) -> Iterator[Event]:
        """Rank 0's events as they happen, while watching every other rank: a dead or failing rank anywhere ends
        the stream within about POLL_S (not after the collective timeout), with ReplicaFailed when a rank died and
        RequestFailed when one raised, RequestRejected only when every rank rejected it in its first collective,
        RequestCancelled when it was cancelled (Replica.cancel)."""
        stream = self.workers[0].stream.remote(request)
        others = {w.run.remote(request): r for r, w in enumerate(self.workers) if r > 0}
        streaming, failure, rejected = True, None, set()

        def note(rank, err):
            nonlocal failure
            f = self._failure(rank, err)
            if isinstance(f, RequestRejected):
                rejected.add(rank)
            # anything worse than a rejection or a cancellation (the replica is intact after either) wins; among
            # those, rank 0's (it names the reason, the others only say which ranks rejected)
            if failure is None or (isinstance(failure, _INTACT) and (rank == 0 or not isinstance(f, _INTACT))):
                failure = f

        while streaming or others:
            if self.stop.is_set():
                raise ReplicaFailed(f"replica {self.index}: stopped")
            waiting = ([stream] if streaming else []) + list(others)
            ready, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S)
            for ref in ready:
                if ref is stream:
                    try:
                        event = ray.get(next(stream))
                    except StopIteration:
                        streaming = False
                        continue
                    except RayError as e:
                        streaming = False
                        note(0, e)
                        continue
                    yield event
                else:
                    rank = others.pop(ref)
                    try:
                        ray.get(ref)
                    except RayError as e:
                        note(rank, e)
            if isinstance(failure, (ReplicaFailed, RequestFailed)):
                raise failure
        if isinstance(failure, RequestRejected) and len(rejected) < len(self.workers):
            # _agree rejects on every rank or on none: a lone rejection means the group is out of step
            raise RequestFailed(f"replica {self.index}: only rank(s) {sorted(rejected)} rejected the request: "
                                f"{failure}")
        if failure is not None:  # every rank has returned: the replica is ready for the next request
            raise failure

    def _failure(self, rank: int, err: Exception) -> ReplicaFailed | RequestFailed | RequestRejected:
        where = f"replica {self.index} rank {rank}"
        if isinstance(err, DEATHS):
            return ReplicaFailed(f"{where} died: {_describe(err)}")
        if isinstance(err, OutOfMemoryError):
            return ReplicaFailed(f"{where} was killed by Ray's memory monitor: {_describe(err)}", retries=1)
        cause = _cause(err)
        if isinstance(cause, RequestRejectedError):
            return RequestRejected(str(cause))
        if isinstance(cause, RequestCancelledError):
            return RequestCancelled(str(cause))
        # A rank's collective also fails when a peer died (gloo: "Connection closed by peer"): that is a death,
        # and the prompt deserves a retry. Only when every rank is alive is the error the request's own.
        dead = self._dead_ranks()
        if dead:
            return ReplicaFailed(f"replica {self.index} lost rank(s) {dead} ({where}: {_describe(cause)})")
        return RequestFailed(f"{where}: {_describe(cause)}")

    def _dead_ranks(self, timeout_s: float = 5.0) -> list[int]:
        """Ranks that are dead or do not answer a health ping (answered on the control thread, even mid-step)."""
        refs = {w.health.remote(): r for r, w in enumerate(self.workers)}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        dead = [refs[ref] for ref in late]
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - any failure to answer means the rank is gone
                dead.append(refs[ref])
        return sorted(dead)


_INTACT = (RequestRejected, RequestCancelled)  # failures after which the replica serves the next request


def _gpu_order(gpu_ids: tuple) -> tuple:
    """GPU ids in numeric order ("10" after "2")."""
    return tuple((0, int(g), "") if str(g).isdigit() else (1, 0, str(g)) for g in gpu_ids)


def _have() -> str:
    try:
        t = cluster_totals(cluster_nodes())
    except Exception:  # noqa: BLE001 - only for a message
        return "unknown resources"
    return f"{t['GPU']:g} GPUs and {t['CPU']:g} CPUs"


def describe_ranks(config, nodes: list[str], strategy: str) -> str:
    """'cfg 1 x ring 2 x ulysses 2 over 2 nodes: ranks 0-1 on 10.0.0.1, 2-3 on 10.0.0.2 (PACK)': runs of
    consecutive ranks per node, in rank order."""
    par = config.parallel
    runs: list[list] = []  # [first rank, last rank, ip]
    for r, ip in enumerate(nodes):
        if runs and runs[-1][2] == ip:
            runs[-1][1] = r
        else:
            runs.append([r, r, ip])
    where = ", ".join(f"{'rank' if not k else ''}{'s' if not k and b > a else ''}{' ' if not k else ''}"
                      f"{a}{f'-{b}' if b > a else ''} on {ip}" for k, (a, b, ip) in enumerate(runs))
    count = len(set(nodes))
    return (f"cfg {par.cfg_degree} x ring {par.ring_degree} x ulysses {par.ulysses_degree} over {count} "
            f"node{'s' if count != 1 else ''}: {where} ({strategy})")
