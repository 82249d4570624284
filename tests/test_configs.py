from __future__ import annotations

import dataclasses

import pytest

from configs import (ConfigError, OdysseyConfig, field_docs, from_dict, list_presets, load_config, to_dict)


def test_defaults_round_trip():
    cfg = load_config()
    assert cfg == OdysseyConfig()
    assert from_dict(OdysseyConfig, to_dict(cfg)) == cfg


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config().sampling.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("data, message", [
    ({"sampling": {"stepz": 3}},
     r"^unknown config key 'sampling\.stepz' \(sampling has no setting 'stepz'; did you mean 'sampling\.steps'\?\)$"),
    ({"smapling": {}}, r"^unknown config key 'smapling' \('smapling' is not a section; did you mean 'sampling'\?\)$"),
    ({"video": {"height": "tall"}}, r"^video\.height: expected int, got 'tall'"),
    ({"parallel": {"ulysses_degree": True}}, r"^parallel\.ulysses_degree: expected int"),
    ({"parallel": {"cfg_degree": 3}}, r"^parallel\.cfg_degree: expected one of 1 \| 2"),
    ({"parallel": {"fuse_qkv": "sometimes"}}, r"^parallel\.fuse_qkv: expected bool \| 'auto'"),
    ({"video": 5}, r"^video: expected a mapping"),
    ({"video": {"frames": 80}}, r"^video: frames must be 4n\+1"),
    ({"video": {"width": 840}}, r"^video: width must be a positive multiple of 16"),
    ({"sampling": {"steps": 0}}, r"^sampling: steps must be >= 1"),
    ({"parallel": {"cfg_degree": 2}, "sampling": {"guidance_scale": 1.0}}, r"cfg_degree=2 needs classifier-free"),
])
def test_rejections_name_their_path(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(OdysseyConfig, data)


def test_types_are_converted():
    cfg = from_dict(OdysseyConfig, {"sampling": {"shift": 3}, "runtime": {"num_cpus_per_worker": 0.5}})
    assert cfg.sampling.shift == 3.0 and isinstance(cfg.sampling.shift, float)
    assert cfg.runtime.num_cpus_per_worker == 0.5


def test_overrides():
    cfg = load_config(overrides=["sampling.steps=20", "parallel.fuse_qkv=false", "model.path=/w/wan",
                                 "sampling.negative_prompt=blurry, low quality", "sampling.seed=null"])
    assert cfg.sampling.steps == 20 and cfg.parallel.fuse_qkv is False and cfg.model.path == "/w/wan"
    assert cfg.sampling.negative_prompt == "blurry, low quality" and cfg.sampling.seed is None


@pytest.mark.parametrize("override, message", [
    ("sampling.stepz=3", r"^unknown config key 'sampling\.stepz' \(sampling has no setting 'stepz'; did you mean "
                         r"'sampling\.steps'\?\)$"),
    ("sampling=3", r"^sampling: expected a mapping"),
    ("sampling.steps.x=3", r"^unknown config key 'sampling\.steps\.x' \('sampling\.steps' is a setting, not a section\)$"),
    ("sampling.steps", r"expected key\.sub=value"),
    ("video.frames=8", r"^video: frames must be 4n\+1"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("\ufeffsampling:\n  steps: 7\nvideo:\n  frames: 9\n", encoding="utf-8")
    cfg = load_config(path, ["sampling.steps=8"])
    assert cfg.sampling.steps == 8 and cfg.video.frames == 9
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'no-such-preset'"):
        load_config("no-such-preset")


def test_every_preset_loads():
    for name in list_presets():
        load_config(name)


def test_every_field_has_a_docstring():
    import typing

    hints = typing.get_type_hints(OdysseyConfig)
    for cls in [OdysseyConfig, *hints.values()]:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize("section, key, value, message", [
    ("parallel", "ulysses_degree", 0, r"ulysses_degree must be >= 1, got 0"),
    ("parallel", "replicas", 0, r"replicas must be >= 1, got 0"),
    ("parallel", "head_chunks", 0, r"head_chunks must be >= 1, got 0"),
    ("parallel", "head_chunks", -2, r"head_chunks must be >= 1, got -2"),
    ("sampling", "steps", -1, r"steps must be >= 1"),
    ("sampling", "guidance_scale", -0.5, r"guidance_scale must be >= 0"),
    ("sampling", "guidance_scale", float("inf"), r"guidance_scale must be a finite number, got inf"),
    ("sampling", "shift", 0, r"shift must be >= 0\.001, got 0"),
    ("sampling", "shift", float("nan"), r"shift must be a finite number, got nan"),
    ("sampling", "seed", -1, r"seed must be in 0\.\.2\^63-1"),
    ("sampling", "seed", 2**63, r"seed must be in 0\.\.2\^63-1"),
    ("video", "height", 0, r"height must be a positive multiple of 16, got 0"),
    ("video", "height", 24, r"height must be a positive multiple of 16, got 24"),
    ("video", "width", -16, r"width must be a positive multiple of 16"),
    ("video", "frames", 0, r"frames must be 4n\+1"),
    ("video", "fps", 0, r"fps must be >= 1, got 0"),
    ("runtime", "collective_timeout_s", 0, r"collective_timeout_s must be > 0"),
    ("runtime", "collective_timeout_s", float("inf"), r"collective_timeout_s must be a finite number"),
    ("runtime", "max_retries", -1, r"max_retries must be >= 0, got -1"),
    ("runtime", "placement_timeout_s", 0, r"timeouts must be > 0"),
    ("runtime", "placement_timeout_s", float("inf"), r"placement_timeout_s must be a finite number"),
    ("runtime", "load_timeout_s", -1, r"timeouts must be > 0"),
    ("runtime", "load_timeout_s", float("nan"), r"load_timeout_s must be a finite number"),
    ("runtime", "num_cpus_per_worker", 0, r"num_cpus_per_worker must be > 0, got 0"),
    ("runtime", "num_cpus_per_worker", float("inf"), r"num_cpus_per_worker must be a finite number"),
    ("limits", "max_steps", 0, r"max_steps must be >= 1, got 0"),
    ("limits", "max_pixels", 0, r"max_pixels must be >= 1"),
    ("limits", "max_prompt_chars", 0, r"max_prompt_chars must be >= 1"),
    ("limits", "max_prompt_lines", 0, r"max_prompt_lines must be >= 1"),
    ("limits", "max_prompt_file_bytes", 0, r"max_prompt_file_bytes must be >= 1"),
    ("limits", "max_shift", 0, r"max_guidance_scale must be >= 0 and max_shift > 0"),
    ("limits", "max_guidance_scale", float("inf"), r"max_guidance_scale must be a finite number"),
    ("limits", "max_frames", 9, r"^frames 81 is over the limit 9 \(limits\.max_frames\)"),
    ("limits", "max_fps", 15, r"^fps 16 is over the limit 15 \(limits\.max_fps\)"),
    ("limits", "max_guidance_scale", 4.0, r"^guidance_scale 5\.0 is over the limit 4\.0"),
    ("limits", "max_shift", 2.0, r"^shift 5\.0 is over the limit 2\.0"),
])
def test_every_range_check_rejects(section, key, value, message):
    """Each range check of the schema, with the section it belongs to in the message; the value just inside the
    range (the defaults) is accepted, so each case fails only for its own reason."""
    with pytest.raises(ConfigError, match=(message if message.startswith("^") else f"^{section}: {message}")):
        from_dict(OdysseyConfig, {section: {key: value}})
    if section != "limits":
        from_dict(OdysseyConfig, {section: {key: getattr(getattr(OdysseyConfig(), section), key)}})


@pytest.mark.parametrize("key, value", [("ulysses_degree", 1), ("replicas", 1), ("head_chunks", 1)])
def test_range_boundaries_are_accepted(key, value):
    assert getattr(from_dict(OdysseyConfig, {"parallel": {key: value}}).parallel, key) == value
    assert from_dict(OdysseyConfig, {"runtime": {"max_retries": 0}}).runtime.max_retries == 0
    assert from_dict(OdysseyConfig, {"sampling": {"seed": 2**63 - 1, "guidance_scale": 0}}).sampling.seed == 2**63 - 1


@pytest.mark.parametrize("data, message", [
    ({"parallel": {"shard_weights": True}},
     r"^parallel\.shard_weights needs a replica of 2 or more ranks \(ulysses_degree x cfg_degree is 1\): there is "
     r"nothing to shard over"),
    ({"parallel": {"shard_weights": True, "replicas": 4}}, r"^parallel\.shard_weights needs a replica of 2 or more"),
    ({"model": {"shard_text_encoder": True}}, r"^model\.shard_text_encoder needs a replica of 2 or more ranks"),
    ({"model": {"shard_text_encoder": True, "text_encoder_device": "cpu"}, "parallel": {"ulysses_degree": 2}},
     r"^model\.shard_text_encoder shards the encoder over the replica's devices, but model\.text_encoder_device="
     r"cpu keeps it whole on rank 0's CPU: choose one$"),
    ({"model": {"shard_text_encoder": True, "offload_text_encoder": True}, "parallel": {"cfg_degree": 2}},
     r"^model\.shard_text_encoder keeps the encoder's shards on every rank's GPU, but model\.offload_text_encoder="
     r"true moves the whole encoder to one GPU per prompt: choose one$"),
])
def test_sharding_needs_ranks_to_shard_over_and_a_gpu_encoder(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(OdysseyConfig, data)
    assert "\n" not in str(err.value)


def test_sharding_settings_default_off_and_take_any_replica_of_two_or_more():
    assert not OdysseyConfig().parallel.shard_weights and not OdysseyConfig().model.shard_text_encoder
    for name in list_presets():  # the 14B preset explains them; none turns them on
        cfg = load_config(name)
        assert not cfg.parallel.shard_weights and not cfg.model.shard_text_encoder
    for parallel in ({"ulysses_degree": 2}, {"cfg_degree": 2}, {"ulysses_degree": 3, "replicas": 2}):
        cfg = from_dict(OdysseyConfig, {"parallel": {**parallel, "shard_weights": True},
                                        "model": {"shard_text_encoder": True}})
        assert cfg.parallel.shard_weights and cfg.model.shard_text_encoder
    cfg = load_config(overrides=["parallel.ulysses_degree=2", "parallel.shard_weights=true"])
    assert cfg.parallel.shard_weights and cfg.parallel.group_size == 2
