"""What the CLI refuses for a Wan2.2 model before Ray starts: one line, exit 2, nothing written (the Runner would
refuse it too, but only after Ray, placement and the load)."""

from __future__ import annotations

import json

import pytest

import cluster.driver as driver_mod
from cluster.cli import main
from tests.tiny_models import wan22_a14b_folder, wan22_ti2v_folder, wan_pipeline_folder


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("Ray was started for a run that had to be refused first")

    monkeypatch.setattr(driver_mod, "connect_ray", refuse)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22cli")
    return {"ti2v": wan22_ti2v_folder(root / "Wan2.2-TI2V-5B", "original"),
            "a14b": wan22_a14b_folder(root / "Wan2.2-T2V-A14B", "pipeline"),
            "wan21": wan_pipeline_folder(root / "Wan2.1-T2V-1.3B")}


def _run(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def _cpu(folder, *sets):
    return ["--set", f"model.path={folder}", "--set", "runtime.device=cpu", "--set", "video.frames=5",
            *(x for s in sets for x in ("--set", s))]


def test_a_ti2v_size_its_vae_and_patch_do_not_divide_is_refused_before_ray(folders, tmp_path, capsys, no_ray):
    out = tmp_path / "out.mp4"
    code, err = _run(["generate", "a cat", "-o", out, "--config", "wan2.2-ti2v-5b",
                      *_cpu(folders["ti2v"], "video.height=48", "video.width=64")], capsys)
    assert code == 2 and not out.exists()
    line = [ln for ln in err.splitlines() if ln.strip()]
    assert len(line) == 1 and "multiples of 32" in line[0] and "compresses 16x" in line[0] and "48x64" in line[0]


def test_a_jsonl_line_with_a_size_the_model_cannot_make_names_its_line(folders, tmp_path, capsys, no_ray):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "height": 32, "width": 32}) + "\n"
                       + json.dumps({"prompt": "b", "height": 32, "width": 80}) + "\n")
    code, err = _run(["batch", prompts, "-o", tmp_path / "out", "--config", "wan2.2-ti2v-5b", *_cpu(folders["ti2v"])],
                     capsys)
    assert code == 2 and f"{prompts}:2:" in err and "multiples of 32" in err and "32x80" in err
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


@pytest.mark.parametrize("model", ["wan21", "ti2v"])
def test_a_low_noise_guidance_on_a_one_dit_model_is_refused_before_ray(folders, model, tmp_path, capsys, no_ray):
    out = tmp_path / "out.mp4"
    code, err = _run(["generate", "a cat", "-o", out, "--config", "wan2.1-t2v-1.3b",
                      *_cpu(folders[model], "video.height=32", "video.width=32",
                            "sampling.low_noise_guidance_scale=2.0")], capsys)
    assert code == 2 and not out.exists()
    assert "low_noise_guidance_scale applies to two-expert models" in err and "one DiT" in err


def test_the_two_expert_model_takes_a_low_noise_guidance(folders, tmp_path):
    """The same check passes on A14B (nothing refused: the request goes on to Ray, which this test does not start)."""
    from cluster.validate import check_request_model
    from configs import load_config
    from pipeline.request import GenerateRequest

    config = load_config("wan2.2-t2v-a14b", [f"model.path={folders['a14b']}", "runtime.device=cpu",
                                             "video.height=32", "video.width=48", "video.frames=5"])
    request = GenerateRequest("a cat", low_noise_guidance_scale=1.5).resolve(config)
    check_request_model(request, config)
    assert request.low_noise_guidance_scale == 1.5


