"""What a first run with the embedded model is told before anything runs (issue #16): words it does not know (a
warning, or exit 2 with --strict-vocab), sizes it cannot draw (exit 2) and lengths or sizes it was not trained on
(a warning); the README's .jsonl example fits it; `python -m pipeline.tiny.analyze` is a proper command. Real Wan
models are never warned about."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import cluster.cli as cli_mod
from cluster.driver import Job
from cluster.validate import check_batch, check_request_size, embedded_model_notes
from configs import load_config
from pipeline.request import GenerateRequest
from pipeline.tiny import SIDES, VOCABULARY, WEIGHTS, describe_vocabulary, unknown_words
from pipeline.tiny.data import COLORS, DIRECTIONS, ClipSpec, render
from tests.test_cli import ROOT, odyssey
from tests.test_step_cache_cli import no_ray, run_main  # noqa: F401 - no_ray is a fixture

ANALYZE = [sys.executable, "-m", "pipeline.tiny.analyze"]
UNKNOWN = "the embedded model does not know the words 'purple', 'triangle', 'diagonally'"
OFF_TRAINING = "the embedded model was trained on 32x32 clips of 17 frames"


def tiny(*overrides):
    return load_config("tiny", list(overrides))


def wan(*overrides):  # a real Wan model whose weights live elsewhere (never read here)
    return load_config("wan2.1-t2v-1.3b", ["model.path=/nonexistent/Wan2.1-T2V-1.3B", *overrides])


def request(config, prompt="a red circle moving right", **kw):
    return GenerateRequest(prompt, seed=1, **kw).resolve(config)


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("odyssey: warning: the embedded model")]


# -- what the model knows ------------------------------------------------------------------------------------------


def test_vocabulary_is_the_shipped_text_encoders():
    from safetensors import safe_open

    from pipeline.tiny.model import TinySpec, TinyTextEncoder

    with safe_open(str(WEIGHTS), framework="pt") as f:
        spec = TinySpec.from_json(f.metadata()["spec"])
    assert VOCABULARY == spec.vocab
    assert {*COLORS, *DIRECTIONS, "circle", "square", "ball", "box"} <= set(VOCABULARY)
    # unknown_words lists exactly what the text encoder reads as its unknown token
    encoder = TinyTextEncoder(spec)
    prompt = "A purple triangle, moving DIAGONALLY (right-ish) 3x: the purple one!"
    ids, mask = encoder.tokenize([prompt])
    n_unknown = int((ids[0][mask[0]] == encoder.UNK).sum())
    assert unknown_words(prompt) == ["purple", "triangle", "diagonally", "ish", "x", "one"]
    assert n_unknown == 7  # 'purple' twice
    assert unknown_words("The white BALL is moving left") == [] and unknown_words("") == []


def test_the_vocabulary_line_names_every_word_once():
    text = describe_vocabulary()
    named = re.findall(r"[a-z]+", text.replace("colors", "").replace("shapes", "").replace("directions", "")
                       .replace("the words", "").replace("and", "").replace("or", ""))
    assert sorted(named) == sorted(VOCABULARY)
    assert "\n" not in text and "circle (or ball, disc, dot)" in text


# -- sizes and lengths ----------------------------------------------------------------------------------------------


def test_sizes_it_cannot_draw_are_refused_and_wan_sizes_are_not_checked():
    for h in SIDES:
        for w in SIDES:
            check_request_size(request(tiny(), height=h, width=w), tiny())
    for h, w in [(64, 64), (16, 32), (32, 64), (128, 128), (480, 832)]:
        with pytest.raises(ValueError) as e:
            check_request_size(request(tiny(), height=h, width=w), tiny())
        message = str(e.value)
        assert f"not {h}x{w}" in message and "32x32" in message and "48x48" in message and "\n" not in message
    check_request_size(request(wan()), wan())  # 480x832 on Wan2.1
    check_request_size(request(wan(), height=32, width=32), wan())


def test_notes_for_unknown_words_and_untrained_lengths_one_line_each():
    config = tiny()
    assert embedded_model_notes([("p", request(config))], config) == []
    assert embedded_model_notes([("p", request(config, frames=5))], config) == []  # shorter clips draw well
    notes = embedded_model_notes([("p", request(config, "a purple triangle moving diagonally", frames=33,
                                                 height=48, width=48))], config)
    assert len(notes) == 2 and all("\n" not in n for n in notes)
    assert notes[0].startswith(UNKNOWN) and describe_vocabulary() in notes[0] and "--strict-vocab" in notes[0]
    assert notes[1].startswith(OFF_TRAINING)
    assert "at 48x48 (height x width) and 33 frames its motion is unreliable" in notes[1]
    assert embedded_model_notes([("p", request(config, height=32, width=48))], config) == [
        f"{OFF_TRAINING}; at 32x48 (height x width) its motion is unreliable (the object stalls, turns back or wraps "
        f"around)"]
    # the negative prompt is read by the same encoder
    assert "'blurry'" in embedded_model_notes([("p", request(config, negative_prompt="blurry"))], config)[0]
    with pytest.raises(ValueError, match=f"^--strict-vocab: {UNKNOWN}"):
        embedded_model_notes([("p", request(config, "a purple triangle moving diagonally"))], config,
                             strict_vocab=True)
    embedded_model_notes([("p", request(config))], config, strict_vocab=True)  # known words pass


def test_a_batch_gets_one_line_saying_how_many_prompts():
    config = tiny()
    items = [("p.txt:1", request(config)), ("p.txt:2", request(config, "a purple circle")),
             ("p.txt:4", request(config, "a red cone", frames=21)), ("p.txt:5", request(config, "purple"))]
    vocab, lengths = embedded_model_notes(items, config)
    assert "the words 'purple', 'cone' (in 3 of 4 prompts, first p.txt:2)" in vocab
    assert "at 21 frames (in 1 of 4 prompts, first p.txt:4)" in lengths
    two = [("a.txt:1", request(config, frames=21)), ("a.txt:2", request(config, "a purple box", frames=21))]
    vocab, lengths = embedded_model_notes(two, config)
    assert "'purple' (in 1 of 2 prompts, first a.txt:2)" in vocab and "at 21 frames (in all 2 prompts) its" in lengths
    many = " ".join(f"word{chr(97 + i)}" for i in range(20))
    (vocab,) = embedded_model_notes([("x", request(config, many))], config)
    assert "'worda'" in vocab and "'wordl'" in vocab and "'wordm'" not in vocab and "and 8 more" in vocab


def test_real_wan_models_are_never_warned():
    config = wan()
    item = ("p", request(config, "a purple triangle moving diagonally", frames=81))
    assert embedded_model_notes([item], config) == []
    assert embedded_model_notes([item], config, strict_vocab=True) == []


# -- the Driver's path: other code feeding a Driver gets the same checks ------------------------------------------


def test_check_batch_refuses_undrawable_sizes_and_warns_once(caplog, tmp_path):
    config = tiny()
    with pytest.raises(ValueError, match=r"^prompt 4: the embedded model draws 32x32 .* not 64x64"):
        check_batch([Job(4, request(config, height=64, width=64), tmp_path / "a.mp4")], config, None)
    jobs = [Job(i, request(config, p), tmp_path / f"{i}.mp4") for i, p in enumerate(["a red circle", "a purple one"])]
    with caplog.at_level(logging.WARNING, logger="cluster.validate"):
        check_batch(jobs, config, None)
    lines = [r.getMessage() for r in caplog.records if r.name == "cluster.validate"]
    assert len(lines) == 1 and "'purple', 'one' (in 1 of 2 prompts, first prompt 1)" in lines[0]
    # requests the CLI already warned about are not warned about again when the Driver checks its batch
    caplog.clear()
    fresh = [Job(0, request(config, "a purple square"), tmp_path / "b.mp4")]
    assert len(embedded_model_notes([("the prompt", fresh[0].request)], config)) == 1
    with caplog.at_level(logging.WARNING, logger="cluster.validate"):
        check_batch(fresh, config, None)
    assert not [r for r in caplog.records if r.name == "cluster.validate"]
    wan_config = wan()
    check_batch([Job(0, request(wan_config, "a purple cat"), tmp_path / "c.mp4")], wan_config, None)
    assert not [r for r in caplog.records if r.name == "cluster.validate"]


def test_serve_refuses_sizes_the_embedded_model_cannot_draw(tmp_path):
    from cluster.serve.service import InvalidField, VideoService

    svc = VideoService(tiny(), output_dir=tmp_path, model_name="tiny")
    request, _ = svc._request({"prompt": "a red circle moving right", "size": "48x32"})
    assert (request.width, request.height) == (48, 32)
    with pytest.raises(InvalidField, match="the embedded model draws 32x32 .* not 64x64") as e:
        svc._request({"prompt": "a red circle moving right", "size": "64x64"})
    assert e.value.param == "size"
    wan_svc = VideoService(wan(), output_dir=tmp_path / "wan", model_name="wan")
    assert wan_svc._request({"prompt": "a cat", "size": "832x480"})[0].height == 480


# -- the CLI: refused before Ray starts, nothing written -----------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_strict_vocab_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, no_ray, command):
    (tmp_path / "p.txt").write_text("a red circle moving right\na purple triangle moving diagonally\n")
    if command == "generate":
        args = ["generate", "a purple triangle moving diagonally", "-o", tmp_path / "out" / "x.mp4", "--manifest",
                tmp_path / "out" / "m.jsonl"]
    else:
        args = ["batch", tmp_path / "p.txt", "-o", tmp_path / "out"]
    code, err = run_main([*args, "--strict-vocab"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"odyssey: error: --strict-vocab: {UNKNOWN}") and "it knows colors red" in lines[0]
    if command == "batch":
        assert "(in 1 of 2 prompts, first " in lines[0] and "p.txt:2)" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"], "nothing may be written"


def test_undrawable_sizes_exit_2_before_ray(tmp_path, capsys, no_ray):
    code, err = run_main(["generate", "a red circle moving right", "-o", tmp_path / "x.mp4", "--set",
                          "video.width=64"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not 32x64" in err, err
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle moving right"}\n'
                                      '{"prompt": "a blue square moving up", "height": 128, "width": 128}\n')
    code, err = run_main(["batch", tmp_path / "p.jsonl", "-o", tmp_path / "out"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "p.jsonl:2: the embedded model draws 32x32 (what it was trained on), or less reliably 32x48, 48x32, " \
           "48x48 (height x width), not 128x128" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_real_wan_model_gets_no_warning_and_no_refusal(tmp_path, capsys, monkeypatch):
    """Unknown words, 480x832x81 and --strict-vocab on Wan2.1: the CLI goes on to the run (here: a stand-in for
    it) without a word."""
    runs = []
    monkeypatch.setattr(cli_mod, "_run", lambda config, jobs, *a, **k: runs.append(jobs))
    wan_args = ["--config", "wan2.1-t2v-1.3b", "--set", f"model.path={tmp_path / 'weights'}", "--strict-vocab"]
    cli_mod.main(["generate", "a purple triangle moving diagonally", "-o", str(tmp_path / "x.mp4"), *wan_args])
    (tmp_path / "p.txt").write_text("a cat surfing a wave at sunset\n")
    cli_mod.main(["batch", str(tmp_path / "p.txt"), "-o", str(tmp_path / "out"), *wan_args])
    assert capsys.readouterr().err == ""
    sizes = [(j.request.height, j.request.width, j.request.frames) for jobs in runs for j in jobs]
    assert sizes == [(480, 832, 81)] * 2


def test_the_warnings_are_printed_once_before_the_run(tmp_path, capsys, monkeypatch):
    """The CLI's warnings come before the run starts (here: a stand-in for it), one line each."""
    runs = []

    def fake_run(config, jobs, *a, **k):
        runs.append((jobs, capsys.readouterr().err))

    monkeypatch.setattr(cli_mod, "_run", fake_run)
    cli_mod.main(["generate", "a purple circle moving right", "-o", str(tmp_path / "x.mp4"), "--set",
                  "video.frames=25"])
    (jobs, err), = runs
    assert len(warnings_in(err)) == 2 and len(err.strip().splitlines()) == 2, err
    assert "the word 'purple', so it cannot draw" in err and "at 25 frames its motion is unreliable" in err
    cli_mod.main(["generate", "a red circle moving right", "-o", str(tmp_path / "y.mp4")])
    assert runs[1][1] == "", "a prompt in the vocabulary at the trained size gets no warning"


