"""Wan2.2 end to end (issue #17): the real `odyssey` CLI, a subprocess in a fresh HOME with its own local Ray, on
small random Wan2.2 folders (tests/tiny_models.py): the two-expert T2V-A14B shape as a diffusers pipeline folder
(transformer/ = high-noise expert, transformer_2/ = low-noise, boundary_ratio in model_index.json) and the TI2V-5B
shape (48 latent channels, the Wan2.2 VAE: 16x spatial, a 2x2 output patch) in the original release layout. Each
run writes an MP4 that decodes back to the frames and size asked for; --ulysses 2 gives the video --ulysses 1 gives;
a .jsonl line's low_noise_guidance_scale reaches the low-noise expert's steps. cpu-smoke's 3 steps at shift 5 are
t = 999, 909 (high-noise expert) and 714 (low-noise): both experts run in every video. Sampling parity with
diffusers' WanPipeline: tests/test_wan22_runner.py; loading: tests/test_wan22_loading.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from cluster.video import read_mp4  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving right"


def odyssey(home: Path, *args, timeout=240):
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, as a first run on a laptop
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=home, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    from tests.tiny_models import wan22_a14b_folder

    return wan22_a14b_folder(tmp_path_factory.mktemp("a14b") / "Wan2.2-T2V-A14B-Diffusers", "pipeline")


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    from tests.tiny_models import wan22_ti2v_folder

    return wan22_ti2v_folder(tmp_path_factory.mktemp("ti2v") / "Wan2.2-TI2V-5B", "original")


def smoke(folder: Path, *sets: str) -> list[str]:
    return ["--config", "cpu-smoke", "--set", f"model.path={folder}", "--progress", "lines",
            *[a for s in sets for a in ("--set", s)]]


def test_a14b_pipeline_folder_batch_and_ulysses_2_gives_the_same_video(home, a14b, tmp_path):
    """Two videos of one seed from a .jsonl (the preset-like per-expert guidance 4 / 3, and the low-noise expert's
    guidance off): 9 frames of 48x32 each, and different (the line's low_noise_guidance_scale reached the low-noise
    steps); then `generate --ulysses 2` of the first line gives the same video as the batch's one rank."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "name": "guided", "seed": 5}) + "\n"
                       + json.dumps({"prompt": PROMPT, "name": "low-off", "seed": 5, "low_noise_guidance_scale": 1})
                       + "\n")
    out = tmp_path / "out"
    odyssey(home, "batch", prompts, "-o", out, *smoke(a14b, "sampling.low_noise_guidance_scale=3"))
    records = {r["name"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    made = {name: r["request"] for name, r in records.items()}
    assert (made["guided"]["guidance_scale"], made["guided"]["low_noise_guidance_scale"]) == (4.0, 3.0)
    assert (made["low-off"]["guidance_scale"], made["low-off"]["low_noise_guidance_scale"]) == (4.0, 1.0)
    guided, fps = read_mp4(records["guided"]["output"])
    low_off, _ = read_mp4(records["low-off"]["output"])
    assert guided.shape == low_off.shape == (9, 32, 48, 3) and fps == 16
    assert np.abs(guided.astype(int) - low_off.astype(int)).max() > 4, "the low-noise expert's guidance changed nothing"

    sp2 = tmp_path / "sp2.mp4"
    odyssey(home, "generate", PROMPT, "-o", sp2, "--seed", 5, "--ulysses", 2,
            *smoke(a14b, "sampling.low_noise_guidance_scale=3"))
    got, fps = read_mp4(sp2)
    assert got.shape == guided.shape and fps == 16
    assert np.abs(got.astype(int) - guided.astype(int)).max() <= 1  # the same latents; H.264 may round one level


def test_ti2v_original_folder_writes_the_frames_and_size_asked_for(home, ti2v, tmp_path):
    """The 48-channel DiT and the Wan2.2 VAE from Wan2.2_VAE.pth: 9 frames (3 latent frames: 1, then 4 each) of
    64x32 (multiples of 32: 16x VAE x 2x2 patch)."""
    out = tmp_path / "ti2v.mp4"
    done = odyssey(home, "generate", PROMPT, "-o", out, "--seed", 3, "--manifest", tmp_path / "m.jsonl",
                   *smoke(ti2v, "video.width=64", "video.height=32"))
    assert done.stdout.strip().endswith("ti2v.mp4")
    frames, fps = read_mp4(out)
    assert frames.shape == (9, 32, 64, 3) and fps == 16
    assert frames.std() > 1.0  # a decoded video, not a constant frame
    record = json.loads((tmp_path / "m.jsonl").read_text())
    assert (record["request"]["height"], record["request"]["width"], record["request"]["frames"]) == (32, 64, 9)
