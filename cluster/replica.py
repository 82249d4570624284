"""One replica: a placement group, its SPWorkers with ranks assigned after placement, and the event stream of one
request at a time. Any rank's death or error fails the replica as a whole."""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Iterator

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import SPWorker
from configs import OdysseyConfig
from pipeline.request import Event, GenerateRequest

from .placement import WorkerShape

__all__ = ["Replica", "ReplicaFailed", "RequestRejected"]

log = logging.getLogger(__name__)
_ids = itertools.count()

POLL_S = 0.5  # how often a waiting driver thread looks up from ray.wait (stop requests, liveness)


class ReplicaFailed(RuntimeError):
    """A rank died, timed out or crashed: the replica is gone and the request may be retried elsewhere."""


class RequestRejected(ValueError):
    """Every rank refused the request (invalid for this model); the replica is intact."""


def _cause(err: Exception) -> Exception:
    """The worker-side exception inside a RayTaskError."""
    return getattr(err, "cause", None) or err


class Replica:
    def __init__(self, index: int, config: OdysseyConfig, shape: WorkerShape, stop: threading.Event):
        self.index, self.config, self.shape, self.stop = index, config, shape, stop
        self.name = f"odyssey-r{index}-{next(_ids)}"
        self.pg = None
        self.workers: list = []  # by rank
        self.infos: list = []
        self.load_s = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> "Replica":
        """Reserve, place, rank, rendezvous, load. Raises ReplicaFailed on any failure (and cleans up)."""
        n, rt = self.config.parallel.group_size, self.config.runtime
        try:
            self.pg = placement_group([self.shape.bundle()] * n, strategy=self.shape.strategy, name=self.name)
            self._wait(self.pg.ready(), rt.placement_timeout_s,
                       f"placing {n} workers of {self.shape.bundle()} ({self.shape.strategy}) took over "
                       f"{rt.placement_timeout_s:g} s: the cluster is busy or fragmented")
            workers = [
                SPWorker.options(
                    num_gpus=self.shape.num_gpus, num_cpus=self.shape.num_cpus,
                    name=f"{self.name}-w{i}",
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                ).remote(self.config, self.shape.threads)
                for i in range(n)
            ]
            infos = self._wait([w.info.remote() for w in workers], rt.placement_timeout_s, "workers did not start")
            # Ranks after placement: same-node ranks contiguous, GPUs in order within a node.
            order = sorted(range(n), key=lambda i: (infos[i].ip, infos[i].node_id, infos[i].gpu_ids, i))
            self.workers, self.infos = [workers[i] for i in order], [infos[i] for i in order]
            address = self._wait(self.workers[0].reserve_address.remote(), 60, "rank 0 gave no address")
            self._wait([w.rendezvous.remote(r, n, address) for r, w in enumerate(self.workers)],
                       rt.collective_timeout_s + 30, f"rendezvous at {address} failed")
            self.load_s = max(self._wait([w.load_models.remote() for w in self.workers], rt.load_timeout_s,
                                         "loading the models failed"))
            log.info("replica %d up: %d ranks on %s, models loaded in %.1f s", self.index, n,
                     sorted({i.ip for i in self.infos}), self.load_s)
            return self
        except BaseException:
            self.kill()
            raise

    def _wait(self, refs, timeout_s: float, what: str):
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            raise ReplicaFailed(f"replica {self.index}: {what}") from None
        except (RayActorError, RayTaskError) as e:
            cause = _cause(e)
            if isinstance(cause, ValueError):
                raise cause from None
            raise ReplicaFailed(f"replica {self.index}: {what}: {type(cause).__name__}: {cause}") from None

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

    def health(self, timeout_s: float = 5.0) -> list[dict]:
        return ray.get([w.health.remote() for w in self.workers], timeout=timeout_s)

    # -- serving ------------------------------------------------------------------------------------------------

    def run(self, request: GenerateRequest) -> Iterator[Event]:
        """Rank 0's events as they happen, while watching every other rank: a dead or failing rank anywhere ends
        the stream with ReplicaFailed within about POLL_S (not after the collective timeout)."""
        stream = self.workers[0].stream.remote(request)
        others = {w.run.remote(request): r for r, w in enumerate(self.workers) if r > 0}
        streaming, rejected = True, None
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
                    except (RayActorError, RayTaskError) as e:
                        streaming, rejected = False, self._failure(0, e)
                        continue
                    yield event
                else:
                    rank = others.pop(ref)
                    try:
                        ray.get(ref)
                    except (RayActorError, RayTaskError) as e:
                        rejected = rejected or self._failure(rank, e)
            if isinstance(rejected, ReplicaFailed):
                raise rejected
        if rejected is not None:  # every rank has returned: the replica is ready for the next request
            raise rejected

    def _failure(self, rank: int, err: Exception) -> ReplicaFailed | RequestRejected:
        cause = _cause(err)
        if isinstance(cause, ValueError):
            return RequestRejected(str(cause))
        return ReplicaFailed(f"replica {self.index} rank {rank}: {type(cause).__name__}: {cause}".strip())
