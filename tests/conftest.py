from __future__ import annotations

import pytest

from tests.dist_pool import DistPool


@pytest.fixture(scope="session")
def dist_pools():
    """dist_pools(world) -> a live DistPool of that size, shared by every test of the session."""
    pools: dict[int, DistPool] = {}

    def get(world: int) -> DistPool:
        pool = pools.get(world)
        if pool is None or pool.broken:
            pool = pools[world] = DistPool(world)
        return pool

    yield get
    for pool in pools.values():
        if not pool.broken:
            pool.close()
