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
    ({"sampling": {"stepz": 3}}, r"^sampling\.stepz: unknown config key"),
    ({"smapling": {}}, r"^smapling: unknown config key"),
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
    ("sampling.stepz=3", r"^sampling\.stepz: unknown config key"),
    ("sampling=3", r"^sampling: expected a mapping"),
    ("sampling.steps.x=3", r"^sampling\.steps: is a setting, not a section"),
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
