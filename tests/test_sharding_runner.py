"""The Runner with weights sharded over the replica (parallel.shard_weights, model.shard_text_encoder: issue #15) on
a tiny random Wan2.1 folder: the encoder's shards, cancel, the step cache and previews as unsharded; and
Result.memory (param and peak bytes per rank, one rank and per request). The sharding module itself, and the
Runner's sharded latents, frames, previews and bytes against unsharded ones: tests/test_sharding.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs import load_config
from pipeline.request import GenerateRequest, Preview, Progress, RequestCancelledError, Result
from tests.pool_runner import pool_runner


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tests.tiny_models import wan_pipeline_folder

    return str(wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "wan", layers=3))


def wan_config(folder, *extra):
    return load_config(None, [f"model.path={folder}", "video.height=32", "video.width=48", "video.frames=9",
                              "sampling.steps=3", "sampling.guidance_scale=4.0", "runtime.device=cpu",
                              "runtime.collective_timeout_s=60", *extra])


def _serve(runner, req, cancel_after=None):
    """(Result or the cancel message, denoise steps seen, previews seen). cancel_after: rank 1 cancels after that
    denoising step's event."""
    steps, previews = [], 0
    try:
        for e in runner.generate(req):
            if isinstance(e, Progress) and e.stage == "denoise":
                steps.append(e.step)
                if e.step == cancel_after and runner.rank == 1:
                    runner.cancel(req.request_id)
            elif isinstance(e, Preview):
                previews += 1
            elif isinstance(e, Result):
                return e, steps, previews
    except RequestCancelledError as err:
        return str(err), steps, previews
    raise AssertionError("no Result")


