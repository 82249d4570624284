"""First-run hints (issue #16 review): the download command chosen from the config's preset, not the folder's name;
a model folder checked for its files before a local Ray starts (and before the GPU count); --debug after the
command; a line while the local Ray starts and the replicas load (lines mode); the README's promises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_config_ux import ROOT, odyssey_main

REPO_13, REPO_14 = "Wan-AI/Wan2.1-T2V-1.3B", "Wan-AI/Wan2.1-T2V-14B"


def _command(repo: str, folder: Path) -> str:
    return f"`hf download {repo} --local-dir {folder}`"


# -- the repository the hint names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, folder, repo, alternative", [
    ("wan2.1-t2v-14b", "x", REPO_14, False),  # the config says 14B: the folder's name says nothing
    ("wan2.1-t2v-14b", "Wan2.1-T2V-1.3B", REPO_14, False),  # the config wins over the name
    ("wan2.1-t2v-1.3b", "wan-14b-copy", REPO_13, False),
    (None, "Wan2.1-T2V-14B", REPO_14, False),  # no preset known (the Python API): the folder's name
    ("tiny", "Wan2.1-T2V-14B", REPO_14, False),  # a preset that says no size: the folder's name
    ("tiny", "x", REPO_13, True),  # neither says: both
])
def test_download_hint_follows_the_preset(tmp_path, preset, folder, repo, alternative):
    from pipeline.weights import download_hint, hint_preset

    path = tmp_path / folder
    for hint in (download_hint(path, preset), _in_context(path, preset)):
        assert _command(repo, path) in hint, hint
        assert (f"(or {REPO_14};" in hint) == alternative, hint
        wan = f"--config wan2.1-t2v-{'14b' if repo == REPO_14 else '1.3b'}"
        # a non-Wan preset keeps the embedded model's sizes and steps: say which --config gives Wan's
        assert (wan in hint) == (preset == "tiny"), hint
    with hint_preset("wan2.1-t2v-14b"):
        pass
    assert _command(REPO_13, tmp_path / "x") in download_hint(tmp_path / "x")  # the context ended


def _in_context(path: Path, preset: str | None) -> str:
    from pipeline.weights import download_hint, hint_preset

    with hint_preset(preset):
        return download_hint(path)


def _no_ray_started():
    import ray

    return not ray.is_initialized()


def test_cli_hint_names_the_configs_size(tmp_path, capsys):
    """`--config wan2.1-t2v-14b --set model.path=~/models/x`: the 14B download, before any Ray."""
    folder = tmp_path / "x"
    code, _, err = odyssey_main(capsys, "generate", "a cat", "--config", "wan2.1-t2v-14b", "--set",
                                f"model.path={folder}", "-o", tmp_path / "cat.mp4")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert _command(REPO_14, folder) in err and REPO_13 not in err, err
    # the tiny preset with a Wan folder: its sizes and steps are the embedded model's, so say which --config
    code, _, err = odyssey_main(capsys, "generate", "a cat", "--set", f"model.path={folder}", "-o",
                                tmp_path / "cat.mp4")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert _command(REPO_13, folder) in err and "add `--config wan2.1-t2v-1.3b` (or wan2.1-t2v-14b)" in err, err
    assert _no_ray_started() and sorted(tmp_path.iterdir()) == []


# -- the model folder checked before a local Ray ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tests.tiny_models import wan_pipeline_folder

    return wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-14B")


def _broken(wan_folder: Path, tmp_path: Path, drop: str) -> Path:
    folder = tmp_path / "wan"  # a name that says no size: the config's preset must pick the repository
    shutil.copytree(wan_folder, folder)
    for path in folder.glob(drop):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return folder


@pytest.mark.parametrize("drop, says", [
    ("*", "holds no DiT"),  # an empty folder: the download never ran
    ("transformer/*.safetensors", "no .safetensors weights"),
    ("text_encoder/*.safetensors*", "text_encoder"),
    ("vae", "holds no VAE"),
])
def test_an_incomplete_folder_is_refused_before_ray_and_before_the_gpu_count(wan_folder, tmp_path, capsys, drop,
                                                                              says):
    """The wan presets ask for CUDA; this machine has no GPU: the weights' error, not 'needs 1 GPU', and no Ray."""
    folder = _broken(wan_folder, tmp_path, drop)
    code, _, err = odyssey_main(capsys, "generate", "a cat", "--config", "wan2.1-t2v-14b", "--set",
                                f"model.path={folder}", "-o", tmp_path / "cat.mp4")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert says in err and _command(REPO_14, folder) in err and "GPU" not in err, err
    assert _no_ray_started() and not (tmp_path / "cat.mp4").exists()


