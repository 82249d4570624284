"""Wan2.2 end to end (issue #17): the real `odyssey` CLI, each run a subprocess in a fresh HOME with its own local
Ray, on small random Wan2.2 folders (tests/tiny_models.py): the two-expert T2V-A14B shape as a diffusers pipeline
folder (transformer/ = high-noise expert, transformer_2/ = low-noise, boundary_ratio in model_index.json) and the
TI2V-5B shape (48 latent channels, the Wan2.2 VAE: 16x spatial, a 2x2 output patch) in the original release layout.
Each run writes an MP4 that decodes back to the frames and size asked for; --ulysses 2 gives the video --ulysses 1
gives; a .jsonl line's low_noise_guidance_scale reaches the low-noise expert's steps. cpu-smoke's 3 steps at shift 5
are t = 999, 909 (high-noise expert) and 714 (low-noise): both experts run in every video.

The three runs are independent, so they start together (module fixture) and the tests read what they wrote: most of
a run's time is Ray starting and the model loading, which overlap. Sampling parity with diffusers' WanPipeline:
tests/test_wan22_runner.py; loading: tests/test_wan22_loading.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from cluster.video import read_mp4  # noqa: E402

PROMPT = "a red circle moving right"
TIMEOUT_S = 300


def smoke(folder: Path, *sets: str) -> list[str]:
    return ["--config", "cpu-smoke", "--set", f"model.path={folder}", "--progress", "lines",
            *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (CompletedProcess-like (returncode, stdout, stderr), its folder)} of the three CLI runs."""
    from tests.tiny_models import wan22_a14b_folder, wan22_ti2v_folder

    base = tmp_path_factory.mktemp("wan22")
    a14b = wan22_a14b_folder(base / "Wan2.2-T2V-A14B-Diffusers", "pipeline")
    ti2v = wan22_ti2v_folder(base / "Wan2.2-TI2V-5B", "original")
    prompts = base / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "name": "guided", "seed": 5}) + "\n"
                       + json.dumps({"prompt": PROMPT, "name": "low-off", "seed": 5, "low_noise_guidance_scale": 1})
                       + "\n")
    commands = {
        # the preset-like per-expert guidance (4 / 3), and the same seed with the low-noise expert's guidance off
        "batch": ["batch", prompts, "-o", base / "batch", *smoke(a14b, "sampling.low_noise_guidance_scale=3")],
        "sp2": ["generate", PROMPT, "-o", base / "sp2" / "sp2.mp4", "--seed", 5, "--ulysses", 2,
                *smoke(a14b, "sampling.low_noise_guidance_scale=3")],
        "ti2v": ["generate", PROMPT, "-o", base / "ti2v" / "ti2v.mp4", "--seed", 3, "--manifest",
                 base / "ti2v" / "m.jsonl", *smoke(ti2v, "video.width=64", "video.height=32")],
    }
    procs = {}
    for name, args in commands.items():
        home = base / f"home-{name}"  # a fresh HOME each: a first run on a new machine
        (base / name).mkdir(exist_ok=True)
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)  # a local Ray of its own
        procs[name] = subprocess.Popen([sys.executable, "-m", "cluster.cli", *map(str, args)], cwd=home, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT_S)
            done[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # timed out: its whole process group (its local Ray too), never a name
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return done, base


def ok(runs, name):
    (code, out, err), base = runs[0][name], runs[1]
    assert code == 0, f"odyssey {name} failed:\n{err[-4000:]}"
    return out, base / name


def test_a14b_pipeline_folder_batch_and_ulysses_2_gives_the_same_video(runs):
    """Two videos of one seed from a .jsonl: 9 frames of 48x32 each, different (the line's low_noise_guidance_scale
    reached the low-noise steps) and recorded; `generate --ulysses 2` of the first line gives the batch's one-rank
    video."""
    _, folder = ok(runs, "batch")
    records = {r["name"]: r for r in map(json.loads, (folder / "manifest.jsonl").read_text().splitlines())}
    made = {name: r["request"] for name, r in records.items()}
    assert (made["guided"]["guidance_scale"], made["guided"]["low_noise_guidance_scale"]) == (4.0, 3.0)
    assert (made["low-off"]["guidance_scale"], made["low-off"]["low_noise_guidance_scale"]) == (4.0, 1.0)
    guided, fps = read_mp4(records["guided"]["output"])
    low_off, _ = read_mp4(records["low-off"]["output"])
    assert guided.shape == low_off.shape == (9, 32, 48, 3) and fps == 16
    assert np.abs(guided.astype(int) - low_off.astype(int)).max() > 4, "the low-noise expert's guidance changed nothing"

    _, folder = ok(runs, "sp2")
    got, fps = read_mp4(folder / "sp2.mp4")
    assert got.shape == guided.shape and fps == 16
    assert np.abs(got.astype(int) - guided.astype(int)).max() <= 1  # the same latents; H.264 may round one level


def test_ti2v_original_folder_writes_the_frames_and_size_asked_for(runs):
    """The 48-channel DiT and the Wan2.2 VAE from Wan2.2_VAE.pth: 9 frames (3 latent frames: 1, then 4 each) of
    64x32 (multiples of 32: 16x VAE x 2x2 patch)."""
    out, folder = ok(runs, "ti2v")
    assert out.strip().endswith("ti2v.mp4")
    frames, fps = read_mp4(folder / "ti2v.mp4")
    assert frames.shape == (9, 32, 64, 3) and fps == 16
    assert frames.std() > 1.0  # a decoded video, not a constant frame
    record = json.loads((folder / "m.jsonl").read_text())
    assert (record["request"]["height"], record["request"]["width"], record["request"]["frames"]) == (32, 64, 9)


def test_readme_memory_table_is_the_estimate_the_ranks_check(tmp_path, monkeypatch):
    """README's Wan2.2 per-GPU table is what pipeline.memory estimates for each preset, layout and size
    (bench/wan22_memory.py prints it): a change to the estimate, or to a preset, must come with the README's."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("wan22_memory", root / "bench" / "wan22_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.chdir(tmp_path)  # the presets' ./Wan2.2-* folders are not here: the shapes come from the names
    readme = (root / "README.md").read_text().splitlines()
    table = bench.estimate_table(bench.estimates())
    assert len(table) == 2 + len(bench.LAYOUTS)
    start = readme.index(table[0])
    assert readme[start:start + len(table)] == table
