"""Step caching (issue #11) through the Runner: SP=1/2/3 and CFG-parallel skip exactly the same steps and give the
same video; the skip schedules match independent references of TeaCache's and First-Block-Cache's rules; nothing
skipped equals cache off; a rank whose cache state differs is an error on every rank, never a hang; bad settings
are refused in one line.

Models: the embedded tiny model (fbcache, easycache) and a random DiT with Wan2.1-1.3B's widths (dim 1536, 12 heads,
ffn 8960: TeaCache's coefficients apply) but one block, in a diffusers pipeline folder loaded through model.path.

Legend: B batch (1), L tokens, P patch vector, C model dim.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist

from configs import load_config
from pipeline.components import load_components
from pipeline.dit import WanDiT, WanDiTConfig
from pipeline.launcher import LocalLauncher
from pipeline.request import Frame, GenerateRequest, Progress, RequestRejectedError, Result
from pipeline.samplers import make_sampler
from pipeline.step_cache import POLICIES, StepCache, StepCacheMismatch

STEPS = 16
LAYOUTS = [(1, 1), (2, 1), (3, 1), (2, 2)]  # (ulysses, cfg): (1, 1) is sequential CFG on one rank
LAYOUT_IDS = ["sp1", "sp2", "sp3", "sp2-cfgpar"]
# 8 latent tokens: on 3 ranks 3 + 3 + 2 and a padded one, 1/8 of the statistics if it were counted
SMALL_VIDEO = dict(height=16, width=16, frames=5)
# name -> (policy, threshold, video). Thresholds that skip some steps but not all, the skip cap deciding some steps,
# each threshold decision at least MARGIN (relative) away from the threshold in the references below, so that
# last-bit differences between layouts cannot flip one.
VARIANTS = {"fbcache": ("fbcache", 0.4, {}), "easycache": ("easycache", 0.3, {}),
            "fbcache-8tokens": ("fbcache", 0.4, SMALL_VIDEO), "easycache-8tokens": ("easycache", 0.4, SMALL_VIDEO),
            "teacache": ("teacache", 0.4, {})}
CASES = [("tiny", name) for name in VARIANTS if name != "teacache"] + [("wan13", "teacache")]  # (model, variant)
NOTHING = 1e-9  # a threshold below every step's change: nothing skipped
NOTHING_CASES = [("tiny", "fbcache", 1, 1), ("tiny", "fbcache", 2, 2), ("tiny", "easycache", 1, 1),
                 ("tiny", "easycache", 2, 2), ("wan13", "teacache", 1, 1)]  # (model, policy, ulysses, cfg)
MARGIN = 0.01
REQUEST = GenerateRequest("a red circle moving right", seed=7, steps=STEPS, negative_prompt="a blue square moving up")
# TeaCache4Wan2.1's 1.3B polynomial (input e, no ret-steps), written out here, not read from pipeline/
TEACACHE_1_3B = (2.39676752e3, -1.31110545e3, 2.01331979e2, -8.29855975, 1.37887774e-1)


def tiny_config(sp=1, cfg=1):
    return load_config("tiny", ["runtime.device=cpu", "runtime.collective_timeout_s=60", f"sampling.steps={STEPS}",
                                f"parallel.ulysses_degree={sp}", f"parallel.cfg_degree={cfg}"])


def wan13_config(folder, sp=1, cfg=1):
    return load_config(None, [f"model.path={folder}", "runtime.device=cpu", "runtime.collective_timeout_s=60",
                              "video.height=32", "video.width=32", "video.frames=5", f"sampling.steps={STEPS}",
                              "sampling.guidance_scale=5.0", f"parallel.ulysses_degree={sp}",
                              f"parallel.cfg_degree={cfg}"])


def wan13_folder(folder):
    """A Wan2.1 diffusers pipeline folder whose DiT has 1.3B's widths and one block; returns (folder, the diffusers
    DiT). A trained time embedding is smooth in t, a random one is not: its fast sinusoid inputs make e change
    completely between any two steps, where TeaCache's rescaled change means nothing. Only the slow inputs (periods
    above ~300 timesteps) are kept: e then changes by ~8% per step early to ~75% at the end (16 steps, shift 5),
    through the range TeaCache's polynomial was fitted on and beyond it, where the polynomial dips below the change
    itself and below zero."""
    from tests.tiny_models import diffusers_dit, diffusers_vae, hf_umt5, save_dit, save_t5, save_vae, tiny_tokenizer

    tokenizer = tiny_tokenizer(folder / "_spm")
    save_t5(hf_umt5(len(tokenizer), seed=0, d_model=24), tokenizer, folder, "pipeline")
    dit = diffusers_dit(0, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=24, freq_dim=256,
                        num_layers=1)
    half = dit.config.freq_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)  # of the [cos, sin] input channels
    with torch.no_grad():
        dit.condition_embedder.time_embedder.linear_1.weight.mul_((freqs < 2e-2).repeat(2).float())
    save_dit(dit, folder, "pipeline")
    save_vae(diffusers_vae(0), folder, "pipeline")
    # 32 text tokens instead of 512: the 1536-wide text embedding of 512 tokens would dominate every step on a CPU
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "text_len": 32}))
    return folder, dit


# ---------------------------------------------------------------------------------------------------------------
# Every layout's runs, once per module (on the session's pools: spawning and loading cost more than the requests)


def per_rank(group: LocalLauncher, requests: list[GenerateRequest]) -> list[tuple[str, object]]:
    """Each rank serves its own request (LocalLauncher.generate gives every rank the same one): by rank, ("Result",
    result) or (error type, message)."""
    for q, request in zip(group.requests, requests):
        q.put(request)
    out: dict[int, tuple[str, object]] = {}
    while len(out) < group.world:
        rank, kind, payload = group._get()
        if kind == "error":
            out[rank] = payload[:2]
        elif isinstance(payload, Result):
            out[rank] = ("Result", payload)
    return [out[r] for r in range(group.world)]


def cached(policy, threshold, video=None):
    return dataclasses.replace(REQUEST, cache=policy, cache_threshold=threshold, **(video or {}))


def variant(name: str) -> GenerateRequest:
    policy, threshold, video = VARIANTS[name]
    return cached(policy, threshold, video)


def layout_requests(model: str, sp: int, cfg: int) -> list[tuple[str, GenerateRequest]]:
    """The (name, request) pairs a layout serves, in order; every rank serves the same ones."""
    todo = []
    if (model, sp, cfg) in {(m, s, c) for m, _, s, c in NOTHING_CASES}:  # nothing skipped's twin
        todo.append(("off", REQUEST))
    for name in [name for m, name in CASES if m == model]:
        todo.append((name, variant(name)))
        if (model, name, sp, cfg) in NOTHING_CASES:
            todo.append((f"{name}-nothing", cached(name, NOTHING)))
    if model == "wan13" and (sp, cfg) == (1, 1):
        todo.append(("teacache-default", cached("teacache", None)))
    return todo


def _pool_layout(config, todo):
    """On every rank of a session pool (no processes of its own to spawn): serve the requests; rank 0's events by
    name. The Runner is closed and forgotten afterwards (the pool lives on; a 1.3B-wide DiT per rank should not)."""
    from tests import pool_runner as pr

    import gc

    try:
        runner = pr.pool_runner(config, return_latents=True)
        out = {name: list(runner.generate(request.resolve(config))) for name, request in todo}
    finally:
        pr._RUNNERS.pop(repr(config), None)  # not runner.close(): that would end the pool's own group
        runner = None
        gc.collect()
    return out if dist.get_rank() == 0 else None


def run_layout(model: str, sp: int, cfg: int, folder=None, pools=None) -> dict:
    config = tiny_config(sp, cfg) if model == "tiny" else wan13_config(folder, sp, cfg)
    todo = layout_requests(model, sp, cfg)
    if not (model == "tiny" and (sp, cfg) == (2, 2)):
        return pools(sp * cfg).run(_pool_layout, config, todo, timeout=300)[0]
    out = {}
    with LocalLauncher(config, timeout_s=120, runner_options={"return_latents": True}) as group:
        # refused in the first collective on every rank; the group serves the requests after them
        request = cached("teacache", None).resolve(config)
        out["teacache-on-tiny"] = per_rank(group, [request] * group.world)
        try:
            out["teacache-on-tiny-launcher"] = list(group.generate(request))
        except RequestRejectedError as e:  # what a caller of the launcher sees
            out["teacache-on-tiny-launcher"] = e
        fb = cached("fbcache", 0.1).resolve(config)
        out["threshold-differs"] = per_rank(group, [fb, dataclasses.replace(fb, cache_threshold=0.2), fb, fb])
        out["policy-differs"] = per_rank(group, [fb, fb, fb, dataclasses.replace(fb, cache="easycache")])
        for name, request in todo:
            out[name] = list(group.generate(request))
    return out


@pytest.fixture(scope="module")
def wan13(tmp_path_factory):
    return wan13_folder(tmp_path_factory.mktemp("wan13") / "Wan2.1-1.3B-widths")


@pytest.fixture(scope="module")
def runs(request, dist_pools):
    done: dict = {}

    def get(model: str, sp: int = 1, cfg: int = 1) -> dict:
        if (model, sp, cfg) not in done:
            folder = request.getfixturevalue("wan13")[0] if model == "wan13" else None
            done[model, sp, cfg] = run_layout(model, sp, cfg, folder, dist_pools)
        return done[model, sp, cfg]

    return get


def result(events) -> Result:
    assert isinstance(events[-1], Result)
    return events[-1]


def frames(events) -> np.ndarray:
    return np.stack([e.image for e in events if isinstance(e, Frame)]).astype(int)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------------------
# 1. Every layout skips exactly the same steps and gives the same video


@pytest.mark.parametrize("model, name", CASES)
def test_sequential_cfg_skips_some_steps_and_reports_them(runs, model, name):
    events = runs(model)[name]
    cache = result(events).cache
    policy, threshold, _ = VARIANTS[name]
    assert cache["policy"] == policy and cache["threshold"] == threshold and cache["steps"] == STEPS
    assert 0 < len(cache["skipped"]) and cache["computed_steps"] == STEPS - len(cache["skipped"]) < STEPS
    spec = POLICIES[policy]
    warmup = max(spec.min_warmup, math.ceil(spec.warmup * STEPS))
    assert min(cache["skipped"]) >= warmup and STEPS - 1 not in cache["skipped"]
    runs_of_skips = "".join("s" if i in cache["skipped"] else "c" for i in range(STEPS)).split("c")
    assert max(map(len, runs_of_skips)) <= spec.max_skips
    # the progress line counts computed steps as they happen
    denoise = [e for e in events if isinstance(e, Progress) and e.stage == "denoise"]
    assert [e.computed for e in denoise] == [sum(i not in cache["skipped"] for i in range(n + 1)) for n in range(STEPS)]
    off = runs(model)["off"]
    assert result(off).cache is None
    assert all(e.computed is None for e in off if isinstance(e, Progress))


@pytest.mark.parametrize("sp, cfg", LAYOUTS[1:], ids=LAYOUT_IDS[1:])
@pytest.mark.parametrize("model, name", CASES)
def test_layouts_skip_the_same_steps_and_give_the_same_video(runs, model, name, sp, cfg):
    want, got = runs(model)[name], runs(model, sp, cfg)[name]
    assert result(got).cache == result(want).cache
    assert rel(result(got).latents, result(want).latents) < 1e-4
    assert np.abs(frames(got) - frames(want)).max() <= 1


# ---------------------------------------------------------------------------------------------------------------
# 2. Independent references of the rules


def teacache_reference(e_NC: np.ndarray, threshold: float) -> tuple[list[int], float]:
    """TeaCache4Wan2.1's rule on the time embeddings of the N steps: the relative L1 change d of e against the
    previous step's, rescaled by the 1.3B polynomial as (50/N) poly(d N/50) (one of our steps spans 50/N of the 50
    fitted ones), accumulated; compute when the sum reaches the threshold (and reset it), on the warm-up and the
    last step, and after the most skips in a row. Outside its fit the polynomial dips below d itself and below
    zero (TeaCache would then skip the steps that change most): the rescaled change is floored at d (pipeline's
    rule since 75e8447). Returns (skipped steps, smallest relative margin of a threshold decision)."""
    steps = len(e_NC)
    spec = POLICIES["teacache"]
    warmup = max(spec.min_warmup, math.ceil(spec.warmup * steps))
    rescale, per_step = np.poly1d(TEACACHE_1_3B), 50 / steps
    skipped, accumulated, in_row, margin = [], 0.0, 0, math.inf
    for i in range(1, steps):
        d = np.abs(e_NC[i] - e_NC[i - 1]).mean() / np.abs(e_NC[i - 1]).mean()
        estimate = accumulated + per_step * max(rescale(d / per_step), d / per_step)
        forced = i < warmup or i == steps - 1 or in_row >= spec.max_skips
        if not forced:
            margin = min(margin, abs(estimate - threshold) / threshold)
        if forced or estimate >= threshold:
            accumulated, in_row = 0.0, 0
        else:
            skipped.append(i)
            accumulated, in_row = estimate, in_row + 1
    return skipped, margin


def test_teacache_skips_what_teacaches_rule_gives(runs, wan13):
    folder, diffusers_dit = wan13
    config = wan13_config(folder)
    request = REQUEST.resolve(config)
    timesteps = make_sampler(request.sampler, STEPS, request.shift).timesteps
    # the time embedding from diffusers' implementation, not ours
    embedder = diffusers_dit.condition_embedder
    with torch.no_grad():
        e_NC = embedder.time_embedder(embedder.timesteps_proj(timesteps.float())).double().numpy()
    want, margin = teacache_reference(e_NC, VARIANTS["teacache"][1])
    assert margin > MARGIN, f"a decision is within {margin:.2%} of the threshold: pick another threshold"
    assert result(runs("wan13")["teacache"]).cache["skipped"] == want
    # the model came through model.path, recognised as 1.3B-wide: no threshold given is TeaCache's 0.08 for 1.3B
    dit = WanDiT.from_pretrained(folder)
    assert (dit.config.dim, dit.config.num_heads, dit.config.ffn_dim, dit.config.num_layers) == (1536, 12, 8960, 1)
    default = result(runs("wan13")["teacache-default"]).cache
    assert default["threshold"] == 0.08 and default["skipped"] == teacache_reference(e_NC, 0.08)[0]


@pytest.fixture(scope="module")
def tiny_components():
    return load_components(tiny_config().model, device=torch.device("cpu"), encode=True, decode=False)


def fbcache_reference(comp, request: GenerateRequest, threshold: float):
    """First-Block-Cache, written plainly over one process's DiT: every step embeds and runs block 0 for both CFG
    branches; the relative L1 change of block 0's residual against the last computed step's, summed over both
    branches, decides whether the other blocks run (each branch then stores their residual) or each branch adds
    its own cached residual. Warm-up and the last step always compute; at most max_skips in a row. Returns
    (skipped steps, final latents [B, z, F, H, W], smallest relative margin)."""
    dit, steps = comp.dit, request.steps
    spec = POLICIES["fbcache"]
    warmup = max(spec.min_warmup, math.ceil(spec.warmup * steps))
    shape = comp.latent_shape(request.frames, request.height, request.width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed), dtype=torch.float32)
    grid = dit.grid(shape)
    x_BLP = dit.patchify(noise)
    ctx = comp.encode_text([request.prompt, request.negative_prompt])
    sampler = make_sampler(request.sampler, steps, request.shift)
    block0_residual, rest_residual = [None, None], [None, None]
    skipped, in_row, margin = [], 0, math.inf
    for i, t in enumerate(sampler.timesteps.tolist()):
        t_B = torch.full((1,), float(t))
        inputs = [dit.embed(x_BLP, grid, t_B, ctx[b : b + 1]) for b in range(2)]
        after0 = [dit.run_blocks(s, s.x_BLC, 0, 1) for s in inputs]
        r1 = [h - s.x_BLC for h, s in zip(after0, inputs)]
        skip = False
        if block0_residual[0] is not None:
            change = (sum(float((r1[b] - block0_residual[b]).abs().double().mean()) for b in range(2))
                      / sum(float(block0_residual[b].abs().double().mean()) for b in range(2)))
            if not (i < warmup or i == steps - 1 or in_row >= spec.max_skips):
                skip = change < threshold
                margin = min(margin, abs(change - threshold) / threshold)
        v = []
        for b in range(2):
            if skip:
                y_BLC = after0[b] + rest_residual[b]
            else:
                y_BLC = dit.run_blocks(inputs[b], after0[b], 1)
                rest_residual[b], block0_residual[b] = y_BLC - after0[b], r1[b]
            v.append(dit.head_out(inputs[b], y_BLC))
        skipped += [i] if skip else []
        in_row = in_row + 1 if skip else 0
        x_BLP = sampler.step(i, v[1] + request.guidance_scale * (v[0] - v[1]), x_BLP)
    return skipped, dit.unpatchify(x_BLP, grid), margin


@pytest.mark.parametrize("name", ["fbcache", "fbcache-8tokens"])
def test_fbcache_matches_a_plain_first_block_cache_loop(runs, tiny_components, name):
    request = variant(name).resolve(tiny_config())
    with torch.no_grad():
        want, latents, margin = fbcache_reference(tiny_components, request, VARIANTS[name][1])
    assert margin > MARGIN, f"a decision is within {margin:.2%} of the threshold: pick another threshold"
    got = result(runs("tiny")[name])
    assert got.cache["skipped"] == want
    assert rel(got.latents, latents) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# 3. A threshold below every change skips nothing and changes nothing


@pytest.mark.parametrize("model, policy, sp, cfg", NOTHING_CASES)
def test_nothing_skipped_is_cache_off(runs, model, policy, sp, cfg):
    events = runs(model, sp, cfg)[f"{policy}-nothing"]
    cache = result(events).cache
    assert cache["computed_steps"] == STEPS and cache["skipped"] == []
    assert rel(result(events).latents, result(runs(model, sp, cfg)["off"]).latents) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# 4. Ranks that disagree: an error on every rank, never a hang


SMALL = WanDiTConfig(dim=24, ffn_dim=32, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=8, freq_dim=16,
                     text_len=4)
POOL_STEPS = 8


def _gather_rows(vec: torch.Tensor) -> torch.Tensor:
    every = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
    dist.all_gather(every, vec)
    return torch.stack(every)


def _corrupted_run(kind: str, at: int):
    """On every pool rank: an fbcache run of the same small random DiT, the ranks agreeing through one all_gather
    per step; rank 1's cache differs by `kind` from step `at`. Returns (how it ended, step, message or skipped)."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    dit = WanDiT(SMALL).eval()
    grid, tokens = (2, 2, 2), 8
    x_BLP = torch.randn(1, tokens, SMALL.patch_dim)
    ctx = torch.randn(1, SMALL.text_len, SMALL.text_dim)
    policy = "easycache" if rank == 1 and kind == "policy" else "fbcache"
    threshold = 0.25 if rank == 1 and kind == "threshold" else 0.5
    cache = StepCache(policy, threshold, POOL_STEPS, dit.config, branches=1, valid=tokens, agree=_gather_rows)
    with torch.no_grad():
        for step in range(POOL_STEPS):
            told = step
            if rank == 1 and step == at:
                if kind == "step":
                    told = step + 1
                elif kind == "skips":
                    cache.skips_in_row += 1
                elif kind == "computed":
                    cache.computed.append(step)
            t_B = torch.full((1,), 1000.0 * (1 - step / POOL_STEPS))
            try:
                v_BLP = cache.velocities(dit, told, x_BLP, grid, t_B, [ctx])[0]
            except StepCacheMismatch as e:
                return "mismatch", step, str(e)
            x_BLP = x_BLP - v_BLP / POOL_STEPS
    return "done", POOL_STEPS, cache.skipped


