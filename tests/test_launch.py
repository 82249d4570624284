"""Launching a cluster the way a user does: local.yaml's own node commands start a token-protected head on
loopback, `odyssey submit` runs generate and batch jobs on it from another HOME, outputs inside Ray Jobs must be
absolute, the Jobs API refuses callers without the token; the cloud YAMLs install every executable they call, pin
the versions every node installs and install the SDK their autoscaler imports; the KubeRay manifests mount
volumes where Kubernetes can attach them."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from packaging.requirements import Requirement

from cluster.video import read_mp4

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "cluster" / "launch"
ODYSSEY = [sys.executable, "-m", "cluster.cli"]
RAY = str(Path(sys.executable).with_name("ray"))
# What an SSH login shell starts with: nothing of this test's venv on PATH.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _yaml(name: str) -> dict:
    return yaml.safe_load((LAUNCH / name).read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _login_env(home: Path) -> dict:
    """The environment the cluster launcher's `ssh ... bash --login -c` gives a command: a HOME, a system PATH."""
    return {"HOME": str(home), "PATH": SYSTEM_PATH, "USER": os.environ.get("USER", "root"), "LANG": "C.UTF-8"}


def odyssey(*args, home: Path, timeout=300, cwd=None):
    return subprocess.run([*ODYSSEY, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=_login_env(home), cwd=cwd or home)


def _group_running(pgid: int) -> bool:
    stats = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    return any(not s.startswith("Z") for s in stats)


def _kill_group(proc: subprocess.Popen) -> None:
    """End a `bash -lc 'ray start ... --block'` and everything it started: SIGTERM lets `ray start` stop its
    processes (the shell exits at once, Ray's processes take seconds), SIGKILL takes what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + 15
    while _group_running(proc.pid) and time.time() < deadline:
        time.sleep(0.3)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# -- the local.yaml head, started by the YAML's own commands -----------------------------------------------------


def _mount(config: dict, laptop: Path, node: Path) -> None:
    """file_mounts as `ray up` applies them: local paths (~ is the laptop's HOME, relative ones the repo root,
    where users run `odyssey cluster up`) copied to the node's HOME, file modes kept (rsync -a)."""
    for remote, local in config["file_mounts"].items():
        source = Path(local.replace("~", str(laptop), 1)) if local.startswith("~") else ROOT / local
        target = node / remote.removeprefix("~/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            target.symlink_to(source)  # the repository: a link instead of a copy of the whole tree
        else:
            shutil.copy2(source, target)


def _node_shell(line: str, node: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-lc", line], env=_login_env(node), cwd=node, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 120), **kw)


def _prepare_node(config: dict, role: str, laptop: Path, node: Path) -> None:
    """file_mounts, then the node's setup commands verbatim but for the venv creation and pip lines (the venv is
    a link to this test's, which has Odyssey installed: installing torch and Ray from scratch does not fit a test)."""
    _mount(config, laptop, node)
    (node / "odyssey-env").symlink_to(sys.prefix)
    for line in config["setup_commands"] + config[f"{role}_setup_commands"]:
        if re.search(r"-m venv|pip install", line):
            continue
        done = _node_shell(line, node)
        assert done.returncode == 0, f"{line}: {done.stderr}"
    assert (node / ".ray" / "auth_token").stat().st_mode & 0o077 == 0, "the token must be private on the node"


def _start_line(config: dict, role: str) -> str:
    start = [c for c in config[f"{role}_start_ray_commands"] if "ray start" in c]
    assert len(start) == 1 and all("ray stop" in c for c in config[f"{role}_start_ray_commands"] if c not in start)
    return start[0]


class LocalHead:
    def __init__(self, address: str, gcs: str, laptop: Path, node: Path, token: str, config: dict, temp: str):
        self.address, self.gcs, self.laptop, self.node, self.token = address, gcs, laptop, node, token
        self.config, self.temp = config, temp


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    """The head of local.yaml on this machine. Run verbatim: the YAML's file_mounts, every setup command and the
    head's `ray start` line, each in a login shell with a fresh HOME and cwd=HOME like the launcher's SSH.
    Substituted, and only these:
    - `python3 -m venv ~/odyssey-env` and its `pip install` lines: ~/odyssey-env is a link to this test's venv,
      which has Odyssey installed (installing torch and Ray from scratch does not fit a test);
    - `ray stop`: skipped, it stops every Ray process on the machine (other tests' clusters too);
    - in `ray start --head`: --port=6379 becomes a free port, --autoscaling-config is dropped (the local provider's
      autoscaler would SSH to the YAML's worker IPs), and --node-ip-address=127.0.0.1, a free --dashboard-port,
      --num-cpus=2 and --block are appended (so the head lives in this fixture's process group, which the fixture
      ends; `ray start` without --block daemonizes), and a private --temp-dir: Ray clusters of other tests share
      this machine's /tmp/ray, where a job's driver looks up "the" cluster (a real head has its own machine)."""
    config = _yaml("local.yaml")
    laptop, node = tmp_path_factory.mktemp("laptop"), tmp_path_factory.mktemp("head")
    # The user's one-time step (README, YAML header): the cluster token on the machine that runs `ray up`; without
    # the README's chmod, as Ray writes it (0644), so the nodes' own chmod is what makes their copies private.
    made = subprocess.run(["bash", "-lc", f"{RAY} get-auth-token --generate"],
                          env=_login_env(laptop), capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    token = (laptop / ".ray" / "auth_token").read_text().strip()
    _prepare_node(config, "head", laptop, node)

    port, dash = _free_port(), _free_port()
    line = _start_line(config, "head").replace("--port=6379", f"--port={port}")
    line = re.sub(r"\s--autoscaling-config=\S+", "", line)
    temp = tempfile.mkdtemp(prefix="ody", dir="/tmp")  # short: Ray's socket paths live under it
    line += (f" --node-ip-address=127.0.0.1 --dashboard-port={dash} --num-cpus=2 --disable-usage-stats --block"
             f" --temp-dir={temp}")
    log = open(node / "head.log", "w")
    proc = subprocess.Popen(["bash", "-lc", line], env=_login_env(node), cwd=node, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 240  # a loaded 2-core machine: tens of seconds
        while (why := _accepts_jobs(address, token)) is not None:  # the dashboard answers before its job agent
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the head of local.yaml takes no job ({why}):\n{(node / 'head.log').read_text()}")
            time.sleep(1)
        yield LocalHead(address, f"127.0.0.1:{port}", laptop, node, token, config, temp)
    finally:
        _kill_group(proc)
        log.close()
        # Job entrypoints run in sessions of their own and escape the group: end every process of this head,
        # which is any naming its --temp-dir or living in its (or a test worker's) HOME, then check none is left.
        homes = [node, *tmp_path_factory.getbasetemp().glob("test_workers_join*/worker")]
        left = _sweep(temp, homes)
        assert not left, f"processes of the local.yaml head survived its teardown: {left}"


def _processes_of(temp: str, homes: list[Path]) -> list[int]:
    """Live processes that name temp in their command line or have one of homes as HOME (only this module's head
    and workers have either: both are fresh temporary folders)."""
    marks = [temp.encode(), *(b"HOME=" + str(h).encode() + b"\0" for h in homes)]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            seen = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if any(m in seen for m in marks):
            found.append(int(entry.name))
    return found


def _sweep(temp: str, homes: list[Path], head: subprocess.Popen | None = None, wait_s: float = 20.0) -> list[int]:
    """SIGKILL a head's process group (when given), then every process of that head outside it (_processes_of), wait
    up to wait_s for them to go, remove temp; returns the ones still alive."""
    if head is not None:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
    for pid in _processes_of(temp, homes):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + wait_s
    while (left := _processes_of(temp, homes)) and time.time() < deadline:
        time.sleep(0.3)
    shutil.rmtree(temp, ignore_errors=True)
    return left


def _accepts_jobs(address: str, token: str) -> str | None:
    """None once the head takes a job, else why not (not listening yet, or 500 "No available agent"). One `true`
    job per call that gets an answer: a short timeout would pile up abandoned jobs on a loaded machine."""
    request = urllib.request.Request(f"{address}/api/jobs/", data=json.dumps({"entrypoint": "true"}).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=90):
            return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read()[:300]!r}"
    except OSError as e:
        return repr(e)


def test_local_yaml_head_runs_submitted_jobs_and_keeps_outputs_absolute(local_head, tmp_path):
    from tests.tiny_models import wan_pipeline_folder

    wan = wan_pipeline_folder(tmp_path / "wan")
    smoke = ["--config", "cpu-smoke", "--set", f"model.path={wan}", "--progress", "lines"]
    # generate: from the laptop's HOME, token from ~/.ray/auth_token as the README says; the head found `odyssey`.
    out = tmp_path / "video.mp4"
    result = odyssey("submit", "--address", local_head.address, "--", "generate", "a green square moving up",
                     "-o", out, *smoke, home=local_head.laptop)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "submitted raysubmit_" in result.stderr and str(out) in result.stdout
    assert read_mp4(out)[0].shape == (9, 32, 48, 3)

    # batch with --working-dir: the prompt file comes from the uploaded folder, outputs go to the absolute path.
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "prompts.txt").write_text("a red circle moving right\n")
    outputs = tmp_path / "outputs"
    result = odyssey("submit", "--address", local_head.address, "--working-dir", jobs, "--", "batch", "prompts.txt",
                     "-o", outputs, *smoke, home=local_head.laptop)
    assert result.returncode == 0, result.stderr + result.stdout
    videos = list(outputs.glob("*.mp4"))
    record = json.loads((outputs / "manifest.jsonl").read_text().splitlines()[0])
    assert len(videos) == 1 and record["output"] == str(videos[0]) and record["prompt"] == "a red circle moving right"
    assert read_mp4(videos[0])[0].shape == (9, 32, 48, 3)

    # A relative output folder inside a Ray Job would land in Ray's working-dir cache: refused in one line.
    result = odyssey("submit", "--address", local_head.address, "--working-dir", jobs, "--", "batch", "prompts.txt",
                     "-o", "outputs", *smoke, home=local_head.laptop)
    # an input error: the job's exit code 2 comes back through submit, said once (the logs were streamed)
    assert result.returncode == 2 and "failed: odyssey exited with 2" in result.stderr, result.stderr + result.stdout
    assert (result.stdout + result.stderr).count("must be an absolute path") == 1, result.stdout
    assert not list(jobs.rglob("*.mp4"))


def test_nodes_without_odyssey_get_one_line_saying_what_to_do(local_head, tmp_path):
    """A node whose job environment has no `odyssey` (here: the job's PATH, set through --runtime-env's env_vars,
    leaves out the venv the head runs from): the shell's 127 becomes one line naming the fixes, the exit non-zero."""
    env_file = tmp_path / "no-odyssey.yaml"
    env_file.write_text(yaml.safe_dump({"env_vars": {"PATH": "/usr/bin:/bin"}}))
    assert not any(Path(d, "odyssey").exists() for d in ("/usr/bin", "/bin"))
    result = odyssey("submit", "--address", local_head.address, "--runtime-env", env_file, "--", "config", "presets",
                     home=local_head.laptop, timeout=240)
    assert result.returncode == 127, result.stderr + result.stdout
    assert "odyssey: not found" in result.stdout  # the job's own log, streamed
    hints = [line for line in result.stderr.splitlines() if "cannot run Odyssey" in line]
    assert len(hints) == 1 and "install it on every node" in hints[0], result.stderr
    assert "--pip" in hints[0] and "--runtime-env" in hints[0]
    assert "exited with" not in result.stderr  # the hint replaces the generic line


def test_runtime_env_file_reaches_the_job(local_head, tmp_path):
    """--runtime-env FILE (JSON here) is the job's runtime_env: its env_vars are in the job's environment (a
    sitecustomize on the PYTHONPATH it sets prints the other variable from inside the job's Python)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import os, sys\nprint('probe saw', os.environ.get('ODYSSEY_PROBE'), file=sys.stderr)\n")
    marker = os.urandom(8).hex()
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps({"env_vars": {"PYTHONPATH": str(probe), "ODYSSEY_PROBE": marker}}))
    result = odyssey("submit", "--address", local_head.address, "--runtime-env", env_file, "--", "config", "presets",
                     home=local_head.laptop, timeout=240)
    assert result.returncode == 0, result.stderr + result.stdout
    assert f"probe saw {marker}" in result.stdout and "tiny" in result.stdout
    assert "WebSocket closed" not in result.stderr, result.stderr  # Ray's SDK's INFO line: --debug only


def test_jobs_api_refuses_callers_without_the_token(local_head, tmp_path):
    assert _http_status(f"{local_head.address}/api/version") == 401
    assert _http_status(f"{local_head.address}/api/version", "0" * 64) in (401, 403)
    stranger = tmp_path / "stranger"  # a HOME without the cluster's token
    stranger.mkdir()
    result = odyssey("submit", "--address", local_head.address, "--", "config", "presets", home=stranger, timeout=120)
    assert result.returncode != 0 and "submitted" not in result.stderr
    assert "auth" in result.stderr.lower(), result.stderr


def test_cluster_status_runs_inside_the_node_environment(local_head):
    from cluster.submit import node_command

    # `odyssey cluster status` sends node_command("ray status") through `ray exec`; here the same line runs in the
    # head's login shell (with the test head's address: other Ray clusters may live on this machine).
    status = f"ray status --address={local_head.gcs}"
    done = _node_shell(node_command(status), local_head.node)
    assert done.returncode == 0, done.stderr
    assert "status" in done.stdout.lower(), done.stdout
    tokenless = _node_shell(f"source ~/odyssey-env/bin/activate && {status}", local_head.node)
    assert tokenless.returncode != 0 and "AuthenticationError" in tokenless.stderr


def test_node_shells_find_ray_so_ray_down_can_stop_it(local_head):
    """`ray down` runs a bare `ray stop` on the head through SSH as `bash --login -c -i 'source ~/.bashrc; ...'`;
    setup's PATH lines (run verbatim by the fixture in the head's fresh HOME) must make `ray` resolve there and in
    plain login shells, and running setup again must not add them twice. (`ray stop` itself is not run: it would
    stop every Ray process on this machine.)"""
    ray = str(local_head.node / "odyssey-env" / "bin" / "ray")
    for argv in (["bash", "-lc", "command -v ray"],
                 ["bash", "--login", "-c", "-i", "source ~/.bashrc; command -v ray"]):
        found = subprocess.run(argv, env=_login_env(local_head.node), cwd=local_head.node, capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert found.returncode == 0 and found.stdout.strip().splitlines()[-1] == ray, (argv, found.stderr)
    path_lines = [c for c in local_head.config["setup_commands"] if "odyssey-env/bin:$PATH" in c]
    for line in path_lines:  # a second `odyssey cluster up` reruns setup
        assert _node_shell(line, local_head.node).returncode == 0
    for rc in (".profile", ".bashrc"):
        lines = (local_head.node / rc).read_text().splitlines()
        assert lines.count('export PATH="$HOME/odyssey-env/bin:$PATH"') == 1, rc


def _alive_nodes(head: LocalHead) -> int:
    request = urllib.request.Request(f"{head.address}/api/v0/nodes", headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        nodes = json.load(r)["data"]["result"]["result"]
    return sum(n["state"] == "ALIVE" for n in nodes)


def test_workers_join_with_the_mounted_token_and_not_without(local_head, tmp_path):
    """local.yaml's worker start line, run like the head's (ray stop skipped; RAY_HEAD_IP set as the launcher
    sets it, 6379 -> the head's port, --node-ip-address=127.0.0.1 --num-cpus=1 --block and the head's --temp-dir
    appended)."""
    port = local_head.gcs.rpartition(":")[2]
    line = _start_line(local_head.config, "worker").replace(":6379", f":{port}")
    line += f" --node-ip-address=127.0.0.1 --num-cpus=1 --block --temp-dir={local_head.temp}"
    env = {"RAY_HEAD_IP": "127.0.0.1"}

    stranger = tmp_path / "stranger"  # no file_mounts, no token: it must not start at all
    stranger.mkdir()
    (stranger / "odyssey-env").symlink_to(sys.prefix)
    refused = subprocess.Popen(["bash", "-lc", line], env={**_login_env(stranger), **env}, cwd=stranger,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        said = refused.communicate(timeout=60)[0]
    finally:
        _kill_group(refused)
    assert refused.returncode != 0 and "AuthenticationError" in said, said

    worker = tmp_path / "worker"
    worker.mkdir()
    _prepare_node(local_head.config, "worker", local_head.laptop, worker)
    before = _alive_nodes(local_head)
    log = open(worker / "worker.log", "w")
    proc = subprocess.Popen(["bash", "-lc", line], env={**_login_env(worker), **env}, cwd=worker, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 90
        while _alive_nodes(local_head) != before + 1:
            assert proc.poll() is None and time.time() < deadline, (worker / "worker.log").read_text()
            time.sleep(0.5)
    finally:
        _kill_group(proc)
        log.close()


# -- outputs inside Ray Jobs, without a cluster ---------------------------------------------------------------------


@pytest.mark.parametrize("args", [["generate", "a red circle moving right"],
                                  ["generate", "a red circle", "-o", "/abs/x.mp4", "--manifest", "m.jsonl"],
                                  ["batch", "prompts.txt", "-o", "out"]])
def test_relative_outputs_are_refused_only_inside_a_ray_job(args, monkeypatch, tmp_path):
    from cluster.cli import cli
    from cluster.submit import check_job_output

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for an entrypoint
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, ValueError) and "must be an absolute path" in str(result.exception)
    assert not list(tmp_path.iterdir()), "nothing may be written before the refusal"
    check_job_output(Path("/data/outputs"))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    check_job_output(Path("outputs"))  # outside a job a relative path is the user's cwd: fine


def test_working_dir_excludes_mean_what_they_say(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    from cluster.submit import EXCLUDES

    wd = tmp_path / "jobs"
    keep = ["prompts.txt", "sub/more.jsonl", "notes.md"]
    drop = ["wheel-1.0-py3-none-any.whl", "sub/dep.whl", "model.safetensors", "sub/ckpt.pth", "clip.mp4",
            "outputs/0-a.mp4", ".git/HEAD", ".venv/bin/python", "sub/__pycache__/x.pyc", "w.bin", "w.gguf"]
    for name in keep + drop:
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text("x")
    create_package(str(wd), tmp_path / "pkg.zip", include_gitignore=True, excludes=EXCLUDES)
    uploaded = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert uploaded == set(keep)


def test_runtime_env_options_add_up_and_refuse_contradictions(tmp_path):
    from cluster.submit import EXCLUDES, job_runtime_env

    assert job_runtime_env() is None
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars: {A: '1'}\npip: [numpy]\nexcludes: ['*.log']\n")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    assert job_runtime_env(str(jobs), ["odyssey @ git+https://example.org/odyssey"], env_file) == {
        "env_vars": {"A": "1"}, "pip": ["numpy", "odyssey @ git+https://example.org/odyssey"],
        "working_dir": str(jobs), "excludes": ["*.log", *EXCLUDES]}
    env_file.write_text(json.dumps({"pip": {"packages": ["numpy"], "pip_check": False}}))
    assert job_runtime_env(None, ["x==1"], env_file) == {"pip": {"packages": ["numpy", "x==1"], "pip_check": False}}
    # a wheel the job installs from its own working dir must be uploaded with it
    wheel = "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/odyssey-0.1.0-py3-none-any.whl"
    assert "*.whl" not in job_runtime_env(str(jobs), [wheel])["excludes"]

    refused = {
        "env_var: {A: '1'}\n": "unknown runtime_env field 'env_var'",
        f"working_dir: {jobs}\n": "the working dir is given twice",
        "conda: {dependencies: [numpy]}\n": "--pip cannot be combined with conda",
        "pip: requirements.txt\n": "(a requirements file)",
        "env_vars: {A: 1}\n": "must be of type Dict[str, str]",
        "- pip\n": "expected a mapping of Ray runtime_env fields",
        "a: &x 1\nb: *x\n": "aliases",
    }
    for text, message in refused.items():
        env_file.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            job_runtime_env(str(jobs), ["x"], env_file)
    result = odyssey("submit", "--runtime-env", env_file, "--", "config", "presets", home=tmp_path, timeout=120)
    assert result.returncode == 2 and "submitted" not in result.stderr
    assert result.stderr.count("\n") == 1 and "aliases" in result.stderr, result.stderr


def test_runtime_env_files_are_read_strictly(tmp_path):
    """A list is not a runtime_env (said in runtime_env words), a key given twice is refused (YAML keeps the last),
    and a FIFO passes click's exists/dir_okay checks but is refused at once (a plain open() waits for a writer)."""
    from cluster.submit import job_runtime_env

    env_file = tmp_path / "env.yaml"
    for text, message in {"- pip\n": "expected a mapping of Ray runtime_env fields (working_dir, pip, env_vars, ...), "
                                      "got list",
                          "pip: [a]\npip: [b]\n": "line 2, column 1: a key given twice (first on line 1)"}.items():
        env_file.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            job_runtime_env(None, [], env_file)
        with pytest.raises(ValueError) as refused:
            job_runtime_env(None, [], env_file)
        assert "config" not in str(refused.value) and "sections" not in str(refused.value)
    fifo = tmp_path / "env.fifo"
    os.mkfifo(fifo)
    result = odyssey("submit", "--runtime-env", fifo, "--", "config", "presets", home=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"cannot read file {fifo}: not a regular file (a FIFO)" in result.stderr


def test_local_runtime_env_paths_take_home_and_uploads_take_the_excludes(tmp_path, monkeypatch):
    """working_dir and py_modules name local folders Ray zips and uploads: `~` means HOME there as everywhere, and
    Ray applies `excludes` to py_modules folders too, so they get the project's (a .whl module and URIs are not
    zipped: no excludes for them alone)."""
    from cluster.submit import EXCLUDES, job_runtime_env

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("proj", "lib"):
        (tmp_path / name).mkdir()
    env_file = tmp_path / "env.yaml"
    env_file.write_text("working_dir: ~/proj\n")
    assert job_runtime_env(None, [], env_file) == {"working_dir": str(tmp_path / "proj"), "excludes": EXCLUDES}
    env_file.write_text("py_modules: [~/lib, s3://bucket/mod.zip]\nexcludes: ['*.log']\n")
    assert job_runtime_env(None, [], env_file) == {"py_modules": [str(tmp_path / "lib"), "s3://bucket/mod.zip"],
                                                   "excludes": ["*.log", *EXCLUDES]}
    (tmp_path / "m-1.0-py3-none-any.whl").write_bytes(b"")
    env_file.write_text("py_modules: [~/m-1.0-py3-none-any.whl, s3://bucket/mod.zip]\n")
    assert job_runtime_env(None, [], env_file) == {
        "py_modules": [str(tmp_path / "m-1.0-py3-none-any.whl"), "s3://bucket/mod.zip"]}


class _FakeJobs:
    """JobSubmissionClient's surface that submit_job uses, for outcomes a loopback head cannot stage cheaply."""

    submitted: list = []

    def __init__(self, address, logs="", code=None, status="FAILED", message="Job entrypoint command failed"):
        self.address, self.logs, self.code, self.status, self.message = address, logs, code, status, message

    def submit_job(self, entrypoint, runtime_env):
        self.submitted.append((entrypoint, runtime_env))
        return "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        for part in (self.logs[: len(self.logs) // 2], self.logs[len(self.logs) // 2:]):  # a line split in two
            yield part
        # what the real client logs when the stream ends (ray.dashboard.modules.job.sdk, INFO)
        logging.getLogger("ray.dashboard.modules.job.sdk").info(f"WebSocket closed for job {job_id} with close code "
                                                                f"1000")

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus[self.status]

    def get_job_info(self, job_id):
        return type("Info", (), {"driver_exit_code": self.code, "message": self.message})()


@pytest.mark.parametrize("logs, code, hint", [
    ("/bin/sh: 1: odyssey: not found\n", 127, True),
    ("ModuleNotFoundError: No module named 'actors'\n", 1, True),  # a worker node without Odyssey
    ("odyssey: error: the prompt is empty\n", 2, False),
    ("/bin/sh: 1: odyssey: not found\n", None, True),  # the code unknown: the log says it
    # the log's pattern quoted in a command's own error (a prompt): its known exit code says it ran
    ("odyssey: error: unknown words in 'No module named 'cluster'' (--strict-vocab)\n", 2, False),
])
def test_submit_says_what_to_do_when_nodes_lack_odyssey(monkeypatch, capsys, logs, code, hint):
    import ray.job_submission

    from cluster.cli import cli

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient",
                        lambda address: _FakeJobs(address, logs=logs, code=code))
    _FakeJobs.submitted.clear()
    result = CliRunner().invoke(cli, ["submit", "--address", "http://127.0.0.1:1", "--pip", "a==1", "--pip", "b",
                                      "--", "generate", "x"])
    assert result.exit_code == (code or 1)
    assert _FakeJobs.submitted == [("odyssey generate x", {"pip": ["a==1", "b"]})]
    lines = [line for line in result.stderr.splitlines() if "cannot run Odyssey" in line]
    assert len(lines) == (1 if hint else 0), result.stderr
    assert hint or f"odyssey exited with {code}" in result.stderr


PIP_FAILED = """runtime_env setup failed: Failed to set up runtime environment.
Failed to create runtime env {"pip": {"packages": ["nosuchpkg==99"]}}.
Traceback (most recent call last):
  File "ray/_private/runtime_env/pip.py", line 290, in _install_pip_packages
ray._private.runtime_env.utils.SubprocessCalledProcessError: Run cmd[3] failed with the following details.
Command '['/tmp/ray/virtualenv/bin/python', '-m', 'pip', 'install', 'nosuchpkg==99']' returned non-zero exit status 1.
Last 50 lines of stdout:
    ERROR: Could not find a version that satisfies the requirement nosuchpkg==99 (from versions: none)
    ERROR: No matching distribution found for nosuchpkg==99

"""


@pytest.mark.parametrize("message, reason", [
    (PIP_FAILED, "runtime_env setup failed: Failed to set up runtime environment. (ERROR: No matching distribution "
                 "found for nosuchpkg==99)"),
    ("runtime_env setup failed: Failed to set up runtime environment.\nTraceback (most recent call last):\n  File "
     "x\nFileNotFoundError: /data/mods does not exist\n", "runtime_env setup failed: Failed to set up runtime "
     "environment. (FileNotFoundError: /data/mods does not exist)"),
    ("Job supervisor actor died\nmore\n", "Job supervisor actor died"),
])
def test_a_failed_job_environment_says_why_in_one_line(monkeypatch, capfd, message, reason):
    """Ray's message for a runtime_env that could not be set up says what in its first line and why in pip's last
    ERROR: line (or its last line); one stderr line says both. Ray's SDK's 'WebSocket closed' INFO line stays out
    unless --debug."""
    import ray.job_submission

    from cluster.cli import main

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient",
                        lambda address: _FakeJobs(address, logs="", code=None, message=message))
    sdk = logging.getLogger("ray.dashboard.modules.job.sdk")
    seen: list[str] = []  # Ray's own handler writes to the stderr it found at import: watch the records instead
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    sdk.addHandler(handler)
    try:
        for debug in ([], ["--debug"]):
            seen.clear()
            with pytest.raises(SystemExit) as exit_:
                main([*debug, "submit", "--address", "http://127.0.0.1:1", "--pip", "nosuchpkg==99", "--",
                      "generate", "x"])
            err = capfd.readouterr().err
            assert exit_.value.code == 1
            assert f"odyssey: job raysubmit_fake failed: {reason}\n" in err, err
            assert (seen == ["WebSocket closed for job raysubmit_fake with close code 1000"]) == bool(debug), seen
            assert debug or err.count("\n") == 2, err  # 'submitted ...' and the reason
    finally:
        sdk.removeHandler(handler)


def test_cluster_up_without_the_token_is_a_usage_error(tmp_path):
    result = odyssey("cluster", "up", LAUNCH / "local.yaml", home=tmp_path, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "auth_token" in result.stderr and "ray get-auth-token --generate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- what the cloud YAMLs install and call ----------------------------------------------------------------------------

# Present on the images the YAMLs boot (Ubuntu DLAMI / Deep Learning VM): shell builtins, coreutils, apt,
# the system python3 and, on GPU images, nvidia-smi. Everything else must be installed by an earlier line.
SYSTEM_TOOLS = {"source", ".", "export", "ulimit", "test", "[", "cd", "echo", "true", "exit", "set", "chmod", "mkdir",
                "cp", "mv", "ln", "cat", "grep", "sudo", "apt-get", "python3", "nvidia-smi"}
VENV_TOOLS = {"python", "python3", "pip", "pip3"}
OPERATORS = {"&&", "||", ";", "|", "(", ")", ";;", "&"}


def _simple_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    out = []
    for words in commands:
        words = [w for w in words if not re.fullmatch(r"\d*[<>]+&?\d*", w)]  # redirections (2>/dev/null ...)
        while words and (words[0] == "sudo" or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0])):
            words = words[1:]  # VAR=value prefixes and sudo: the command is what follows
        if words:
            out.append(words)
    return out


