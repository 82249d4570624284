"""`odyssey submit`: the same CLI as a Ray Job, logs streamed back, exit code from the job's outcome; the rule for
outputs inside a Ray Job (absolute paths only); and `odyssey cluster`: Ray's cluster launcher on the YAMLs of
cluster/launch/, with their file mounts checked, AWS image aliases pinned per cluster, and node commands run inside
the nodes' Ray environment."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from .prompts import printable

__all__ = ["submit_job", "job_runtime_env", "not_found_hint", "enable_token_auth", "check_job_output", "in_ray_job",
           "validate_cluster_yaml", "check_file_mounts", "node_command", "pin_ssm_images", "repo_root", "prepare_cluster_yaml",
           "cluster_command"]

# gitignore-style patterns (Ray's working_dir excludes): a bare name matches that file or folder at any depth.
EXCLUDES = [".git", ".venv", "venv", "outputs", "__pycache__", "*.mp4", "*.safetensors", "*.pth", "*.pt", "*.bin",
            "*.ckpt", "*.gguf", "*.whl"]

# Every node of cluster/launch/*.yaml runs Ray from this venv with token auth on; a command sent to a node needs
# both (without the venv there is no `ray`; without RAY_AUTH_MODE Ray's clients do not send the token).
NODE_ENV = "source ~/odyssey-env/bin/activate && export RAY_AUTH_MODE=token"

# Ray's job supervisor sets this in every job entrypoint's environment (ray.dashboard.modules.job).
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def enable_token_auth(token_file: str | None = None) -> None:
    """Make Ray's HTTP clients send the cluster token: from token_file, RAY_AUTH_TOKEN(_PATH), or Ray's default
    ~/.ray/auth_token. Must run before ray is imported (Ray reads RAY_AUTH_MODE once)."""
    if token_file:
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(token_file).expanduser())
    has_token = (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                 or (Path.home() / ".ray" / "auth_token").is_file())
    if has_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def in_ray_job() -> bool:
    """True inside a Ray Job's entrypoint (`odyssey submit`, `ray job submit`, a KubeRay RayJob)."""
    return _RAY_JOB_ENV in os.environ


def check_job_output(path: Path, option: str = "-o") -> None:
    """Inside a Ray Job, refuse a relative output path: the job's working directory is Ray's runtime_env cache
    (with --working-dir) or wherever Ray was started, so outputs would be garbage-collected, lost on `ray down`,
    and invisible to --resume of the next job."""
    if in_ray_job() and not Path(path).is_absolute():
        raise ValueError(f"inside a Ray Job {option} must be an absolute path on the head's disk or shared storage "
                         f"(e.g. {option} /home/ubuntu/outputs), not {str(path)!r}: relative paths land in Ray's "
                         f"job working directory, which Ray deletes")


# Ray's own runtime_env fields (ray.runtime_env.RuntimeEnv.known_fields, less the private ones): anything else in a
# --runtime-env file is a typo Ray would silently ignore.
RUNTIME_ENV_FIELDS = ("working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda", "env_vars",
                      "container", "image_uri", "java_jars", "worker_process_setup_hook", "config")
_PACKAGE_FIELDS = ("pip", "uv", "conda")  # Ray takes one of them

# What a job's log says when a node cannot run Odyssey: the shell found no `odyssey` (dash, bash), or a Python
# without Odyssey's packages (a worker node whose environment lacks them).
_NOT_FOUND = re.compile(r"odyssey: (?:command )?not found|No module named '(?:cluster|actors|pipeline|configs|"
                        r"attention)'")
_NOT_FOUND_EXIT = 127  # POSIX shells: command not found; odyssey itself never exits 127


