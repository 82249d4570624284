"""Log-mode progress (`--progress lines`, or stderr not a terminal): a long run says where it is every few seconds
with the elapsed time and an ETA, a fast one is not a line per step. Driven by a fake clock: no sleeping."""

from __future__ import annotations

import io
import re

import numpy as np

from cluster.progress import LineReporter, duration, make_reporter
from pipeline.request import Frame, Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(steps: int, step_s: float, frames: int, frame_s: float, encode_s: float = 1.0, computed=None):
    """One prompt through a LineReporter: encode, `steps` steps of step_s, `frames` frames of frame_s; returns the
    lines said, each with the fake time it was said at."""
    out, clock = io.StringIO(), Clock()
    said: list[tuple[float, str]] = []

    class Stream:
        def write(self, text):
            out.write(text)
            if text.strip():
                said.append((clock.now, text.strip()))

        def flush(self):
            pass

    reporter = LineReporter(Stream(), every_s=5.0, clock=clock)
    reporter.start(0, "a red circle", 0, 0)
    clock.now += encode_s
    reporter.event(0, Progress("r", "encode", 1, 1))
    for k in range(1, steps + 1):
        clock.now += step_s
        reporter.event(0, Progress("r", "denoise", k, steps, computed(k) if computed else None))
    image = np.zeros((2, 2, 3), np.uint8)
    for i in range(frames):
        clock.now += frame_s
        reporter.event(0, Frame("r", i, frames, image))
    reporter.finish(0, True, "out.mp4")
    return said


def seconds(text: str) -> float:
    """'12.0 s' / '3 min 05 s' / '1 h 02 min' back to seconds."""
    m = re.fullmatch(r"(?:(\d+) h (\d+) min|(\d+) min (\d+) s|([\d.]+) s)", text)
    assert m, text
    if m.group(1):
        return int(m.group(1)) * 3600 + int(m.group(2)) * 60
    if m.group(3):
        return int(m.group(3)) * 60 + int(m.group(4))
    return float(m.group(5))


STEP = re.compile(r"\[0\] step (\d+)/(\d+)(?: \((\d+) computed\))?, (.+) elapsed, denoising ETA (.+)")
FRAME = re.compile(r"\[0\] frame (\d+)/(\d+) decoded, (.+) elapsed, decoding ETA (.+)")


def test_a_fast_run_says_only_its_milestones():
    said = [text for _, text in run(steps=20, step_s=0.02, frames=17, frame_s=0.01)]
    assert [t.split(" ", 2)[1] for t in said] == ["a", "denoised", "done"], said
    assert said[0] == "[0] a red circle: started on replica 0"


def test_a_slow_run_reports_every_few_seconds_with_elapsed_and_eta():
    said = run(steps=20, step_s=2.0, frames=17, frame_s=1.5)
    steps = [(t, STEP.fullmatch(text)) for t, text in said if text.startswith("[0] step")]
    frames = [(t, FRAME.fullmatch(text)) for t, text in said if text.startswith("[0] frame")]
    assert steps and frames and all(m for _, m in steps + frames), said
    # never two lines about the prompt within 5 s; never more than 5 s + one step / frame of silence
    # (milestones, denoised and done, come when they happen)
    progress = {t for t, _ in steps + frames}
    assert all(b - a >= 5.0 for (a, _), (b, _) in zip(said, said[1:]) if b in progress), said
    assert all(b - a <= 5.0 + 2.0 for (a, _), (b, _) in zip(said, said[1:])), said
    for t, m in steps:
        k = int(m.group(1))
        assert int(m.group(2)) == 20 and 1 <= k < 20
        assert seconds(m.group(4)) == t == 1.0 + 2.0 * k  # elapsed since the start, the text encoding included
        assert seconds(m.group(5)) == 2.0 * (20 - k)  # 2 s per step (the encoding excluded) x steps left
    denoised_at = 1.0 + 2.0 * 20
    for t, m in frames:
        i = int(m.group(1))
        assert int(m.group(2)) == 17 and 1 <= i < 17
        assert abs(seconds(m.group(3)) - t) < 0.05 and t == denoised_at + 1.5 * i
        assert abs(seconds(m.group(4)) - 1.5 * (17 - i)) < 0.05
    texts = [text for _, text in said]
    assert texts[-1].startswith("[0] done in ") and any(t.startswith("[0] denoised (20 steps) in ") for t in texts)


def test_a_very_slow_step_gets_a_line_each_and_step_cache_counts_show():
    said = run(steps=4, step_s=90.0, frames=1, frame_s=0.1, computed=lambda k: k - k // 3)
    steps = [STEP.fullmatch(text) for _, text in said if text.startswith("[0] step")]
    assert [(m.group(1), m.group(3)) for m in steps] == [("1", "1"), ("2", "2"), ("3", "2")]
    assert steps[0].group(4) == "1 min 31 s" and steps[0].group(5) == "4 min 30 s"


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (0.04, 4.25, 59.9, 60, 185, 3599.4, 3725, 36000)] == \
        ["0.0 s", "4.2 s", "59.9 s", "1 min 00 s", "3 min 05 s", "59 min 59 s", "1 h 02 min", "10 h 00 min"]


def test_each_prompt_keeps_its_own_pace_and_a_retry_starts_over():
    out, clock = io.StringIO(), Clock()
    reporter = LineReporter(out, every_s=5.0, clock=clock)
    reporter.start(0, "slow", 0, 0)
    reporter.start(1, "fast", 1, 0)
    for k in range(1, 11):
        clock.now += 1.0
        reporter.event(0, Progress("r0", "denoise", k, 50))
        if k == 3:
            reporter.finish(1, True, "fast.mp4")
    said = out.getvalue().splitlines()
    assert [s.split(",")[0] for s in said if "step" in s] == ["[0] step 5/50", "[0] step 10/50"]
    reporter.start(0, "slow", 2, 1)  # a retry on another replica: its clock and pace start again
    clock.now += 1.0
    reporter.event(0, Progress("r0", "denoise", 1, 50))
    assert out.getvalue().splitlines()[-1] == "[0] slow: started on replica 2 (attempt 2)"


def test_lines_is_the_mode_off_a_terminal(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(make_reporter("auto"), LineReporter)
    assert isinstance(make_reporter("lines"), LineReporter)