def _closure(names: list[str]) -> set[str]:
    """Distributions a pip install of NAMES brings, as resolved in this environment (extras included)."""
    seen, todo = set(), [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (a cloud SDK): it brings no executable the YAMLs call
        for spec in dist.requires or []:
            dep = Requirement(spec)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in req.extras or [""]):
                todo.append(dep)
    return seen


def _console_scripts(dists: set[str]) -> set[str]:
    scripts = set()
    for d in metadata.distributions():
        if d.metadata["Name"].lower().replace("_", "-") in dists:
            scripts |= {e.name for e in d.entry_points if e.group == "console_scripts"}
    return scripts


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (LAUNCH / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            assert str(req.specifier).startswith("=="), f"constraints.txt must pin exact versions: {line}"
            if req.marker is None or req.marker.evaluate():  # the pin for this Python
                pins[req.name.lower().replace("_", "-")] = str(req.specifier)[2:]
    return pins


def _node_path(path: str) -> Path | None:
    """A path on a node that file_mounts maps from this repository (~/odyssey: .)."""
    return ROOT / path.removeprefix("~/odyssey/") if path.startswith("~/odyssey/") else \
        (ROOT if path == "~/odyssey" else None)


def walk_node(config: dict, role: str) -> dict:
    """Follow a node's setup and start commands in launcher order; fail on any executable no earlier line
    installed. Returns what got pip-installed in which venv."""
    lines = config["setup_commands"] + config.get(f"{role}_setup_commands", []) + \
        config[f"{role}_start_ray_commands"]
    venvs: dict[str, set[str]] = {}
    installed: dict[str, list[str]] = {}
    for line in lines:
        active = None  # each command line runs in its own shell: activation does not carry over
        for words in _simple_commands(line):
            exe = words[0]
            if exe in ("source", ".") and words[1].endswith("/bin/activate"):
                active = words[1].removesuffix("/bin/activate")
                assert active in venvs, f"{line}: activates {active} before creating it"
                continue
            if "/" in exe:
                venv, _, name = exe.rpartition("/bin/")
                assert venv in venvs and name in venvs[venv], f"{line}: {exe} is installed by no earlier line"
            else:
                assert (active and exe in venvs[active]) or exe in SYSTEM_TOOLS, \
                    f"{line}: `{exe}` is installed by no earlier line (and is not on the image)"
                venv, name = (active, exe) if active and exe in venvs[active] else (None, exe)
            if name.startswith("python") and words[1:3] and words[1] == "-m" and words[2] == "venv":
                venvs[words[3]] = set(VENV_TOOLS)
            elif venv and name in ("pip", "pip3") and words[1] == "install":
                constraints, requested = None, []
                args = iter(words[2:])
                for a in args:
                    if a in ("-c", "--constraint"):
                        constraints = _node_path(next(args))
                    elif a in ("-e", "--editable"):
                        project = _node_path(next(args))
                        assert project == ROOT, f"{line}: installs an unknown project"
                        requested.append("odyssey")
                    elif not a.startswith("-"):
                        requested.append(a)
                assert constraints == LAUNCH / "constraints.txt", f"{line}: installs without the pinned versions"
                pins = _constraints()
                for r in requested:
                    if r != "odyssey":
                        assert Requirement(r).name.lower() in pins, f"{line}: {r} is not pinned in constraints.txt"
                installed.setdefault(venv, []).extend(requested)
                venvs[venv] |= _console_scripts(_closure(requested))
    return installed


@pytest.mark.parametrize("name", ["local.yaml", "aws.yaml", "gcp.yaml"])
def test_cluster_yaml_installs_every_executable_it_calls(name):
    config = _yaml(name)
    for role in ("head", "worker"):
        installed = walk_node(config, role)
        assert "odyssey" in installed.get("~/odyssey-env", []), f"{role}: Odyssey is not installed"
    pins = _constraints()
    assert pins["ray"] == metadata.version("ray"), "nodes must run the Ray this release is tested with"
    assert pins["torch"].split("+")[0] == metadata.version("torch").split("+")[0]
    # Every node: the token from file_mounts, Ray started in the venv with token auth forced on.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "source ~/odyssey-env/bin/activate" in start


# Modules Ray's cloud node providers import that `ray[default]` does not bring, and the distribution that has each.
SDK_DISTRIBUTIONS = {"boto3": "boto3", "botocore": "boto3", "googleapiclient": "google-api-python-client",
                     "google_auth_httplib2": "google-api-python-client", "httplib2": "google-api-python-client",
                     "google.oauth2": "google-auth"}


def _autoscaler_imports(provider: str) -> set[str]:
    import ray.autoscaler._private as private

    modules = set()
    for path in (Path(private.__file__).parent / provider).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module)
    third_party = set()
    for m in modules:
        top = m.split(".")[0]
        if top in sys.stdlib_module_names or top == "ray":
            continue
        third_party.add(".".join(m.split(".")[:2]) if top == "google" else top)
    return third_party


