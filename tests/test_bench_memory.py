"""bench/memory.py: its CPU rehearsal (--quick: a tiny DiT, the same two variants on two gloo processes) runs clean
and reports what the shapes say, so the script cannot rot between the runs that fill docs/benchmarks.md."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import WanDiT, WanDiTConfig  # noqa: E402


def run_bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/memory.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": "."}, timeout=timeout)


def shard_bytes(cfg: WanDiTConfig, rank: int, world: int) -> tuple[int, int]:
    """(whole model bytes, bytes rank keeps with the blocks sharded) in fp32, worked out here from the shapes:
    FSDP2's padded chunk of every block parameter's rows (ceil(rows / world) on every rank: what it allocates),
    everything else whole."""
    with torch.device("meta"):
        params = dict(WanDiT(cfg).named_parameters())
    whole = kept = 0
    for name, p in params.items():
        row = math.prod(p.shape[1:]) * 4
        whole += p.shape[0] * row
        if name.startswith("blocks."):
            kept += -(-p.shape[0] // world) * row
        else:
            kept += p.shape[0] * row
    return whole, kept


def test_quick_run_reports_the_shapes_sharding_and_equal_outputs(tmp_path):
    out = tmp_path / "memory.json"
    done = run_bench("--quick", "--json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = json.loads(out.read_text())
    cfg = WanDiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in got["config"].items()})
    assert cfg.num_layers == 4 and got["world"] == 2
    whole, sharded = got["variants"]["whole"], got["variants"]["sharded"]
    assert [r["rank"] for r in whole] == [r["rank"] for r in sharded] == [0, 1]
    for rank in range(2):
        full, kept = shard_bytes(cfg, rank, 2)
        assert whole[rank]["param_bytes"] == whole[rank]["param_bytes_after"] == full
        assert sharded[rank]["param_bytes"] == kept < full
        assert sharded[rank]["param_bytes_after"] == kept  # every gathered block freed after the forwards
    assert got["resharded"] is True
    # the same weights drawn in both variants, the same inputs: the sharded model computes the same output
    assert got["output_rel_l2"] <= 1e-5
    for rec in whole + sharded:
        assert rec["peak_rss_forwards"] >= rec["param_bytes"] and rec["peak_rss_load"] >= rec["param_bytes"]
        assert rec["rss_before_load"] > 0 and rec["forward_s"] > 0
    assert sharded[0]["gathers_alone_s"] > 0
    ratio = max(r["param_bytes"] for r in sharded) / max(r["param_bytes"] for r in whole)
    assert got["ratios"]["param_bytes"] == ratio
    assert "| whole |" in done.stdout and "| sharded |" in done.stdout
    assert f"resident parameters {ratio:.3f}x" in done.stdout and "bitwise equal" in done.stdout


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys):
    """main() in this process (the script's last line is sys.exit(main())): refused before any rank is spawned."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for args, says in ((["--quick", "--tokens", "0"], "--tokens must be at least 1"),
                       (["--quick", "--json", str(tmp_path / "nowhere" / "x.json")], "does not exist")):
        code = bench.main(args)
        out, err = capsys.readouterr()
        assert code == 2 and says in err, err
        assert len(err.strip().splitlines()) == 1 and "memory: whole" not in out
