"""VideoService on a real local Ray with the embedded model: jobs survive a restart (queued ones resume, interrupted
ones are queued again with their attempts counted and bounded, finished videos are still served), cancel stops a
running job within a step and its replica serves the next one, a killed worker costs a retry and the service goes
on, the queue bound, one service per folder, old records pruned with their videos."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from cluster.serve.service import InvalidField, QueueFull, VideoService  # noqa: E402
from cluster.serve.store import JobStore  # noqa: E402
from cluster.video import read_mp4  # noqa: E402
from configs import load_config  # noqa: E402

PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def config(*overrides):
    return load_config("tiny", ["runtime.device=cpu", "runtime.collective_timeout_s=60", *overrides])


def wait_for(svc, video_id, statuses, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        obj = svc.get(video_id)
        if obj["status"] in statuses:
            return obj
        assert time.monotonic() < deadline, f"{video_id} stuck in {obj['status']} ({obj})"
        time.sleep(0.1)


def wait_step(svc, video_id, step, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while svc.get(video_id)["step"] < step or svc.get(video_id)["stage"] != "denoise":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def crash(svc):
    """Stop a service the way a killed process does: its records stay as they were (no graceful bookkeeping)."""
    svc._stop.set()
    svc.driver.close()
    for t in svc._threads:
        t.join(timeout=30)
    svc._store.close()
    os.close(svc._dir_lock)


class Recorder:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event, data):
        self.events.append((event, data))
        if event in ("completed", "failed", "cancelled"):
            self.done.set()

    def names(self):
        return [e for e, _ in self.events]


def test_a_restart_resumes_queued_and_interrupted_jobs_and_keeps_finished_videos(local_ray, tmp_path):
    svc = VideoService(config(), output_dir=tmp_path, model_name="tiny")
    svc.start()
    try:
        done = svc.submit({"prompt": PROMPT, "seed": 1, "steps": 4})
        wait_for(svc, done["id"], ("completed",))
        long = svc.submit({"prompt": PROMPT, "seed": 2, "steps": 400})
        behind = svc.submit({"prompt": "a blue square moving up", "seed": 3, "steps": 4})
        wait_step(svc, long["id"], 2)
        assert svc.get(behind["id"])["status"] == "queued"  # one replica: it waits behind the long one
        finished_bytes = svc.content_path(done["id"]).read_bytes()
    finally:
        svc.close()  # stopped mid-job: the job goes back to the queue, and the stop is not its fault

    svc = VideoService(config(), output_dir=tmp_path, model_name="tiny")
    svc.start()
    try:
        assert svc.get(done["id"])["status"] == "completed"
        assert svc.content_path(done["id"]).read_bytes() == finished_bytes
        again = svc.get(long["id"])
        assert again["status"] == "queued" and again["attempts"] == 0  # a graceful stop costs no attempt
        svc.cancel(long["id"])  # 400 steps: not worth waiting for
        obj = wait_for(svc, behind["id"], ("completed", "failed"))
        assert obj["status"] == "completed" and obj["attempts"] == 1, obj
        frames, _ = read_mp4(svc.content_path(behind["id"]))
        assert frames.shape == (17, 32, 32, 3)
        assert [v["id"] for v in svc.list()] == [behind["id"], long["id"], done["id"]]  # newest first
        assert [v["id"] for v in svc.list(limit=1, after=behind["id"])] == [long["id"]]
    finally:
        svc.close()


def test_a_job_interrupted_by_crashes_fails_after_max_attempts(local_ray, tmp_path):
    svc = VideoService(config("serve.max_attempts=2"), output_dir=tmp_path, model_name="tiny")
    svc.start()
    job = svc.submit({"prompt": PROMPT, "steps": 400})
    wait_step(svc, job["id"], 1)
    crash(svc)
    svc = VideoService(config("serve.max_attempts=2"), output_dir=tmp_path, model_name="tiny")
    svc.start()
    assert svc.get(job["id"])["attempts"] == 1  # the crashed start counts
    wait_step(svc, job["id"], 1)
    crash(svc)
    svc = VideoService(config("serve.max_attempts=2"), output_dir=tmp_path, model_name="tiny")
    svc.start()
    try:
        obj = svc.get(job["id"])
        assert obj["status"] == "failed" and obj["error"]["code"] == "interrupted", obj
        assert svc.content_path(job["id"]) is None
    finally:
        svc.close()


@pytest.mark.parametrize("ulysses", [1, 2])
def test_cancel_stops_a_running_job_within_a_step_and_the_replica_serves_on(local_ray, tmp_path, ulysses):
    svc = VideoService(config(f"parallel.ulysses_degree={ulysses}"), output_dir=tmp_path, model_name="tiny")
    svc.start()
    try:
        running = svc.submit({"prompt": PROMPT, "steps": 1000})
        queued = svc.submit({"prompt": PROMPT, "steps": 1000})
        events = Recorder()
        svc.subscribe(running["id"], events)
        wait_step(svc, running["id"], 2)
        cancelled = svc.cancel(queued["id"])
        assert cancelled["status"] == "cancelled" and cancelled["deleted"]
        t0 = time.monotonic()
        obj = svc.cancel(running["id"])
        assert obj["status"] == "cancelled"
        assert events.done.wait(5) and events.names()[-1] == "cancelled"
        after = svc.submit({"prompt": PROMPT, "seed": 5, "steps": 3})
        obj = wait_for(svc, after["id"], ("completed", "failed"))
        assert obj["status"] == "completed", obj
        assert time.monotonic() - t0 < 60  # far less than the cancelled job's 1000 steps
        assert svc.driver.builds == 1  # the same replica: cancelling did not cost a rebuild
        assert svc.get(running["id"])["step"] < 1000
        assert not list((tmp_path / "videos").glob("*partial*"))
        assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [f"{after['id']}.mp4"]
    finally:
        svc.close()


def test_a_killed_worker_costs_a_retry_and_the_service_goes_on(local_ray, tmp_path):
    svc = VideoService(config("parallel.ulysses_degree=2", "runtime.rebuild_backoff_s=0.5"), output_dir=tmp_path,
                       model_name="tiny")
    svc.start()
    try:
        job = svc.submit({"prompt": PROMPT, "seed": 7, "steps": 30})
        events = Recorder()
        svc.subscribe(job["id"], events)
        wait_step(svc, job["id"], 2)
        replica = next(r for r in svc.driver.replicas if r is not None)
        os.kill(replica.pids()[1], signal.SIGKILL)
        obj = wait_for(svc, job["id"], ("completed", "failed"))
        assert obj["status"] == "completed" and obj["attempts"] == 2, obj
        assert "queued" in events.names()  # told it went back in the queue
        progress = [d["progress"] for e, d in events.events if e == "progress"]
        assert progress == sorted(progress)  # monotonic across the retry
        nxt = svc.submit({"prompt": PROMPT, "steps": 3})
        assert wait_for(svc, nxt["id"], ("completed", "failed"))["status"] == "completed"
    finally:
        svc.close()


def test_queue_bound_folder_lock_and_pruning(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr("cluster.serve.service.LOCK_WAIT_S", 0.5)  # a redeploy's wait, not this test's
    svc = VideoService(config("serve.max_queued=2", "serve.keep_jobs=2", "serve.retry_after_s=7"),
                       output_dir=tmp_path, model_name="tiny")
    svc.start()
    try:
        with pytest.raises(ValueError, match="another odyssey serve"):
            VideoService(config(), output_dir=tmp_path, model_name="tiny").start()
        first = svc.submit({"prompt": PROMPT, "steps": 2})
        second = svc.submit({"prompt": PROMPT, "steps": 2})  # both queued: the replica is still starting
        with pytest.raises(QueueFull) as full:
            svc.submit({"prompt": PROMPT})
        assert full.value.retry_after_s == 7
        for job in (first, second):
            wait_for(svc, job["id"], ("completed",))
        third = svc.submit({"prompt": PROMPT, "steps": 2})
        assert svc.get(first["id"]) is None  # keep_jobs=2: the oldest finished record and its video are gone
        assert not (tmp_path / "videos" / f"{first['id']}.mp4").exists()
        wait_for(svc, third["id"], ("completed",))
        with pytest.raises(InvalidField) as bad:
            svc.submit({"prompt": PROMPT, "fps": 8, "seconds": "1.0", "frames": 17})
        assert bad.value.param == "seconds"
        last = svc.submit({"prompt": PROMPT, "fps": 8, "seconds": "1", "steps": 1})
        assert last["frames"] == 9
    finally:
        svc.close()
    rows = JobStore(tmp_path / "odyssey-serve.sqlite3").load()
    assert [r["id"] for r in rows] == [third["id"], last["id"]]
    assert oct(os.stat(tmp_path / "odyssey-serve.sqlite3").st_mode & 0o777) == "0o600"


def test_restored_records_are_checked_like_new_requests(tmp_path):
    """The database is a file: a record edited to hold a path for an id, a request over the limits, another id's
    request or a negative attempt count is skipped, never served."""
    svc = VideoService(config("limits.max_steps=50"), output_dir=tmp_path, model_name="tiny")
    good_id = "video_" + "ab" * 12
    request = {"prompt": "p", "request_id": good_id, "seed": 1, "negative_prompt": "", "height": 32, "width": 32,
               "frames": 17, "fps": 8, "steps": 20, "guidance_scale": 4.0, "shift": 2.0, "sampler": "unipc",
               "cache": "off", "cache_threshold": None}
    record = {"id": good_id, "request": request, "created_at": 1.0, "status": "queued", "attempts": 0,
              "completed_at": None, "error": None, "deleted": False, "cache": None}
    assert svc._restored(record).request.steps == 20
    for bad in ({"id": "video_../../etc/passwd"}, {"request": {**request, "steps": 10**8}},
                {"request": {**request, "request_id": "video_" + "cd" * 12}}, {"attempts": -5},
                {"status": "running"}, {"request": {**request, "prompt": 5}}):
        assert svc._restored({**record, **bad}) is None, bad
    with pytest.raises(ValueError):
        svc._video_path("video_../x")


def test_low_noise_guidance_scale_is_resolved_checked_and_echoed(tmp_path):
    """The low-noise expert's guidance (two-expert models): a request's own value, else the config's, else the
    request's guidance_scale; checked like guidance_scale (>= 0, limits.max_guidance_scale, on in every step with
    CFG in parallel) with the 422 naming it; a model of one DiT refuses a value of its own (422, not a failed job);
    echoed in the video object and the model's defaults; a record written before the field existed resumes with
    guidance_scale for every step (what it meant then)."""
    from tests.tiny_models import wan22_a14b_folder

    a14b = wan22_a14b_folder(tmp_path / "a14b", "pipeline")
    svc = VideoService(config(f"model.path={a14b}"), output_dir=tmp_path, model_name="wan")
    assert svc.experts == 2
    request, _ = svc._request({"prompt": PROMPT, "guidance_scale": 4.5, "low_noise_guidance_scale": 3.0})
    assert (request.guidance_scale, request.low_noise_guidance_scale) == (4.5, 3.0)
    assert svc._object(dataclass_record(request))["low_noise_guidance_scale"] == 3.0
    request, _ = svc._request({"prompt": PROMPT, "guidance_scale": 4.5})
    assert request.low_noise_guidance_scale == 4.5
    assert svc.models()[0]["defaults"]["low_noise_guidance_scale"] == svc.config.sampling.guidance_scale
    for value, words in ((-1.0, ">= 0"), (51.0, "max_guidance_scale")):
        with pytest.raises(InvalidField) as bad:
            svc._request({"prompt": PROMPT, "low_noise_guidance_scale": value})
        assert bad.value.param == "low_noise_guidance_scale" and words in str(bad.value)

    wan22 = VideoService(config(f"model.path={a14b}", "sampling.guidance_scale=4",
                                "sampling.low_noise_guidance_scale=3"), output_dir=tmp_path, model_name="wan")
    request, _ = wan22._request({"prompt": PROMPT, "guidance_scale": 6.0})
    assert (request.guidance_scale, request.low_noise_guidance_scale) == (6.0, 3.0)  # the config's, not 6
    assert wan22.models()[0]["defaults"]["low_noise_guidance_scale"] == 3.0

    cfg2 = VideoService(config(f"model.path={a14b}", "parallel.cfg_degree=2"), output_dir=tmp_path, model_name="w")
    with pytest.raises(InvalidField) as bad:
        cfg2._request({"prompt": PROMPT, "low_noise_guidance_scale": 1.0})
    assert bad.value.param == "low_noise_guidance_scale" and "low-noise" in str(bad.value)
    with pytest.raises(InvalidField) as bad:
        cfg2._request({"prompt": PROMPT, "guidance_scale": 1.0, "low_noise_guidance_scale": 3.0})
    assert bad.value.param == "guidance_scale"

    one = VideoService(config(), output_dir=tmp_path, model_name="tiny")  # the embedded model: one DiT
    assert one.experts == 1
    with pytest.raises(InvalidField) as bad:
        one._request({"prompt": PROMPT, "low_noise_guidance_scale": 3.0})
    assert bad.value.param == "low_noise_guidance_scale" and "one DiT" in str(bad.value)
    request, _ = one._request({"prompt": PROMPT, "guidance_scale": 3.0, "low_noise_guidance_scale": 3.0})
    assert request.low_noise_guidance_scale == 3.0  # the same value: nothing to refuse
    elsewhere = VideoService(config(f"model.path={tmp_path / 'on-the-nodes'}"), output_dir=tmp_path, model_name="w")
    assert elsewhere.experts is None  # not on this machine: the ranks check it where the weights are
    elsewhere._request({"prompt": PROMPT, "low_noise_guidance_scale": 3.0})

    old = {"prompt": "p", "request_id": "video_" + "ab" * 12, "seed": 1, "negative_prompt": "", "height": 32,
           "width": 32, "frames": 17, "fps": 8, "steps": 20, "guidance_scale": 4.0, "shift": 2.0, "sampler": "unipc",
           "cache": "off", "cache_threshold": None}
    record = {"id": old["request_id"], "request": old, "created_at": 1.0, "status": "queued", "attempts": 0,
              "completed_at": None, "error": None, "deleted": False, "cache": None}
    assert wan22._restored(record).request.low_noise_guidance_scale == 4.0
    new = {**old, "low_noise_guidance_scale": 2.0}
    assert wan22._restored({**record, "request": new}).request.low_noise_guidance_scale == 2.0
    assert wan22._restored({**record, "request": {**new, "low_noise_guidance_scale": "2"}}) is None


def dataclass_record(request):
    from cluster.serve.service import _Record

    return _Record(id=request.request_id, request=request, created_at=1.0)
