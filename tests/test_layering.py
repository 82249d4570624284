"""The layering rules: Ray only in actors/ and cluster/; configs imports nothing of ours; attention knows no
model and no config; pipeline knows no Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"attention", "pipeline", "actors", "configs", "cluster"}
ALLOWED = {  # package -> the packages of ours it may import
    "configs": set(),
    "attention": set(),
    "pipeline": {"attention", "configs"},
    "actors": {"pipeline", "configs", "attention"},
    "cluster": {"actors", "pipeline", "configs", "attention"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layers(package):
    for path in (ROOT / package).rglob("*.py"):
        imported = _imports(path)
        ours = imported & OURS - {package}
        assert ours <= ALLOWED[package], f"{path.relative_to(ROOT)} imports {sorted(ours - ALLOWED[package])}"
        if package in ("configs", "attention", "pipeline"):
            assert "ray" not in imported, f"{path.relative_to(ROOT)} imports ray"


BLOCK_RAY = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is blocked in this test")
sys.meta_path.insert(0, Block())
import configs, attention, pipeline
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "ray got imported"
print("ok")
"""


def test_core_packages_import_without_ray():
    out = subprocess.run([sys.executable, "-c", BLOCK_RAY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
