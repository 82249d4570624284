"""The driver's recovery policy, with scripted stand-in replicas (no Ray): which failures are retried, that a slot
is rebuilt with backoff instead of retired, that a settled job is never re-queued, that one writer error fails one
job only, and that a signal inside the file-and-manifest commit waits for the manifest line."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

import cluster.driver as driver_mod
from cluster.driver import Driver, Job, _signals_deferred
from cluster.replica import ReplicaFailed, RequestFailed
from cluster.video import StreamingMP4, read_mp4
from configs import load_config
from pipeline.request import Frame, GenerateRequest, Progress, Result

FRAMES = 3


class Script:
    """What the stand-in replicas do: per build attempt (by slot) and per request (by prompt)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.builds: list[int] = []  # slot of every successful build, in order
        self.build_errors: dict[int, list] = {}  # slot -> exceptions raised by its next builds, in order
        self.served: list[tuple[int, str]] = []  # (slot, prompt) of every attempt
        self.fail: dict[str, list] = {}  # prompt -> exceptions raised by its next attempts (after its events)
        self.fail_after_result: set[str] = set()  # prompts whose replica fails after sending the Result
        self.node_lost_with: dict[str, list] = {}  # prompt -> build errors of its slot once its attempt has failed


class FakeReplica:
    script: Script

    def __init__(self, index, config, shape, stop):
        self.index, self.stop, self.workers, self.killed = index, stop, ["w"], False
        self.nodes = ["10.0.0.1"]  # the node of each rank: the manifest's placement
        self.start_timings = {"placement_s": 0.5}  # the manifest's timings.startup

    def start(self):
        s = self.script
        with s.lock:
            errors = s.build_errors.get(self.index)
            if errors:
                raise errors.pop(0)
            s.builds.append(self.index)
        return self

    def kill(self):
        self.killed = True

    def run(self, request):
        s = self.script
        with s.lock:
            s.served.append((self.index, request.prompt))
            error = s.fail[request.prompt].pop(0) if s.fail.get(request.prompt) else None
        yield Progress(request.request_id, "denoise", 1, 1)
        if error is not None:
            with s.lock:
                s.build_errors[self.index] = s.node_lost_with.pop(request.prompt, [])
            raise error
        for i in range(FRAMES):
            yield Frame(request.request_id, i, FRAMES, np.full((16, 16, 3), 40 * i, np.uint8), time.time())
        yield Result(request.request_id, request.seed, FRAMES, {"total_s": 0.0})
        if request.prompt in s.fail_after_result:
            raise ReplicaFailed(f"replica {self.index} rank 1 died")


@pytest.fixture
def script(monkeypatch):
    s = Script()
    FakeReplica.script = s
    monkeypatch.setattr(driver_mod, "Replica", FakeReplica)
    monkeypatch.setattr(driver_mod, "connect_ray", lambda address, **kw: False)
    monkeypatch.setattr(driver_mod, "cluster_nodes", lambda: [{"CPU": 4.0}])
    return s


def make_config(*overrides):
    return load_config("cpu-smoke", ["runtime.rebuild_backoff_s=0.05", "runtime.rebuild_backoff_max_s=0.2",
                                     *overrides])


def make_jobs(config, out, prompts):
    return [Job(i, GenerateRequest(p, seed=i).resolve(config), out / f"{i}.mp4", name=p) for i, p in enumerate(prompts)]


def test_a_deterministic_error_fails_its_prompt_once_and_the_batch_goes_on(script, tmp_path):
    config = make_config("runtime.max_retries=2")
    script.fail["huge"] = [RequestFailed("replica 0 rank 0: OutOfMemoryError: CUDA out of memory")] * 3
    with Driver(config, progress=False, manifest=tmp_path / "manifest.jsonl") as driver:
        outcomes = driver.run(make_jobs(config, tmp_path, ["a", "huge", "b"]))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert "OutOfMemoryError: CUDA out of memory" in outcomes[1].error and outcomes[1].job.attempts == 0
    assert [p for _, p in script.served].count("huge") == 1  # not retried
    assert len(script.builds) == 2  # rebuilt once (ranks may be stuck in a collective), not once per retry
    assert not (tmp_path / "1.mp4").exists()
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [x["placement"] for x in lines] == [{"replica": 0, "nodes": ["10.0.0.1"]}] * 2
    # the start-up phases of the replica that served each line; this test's Ray was up already (0 s to start)
    assert [(x["timings"]["startup"]["placement_s"], x["timings"]["startup"]["ray_init_s"]) for x in lines] \
        == [(0.5, 0.0)] * 2 and lines[0]["timings"]["startup"]["began_at"] > 1.7e9


