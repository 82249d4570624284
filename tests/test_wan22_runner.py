"""The Runner on Wan2.2 models (issue #17): the two-expert T2V-A14B and the 48-channel TI2V-5B DiT.

Models are tiny random diffusers DiTs (the same config, different seeds for the two experts), built in memory into
Components (the loading of both layouts is tests/test_wan22_loading.py's subject) with a fixed table of text
embeddings as the encoder, so diffusers' WanPipeline can be fed the very same prompt_embeds, noise and schedule.
Every Runner runs on the session's gloo pools (tests/dist_pool.py), fp32.

Legend: B batch (1), L tokens, P patch vector, C model dim.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from configs import load_config
from pipeline.experts import ExpertSwitch
from pipeline.request import Frame, GenerateRequest, Preview, Progress, RequestRejectedError, Result
from pipeline.samplers import make_sampler
from pipeline.step_cache import check_cache

TEXT_LEN, TEXT_DIM = 32, 24  # 32 text tokens instead of 512: the cross-attention is not the point here
BOUNDARY = 0.875  # T2V-A14B's: unipc at 10 steps, shift 5 gives 5 high-noise steps (999 ... 882) and 5 low
PROMPT, NEGATIVE = "a red circle moving right", "blurry"
REQUEST = GenerateRequest(PROMPT, seed=1234, negative_prompt=NEGATIVE)


def embeddings() -> dict[str, torch.Tensor]:
    """prompt -> [TEXT_LEN, TEXT_DIM]: the 'text encoder' (the same on every process: seeded)."""
    g = torch.Generator().manual_seed(17)
    table = {p: torch.randn(TEXT_LEN, TEXT_DIM, generator=g) for p in (PROMPT, NEGATIVE)}
    for p in table.values():
        p[20:] = 0  # padded like umt5's output past the prompt's tokens
    return table


class TableEncoder:
    dim = TEXT_DIM

    def __init__(self):
        self.table = embeddings()
        self.model = torch.nn.Module()  # no weights (memory rows count a text encoder's .model)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self.table[p] for p in prompts])

    def to(self, device):
        return self


class BlankDecoder(torch.nn.Module):
    """Black frames of the right count and size (the TI2V-5B runs compare latents; its VAE is test_vae22.py's)."""

    def __init__(self, temporal_stride: int, spatial_stride: int):
        super().__init__()
        self.ts, self.ss = temporal_stride, spatial_stride

    def decode_stream(self, latents):
        _, _, t, h, w = latents.shape
        for _ in range((t - 1) * self.ts + 1):
            yield np.zeros((h * self.ss, w * self.ss, 3), np.uint8)


def save_diffusers_dit(model, folder):
    from tests.tiny_models import save_dit

    save_dit(model, folder, "diffusers")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "text_len": TEXT_LEN}))
    return folder


