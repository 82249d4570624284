"""The (cfg, ulysses) mesh's groups time out like the default group: a rank stuck outside a collective fails its
partners after runtime.collective_timeout_s, not after torch's default (10 min on NCCL, 30 on gloo)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from tests.dist_pool import DistPool, RankError


def _stall_one_rank(timeout_s: float):
    import torch
    import torch.distributed as dist

    from pipeline.parallel import build_mesh

    mesh = build_mesh(1, 2, timedelta(seconds=timeout_s))
    if dist.get_rank() == 1:
        time.sleep(timeout_s + 3)  # never joins: its partner must give up on its own
        return "stalled"
    t0 = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(4), group=mesh.sp_group)
    except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError (or DistBackendError) on a timeout
        return ("timed out", time.perf_counter() - t0, type(e).__name__)
    return ("returned", time.perf_counter() - t0, "")


def test_mesh_groups_use_the_collective_timeout():
    pool = DistPool(2)
    try:
        rank0, rank1 = pool.run(_stall_one_rank, 1.0, timeout=30)
    except RankError as e:
        pytest.fail(str(e))
    finally:
        pool.close(force=True)
    assert rank1 == "stalled"
    what, took, _ = rank0
    assert what == "timed out" and took < 4, rank0  # 1 s asked; torch's gloo default would be 30 min
