"""Ulysses x Ring end to end (issue #13): `odyssey generate --ulysses 2 --ring 2` on a local Ray gives the MP4 of
one rank, and on a simulated two-node cluster the replica's two Ulysses groups land one per node, a ring across
them, and generate the same video."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.driver import Driver, Job  # noqa: E402
from cluster.cli import DEFAULT_PRESET  # noqa: E402
from cluster.video import StreamingMP4, read_mp4  # noqa: E402
from configs import load_config  # noqa: E402
from pipeline.launcher import LocalLauncher  # noqa: E402
from pipeline.request import Frame, GenerateRequest  # noqa: E402
from tests.ray_helpers import assert_cluster_clean  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def odyssey(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_generate_over_ulysses2_x_ring2_gives_the_mp4_of_one_rank(tmp_path):
    """The embedded model on 4 ranks (a ring of two Ulysses pairs) through the CLI, and on one rank in this process,
    written by the same MP4 writer and decoded back. The layout is reported: a visible line and the manifest."""
    ring = odyssey("generate", "a red circle moving right", "--seed", 7, "--progress", "lines", "-o",
                   tmp_path / "ring.mp4", "--ulysses", 2, "--ring", 2, "--manifest", tmp_path / "ring.jsonl")
    assert ring.returncode == 0, ring.stderr
    record = json.loads((tmp_path / "ring.jsonl").read_text())
    parallel = record["config"]["parallel"]
    assert (parallel["ring_degree"], parallel["ulysses_degree"]) == (2, 2)
    ip = record["placement"]["nodes"][0]
    assert record["placement"] == {"replica": 0, "nodes": [ip] * 4}
    assert f"replica 0 up: cfg 1 x ring 2 x ulysses 2 over 1 node: ranks 0-3 on {ip} (STRICT_PACK)" in ring.stderr
    one = load_config(DEFAULT_PRESET, [])
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


def test_ring_usage_errors_exit_2_with_one_line():
    result = odyssey("generate", "x", "--ring", 0)
    assert result.returncode == 2 and "--ring" in result.stderr
    result = odyssey("generate", "x", "--set", "parallel.ring_degree=-1")
    assert result.returncode == 2 and "ring_degree must be >= 1, got -1" in result.stderr


@pytest.fixture(scope="module")
def two_nodes():
    """Two nodes of 1 CPU and 2 fake GPUs each: a replica of ring 2 x ulysses 2 must span both."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2}, connect=False)
    cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_ring_of_two_single_node_ulysses_groups_on_two_nodes(two_nodes, tmp_path):
    base = ["runtime.collective_timeout_s=60", "runtime.placement_timeout_s=60"]
    config = load_config("cpu-smoke", [*base, "parallel.ulysses_degree=2", "parallel.ring_degree=2",
                                       "runtime.device=auto", "runtime.accelerator_check=false"])  # fake GPUs
    request = GenerateRequest("a blue square moving up", seed=3).resolve(config)
    frames = []
    with Driver(config, progress=False, on_event=lambda job, e: isinstance(e, Frame) and frames.append(e.image)) \
            as driver:
        assert driver.shape.bundles() == [{"CPU": 1.0, "GPU": 2.0}] * 2 and driver.shape.strategy == "PACK"
        assert driver.wait_ready(timeout_s=120) == 1
        nodes = [info.node_id for info in driver.replicas[0].infos]  # by rank
        # ranks 0, 1 (ring index 0) on one node, 2, 3 (ring index 1) on the other: Ulysses pairs never split
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2], nodes
        (outcome,) = driver.run([Job(0, request, tmp_path / "ring.mp4")])
    assert outcome.ok, outcome.error
    one = load_config("cpu-smoke", base)
    with LocalLauncher(one, timeout_s=120) as group:
        want = np.stack([e.image for e in group.generate(request) if isinstance(e, Frame)])
    assert len(frames) == len(want) > 1
    assert np.abs(np.stack(frames).astype(int) - want.astype(int)).max() <= 1
    assert read_mp4(tmp_path / "ring.mp4")[0].shape == want.shape
    assert_cluster_clean()


def test_the_replica_up_line_gives_each_nodes_run_of_ranks():
    from cluster.replica import describe_ranks

    config = load_config("cpu-smoke", ["parallel.ulysses_degree=2", "parallel.ring_degree=2"])
    assert describe_ranks(config, ["10.0.0.1"] * 2 + ["10.0.0.2"] * 2, "PACK") == \
        "cfg 1 x ring 2 x ulysses 2 over 2 nodes: ranks 0-1 on 10.0.0.1, 2-3 on 10.0.0.2 (PACK)"
    config = load_config("cpu-smoke", ["parallel.ulysses_degree=1", "parallel.cfg_degree=2"])
    assert describe_ranks(config, ["10.0.0.1", "10.0.0.2"], "PACK") == \
        "cfg 2 x ring 1 x ulysses 1 over 2 nodes: rank 0 on 10.0.0.1, 1 on 10.0.0.2 (PACK)"