@pytest.mark.parametrize("world, kind, at", [(2, "threshold", 0), (2, "policy", 0), (2, "step", 3), (3, "step", 5),
                                             (2, "skips", 4), (2, "computed", 2)])
def test_a_rank_whose_cache_state_differs_fails_every_rank(dist_pools, world, kind, at):
    # 30 s: well before the pool's 60 s collective timeout, so a rank stuck in a collective fails the test
    outcomes = dist_pools(world).run_each(_corrupted_run, kind, at, timeout=30)
    for ok, value in outcomes:
        assert ok, value
        assert value[:2] == ("mismatch", at), value
        assert re.match(r"step cache states differ across the replica.s ranks at step \d+: \[\[", value[2])
        assert "\n" not in value[2]


def test_ranks_that_agree_never_mismatch(dist_pools):
    outcomes = dist_pools(2).run(_corrupted_run, "none", 0, timeout=30)
    assert outcomes[0][0] == "done" and outcomes[0] == outcomes[1]


def test_requests_with_different_cache_settings_are_rejected_by_the_first_collective(runs):
    config = tiny_config(2, 2)
    fb = cached("fbcache", 0.1).resolve(config)
    for changed in (dict(cache_threshold=0.2), dict(cache="easycache"), dict(cache="off", cache_threshold=None)):
        assert dataclasses.replace(fb, **changed).fingerprint() != fb.fingerprint()
    out = runs("tiny", 2, 2)
    for name in ("threshold-differs", "policy-differs"):
        assert [kind for kind, _ in out[name]] == ["RequestRejectedError"] * 4, out[name]
        assert all("ranks received different versions of request" in message for _, message in out[name])
    # the group is intact: the requests after them were served (and gave the same video as on one rank)
    assert result(out["fbcache"]).cache == result(runs("tiny")["fbcache"]).cache