@pytest.mark.parametrize("name,provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_head_installs_the_sdk_its_autoscaler_imports(name, provider):
    ray_brings = _closure(["ray[default]"])
    needed = set()
    for module in _autoscaler_imports(provider):
        owners = {d.lower() for d in metadata.packages_distributions().get(module.split(".")[0], [])}
        if module in SDK_DISTRIBUTIONS:
            needed.add(SDK_DISTRIBUTIONS[module])
        else:
            assert owners & ray_brings, f"Ray's {provider} provider imports {module}: which distribution has it?"
    assert needed, f"found no SDK import in Ray's {provider} provider"
    installed = walk_node(_yaml(name), "head")["~/odyssey-env"]
    assert needed <= {Requirement(r).name for r in installed}, f"{name}: the head's autoscaler needs {needed}"


def test_aws_images_are_pinned_once_per_cluster(tmp_path):
    from cluster.submit import SSM_PREFIX, pin_ssm_images

    config = _yaml("aws.yaml")
    aliases = {n["node_config"]["ImageId"] for n in config["available_node_types"].values()}
    assert len(aliases) == 1 and aliases.pop().startswith(SSM_PREFIX), "head and workers: one image"
    asked = []

    def release(ami):
        return lambda name: asked.append(name) or ami

    pins = tmp_path / "odyssey-aws-images.json"
    first = pin_ssm_images(config, pins, release("ami-0aaaaaaaaaaaaaaa1"))
    assert {n["node_config"]["ImageId"] for n in first["available_node_types"].values()} == {"ami-0aaaaaaaaaaaaaaa1"}
    assert len(asked) == 1 and config["available_node_types"]["head"]["node_config"]["ImageId"].startswith(SSM_PREFIX)
    # A later `up` (after AWS published a new image) keeps the cluster on the image its head booted.
    again = pin_ssm_images(config, pins, release("ami-0bbbbbbbbbbbbbbb2"))
    assert again == first and len(asked) == 1
    pins.unlink()
    fresh = pin_ssm_images(config, pins, release("ami-0bbbbbbbbbbbbbbb2"))
    assert fresh["available_node_types"]["gpu_8x"]["node_config"]["ImageId"] == "ami-0bbbbbbbbbbbbbbb2"


def _laptop(tmp_path, monkeypatch, token_mode=0o600):
    """A HOME with the cluster token (as the README makes it) and a current directory outside the repository;
    subprocess.call (ray up/down/exec) recorded instead of run."""
    import cluster.submit as submit

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 64)
    (tmp_path / ".ray" / "auth_token").chmod(token_mode)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    calls = []
    monkeypatch.setattr(submit.subprocess, "call", lambda args: calls.append(args) or 0)
    monkeypatch.setattr(submit, "_ssm_resolver", lambda region: lambda name: "ami-0ccccccccccccccc3")
    return calls


