"""The local in-process Ray keeps its own start-up lines and warnings (the token-auth notice, "Started a local Ray
instance") out of the user's terminal unless --debug; token authentication stays on, Ray's errors and Odyssey's own
lines (replica up, progress) still show. Real `odyssey generate` runs with a fresh HOME, as a new user's first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ray's log format: "2026-11-27 21:39:48,553	WARNING authentication_token_setup.py:85 -- ..."
RAY_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING)\s+\S+\.py:\d+ -- ", re.M)

# `odyssey generate` through its entry point, then, in the same process: was token auth on for the cluster it
# started, and does a Ray error (and only an error) still reach stderr
AFTER = """
import logging, os, sys
from cluster.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
from ray._private.authentication.authentication_utils import is_token_auth_enabled
print("token auth:", is_token_auth_enabled(), os.environ.get("RAY_AUTH_MODE"))
logging.getLogger("ray.dashboard").warning("a Ray warning after the run")
logging.getLogger("ray.core").error("a Ray error after the run")
"""


def fresh_env(home: Path) -> dict:
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home)}


def test_a_local_run_shows_no_ray_start_up_lines_unless_debug(tmp_path):
    args = ["generate", "a red circle moving right", "--progress", "lines", "--seed", "1"]
    quiet = subprocess.run([sys.executable, "-c", AFTER, *args, "-o", str(tmp_path / "quiet.mp4")], cwd=ROOT,
                           env=fresh_env(tmp_path / "home1"), capture_output=True, text=True, timeout=240)
    assert quiet.returncode == 0, quiet.stderr
    assert (tmp_path / "quiet.mp4").stat().st_size > 0
    assert not RAY_LINE.search(quiet.stderr), quiet.stderr
    assert "Token authentication" not in quiet.stderr and "Started a local Ray" not in quiet.stderr, quiet.stderr
    # Odyssey's own lines are still there, and Ray's errors; token auth was on (Ray's default, said explicitly)
    assert "replica 0 up: " in quiet.stderr and "[0] done in " in quiet.stderr, quiet.stderr
    assert "a Ray error after the run" in quiet.stderr and "a Ray warning after the run" not in quiet.stderr
    assert "token auth: True token" in quiet.stdout, quiet.stdout
    assert (tmp_path / "home1" / ".ray" / "auth_token").stat().st_mode & 0o077 == 0

    debug = subprocess.run([sys.executable, "-m", "cluster.cli", "--debug", *args, "-o", str(tmp_path / "debug.mp4")],
                           cwd=ROOT, env=fresh_env(tmp_path / "home2"), capture_output=True, text=True, timeout=240)
    assert debug.returncode == 0, debug.stderr
    assert "Token authentication is enabled" in debug.stderr and "Started a local Ray instance" in debug.stderr
    assert "replica 0 up: " in debug.stderr and "[0] done in " in debug.stderr
