"""bench/gpu_check.py: the CPU rehearsal of the one-GPU check runs clean, and a broken path makes it fail.

The script's CUDA sizes only run on a lent GPU machine; here it runs with --device cpu --quick (gloo, tiny shapes), so
the prepared command cannot rot between GPU visits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402
from bench.gpu_attention_checks import check_local_attention, reference_fp32  # noqa: E402

EXPECTED = ["local_attention", "wan_dit", "ulysses_nccl", "vae_stream", "runner", "runner_embedded", "ray_generate"]


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
    assert rows["runner"]["figures"]["psnr_dB"] >= 25
    assert rows["vae_stream"]["figures"]["frames"] == 5
    assert "| local_attention | ok |" in done.stdout
    assert "summary: 6 ok, 0 FAIL, 1 skipped" in done.stdout


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


def test_a_crashing_check_fails_alone(tmp_path, keep_threads):
    def boom(ctx, row):
        raise RuntimeError("kaboom")

    checks = {"boom": boom, "local_attention": check_local_attention}
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--json", str(out)], checks=checks) == 1
    rows = _rows(out)
    assert rows["boom"]["status"] == "FAIL" and rows["boom"]["note"] == "RuntimeError: kaboom"
    assert rows["local_attention"]["status"] == "ok"


def test_without_diffusers_the_comparisons_skip_with_reason(tmp_path, monkeypatch, keep_threads):
    # The GPU machine has no diffusers: the models are built directly and only the comparison is skipped.
    monkeypatch.setitem(sys.modules, "diffusers", None)
    out = tmp_path / "rows.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--checks", "wan_dit,vae_stream", "--json", str(out)]) == 0
    rows = _rows(out)
    for name in ("wan_dit", "vae_stream"):
        assert rows[name]["status"] == "ok"
        assert rows[name]["figures"]["diffusers"].startswith("skipped: diffusers does not import")
    assert rows["wan_dit"]["figures"]["forward_s"] > 0 and rows["vae_stream"]["figures"]["total_s"] > 0


def test_usage_errors_exit_2(capsys):
    assert gpu_check.main(["--device", "cpu", "--checks", "local_attention,nope"]) == 2
    assert "unknown check(s) nope" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--json", "/nonexistent-dir/rows.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda"]) == 2


def test_chunked_fp32_reference_is_exact():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 50, 3, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    whole = reference_fp32(q, k, v)
    chunked = reference_fp32(q, k, v, chunk_scores=3 * 50 * 7)  # 7 query rows per chunk
    assert whole.dtype == torch.float32
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)  # chunked GEMMs may round differently
    want = torch.softmax(torch.einsum("bshd,bthd->bhst", q.float(), k.float()) / 4.0, -1)
    assert torch.allclose(whole, torch.einsum("bhst,bthd->bshd", want, v.float()), atol=1e-6)
