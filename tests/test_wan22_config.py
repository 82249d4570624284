"""Wan2.2's config: the two presets say what upstream's configs say (Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py,
wan_ti2v_5B.py, shared_config.py and generate.py's default sizes, written out here independently of the YAML), the
new fields are validated, and a request resolves the low-noise expert's guidance and a prompt line may set it."""

from __future__ import annotations

import json

import pytest

from cluster.manifest import read_records, request_changes
from cluster.prompts import read_prompt_file
from configs import ConfigError, list_presets, load_config
from configs.presets import preset_description, preset_path
from pipeline.request import GenerateRequest

UPSTREAM_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                     "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
                     "杂乱的背景，三条腿，背景人很多，倒着走")

# (preset, folder, steps, high-noise guidance, low-noise guidance, shift, (width, height), frames, fps)
UPSTREAM = [
    ("wan2.2-t2v-a14b", "./Wan2.2-T2V-A14B", 40, 4.0, 3.0, 12.0, (1280, 720), 81, 16),
    ("wan2.2-ti2v-5b", "./Wan2.2-TI2V-5B", 50, 5.0, None, 5.0, (1280, 704), 121, 24),
]


@pytest.mark.parametrize("name, path, steps, high, low, shift, size, frames, fps", UPSTREAM)
def test_presets_say_what_upstream_says(name, path, steps, high, low, shift, size, frames, fps):
    c = load_config(name)
    s, v = c.sampling, c.video
    assert c.model.path == path and c.model.boundary_ratio is None and not c.model.offload_idle_expert
    assert (s.steps, s.guidance_scale, s.low_noise_guidance_scale, s.shift) == (steps, high, low, shift)
    assert (s.sampler, s.negative_prompt) == ("unipc", UPSTREAM_NEGATIVE)
    assert ((v.width, v.height), v.frames, v.fps) == (size, frames, fps)
    assert c.runtime.device == "cuda" and c.model.dtype == "auto"
    # what a request made under the preset resolves to: the low-noise expert's guidance, else the high one's
    r = GenerateRequest("a cat", seed=1).resolve(c)
    assert (r.guidance_scale, r.low_noise_guidance_scale) == (high, high if low is None else low)
    text = preset_description(name)
    assert name in list_presets() and text.startswith("Wan2.2 text-to-video") and "upstream defaults" in text


def test_presets_name_their_download_and_the_small_gpu_settings():
    a14b = preset_path("wan2.2-t2v-a14b").read_text(encoding="utf-8")
    ti2v = preset_path("wan2.2-ti2v-5b").read_text(encoding="utf-8")
    assert "hf download Wan-AI/Wan2.2-T2V-A14B --local-dir ./Wan2.2-T2V-A14B" in a14b
    assert "hf download Wan-AI/Wan2.2-TI2V-5B --local-dir ./Wan2.2-TI2V-5B" in ti2v
    assert "24 GB" in a14b and "shard_weights" in a14b and "offload_idle_expert" in a14b
    assert "24 GB" in ti2v and "text_encoder_device: cpu" in ti2v
    # the settings the comments recommend are valid together
    load_config("wan2.2-t2v-a14b", ["parallel.shard_weights=true", "parallel.ulysses_degree=8",
                                    "model.shard_text_encoder=true"])
    load_config("wan2.2-t2v-a14b", ["model.offload_idle_expert=true"])
    load_config("wan2.2-ti2v-5b", ["model.text_encoder_device=cpu"])


@pytest.mark.parametrize("overrides, message", [
    (["model.boundary_ratio=1.0"], r"^model: boundary_ratio must be in \(0, 1\) \(null: the model's own\), got 1\.0$"),
    (["model.boundary_ratio=0"], r"^model: boundary_ratio must be in \(0, 1\)"),
    (["model.boundary_ratio=.nan"], r"^model: boundary_ratio must be a finite number, got nan$"),
    (["sampling.low_noise_guidance_scale=-1"], r"^sampling: low_noise_guidance_scale must be >= 0, got -1\.0$"),
    (["sampling.low_noise_guidance_scale=.inf"], r"^sampling: low_noise_guidance_scale must be a finite number"),
    (["sampling.low_noise_guidance_scale=51"],
     r"^low_noise_guidance_scale 51\.0 is over the limit 50\.0 \(limits\.max_guidance_scale\)$"),
    (["model.offload_idle_expert=true", "parallel.shard_weights=true", "parallel.ulysses_degree=2"],
     r"^model\.offload_idle_expert parks one whole expert in CPU memory, but parallel\.shard_weights shards both "
     r"experts over the replica instead: choose one$"),
    (["parallel.cfg_degree=2", "sampling.low_noise_guidance_scale=1.0"],
     r"^parallel\.cfg_degree=2 needs classifier-free guidance, but sampling\.low_noise_guidance_scale is 1\.0 \(off\)$"),
    (["parallel.cfg_degree=2", "sampling.guidance_scale=1.0"],
     r"^parallel\.cfg_degree=2 needs classifier-free guidance, but sampling\.guidance_scale is 1\.0 \(off\)$"),
])
def test_new_fields_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("wan2.2-t2v-a14b", overrides)


