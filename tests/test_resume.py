"""`batch --resume` compares what made each finished video (its manifest record) with what is asked now: changed
settings are regenerated and said once, unchanged ones skipped, videos without a record kept and said so; never a
silent skip."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.manifest import ManifestError, read_records, request_changes
from cluster.video import read_mp4
from configs import load_config
from pipeline.request import GenerateRequest

ROOT = Path(__file__).resolve().parents[1]


def odyssey(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _record(manifest: Path, request: GenerateRequest, config, output: Path) -> None:
    """A manifest line as the driver writes it (Driver._write_manifest itself, not a copy of its format)."""
    from cluster.driver import Driver, Job, Outcome

    result = SimpleNamespace(num_frames=request.frames, cache=None, memory=None)
    outcome = Outcome(Job(0, request, output, name=request.prompt), path=output, result=result, timings={})
    Driver._write_manifest(SimpleNamespace(manifest=manifest, config=config), outcome)


def test_records_say_what_changed(tmp_path):
    config = load_config("tiny")
    request = GenerateRequest("a red circle moving right", seed=5).resolve(config)
    manifest = tmp_path / "manifest.jsonl"
    _record(manifest, request, config, tmp_path / "0-a.mp4")
    made = read_records(manifest)["0-a.mp4"]
    assert request_changes(made, request, config) == []

    more_steps = dataclasses.replace(request, steps=request.steps + 5, guidance_scale=7.5)
    assert request_changes(made, more_steps, config) == [f"steps {request.steps} -> {request.steps + 5}",
                                                         f"guidance_scale {request.guidance_scale} -> 7.5"]
    assert request_changes(made, dataclasses.replace(request, prompt="a blue ball"), config) == ["prompt"]
    assert request_changes(made, dataclasses.replace(request, seed=6), config) == ["seed 5 -> 6"]
    # a drawn seed cannot be asked for again: the recorded one stands
    assert request_changes(made, dataclasses.replace(request, seed=6), config, seed_drawn=True) == []
    other_model = load_config("tiny", [f"model.path={tmp_path}"])
    assert request_changes(made, request, other_model) == [f'model.path null -> "{tmp_path}"']
    # the same folder by another name is the same model
    (tmp_path / "wan").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "wan")
    _record(manifest, request, load_config("tiny", [f"model.path={tmp_path / 'wan'}"]), tmp_path / "1-b.mp4")
    by_link = load_config("tiny", [f"model.path={tmp_path / 'link'}"])
    assert request_changes(read_records(manifest)["1-b.mp4"], request, by_link) == []
    # the layout is not what made the pixels
    assert request_changes(made, request, load_config("tiny", ["parallel.ulysses_degree=2"])) == []

    # the latest line for a file wins; lines cut short and records without the request say nothing
    _record(manifest, more_steps, config, tmp_path / "0-a.mp4")
    with open(manifest, "a") as f:
        f.write('{"output": "1-b.mp4", "prompt": "x"}\n{"output": "2-c.m')
    records = read_records(manifest)
    assert request_changes(records["0-a.mp4"], more_steps, config) == []
    assert request_changes(records["1-b.mp4"], request, by_link) is None
    assert request_changes(records.get("2-c.mp4", {}), request, config) is None
    assert read_records(tmp_path / "none.jsonl") == {}


def test_records_survive_hostile_lines(tmp_path):
    """A line nested past the JSON parser's recursion limit, or longer than MAX_RECORD_BYTES (64 MiB with no
    newline here), says nothing: the records around it still count, and the long one is never held in memory."""
    import tracemalloc

    from cluster.manifest import MAX_RECORD_BYTES

    config = load_config("tiny")
    request = GenerateRequest("a red circle moving right", seed=5).resolve(config)
    manifest = tmp_path / "manifest.jsonl"
    _record(manifest, request, config, tmp_path / "0-a.mp4")
    with open(manifest, "a") as f:
        f.write("[" * 200_000 + "]" * 200_000 + "\n")
        f.write('{"output": "2-c.mp4", "pad": "' + "x" * MAX_RECORD_BYTES + '"}\n')  # just over: skipped
    _record(manifest, request, config, tmp_path / "1-b.mp4")
    with open(manifest, "a") as f:
        f.write('{"output": "3-d.mp4", "pad": "' + "x" * (64 << 20))  # a run killed mid-write, or a planted file
    tracemalloc.start()
    try:
        records = read_records(manifest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(records) == ["0-a.mp4", "1-b.mp4"]
    assert request_changes(records["1-b.mp4"], request, config) == []
    assert peak < 4 * MAX_RECORD_BYTES, f"read_records held {peak / 2**20:.0f} MiB"


def test_records_are_never_read_through_a_link(tmp_path):
    (tmp_path / "elsewhere.jsonl").write_text("")
    (tmp_path / "manifest.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(ManifestError, match="symbolic link"):
        read_records(tmp_path / "manifest.jsonl")
    os.mkfifo(tmp_path / "fifo.jsonl")  # refused at once, never a reader blocked on it
    with pytest.raises(ManifestError, match="not a regular file"):
        read_records(tmp_path / "fifo.jsonl")


def test_resume_regenerates_what_changed_and_says_so(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\na blue square moving up\n")
    out = tmp_path / "out"
    quick = ["--set", "sampling.steps=2", "--progress", "none"]
    first = odyssey("batch", prompts, "-o", out, *quick)
    assert first.returncode == 0, first.stderr
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2
    inodes = {v.name: v.stat().st_ino for v in videos}

    # the same request again: nothing to do (the seeds were drawn: another draw is no change)
    again = odyssey("batch", prompts, "-o", out, *quick)
    assert again.returncode == 0, again.stderr
    assert "2 of 2 outputs already complete" in again.stderr and "regenerating" not in again.stderr
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2

    # other settings in the same folder: both regenerated, said once, recorded
    changed = odyssey("batch", prompts, "-o", out, "--set", "sampling.steps=3", "--progress", "none")
    assert changed.returncode == 0, changed.stderr
    lines = [line for line in changed.stderr.splitlines() if "regenerating" in line]
    assert len(lines) == 1 and "2 of 2 outputs" in lines[0] and "(steps 2 -> 3)" in lines[0], changed.stderr
    assert "already complete" not in changed.stderr
    assert {v.name: v.stat().st_ino for v in sorted(out.glob("*.mp4"))}.keys() == inodes.keys()
    assert all(v.stat().st_ino != inodes[v.name] for v in out.glob("*.mp4")), "the videos were not rewritten"
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["request"]["steps"] for r in records] == [2, 2, 3, 3]
    assert all(read_mp4(v)[0].shape[0] == 17 for v in out.glob("*.mp4"))

    # videos whose record is gone: kept, and said so
    (out / "manifest.jsonl").unlink()
    unknown = odyssey("batch", prompts, "-o", out, *quick)
    assert unknown.returncode == 0, unknown.stderr
    assert "2 of 2 outputs already complete" in unknown.stderr and "2 of them have no record" in unknown.stderr
    assert not (out / "manifest.jsonl").exists()


def test_records_compare_the_boundary_of_two_expert_models(tmp_path):
    """A two-expert model's record holds the boundary it ran with (its model_index.json's when the config says
    null); records written before the boundary was (no field, or the config's null) compare as the folder's own."""
    from tests.tiny_models import wan22_a14b_folder

    model = wan22_a14b_folder(tmp_path / "a14b", "original")  # no model_index.json: upstream's 0.875
    sets = [f"model.path={model}", "video.height=32", "video.width=48", "video.frames=5"]
    config = load_config("wan2.2-t2v-a14b", sets)
    request = GenerateRequest("a cat", seed=1).resolve(config)
    manifest = tmp_path / "manifest.jsonl"
    _record(manifest, request, config, tmp_path / "0-a.mp4")
    made = read_records(manifest)["0-a.mp4"]
    assert made["model.boundary_ratio"] == 0.875
    assert request_changes(made, request, config) == []
    half = load_config("wan2.2-t2v-a14b", [*sets, "model.boundary_ratio=0.5"])
    assert request_changes(made, request, half) == ["model.boundary_ratio 0.875 -> 0.5"]
    assert request_changes({**made, "model.boundary_ratio": 0.5}, request, half) == []

    old = {k: v for k, v in made.items() if k != "model.boundary_ratio"}
    assert request_changes(old, request, config) == [] and request_changes({**old, "model.boundary_ratio": None},
                                                                            request, config) == []
    assert request_changes(old, request, half) == ["model.boundary_ratio 0.875 -> 0.5"]
    # a one-DiT model has no boundary: its old records are unchanged, its new ones say null
    tiny = load_config("tiny")
    small = GenerateRequest("a red circle moving right", seed=5).resolve(tiny)
    _record(manifest, small, tiny, tmp_path / "1-b.mp4")
    made = read_records(manifest)["1-b.mp4"]
    assert made["model.boundary_ratio"] is None and request_changes(made, small, tiny) == []
    assert request_changes({k: v for k, v in made.items() if k != "model.boundary_ratio"}, small, tiny) == []