# ---------------------------------------------------------------------------------------------------------------
# 5. Sequential CFG: the conditional and unconditional branches keep their own residuals


def test_sequential_cfg_keeps_a_residual_per_branch(tiny_components):
    comp, threshold = tiny_components, VARIANTS["fbcache"][1]
    dit = comp.dit
    request = variant("fbcache").resolve(tiny_config())
    shape = comp.latent_shape(request.frames, request.height, request.width)
    grid = dit.grid(shape)
    x_BLP = dit.patchify(torch.randn(shape, generator=torch.Generator().manual_seed(request.seed)))
    ctx = comp.encode_text([request.prompt, request.negative_prompt])
    contexts = [ctx[:1], ctx[1:]]
    sampler = make_sampler(request.sampler, STEPS, request.shift)
    cache = StepCache("fbcache", threshold, STEPS, dit.config, branches=2, valid=x_BLP.shape[1],
                      agree=lambda vec: vec[None])
    close = dict(rtol=1e-5, atol=1e-6)
    reused = 0
    with torch.no_grad():
        for i, t in enumerate(sampler.timesteps.tolist()):
            t_B = torch.full((1,), float(t))
            stored = list(cache.residual)
            v = cache.velocities(dit, i, x_BLP, grid, t_B, contexts)
            inputs = [dit.embed(x_BLP, grid, t_B, c) for c in contexts]
            after0 = [dit.run_blocks(s, s.x_BLC, 0, 1) for s in inputs]
            if i in cache.skipped:  # each branch adds its own residual, not the other's
                reused += 1
                for b in range(2):
                    assert torch.allclose(v[b], dit.head_out(inputs[b], after0[b] + stored[b]), **close)
                    assert not torch.allclose(v[b], dit.head_out(inputs[b], after0[b] + stored[1 - b]), **close)
            else:  # each branch stored its own blocks' residual
                for b in range(2):
                    rest = dit.run_blocks(inputs[b], after0[b], 1) - after0[b]
                    assert torch.allclose(cache.residual[b], rest, **close)
                assert not torch.allclose(cache.residual[0], cache.residual[1], **close)
            x_BLP = sampler.step(i, v[1] + request.guidance_scale * (v[0] - v[1]), x_BLP)
    assert reused == len(cache.skipped) > 0