def _padded_bytes(shape, itemsize: int, world: int) -> int:
    """Bytes of a parameter whose rows are padded to a multiple of world (FSDP2 allocates ceil(n / world) rows on
    each of the world ranks)."""
    return world * -(-shape[0] // world) * int(np.prod(shape[1:])) * itemsize


def _sp2(folder):
    """SP=2 sharded, and sharded with the text encoder sharded and rank 0 decoding alone; a cancel on the sharded
    Runner, then the same request again. (Sharded against unsharded latents and bytes, at SP=2 and CFG=2 x SP=2:
    tests/test_sharding.py section 4.)"""
    from pipeline.sharding import is_sharded, resident_param_bytes

    req = GenerateRequest("a red circle moving right", seed=1234, negative_prompt="blurry", request_id="r")
    out = {}
    for name, extra in (("sharded", ["parallel.shard_weights=true"]),
                        ("text", ["parallel.shard_weights=true", "model.shard_text_encoder=true",
                                  "parallel.vae_parallel=false"])):
        config = wan_config(folder, "parallel.ulysses_degree=2", *extra)
        runner = pool_runner(config, return_latents=True)
        result, steps, _ = _serve(runner, req.resolve(config))
        comp = runner.components
        out[name] = (result.latents, result.memory, is_sharded(comp.dit),
                     is_sharded(comp.text_encoder) if comp.text_encoder else None,
                     resident_param_bytes(comp.dit, comp.text_encoder, comp.decoder))
        if name == "sharded":
            out["cancelled"] = _serve(runner, req.resolve(config), cancel_after=1)[:2]
            out["again"] = _serve(runner, req.resolve(config))[0].latents
        if name == "text":
            out["encoder_bytes"] = resident_param_bytes(runner.components.text_encoder)
    return out


def _encoder_bytes(folder, world: int) -> tuple[int, int]:
    """(bytes of umt5's parameters in bfloat16, the embedding's and blocks' rows padded to a multiple of world; of its
    final norm), from the weights file."""
    from safetensors import safe_open

    with safe_open(f"{folder}/text_encoder/model.safetensors", framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k != "encoder.embed_tokens.weight"}
    return (sum(_padded_bytes(shape, 2, 1 if k.startswith("encoder.final_layer_norm.") else world)
                for k, shape in shapes.items()),
            2 * int(np.prod(shapes["encoder.final_layer_norm.weight"])))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_sp2_sharded_runner_reports_memory_cancels_and_shards_the_encoder(dist_pools, wan_folder):
    rank0, rank1 = dist_pools(2).run(_sp2, wan_folder)
    sharded, text = rank0["sharded"], rank0["text"]
    assert sharded[0].dtype == torch.float32
    assert _rel(text[0], sharded[0]) <= 1e-5  # sharding the encoder too changes nothing
    assert (sharded[2], text[2]) == (True, True)
    assert text[3] is True and rank1["text"][3] is True and rank1["sharded"][3] is None  # every rank holds shards
    # Result.memory: rank 0 only, one int per rank, in rank order
    assert all(r[1] is None for r in rank1.values() if isinstance(r, tuple) and len(r) == 5)
    for name in ("sharded", "text"):  # each rank's own numbers (rank 0 decoding alone in "text")
        assert rank0[name][1]["param_bytes"] == [rank0[name][4], rank1[name][4]]
    for memory in (sharded[1], text[1]):
        assert set(memory) == {"param_bytes", "peak_bytes"}
        assert all(len(v) == 2 and all(type(x) is int and x > 0 for x in v) for v in memory.values())
        assert all(peak > param for peak, param in zip(memory["peak_bytes"], memory["param_bytes"]))
    parts = sharded[1]["param_bytes"]
    # With the encoder sharded rank 1 holds part of it; without the split decode it holds no decoder.
    assert text[1]["param_bytes"][0] < parts[0] and text[1]["param_bytes"][1] != parts[1]
    # ... and each rank its half of every encoder parameter (the tied embedding once; rows padded), the final norm
    # whole.
    encoder, final_norm = _encoder_bytes(wan_folder, 2)
    assert rank0["encoder_bytes"] + rank1["encoder_bytes"] == encoder + final_norm
    # A cancel mid-denoise stops both ranks at the same step; the group then serves the request unchanged.
    for r in (rank0, rank1):
        assert r["cancelled"] == ("request r cancelled after step 2", [1])
    assert torch.equal(rank0["again"], sharded[0])


def _cached(folder, layout, cache, shard):
    """A step cache and a preview after every step."""
    config = wan_config(folder, layout, "sampling.steps=8", f"sampling.cache={cache}", "sampling.cache_threshold=0.5",
                        "sampling.preview_every=1", *(["parallel.shard_weights=true"] if shard else []))
    runner = pool_runner(config, return_latents=True)
    result, steps, previews = _serve(runner, GenerateRequest("a blue ball moving up", seed=7).resolve(config))
    return result.latents, result.cache, previews, result.memory


@pytest.mark.parametrize("layout, cache", [("parallel.cfg_degree=2", "fbcache"), ("parallel.ulysses_degree=2",
                                                                                 "easycache")])
def test_step_cache_and_previews_with_sharding(dist_pools, wan_folder, layout, cache):
    """Sharded over both CFG halves (they run the same blocks, each with its own text) or SP ranks, with skipped
    steps (fbcache: a skip after block 0 leaves block 1's prefetch pending) and previews: the same latents, skips
    and previews as unsharded."""
    pool = dist_pools(2)
    plain = pool.run(_cached, wan_folder, layout, cache, False)[0]
    sharded = pool.run(_cached, wan_folder, layout, cache, True)[0]
    assert _rel(sharded[0], plain[0]) <= 1e-5
    assert sharded[1] == plain[1] and 0 < len(plain[1]["skipped"]) and plain[2] == sharded[2] == 7
    assert sum(sharded[3]["param_bytes"]) < sum(plain[3]["param_bytes"])


def _world1():
    config = load_config("tiny", ["runtime.device=cpu", "sampling.steps=2"])
    runner = pool_runner(config)
    return _serve(runner, GenerateRequest("a red circle moving right", seed=3).resolve(config))[0].memory


def test_memory_on_one_rank_counts_every_model(dist_pools):
    """World 1 (no collective): the embedded DiT, text encoder and decoder, all float32 on rank 0."""
    from safetensors import safe_open

    from pipeline.tiny import WEIGHTS

    with safe_open(str(WEIGHTS), framework="pt") as f:
        expected = sum(4 * int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    memory = dist_pools(1).run(_world1)[0]
    assert memory["param_bytes"] == [expected] and len(memory["peak_bytes"]) == 1
    assert memory["peak_bytes"][0] > expected


def test_peak_memory_is_per_request():
    """The CPU peak (peak RSS since the reset) forgets what an earlier request touched."""
    from pipeline.runner import peak_memory_bytes, reset_peak_memory

    cpu = torch.device("cpu")
    assert reset_peak_memory(cpu)  # Linux: /proc/self/clear_refs
    big = np.ones(300 * 2**20, dtype=np.uint8)  # touched: 300 MiB resident
    high = peak_memory_bytes(cpu, True)
    del big
    assert reset_peak_memory(cpu)
    low = peak_memory_bytes(cpu, True)
    assert high - low > 200 * 2**20