def test_a_complete_folder_passes_the_check(wan_folder):
    from cluster.driver import check_model_folder

    check_model_folder(wan_folder, "wan2.1-t2v-14b")  # the loaders' own checks, no weight read: nothing to say


def test_a_joined_cluster_checks_on_its_nodes(tmp_path):
    """With --address the weights live on the cluster's nodes: this machine's (missing) folder is not checked."""
    from cluster.driver import Driver
    from configs import load_config

    config = load_config("wan2.1-t2v-1.3b", [f"model.path={tmp_path / 'absent'}"])
    Driver(config, address="127.0.0.1:1", progress=None).validate()
    with pytest.raises(ValueError, match="does not exist: download"):
        Driver(config, progress=None).validate()


# -- --debug after the command ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, command", [
    (["generate", "--debug", "a cat"], "generate"),
    (["generate", "a cat", "--debug"], "generate"),
    (["config", "show", "--debug"], "config show"),
])
def test_debug_after_the_command_is_one_line(capsys, args, command):
    code, _, err = odyssey_main(capsys, *args)
    assert (code, err) == (2, f"odyssey: error: put --debug before the command: odyssey --debug {command} ...\n")


def test_debug_before_the_command_still_shows_the_traceback(capsys):
    code, _, err = odyssey_main(capsys, "--debug", "generate", "--no-such", "a cat")
    assert code == 2 and "Traceback" in err and err.splitlines()[-1] == "odyssey: error: No such option '--no-such'."
    # a prompt that reads --debug, after `--`, is a prompt (refused here for its output name, not for --debug)
    code, _, err = odyssey_main(capsys, "generate", "-o", "x.gif", "--", "--debug")
    assert code == 2 and "Traceback" not in err and "--output must end in .mp4" in err, err


# -- lines while the local Ray starts and the replicas load -----------------------------------------------------------


def test_notes_in_lines_mode_only(capsys):
    from cluster.progress import make_reporter

    make_reporter("lines").note("starting a local Ray (2 CPUs) ...")
    for mode in (None, "bars"):
        make_reporter(mode).note("not shown")
    assert capsys.readouterr().err == "starting a local Ray (2 CPUs) ...\n"


def test_a_run_says_what_it_waits_for(tmp_path):
    """A real run of the embedded model, piped (lines mode): a line while the local Ray starts and one while the
    replica is placed and loaded, before 'replica 0 up', so the first seconds are not silent."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "a red circle moving right", "-o",
                             tmp_path / "c.mp4", "--set", "sampling.steps=2", "--set", "video.frames=5"],
                            capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    starting = [i for i, line in enumerate(lines) if line == f"starting a local Ray ({os.cpu_count()} CPUs) ..."]
    placing = [i for i, line in enumerate(lines) if line == "placing 1 replica of 1 rank and loading the model ..."]
    up = [i for i, line in enumerate(lines) if line.startswith("replica 0 up")]
    assert len(starting) == len(placing) == len(up) == 1 and starting[0] < placing[0] < up[0], result.stderr


# -- the README -------------------------------------------------------------------------------------------------------


def test_readme_says_generate_never_overwrites_and_what_the_api_needs():
    readme = (ROOT / "README.md").read_text()
    assert "outputs/a-red-circle-moving-right.mp4, then ...-2.mp4" in readme
    assert "never overwrites" in readme
    # the Python API needs only the DiT: the command downloads the files the snippet's loader reads, not 17 GB
    command = ("hf download Wan-AI/Wan2.1-T2V-1.3B config.json diffusion_pytorch_model.safetensors\n"
               "--local-dir ~/Wan2.1-T2V-1.3B")
    assert command in readme
    api = readme.index("```python", readme.index(command))
    assert 'WanDiT.from_pretrained("~/Wan2.1-T2V-1.3B"' in readme[api:readme.index("```\n", api + 3)]