def test_cluster_up_hands_ray_the_repository_and_pinned_images_and_down_forgets_them(tmp_path, monkeypatch):
    import cluster.submit as submit

    calls = _laptop(tmp_path, monkeypatch)
    state, source = tmp_path / "state", tmp_path / "aws.yaml"
    shutil.copy(LAUNCH / "aws.yaml", source)
    assert submit.cluster_command("up", str(source), state) == 0
    assert calls[-1][1:3] == ["up", "--yes"] and Path(calls[-1][-1]) != source
    handed = yaml.safe_load(Path(calls[-1][-1]).read_text())
    assert {n["node_config"]["ImageId"] for n in handed["available_node_types"].values()} == {"ami-0ccccccccccccccc3"}
    # `.` is this repository even from another directory (Ray would resolve it against the cwd: from HOME, all of
    # HOME with ~/.ssh would go to every node); nothing else of the YAML changes.
    assert handed["file_mounts"] == {"~/odyssey": str(ROOT), "~/.ray/auth_token": "~/.ray/auth_token"}
    assert {k: v for k, v in handed.items() if k not in ("file_mounts", "available_node_types")} == \
        {k: v for k, v in _yaml("aws.yaml").items() if k not in ("file_mounts", "available_node_types")}
    assert handed["rsync_filter"] == [".gitignore"]
    assert source.read_text() == (LAUNCH / "aws.yaml").read_text(), "the user's YAML is never rewritten"
    assert submit.cluster_command("status", str(source), state) == 0
    assert calls[-1][-1] == submit.node_command("ray status")
    assert submit.cluster_command("down", str(source), state) == 0
    assert calls[-1][1:3] == ["down", "--yes"] and not list(state.iterdir())


