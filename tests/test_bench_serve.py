"""bench/serve.py's arithmetic and readers, checked against hand-made inputs (the bench itself starts `odyssey serve`,
`odyssey generate` and `odyssey batch` and takes minutes: it is run by hand, its output lives in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import serve as bench  # noqa: E402


class _Lines:
    def __init__(self, lines):
        self.lines = lines

    def iter_lines(self):
        yield from self.lines


def test_sse_reader_skips_comments_and_joins_data_lines():
    lines = [": keep-alive", "", "event: state", 'data: {"status": "queued",', 'data: "progress": 0}', "",
             "event: progress", 'data: {"step": 1}', "", ": the server is shutting down", "",
             "event: completed", 'data: {"status": "completed"}', ""]
    assert list(bench.sse(_Lines(lines))) == [("state", {"status": "queued", "progress": 0}),
                                             ("progress", {"step": 1}), ("completed", {"status": "completed"})]


def test_batch_completions_count_from_the_warm_up_video(tmp_path):
    # index: (queued_s, driver_total_s); done at 0.5 (warm-up), 1.0, 1.6, 2.5; written out of order
    timings = {2: (1.0, 0.6), 0: (0.0, 0.5), 3: (1.6, 0.9), 1: (0.5, 0.5)}
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"index": i, "timings": {"queued_s": q, "driver_total_s": d}}) + "\n"
                                for i, (q, d) in timings.items()))
    done = bench.batch_done(manifest, warmup=1)
    assert done == pytest.approx([0.5, 1.1, 2.0])
    assert bench.per_video(done) == pytest.approx(0.6)  # the median of the gaps 0.5, 0.6, 0.9


def test_service_completions_count_from_the_first_created():
    records = {"a": {"created_at": 100.0, "completed_at": 100.3}, "b": {"created_at": 100.01, "completed_at": 100.9},
               "c": {"created_at": 100.02, "completed_at": 100.6}, "other": {"created_at": 1.0, "completed_at": 2.0}}
    done = bench.service_done(records, ["b", "a", "c"])
    assert done == pytest.approx([0.3, 0.6, 0.9])
    assert bench.per_video(done) == pytest.approx(0.3)


def test_cpu_snapshot_attributes_a_worker_by_its_process_title():
    """A busy process titled like a Ray model worker, in its own session: its CPU goes to the worker role and its
    thread's run time is read; nothing of another session is counted."""
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(30)"
    proc = subprocess.Popen(["bash", "-c", f'exec -a ray::SPWorker {sys.executable} -c "$0"', busy],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        before = bench.cpu_by_role(proc.pid, leader_is_driver=False)
        while not before["threads"] and time.monotonic() < deadline:  # bash has not exec'd the worker yet
            before = bench.cpu_by_role(proc.pid, leader_is_driver=False)
        while time.monotonic() < deadline:
            after = bench.cpu_by_role(proc.pid, leader_is_driver=False)
            if after["roles"]["model worker"] >= 0.35:
                break
            time.sleep(0.05)
        delta = bench.cpu_delta(before, after)
        assert after["roles"]["model worker"] >= 0.35, after
        assert sum(after["roles"].values()) == after["roles"]["model worker"]
        assert delta["run"] > 0.1 and delta["roles"]["model worker"] > 0.1, delta
        as_driver = bench.cpu_by_role(proc.pid, leader_is_driver=True)  # a title decides before leadership
        assert as_driver["roles"]["driver / ingress"] == 0.0
    finally:
        proc.kill()
        proc.wait()
    assert bench.cpu_by_role(proc.pid, leader_is_driver=False)["roles"]["model worker"] == 0.0