def test_generate_warns_once_and_still_renders(tmp_path):
    """The real path (local Ray, the Driver's own check_batch): the warning is printed once, not again by the
    Driver, and the video is made."""
    out = tmp_path / "x.mp4"
    result = odyssey("generate", "a purple circle moving right", "-o", out, "--set", "sampling.steps=2",
                     "--progress", "none", timeout=240)
    assert result.returncode == 0, result.stderr
    assert len(warnings_in(result.stderr)) == 1 and "'purple'" in warnings_in(result.stderr)[0], result.stderr
    assert "does not know" not in result.stderr.replace(warnings_in(result.stderr)[0], "")
    assert out.is_file()


# -- the README's .jsonl example ------------------------------------------------------------------------------------


def test_readme_jsonl_example_fits_the_embedded_model(tmp_path, capsys, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    bullet = readme[readme.index("- `.jsonl`: one object per line:"):]
    example = re.search(r"`(\{.*?\})`", bullet, re.S).group(1)
    line = json.loads(" ".join(example.split()))
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    runs = []
    monkeypatch.setattr(cli_mod, "_run", lambda config, jobs, *a, **k: runs.append(jobs))
    cli_mod.main(["batch", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "out")])
    assert capsys.readouterr().err == "", "the README's example must not be warned about or refused"
    (job,), = runs
    assert (job.request.height, job.request.width, job.request.frames) == (32, 32, 17)


