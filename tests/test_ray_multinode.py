"""Two replicas x SP=2, and one replica of Ulysses 2 x Ring 2, on a simulated two-node cluster with fake GPUs (gloo
underneath): one cluster for the module."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.driver import Driver, Job  # noqa: E402
from cluster.video import read_mp4  # noqa: E402
from configs import load_config  # noqa: E402
from pipeline.launcher import LocalLauncher  # noqa: E402
from pipeline.request import Frame, GenerateRequest  # noqa: E402
from tests.ray_helpers import assert_cluster_clean, ray_config  # noqa: E402
from tests.tiny_models import wan_pipeline_folder  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2},
                      connect=False)
    cluster.add_node(num_cpus=1, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "wan")


def test_two_replicas_on_two_nodes(two_nodes, folder, tmp_path):
    # Fake GPU resources: torch sees no CUDA, so the accelerator check (on by default) is turned off.
    config = ray_config(folder, "parallel.replicas=2", "parallel.ulysses_degree=2", "runtime.device=auto",
                        "runtime.accelerator_check=false")
    jobs = [Job(i, GenerateRequest(f"prompt {i}", seed=i).resolve(config), tmp_path / f"{i}.mp4") for i in range(4)]
    with Driver(config, progress=False) as driver:
        assert driver.shape.num_gpus == 1 and driver.shape.strategy == "STRICT_PACK"
        assert driver.shape.bundles() == [{"CPU": 1.0, "GPU": 2.0}]  # one bundle per Ulysses group
        assert driver.wait_ready(timeout_s=120) == 2
        nodes = [{info.node_id for info in r.infos} for r in driver.replicas]
        assert all(len(n) == 1 for n in nodes), "a replica spans nodes"
        assert nodes[0] != nodes[1], "both replicas on one node"
        assert all(info.gpu_ids for r in driver.replicas for info in r.infos)
        assert [sorted(i.gpu_ids for i in r.infos) == [i.gpu_ids for i in r.infos] for r in driver.replicas] == [
            True, True], "ranks not in GPU order"
        outcomes = driver.run(jobs)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert {o.result is not None for o in outcomes} == {True}
    for o in outcomes:
        assert read_mp4(o.path)[0].shape == (9, 32, 48, 3)
    assert_cluster_clean()


def test_a_worker_given_a_gpu_that_torch_cannot_see_fails_clearly(two_nodes, folder, tmp_path):
    """A node fault, not a config error: rebuilt (it might land on a good node), and the batch ends only when no
    replica could be started after runtime.max_retries such failures, naming the node."""
    from cluster.replica import ReplicaFailed

    config = ray_config(folder, "parallel.ulysses_degree=2", "runtime.device=auto",  # accelerator_check on
                        "runtime.max_retries=1", "runtime.rebuild_backoff_s=0.1", "runtime.rebuild_backoff_max_s=0.2")
    with pytest.raises(ReplicaFailed, match=r"no replica could be started in \d+ s: replica 0: AcceleratorMissing: "
                                            r"Ray gave this worker GPU\(s\) \['\d'\] on node [\d.]+ \(\w+\) but "
                                            r"torch sees no CUDA device \(CUDA_VISIBLE_DEVICES="):
        with Driver(config, progress=False):
            pass
    assert_cluster_clean()


def test_a_ring_of_two_single_node_ulysses_groups_on_two_nodes(two_nodes, tmp_path):
    """Ulysses x Ring (issue #13; the CLI on a local Ray: tests/test_ring_e2e.py): a replica of ring 2 x ulysses 2
    spans both nodes of 2 fake GPUs, one Ulysses pair per node, and streams the frames of one rank."""
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


def test_a_lost_node_costs_a_retry_and_its_replica_comes_back_with_the_node(two_nodes, folder, tmp_path, caplog):
    """Runs last: it replaces the worker node. The node under one replica goes away mid-prompt: the prompt is retried
    on the other replica; rebuilding the lost one fails while there is no room (after runtime.scale_up_timeout_s),
    and the slot keeps trying with backoff until a new node joins, then serves again."""
    import logging
    import time

    from pipeline.request import Progress

    caplog.set_level(logging.WARNING, logger="cluster.driver")
    config = ray_config(folder, "parallel.replicas=2", "parallel.ulysses_degree=2", "runtime.device=auto",
                        "runtime.accelerator_check=false", "sampling.steps=8", "runtime.scale_up_timeout_s=3",
                        "runtime.rebuild_backoff_s=0.5", "runtime.rebuild_backoff_max_s=2")

    def jobs(n, first=0):
        return [Job(i, GenerateRequest(f"prompt {i}", seed=i).resolve(config), tmp_path / f"{i}.mp4")
                for i in range(first, first + n)]

    head_id = two_nodes.head_node.node_id
    state = {}

    def rebuild_failures():
        return [r.getMessage() for r in caplog.records if "could not be started" in r.getMessage()]

    def on_event(job, event):
        if "victim" not in state and isinstance(event, Progress) and event.stage == "denoise" and event.step == 2:
            # the replica serving this prompt, if it is on the worker node (the head cannot be removed)
            slot = next((i for i, r in enumerate(driver.replicas) if r is not None and r.infos[0].node_id != head_id
                         and r.health()[0]["request_id"] == job.request.request_id), None)
            if slot is not None:
                node = next(n for n in two_nodes.worker_nodes if n.node_id == driver.replicas[slot].infos[0].node_id)
                state.update(victim=slot, job=job.index)
                two_nodes.remove_node(node)

    with Driver(config, progress=False, on_event=on_event) as driver:
        assert driver.wait_ready(timeout_s=120) == 2
        first = driver.run(jobs(6))
        assert "victim" in state, "no prompt ran on the worker node's replica"
        deadline = time.time() + 120  # a new node joins only once a rebuild has failed for want of room
        while not rebuild_failures() and time.time() < deadline:
            time.sleep(0.2)
        state["failed_before_join"] = rebuild_failures()
        two_nodes.add_node(num_cpus=1, num_gpus=2)
        assert driver.wait_ready(timeout_s=120) == 2, "the lost replica's slot was given up"
        second = driver.run(jobs(2, first=6))  # two idle replicas: one prompt each
    assert all(o.ok for o in first + second), [o.error for o in first + second]
    lost = next(o for o in first if o.job.index == state["job"])
    assert lost.job.attempts == 1 and lost.replica != state["victim"]  # retried once, on the other replica
    assert state["failed_before_join"], "no rebuild failed while the node was gone"
    assert {o.replica for o in second} == {0, 1}
    assert_cluster_clean()