# ---------------------------------------------------------------------------------------------------------------
# 6. Bad settings


@pytest.mark.parametrize("fields, message", [
    (dict(cache="bogus"), r"^(?=.*\bbogus\b).*cache.* one of off, teacache, fbcache, easycache"),
    (dict(cache=1), r"cache must be a string, got int$"),
    (dict(cache="fbcache", cache_threshold=0), r"^cache_threshold must be .*, got 0$"),
    (dict(cache="fbcache", cache_threshold=-1.0), r"^cache_threshold must be .*, got -1\.0$"),
    (dict(cache="easycache", cache_threshold=float("nan")), r"cache_threshold must be a finite number, got nan$"),
    (dict(cache="fbcache", cache_threshold=float("inf")), r"cache_threshold must be a finite number, got inf$"),
    (dict(cache="fbcache", cache_threshold=True), r"cache_threshold must be a finite number, got True$"),
    (dict(cache="fbcache", cache_threshold="0.1"), r"cache_threshold must be a finite number, got '0\.1'$"),
    (dict(cache="fbcache", steps=3), r"cache fbcache cannot skip anything in 3 steps .*: use at least 4 steps"),
    (dict(cache="easycache", steps=2), r"cache easycache cannot skip anything in 2 steps"),
    (dict(cache="teacache", steps=2), r"cache teacache cannot skip anything in 2 steps .*: use at least 3 steps"),
])
def test_bad_cache_settings_are_one_line_value_errors(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        dataclasses.replace(REQUEST, **fields).resolve(tiny_config())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("policy, steps", [("fbcache", 4), ("easycache", 4), ("teacache", 3)])
def test_the_fewest_steps_a_policy_can_skip_in_resolve(policy, steps):
    assert dataclasses.replace(REQUEST, cache=policy, steps=steps).resolve(tiny_config()).cache == policy


def test_teacache_on_a_model_without_coefficients_is_rejected_on_every_rank(runs):
    out = runs("tiny", 2, 2)
    assert [kind for kind, _ in out["teacache-on-tiny"]] == ["RequestRejectedError"] * 4
    for _, message in out["teacache-on-tiny"]:
        assert message == ("cache teacache has coefficients only for Wan2.1 1.3B and 14B, not this model (dim 144); "
                           "use fbcache, easycache")
    assert isinstance(out["teacache-on-tiny-launcher"], RequestRejectedError)
    assert str(out["teacache-on-tiny-launcher"]).startswith("cache teacache has coefficients only for")
    # the group lives on: it served every request after the rejections
    assert result(out["off"]).cache is None and result(out["easycache"]).cache["policy"] == "easycache"
