"""The (cfg, ulysses) mesh's groups time out like the default group: a rank stuck outside a collective fails its
partners after runtime.collective_timeout_s, not after torch's default (10 min on NCCL, 30 on gloo)."""

from __future__ import annotations

import time
from datetime import timedelta


def _stall_one_rank(timeout_s: float):
    import torch
    import torch.distributed as dist

    from pipeline.parallel import build_mesh

    mesh = build_mesh(1, 2, timedelta(seconds=timeout_s))
    try:
        if dist.get_rank() == 1:
            time.sleep(timeout_s + 3)  # never joins: its partner must give up on its own
            return "stalled"
        t0 = time.perf_counter()
        try:
            dist.all_reduce(torch.ones(4), group=mesh.sp_group)
        except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError (or DistBackendError) on a timeout
            return ("timed out", time.perf_counter() - t0, type(e).__name__)
        return ("returned", time.perf_counter() - t0, "")
    finally:
        # the stalled collective dies with the mesh's groups; the session pool's own group is untouched
        groups = {id(g): g for g in (mesh.sp_group, mesh.cfg_group, getattr(mesh, "ulysses_group", None),
                                     getattr(mesh, "ring_group", None)) if g is not None}
        for g in groups.values():
            dist.destroy_process_group(g)


def _healthy():
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t)


def test_mesh_groups_use_the_collective_timeout(dist_pools):
    pool = dist_pools(2)  # the session's pool: no processes of its own to spawn
    rank0, rank1 = pool.run(_stall_one_rank, 1.0, timeout=30)
    assert rank1 == "stalled"
    what, took, _ = rank0
    assert what == "timed out" and took < 4, rank0  # 1 s asked; torch's gloo default would be 30 min
    assert pool.run(_healthy) == [2.0, 2.0]  # the pool's group lives on for the tests after this one