def job_runtime_env(working_dir: str | None = None, pip: tuple[str, ...] | list[str] = (),
                    runtime_env_file: str | Path | None = None) -> dict | None:
    """The runtime_env of `odyssey submit`: FILE's (Ray's runtime_env as YAML or JSON) with --working-dir (uploaded
    without EXCLUDES) and --pip packages added. ValueError, one line, for a file that cannot be read, an unknown
    field, or options that say the same thing twice (a working dir in both places, --pip beside conda or uv)."""
    from configs import ConfigError
    from configs.loader import read_yaml_file

    env: dict = {}
    if runtime_env_file is not None:
        try:  # a regular file, bounded, UTF-8, no YAML aliases or repeated keys; JSON is YAML
            data = read_yaml_file(runtime_env_file, what="file")
        except ConfigError as e:
            raise ValueError(f"--runtime-env: {e}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ValueError(f"--runtime-env {runtime_env_file}: expected a mapping of Ray runtime_env fields "
                             f"(working_dir, pip, env_vars, ...), got {type(data).__name__}")
        for key in data:
            if key not in RUNTIME_ENV_FIELDS:
                raise ValueError(f"--runtime-env {runtime_env_file}: unknown runtime_env field {str(key)!r} "
                                 f"(Ray's fields: {', '.join(RUNTIME_ENV_FIELDS)})")
        env = copy.deepcopy(data)
    if working_dir is not None:
        if "working_dir" in env:
            raise ValueError(f"the working dir is given twice: --working-dir {working_dir} and working_dir in "
                             f"--runtime-env {runtime_env_file}; keep one")
        env["working_dir"] = working_dir
    # Local paths (not URIs) take ~ like every path Odyssey takes; Ray would look for a folder named "~".
    if _is_local(env.get("working_dir")):
        env["working_dir"] = os.path.expanduser(env["working_dir"])
    if isinstance(env.get("py_modules"), list):
        env["py_modules"] = [os.path.expanduser(m) if _is_local(m) else m for m in env["py_modules"]]
    # Ray applies `excludes` to the local folders it zips and uploads: the working dir and py_modules folders (a
    # .whl module goes up as it is).
    if _is_local(env.get("working_dir")) or any(_is_local(m) and not m.endswith(".whl")
                                                 for m in env.get("py_modules") or [] if isinstance(m, str)):
        excludes = env.get("excludes") or []
        if not isinstance(excludes, list):
            raise ValueError(f"--runtime-env {runtime_env_file}: excludes must be a list of patterns")
        # a wheel the job installs from its own working dir (pip: ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/x.whl) goes up
        ships_wheel = any("RAY_RUNTIME_ENV_CREATE_WORKING_DIR" in str(p) for p in _pip_specs(env.get("pip"), pip))
        ours = [e for e in EXCLUDES if e not in excludes and not (ships_wheel and e == "*.whl")]
        env["excludes"] = [*excludes, *ours]
    if pip:
        other = [f for f in ("uv", "conda") if f in env]
        if other:
            raise ValueError(f"--pip cannot be combined with {other[0]} in --runtime-env {runtime_env_file} (Ray "
                             f"installs packages with one of pip, uv, conda): list the packages there")
        have = env.get("pip")
        if have is None:
            env["pip"] = list(pip)
        elif isinstance(have, list):
            env["pip"] = [*have, *pip]
        elif isinstance(have, dict) and isinstance(have.get("packages", []), list):
            env["pip"] = {**have, "packages": [*have.get("packages", []), *pip]}
        else:  # a requirements file's path
            raise ValueError(f"--pip cannot be added to pip: {have!r} (a requirements file) in --runtime-env "
                             f"{runtime_env_file}: add the packages to that file, or list them all with --pip")
    if not env:
        return None
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**env)  # Ray's own checks (types, pip beside conda, ...) here, not in the job
    except (TypeError, ValueError) as e:
        where = f"--runtime-env {runtime_env_file}" if runtime_env_file else "runtime_env"
        raise ValueError(f"{where}: {printable(str(e).strip().splitlines()[0], 500)}") from None
    return env


def _is_local(path) -> bool:
    """A runtime_env path that names a local file or folder (uploaded by Ray), not a URI (s3://, gs://, https://)."""
    return isinstance(path, str) and "://" not in path


def _pip_specs(have, added) -> list:
    """Every package spec of a runtime_env's pip field (list, or dict with packages) and --pip's."""
    if isinstance(have, dict):
        have = have.get("packages")
    return [*(have if isinstance(have, list) else []), *added]


def not_found_hint(job_id: str) -> str:
    """One line: what to do when the cluster's nodes cannot run Odyssey."""
    return (f"odyssey: job {job_id} failed: the cluster cannot run Odyssey (`odyssey` or its packages not found "
            f"where Ray runs the job): install it on every node, in the environment `ray start` runs from (the "
            f"YAMLs of cluster/launch/ do), or ship it with the job: odyssey submit --pip SPEC (a wheel URL or "
            f"git+https:// URL of Odyssey the nodes can reach) or --runtime-env FILE")