def test_cluster_down_on_own_machines_stops_ray_inside_the_venv_first(tmp_path, monkeypatch):
    import cluster.submit as submit

    calls = _laptop(tmp_path, monkeypatch)
    source = str(LAUNCH / "local.yaml")
    assert submit.cluster_command("up", source, tmp_path / "state") == 0
    handed = yaml.safe_load(Path(calls[-1][-1]).read_text())
    assert handed["file_mounts"]["~/odyssey"] == str(ROOT) and handed["provider"] == _yaml("local.yaml")["provider"]
    calls.clear()
    assert submit.cluster_command("down", source, tmp_path / "state") == 0
    # The local provider's terminate only forgets the machines: Ray stops only if `ray stop` runs on the head.
    assert [c[1:] for c in calls] == [["exec", source, submit.node_command("ray stop")], ["down", "--yes", source]]
    assert "source ~/odyssey-env/bin/activate" in calls[0][-1]


def test_cluster_up_refuses_a_token_others_can_read(tmp_path, monkeypatch, capsys):
    from cluster.cli import main

    calls = _laptop(tmp_path, monkeypatch, token_mode=0o644)  # what `ray get-auth-token --generate` writes
    sigterm = signal.getsignal(signal.SIGTERM)  # main() installs its own
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["cluster", "up", str(LAUNCH / "local.yaml")])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert exit_.value.code == 2 and not calls, "nothing may reach `ray up`"
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chmod 600" in err and "0644" in err, err