def twin(high, low):
    """The low-noise expert with the high-noise one's embeddings and block 0: a step cache's probes (block 0's
    residual, the embedded input) cannot tell the two apart, only the blocks after them differ."""
    from tests.tiny_models import diffusers_dit

    model = diffusers_dit(0, text_dim=TEXT_DIM)
    shared = ("patch_embedding.", "condition_embedder.", "blocks.0.")
    model.load_state_dict({k: (high if k.startswith(shared) else low).state_dict()[k] for k in low.state_dict()})
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{'high', 'low', 'twin', 'dit48': diffusers DiTs, 'folder': where they and the Wan2.1 VAE are saved}."""
    from tests.tiny_models import diffusers_dit, diffusers_vae, save_vae

    folder = tmp_path_factory.mktemp("wan22")
    out = {"high": diffusers_dit(1, text_dim=TEXT_DIM), "low": diffusers_dit(2, text_dim=TEXT_DIM),
           "dit48": diffusers_dit(3, text_dim=TEXT_DIM, in_channels=48, out_channels=48), "folder": folder}
    out["twin"] = twin(out["high"], out["low"])
    for name in ("high", "low", "twin", "dit48"):
        save_diffusers_dit(out[name], folder / name)
    save_vae(diffusers_vae(0), folder, "pipeline")
    return out


def components(folder, model: str, rank: int, boundary: float = BOUNDARY):
    """This rank's Components: 'a14b' (two experts, Wan2.1 VAE), 'a14b-twin' (the low-noise expert is `twin`'s),
    'a14b-one' (the high-noise expert alone) or 'ti2v' (one 48-channel DiT, 16x / 4x)."""
    from pipeline.components import Components
    from pipeline.dit import WanDiT
    from pipeline.vae import WanVAEDecoder

    encoder = TableEncoder() if rank == 0 else None
    if model == "ti2v":
        dit = WanDiT.from_pretrained(folder / "dit48", dtype=torch.float32)
        return Components(dit, encoder, BlankDecoder(4, 16) if rank == 0 else None, 48, 4, 16)
    high = WanDiT.from_pretrained(folder / "high", dtype=torch.float32)
    if model == "a14b-one":  # the high-noise expert alone
        return Components(high, encoder, None, 16, 4, 8)
    low = WanDiT.from_pretrained(folder / ("twin" if model == "a14b-twin" else "low"), dtype=torch.float32)
    decoder = WanVAEDecoder.from_pretrained(folder, dtype=torch.float32) if rank == 0 else None
    return Components(high, encoder, decoder, 16, 4, 8, dit_low=low, boundary_ratio=boundary)


def config(cfg=1, sp=1, **extra):
    overrides = ["video.height=32", "video.width=48", "video.frames=9", "sampling.steps=10", "sampling.shift=5.0",
                 "sampling.guidance_scale=4.0", "sampling.low_noise_guidance_scale=3.0", "runtime.device=cpu",
                 "runtime.collective_timeout_s=60", f"parallel.cfg_degree={cfg}", f"parallel.ulysses_degree={sp}"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


# ---------------------------------------------------------------------------------------------------------------
# Serving on the pools


def _serve(cfg, folder, model, requests, trace=False, swap=False, boundary=BOUNDARY):
    """On every rank of a pool: a Runner with these Components serves `requests`; rank 0 returns per request its
    events (or (error type, message)), with trace=True also per denoising step the experts whose whole block stack
    ran (one entry per CFG pass; none on a skipped step), and with swap=True the expert moves of each request (an
    ExpertSwitch offloading on the CPU)."""
    import torch.distributed as dist

    from tests import pool_runner as pr

    rank = dist.get_rank()
    try:
        runner = pr.pool_runner(cfg, return_latents=True)
        comp = components(folder, model, rank, boundary)
        runner.use_components(comp)
        calls = []
        if trace:
            for index, dit in enumerate(comp.experts()):
                run_blocks = dit.run_blocks

                def traced(s, x, start=0, stop=None, _run=run_blocks, _index=index):
                    if stop is None:  # the rest of the stack: a computed step (a probe stops early)
                        calls.append(_index)
                    return _run(s, x, start, stop)

                dit.run_blocks = traced
        if swap:
            runner.experts = ExpertSwitch(comp.experts(), runner.device, offload=True, synchronize=lambda: None)
        out = []
        for request in requests:
            events, steps, moves = [], [], None
            try:
                for event in runner.generate(request.resolve(cfg)):
                    events.append(event)
                    if isinstance(event, Progress) and event.stage == "denoise":
                        steps.append(list(calls) if trace else None)
                        calls.clear()
                moves = list(runner.experts.moves)
            except (RequestRejectedError, ValueError) as e:
                events = (type(e).__name__, str(e))
            out.append({"events": events, "steps": steps, "moves": moves})
    finally:
        pr._RUNNERS.pop(repr(cfg), None)  # not close(): that would end the pool's own group
    return out if rank == 0 else None


def serve(pools, cfg, folder, model, requests, **options):
    return pools(cfg.parallel.group_size).run(_serve, cfg, folder, model, requests, **options)[0]


def latents(served) -> torch.Tensor:
    return served["events"][-1].latents


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------------------
# The reference: diffusers' WanPipeline


def diffusers_latents(transformer, cfg, request, *, transformer_2=None, boundary_ratio=None, expand_timesteps=False,
                      vae=None, guidance_scale_2=None):
    from diffusers import WanPipeline

    from tests.test_samplers import diffusers_scheduler

    r = request.resolve(cfg)
    if vae is None:
        from tests.tiny_models import diffusers_vae

        vae = diffusers_vae(0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=diffusers_scheduler(r.sampler, r.shift),
                       transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio,
                       expand_timesteps=expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    z = transformer.config.in_channels
    ts, ss = (4, 16) if z == 48 else (4, 8)
    shape = (1, z, (r.frames - 1) // ts + 1, r.height // ss, r.width // ss)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(r.seed), dtype=torch.float32)
    table = embeddings()
    with torch.no_grad():
        return pipe(prompt_embeds=table[r.prompt][None], negative_prompt_embeds=table[r.negative_prompt][None],
                    latents=noise, num_inference_steps=r.steps, guidance_scale=r.guidance_scale,
                    guidance_scale_2=guidance_scale_2, height=r.height, width=r.width, num_frames=r.frames,
                    output_type="latent", return_dict=False)[0]


def experts_by_step(cfg, request, boundary=BOUNDARY) -> list[int]:
    """Which expert each step uses, by diffusers' rule written out here: t >= boundary * 1000 -> the high-noise."""
    r = request.resolve(cfg)
    return [0 if t >= boundary * 1000 else 1 for t in make_sampler(r.sampler, r.steps, r.shift).timesteps.tolist()]