def submit_job(address: str, odyssey_args: list[str], runtime_env: dict | None, wait: bool,
               debug: bool = False) -> int:
    """Submit `odyssey ODYSSEY_ARGS` as a Ray Job with runtime_env (job_runtime_env). Returns the exit code to use:
    0 if the job succeeded. debug (--debug): Ray's SDK's INFO lines too ('WebSocket closed for job ...')."""
    import logging

    from ray.job_submission import JobStatus, JobSubmissionClient

    # The SDK sets its logger to INFO when imported, and logs the end of every log stream it tails.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.INFO if debug else logging.WARNING)
    client = JobSubmissionClient(address)
    entrypoint = shlex.join(["odyssey", *odyssey_args])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted {job_id}: {entrypoint}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0

    seen = {"not_found": False, "tail": ""}

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()
            text = seen["tail"] + lines  # a match may straddle two chunks
            seen["not_found"] = seen["not_found"] or bool(_NOT_FOUND.search(text))
            seen["tail"] = text[-200:]

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"stopped {job_id}", file=sys.stderr)
        raise
    status = client.get_job_status(job_id)
    if status == JobStatus.SUCCEEDED:
        return 0
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    # The log's pattern counts only where the exit code could be such a failure (a Python's ImportError is 1):
    # a command that failed with another code said why, and the pattern may be a prompt quoted in its error.
    if code == _NOT_FOUND_EXIT or (seen["not_found"] and status == JobStatus.FAILED and code in (1, None)):
        print(not_found_hint(job_id), file=sys.stderr)
        return code if code and 0 < code < 256 else 1
    if code is not None and 0 < code < 256:
        # The command ran and said why above (its logs were streamed): pass its exit code on (2: input error).
        print(f"odyssey: job {job_id} {status.value.lower()}: odyssey exited with {code}", file=sys.stderr)
        return code
    lines = (info.message or "").strip().splitlines()  # Ray's first line says what; the rest are the logs again
    reason = printable(lines[0], 2000) if lines else ""
    if reason.startswith("runtime_env setup failed"):  # "Failed to set up runtime environment.": the why is below
        detail = _setup_failure(lines[1:])
        reason += f" ({printable(detail, 500)})" if detail else ""
    print(f"odyssey: job {job_id} {status.value.lower()}: {reason}".rstrip(": "), file=sys.stderr)
    return 1


def _setup_failure(lines: list[str]) -> str:
    """What a failed runtime_env setup's message (a traceback, then the installer's last lines) says went wrong:
    its last line that pip starts with 'ERROR:', else its last non-empty line."""
    lines = [line.strip() for line in lines if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or [""])[-1]


def validate_cluster_yaml(path: str | Path) -> dict:
    """Load a cluster-launcher YAML and check it against Ray's own schema (ValueError if it does not fit)."""
    import jsonschema
    import ray.autoscaler

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read cluster YAML {path}: {e}") from None
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ValueError(f"{path}: {where}: {e.message}") from None
    return config


def check_file_mounts(config: dict, yaml_path: str | Path) -> None:
    """Every local source of file_mounts must exist before `ray up` (it would fail halfway through otherwise), and
    the cluster's auth token must be private here: rsync copies its mode to every node, where other users could
    read it until setup's chmod runs."""
    for remote, local in (config.get("file_mounts") or {}).items():
        path = Path(os.path.expanduser(local))
        is_token = path.name == "auth_token"
        if not path.exists():
            hint = (" (the cluster's auth token: create it with `ray get-auth-token --generate && chmod 600 "
                    "~/.ray/auth_token`)" if is_token else "")
            raise ValueError(f"{yaml_path}: file_mounts {remote}: {local} does not exist here{hint}")
        if is_token and path.stat().st_mode & 0o077:
            raise ValueError(f"{yaml_path}: file_mounts {remote}: {local} is readable by others (mode "
                             f"{stat.S_IMODE(path.stat().st_mode):04o}), and rsync copies that mode to every node: "
                             f"chmod 600 {local}")


def _is_checkout(folder: Path) -> bool:
    try:
        text = (folder / "pyproject.toml").read_text()
    except OSError:
        return False
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    return bool(project and re.search(r'^name\s*=\s*"odyssey"\s*$', project.group(1), re.M))


def repo_root() -> Path:
    """The Odyssey checkout that `file_mounts: {~/odyssey: .}` means: the one this package runs from (an editable
    install), else the current directory if it is one. Ray resolves `.` against the current directory, so from
    HOME it would copy all of HOME (~/.ssh, ~/.aws) to every node."""
    for folder in (Path(__file__).resolve().parents[1], Path.cwd().resolve()):
        if _is_checkout(folder):
            return folder
    raise ValueError("the cluster YAMLs copy the Odyssey repository to every node (file_mounts ~/odyssey: .): run "
                     "`odyssey cluster` from an Odyssey checkout (a folder whose pyproject.toml names odyssey)")


