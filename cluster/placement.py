"""What each worker reserves and how a replica's workers are packed, decided from the config and the cluster's
nodes before anything starts.

A replica is cfg x ring x ulysses ranks, Ulysses innermost. Its placement group has one bundle per Ulysses group
(a bundle always lives on one node, so the group's all-to-alls never cross nodes): bundle g = cfg_rank * R +
ring_rank holds ranks g*U .. g*U+U-1. So a replica spreads over nodes only along the ring (point-to-point K/V hops)
and between the cfg halves (one exchange per step), never inside a Ulysses group: a Ulysses group larger than
every GPU node there is is refused (more nodes of those kinds would not help). On GPUs a job that
the live nodes cannot hold is not refused: the driver asks the autoscaler for the rest and waits
(runtime.scale_up_timeout_s). CPU-only jobs are sized to fit the CPUs there are, and refused when they cannot be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from configs import OdysseyConfig

__all__ = ["PlacementError", "WorkerShape", "plan_placement", "shortfall", "cluster_nodes", "cluster_totals",
           "describe_layout"]

# Rank 0 encoding prompts on CPU next to GPU ranks (model.text_encoder_device=cpu, runtime.encoder_cpus null):
ENCODER_CPUS_DEFAULT = 8.0  # its extra CPUs when no GPU node is up yet to size them from (autoscaling clusters)
ENCODER_CPUS_MAX = 16.0  # at most this many: a T5 encoder gains little beyond, and the node's other replicas need room
NODE_CPUS_RESERVED = 2.0  # per GPU node, never given to the encoder: Ray's own processes, the object store, ffmpeg


class PlacementError(ValueError):
    """The cluster can never hold this job."""


@dataclass(frozen=True)
class WorkerShape:
    """Resources of one SPWorker and the packing of one replica's workers."""

    num_gpus: float  # per worker: 1 on GPUs, 0 on CPU-only clusters
    num_cpus: float  # per worker
    strategy: str  # across a replica's bundles: "STRICT_PACK" (one node) or "PACK"
    threads: int  # torch threads per worker
    group_size: int = 1  # workers per bundle: one Ulysses group
    groups: int = 1  # bundles per replica: cfg_degree x ring_degree; bundle g = cfg_rank * ring_degree + ring_rank
    encoder_cpus: float = 0.0  # extra CPUs of rank 0 (bundle 0), which encodes prompts on CPU

    def bundles(self) -> list[dict]:
        """One replica's placement-group bundles, one per Ulysses group; bundle g holds ranks g*group_size ..
        (g+1)*group_size-1, so bundle 0 holds rank 0."""
        out = []
        for g in range(self.groups):
            b = {"CPU": self.num_cpus * self.group_size + (self.encoder_cpus if g == 0 else 0.0)}
            if self.num_gpus:
                b["GPU"] = self.num_gpus * self.group_size
            out.append({k: round(v, 4) for k, v in b.items() if v > 0})
        return out

    def worker_cpus(self, group: int, member: int) -> float:
        return self.num_cpus + (self.encoder_cpus if group == 0 and member == 0 else 0.0)

    def worker_threads(self, group: int, member: int) -> int:
        if group == 0 and member == 0:  # rank 0 uses its encoder CPUs (an explicit runtime.encoder_cpus included)
            return max(self.threads, int(self.worker_cpus(group, member)))
        return self.threads