# ---------------------------------------------------------------------------------------------------------------
# Two experts against diffusers

A14B_REQUESTS = {"unipc": REQUEST, "euler": dataclasses.replace(REQUEST, sampler="euler"),
                 "low-off": dataclasses.replace(REQUEST, low_noise_guidance_scale=1.0)}


@pytest.fixture(scope="module")
def a14b(dist_pools, models):
    """name -> rank 0's served request at SP=1 (sequential CFG), all three on one Runner."""
    served = serve(dist_pools, config(), models["folder"], "a14b", list(A14B_REQUESTS.values()), trace=True)
    return dict(zip(A14B_REQUESTS, served))


@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_two_experts_match_diffusers(a14b, models, name):
    """WanPipeline(transformer=high, transformer_2=low, boundary_ratio) with guidance_scale / guidance_scale_2: the
    same final latents (fp32, <= 1e-4 relative); both experts ran several steps, each step the expert the boundary
    rule names, both CFG passes (the trace records which DiT's block stack ran, once per pass)."""
    cfg, request = config(), A14B_REQUESTS[name]
    want = diffusers_latents(models["high"], cfg, request, transformer_2=models["low"], boundary_ratio=BOUNDARY,
                             guidance_scale_2=3.0)
    served = a14b[name]
    assert rel(latents(served), want) <= 1e-4, rel(latents(served), want)
    by_step = experts_by_step(cfg, request)
    assert 3 <= by_step.count(0) and 3 <= by_step.count(1), by_step
    assert served["steps"] == [[e, e] for e in by_step]
    # the low-noise expert's own guidance mattered: 4.0 everywhere is another video
    same = diffusers_latents(models["high"], cfg, request, transformer_2=models["low"], boundary_ratio=BOUNDARY,
                             guidance_scale_2=4.0)
    assert rel(latents(served), same) > 1e-3


def test_low_noise_guidance_off_runs_the_conditional_pass_only(a14b, models):
    """low_noise_guidance_scale 1.0: the low-noise steps run one pass (diffusers still runs both and combines them
    with 1.0: the same latents within float rounding)."""
    cfg, request = config(), A14B_REQUESTS["low-off"]
    want = diffusers_latents(models["high"], cfg, request, transformer_2=models["low"], boundary_ratio=BOUNDARY,
                             guidance_scale_2=1.0)
    assert rel(latents(a14b["low-off"]), want) <= 1e-4
    assert a14b["low-off"]["steps"] == [[0, 0] if e == 0 else [1] for e in experts_by_step(cfg, request)]


