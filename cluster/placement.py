"""What each worker reserves and how a replica's workers are packed, decided from the config and the cluster's
nodes before anything starts; a job that can never be placed is refused with what is missing."""

from __future__ import annotations

import math
from dataclasses import dataclass

from configs import OdysseyConfig

__all__ = ["PlacementError", "WorkerShape", "plan_placement", "cluster_nodes"]


class PlacementError(ValueError):
    """The cluster can never hold this job."""


@dataclass(frozen=True)
class WorkerShape:
    """Resources of one SPWorker and the packing of one replica's workers."""

    num_gpus: float
    num_cpus: float
    strategy: str  # "STRICT_PACK" (one node) or "PACK"
    threads: int  # torch threads per worker

    def bundle(self) -> dict:
        b = {"CPU": self.num_cpus}
        if self.num_gpus:
            b["GPU"] = self.num_gpus
        return b


def cluster_nodes() -> list[dict]:
    """Resources of every live node ({'CPU': 8.0, 'GPU': 4.0, ...})."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def plan_placement(config: OdysseyConfig, nodes: list[dict]) -> WorkerShape:
    par, rt = config.parallel, config.runtime
    world, group = par.world_size, par.group_size
    layout = f"{par.replicas} replica(s) x cfg {par.cfg_degree} x ulysses {par.ulysses_degree}"
    gpus = [n.get("GPU", 0.0) for n in nodes]
    cpus = [n.get("CPU", 0.0) for n in nodes]
    use_gpu = rt.device == "cuda" or (rt.device == "auto" and sum(gpus) > 0)
    if rt.device == "cuda" and sum(gpus) == 0:
        raise PlacementError("runtime.device is cuda but the Ray cluster has no GPUs")

    if use_gpu:
        need, per_node, have, unit = 1.0, gpus, sum(gpus), "GPU"
        if have < world:
            raise PlacementError(f"{layout} needs {world} GPUs; the Ray cluster has {have:g}")
        num_cpus = min(1.0, sum(cpus) / world) if sum(cpus) else 0.0
    else:
        if rt.num_cpus_per_worker is not None:
            need = rt.num_cpus_per_worker
        else:  # sized to fit: a 2-core laptop still runs 4 ranks, each a share of a core
            need = min(1.0, math.floor(sum(cpus) / world * 100) / 100)
        if need <= 0 or need * world > sum(cpus) + 1e-9:
            raise PlacementError(f"{layout} needs {world} workers x {rt.num_cpus_per_worker or 0.01:g} CPUs; the Ray "
                                 f"cluster has {sum(cpus):g} CPUs")
        per_node, unit, num_cpus = cpus, "CPU", need

    fits_one_node = max((math.floor(p / need + 1e-9) for p in per_node), default=0) >= group
    if rt.placement == "STRICT_PACK" and not fits_one_node:
        raise PlacementError(f"runtime.placement=STRICT_PACK needs {group} x {need:g} {unit} on one node for a replica; "
                             f"the largest node has {max(per_node, default=0):g} (use runtime.placement=PACK or auto)")
    strategy = "STRICT_PACK" if rt.placement == "STRICT_PACK" or (rt.placement == "auto" and fits_one_node) else "PACK"
    return WorkerShape(num_gpus=1.0 if use_gpu else 0.0, num_cpus=num_cpus, strategy=strategy,
                       threads=max(1, int(num_cpus)))