def test_cluster_up_outside_a_checkout_is_refused(tmp_path, monkeypatch):
    import cluster.submit as submit

    calls = _laptop(tmp_path, monkeypatch)
    monkeypatch.setattr(submit, "__file__", str(tmp_path / "site-packages" / "cluster" / "submit.py"))  # a wheel
    with pytest.raises(ValueError, match="from an Odyssey checkout"):
        submit.cluster_command("up", str(LAUNCH / "local.yaml"), tmp_path / "state")
    assert not calls
    monkeypatch.chdir(ROOT)  # a checkout as the current directory is enough
    assert submit.cluster_command("up", str(LAUNCH / "local.yaml"), tmp_path / "state") == 0
    assert yaml.safe_load(Path(calls[-1][-1]).read_text())["file_mounts"]["~/odyssey"] == str(ROOT)


def test_laptop_extras_pin_the_cluster_versions():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = _constraints()
    for extra, sdk in (("aws", "boto3"), ("gcp", "googleapiclient")):
        reqs = [Requirement(r) for r in extras[extra]]
        assert SDK_DISTRIBUTIONS[sdk] in {r.name for r in reqs}, f"`pip install odyssey[{extra}]` misses {sdk}"
        for r in reqs:
            assert str(r.specifier) == f"=={pins[r.name]}", f"{extra}: {r} differs from constraints.txt"