# -- python -m pipeline.tiny.analyze ------------------------------------------------------------------------------


def analyze(*args, capsys) -> tuple[int, str, str]:
    """python -m pipeline.tiny.analyze ARGS, in this process (the command's torch import costs seconds)."""
    from pipeline.tiny.analyze import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_analyze_as_a_command(capsys):
    code, out, err = analyze("--help", capsys=capsys)
    assert code == 0 and out.startswith("usage: python -m pipeline.tiny.analyze [-h] VIDEO") and not err
    result = subprocess.run(ANALYZE, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and result.stderr == "python -m pipeline.tiny.analyze: error: the following " \
                                                       "arguments are required: VIDEO (see --help)\n", result.stderr


def test_analyze_usage_errors_are_one_line(tmp_path, capsys):
    garbage = tmp_path / "not-a-video.mp4"
    garbage.write_text("hello")
    for args, message in [((), "the following arguments are required: VIDEO"),
                          (("--frames", garbage), "unrecognized arguments: --frames"),
                          ((tmp_path / "missing.mp4",), f"{tmp_path / 'missing.mp4'}: no such file"),
                          ((tmp_path,), f"{tmp_path}: is a folder, not a video"),
                          ((garbage,), f"{garbage}: not a video ffmpeg can read (Error opening input files: "
                                       f"Invalid data found when processing input)")]:
        code, out, err = analyze(*args, capsys=capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, err)
        assert lines[0].startswith("python -m pipeline.tiny.analyze: error: ") and message in lines[0], lines
        assert "ffmpeg version" not in err and not out


def test_analyze_refuses_files_without_video_frames(tmp_path, capsys, monkeypatch):
    import imageio_ffmpeg

    audio = tmp_path / "audio.mp4"  # a real MP4 with a sound track and no video stream
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc", "-t", "1",
                    str(audio)], check=True, timeout=60)
    code, out, err = analyze(audio, capsys=capsys)
    assert code == 2 and err.startswith(f"python -m pipeline.tiny.analyze: error: {audio}: not a video ffmpeg can "
                                        f"read (") and len(err.splitlines()) == 1, err

    def no_frames(path, pix_fmt):  # a stream ffmpeg opens but that ends before its first frame
        yield {"size": (32, 32)}

    monkeypatch.setattr(imageio_ffmpeg, "read_frames", no_frames)
    code, out, err = analyze(audio, capsys=capsys)
    assert code == 2 and err == f"python -m pipeline.tiny.analyze: error: {audio}: the video has no frames\n", err