def test_guidance_on_for_the_low_noise_expert_only(dist_pools, models):
    """guidance_scale 1.0 with low_noise_guidance_scale 3.0: the context still has both rows; the high-noise steps
    run the conditional pass only, the low-noise ones are guided. diffusers skips guidance everywhere when
    guidance_scale <= 1, so the reference is the two diffusers transformers in a loop written out here."""
    from tests.test_samplers import diffusers_scheduler

    cfg = config()
    request = dataclasses.replace(REQUEST, guidance_scale=1.0, low_noise_guidance_scale=3.0, steps=6)
    served = serve(dist_pools, cfg, models["folder"], "a14b", [request], trace=True)[0]
    r = request.resolve(cfg)
    scheduler = diffusers_scheduler(r.sampler, r.shift)
    scheduler.set_timesteps(r.steps)
    table = embeddings()
    cond, uncond = table[PROMPT][None], table[NEGATIVE][None]
    x = torch.randn((1, 16, 3, 4, 6), generator=torch.Generator().manual_seed(r.seed))
    with torch.no_grad():
        for t in scheduler.timesteps:
            high = t >= BOUNDARY * 1000
            model = models["high"] if high else models["low"]
            v = model(x, t.expand(1), cond, return_dict=False)[0]
            if not high:
                v_u = model(x, t.expand(1), uncond, return_dict=False)[0]
                v = v_u + 3.0 * (v - v_u)
            x = scheduler.step(v, t, x, return_dict=False)[0]
    assert rel(latents(served), x) <= 1e-4
    assert served["steps"] == [[0] if e == 0 else [1, 1] for e in experts_by_step(cfg, request)]


def test_memory_rows_count_both_experts(a14b, models):
    """Result.memory's param_bytes on rank 0: both experts, the decoder (and the weightless test encoder)."""
    comp = components(models["folder"], "a14b", 0)
    want = sum(t.numel() * t.element_size() for m in (comp.dit, comp.dit_low, comp.decoder)
               for t in (*m.parameters(), *m.buffers()))
    assert a14b["unipc"]["events"][-1].memory["param_bytes"] == [want]


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_memory_rows_count_what_is_on_the_ranks_device(monkeypatch, device):
    """With the idle expert parked in host memory, a GPU rank's param_bytes is what its peak can contain: the
    expert and the decoder on its device (the 'GPU' here the meta device), not the parked expert nor an encoder
    on the CPU; on a CPU rank every weight."""
    from types import SimpleNamespace

    import pipeline.runner as runner_module
    from pipeline.components import Components
    from pipeline.runner import Runner

    monkeypatch.setattr(runner_module, "peak_memory_bytes", lambda device, since_reset: 7)
    on = torch.device(device)
    high, decoder = torch.nn.Linear(8, 8, device=on), torch.nn.Linear(4, 2, device=on)  # 288 and 40 bytes
    low, encoder = torch.nn.Linear(8, 8), torch.nn.Linear(16, 16)  # host memory: 288 and 1088 bytes
    runner = Runner.__new__(Runner)
    runner.device, runner._peak_reset = on, True
    runner.components = Components(high, SimpleNamespace(model=encoder),  # a WanTextEncoder counts its .model
                                   decoder, 16, 4, 8, dit_low=low, boundary_ratio=0.875)
    assert runner._memory_row() == ([288 + 40, 7] if device == "meta" else [288 + 288 + 1088 + 40, 7])


def test_previews_across_the_switch_with_swapping_experts_at_sp2(dist_pools, models, a14b):
    """Previews every 2 steps (before, at and after the switch) at SP=2 with the experts swapping: each is an image,
    the moves are one per request, and the latents are the one-rank resident run's."""
    served = serve(dist_pools, config(sp=2, **{"sampling.preview_every": 2}), models["folder"], "a14b", [REQUEST],
                   swap=True)[0]
    previews = [e for e in served["events"] if isinstance(e, Preview)]
    assert [p.step for p in previews] == [2, 4, 6, 8]
    assert all(p.image.dtype == np.uint8 and p.image.ndim == 3 and p.image.std() > 0 for p in previews)
    assert served["moves"] == [(0, 1)]
    assert rel(latents(served), latents(a14b["unipc"])) <= 1e-4


