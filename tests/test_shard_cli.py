"""Sharded weights from the user's side (issue #15): --shard-weights on every command that takes --ulysses, the
one-line refusals (exit 2, nothing written, no Ray) of settings that cannot shard, and `odyssey generate --ulysses 2
--shard-weights` writing the very video the unsharded model writes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cluster.driver as driver_mod
import cluster.validate as validate_mod
from cluster.cli import cli, main
from cluster.video import read_mp4

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving right"
ONE_RANK = ("parallel.shard_weights needs a replica of 2 or more ranks (ulysses_degree x cfg_degree is 1): there is "
            "nothing to shard over (--ulysses 2 or more, or --cfg-parallel)")


@pytest.fixture
def in_process(monkeypatch):
    """main() run in this process: Ray must not start (every case here is refused first), and the SIGTERM handler
    main installs is put back afterwards."""

    def refuse(*a, **k):
        raise AssertionError("Ray was started for a run that had to be refused first")

    monkeypatch.setattr(driver_mod, "connect_ray", refuse)
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def run_main(args, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("command", ["generate", "batch", "serve"])
def test_shard_weights_flag_sits_with_the_parallel_degrees(command):
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    options = [o for p in cli.commands[command].params for o in p.opts if o.startswith("--")]
    assert options[options.index("--ulysses") + 1 : options.index("--ulysses") + 3] == ["--ring", "--shard-weights"]
    assert "all-gather" in result.output and "parallel.shard_weights=true" in result.output


def _commands(tmp_path: Path) -> dict[str, list]:
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    return {"generate": ["generate", PROMPT, "-o", tmp_path / "out" / "x.mp4", "--manifest", tmp_path / "m.jsonl"],
            "batch": ["batch", tmp_path / "p.txt", "-o", tmp_path / "out"],
            "serve": ["serve", "--output-dir", tmp_path / "out", "--port", 1]}


@pytest.mark.parametrize("command", ["generate", "batch", "serve"])
@pytest.mark.parametrize("args, message", [
    (["--shard-weights"], ONE_RANK),
    (["--shard-weights", "--replicas", 2], ONE_RANK),  # replicas are copies: each still has one rank
    (["--set", "model.shard_text_encoder=true"], "model.shard_text_encoder needs a replica of 2 or more ranks "
                                                 "(ulysses_degree x cfg_degree is 1): there is nothing to shard over"),
    (["--ulysses", 2, "--set", "model.shard_text_encoder=true", "--set", "model.text_encoder_device=cpu"],
     "model.shard_text_encoder shards the encoder over the replica's devices, but model.text_encoder_device=cpu "
     "keeps it whole on rank 0's CPU: choose one"),
    (["--cfg-parallel", "--shard-weights", "--set", "model.shard_text_encoder=true", "--set",
      "model.offload_text_encoder=true"],
     "model.shard_text_encoder keeps the encoder's shards on every rank's GPU, but model.offload_text_encoder=true "
     "moves the whole encoder to one GPU per prompt: choose one"),
])
def test_settings_that_cannot_shard_exit_2_with_one_line(in_process, capsys, tmp_path, command, args, message):
    code, lines = run_main([*_commands(tmp_path)[command], *args], capsys)
    assert code == 2 and lines == [f"odyssey: error: config: {message}"], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"], "nothing may be written"


@pytest.mark.parametrize("command", ["generate", "batch", "serve"])
def test_a_torch_that_cannot_shard_is_refused_before_ray(in_process, capsys, monkeypatch, tmp_path, command):
    reason = "torch 2.4 has no fully_shard(ignored_params=...): parallel.shard_weights needs torch >= 2.7"
    monkeypatch.setattr(validate_mod, "fsdp_unavailable", lambda: reason)
    for args, key in ((["--ulysses", 2, "--shard-weights"], "parallel.shard_weights"),
                      (["--cfg-parallel", "--set", "model.shard_text_encoder=true"], "model.shard_text_encoder")):
        code, lines = run_main([*_commands(tmp_path)[command], *args], capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("odyssey: error: "), lines
        assert lines[0].endswith(f" {key}: {reason.replace(': parallel.shard_weights needs', ': needs')}"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"], "nothing may be written"


def test_the_real_entrypoint_refuses_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", PROMPT, "-o", tmp_path / "x.mp4",
                             "--shard-weights"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip() == f"odyssey: error: config: {ONE_RANK}"
    assert not list(tmp_path.iterdir())


# -- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for both runs of the module (each `odyssey generate` in this process joins it)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_generate_with_shard_weights_writes_the_same_video(local_ray, tmp_path):
    """The embedded model at Ulysses 2, its DiT sharded over both ranks (FSDP2, gloo) and whole: the MP4s decode
    to the same frames, and the manifest's memory record shows each rank holding less of the weights."""
    handler = signal.getsignal(signal.SIGTERM)
    videos, records = {}, {}
    try:
        for name, extra in (("whole", []), ("sharded", ["--shard-weights"])):
            out = tmp_path / f"{name}.mp4"
            main(["generate", PROMPT, "-o", str(out), "--seed", "5", "--ulysses", "2", "--progress", "none",
                  "--set", "sampling.steps=6", "--set", "runtime.num_cpus_per_worker=0.5",
                  "--set", "runtime.collective_timeout_s=60", "--manifest", str(tmp_path / f"{name}.jsonl"), *extra])
            videos[name] = read_mp4(out)
            (records[name],) = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    finally:
        signal.signal(signal.SIGTERM, handler)
    (whole, fps), (sharded, sharded_fps) = videos["whole"], videos["sharded"]
    assert whole.shape == (17, 32, 32, 3) and fps == sharded_fps == 8
    assert np.array_equal(whole, sharded)
    assert records["sharded"]["config"]["parallel"]["shard_weights"] is True
    assert records["whole"]["config"]["parallel"]["shard_weights"] is False
    held, held_whole = records["sharded"]["memory"]["param_bytes"], records["whole"]["memory"]["param_bytes"]
    assert len(held) == len(held_whole) == 2
    # rank 1 holds only the DiT: sharded over 2 ranks, a little over half of it (the non-block weights stay whole)
    assert 0.4 * held_whole[1] < held[1] < 0.75 * held_whole[1]
    assert held[0] < held_whole[0]
