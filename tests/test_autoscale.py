"""Placement on an autoscaling cluster, with Ray's fake multi-node provider: the head has no GPU when the batch
starts; the driver asks the autoscaler for GPU nodes, waits for them instead of failing, starts on the first
replica placed and serves with both once their nodes have joined.

The fake provider's worker nodes join the GCS on port 6379, so only one such cluster can run on a machine at a
time: the test is skipped (saying why) when the port is taken. The head is started as `ray start --head --block`
in its own process group and ended by process id (never `ray stop`, which would end every Ray on the machine)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from cluster.driver import Driver, Job  # noqa: E402
from cluster.video import read_mp4  # noqa: E402
from pipeline.request import GenerateRequest  # noqa: E402
from tests.ray_helpers import assert_cluster_clean, ray_config  # noqa: E402
from tests.tiny_models import wan_pipeline_folder  # noqa: E402

FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # what the fake provider calls its head
PORT = 6379  # fixed by the fake provider


def autoscaler_config(path: Path) -> Path:
    no_commands = {k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")}
    config = {
        "cluster_name": "odyssey-fake", "max_workers": 2, "upscaling_speed": 2.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_node": {"resources": {"CPU": 2, "GPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {"ssh_user": "nobody"}, "docker": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **no_commands,
    }
    path.write_text(json.dumps(config))
    return path


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0 or s.connect_ex((ray.util.get_node_ip_address(), port)) == 0


def set_auth_mode(mode: str | None) -> None:
    """RAY_AUTH_MODE for this process (None: unset), re-read by Ray's cached config as ray.init() itself does; the
    token loader caches its answer too (without the reset the driver's server still demands the token)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    if ray.is_initialized():
        ray.shutdown()
    if port_taken(PORT):
        pytest.skip(f"port {PORT} is in use (another fake autoscaling cluster?); the fake provider needs it")
    tmp = tmp_path_factory.mktemp("autoscale")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    # `ray start` turns token authentication on whenever ~/.ray/auth_token exists. This throwaway test cluster runs
    # without it, and so must this process: an earlier local ray.init() in it (other test modules) left
    # RAY_AUTH_MODE=token in os.environ and Ray's cached config, and the driver's own gRPC server would then refuse
    # the head's unauthenticated calls (the GCS, refused when it asks the owner about its actors, destroys every
    # actor before it starts: "all references to the actor were removed").
    env["RAY_AUTH_MODE"] = "disabled"
    saved_auth_mode = os.environ.get("RAY_AUTH_MODE")
    log = open(tmp / "head.log", "w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={PORT}", "--num-cpus=1", "--num-gpus=0",
         "--include-dashboard=false", f"--autoscaling-config={autoscaler_config(tmp / 'autoscaler.json')}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    spawned: dict[int, psutil.Process] = {}
    try:
        set_auth_mode("disabled")
        deadline = time.time() + 120
        while "Ray runtime started" not in (tmp / "head.log").read_text():  # a failed ray.init leaves state behind
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the fake autoscaling head did not start: {(tmp / 'head.log').read_text()}")
            time.sleep(0.5)
        ray.init(address=f"{ray.util.get_node_ip_address()}:{PORT}", logging_level="WARNING")
        yield head, spawned
    finally:
        if ray.is_initialized():
            ray.shutdown()
        try:  # the fake nodes are processes the head's autoscaler spawned: end exactly those, by id
            spawned.update({p.pid: p for p in psutil.Process(head.pid).children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=5)  # `ray start --block` can sit out any wait on SIGTERM: the group is killed next
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(head.pid, signal.SIGKILL)
        for p in spawned.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
        set_auth_mode(saved_auth_mode)


def test_a_batch_with_two_replicas_scales_the_cluster_up_and_uses_both(autoscaling_cluster, tmp_path, monkeypatch):
    """The replicas' pending placement groups alone make the autoscaler add nodes: no request_resources, whose
    cluster-wide request would outlive a killed driver. The batch starts on the first replica; the second joins
    mid-batch; a second batch uses both."""
    import threading

    import ray.autoscaler.sdk

    import cluster.driver
    from cluster.replica import Replica

    requests = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda *a, **k: requests.append((a, k)))
    batch_started, joined_mid_batch = threading.Event(), []

    class SecondJoinsMidBatch(Replica):
        def start(self):  # replica 1 is built only once the first batch runs (its node may be up already)
            while self.index == 1 and not batch_started.wait(0.5) and not self.stop.is_set():
                pass
            return super().start()

    def on_event(job, event):
        if not batch_started.is_set():
            batch_started.set()
            deadline = time.time() + 240
            while driver.replicas[1] is None and time.time() < deadline:
                time.sleep(0.2)
            joined_mid_batch.append(driver.replicas[1] is not None)

    monkeypatch.setattr(cluster.driver, "Replica", SecondJoinsMidBatch)
    head, spawned = autoscaling_cluster
    assert ray.cluster_resources().get("GPU", 0) == 0  # only the CPU head: the GPUs do not exist yet
    folder = wan_pipeline_folder(tmp_path / "wan")
    config = ray_config(folder, "parallel.replicas=2", "parallel.ulysses_degree=2", "runtime.device=cuda",
                        "runtime.accelerator_check=false",  # fake GPUs: torch sees none
                        "runtime.scale_up_timeout_s=300", "runtime.placement_timeout_s=120")
    jobs = [Job(i, GenerateRequest(f"prompt {i}", seed=i).resolve(config), tmp_path / f"{i}.mp4") for i in range(6)]
    t0 = time.time()
    with Driver(config, progress=False, on_event=on_event) as driver:
        # start() returned: a replica is up, on GPUs that only exist because the driver's placement groups asked
        assert ray.cluster_resources().get("GPU", 0) >= 2
        assert driver.shape.num_gpus == 1 and driver.shape.bundles() == [{"CPU": 2.0, "GPU": 2.0}]
        up_at_first_batch = sum(r is not None for r in driver.replicas)
        first = driver.run(jobs[:2])  # starts on replica 0 alone; replica 1 joins while it runs
        # Both replicas idle before the second batch, so both take prompts (these take a fraction of a second each:
        # one replica alone could finish them before the other node has joined).
        both_up = driver.wait_ready(2, timeout_s=240)
        spawned.update({p.pid: p for p in psutil.Process(head.pid).children(recursive=True)})
        outcomes = driver.run(jobs[2:])
        nodes = [{i.node_id for i in r.infos} for r in driver.replicas]
    assert_cluster_clean()  # every placement group removed: the autoscaler's demand is gone with them
    assert requests == []
    assert up_at_first_batch == 1 and joined_mid_batch == [True] and both_up == 2
    assert all(o.ok for o in first + outcomes), [o.error for o in first + outcomes]
    assert {o.replica for o in outcomes} == {0, 1}, "one replica served every prompt"
    assert all(len(n) == 1 for n in nodes) and nodes[0] != nodes[1] and FAKE_HEAD_NODE_ID not in nodes[0] | nodes[1]
    gpu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    assert len(gpu_nodes) == 2
    for o in first + outcomes:
        assert read_mp4(o.path)[0].shape == (9, 32, 48, 3)
    assert time.time() - t0 < 600