# 14B on 8 GPUs: rank 0 holds the DiT (27 GiB) and umt5-xxl (10.6 GiB) and decodes; 40 GB cards run out of memory.
GPU_MEMORY_GB = {"p4d.24xlarge": 40, "p4de.24xlarge": 80, "p5.48xlarge": 80, "a2-highgpu-8g": 40,
                 "a2-ultragpu-8g": 80, "nvidia-tesla-a100": 40, "nvidia-a100-80gb": 80}


def test_gpu_nodes_have_80_gb_cards_and_drivers():
    aws = _yaml("aws.yaml")["available_node_types"]
    for node in aws.values():
        assert "latest_dlami" not in node["node_config"]["ImageId"]
        assert "ubuntu-24.04" in node["node_config"]["ImageId"] or node["node_config"]["ImageId"].startswith("ami-")
        assert node["node_config"]["IamInstanceProfile"]["Arn"], "never Ray's default role (EC2 and S3 full access)"
    assert aws["head"]["node_config"]["IamInstanceProfile"] != aws["gpu_8x"]["node_config"]["IamInstanceProfile"]
    assert GPU_MEMORY_GB[aws["gpu_8x"]["node_config"]["InstanceType"]] >= 80
    gcp = _yaml("gcp.yaml")["available_node_types"]["gpu_8x"]["node_config"]
    assert GPU_MEMORY_GB[gcp["machineType"]] >= 80
    assert GPU_MEMORY_GB[gcp["guestAccelerators"][0]["acceleratorType"]] >= 80
    assert {"key": "install-nvidia-driver", "value": "True"} in gcp["metadata"]["items"]
    assert gcp["scheduling"]["onHostMaintenance"] == "TERMINATE"