def test_half_a_two_expert_folder_hints_the_two_expert_repository(folders, tmp_path, capsys, no_ray):
    """A folder whose name says no model, holding transformer/ and a model_index.json naming a transformer_2/ that
    is not there: the hint names Wan2.2 T2V-A14B's repository (not Wan2.1's, the default for a name saying none)."""
    import shutil

    half = tmp_path / "wan"
    shutil.copytree(folders["a14b"], half)
    shutil.rmtree(half / "transformer_2")
    code, err = _run(["generate", "a cat", "-o", tmp_path / "x.mp4", *_cpu(half)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "no transformer_2/config.json" in err and "hf download Wan-AI/Wan2.2-T2V-A14B" in err, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_a_boundary_on_a_one_dit_folder_is_refused_before_ray(folders, command, tmp_path, capsys, no_ray):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    target = ["a cat", "-o", tmp_path / "out.mp4"] if command == "generate" else [prompts, "-o", tmp_path / "out"]
    code, err = _run([command, *target, "--config", "wan2.2-ti2v-5b",
                      *_cpu(folders["ti2v"], "video.height=32", "video.width=32", "model.boundary_ratio=0.5")], capsys)
    assert code == 2 and not (tmp_path / "out.mp4").exists() and not (tmp_path / "out").exists()
    assert f"model.boundary_ratio is set but {folders['ti2v']} holds one DiT" in _one_line(err)


@pytest.mark.parametrize("value", ["NaN", '"0.5"', "1e308", "{}", "[0.5]", "true", "0", "1"])
@pytest.mark.parametrize("command", ["generate", "batch"])
def test_a_hostile_model_index_boundary_is_refused_before_ray(folders, value, command, tmp_path, capsys, no_ray):
    import shutil

    model = tmp_path / "Wan2.2-T2V-A14B"
    shutil.copytree(folders["a14b"], model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(index).replace('"boundary_ratio": 0.875',
                                                                      f'"boundary_ratio": {value}'))
    assert json.loads((model / "model_index.json").read_text())["boundary_ratio"] != 0.875
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    target = ["a cat", "-o", tmp_path / "out.mp4"] if command == "generate" else [prompts, "-o", tmp_path / "out"]
    code, err = _run([command, *target, "--config", "wan2.2-t2v-a14b",
                      *_cpu(model, "video.height=32", "video.width=48")], capsys)
    assert code == 2 and not (tmp_path / "out.mp4").exists() and not (tmp_path / "out").exists()
    assert "boundary_ratio must be a number in (0, 1)" in _one_line(err) and "model_index.json" in err
    # the config's own boundary wins, as at load: the folder's is not read
    from cluster.validate import check_config
    from configs import load_config

    check_config(load_config("wan2.2-t2v-a14b", [f"model.path={model}", "model.boundary_ratio=0.5"]))


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_a_vae_whose_latents_the_dit_does_not_take_is_refused_before_ray(folders, command, tmp_path, capsys,
                                                                        no_ray):
    """A Wan2.1 folder (16-channel DiT) given the Wan2.2 VAE (48 latent channels)."""
    import shutil

    from tests.tiny_models import diffusers_vae22, save_vae22

    model = tmp_path / "Wan2.1-T2V-1.3B"
    shutil.copytree(folders["wan21"], model)
    shutil.rmtree(model / "vae")
    save_vae22(diffusers_vae22(), model, "pipeline")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    target = ["a cat", "-o", tmp_path / "out.mp4"] if command == "generate" else [prompts, "-o", tmp_path / "out"]
    code, err = _run([command, *target, "--config", "wan2.1-t2v-1.3b",
                      *_cpu(model, "video.height=32", "video.width=32")], capsys)
    assert code == 2 and not (tmp_path / "out.mp4").exists() and not (tmp_path / "out").exists()
    line = _one_line(err)
    assert f"the VAE in {model} has 48 latent channels but the DiT takes 16" in line and "Wan2.1 VAE" in line


def test_resume_compares_the_boundary_a_two_expert_model_ran_with(folders, tmp_path, capsys, no_ray):
    """The record says the boundary the folder gave (0.875, from model_index.json, the config's null); a run with
    another one regenerates and says so in its one line, the same one skips."""
    from types import SimpleNamespace

    from cluster.driver import Driver, Job, Outcome
    from cluster.prompts import output_path, read_prompt_file
    from configs import load_config
    from pipeline.request import GenerateRequest

    sets = _cpu(folders["a14b"], "video.height=32", "video.width=48", "sampling.steps=2")
    config = load_config("wan2.2-t2v-a14b", sets[1::2])
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("a cat\n")
    out.mkdir()
    path = output_path(out, 0, 1, read_prompt_file(prompts, config.limits)[0])
    path.write_bytes(b"a finished video")
    request = GenerateRequest("a cat", seed=3).resolve(config)
    result = SimpleNamespace(num_frames=5, cache=None, memory=None)
    Driver._write_manifest(SimpleNamespace(manifest=out / "manifest.jsonl", config=config),
                           Outcome(Job(0, request, path), path=path, result=result, timings={}))
    assert json.loads((out / "manifest.jsonl").read_text())["config"]["model"]["boundary_ratio"] == 0.875

    batch = ["batch", prompts, "-o", out, "--config", "wan2.2-t2v-a14b", "--seed", "3", *sets]
    for same in ([], ["--set", "model.boundary_ratio=0.875"]):  # the folder's, or the same number said
        main([str(a) for a in [*batch, *same]])  # nothing to run: returns
        err = capsys.readouterr().err
        assert "1 of 1 outputs already complete" in err and "regenerating" not in err
    code, err = _run([*batch, "--set", "model.boundary_ratio=0.5"], capsys)  # goes on to Ray: refused by no_ray
    assert [ln for ln in err.splitlines() if "regenerating" in ln] == [
        f"odyssey: 1 of 1 outputs in {out} were made with other settings (model.boundary_ratio 0.875 -> 0.5), "
        f"regenerating them"], err


def test_every_preset_of_a_downloaded_model_says_it_needs_its_weights():
    """`config presets` lists one line per preset: those whose model.path is a folder say the weights are needed."""
    from configs import load_config
    from configs.presets import list_presets, preset_description

    downloaded = [name for name in list_presets() if name.startswith("wan")]
    assert {"wan2.2-t2v-a14b", "wan2.2-ti2v-5b"} <= set(downloaded)
    for name in downloaded:
        assert load_config(name).model.path is not None
        assert preset_description(name).endswith("needs its weights."), name
