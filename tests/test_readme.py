"""README.md as a new user reads it: the Python API snippet runs as written (two ranks under torchrun, a tiny Wan2.1
DiT at the path it names) and gives the unparallel model's output; it imports nothing it does not use; the torch
pin comes with the CPU wheel index and matches the torch the tests run on."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _api_snippet() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "apply_sequence_parallel" in b]
    assert len(blocks) == 1, "README should have one Python API snippet"
    return blocks[0]


def test_api_snippet_imports_only_what_it_uses():
    tree = ast.parse(_api_snippet())
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                imported[alias.asname or alias.name.split(".")[0]] = alias.name
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert imported and set(imported) <= used, f"unused imports: {set(imported) - used}"


def test_api_snippet_runs_as_written(tmp_path):
    from tests.tiny_models import diffusers_dit, save_dit

    # The snippet loads ~/Wan2.1-T2V-1.3B: a tiny DiT in the original release's layout, in a HOME of its own.
    home = tmp_path / "home"
    save_dit(diffusers_dit(0), home / "Wan2.1-T2V-1.3B", "original")
    script = tmp_path / "sp.py"
    script.write_text(_api_snippet())
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # odyssey as installed, run from another folder
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # not anchored to lines: the two ranks share one stdout pipe, and their prints can land on one line
    lines = sorted(re.findall(r"rank (\d): velocity \(([0-9, ]*)\), sum (-?\d+\.\d{6})", done.stdout))
    assert [rank for rank, _, _ in lines] == ["0", "1"], done.stdout
    assert lines[0][1:] == lines[1][1:], "every rank gets the same full output"

    # The same inputs through the unparallel model, in this process.
    from pipeline import WanDiT

    model = WanDiT.from_pretrained(home / "Wan2.1-T2V-1.3B")
    torch.manual_seed(0)
    latents = torch.randn(1, model.config.in_dim, 3, 30, 52)
    text = torch.randn(1, 512, model.config.text_dim)
    with torch.no_grad():
        velocity = model(latents, torch.tensor([500.0]), text)
    assert lines[0][1] == ", ".join(map(str, velocity.shape))
    assert float(lines[0][2]) == pytest.approx(velocity.double().sum().item(), rel=1e-4, abs=1e-3)


def test_torch_pin_comes_with_the_cpu_index():
    """Both setup commands pin the torch the tests run on, and the README says how to get it without CUDA's
    libraries: the same pin from PyTorch's CPU wheel index (where this venv's +cpu build came from)."""
    pins = set(re.findall(r"pip install torch==([0-9.]+)", README))
    assert pins == {torch.__version__.split("+")[0]}, pins
    assert f"pip install torch=={pins.pop()} {CPU_INDEX}" in README
