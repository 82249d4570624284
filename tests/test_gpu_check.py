"""bench/gpu_check.py: the CPU rehearsal of the one-GPU check runs clean, and a broken path makes it fail.

The script's CUDA sizes only run on a lent GPU machine; here it runs with --device cpu --quick (gloo, tiny shapes), so
the prepared command cannot rot between GPU visits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402
from bench.gpu_attention_checks import check_local_attention, reference_fp64  # noqa: E402

# single-process checks first, then the ones that start NCCL
EXPECTED = ["local_attention", "wan_dit", "vae_stream", "step_cache", "ulysses_nccl", "sharding", "runner",
            "runner_embedded", "ray_generate"]


@pytest.fixture
def keep_threads():
    """main() pins the CPU run to one thread; give the pytest process its setting back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _rows(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(path.read_text())["rows"]}


def test_cpu_quick_run_is_clean(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--json", str(out)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": "."}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(out)
    assert list(rows) == EXPECTED
    assert not [r for r in rows.values() if r["status"] == "FAIL"]
    for r in rows.values():
        assert r["status"] in ("ok", "skipped")
        if r["status"] == "skipped":
            assert r["note"], r  # a skip says why
        else:
            assert r["figures"], r
    assert rows["ray_generate"]["status"] == "skipped"  # needs a GPU (and Ray)
    # what each check measured is in its row (and in the printed markdown table)
    assert "sdpa" in rows["local_attention"]["figures"] and "skipped" in rows["local_attention"]["figures"]["flash"]
    assert rows["ulysses_nccl"]["figures"]["backend"] == "gloo"
    dit = rows["wan_dit"]["figures"]  # the first layer with the tight bound, both layers with the loose one
    assert float(dit["rel_err_1_layers"].split()[0]) < 1.5e-2 and float(dit["rel_err_2_layers"].split()[0]) < 8e-2
    assert rows["runner"]["figures"]["psnr_dB"] >= 25
    assert rows["vae_stream"]["figures"]["frames"] == 5
    assert "| local_attention | ok |" in done.stdout
    cached = rows["step_cache"]["figures"]  # every policy ran, and a cached run differs from the uncached one
    assert {"teacache", "fbcache", "easycache"} <= set(cached) and "computed" in cached["fbcache"]
    sharded = rows["sharding"]["figures"]  # FSDP2 over the one-rank group computes what the unsharded model does
    assert sharded["backend"] == "gloo" and sharded["forward"] == sharded["forward_tokens"] == "bitwise"
    assert "summary: 8 ok, 0 FAIL, 1 skipped" in done.stdout


def test_wrong_attention_kernel_fails_the_run(tmp_path, monkeypatch, keep_threads):
    from attention import local as local_mod

    monkeypatch.setitem(local_mod._IMPLS, "sdpa", lambda q, k, v: v)  # a kernel that forgot the softmax
    out = tmp_path / "rows.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--checks", "local_attention", "--json", str(out)])
    assert code == 1
    row = _rows(out)["local_attention"]
    assert row["status"] == "FAIL" and "sdpa" in row["note"] and "reference" not in row["note"]


def test_bad_fp8_scale_fails_ulysses(tmp_path, monkeypatch, keep_threads):
    from attention import comm

    monkeypatch.setattr(comm, "E4M3_MAX", 1000.0)  # scales past e4m3's range: values overflow on the wire
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--checks", "ulysses_nccl", "--json", str(out)]) == 1
    row = _rows(out)["ulysses_nccl"]
    assert row["status"] == "FAIL" and row["note"].startswith("fp8 round trip error")
    assert "wire_fp8" in row["note"]  # and the attention over the fp8 wire is off too


def _shard_then(monkeypatch, spoil):
    """pipeline.sharding.shard_dit followed by spoil(dit): what the sharding check must catch."""
    from pipeline import sharding

    real = sharding.shard_dit

    def shard_dit(dit, group, **kw):
        real(dit, group, **kw)
        spoil(dit)
        return dit

    monkeypatch.setattr(sharding, "shard_dit", shard_dit)


def test_sharding_that_changes_the_weights_fails(tmp_path, monkeypatch, keep_threads):
    # a shard that lost its rows (here: zeroed) is what a wrong row range in loading looks like
    _shard_then(monkeypatch, lambda dit: dit.blocks[-1].ffn[0].weight.to_local().zero_())
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--checks", "sharding", "--json", str(out)]) == 1
    row = _rows(out)["sharding"]
    assert row["status"] == "FAIL" and "sharded forward differs from the unsharded model" in row["note"]
    assert "sharded forward_tokens differs" in row["note"]


def test_sharding_that_keeps_blocks_gathered_fails(tmp_path, monkeypatch, keep_threads):
    # no reshard after forward: the same output, but every block's whole weights stay resident (no memory saved)
    def keep_gathered(dit):
        for block in dit.blocks:
            block.set_reshard_after_forward(False)

    _shard_then(monkeypatch, keep_gathered)
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--checks", "sharding", "--json", str(out)]) == 1
    row = _rows(out)["sharding"]
    assert row["status"] == "FAIL" and "still gathered after the forward" in row["note"], row["note"]


def test_a_crashing_check_fails_alone(tmp_path, keep_threads):
    def boom(ctx, row):
        raise RuntimeError("kaboom")

    checks = {"boom": boom, "local_attention": check_local_attention}
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--json", str(out)], checks=checks) == 1
    rows = _rows(out)
    assert rows["boom"]["status"] == "FAIL" and rows["boom"]["note"] == "RuntimeError: kaboom"
    assert rows["local_attention"]["status"] == "ok"