def test_analyze_refuses_a_fifo_at_once_and_never_shows_ffmpeg_s_banner(tmp_path, capsys, monkeypatch):
    """A FIFO is refused before ffmpeg opens it (ffmpeg would wait for a writer until imageio-ffmpeg killed it, and
    its error would be the banner's last line); an error whose text is only the banner says so plainly, and
    imageio-ffmpeg's 'We had to kill ffmpeg' warning stays out."""
    import imageio_ffmpeg

    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    code, out, err = analyze(fifo, capsys=capsys)
    assert code == 2 and err == f"python -m pipeline.tiny.analyze: error: {fifo}: not a regular file (a FIFO)\n", err

    banner = ("ffmpeg version 7.0.2-static https://johnvansickle.com/ffmpeg/  Copyright (c) 2000-2024 the FFmpeg "
              "developers\n  built with gcc 8 (Debian 8.3.0-6)\n  configuration: --enable-gpl --enable-version3\n"
              "  libavutil      59.  8.100 / 59.  8.100\n  libswscale      8.  1.100 /  8.  1.100\n")

    class Stuck:  # what read_frames gives for an input ffmpeg never got a frame of
        def __init__(self, path, pix_fmt):
            pass

        def __next__(self):
            raise RuntimeError(banner)

        def close(self):
            logging.getLogger("imageio_ffmpeg").warning("We had to kill ffmpeg to stop it.")

    clip = tmp_path / "stuck.mp4"
    clip.write_bytes(b"\0" * 64)
    monkeypatch.setattr(imageio_ffmpeg, "read_frames", Stuck)
    code, out, err = analyze(clip, capsys=capsys)
    assert code == 2 and err == (f"python -m pipeline.tiny.analyze: error: {clip}: not a video ffmpeg can read (ffmpeg "
                                 f"stopped before reading a frame)\n"), err
    monkeypatch.setattr(Stuck, "__next__", lambda self: (_ for _ in ()).throw(RuntimeError(banner + "  moov atom not "
                                                                                            "found\n")))
    code, out, err = analyze(clip, capsys=capsys)
    assert code == 2 and err.endswith("not a video ffmpeg can read (moov atom not found)\n"), err


def test_analyze_reads_videos_and_reports_the_bad_ones(tmp_path, capsys):
    from cluster.video import StreamingMP4

    writer = StreamingMP4(tmp_path / "clip.mp4", 8)
    for frame in render(ClipSpec("yellow", "square", "down"), np.random.default_rng(0)):
        writer.append(frame)
    clip = writer.commit()
    code, out, err = analyze(clip, tmp_path / "gone.mp4", clip, capsys=capsys)
    assert code == 2, "one of the videos was missing"
    assert len(out.splitlines()) == 2 and out.splitlines()[0] == out.splitlines()[1]
    assert re.fullmatch(rf"{re.escape(str(clip))}: yellow square moving down \(dx [+-]\d+\.\d, dy \+\d+\.\d, "
                        r"fill \d\.\d\d\)", out.splitlines()[0]), out
    assert err.strip().splitlines() == [f"python -m pipeline.tiny.analyze: error: {tmp_path / 'gone.mp4'}: no such "
                                        f"file"]
    assert analyze(clip, capsys=capsys)[0] == 0
