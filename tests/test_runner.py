"""The Runner end to end on a tiny random Wan2.1 pipeline folder, through the plain launcher (gloo, no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from configs import load_config
from pipeline.launcher import LocalLauncher
from pipeline.request import Frame, GenerateRequest, Progress, Result
from tests.tiny_models import wan_pipeline_folder


@pytest.fixture(scope="session")
def wan_folder(tmp_path_factory):
    return wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny")


def tiny_config(folder, cfg=1, sp=1, **extra):
    overrides = [f"model.path={folder}", "video.height=32", "video.width=48", "video.frames=9",
                 "sampling.steps=3", "sampling.guidance_scale=4.0", "runtime.device=cpu",
                 f"parallel.cfg_degree={cfg}", f"parallel.ulysses_degree={sp}"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def run(config, requests, **options):
    with LocalLauncher(config, timeout_s=120, runner_options={"return_latents": True, **options}) as group:
        return [list(group.generate(r)) for r in requests]


def _on_pool(config, requests, options):
    """On every rank of a session pool: rank 0's events per request. The Runner is forgotten afterwards (its
    options are this call's alone)."""
    import torch.distributed as dist

    from tests import pool_runner as pr

    try:
        runner = pr.pool_runner(config, **options)
        out = [list(runner.generate(r.resolve(config))) for r in requests]
    finally:
        pr._RUNNERS.pop(repr(config), None)  # not runner.close(): that would end the pool's own group
    return out if dist.get_rank() == 0 else None


def run_on_pool(pools, config, requests, **options):
    """run() on the session's gloo pool of the config's size (no processes of its own to spawn)."""
    return pools(config.parallel.group_size).run(_on_pool, config, requests, {"return_latents": True, **options})[0]


REQUEST = GenerateRequest("a red circle moving right", seed=1234, negative_prompt="blurry")
# the one-rank launcher's requests: the baseline, then test_seeds_guidance_and_samplers's variations
ONE_RANK = [REQUEST, dataclasses.replace(REQUEST, seed=99), dataclasses.replace(REQUEST, guidance_scale=1.0),
            dataclasses.replace(REQUEST, sampler="euler", steps=2)]


@pytest.fixture(scope="module")
def one_rank(wan_folder):
    return run(tiny_config(wan_folder), ONE_RANK)


@pytest.fixture(scope="module")
def baseline(one_rank):
    return one_rank[0]


def test_events_stream_in_order(baseline):
    kinds = [type(e) for e in baseline]
    assert kinds[0] is Progress and baseline[0].stage == "encode"
    denoise = [e for e in baseline if isinstance(e, Progress) and e.stage == "denoise"]
    assert [e.step for e in denoise] == [1, 2, 3] and all(e.total == 3 for e in denoise)
    frames = [e for e in baseline if isinstance(e, Frame)]
    assert [f.index for f in frames] == list(range(9)) and all(f.total == 9 for f in frames)
    assert all(f.image.shape == (32, 48, 3) and f.image.dtype == np.uint8 for f in frames)
    assert kinds[-1] is Result and kinds.index(Frame) > kinds.index(Progress)
    result = baseline[-1]
    assert result.seed == 1234 and result.num_frames == 9
    assert result.shapes["latents"] == [1, 16, 3, 4, 6] and result.shapes["tokens"] == 18
    assert {"text_s", "denoise_s", "decode_s", "first_frame_s", "total_s"} <= set(result.timings)


@pytest.mark.parametrize("cfg, sp", [(1, 2), (1, 3), (2, 1), (2, 2)])
def test_layouts_give_the_same_latents(dist_pools, wan_folder, baseline, cfg, sp):
    """Noise depends on the seed only; SP shards and CFG-parallel halves reproduce sequential, unsharded results
    (3 heads: uneven on 2 ranks, 18 tokens: padded on 4). The same Runner on the session's pools."""
    events = run_on_pool(dist_pools, tiny_config(wan_folder, cfg, sp), [REQUEST])[0]
    want, got = baseline[-1].latents, events[-1].latents
    assert ((got - want).norm() / want.norm()) < 1e-4
    frames = np.stack([e.image for e in events if isinstance(e, Frame)]).astype(int)
    ref = np.stack([e.image for e in baseline if isinstance(e, Frame)]).astype(int)
    assert np.abs(frames - ref).max() <= 1


def test_gathering_every_step_changes_nothing(dist_pools, wan_folder, baseline):
    events = run_on_pool(dist_pools, tiny_config(wan_folder, 1, 2), [REQUEST], keep_latents_sharded=False)[0]
    assert torch.allclose(events[-1].latents, baseline[-1].latents, rtol=1e-4, atol=1e-5)


