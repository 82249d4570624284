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
