"""`odyssey submit`: the same CLI as a Ray Job, logs streamed back, exit code from the job's outcome; and
`odyssey cluster`: thin wrappers over Ray's cluster launcher."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["submit_job", "enable_token_auth", "validate_cluster_yaml", "cluster_command"]

EXCLUDES = [".git", ".venv", "venv", "outputs", "__pycache__", "*.mp4", "*.safetensors", "*.pth", ".whl", ".gl"]


def enable_token_auth(token_file: str | None = None) -> None:
    """Make Ray's HTTP clients send the cluster token: from token_file, RAY_AUTH_TOKEN(_PATH), or Ray's default
    ~/.ray/auth_token. Must run before ray is imported (Ray reads RAY_AUTH_MODE once)."""
    if token_file:
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(token_file).expanduser())
    has_token = (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                 or (Path.home() / ".ray" / "auth_token").is_file())
    if has_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def submit_job(address: str, odyssey_args: list[str], working_dir: str | None, wait: bool) -> int:
    """Submit `odyssey ODYSSEY_ARGS` as a Ray Job. Returns the exit code to use: 0 if the job succeeded."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES} if working_dir else None
    entrypoint = shlex.join(["odyssey", *odyssey_args])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted {job_id}: {entrypoint}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

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
    print(f"odyssey: job {job_id} {status.value.lower()}: {info.message or ''}".rstrip(": "), file=sys.stderr)
    return 1


def validate_cluster_yaml(path: str | Path) -> dict:
    """Load a cluster-launcher YAML and check it against Ray's own schema (ValueError if it does not fit)."""
    import json

    import jsonschema
    import ray.autoscaler
    import yaml

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


def cluster_command(action: str, yaml_path: str) -> int:
    """ray up / ray down / ray exec 'ray status' on a validated cluster YAML."""
    validate_cluster_yaml(yaml_path)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    commands = {
        "up": [ray_cli, "up", "--yes", yaml_path],
        "down": [ray_cli, "down", "--yes", yaml_path],
        "status": [ray_cli, "exec", yaml_path, "ray status"],
    }
    return subprocess.call(commands[action])
