"""The odyssey CLI: options and errors (CliRunner and real subprocesses), prompt files, hostile names, resume
after an interruption, cluster YAMLs (submission to a real head: tests/test_launch.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cluster.cli import cli
from cluster.prompts import PromptFileError, PromptSpec, output_path, read_prompt_file, slugify
from cluster.video import read_mp4

ROOT = Path(__file__).resolve().parents[1]
ODYSSEY = [sys.executable, "-m", "cluster.cli"]


def odyssey(*args, timeout=240, **kw):
    return subprocess.run([*ODYSSEY, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=kw.pop(
        "cwd", ROOT), **kw)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tests.tiny_models import wan_pipeline_folder

    return wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "wan")


def smoke(folder):
    return ["--config", "cpu-smoke", "--set", f"model.path={folder}", "--progress", "lines"]


# -- options and errors without a cluster ------------------------------------------------------------------------


def test_version_and_help():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and "odyssey, version" in result.output
    result = CliRunner().invoke(cli, ["batch", "--help"])
    assert result.exit_code == 0 and "--resume / --no-resume" in result.output


def test_config_show_defaults_to_the_embedded_model():
    result = CliRunner().invoke(cli, ["config", "show"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["model"]["path"] is None and shown["video"]["height"] == 32
    result = CliRunner().invoke(cli, ["config", "show", "--config", "wan2.1-t2v-1.3b", "--set", "sampling.steps=7"])
    assert yaml.safe_load(result.output)["sampling"]["steps"] == 7
    presets = CliRunner().invoke(cli, ["config", "presets"]).output.split()
    assert {"tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "cpu-smoke"} <= set(presets)


@pytest.mark.parametrize("args, message", [
    (["config", "show", "--set", "video.frames=8"], "config: video: frames must be 4n+1"),
    (["config", "show", "--set", "sampling.stepz=3"], "unknown config key 'sampling.stepz'"),
    (["config", "show", "--config", "nope"], "unknown preset 'nope'"),
    (["generate", "a cat", "-o", "cat.gif"], "--output must end in .mp4"),
    (["generate", "   "], "the prompt is empty"),
    (["generate", "a cat", "--ulysses", "0"], "Invalid value for '--ulysses'"),
    (["submit"], "nothing to submit"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    result = odyssey(*args, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = odyssey("--debug", "config", "show", "--set", "video.frames=8", timeout=60)
    assert result.returncode == 2 and "Traceback" in result.stderr  # a config error: 2 with or without --debug
    assert result.stderr.splitlines()[-1] == ("odyssey: error: config: video: frames must be 4n+1 (1, 5, 9, ..., 81), "
                                              "got 8")


# -- prompt files and names ----------------------------------------------------------------------------------------


def test_txt_prompt_files(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa red circle moving right\r\n\r\n# a comment\r\n  a blue square moving up  \r\n".encode())
    specs = read_prompt_file(f)
    assert [(s.prompt, s.line) for s in specs] == [("a red circle moving right", 1), ("a blue square moving up", 4)]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "ok"', r"p.jsonl:2: not valid JSON"),
    ('["a list"]', r"p.jsonl:2: expected a JSON object"),
    ('{"prompt": ""}', r"p.jsonl:2: 'prompt' must be a non-empty string"),
    ('{"prompt": "x", "steps": "many"}', r"p.jsonl:2: 'steps' has the wrong type"),
    ('{"prompt": "x", "colour": "red"}', r"p.jsonl:2: unknown key\(s\) colour"),
    ('{"prompt": "x", "seed": -1}', r"p.jsonl:2: 'seed' must be an integer"),
])
def test_malformed_jsonl_lines_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine", "name": "a", "seed": 3, "steps": 2}\n' + line + "\n")
    with pytest.raises(PromptFileError, match=message):
        read_prompt_file(f)
    result = odyssey("batch", f, "-o", tmp_path / "out", timeout=60)
    assert result.returncode == 2 and "p.jsonl:2" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing may be generated from a bad file"


def test_jsonl_settings_are_checked_before_anything_runs(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine"}\n{"prompt": "bad size", "height": 40}\n')
    result = odyssey("batch", f, "-o", tmp_path / "out", timeout=60)
    assert result.returncode == 2 and "p.jsonl:2: height must be a positive multiple of 16" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/shadow", "..", "a/b\\c", "x" * 5000, "é漢字🎬", "",
                                  "con", ".hidden", "~/x", "\x00nul"])
def test_hostile_names_stay_inside_the_output_folder(tmp_path, name):
    out = tmp_path / "out"
    path = output_path(out, 7, 100, PromptSpec(prompt=name or "p", line=1, name=name or None))
    assert path.parent == out and path.name.startswith("0007-") and path.suffix == ".mp4"
    assert len(path.name) <= 80 and "/" not in path.name[5:] and ".." not in path.name
    assert slugify(name) == slugify(slugify(name))


# -- real runs -------------------------------------------------------------------------------------------------


def test_generate_writes_a_playable_mp4(wan_folder, tmp_path):
    out = tmp_path / "clip.mp4"
    result = odyssey("generate", "a red circle moving right", "-o", out, "--seed", 7, *smoke(wan_folder),
                     "--manifest", tmp_path / "m.jsonl")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("clip.mp4")
    frames, fps = read_mp4(out)
    assert frames.shape == (9, 32, 48, 3) and fps == 16
    line = json.loads((tmp_path / "m.jsonl").read_text())
    assert line["seed"] == 7 and line["prompt"] == "a red circle moving right" and line["output"] == str(out)
    assert {"denoise_s", "decode_s", "total_s"} <= set(line["timings"]) and line["config"]["sampling"]["steps"] == 3


def test_batch_with_hostile_names_and_resume_after_interruption(wan_folder, tmp_path):
    prompts = tmp_path / "p.jsonl"
    names = ["../../escape", "/abs/olute", "é漢字", "x" * 300, None, None]
    prompts.write_text("".join(json.dumps({"prompt": f"prompt number {i}", **({"name": n} if n else {}),
                                           "seed": i}) + "\n" for i, n in enumerate(names)), encoding="utf-8")
    out = tmp_path / "out"
    cmd = [*ODYSSEY, "batch", str(prompts), "-o", str(out), *smoke(wan_folder), "--set", "sampling.steps=200"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def finished():  # complete outputs only: partial files are hidden (.name.*.partial.mp4)
        return sorted(p.name for p in out.glob("*.mp4") if not p.name.startswith("."))

    deadline = time.time() + 180
    while time.time() < deadline and not finished():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    done = finished()
    assert 1 <= len(done) < len(names), done
    assert not list(out.glob(".*")), "partial files left behind"
    _assert_no_workers_left()

    # resumed with the smoke preset's 3 steps: the finished 200-step videos are redone, and it says so once
    result = odyssey("batch", prompts, "-o", out, *smoke(wan_folder))
    assert result.returncode == 0, result.stderr
    assert f"{len(done)} of {len(names)} outputs in {out} were made with other settings (steps 200 -> 3), " \
           f"regenerating them" in result.stderr
    files = sorted(out.iterdir())
    assert all(f.parent == out for f in files)
    videos = [f for f in files if f.suffix == ".mp4"]
    assert len(videos) == len(names) and (out / "manifest.jsonl").exists()
    assert [v.name[:5] for v in videos] == [f"{i:04d}-" for i in range(len(names))]
    assert videos[0].name == "0000-escape.mp4" and videos[1].name == "0001-abs-olute.mp4"
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(m["index"] for m in manifest) == sorted([*range(len(names)), *(int(d[:4]) for d in done)])


def _assert_no_workers_left():
    deadline = time.time() + 20
    while time.time() < deadline:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        if "ray::SPWorker" not in ps:
            return
        time.sleep(0.5)
    raise AssertionError("SPWorker processes outlived the interrupted driver")


# -- cluster YAMLs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["local", "aws", "gcp"])
def test_cluster_yamls_fit_rays_schema(name):
    from cluster.submit import validate_cluster_yaml

    config = validate_cluster_yaml(ROOT / "cluster" / "launch" / f"{name}.yaml")
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard must not listen publicly by default"
    assert "0.0.0.0" not in yaml.safe_dump(config)


def test_broken_cluster_yaml_is_a_usage_error(tmp_path):
    bad = yaml.safe_load((ROOT / "cluster" / "launch" / "local.yaml").read_text())
    bad["provider"]["typo_key"] = 1
    bad["head_count"] = 2
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = odyssey("cluster", "status", path, timeout=60)
    assert result.returncode == 2 and "bad.yaml" in result.stderr and "head_count" in result.stderr


def test_kuberay_rayjob_manifest():
    job = yaml.safe_load((ROOT / "cluster" / "launch" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].split()[0] == "odyssey"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    from cluster.cli import cli as _cli  # the entrypoint must be a valid odyssey command line
    import shlex

    args = shlex.split(job["spec"]["entrypoint"])[1:]
    result = CliRunner().invoke(_cli, [args[0], "--help"])
    assert result.exit_code == 0
