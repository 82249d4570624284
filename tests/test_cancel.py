"""Runner.cancel: every rank stops at the same step (RequestCancelledError), the group stays in step and serves the
next request; and `odyssey generate --preview FILE.png`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from configs import load_config
from pipeline.request import Frame, GenerateRequest, Progress, RequestCancelledError, Result
from tests.pool_runner import pool_runner

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(sp=1):
    return load_config("tiny", ["runtime.device=cpu", "sampling.steps=6", f"parallel.ulysses_degree={sp}"])


def request(sp, rid, seed=5):
    return GenerateRequest("a red circle moving right", seed=seed, request_id=rid).resolve(tiny_config(sp))


def _cancel_from_another_thread(runner, rid):
    """As the worker's control thread does, while generate() is suspended in this one."""
    t = threading.Thread(target=runner.cancel, args=(rid,))
    t.start()
    t.join()


def _run(runner, req, cancel_at=None, cancel_ranks=(), decode_frame=None):
    """Serve req; cancel it (from another thread) on cancel_ranks after denoising step cancel_at, or on rank 0
    after decoded frame decode_frame. Returns (error message or None, steps seen (0: the text was encoded), frames
    seen, latents)."""
    steps, frames = [], 0
    try:
        for e in runner.generate(req):
            if isinstance(e, Progress):
                steps.append(e.step if e.stage == "denoise" else 0)
                if e.step == cancel_at and runner.rank in cancel_ranks:
                    _cancel_from_another_thread(runner, req.request_id)
            elif isinstance(e, Frame):
                frames += 1
                if e.index == decode_frame:
                    _cancel_from_another_thread(runner, req.request_id)
            elif isinstance(e, Result):
                return None, steps, frames, e.latents
    except RequestCancelledError as err:
        return str(err), steps, frames, None
    raise AssertionError("no Result")


def _scenario(sp, cancel_ranks, cancel_at):
    """Serve B, then A cancelled, then B again: (A's outcome, whether B came out the same, ids still pending)."""
    runner = pool_runner(tiny_config(sp), return_latents=True)
    b = request(sp, "b", seed=9)
    before = _run(runner, b)
    cancelled = _run(runner, request(sp, "a"), cancel_at=cancel_at, cancel_ranks=cancel_ranks)
    after = _run(runner, b)
    same = before[3] is None or bool((before[3] == after[3]).all())
    return cancelled[:3], after[0], same, list(runner._cancelled)


@pytest.mark.parametrize("sp, cancel_ranks", [(1, (0,)), (2, (1,)), (2, (0, 1))])
def test_cancel_mid_denoise_stops_every_rank_at_the_same_step(dist_pools, sp, cancel_ranks):
    """Cancelled (on one rank or all) after step 2's event: every rank raises after step 3, none hangs, and the
    same Runners then serve the next request exactly as before."""
    for (error, steps, frames), next_error, same, pending in dist_pools(sp).run(_scenario, sp, cancel_ranks, 2):
        assert error == "request a cancelled after step 3"
        assert steps == [0, 1, 2] and frames == 0
        assert next_error is None and same and pending == []


def test_cancel_before_the_request_starts(dist_pools):
    """A cancel that arrives first (here on rank 1 only) stops every rank at step 0, before the text is encoded;
    the id is dropped when that request ends, so the same id served again runs."""
    for error, steps, again, pending in dist_pools(2).run(_cancel_first, 2):
        assert error == "request early cancelled after step 0" and steps == []
        assert again is None and pending == []


def _cancel_first(sp):
    runner = pool_runner(tiny_config(sp), return_latents=True)
    if runner.rank == 1:
        runner.cancel("early")
    error, steps, _, _ = _run(runner, request(sp, "early"))
    again, _, _, _ = _run(runner, request(sp, "early"))  # the id was dropped when the request ended
    return error, steps, again, list(runner._cancelled)


def _decode_and_unknown():
    runner = pool_runner(tiny_config(1), return_latents=True)
    runner.cancel("never-served")
    ok = _run(runner, request(1, "c"))  # an unknown id changes nothing
    for i in range(3000):
        runner.cancel(f"stale-{i}")
    bounded = len(runner._cancelled)
    decoding = _run(runner, request(1, "d"), decode_frame=2)
    runner._cancelled.clear()
    return ok[0], ok[2], bounded, decoding[:3]