# -- KubeRay ----------------------------------------------------------------------------------------------------------


def test_kuberay_mounts_volumes_where_kubernetes_can_attach_them():
    job = _yaml("kuberay-rayjob.yaml")
    volumes = yaml.safe_load_all((LAUNCH / "kuberay-volumes.yaml").read_text())
    claims = {c["metadata"]["name"]: c["spec"] for c in volumes}
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == _constraints()["ray"]

    def pod_claims(template):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        mounted = {}
        for container in template["spec"]["containers"]:
            for m in container.get("volumeMounts", []):
                pvc = volumes[m["name"]].get("persistentVolumeClaim")
                if pvc:
                    mounted[pvc["claimName"]] = (m, pvc)
        return mounted

    head = pod_claims(spec["headGroupSpec"]["template"])
    groups = [(g["maxReplicas"], pod_claims(g["template"])) for g in spec["workerGroupSpecs"]]
    assert set(head) | {c for _, w in groups for c in w} <= set(claims), "every mounted claim is defined"
    for name, claim in claims.items():
        worker_pods = sum(n for n, w in groups if name in w)
        if "ReadWriteOnce" in claim["accessModes"]:
            assert name in head and not worker_pods, f"{name} is ReadWriteOnce: only the head may mount it"
        if worker_pods + (name in head) > 1:
            assert claim["accessModes"] in (["ReadOnlyMany"], ["ReadWriteMany"]), f"{name}: one pod at a time"
            for _, w in groups:
                mount, pvc = w[name]
                assert mount.get("readOnly") and pvc.get("readOnly"), f"{name} must be mounted read-only"
    # The job writes to the head's claim, with an absolute path.
    args = shlex.split(job["spec"]["entrypoint"])
    out = Path(args[args.index("-o") + 1])
    assert out.is_absolute() and any(str(out).startswith(m["mountPath"])
                                     for m, _ in head.values())
