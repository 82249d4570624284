"""A Runner on a tests/dist_pool.py rank: the pool's gloo group is already the default group, so the Runner joins
it instead of initialising its own (its mesh groups are new). Kept per config for the session of the pool process:
loading and group creation happen once, and a Runner serving many requests is what the tests check anyway."""

from __future__ import annotations

_RUNNERS: dict = {}


def pool_runner(config, **options):
    """This pool rank's Runner for `config` (built, models loaded, on first use), with `options` set as attributes."""
    import torch.distributed as dist

    from pipeline.runner import Runner

    key = repr(config)
    runner = _RUNNERS.get(key)
    if runner is None:
        init = dist.init_process_group
        dist.init_process_group = lambda *args, **kwargs: None  # the pool's group is the default group already
        try:
            runner = Runner(config, dist.get_rank(), dist.get_world_size(), init_method="pool://")
        finally:
            dist.init_process_group = init
        _RUNNERS[key] = runner
    for name, value in options.items():
        setattr(runner, name, value)
    return runner