def test_seeds_guidance_and_samplers(one_rank):
    a, b, c, d = one_rank
    assert not torch.allclose(a[-1].latents, b[-1].latents)
    assert not torch.allclose(a[-1].latents, c[-1].latents)
    assert d[-1].num_frames == 9 and sum(isinstance(e, Progress) and e.stage == "denoise" for e in d) == 2


def test_bad_request_fails_every_rank_and_the_group_lives_on(wan_folder):
    config = tiny_config(wan_folder, 1, 2)
    bad = dataclasses.replace(REQUEST.resolve(config), height=40)  # not a multiple of 16: model-level check
    with LocalLauncher(config, timeout_s=120) as group:
        with pytest.raises(ValueError, match="multiples of 16"):
            list(group.generate(bad))
        assert isinstance(list(group.generate(REQUEST))[-1], Result)


def test_load_models_refuses_a_gpu_too_small_before_loading(monkeypatch):
    """On a GPU, load_models checks the estimate against free memory first: a 14B replica of one GPU on a 24 GiB
    card fails with the one-line estimate (naming the sharded layout that would fit), and nothing is read (no GPU
    needed: the device is only a torch.device here)."""
    import pipeline.runner as runner_module
    from pipeline.runner import Runner

    loaded = []
    monkeypatch.setattr(runner_module, "load_components", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * 2**30, 24 * 2**30))
    runner = Runner.__new__(Runner)
    runner.config = load_config("wan2.1-t2v-14b", ["model.path=/nonexistent/Wan2.1-T2V-14B"])
    runner.rank, runner.world_size, runner.device = 0, 1, torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"^rank 0 needs ~.* of the 23\.5 GiB this GPU can hold .*: use --set "
                                         r"parallel.shard_weights=true --set parallel.ulysses_degree=4 \(needs 4 GPUs "
                                         r"per replica\)$"):
        runner.load_models()
    assert loaded == []


def test_a_request_too_large_for_the_memory_budget_is_rejected_and_the_group_lives_on(wan_folder):
    """memory_budget (load_models sets it on a GPU: the bytes free before loading) is checked against each
    request's own size, which prompt lines may raise above config.video, before the first collective: too large
    is a rejected request on every rank (no hang), and the group serves the next one. The budget here is what
    rank 0 needs at the config's size (CPU ranks have none: set by hand)."""
    from pipeline.memory import estimate_rank_memory

    config = tiny_config(wan_folder, 1, 2)
    budget = estimate_rank_memory(config, 0, device_type="cpu").total
    big = dataclasses.replace(REQUEST.resolve(config), height=256, width=384, frames=49)  # over it on both ranks
    with LocalLauncher(config, timeout_s=120, runner_options={"memory_budget": budget}) as group:
        with pytest.raises(ValueError, match=r"^request .* \(384x256, 49 frames\) is too large for this replica: "
                                             r"rank [01] needs ~.* GiB free before loading"):
            list(group.generate(big))
        assert isinstance(list(group.generate(REQUEST))[-1], Result)


def test_load_models_waits_for_memory_a_replaced_rank_still_holds(monkeypatch):
    """Fits the card but another process still holds memory: load_models polls until it is free, loads, and
    records what was free then as the budget requests are checked against."""
    from types import SimpleNamespace

    import pipeline.memory as memory
    import pipeline.runner as runner_module
    from pipeline.runner import Runner

    loaded = []
    monkeypatch.setattr(runner_module, "load_components", lambda *a, **k: loaded.append(a) or SimpleNamespace(dit=None, experts=lambda: []))
    monkeypatch.setattr(runner_module, "apply_sequence_parallel", lambda *a, **k: None)
    monkeypatch.setattr(memory, "POLL_S", 0.01)
    readings = iter([(10 * 2**30, 80 * 2**30)] * 3 + [(79 * 2**30, 80 * 2**30)])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: next(readings))
    runner = Runner.__new__(Runner)
    runner.config = load_config("wan2.1-t2v-14b", ["model.path=/nonexistent/Wan2.1-T2V-14B"])
    runner.rank, runner.world_size, runner.device = 0, 1, torch.device("cuda", 0)
    runner.mesh = SimpleNamespace(sp_group=None, ulysses_group=None, ring_group=None)
    runner.load_models()
    assert runner.memory_budget == 79 * 2**30 and len(loaded) == 1