def prepare_cluster_yaml(config: dict, yaml_path: str | Path, state_dir: Path) -> Path:
    """The copy of the YAML that `ray up` gets, under state_dir: relative file_mounts sources made absolute against
    the repository (repo_root), and on AWS the SSM image aliases pinned (pin_ssm_images)."""
    prepared = copy.deepcopy(config)
    root = None
    for remote, local in (prepared.get("file_mounts") or {}).items():
        if not os.path.isabs(os.path.expanduser(local)):
            root = root or repo_root()
            prepared["file_mounts"][remote] = str((root / local).resolve())
    if prepared["provider"]["type"] == "aws":
        pins_file = state_dir / f"{config['cluster_name']}-images.json"
        resolve = _ssm_resolver(prepared["provider"]["region"])
        pinned = pin_ssm_images(prepared, pins_file, resolve)
        if pinned != prepared:
            print(f"odyssey: images pinned for {config['cluster_name']} in {pins_file} (delete it to take the "
                  f"newest on the next up)", file=sys.stderr)
        prepared = pinned
    state_dir.mkdir(parents=True, exist_ok=True)
    out = state_dir / f"{config['cluster_name']}.yaml"
    out.write_text(f"# Prepared by `odyssey cluster up` from {Path(yaml_path).resolve()}: edit that file instead.\n"
                   + yaml.safe_dump(prepared, sort_keys=False))
    return out


def node_command(command: str) -> str:
    """A shell command for a cluster node, run inside the node's Ray environment."""
    return f"{NODE_ENV} && {command}"


SSM_PREFIX = "resolve:ssm:"


def pin_ssm_images(config: dict, pins_file: Path, resolve) -> dict:
    """Replace `resolve:ssm:NAME` ImageIds by the AMI id NAME points to, resolved once per cluster and kept in
    pins_file. EC2 resolves such aliases itself, but only for callers allowed ssm:GetParameters (Ray's default head
    role is not, so it could launch no worker), and again at every launch (a worker added after an AMI release would
    boot another image than the head). resolve(name) -> AMI id. Returns a new config."""
    pins = json.loads(pins_file.read_text()) if pins_file.is_file() else {}
    pinned = copy.deepcopy(config)
    for node_type in pinned.get("available_node_types", {}).values():
        image = node_type.get("node_config", {}).get("ImageId", "")
        if image.startswith(SSM_PREFIX):
            name = image.removeprefix(SSM_PREFIX)
            if name not in pins:
                pins[name] = resolve(name)
            node_type["node_config"]["ImageId"] = pins[name]
    if pins:
        pins_file.parent.mkdir(parents=True, exist_ok=True)
        pins_file.write_text(json.dumps(pins, indent=1) + "\n")
    return pinned


def _ssm_resolver(region: str):
    try:
        import boto3
    except ImportError:
        raise ValueError("AWS clusters need boto3 here (for `ray up` too): pip install boto3") from None

    def resolve(name: str) -> str:
        try:
            return boto3.client("ssm", region_name=region).get_parameter(Name=name)["Parameter"]["Value"]
        except Exception as e:  # noqa: BLE001 - botocore's errors: credentials, permissions, a wrong name
            raise ValueError(f"cannot resolve the image {SSM_PREFIX}{name} in {region}: {e}") from None

    return resolve


def cluster_command(action: str, yaml_path: str, state_dir: Path | None = None) -> int:
    """ray up / ray down / ray exec 'ray status' on a validated cluster YAML. `up` hands Ray a prepared copy under
    state_dir (~/.odyssey/clusters): see prepare_cluster_yaml. `down` on the local provider first stops Ray on the
    head inside its venv: the provider's terminate only forgets the machines, so Ray's own bare `ray stop` is all
    that would stop it (it finds `ray` only through the PATH line of setup_commands)."""
    config = validate_cluster_yaml(yaml_path)
    state_dir = state_dir or Path.home() / ".odyssey" / "clusters"
    ray_cli = str(Path(sys.executable).with_name("ray"))
    if action == "up":
        check_file_mounts(config, yaml_path)
        yaml_path = str(prepare_cluster_yaml(config, yaml_path, state_dir))
        return subprocess.call([ray_cli, "up", "--yes", yaml_path])
    if action == "status":
        return subprocess.call([ray_cli, "exec", yaml_path, node_command("ray status")])
    if config["provider"]["type"] == "local":
        subprocess.call([ray_cli, "exec", yaml_path, node_command("ray stop")])  # a head already down: fine
    code = subprocess.call([ray_cli, "down", "--yes", yaml_path])
    if code == 0:  # the next cluster of this name takes the newest images
        (state_dir / f"{config['cluster_name']}-images.json").unlink(missing_ok=True)
        (state_dir / f"{config['cluster_name']}.yaml").unlink(missing_ok=True)
    return code