class WanFails(types.ModuleType):
    """`import diffusers` works, its Wan models do not: what diffusers' lazy loader does when the model's module
    or one of its dependencies fails to import."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"Failed to import diffusers.models.{name} because of the following error (look up to see "
                           f"its traceback):\nNo module named 'regex'")


@pytest.mark.parametrize("diffusers", [None, WanFails("diffusers")], ids=["absent", "wan-submodule-fails"])
def test_without_diffusers_the_comparisons_skip_with_reason(tmp_path, monkeypatch, keep_threads, diffusers):
    # The GPU machine has no diffusers, or one may fail on first use: our figures stand, the comparison is skipped.
    monkeypatch.setitem(sys.modules, "diffusers", diffusers)
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--checks", "wan_dit,vae_stream", "--json", str(out)]) == 0
    rows = _rows(out)
    want = ("skipped: diffusers does not import" if diffusers is None else
            "skipped: diffusers.{} does not import (RuntimeError: Failed to import")
    for name, cls in (("wan_dit", "WanTransformer3DModel"), ("vae_stream", "AutoencoderKLWan")):
        assert rows[name]["status"] == "ok"
        assert rows[name]["figures"]["diffusers"].startswith(want.format(cls)), rows[name]
    assert rows["wan_dit"]["figures"]["forward_s"] > 0 and rows["vae_stream"]["figures"]["total_s"] > 0
    assert rows["wan_dit"]["figures"]["params_M"] > 0 and rows["vae_stream"]["figures"]["frames"] == 5


def test_wrong_dit_attention_kernel_fails_the_first_layers_bound(tmp_path, monkeypatch, keep_threads):
    from attention import local as local_mod

    sdpa = local_mod._IMPLS["sdpa"]
    # a kernel that forgot the 1/sqrt(D) scale: WanDiT's attention only, diffusers calls torch's SDPA itself
    monkeypatch.setitem(local_mod._IMPLS, "sdpa", lambda q, k, v: sdpa(q * q.shape[-1] ** 0.5, k, v))
    sizes_for = gpu_check.sizes_for  # narrower layers (head dim 128 kept): the bound, not the width, is under test
    monkeypatch.setattr(gpu_check, "sizes_for", lambda device, quick: dataclasses.replace(
        sizes_for(device, quick), dit_dims=dict(dim=384, ffn_dim=1024, num_heads=3)))
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--checks", "wan_dit", "--json", str(out)]) == 1
    row = _rows(out)["wan_dit"]
    assert row["status"] == "FAIL" and "WanDiT vs diffusers: 1 layers rel err" in row["note"], row
    assert row["figures"]["forward_s"] > 0  # our figures stay in the failed row


def test_a_sticky_cuda_error_skips_the_rest(tmp_path, keep_threads):
    ran = []

    def illegal(ctx, row):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    def fine(ctx, row):
        ran.append(1)
        row.figures["x"] = 1

    out = tmp_path / "rows.json"
    checks = {"first": fine, "illegal": illegal, "later": fine, "last": fine}
    assert gpu_check.main(["--device", "cpu", "--quick", "--json", str(out)], checks=checks) == 1
    rows = _rows(out)
    assert [r["status"] for r in rows.values()] == ["ok", "FAIL", "skipped", "skipped"] and ran == [1]
    assert rows["later"]["note"] == rows["last"]["note"] == "CUDA context poisoned by illegal"
    assert rows["illegal"]["note"].startswith("AcceleratorError: CUDA error: an illegal memory access")


HANG = """
import sys, time
from bench import gpu_check
gpu_check.TIMEOUT_S["hang"] = 3
def hang(ctx, row):
    time.sleep(100)
def fine(ctx, row):
    row.figures["x"] = 1
sys.exit(gpu_check.main(["--device", "cpu", "--json", sys.argv[1]], checks={"fine": fine, "hang": hang, "after": fine}))
"""


def test_a_hanging_check_prints_its_stack_and_ends_the_run(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-c", HANG, str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": "."},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Timeout" in done.stderr and "in hang" in done.stderr, done.stderr[-2000:]  # the stuck frame is named
    rows = _rows(out)  # the finished row, then the one that never finished
    assert list(rows) == ["fine", "hang"] and rows["fine"]["status"] == "ok"
    assert rows["hang"]["status"] == "FAIL" and rows["hang"]["note"].startswith("did not finish: ran past 3 s")


def test_the_runner_runs_get_loopback_gloo(monkeypatch):
    from bench import gpu_model_checks
    from pipeline import runner as runner_mod

    seen = []

    class FakeRunner:
        def __init__(self, *args):
            seen.append(os.environ.get("GLOO_SOCKET_IFNAME"))

        def close(self):
            seen.append(os.environ.get("GLOO_SOCKET_IFNAME"))

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(runner_mod, "Runner", FakeRunner)
    assert gpu_model_checks.run_runner(["runtime.device=cpu"], [], preset="tiny") == ([], 0.0)
    assert seen == ["lo", "lo"] and "GLOO_SOCKET_IFNAME" not in os.environ


def test_no_tf32_turns_tf32_off_and_restores():
    from bench.gpu_common import no_tf32

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    with no_tf32():
        assert flags() == (False, False)
    assert flags() == before


def test_usage_errors_exit_2(capsys):
    assert gpu_check.main(["--device", "cpu", "--checks", "local_attention,nope"]) == 2
    assert "unknown check(s) nope" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--json", "/nonexistent-dir/rows.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda"]) == 2


def test_chunked_fp64_reference_is_exact():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 50, 3, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    whole = reference_fp64(q, k, v)
    chunked = reference_fp64(q, k, v, chunk_scores=3 * 50 * 7)  # 7 query rows per chunk
    assert whole.dtype == torch.float64 and whole.shape == q.shape
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
    # torch's own fp64 attention, heads-first
    want = torch.nn.functional.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(whole, want.transpose(1, 2), atol=1e-12, rtol=0)