def test_a_death_is_retried_on_a_rebuilt_replica(script, tmp_path):
    config = make_config("runtime.max_retries=2")
    script.fail["x"] = [ReplicaFailed("replica 0 rank 1 died: ActorDiedError")]
    with Driver(config, progress=False) as driver:
        (outcome,) = driver.run(make_jobs(config, tmp_path, ["x"]))
    assert outcome.ok and outcome.job.attempts == 1 and len(script.builds) == 2
    assert read_mp4(outcome.path)[0].shape == (FRAMES, 16, 16, 3)


def test_a_job_whose_result_arrived_is_never_requeued(script, tmp_path):
    config = make_config()
    script.fail_after_result.add("x")
    with Driver(config, progress=False) as driver:
        outcomes = driver.run(make_jobs(config, tmp_path, ["x", "y"]))
    assert all(o.ok for o in outcomes) and outcomes[0].job.attempts == 0
    assert [p for _, p in script.served].count("x") == 1


def test_a_failed_rebuild_does_not_retire_the_slot(script, tmp_path):
    """After a node loss the first rebuilds fail (no capacity yet); the slot keeps trying with backoff and serves
    again once they succeed."""
    config = make_config("parallel.replicas=1", "runtime.max_retries=3")
    script.fail["x"] = [ReplicaFailed("replica 0 rank 0 died: NodeDiedError")]
    # the node is gone: the next two builds fail (no capacity yet)
    script.node_lost_with["x"] = [ReplicaFailed("replica 0: waited 1 s for [{'GPU': 2}]")] * 2
    with Driver(config, progress=False) as driver:
        outcomes = driver.run(make_jobs(config, tmp_path, ["x", "y", "z"]))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert script.build_errors[0] == [] and len(script.builds) == 2
    assert outcomes[0].job.attempts == 1


def test_no_replica_for_the_whole_scale_up_timeout_fails_the_batch_clearly(script, tmp_path):
    config = make_config("runtime.scale_up_timeout_s=0.5")
    script.build_errors[0] = [ReplicaFailed("replica 0: waited 0.5 s (runtime.scale_up_timeout_s) for "
                                            "[{'GPU': 8.0}]; the cluster has 0 GPUs")] * 1000
    t0 = time.monotonic()
    with pytest.raises(ReplicaFailed, match=r"no replica could be started in \d+ s: .*the cluster has 0 GPUs"):
        with Driver(config, progress=False):
            pass
    assert time.monotonic() - t0 < 30


def test_replicas_join_as_they_come_up_and_jobs_go_to_whichever_is_up(script, tmp_path):
    config = make_config("parallel.replicas=2")
    script.build_errors[1] = [ReplicaFailed("replica 1: no node yet")] * 3
    with Driver(config, progress=False) as driver:
        first = driver.run(make_jobs(config, tmp_path, ["a"]))
        deadline = time.monotonic() + 20
        while driver.replicas[1] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.replicas[1] is not None, "slot 1 was retired"
    assert first[0].ok and first[0].replica == 0


def test_a_writer_error_fails_that_job_only(script, tmp_path, monkeypatch):
    config = make_config()
    real_append = StreamingMP4.append

    def append(self, frame):
        if self.path.name == "1.mp4":
            raise BrokenPipeError("ffmpeg exited: No space left on device")
        real_append(self, frame)

    monkeypatch.setattr(StreamingMP4, "append", append)
    with Driver(config, progress=False, manifest=tmp_path / "manifest.jsonl") as driver:
        outcomes = driver.run(make_jobs(config, tmp_path, ["a", "b", "c"]))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert "No space left on device" in outcomes[1].error and outcomes[1].job.attempts == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.mp4", "2.mp4", "manifest.jsonl"]  # no partial left