def cluster_nodes() -> list[dict]:
    """Resources of every live node ({'CPU': 8.0, 'GPU': 4.0, ...})."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def cluster_totals(nodes: list[dict]) -> dict:
    return {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}


def shortfall(shape: WorkerShape, replicas: int, nodes: list[dict]) -> str | None:
    """What the live nodes lack to hold every replica at once ("needs 16 GPUs; the cluster has 8"), or None."""
    have = cluster_totals(nodes)
    bundles = shape.bundles() * replicas
    need = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("GPU", "CPU")}
    for k in ("GPU", "CPU"):
        if need[k] > have[k] + 1e-9:
            return f"needs {need[k]:g} {k}{'s' * (need[k] != 1)}; the cluster has {have[k]:g}"
    # Enough in total, but each bundle (one Ulysses group) must fit one node: first fit, largest bundles first.
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0))):
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items())), None)
        if node is None:
            unit = "GPU" if "GPU" in b else "CPU"
            return (f"needs a node with {b[unit]:g} {unit}s for each Ulysses group (a group never spans nodes); the "
                    f"largest has {max((n.get(unit, 0.0) for n in nodes), default=0.0):g}")
        for k, v in b.items():
            node[k] -= v
    return None


def describe_layout(config: OdysseyConfig) -> str:
    """'2 replica(s) x cfg 1 x ulysses 8', with ' x ring R' before the ulysses when there is a ring."""
    par = config.parallel
    ring = f" x ring {par.ring_degree}" if par.ring_degree > 1 else ""
    return f"{par.replicas} replica(s) x cfg {par.cfg_degree}{ring} x ulysses {par.ulysses_degree}"


def plan_placement(config: OdysseyConfig, nodes: list[dict]) -> WorkerShape:
    par, rt = config.parallel, config.runtime
    u, ring = par.ulysses_degree, par.ring_degree
    replica, world, groups = par.group_size, par.world_size, par.cfg_degree * ring
    layout = describe_layout(config)
    gpus = [n.get("GPU", 0.0) for n in nodes]
    cpus = [n.get("CPU", 0.0) for n in nodes]
    use_gpu = rt.device == "cuda" or (rt.device == "auto" and sum(gpus) > 0)

    if use_gpu:
        # GPU presets never fall back to CPU ranks: too few GPUs now means "ask the autoscaler and wait".
        gpu_nodes = [n for n in nodes if n.get("GPU", 0.0) >= 1]
        largest = max((math.floor(n["GPU"] + 1e-9) for n in gpu_nodes), default=0)
        if gpu_nodes and largest < u:
            # More nodes of the kind there are would not help: a Ulysses group never spans nodes.
            raise PlacementError(f"{layout}: a Ulysses group of {u} GPUs must fit on one node (its all-to-all "
                                 f"never crosses nodes) and the largest GPU node has {largest}; "
                                 f"{_suggest(u * ring, largest)}")
        need, per_node, unit = 1.0, gpus, "GPU"
        # One CPU per GPU worker where nodes have it (typical GPU nodes have many), else an equal share.
        num_cpus = min([1.0] + [math.floor(n.get("CPU", 0.0) / n["GPU"] * 100) / 100 for n in gpu_nodes])
        encoder_cpus = 0.0
        if config.model.text_encoder_device == "cpu":
            if rt.encoder_cpus is not None:
                encoder_cpus = rt.encoder_cpus
            elif gpu_nodes:
                encoder_cpus = min(_spare_cpus(gpu_nodes, num_cpus, replica), ENCODER_CPUS_MAX)
            else:  # nothing to size it from yet: a default a GPU node is sure to have (not the 1 thread of a rank)
                encoder_cpus = ENCODER_CPUS_DEFAULT
        threads = 1
    else:
        if rt.num_cpus_per_worker is not None:
            need = rt.num_cpus_per_worker
        else:  # sized to fit: a 2-core laptop still runs 4 ranks, each a share of a core; a group fits a node
            need = min(1.0, math.floor(sum(cpus) / world * 100) / 100,
                       math.floor(max(cpus, default=0.0) / u * 100) / 100)
        fit = sum(math.floor(c / (need * u) + 1e-9) for c in cpus) if need > 0 else 0
        if need <= 0 or need * world > sum(cpus) + 1e-9 or fit < par.replicas * groups:
            raise PlacementError(f"{layout} needs {world} workers x {rt.num_cpus_per_worker or 0.01:g} CPUs in "
                                 f"groups of {u} per node; the Ray cluster has {sum(cpus):g} CPUs "
                                 f"(largest node {max(cpus, default=0.0):g})")
        per_node, unit, num_cpus, encoder_cpus, threads = cpus, "CPU", need, 0.0, max(1, int(need))

    fits_one_node = max((math.floor(p / need + 1e-9) for p in per_node), default=0) >= replica
    # On GPUs with no GPU node up yet, nodes may still arrive; once some are up and all are too small, more of
    # the same kind would never hold a replica on one node: waiting for the scale-up timeout only delays the error.
    if rt.placement == "STRICT_PACK" and not fits_one_node and (not use_gpu or any(p >= 1 for p in per_node)):
        raise PlacementError(f"runtime.placement=STRICT_PACK needs {replica} x {need:g} {unit} on one node "
                             f"for a replica; the largest node has {max(per_node, default=0):g} (use "
                             f"runtime.placement=PACK or auto)")
    strategy = "STRICT_PACK" if rt.placement == "STRICT_PACK" or (rt.placement == "auto" and fits_one_node) else "PACK"
    return WorkerShape(num_gpus=1.0 if use_gpu else 0.0, num_cpus=num_cpus, strategy=strategy, threads=threads,
                       group_size=u, groups=groups, encoder_cpus=encoder_cpus)


def _suggest(ranks: int, largest: int) -> str:
    """A layout of the same ranks per cfg half whose Ulysses groups fit the largest node."""
    u = max(d for d in range(1, largest + 1) if ranks % d == 0)
    return f"use --ulysses {u} --ring {ranks // u} (Ulysses inside a node, the ring across nodes)"


def _spare_cpus(gpu_nodes: list[dict], cpus_per_gpu: float, replica_gpus: int) -> float:
    """CPUs of the smallest GPU node beyond its GPU workers' share and NODE_CPUS_RESERVED, split among the replicas
    it can hold."""
    spare = []
    for n in gpu_nodes:
        replicas_here = max(1, int(n["GPU"] // replica_gpus))
        free = n.get("CPU", 0.0) - n["GPU"] * cpus_per_gpu - NODE_CPUS_RESERVED
        spare.append(math.floor(max(0.0, free) / replicas_here))
    return float(min(spare, default=0))