def _use(cfg, folder, models_by_rank):
    """On every pool rank: a Runner takes this rank's Components (models_by_rank[rank]); None when it did."""
    import torch.distributed as dist

    from tests import pool_runner as pr

    try:
        pr.pool_runner(cfg).use_components(components(folder, models_by_rank[dist.get_rank()], dist.get_rank()))
    finally:
        pr._RUNNERS.pop(repr(cfg), None)


def test_ranks_that_loaded_different_experts_are_refused(dist_pools, models):
    """The load check covers both experts: a rank holding one DiT where rank 0 holds two is the same one-line
    ValueError on every rank, before any collective uses the weights."""
    out = dist_pools(2).run_each(_use, config(sp=2), models["folder"], ["a14b", "a14b-one"])
    assert [ok for ok, _ in out] == [False, False]
    for _, (kind, message, _) in out:
        assert kind == "ValueError" and message.startswith("ranks [1] loaded a different DiT than rank 0"), message


def test_sp2_and_cfg_parallel_equal_one_rank(dist_pools, models, a14b):
    """Ulysses over 2 ranks (both experts sharded the same way) and CFG-parallel (each half one branch, across the
    switch) give the one-rank latents and frames."""
    base = a14b["unipc"]
    for cfg in (config(sp=2), config(cfg=2)):
        served = serve(dist_pools, cfg, models["folder"], "a14b", [REQUEST])[0]
        assert rel(latents(served), latents(base)) <= 1e-4, cfg.parallel
        got = np.stack([e.image for e in served["events"] if isinstance(e, Frame)]).astype(int)
        want = np.stack([e.image for e in base["events"] if isinstance(e, Frame)]).astype(int)
        assert got.shape == (9, 32, 48, 3) and np.abs(got - want).max() <= 1


def test_cfg_parallel_refuses_an_unguided_expert_and_serves_on(dist_pools, models):
    """A CFG-parallel replica needs guidance on both experts' steps: either scale at 1.0 is rejected on every rank
    before anything runs, naming which; the next request is served."""
    cfg = config(cfg=2)
    bad = [dataclasses.replace(REQUEST, low_noise_guidance_scale=1.0), dataclasses.replace(REQUEST, guidance_scale=1.0)]
    # resolve() refuses these under this config already: the Runner is handed them resolved under a CFG=1 config
    one = config()
    served = dist_pools(2).run(_serve_resolved, cfg, models["folder"], [r.resolve(one) for r in bad] + [REQUEST])[0]
    assert served[0] == ("RequestRejectedError", "CFG-parallel replica (cfg_degree=2) got a request with guidance "
                                                 "off (low_noise_guidance_scale 1.0)")
    assert served[1] == ("RequestRejectedError", "CFG-parallel replica (cfg_degree=2) got a request with guidance "
                                                 "off (guidance_scale 1.0)")
    assert isinstance(served[2], Result)


def _serve_resolved(cfg, folder, requests):
    """On every pool rank: the requests as given (resolved elsewhere); rank 0's Result or (error type, message)."""
    import torch.distributed as dist

    from tests import pool_runner as pr

    try:
        runner = pr.pool_runner(cfg)
        runner.use_components(components(folder, "a14b", dist.get_rank()))
        out = []
        for request in requests:
            try:
                out.append(list(runner.generate(request if request.is_resolved else request.resolve(cfg)))[-1])
            except RequestRejectedError as e:
                out.append((type(e).__name__, str(e)))
    finally:
        pr._RUNNERS.pop(repr(cfg), None)
    return out if dist.get_rank() == 0 else None


# ---------------------------------------------------------------------------------------------------------------
# TI2V-5B: one 48-channel DiT


