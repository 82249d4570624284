"""Ulysses x Ring end to end (issue #13): `odyssey generate --ulysses 2 --ring 2` on a local Ray gives the MP4 of
one rank. On a simulated two-node cluster (the replica's two Ulysses groups one per node, a ring across them):
tests/test_ray_multinode.py, which shares its two-node cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from cluster.cli import DEFAULT_PRESET  # noqa: E402
from cluster.video import StreamingMP4, read_mp4  # noqa: E402
from configs import load_config  # noqa: E402
from pipeline.launcher import LocalLauncher  # noqa: E402
from pipeline.request import Frame, GenerateRequest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def odyssey(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_generate_over_ulysses2_x_ring2_gives_the_mp4_of_one_rank(tmp_path):
    """The embedded model on 4 ranks (a ring of two Ulysses pairs) through the CLI, and on one rank in this process,
    written by the same MP4 writer and decoded back. The layout is reported: a visible line and the manifest."""
    steps = "sampling.steps=6"  # the layout is the point, not the sampler's 20 steps
    ring = odyssey("generate", "a red circle moving right", "--seed", 7, "--progress", "lines", "-o",
                   tmp_path / "ring.mp4", "--ulysses", 2, "--ring", 2, "--manifest", tmp_path / "ring.jsonl",
                   "--set", steps)
    assert ring.returncode == 0, ring.stderr
    record = json.loads((tmp_path / "ring.jsonl").read_text())
    parallel = record["config"]["parallel"]
    assert (parallel["ring_degree"], parallel["ulysses_degree"]) == (2, 2)
    ip = record["placement"]["nodes"][0]
    assert record["placement"] == {"replica": 0, "nodes": [ip] * 4}
    assert f"replica 0 up: cfg 1 x ring 2 x ulysses 2 over 1 node: ranks 0-3 on {ip} (STRICT_PACK)" in ring.stderr
    one = load_config(DEFAULT_PRESET, [steps])
    with LocalLauncher(one, timeout_s=120) as group:
        request = GenerateRequest("a red circle moving right", seed=7).resolve(one)
        writer = StreamingMP4(tmp_path / "one.mp4", request.fps)
        for e in group.generate(request):
            if isinstance(e, Frame):
                writer.append(e.image)
        writer.commit()
    got, fps = read_mp4(tmp_path / "ring.mp4")
    want, _ = read_mp4(tmp_path / "one.mp4")
    assert got.shape == want.shape and got.shape[0] > 1 and fps > 0
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_ring_usage_errors_exit_2_with_one_line(capsys, monkeypatch):
    """main() in this process, refused before any Ray (the real entrypoint's exit: tests/test_shard_cli.py)."""
    import cluster.driver as driver_mod
    from cluster.cli import main

    def refuse(*a, **k):
        raise AssertionError("Ray was started for a run that had to be refused first")

    monkeypatch.setattr(driver_mod, "connect_ray", refuse)
    for args, message in ((["--ring", "0"], "--ring"),
                          (["--set", "parallel.ring_degree=-1"], "ring_degree must be >= 1, got -1")):
        with pytest.raises(SystemExit) as e:
            main(["generate", "x", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err


def test_the_replica_up_line_gives_each_nodes_run_of_ranks():
    from cluster.replica import describe_ranks

    config = load_config("cpu-smoke", ["parallel.ulysses_degree=2", "parallel.ring_degree=2"])
    assert describe_ranks(config, ["10.0.0.1"] * 2 + ["10.0.0.2"] * 2, "PACK") == \
        "cfg 1 x ring 2 x ulysses 2 over 2 nodes: ranks 0-1 on 10.0.0.1, 2-3 on 10.0.0.2 (PACK)"
    config = load_config("cpu-smoke", ["parallel.ulysses_degree=1", "parallel.cfg_degree=2"])
    assert describe_ranks(config, ["10.0.0.1", "10.0.0.2"], "PACK") == \
        "cfg 2 x ring 1 x ulysses 1 over 2 nodes: rank 0 on 10.0.0.1, 1 on 10.0.0.2 (PACK)"