def test_cancel_while_decoding_and_unknown_ids(dist_pools):
    from pipeline.runner import MAX_PENDING_CANCELS

    ok_error, ok_frames, bounded, (error, steps, frames) = dist_pools(1).run(_decode_and_unknown)[0]
    assert ok_error is None and ok_frames == 17
    assert bounded == MAX_PENDING_CANCELS
    assert error == "request d cancelled while decoding, after frame 3 of 17" and steps == list(range(0, 7))
    assert frames == 3


def _split_decode_cancel(folder):
    """SP=2 with vae_parallel on a small Wan folder: rank 0 cancels after the first decoded frame (the first latent
    chunk); both ranks must stop at the same chunk, then serve the next request whole."""
    config = load_config("cpu-smoke", [f"model.path={folder}", "video.height=48", "video.width=32",
                                       "parallel.ulysses_degree=2", "parallel.vae_parallel=true",
                                       "runtime.collective_timeout_s=60"])
    runner = pool_runner(config)
    assert runner.split_decode
    req = GenerateRequest("a red circle moving right", seed=1, request_id="split").resolve(config)
    error = None
    try:
        for e in runner.generate(req):
            if isinstance(e, Frame) and e.index == 0:
                _cancel_from_another_thread(runner, req.request_id)
    except RequestCancelledError as err:
        error = str(err)
    stopped_at = runner.progress  # (id, stage, frames decoded, total) where this rank stopped
    after = [type(e).__name__ for e in runner.generate(
        GenerateRequest("a red circle moving right", seed=1, request_id="next").resolve(config))]
    return error, stopped_at, after.count("Frame"), after[-1], list(runner._cancelled)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    from tests.tiny_models import wan_pipeline_folder

    return wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "wan")


def test_cancel_during_a_split_decode_stops_every_rank_at_the_same_chunk(dist_pools, wan_folder):
    """9 frames in latent chunks of 1, 4, 4: a cancel seen after frame 1 stops both ranks there (they agree once
    per chunk), not after all 9; the group is still in step for the next request."""
    ranks = dist_pools(2).run(_split_decode_cancel, str(wan_folder))
    for rank, (error, stopped_at, frames_after, last, pending) in enumerate(ranks):
        assert error == "request split cancelled while decoding, after frame 1 of 9", (rank, error)
        assert stopped_at == ("split", "decode", 1, 9)
        assert frames_after == (9 if rank == 0 else 0) and last == "Result" and pending == []


# -- odyssey generate --preview -----------------------------------------------------------------------------------


def test_preview_option_refuses_other_files(tmp_path):
    from cluster.cli import cli

    result = CliRunner().invoke(cli, ["generate", "x", "-o", str(tmp_path / "a.mp4"), "--preview",
                                      str(tmp_path / "p.jpg")])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].endswith("--preview must end in .png, "
                                                                                      f"got {tmp_path / 'p.jpg'}")
    (tmp_path / "d.png").mkdir()
    result = CliRunner().invoke(cli, ["generate", "x", "-o", str(tmp_path / "a.mp4"), "--preview",
                                      str(tmp_path / "d.png")])
    assert result.exit_code == 2 and not (tmp_path / "a.mp4").exists()


def test_generate_keeps_a_png_preview(tmp_path):
    """The embedded model with previews on (5 by default for --preview): the PNG is a readable 32 x 32 image, put
    in place by a rename (a link planted at its name is replaced, its target untouched, no temporary left), and
    the MP4 is what it always is."""
    import imageio.v3 as iio

    from cluster.video import read_mp4

    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    preview = tmp_path / "live.png"
    os.symlink(target, preview)
    out = tmp_path / "clip.mp4"
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "a red circle moving right", "-o",
                             str(out), "--preview", str(preview), "--seed", "3", "--set", "sampling.steps=11",
                             "--progress", "none"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "keep me" and not preview.is_symlink()
    image = iio.imread(preview)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.std() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "elsewhere.txt", "live.png"]
    frames, fps = read_mp4(out)
    assert frames.shape == (17, 32, 32, 3) and fps == 8