def test_ti2v_48_channel_dit_matches_diffusers(dist_pools, models):
    """A 48-channel DiT (16x spatial, 4x temporal latents) through the Runner equals WanPipeline(expand_timesteps=
    True) (per-token timesteps, all equal for text-to-video); a low_noise_guidance_scale of its own is refused (one
    DiT) and the Runner serves on."""
    from tests.tiny_models import diffusers_vae22

    cfg = config(**{"video.height": 64, "video.width": 64, "sampling.low_noise_guidance_scale": "null"})
    request = dataclasses.replace(REQUEST, steps=6)
    refused = dataclasses.replace(request, low_noise_guidance_scale=2.0)
    served = serve(dist_pools, cfg, models["folder"], "ti2v", [request, refused, request])
    want = diffusers_latents(models["dit48"], cfg, request, expand_timesteps=True, vae=diffusers_vae22(0))
    assert want.shape == (1, 48, 3, 4, 4) and latents(served[0]).shape == want.shape
    assert rel(latents(served[0]), want) <= 1e-4
    name, message = served[1]["events"]
    assert name == "RequestRejectedError" and message.startswith(
        "low_noise_guidance_scale applies to two-expert models (Wan2.2 T2V-A14B); this model has one DiT")
    assert torch.equal(latents(served[2]), latents(served[0]))


# ---------------------------------------------------------------------------------------------------------------
# Step caching across the switch


def test_teacache_is_refused_for_two_experts(dist_pools, models):
    with pytest.raises(ValueError, match=r"^cache teacache has no coefficients for two-expert models \(Wan2.2 "
                                         r"T2V-A14B\); use fbcache, easycache$"):
        check_cache("teacache", None, 20, experts=2)
    check_cache("teacache", None, 20, experts=1)  # a Wan2.1 shape is decided by the DiT config, not here
    served = serve(dist_pools, config(), models["folder"], "a14b",
                   [dataclasses.replace(REQUEST, cache="teacache", steps=12), REQUEST])
    assert served[0]["events"] == ("RequestRejectedError", "cache teacache has no coefficients for two-expert "
                                                           "models (Wan2.2 T2V-A14B); use fbcache, easycache")
    assert isinstance(served[1]["events"][-1], Result)


CACHE_STEPS = 12  # unipc, shift 5: t = 999 982 961 937 | 909 875 ...; a boundary of 0.92 switches at step 4
CACHE_BOUNDARY = 0.92


@pytest.mark.parametrize("policy", ["fbcache", "easycache"])
@pytest.mark.parametrize("model", ["a14b", "a14b-twin"])
def test_step_cache_never_reuses_a_residual_across_the_switch(dist_pools, models, policy, model):
    """With a threshold that skips whatever the policy allows (warm-up 3 steps, at most 3 skips in a row), the
    high-noise expert is skipping when the switch comes; the first low-noise step computes with the low-noise
    expert's blocks even when the policy's probes see no change at the switch (a14b-twin: the experts share the
    embeddings and block 0, so only the fresh state at the switch makes it compute), and the cache then skips within
    that expert again. Result.cache counts the computed steps the trace saw; the video stays close to the uncached
    one."""
    cfg = config(**{"sampling.steps": CACHE_STEPS})
    cached = dataclasses.replace(REQUEST, cache=policy, cache_threshold=1.0)
    served_cached, served_plain = serve(dist_pools, cfg, models["folder"], model, [cached, REQUEST], trace=True,
                                        boundary=CACHE_BOUNDARY)
    by_step = experts_by_step(cfg, REQUEST, CACHE_BOUNDARY)
    switch = by_step.index(1)
    assert switch == 4 and by_step[switch - 1] == 0
    computed = [i for i, step in enumerate(served_cached["steps"]) if step]
    # the first low-noise step ran the low-noise expert's blocks (both CFG passes)
    assert served_cached["steps"][switch] == [1, 1]
    assert all(served_cached["steps"][i] in ([], [by_step[i]] * 2) for i in range(CACHE_STEPS))
    summary = served_cached["events"][-1].cache
    assert summary["computed_steps"] == len(computed) and summary["skipped"] == [
        i for i in range(CACHE_STEPS) if i not in computed]
    assert switch - 1 in summary["skipped"], summary  # the high-noise expert was skipping when the switch came
    assert any(i > switch for i in summary["skipped"]), summary  # and the low-noise one skips too
    # measured: fbcache 0.5%, easycache 0.6% (a14b)
    assert rel(latents(served_cached), latents(served_plain)) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# model.offload_idle_expert: the moves


