"""Cold start: what a one-rank `odyssey generate` must not pay for. The first request's memory report on an
unsharded rank must not import torch.distributed.tensor (~0.5 s on 2 cores, for a DTensor check that cannot
match: no DTensor exists before that module is imported); its byte count is still every parameter and buffer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import sys, tempfile
from configs import load_config
from pipeline.request import GenerateRequest, Result
from pipeline.runner import Runner

config = load_config("tiny", ["sampling.steps=2"])
runner = Runner(config, 0, 1, init_method=f"file://{tempfile.mkdtemp()}/rendezvous")
results = [e for e in runner.generate(GenerateRequest("a red circle moving right", seed=1).resolve(config))
           if isinstance(e, Result)]
comp = runner.components
modules = [m if hasattr(m, "parameters") else m.model for m in (comp.dit, comp.text_encoder, comp.decoder) if m]
tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}  # a shared tensor once
expected = sum(t.numel() * t.element_size() for t in tensors.values())
print(results[0].memory["param_bytes"][0] == expected, expected > 0, "torch.distributed.tensor" in sys.modules)
"""


def test_an_unsharded_rank_reports_memory_without_importing_dtensor():
    done = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "False"], (done.stdout, done.stderr[-2000:])