def test_new_fields_accept_their_range():
    c = load_config("wan2.2-t2v-a14b", ["model.boundary_ratio=0.9", "sampling.low_noise_guidance_scale=0",
                                        "parallel.cfg_degree=2", "model.offload_idle_expert=true"])
    assert (c.model.boundary_ratio, c.sampling.low_noise_guidance_scale, c.model.offload_idle_expert) == (0.9, 0.0, True)


def test_request_resolves_the_low_noise_guidance():
    a14b, tiny = load_config("wan2.2-t2v-a14b"), load_config("tiny", ["sampling.guidance_scale=6"])
    # request value, else the config's, else the resolved guidance_scale
    assert GenerateRequest("x", seed=1, low_noise_guidance_scale=2).resolve(a14b).low_noise_guidance_scale == 2.0
    assert GenerateRequest("x", seed=1, guidance_scale=7).resolve(a14b).low_noise_guidance_scale == 3.0
    assert GenerateRequest("x", seed=1, guidance_scale=7).resolve(tiny).low_noise_guidance_scale == 7.0
    r = GenerateRequest("x", seed=1).resolve(tiny)
    assert r.low_noise_guidance_scale == 6.0 and isinstance(r.low_noise_guidance_scale, float)
    r.validate(tiny)  # resolving again changes nothing
    for bad, message in ((True, "must be a finite number"), ("3", "must be a finite number"),
                         (float("nan"), "must be a finite number"), (-1.0, "must be >= 0"),
                         (60.0, r"over the limit 50\.0 \(limits\.max_guidance_scale\)")):
        with pytest.raises(ValueError, match=message):
            GenerateRequest("x", seed=1, low_noise_guidance_scale=bad).resolve(a14b)
    cfg2 = load_config("wan2.2-t2v-a14b", ["parallel.cfg_degree=2"])
    with pytest.raises(ValueError, match=r"turns guidance off for the low-noise expert's steps$"):
        GenerateRequest("x", seed=1, low_noise_guidance_scale=1.0).resolve(cfg2)
    with pytest.raises(ValueError, match=r"turns guidance off$"):
        GenerateRequest("x", seed=1, guidance_scale=1.0).resolve(cfg2)


def test_a_prompt_line_sets_it_and_resume_compares_it(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "low_noise_guidance_scale": 2.5}) + "\n"
                       + json.dumps({"prompt": "a dog", "low_noise_guidance_scale": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: 'low_noise_guidance_scale' has the wrong type"):
        read_prompt_file(prompts)
    prompts.write_text(json.dumps({"prompt": "a cat", "low_noise_guidance_scale": 2.5}) + "\n")
    (spec,) = read_prompt_file(prompts)
    config = load_config("wan2.2-t2v-a14b")
    request = GenerateRequest(spec.prompt, seed=3, **spec.overrides).resolve(config)
    assert request.low_noise_guidance_scale == 2.5

    import dataclasses

    def record(req):
        return {"output": "0000-a-cat.mp4", "prompt": req.prompt, "request": dataclasses.asdict(req),
                "config": {"model": {"path": config.model.path, "dtype": "auto"}, "parallel": {"fp8_comm": False}}}

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps(record(request)) + "\n")
    made = read_records(manifest)["0000-a-cat.mp4"]
    assert request_changes(made, request, config) == []
    other = dataclasses.replace(request, low_noise_guidance_scale=3.0)
    assert request_changes(made, other, config) == ["low_noise_guidance_scale 2.5 -> 3.0"]
    # a record written before two-expert models: its guidance was every step's
    old = record(dataclasses.replace(request, low_noise_guidance_scale=4.0))
    del old["request"]["low_noise_guidance_scale"]
    manifest.write_text(json.dumps(old) + "\n")
    made = read_records(manifest)["0000-a-cat.mp4"]
    assert request_changes(made, dataclasses.replace(request, low_noise_guidance_scale=4.0), config) == []
    assert request_changes(made, request, config) == ["low_noise_guidance_scale 4.0 -> 2.5"]