def test_expert_switch_moves_once_each_way_per_request():
    """Two experts of the same shapes, the 'device' the CPU: use(1) swaps them (the arriving expert's tensors are
    new device tensors with its own values, the leaving one's go into the arriving one's former host buffers: no
    host memory is allocated), the copies are waited for once per swap, nothing moves while the expert stays the
    same, the next request moves the high-noise one back first, and a second swap the same way within one request
    is an invariant broken."""
    torch.manual_seed(0)
    high, low = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)), torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    values = [[p.detach().clone() for p in m.parameters()] for m in (high, low)]
    homes = [p.data_ptr() for p in low.parameters()]
    synced = []
    switch = ExpertSwitch([high, low], torch.device("cpu"), offload=True, synchronize=lambda: synced.append(1))

    def check_values():
        for m, want in zip((high, low), values):
            assert all(torch.equal(p, w) for p, w in zip(m.parameters(), want))

    switch.begin_request()
    assert switch.use(0) is high and switch.moves == [] and synced == []
    assert switch.use(1) is low and switch.moves == [(0, 1)] and len(synced) == 1
    assert [p.data_ptr() for p in high.parameters()] == homes  # the leaving expert took the arriving one's buffers
    assert not set(p.data_ptr() for p in low.parameters()) & set(homes)
    check_values()
    assert switch.use(1) is low and switch.moves == [(0, 1)] and len(synced) == 1
    switch.begin_request()
    assert switch.use(0) is high and switch.use(1) is low
    assert switch.moves == [(1, 0), (0, 1)] and switch.swaps == 3 and len(synced) == 3
    check_values()
    with pytest.raises(AssertionError, match=r"expert swap \(1, 0\) twice in one request"):
        switch.use(0)

    still = ExpertSwitch([high, low], torch.device("cpu"), offload=False, synchronize=lambda: synced.append(1))
    ptrs = [p.data_ptr() for m in (high, low) for p in m.parameters()]
    still.begin_request()
    assert still.use(1) is low and still.use(0) is high and still.moves == [] and len(synced) == 3
    assert [p.data_ptr() for m in (high, low) for p in m.parameters()] == ptrs


def _two_experts():
    torch.manual_seed(0)
    high, low = (torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)) for _ in range(2))
    return high, low, [[p.detach().clone() for p in m.parameters()] for m in (high, low)]


@pytest.mark.parametrize("fail", [("empty_like", 1), ("empty_like", 3), ("copy_", 1), ("copy_", 4), ("copy_", 6),
                                  ("synchronize", 1)])