def test_a_failed_rename_fails_that_job_only(script, tmp_path, monkeypatch):
    config = make_config()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("0.mp4"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(driver_mod.StreamingMP4.commit.__globals__["os"], "replace", replace)
    with Driver(config, progress=False, manifest=tmp_path / "manifest.jsonl") as driver:
        outcomes = driver.run(make_jobs(config, tmp_path, ["a", "b"]))
    assert [o.ok for o in outcomes] == [False, True]
    assert "No space left on device" in outcomes[0].error
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.mp4", "manifest.jsonl"]


def test_a_signal_inside_the_commit_is_held_until_the_block_is_done():
    """SIGINT sent to the process while other threads run (the replica slots, Ray's): the block still completes,
    then the interrupt is raised."""
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)
    busy.start()
    done = []
    # Python's own Ctrl-C handler, whatever this process inherited (a shell ignores SIGINT in the commands it
    # starts in the background: pytest run that way would otherwise never see the signal at all)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(50):  # the interpreter checks for pending signals between these
                    time.sleep(0.01)
                done.append("manifest line written")
        assert done == ["manifest line written"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        stop.set()
        signal.signal(signal.SIGINT, inherited)


def test_sigterm_inside_the_commit_is_held_too():
    previous = driver_mod._raise_on_sigterm()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(50):
                    time.sleep(0.01)
                done.append(1)
        assert done == [1]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_manifest_write_error_takes_the_video_with_it(script, tmp_path, monkeypatch):
    """Disk full at the manifest line: the video that was just renamed into place goes too (the two appear together
    or not at all), that job fails, the batch goes on."""
    config = make_config()
    real = Driver._write_manifest

    def write_manifest(self, outcome):
        if outcome.job.index == 0:
            raise OSError(28, "No space left on device")
        real(self, outcome)

    monkeypatch.setattr(Driver, "_write_manifest", write_manifest)
    with Driver(config, progress=False, manifest=tmp_path / "manifest.jsonl") as driver:
        outcomes = driver.run(make_jobs(config, tmp_path, ["a", "b"]))
    assert [o.ok for o in outcomes] == [False, True]
    assert "No space left on device" in outcomes[0].error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.mp4", "manifest.jsonl"]


def test_a_ray_started_here_that_lacks_gpus_fails_at_once(script, monkeypatch):
    """No waiting for GPUs that cannot come: the Ray this process started on a GPU-less machine never grows."""
    from cluster.placement import PlacementError

    monkeypatch.setattr(driver_mod, "connect_ray", lambda address, **kw: True)  # "this call started Ray"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = make_config("runtime.device=cuda", "parallel.ulysses_degree=2")
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"1 replica\(s\) x cfg 1 x ulysses 2 needs 2 GPUs; the cluster has 0 "
                                             r"\(Ray on this machine only; join a cluster with --address"):
        with Driver(config, progress=False):
            pass
    assert time.monotonic() - t0 < 5 and script.builds == []


def test_a_crashed_slot_thread_ends_the_start_instead_of_hanging_it(script, monkeypatch):
    def broken(self, slot, replica):
        raise KeyError("bug")

    monkeypatch.setattr(Driver, "_replica_up", broken)
    with pytest.raises(RuntimeError, match="replica slot 0 crashed: KeyError"):
        with Driver(make_config(), progress=False):
            pass


def test_a_slot_that_failed_a_thousand_builds_keeps_its_backoff_bounded(script, tmp_path):
    """A slot waiting days for capacity: the doubling backoff must not overflow (2 ** 1024 as a float) and end the
    batch; after 1100 failed builds the slot still builds and serves."""
    config = make_config("runtime.rebuild_backoff_s=0.000000001", "runtime.rebuild_backoff_max_s=0.000001",
                         "runtime.scale_up_timeout_s=600")
    script.build_errors[0] = [ReplicaFailed("replica 0: no node yet")] * 1100
    logging.getLogger("cluster.driver").setLevel(logging.ERROR)  # 1100 warnings
    try:
        with Driver(config, progress=False) as driver:
            (outcome,) = driver.run(make_jobs(config, tmp_path, ["x"]))
    finally:
        logging.getLogger("cluster.driver").setLevel(logging.NOTSET)
    assert outcome.ok and script.build_errors[0] == []


