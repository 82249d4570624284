"""Ray orchestration on a real local Ray cluster (CPU actors, gloo): same video as the plain launcher, frames
streamed before the call returns, a SIGKILLed worker costs a retry, not the batch."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from cluster.driver import Driver, Job  # noqa: E402
from cluster.video import read_mp4  # noqa: E402
from pipeline.launcher import LocalLauncher  # noqa: E402
from pipeline.request import Frame, GenerateRequest, Progress, Result  # noqa: E402
from tests.ray_helpers import assert_cluster_clean, ray_config  # noqa: E402
from tests.tiny_models import wan_pipeline_folder  # noqa: E402


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def luma(x):
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def assert_close_video(decoded, frames):
    """H.264 yuv420p keeps luma at full resolution and chroma at a quarter: random-weight frames are noise, so
    compare luma pixel by pixel and color per frame."""
    decoded, frames = decoded.astype(float), frames.astype(float)
    assert np.abs(luma(decoded) - luma(frames)).mean() < 6
    assert np.abs(decoded.mean((1, 2)) - frames.mean((1, 2))).max() < 4


def jobs_for(config, out, prompts):
    return [Job(i, GenerateRequest(p, seed=100 + i).resolve(config), out / f"{i}.mp4", name=p)
            for i, p in enumerate(prompts)]


def test_sp2_through_actors_matches_the_plain_launcher(local_ray, wan_folder, tmp_path):
    config = ray_config(wan_folder, "parallel.ulysses_degree=2")
    frames = []
    with Driver(config, progress=False, manifest=tmp_path / "manifest.jsonl",
                on_event=lambda job, e: isinstance(e, Frame) and frames.append(e.image)) as driver:
        (outcome,) = driver.run(jobs_for(config, tmp_path, ["a red circle moving right"]))
    assert outcome.ok, outcome.error
    with LocalLauncher(config, timeout_s=120) as group:
        want = [e.image for e in group.generate(outcome.job.request) if isinstance(e, Frame)]
    assert len(frames) == len(want) == 9
    assert np.abs(np.stack(frames).astype(int) - np.stack(want).astype(int)).max() <= 1
    video, fps = read_mp4(outcome.path)
    assert video.shape == (9, 32, 48, 3) and fps == 16
    assert_close_video(video, np.stack(frames))
    assert (tmp_path / "manifest.jsonl").read_text().count("\n") == 1
    assert not list(tmp_path.glob(".*partial*"))
    assert_cluster_clean()


def test_health_answers_while_a_generation_runs(local_ray, wan_folder, tmp_path):
    config = ray_config(wan_folder, "sampling.steps=60")
    seen = []

    def on_event(job, event):
        if isinstance(event, Progress) and event.stage == "denoise" and event.step == 1:
            seen.extend(driver.replicas[0].health(timeout_s=5))

    with Driver(config, progress=False, on_event=on_event) as driver:
        (outcome,) = driver.run(jobs_for(config, tmp_path, ["a red circle moving right"]))
    assert outcome.ok
    (health,) = seen
    # Answered on the control thread mid-denoising, not queued behind the generation.
    assert health["stage"] == "denoise" and health["step"] < 60 and health["request_id"] == outcome.job.request.request_id


def test_first_frame_arrives_before_the_generation_returns(local_ray, wan_folder, tmp_path):
    config = ray_config(wan_folder, "video.frames=41")
    arrivals = {}

    def on_event(job, event):
        if isinstance(event, Frame) and event.index == 0:
            arrivals["first_frame"] = time.time()
        if isinstance(event, Result):
            arrivals["finished"] = event.finished_at

    with Driver(config, progress=False, on_event=on_event) as driver:
        (outcome,) = driver.run(jobs_for(config, tmp_path, ["a blue square moving left"]))
    assert outcome.ok and outcome.result.num_frames == 41
    assert arrivals["first_frame"] < arrivals["finished"]


@pytest.mark.parametrize("victim", [1, 0])
def test_sigkilled_worker_costs_a_retry_not_the_batch(local_ray, wan_folder, tmp_path, victim):
    config = ray_config(wan_folder, "parallel.ulysses_degree=2", "parallel.replicas=2", "sampling.steps=6")
    killed = []

    def on_event(job, event):
        if (job.index == 0 and not killed and isinstance(event, Progress) and event.stage == "denoise"
                and event.step == 2):
            replica = next(r for r in driver.replicas if r is not None and r.workers
                           and r.health()[0]["request_id"] == job.request.request_id)  # the one serving job 0
            pid = replica.pids()[victim]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    t0 = time.time()
    with Driver(config, progress=False, on_event=on_event, manifest=tmp_path / "manifest.jsonl") as driver:
        outcomes = driver.run(jobs_for(config, tmp_path, [f"prompt {i}" for i in range(4)]))
    assert killed, "the worker was never killed"
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert outcomes[0].job.attempts == 1 and all(o.job.attempts == 0 for o in outcomes[1:])
    assert time.time() - t0 < 120  # noticed within seconds, never the collective timeout
    for o in outcomes:
        video, _ = read_mp4(o.path)
        assert video.shape == (9, 32, 48, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.mp4", "1.mp4", "2.mp4", "3.mp4", "manifest.jsonl"]
    assert_cluster_clean()


def test_rejected_request_is_reported_and_the_batch_goes_on(local_ray, wan_folder, tmp_path, monkeypatch):
    """The workers' own check (before their first collective), behind the driver's: with the driver's check skipped,
    an invalid request fails alone, is not retried, and the replica serves the next one."""
    import cluster.driver

    monkeypatch.setattr(cluster.driver, "check_batch", lambda *args: None)
    config = ray_config(wan_folder)
    jobs = jobs_for(config, tmp_path, ["fine", "too wide", "also fine"])
    jobs[1].request = dataclasses.replace(jobs[1].request, width=40)  # invalid for the model, bypassing resolve
    with Driver(config, progress=False) as driver:
        outcomes = driver.run(jobs)
        builds = driver.builds
    assert [o.ok for o in outcomes] == [True, False, True]
    assert builds == 1  # the replica stayed up
    assert "rejected" in outcomes[1].error and "multiples of 16" in outcomes[1].error
    assert outcomes[1].job.attempts == 0 and not (tmp_path / "1.mp4").exists()
    assert_cluster_clean()


def test_an_out_of_memory_prompt_fails_alone_and_is_not_retried(local_ray, wan_folder, tmp_path):
    """A worker exception that is not a death (here a real allocation failure: a prompt asking for a 256 TB latent)
    fails that prompt with its message; the replica is rebuilt once (ranks may be stuck mid-collective), the prompt
    is not retried, and the batch goes on."""
    # limits raised on purpose, as a user would for a huge video: the driver lets it through to the workers
    config = ray_config(wan_folder, "parallel.ulysses_degree=2", "runtime.max_retries=2", "limits.max_frames=20000",
                        f"limits.max_pixels={2**36}")
    jobs = jobs_for(config, tmp_path, ["fine", "oversized", "also fine"])
    jobs[1].request = GenerateRequest("oversized", seed=1, height=2**18, width=2**18, frames=4 * 4095 + 1).resolve(
        config)
    with Driver(config, progress=False) as driver:
        outcomes = driver.run(jobs)
        builds = driver.builds
    assert [o.ok for o in outcomes] == [True, False, True], [o.error for o in outcomes]
    assert "RuntimeError" in outcomes[1].error and "allocate" in outcomes[1].error
    assert outcomes[1].job.attempts == 0 and builds == 2  # one rebuild, not one load per retry
    assert not (tmp_path / "1.mp4").exists()
    assert_cluster_clean()


def test_rank0_publishes_a_port_its_store_already_holds(local_ray, wan_folder):
    """No pick-a-free-port-then-close race: the port rank 0 publishes is bound by its store from the moment it is
    chosen, so nothing else can take it before the other ranks connect."""
    import errno
    import socket

    from actors import SPWorker

    worker = SPWorker.options(num_cpus=0.1).remote(ray_config(wan_folder), 1)
    try:
        host, port = ray.get(worker.open_store.remote(), timeout=60)
        with socket.socket() as s, pytest.raises(OSError) as err:
            s.bind((host, port))
        assert err.value.errno == errno.EADDRINUSE
        # and it listens on the node's address only, not on every interface (0.0.0.0 / ::)
        assert listening_addresses(port) == {host}
    finally:
        ray.kill(worker)


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the listening TCP sockets on `port`, from /proc/net/tcp{,6} (hex, little-endian)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host order
                ip = ipaddress.ip_address(raw)
                found.add(str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip))
    return found


def test_gpus_that_never_arrive_fail_after_the_scale_up_timeout(local_ray, wan_folder):
    """runtime.device=cuda on a cluster without GPUs (and no autoscaler to add any): the driver asks, waits
    runtime.scale_up_timeout_s, then fails with one line naming what is missing; never CPU ranks instead."""
    from cluster.replica import ReplicaFailed

    config = ray_config(wan_folder, "runtime.device=cuda", "runtime.scale_up_timeout_s=3")
    t0 = time.time()
    with pytest.raises(ReplicaFailed, match=r"no replica could be started in \d+ s: replica 0: waited 3 s "
                                            r"\(runtime.scale_up_timeout_s\) for \[\{'CPU': 1.0, 'GPU': 1.0\}\] "
                                            r"\(PACK\); the cluster has 0 GPUs and 4 CPUs"):
        with Driver(config, progress=False):
            pass
    assert 3 <= time.time() - t0 < 60
    assert_cluster_clean()


@ray.remote(num_cpus=0.1, max_restarts=0, concurrency_groups={"control": 1})
class ScriptedRank:
    """A stand-in SPWorker whose serving calls raise what the test says (by rank), and whose peers hang the way
    ranks left in a collective do."""

    def __init__(self, rank, errors, init_error=None):
        if init_error is not None:
            raise init_error
        self.rank, self.errors = rank, errors

    def stream(self, request):
        yield "progress"
        if self.errors.get(0):
            raise self.errors[0]

    def run(self, request):
        error = self.errors.get(self.rank)
        if error == "hang":  # stuck in the broadcast rank 0 never reached, until the collective timeout
            time.sleep(30)
            raise RuntimeError("collective timed out")
        if error is not None:
            raise error

    def fail(self, error):
        raise error

    @ray.method(concurrency_group="control")
    def health(self):
        return {}


def scripted_replica(errors, n=2):
    import threading

    from cluster.replica import Replica

    r = Replica.__new__(Replica)
    r.index, r.stop, r.pg = 0, threading.Event(), None
    r.workers = [ScriptedRank.remote(k, errors) for k in range(n)]
    return r


def test_only_a_rejection_in_the_first_collective_keeps_the_replica(local_ray):
    """A ValueError rank 0 raises after _agree (a tokenizer, a torch op) leaves its peers in a collective: the
    prompt fails at once (RequestFailed: the replica is rebuilt), never "rejected, replica intact" after the
    collective timeout. Only RequestRejectedError on every rank keeps the replica."""
    from cluster.replica import RequestFailed, RequestRejected
    from pipeline.request import RequestRejectedError

    cases = [({0: ValueError("late error on rank 0"), 1: "hang"}, RequestFailed, "late error on rank 0"),
             ({0: RequestRejectedError("width must be a multiple of 16"),
               1: RequestRejectedError("rank(s) [0] rejected")}, RequestRejected, "multiple of 16"),
             ({0: RequestRejectedError("width must be a multiple of 16")}, RequestFailed, r"only rank\(s\) \[0\]")]
    for errors, expected, message in cases:
        replica = scripted_replica(errors)
        t0 = time.time()
        try:
            with pytest.raises(expected, match=message):
                list(replica.run(None))
            assert time.time() - t0 < 15  # not after the peer's collective timeout
        finally:
            replica.kill()


def test_start_failures_are_classified_for_the_rebuild_policy(local_ray):
    """Retryable: a predecessor still holds the GPU (MemoryBusy). Deterministic (give up after max_retries when no
    replica is up): a node whose GPU torch cannot see, a worker whose constructor raises (bad image)."""
    import threading

    from actors.worker import AcceleratorMissing
    from cluster.replica import Replica, ReplicaFailed
    from pipeline.memory import MemoryBusy

    r = Replica.__new__(Replica)
    r.index, r.stop = 0, threading.Event()
    worker = ScriptedRank.remote(0, {})
    broken = ScriptedRank.remote(0, {}, ImportError("no module named flash_attn"))
    try:
        for ref, deterministic, message in [
                (worker.fail.remote(MemoryBusy("GPU 0 still holds 70 GB")), False, "MemoryBusy"),
                (worker.fail.remote(AcceleratorMissing("Ray gave this worker GPU(s) ['0'] on node 10.0.0.7")), True,
                 r"AcceleratorMissing: .* on node 10\.0\.0\.7"),
                (broken.health.remote(), True, "a worker died while starting")]:
            with pytest.raises(ReplicaFailed, match=message) as failed:
                r._wait([ref], 60, lambda: "timed out")
            assert failed.value.deterministic is deterministic, message
    finally:
        ray.kill(worker)
        ray.kill(broken)