def test_a_failed_swap_is_undone(monkeypatch, fail):
    """A swap that fails partway (the device out of memory for the 1st or 3rd of 4 tensors, a failed copy into
    the device or into a pinned home, which may leave that home half written, or the final wait) raises that
    error and trades back what it had exchanged: both experts whole with their values, the leaving one still
    resident (device tensors, not in the host buffers), the idle one in its own pinned homes; the next use()
    swaps normally."""
    high, low, values = _two_experts()
    homes = {p.data_ptr() for p in low.parameters()}
    what, at = fail
    calls = [0]

    def failing(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == at:
                if what == "copy_":  # a copy that fails after writing part of its destination
                    args[0].view(-1)[:1] = float("nan")
                raise torch.OutOfMemoryError(f"simulated failure of {what} call {at}")
            return real(*args, **kwargs)
        return call

    synced = []
    switch = ExpertSwitch([high, low], torch.device("cpu"), offload=True,
                          synchronize=failing(lambda: synced.append(1)) if what == "synchronize" else None)
    if what != "synchronize":
        monkeypatch.setattr(torch.Tensor if what == "copy_" else torch, what, failing(getattr(
            torch.Tensor if what == "copy_" else torch, what)))
    switch.begin_request()
    with pytest.raises(torch.OutOfMemoryError, match=f"simulated failure of {what} call {at}"):
        switch.use(1)
    monkeypatch.undo()
    assert switch.resident == 0 and switch.moves == [] and switch.swaps == 0 and switch.broken is None
    assert not {p.data_ptr() for p in high.parameters()} & homes
    assert {p.data_ptr() for p in low.parameters()} == homes
    for m, want in zip((high, low), values):
        assert all(torch.equal(p, w) for p, w in zip(m.parameters(), want))
    switch.synchronize = lambda: None
    assert switch.use(1) is low and switch.moves == [(0, 1)] and switch.resident == 1
    assert {p.data_ptr() for p in high.parameters()} == homes
    for m, want in zip((high, low), values):
        assert all(torch.equal(p, w) for p, w in zip(m.parameters(), want))


def test_a_swap_that_cannot_be_undone_breaks_the_switch(monkeypatch):
    """When undoing a failed swap fails too (every copy fails once the wait has), the swap's own error is raised
    (noting the second) and every later use(), either expert, raises one RuntimeError asking for a rebuild."""
    high, low, _ = _two_experts()

    def no_copy(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    def failed_wait():
        monkeypatch.setattr(torch.Tensor, "copy_", no_copy)
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated wait)")

    switch = ExpertSwitch([high, low], torch.device("cpu"), offload=True, synchronize=failed_wait)
    switch.begin_request()
    with pytest.raises(RuntimeError, match=r"\(simulated wait\)\nundoing the expert swap failed too: RuntimeError: "
                                           r".*\(simulated\)$"):  # the message, then its note
        switch.use(1)
    monkeypatch.undo()
    for index in (0, 1):
        with pytest.raises(RuntimeError, match=r"^the experts are unusable: swapping expert 0 out for expert 1 "
                                               r"failed \(RuntimeError: .*\(simulated wait\)\) and undoing it "
                                               r"failed too \(RuntimeError: .*\(simulated\)\); this replica must "
                                               r"be rebuilt$"):
            switch.use(index)


def test_offloading_runner_swaps_at_the_switch_and_back_for_the_next_request(dist_pools, models, a14b):
    """The Runner with an offloading ExpertSwitch (the 'device' the CPU): one move to the low-noise expert per
    request, the next request first moves the high-noise one back, and the latents are those of the resident run
    (not bit-equal: the loaded weights sit at unaligned addresses, the swapped-in copies at aligned ones, and the
    CPU's matmul kernels round differently for the two: ~1e-6)."""
    served = serve(dist_pools, config(), models["folder"], "a14b", [REQUEST, REQUEST], swap=True)
    assert [s["moves"] for s in served] == [[(0, 1)], [(1, 0), (0, 1)]]
    for s in served:
        assert rel(latents(s), latents(a14b["unipc"])) <= 1e-5


@pytest.mark.parametrize("device, two, offload, moves, note", [
    ("cuda", True, True, True, None),
    ("cpu", True, True, False, "a CPU rank keeps both experts in host memory already"),
    ("cuda", False, True, False, "this model has one DiT"),
    ("cuda", True, False, False, None)])
def test_only_a_gpu_rank_with_two_experts_offloads(monkeypatch, caplog, device, two, offload, moves, note):
    """use_components: sequence parallelism on every expert; the idle expert moves only with
    model.offload_idle_expert on a GPU rank and two experts, anything else says once why nothing moves (no GPU
    needed: the device is only a torch.device here, and nothing is swapped)."""
    import logging
    from types import SimpleNamespace

    import pipeline.runner as runner_module
    from pipeline.components import Components
    from pipeline.runner import Runner

    applied = []
    monkeypatch.setattr(runner_module, "apply_sequence_parallel", lambda dit, *a, **k: applied.append(dit))
    runner = Runner.__new__(Runner)
    runner.config = config(**{"model.offload_idle_expert": str(offload).lower()})
    runner.rank, runner.world_size, runner.device = 0, 1, torch.device(device)
    runner.mesh = SimpleNamespace(ulysses_group=None, ring_group=None, sp_group=None)
    high, low = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    comp = Components(high, None, None, 16, 4, 8, dit_low=low if two else None, boundary_ratio=0.875 if two else None)
    with caplog.at_level(logging.INFO, logger="pipeline.runner"):
        runner.use_components(comp)
    assert applied == comp.experts() and runner.experts.experts == comp.experts()
    assert runner.experts.offload is moves
    said = [r.getMessage() for r in caplog.records if "offload_idle_expert" in r.getMessage()]
    assert said == ([f"model.offload_idle_expert: nothing to offload ({note})"] if note else [])