def test_an_out_of_memory_kill_is_retried_once_then_fails_the_prompt(script, tmp_path):
    """Ray's memory monitor killed a worker: maybe the node was busy (one retry), maybe the prompt is too big
    (no more: each retry reloads a replica)."""
    from cluster.replica import Replica

    oom = Replica.__new__(Replica)
    oom.index = 0
    killed = oom._failure(1, ray_oom("Task was killed due to the node running low on memory."))
    assert isinstance(killed, ReplicaFailed) and killed.retries == 1 and "low on memory" in str(killed)
    config = make_config("runtime.max_retries=3")
    script.fail["big"] = [killed] * 3
    with Driver(config, progress=False) as driver:
        outcomes = driver.run(make_jobs(config, tmp_path, ["big", "small"]))
    assert [o.ok for o in outcomes] == [False, True]
    assert "low on memory" in outcomes[0].error and outcomes[0].job.attempts == 1
    assert [p for _, p in script.served].count("big") == 2


def ray_oom(message):
    from ray.exceptions import OutOfMemoryError

    return OutOfMemoryError(message)


def test_a_bad_gpu_node_does_not_end_the_batch_while_another_replica_serves(script, tmp_path):
    """Replica 1 keeps landing on a node whose GPU torch cannot see (deterministic): replica 0 serves the batch."""
    config = make_config("parallel.replicas=2", "runtime.max_retries=1")
    script.build_errors[1] = [ReplicaFailed("replica 1: AcceleratorMissing: Ray gave this worker GPU(s) ['0'] on "
                                            "node 10.0.0.7", deterministic=True)] * 1000
    with Driver(config, progress=False) as driver:
        outcomes = driver.run(make_jobs(config, tmp_path, ["a", "b", "c"]))
    assert all(o.ok for o in outcomes) and {o.replica for o in outcomes} == {0}


def test_close_keeps_the_replica_list_for_a_slot_thread_that_outlives_it(script, tmp_path, monkeypatch, caplog):
    """A slot thread still inside a replica call when close() gives up waiting for it later reports its replica
    lost: no IndexError, no false "slot crashed"."""
    monkeypatch.setattr(driver_mod, "CLOSE_JOIN_S", 0.5, raising=False)
    release, entered = threading.Event(), threading.Event()
    real_run = FakeReplica.run

    def run(self, request):
        if request.prompt == "stuck":
            entered.set()
            release.wait(60)  # a call that ignores the stop request (a wedged Ray call)
            raise ReplicaFailed(f"replica {self.index}: stopped")
        yield from real_run(self, request)

    monkeypatch.setattr(FakeReplica, "run", run)
    config = make_config()
    driver = Driver(config, progress=False)
    driver.start()
    driver._jobs.put((driver._run_id, make_jobs(config, tmp_path, ["stuck"])[0]))
    assert entered.wait(10)
    driver.close()
    release.set()
    for t in threading.enumerate():
        if t.name == "odyssey-replica-0":
            t.join(10)
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
    assert driver._fatal is None


def test_close_wakes_idle_slots_at_once(script, tmp_path, monkeypatch):
    """An idle slot thread waits for a job with a timeout (POLL_S); close() must wake it, not wait that out: a
    one-prompt `odyssey generate` otherwise spent up to POLL_S of its exit here. POLL_S is made huge to tell the
    two apart without timing anything finer than 'did not wait for it'."""
    monkeypatch.setattr(driver_mod, "POLL_S", 60.0)
    config = make_config("parallel.replicas=2")
    driver = Driver(config, progress=False)
    driver.start()
    assert driver.wait_ready(2, timeout_s=30) == 2
    assert all(o.ok for o in driver.run(make_jobs(config, tmp_path, ["a"])))
    t0 = time.monotonic()
    driver.close()
    assert time.monotonic() - t0 < 30 and not any(t.is_alive() for t in driver._slots)
