"""Hostile input and hardening (issue #19): every attack of the review, tried again and refused.

Limits on every numeric request field, the YAML alias bomb, a symlinked manifest, partial files of concurrent runs,
the torch floor, the Ray token's file mode, prompt-file caps, escaping shard names, and control characters echoed
to terminals and logs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from cluster.manifest import ManifestError, append_manifest_line, check_manifest
from cluster.prompts import PromptFileError, printable, read_prompt_file, slugify
from cluster.video import RUN_ID, StreamingMP4, clean_stale_partials, read_mp4
from configs import ConfigError, LimitsConfig, load_config
from pipeline.request import GenerateRequest

ROOT = Path(__file__).resolve().parents[1]
ODYSSEY = [sys.executable, "-m", "cluster.cli"]


def odyssey(*args, timeout=120, **kw):
    return subprocess.run([*ODYSSEY, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=kw.pop("cwd", ROOT), **kw)


def one_error_line(result, code=2):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("odyssey: error: "), result.stderr
    return lines[0]


# -- sizes without upper bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("steps", 10**8, r"steps 100000000 is over the limit 1000 \(limits\.max_steps\)"),
    ("frames", 4000000001, r"frames 4000000001 is over the limit 1025 \(limits\.max_frames\)"),
    ("height", 2048, r"height x width 2097152 is over the limit 1638400 \(limits\.max_pixels\)"),
    ("fps", 10**400, r"fps beyond 2\^64 is over the limit 120 \(limits\.max_fps\)"),
    ("fps", float("inf"), r"fps must be an integer"),
    ("guidance_scale", 51.0, r"guidance_scale 51\.0 is over the limit 50\.0"),
    ("guidance_scale", float("nan"), r"guidance_scale must be a finite number"),
    ("shift", float("inf"), r"shift must be a finite number"),
    ("shift", 10**400, r"shift must be a finite number"),
    ("shift", 101, r"shift 101\.0 is over the limit 100\.0"),
    ("prompt", "x" * 10_001, r"a prompt of 10001 characters is over the limit 10000"),
    ("negative_prompt", "x" * 10_001, r"a prompt of 10001 characters is over the limit 10000"),
    ("steps", True, r"steps must be an integer"),
    ("request_id", "r" * 129, r"request_id must be at most 128 printable characters"),
    ("request_id", "id\x1b[2J", r"request_id must be at most 128 printable characters, got 'id\\x1b\[2J'"),
])
def test_every_numeric_request_field_has_a_finite_maximum(field, value, message):
    config = load_config("tiny", ["video.width=1024"])
    request = dataclasses.replace(GenerateRequest("a red circle moving right"), **{field: value})
    with pytest.raises(ValueError, match=message):
        request.resolve(config)


def test_limits_are_config_keys_with_sane_defaults():
    config = load_config("tiny", ["limits.max_steps=25", "limits.max_pixels=1024"])
    assert GenerateRequest("p", steps=25).resolve(config).steps == 25
    with pytest.raises(ValueError, match=r"steps 26 is over the limit 25"):
        GenerateRequest("p", steps=26).resolve(config)
    with pytest.raises(ConfigError, match=r"steps 20 is over the limit 5 \(limits.max_steps\)"):
        load_config("tiny", ["limits.max_steps=5"])  # the config's own defaults are checked too
    with pytest.raises(ConfigError, match=r"height x width 2048 is over the limit 1024"):
        load_config("tiny", ["limits.max_pixels=1024", "video.width=64"])
    defaults = LimitsConfig()
    wan_720p = load_config("wan2.1-t2v-14b", ["video.height=720", "video.width=1280"])
    assert wan_720p.video.height * wan_720p.video.width <= defaults.max_pixels  # the limits admit real use
    assert wan_720p.video.frames <= defaults.max_frames and wan_720p.sampling.steps <= defaults.max_steps


@pytest.mark.timeout(60)  # without the check, run() waits for replicas that were never started
def test_the_driver_checks_every_job_before_anything_is_sent(tmp_path):
    from cluster.driver import Driver, Job

    config = load_config("tiny")
    ok = GenerateRequest("fine", seed=1).resolve(config)
    huge = dataclasses.replace(ok, frames=4000000001)  # built by code that skipped resolve()
    driver = Driver(config, progress=None)  # never started: the check must come before any worker exists
    with pytest.raises(ValueError, match=r"^prompt 1: frames 4000000001 is over the limit 1025"):
        driver.run([Job(0, ok, tmp_path / "0.mp4"), Job(1, huge, tmp_path / "1.mp4")])
    unresolved = GenerateRequest("no seed yet")
    with pytest.raises(ValueError, match=r"^prompt 0: the request is not resolved"):
        driver.run([Job(0, unresolved, tmp_path / "0.mp4")])
    assert not list(tmp_path.iterdir())


def test_oversized_jsonl_field_is_exit_2_before_anything_runs(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine"}\n{"prompt": "huge", "frames": 4000000001}\n')
    line = one_error_line(odyssey("batch", f, "-o", tmp_path / "out"))
    assert "p.jsonl:2: frames 4000000001 is over the limit 1025 (limits.max_frames)" in line
    assert not (tmp_path / "out").exists()
    line = one_error_line(odyssey("generate", "a cat", "--set", "sampling.steps=100000000", "-o", tmp_path / "x.mp4"))
    assert "steps 100000000 is over the limit 1000" in line and not (tmp_path / "x.mp4").exists()


# -- YAML ------------------------------------------------------------------------------------------------------

BOMB = "sampling:\n  negative_prompt:\n" + "".join(
    f"    - &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, a in zip([None, *"abcdefgh"], "abcdefghi"))


def test_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 700  # 9^9 = 387 million nodes once expanded (here by the error message's repr)
    # Expanded, this took 62 s and 3.2 GB: the timeout makes an expansion a failure, not a hang.
    line = one_error_line(odyssey("config", "show", "--config", path, timeout=45))
    assert "bomb.yaml: not valid YAML (line 4, column" in line and "aliases (*name) are not allowed" in line
    with pytest.raises(ConfigError, match="aliases"):
        load_config(overrides=["sampling.negative_prompt=[&x [a, a], *x]"])


def test_config_file_size_and_depth_are_capped(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=r"big\.yaml: a config file may be at most 1024 KiB"):
        load_config(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 50_000)
    with pytest.raises(ConfigError, match=r"deep\.yaml: not valid YAML \(line 1, column 33: nested more than 32"):
        load_config(deep)


def test_yaml_errors_print_no_file_contents(tmp_path):
    secret = tmp_path / "credentials"  # a mistaken --config path
    secret.write_text("[default]\naws_secret_access_key = SECRET123abc\nx: y: [\n")
    line = one_error_line(odyssey("config", "show", "--config", secret, timeout=60))
    assert "SECRET123abc" not in line and "aws_secret" not in line and "line " in line
    secret.write_text("model:\n  path: /w\n  token: 'SECRET123abc' : ]\n")
    with pytest.raises(ConfigError) as info:
        load_config(secret)
    assert "SECRET123abc" not in str(info.value) and "line 3" in str(info.value)


# -- manifest --------------------------------------------------------------------------------------------------


def test_manifest_never_follows_a_link(tmp_path):
    rc = tmp_path / "bashrc"
    rc.write_text("# my shell rc\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").symlink_to(rc)
    with pytest.raises(ManifestError, match="is a symbolic link"):
        append_manifest_line(out / "manifest.jsonl", {"prompt": "$(touch /tmp/pwned)"})
    with pytest.raises(ManifestError, match="is a symbolic link"):
        check_manifest(out / "manifest.jsonl", inside=out)
    # The whole batch: refused before anything runs, the rc file untouched.
    prompts = tmp_path / "p.txt"
    prompts.write_text("$(touch /tmp/pwned) a red circle\n")
    line = one_error_line(odyssey("batch", prompts, "-o", out))
    assert "manifest.jsonl is a symbolic link" in line
    assert rc.read_text() == "# my shell rc\n" and sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]
    result = odyssey("generate", "a cat", "-o", tmp_path / "c.mp4", "--manifest", out / "manifest.jsonl")
    assert "is a symbolic link" in one_error_line(result)


def test_manifest_must_be_a_regular_singly_linked_file(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("x\n")
    os.link(victim, tmp_path / "hard.jsonl")
    with pytest.raises(ManifestError, match="2 hard links"):
        append_manifest_line(tmp_path / "hard.jsonl", {"a": 1})
    os.mkfifo(tmp_path / "fifo.jsonl")  # would block a plain open() for ever
    with pytest.raises(ManifestError, match="not a regular file|cannot open"):
        append_manifest_line(tmp_path / "fifo.jsonl", {"a": 1})
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ManifestError):
        append_manifest_line(tmp_path / "dir.jsonl", {"a": 1})
    with pytest.raises(ManifestError, match="must be inside the output folder"):
        check_manifest(tmp_path / "elsewhere" / "manifest.jsonl", inside=tmp_path / "out")
    assert victim.read_text() == "x\n"


def test_manifest_lines_escape_every_control_character(tmp_path):
    path = tmp_path / "m.jsonl"
    record = {"prompt": "a\x1b[2J\nb\x9b31mc\u2028d", "name": "é漢字"}
    append_manifest_line(path, record)
    append_manifest_line(path, {"i": 2})
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 2 and "é漢字" in text
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", text)
    assert json.loads(text.splitlines()[0]) == record
    assert stat.S_IMODE(path.stat().st_mode) & 0o022 == 0


# -- partial files of concurrent runs -----------------------------------------------------------------------------

def test_two_concurrent_batches_into_one_folder(tmp_path):
    """Batch A is frozen (SIGSTOP) the moment its first partial file appears; batch B then starts in the same folder,
    runs to the end and cleans only the partials of a run that died. A resumes, and its commit succeeds."""
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".b.0123456789ab.deadbeef.partial.mp4"  # a killed run's: its lock file is held by no one
    dead.write_bytes(b"half a video")
    (out / ".odyssey-run-0123456789ab.lock").touch()
    (tmp_path / "a.txt").write_text("a red circle moving right\n")
    (tmp_path / "b.txt").write_text("a blue square moving up\nthe white ball is moving left\n")
    common = ["-o", out, "--set", "sampling.steps=2", "--progress", "lines"]
    a = subprocess.Popen([*ODYSSEY, "batch", tmp_path / "a.txt", *common, "--set", "video.frames=129"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, partials = time.time() + 180, []
        while not partials and time.time() < deadline and a.poll() is None:
            partials = [p for p in out.glob(".0000-a-red-circle*.partial.mp4")]
            time.sleep(0.005)
        assert partials, "batch A never wrote a partial file"
        a.send_signal(signal.SIGSTOP)
        b = odyssey("batch", tmp_path / "b.txt", *common, timeout=240)
        assert b.returncode == 0, b.stderr
        assert partials[0].exists(), "batch B deleted the partial file of a batch that is still writing"
        assert not dead.exists() and not (out / ".odyssey-run-0123456789ab.lock").exists()
    finally:
        a.send_signal(signal.SIGCONT)
        _, a_err = a.communicate(timeout=240)
    assert a.returncode == 0, a_err
    assert read_mp4(out / "0000-a-red-circle-moving-right.mp4")[0].shape == (129, 32, 32, 3)
    for name in ("0000-a-blue-square-moving-up.mp4", "0001-the-white-ball-is-moving-left.mp4"):
        assert read_mp4(out / name)[0].shape == (17, 32, 32, 3)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(m["prompt"] for m in manifest) == ["a blue square moving up", "a red circle moving right",
                                                      "the white ball is moving left"]
    assert not list(out.glob(".*")), "partial or lock files left behind"


def test_partials_are_named_after_their_run_and_locked(tmp_path):
    writer = StreamingMP4(tmp_path / "v.mp4", 8)
    assert f".{RUN_ID}." in writer.tmp.name
    writer.append(np.zeros((16, 16, 3), np.uint8))
    lock = tmp_path / f".odyssey-run-{RUN_ID}.lock"
    assert lock.exists()
    assert clean_stale_partials(tmp_path) == []  # this run's own: kept
    writer.abort()
    assert not list(tmp_path.iterdir())


# -- dependencies ----------------------------------------------------------------------------------------------


def test_torch_floor_excludes_unsafe_weights_only_loading():
    text = (ROOT / "pyproject.toml").read_text()
    (floor,) = re.findall(r'"torch>=([0-9.]+)"', text)
    # torch.load(weights_only=True) could run code from a crafted file before 2.6 (CVE-2025-32434) and 2.10
    # (CVE-2026-24747); the VAE and T5 .pth loaders rely on it.
    assert tuple(int(x) for x in floor.split(".")[:2]) >= (2, 10)


# -- the local Ray token ---------------------------------------------------------------------------------------


def _clean_ray_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home)}


def test_local_ray_token_is_private_in_a_fresh_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = ("import os, ray; os.umask(0o022); from cluster.driver import connect_ray; "
            "assert connect_ray(None, num_cpus=1); ray.shutdown()")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_ray_env(home), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    folder, token = home / ".ray", home / ".ray" / "auth_token"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text().strip())


def test_a_readable_token_is_warned_about(tmp_path, monkeypatch, caplog):
    from cluster.token_file import secure_default_token

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir(mode=0o755)
    token = tmp_path / ".ray" / "auth_token"
    token.write_text("abc")
    token.chmod(0o644)
    with caplog.at_level("WARNING"):
        assert secure_default_token() == token
    (record,) = [r for r in caplog.records if "auth token" in r.getMessage()]
    assert "readable by other users (mode 644)" in record.getMessage() and "chmod 600" in record.getMessage()
    assert token.read_text() == "abc" and stat.S_IMODE(token.stat().st_mode) == 0o644  # warned, not changed
    caplog.clear()
    token.chmod(0o600)
    secure_default_token()
    assert not caplog.records
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert secure_default_token() is None


def test_submit_help_recommends_a_tunnel_not_plain_http():
    from click.testing import CliRunner

    from cluster.cli import cli

    text = " ".join(CliRunner().invoke(cli, ["submit", "--help"]).output.split())
    assert "SSH tunnel" in text and "https://" in text and "http://HEAD" not in text


# -- prompt files --------------------------------------------------------------------------------------------


def test_prompt_file_size_lines_and_length_are_capped(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a prompt\n" * 20)
    with pytest.raises(PromptFileError, match=r"p\.txt: larger than 100 bytes \(limits\.max_prompt_file_bytes\)"):
        read_prompt_file(f, LimitsConfig(max_prompt_file_bytes=100))
    with pytest.raises(PromptFileError, match=r"p\.txt: 20 lines, more than 19 \(limits\.max_prompt_lines\)"):
        read_prompt_file(f, LimitsConfig(max_prompt_lines=19))
    assert len(read_prompt_file(f, LimitsConfig(max_prompt_lines=20, max_prompt_file_bytes=180))) == 20
    f.write_text("short\n\n" + "x" * 10_001 + "\n")
    with pytest.raises(PromptFileError, match=r"p\.txt:3: the prompt has 10001 characters, more than 10000"):
        read_prompt_file(f)
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "ok", "name": "n" * 10_001}) + "\n")
    with pytest.raises(PromptFileError, match=r"p\.jsonl:1: the name has 10001 characters"):
        read_prompt_file(j)
    j.write_text('{"prompt": "a", "seed": ' + "9" * 5000 + "}\n" + "[" * 100_000 + "\n")
    with pytest.raises(PromptFileError, match=r"p\.jsonl:1: not valid JSON \(a number too long\)"):
        read_prompt_file(j)
    j.write_text("[" * 100_000 + "\n")
    with pytest.raises(PromptFileError, match=r"p\.jsonl:1: not valid JSON \(nested too deeply\)"):
        read_prompt_file(j)
    f.write_text("a\n" * 100_001)  # the default cap, reached on the CLI: one line, exit 2
    assert "100001 lines, more than 100000" in one_error_line(odyssey("batch", f, "-o", tmp_path / "out"))
    # Only \n, \r\n and \r end a line: a form feed or U+2028 inside a prompt does not make two.
    f.write_text("one\x0cstill one\u2028and still\r\ntwo\rthree\n")
    assert [s.prompt for s in read_prompt_file(f)] == ["one\x0cstill one\u2028and still", "two", "three"]


def test_a_huge_prompt_is_cut_before_it_becomes_a_name():
    text = "é" * 5_000_000  # 10 MB of UTF-8; NFKD would double it, lower() and encode() copy it again
    tracemalloc.start()
    try:
        slug = slugify(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert slug == "e" * 60
    assert peak < 1_000_000, peak
    assert slugify("!" * 300 + "cat") == "cat"


# -- weights ---------------------------------------------------------------------------------------------------


def test_shard_names_cannot_leave_the_weights_folder(tmp_path):
    from pipeline.weights import WeightsError, dit_weight_files

    folder = tmp_path / "wan"
    (folder / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not weights")
    (folder / "sub" / "inner.safetensors").write_bytes(b"")
    (folder / "link.safetensors").symlink_to(outside)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"

    def shards(*names):
        index.write_text(json.dumps({"weight_map": {f"k{i}": n for i, n in enumerate(names)}}))
        return dit_weight_files(folder)

    assert shards("sub/inner.safetensors") == [(folder / "sub" / "inner.safetensors").resolve()]
    messages = []
    for name in ["../outside.safetensors", "../missing.safetensors", str(outside), str(tmp_path / "nope.safetensors"),
                 "sub/../../outside.safetensors", "link.safetensors", "sub/../../../etc/passwd", "sub", ""]:
        with pytest.raises(WeightsError, match="names a shard outside its folder or not a .safetensors file") as e:
            shards("sub/inner.safetensors", name)
        messages.append(str(e.value).rsplit(": ", 1)[0])  # all but the name the index itself gave
    assert len(set(messages)) == 1, "the error must not tell whether an outside file exists"
    with pytest.raises(WeightsError, match=r"names shards that are not there \(or not regular files\): sub/gone.safetensors"):
        shards("sub/gone.safetensors")
    index.write_text('{"weight_map": ["a"]}')
    with pytest.raises(WeightsError, match="is not a safetensors index"):
        dit_weight_files(folder)


# -- echo ------------------------------------------------------------------------------------------------------

EVIL = "a red circle\x1b[2J\x1b]0;owned\x07\nodyssey: done, all good\r\x9b31m\u202e"


def test_printable_escapes_every_control_character():
    shown = printable(EVIL)
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e]", shown)
    assert shown.startswith("a red circle\\x1b[2J\\x1b]0;owned\\x07\\nodyssey") and "\\u202e" in shown
    assert printable("x" * 50, 10) == "x" * 10 + "..."


def test_progress_lines_cannot_be_forged_or_clear_the_terminal():
    from cluster.progress import BarReporter, LineReporter
    from pipeline.request import Progress

    stream = io.StringIO()
    reporter = LineReporter(stream)
    reporter.start(0, EVIL, 0, 0)
    reporter.event(0, Progress("r", "denoise", 3, 3))
    reporter.finish(0, False, f"worker said {EVIL}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith("[0] ") for line in lines)
    assert not re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e]", stream.getvalue().replace("\n", ""))

    bars = BarReporter()
    errors = io.StringIO()
    sys_stderr, sys.stderr = sys.stderr, errors
    try:
        bars.start(1, EVIL, 0, 0)
        bars.finish(1, False, EVIL)
    finally:
        sys.stderr = sys_stderr
    assert "\x1b[2J" not in errors.getvalue() and "owned\x07" not in errors.getvalue()


def test_cli_errors_echo_no_control_characters(tmp_path):
    line = one_error_line(odyssey("generate", "a cat", "-o", tmp_path / "x\x1b[2J\nodyssey: forged.gif", timeout=60))
    assert "--output must end in .mp4" in line and "\x1b" not in line and "\\x1b[2J\\nodyssey: forged" in line


# -- retries ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_prompt_is_tried_max_retries_plus_one_times(tmp_path):
    """A replica that dies in every attempt: the prompt is tried exactly runtime.max_retries + 1 times, then fails
    with the last error, and the batch ends."""
    ray = pytest.importorskip("ray")
    from cluster.driver import Driver, Job
    from pipeline.request import Progress

    config = load_config("tiny", ["sampling.steps=3", "runtime.device=cpu", "runtime.max_retries=2",
                                  "runtime.collective_timeout_s=60", "runtime.placement_timeout_s=60",
                                  "runtime.rebuild_backoff_s=0.1"])
    killed = []

    def on_event(job, event):
        if isinstance(event, Progress) and event.stage == "denoise" and event.step == 1:
            replica = next(r for r in driver.replicas if r is not None and r.workers)
            pid = replica.pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append((job.attempts, pid))

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        t0 = time.time()
        with Driver(config, progress=False, on_event=on_event) as driver:
            (outcome,) = driver.run([Job(0, GenerateRequest("a red circle", seed=1).resolve(config),
                                         tmp_path / "0.mp4")])
    finally:
        ray.shutdown()
    assert not outcome.ok and outcome.error
    assert [attempt for attempt, _ in killed] == [0, 1, 2], killed  # three attempts, each on a fresh worker
    assert len({pid for _, pid in killed}) == 3
    assert outcome.job.attempts == 2
    assert time.time() - t0 < 240  # every loss noticed within seconds, never the collective timeout
    assert not list(tmp_path.iterdir())


# -- second review: hangs, races and leaks the first fixes left ----------------------------------------------


def _clean_in_subprocess(folder, timeout=20):
    code = f"from cluster.video import clean_stale_partials; print(len(clean_stale_partials({str(folder)!r})))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_a_fifo_named_like_a_run_lock_cannot_hang_the_cleanup(tmp_path):
    run = "aaaaaaaaaaaa"
    os.mkfifo(tmp_path / f".odyssey-run-{run}.lock")  # open(O_RDONLY) of a FIFO waits for a writer for ever
    partial = tmp_path / f".v.{run}.12345678.partial.mp4"
    partial.write_bytes(b"x")
    result = _clean_in_subprocess(tmp_path)
    assert result.returncode == 0, result.stderr
    assert partial.exists(), "a run whose lock cannot be read is alive as far as anyone can tell"


def test_cleanup_skips_entries_it_cannot_remove(tmp_path, monkeypatch):
    (tmp_path / ".d.partial.mp4").mkdir()  # unlink() of a folder: IsADirectoryError
    (tmp_path / ".d.partial.mp4" / "keep").write_text("x")
    denied = tmp_path / ".denied.partial.mp4"
    denied.write_bytes(b"x")
    stale = tmp_path / f".v.{'b' * 12}.12345678.partial.mp4"
    stale.write_bytes(b"x")
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == denied.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert clean_stale_partials(tmp_path) == [stale]  # the others are skipped, the batch carries on
    assert (tmp_path / ".d.partial.mp4" / "keep").exists() and denied.exists() and not stale.exists()


def test_a_run_never_holds_a_lock_on_a_file_another_cleanup_removed(tmp_path, monkeypatch):
    from cluster import video

    real = video.fcntl.flock
    calls = []

    class Fcntl:  # another run's cleanup slips in between our open(O_CREAT) and our flock
        LOCK_EX, LOCK_NB, LOCK_UN = video.fcntl.LOCK_EX, video.fcntl.LOCK_NB, video.fcntl.LOCK_UN

        @staticmethod
        def flock(fd, op):
            if not calls and os.fstat(fd).st_ino == os.stat(video._lock_path(tmp_path, RUN_ID)).st_ino:
                calls.append(fd)
                assert video._run_alive(tmp_path, RUN_ID) is False  # unlocked: looks dead, removed
            return real(fd, op)

    monkeypatch.setattr(video, "fcntl", Fcntl)
    video._LOCKS.acquire(tmp_path)
    try:
        assert calls, "the race was not provoked"
        fd = video._LOCKS._held[tmp_path.resolve()][0]
        st = os.stat(video._lock_path(tmp_path, RUN_ID), follow_symlinks=False)
        assert (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
        assert stat.S_IMODE(st.st_mode) == 0o600
        monkeypatch.setattr(video, "fcntl", __import__("fcntl"))
        assert video._run_alive(tmp_path, RUN_ID) is True
    finally:
        video._LOCKS.release(tmp_path)


@pytest.mark.timeout(60)
def test_sexagesimal_and_huge_scalars_cost_nothing(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("sampling:\n  steps: " + ":".join(["1"] * 400_000) + "\n")
    t0 = time.process_time()
    with pytest.raises(ConfigError, match="sampling.steps: expected int"):
        load_config(str(config))
    assert time.process_time() - t0 < 10  # base-60 ints were quadratic: 94 s of CPU for 1 MiB
    with pytest.raises(ConfigError, match="sampling.steps: expected int"):
        load_config("tiny", ["sampling.steps=1:30"])  # YAML 1.1 read this as 90
    with pytest.raises(ConfigError, match="a number of more than 100 characters"):
        load_config("tiny", ["sampling.shift=0x" + "f" * 200])
    with pytest.raises(ConfigError, match="sampling.negative_prompt: the value is longer than 65536 characters"):
        load_config("tiny", ["sampling.negative_prompt=" + "x" * 70_000])
    with pytest.raises(ConfigError, match="over the limit 10000"):
        load_config("tiny", ["sampling.negative_prompt=" + "x" * 10_001])


def test_config_numbers_too_big_to_show_are_one_clear_error():
    from configs import SamplingConfig, from_dict

    with pytest.raises(ConfigError, match="shift: expected float, got a number too large"):
        from_dict(SamplingConfig, {"shift": 10**400})  # float() overflows
    with pytest.raises(ConfigError, match=r"sampling: seed must be in 0\.\.2\^63-1, got beyond 2\^64"):
        load_config("tiny", ["sampling.seed=" + "9" * 99])
    big = 10**5000  # str() of it raises: Python's 4300-digit limit
    with pytest.raises(ValueError, match=r"steps must be >= 1, got below -2\^64"):
        dataclasses.replace(load_config("tiny").sampling, steps=-big)
    with pytest.raises(ValueError, match=r"seed must be in 0\.\.2\^63-1, got beyond 2\^64"):
        dataclasses.replace(load_config("tiny").sampling, seed=big)
    result = odyssey("config", "show", "--set", "sampling.shift=" + "9" * 400, timeout=60)
    assert "a number of more than 100 characters" in one_error_line(result)


def test_shift_has_a_useful_lower_bound():
    with pytest.raises(ConfigError, match=r"shift must be >= 0\.001"):
        load_config("tiny", ["sampling.shift=1e-320"])
    assert load_config("tiny", ["sampling.shift=0.001"]).sampling.shift == 0.001


def test_a_symlinked_ray_token_or_one_owned_by_another_user_is_refused(tmp_path, monkeypatch, caplog):
    from cluster.token_file import secure_default_token

    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    folder, token = tmp_path / ".ray", tmp_path / ".ray" / "auth_token"
    folder.mkdir(mode=0o700)
    token.symlink_to(tmp_path / "elsewhere")  # dangling: Ray would write the token through it, umask mode
    with pytest.raises(ValueError, match="auth_token is a symbolic link"):
        secure_default_token()
    assert not (tmp_path / "elsewhere").exists()
    token.unlink()
    token.write_text("abc")
    token.chmod(0o600)
    os.chown(token, os.geteuid() + 1, -1)
    with pytest.raises(ValueError, match="auth_token is owned by another user"):
        secure_default_token()
    os.chown(token, os.geteuid(), -1)
    folder.chmod(0o777)
    with caplog.at_level("WARNING"):
        assert secure_default_token() == token
    assert any("writable by other users" in r.getMessage() for r in caplog.records)
    caplog.clear()
    folder.chmod(0o700)
    os.chown(folder, os.geteuid() + 1, -1)
    with caplog.at_level("WARNING"):
        secure_default_token()
    assert any("owned by another user" in r.getMessage() for r in caplog.records)


def test_a_symlinked_output_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").symlink_to(elsewhere, target_is_directory=True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    line = one_error_line(odyssey("batch", prompts, "-o", f"{tmp_path / 'out'}/"))
    assert "is a symbolic link" in line
    assert not list(elsewhere.iterdir())


CONTROLS = "A\x9b31mB\u202eC\x7fD\u2028E\u2066F"


@pytest.mark.parametrize("explain", [False, True])
def test_config_show_escapes_control_characters(explain):
    escaped = CONTROLS.encode("unicode_escape").decode("ascii")  # YAML's double-quoted escapes: \x9b, \u202e
    result = odyssey("config", "show", *(["--explain"] if explain else []),
                     "--set", f'sampling.negative_prompt="{escaped}"', timeout=60)
    assert result.returncode == 0, result.stderr
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]", result.stdout)
    assert "negative_prompt:" in result.stdout and "\\u202e" in result.stdout
    raw = odyssey("config", "show", "--set", f"sampling.negative_prompt={CONTROLS}", timeout=60)
    assert "not valid YAML" in one_error_line(raw)  # YAML refuses raw C1 controls: one line, exit 2


def test_manifest_lines_escape_bidi_controls(tmp_path):
    from cluster import manifest, prompts

    append_manifest_line(tmp_path / "m.jsonl", {"prompt": CONTROLS})
    text = (tmp_path / "m.jsonl").read_text()
    assert not re.search("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]", text)
    assert json.loads(text)["prompt"] == CONTROLS
    assert not hasattr(manifest, "_RAW_CONTROLS") and hasattr(prompts, "UNPRINTABLE")  # one definition


def _weights_folder(tmp_path):
    from safetensors.torch import save_file
    import torch

    folder = tmp_path / "wan"
    folder.mkdir()
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    return folder, outside


def test_globbed_weights_and_pth_files_cannot_point_out_of_the_model_folder(tmp_path):
    from pipeline.text_encoder import ORIGINAL_T5_FILE, ORIGINAL_TOKENIZER_DIR, WanTextEncoder
    from pipeline.vae_weights import ORIGINAL_VAE_FILE, read_vae_spec
    from pipeline.weights import WeightsError, dit_weight_files

    folder, outside = _weights_folder(tmp_path)
    (folder / "a.safetensors").symlink_to(outside)
    with pytest.raises(WeightsError, match="outside the model folder"):
        dit_weight_files(folder)
    (folder / "a.safetensors").unlink()
    (folder / "b.safetensors").write_bytes(outside.read_bytes())
    assert dit_weight_files(folder) == [(folder / "b.safetensors").resolve()]

    (folder / ORIGINAL_VAE_FILE).symlink_to(tmp_path / "vae.pth")
    (tmp_path / "vae.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="outside the model folder"):
        read_vae_spec(folder)
    tokenizer = folder / ORIGINAL_TOKENIZER_DIR
    tokenizer.mkdir(parents=True)
    (folder / ORIGINAL_T5_FILE).symlink_to(tmp_path / "t5.pth")
    (tmp_path / "t5.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="outside the model folder"):
        WanTextEncoder.from_pretrained(folder)
    (folder / ORIGINAL_T5_FILE).unlink()
    (folder / ORIGINAL_T5_FILE).write_bytes(b"")
    (tokenizer / "tokenizer.json").symlink_to(tmp_path / "vae.pth")  # one file of it
    with pytest.raises(WeightsError, match="outside the model folder"):
        WanTextEncoder.from_pretrained(folder)
    (tokenizer / "tokenizer.json").unlink()
    tokenizer.rmdir()
    (tmp_path / "tok").mkdir()
    tokenizer.symlink_to(tmp_path / "tok", target_is_directory=True)  # or all of it
    with pytest.raises(WeightsError, match="outside the model folder"):
        WanTextEncoder.from_pretrained(folder)


def test_a_hub_cache_snapshot_may_link_into_its_blobs(tmp_path):
    from pipeline.weights import dit_weight_files

    repo = tmp_path / "models--Wan-AI--x"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    _, outside = _weights_folder(tmp_path)
    blob = repo / "blobs" / "deadbeef"
    blob.write_bytes(outside.read_bytes())
    (snap / "m.safetensors").symlink_to("../../blobs/deadbeef")
    assert dit_weight_files(snap) == [blob.resolve()]


def test_resume_counts_only_regular_files_as_complete(tmp_path):
    from cluster.cli import _complete

    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "real.mp4").write_bytes(b"x")
    (tmp_path / "link.mp4").symlink_to(tmp_path / "real.mp4")
    os.mkfifo(tmp_path / "fifo.mp4")
    assert [_complete(tmp_path / n) for n in ("real.mp4", "dir.mp4", "link.mp4", "fifo.mp4", "none.mp4")] == [
        True, False, False, False, False]
