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


def _ray_auth_matches_the_environment() -> None:
    """Ray caches its config (the auth mode among it) per process and re-reads it only when a local ray.init() *sets*
    RAY_AUTH_MODE=token. After a test has run Ray code with RAY_AUTH_MODE=disabled (monkeypatched, then restored to
    the token that an earlier in-process ray.init() left in os.environ), the next local ray.init() finds the variable
    already "token", skips the re-read, starts a token-protected GCS from that environment, and its own client, still
    'disabled', cannot connect: "Failed to start GCS ... InvalidAuthToken" for every later test in the process. So
    before each module and test that may start Ray here, the cache is made to match the environment again."""
    import sys

    if "ray._raylet" not in sys.modules:
        return
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    if not ray.is_initialized():
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module", autouse=True)
def _ray_auth_per_module():
    _ray_auth_matches_the_environment()


@pytest.fixture(autouse=True)
def _ray_auth_per_test():
    _ray_auth_matches_the_environment()
