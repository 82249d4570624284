"""cluster.video.StreamingMP4's ffmpeg: frames in, an MP4 out that decodes back, and an encoder start that survives
a driver process whose fork handlers would kill a forked child (CI saw every video of a long-lived driver fail with a
broken pipe after a SIGSEGV in imageio-ffmpeg's preexec_fn child)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.video import PARTIAL_SUFFIX, StreamingMP4, read_mp4

ROOT = Path(__file__).resolve().parents[1]


def frames(n=6, h=32, w=48):
    y, x = np.mgrid[0:h, 0:w]
    return [np.stack([(x * 5 + 20 * t) % 256, y * 7 % 256, np.full_like(x, 40 * t % 256)], -1).astype(np.uint8)
            for t in range(n)]


def test_frames_in_an_mp4_out_that_decodes_back(tmp_path):
    out = tmp_path / "v.mp4"
    mp4 = StreamingMP4(out, fps=8)
    want = frames()
    for f in want:
        mp4.append(f)
    assert mp4.commit() == out
    got, fps = read_mp4(out)
    assert got.shape == (6, 32, 48, 3) and fps == 8
    assert np.abs(got.astype(int) - np.stack(want)).mean() < 6  # H.264 at crf 18 on a smooth gradient
    assert not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))


def test_ffmpeg_runs_in_its_own_session_so_a_terminal_ctrl_c_does_not_reach_it(tmp_path):
    mp4 = StreamingMP4(tmp_path / "v.mp4", fps=8)
    mp4.append(frames(1)[0])
    try:
        pid = mp4._writer.proc.pid
        assert os.getsid(pid) == pid != os.getsid(0)
    finally:
        mp4.abort()
    assert not list(tmp_path.iterdir()) or not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))


def test_a_frame_of_another_size_is_refused_and_abort_leaves_nothing(tmp_path):
    mp4 = StreamingMP4(tmp_path / "v.mp4", fps=8)
    mp4.append(frames(1)[0])
    with pytest.raises(ValueError, match="is not 32x48x3 uint8"):
        mp4.append(np.zeros((32, 32, 3), np.uint8))
    mp4.abort()
    assert not (tmp_path / "v.mp4").exists() and not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))


POISONED = """
import ctypes, os, sys
from tests.test_video_writer import frames
libc = ctypes.CDLL(None)
# a library's fork handler that kills the child of every fork() (as Ray's SIGSEGV did in CI); vfork runs none
assert libc.__register_atfork(None, None, ctypes.cast(libc._exit, ctypes.c_void_p), None) == 0
out = sys.argv[1]
import imageio_ffmpeg
w = imageio_ffmpeg.write_frames(out + ".imageio.mp4", (48, 32), fps=8, macro_block_size=2, ffmpeg_log_level="error")
try:
    w.send(None)
    for f in frames():
        w.send(f)
    w.close()
    print("imageio-ffmpeg wrote" if os.path.exists(out + ".imageio.mp4") else "imageio-ffmpeg failed: no file",
          flush=True)
except Exception as e:
    print("imageio-ffmpeg failed:", type(e).__name__, flush=True)
from cluster.video import StreamingMP4, read_mp4
mp4 = StreamingMP4(out, fps=8)
for f in frames():
    mp4.append(f)
mp4.commit()
print("decoded", read_mp4(out)[0].shape, flush=True)
"""


def test_the_encoder_starts_in_a_process_whose_fork_handlers_kill_forked_children(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"}  # read_mp4 sets it
    done = subprocess.run([sys.executable, "-c", POISONED, str(tmp_path / "v.mp4")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imageio-ffmpeg failed" in done.stdout, "the probe did not poison fork(): it shows nothing here"
    assert "decoded (6, 32, 48, 3)" in done.stdout
