"""The deployment files of `odyssey serve`, checked the way their consumers read them, without a Ray cluster:
cluster/launch/serve.yaml by Ray Serve's own config schema and by the controller's build path (import the builder,
call it with the file's args, apply the file's deployment overrides); cluster/launch/kuberay-rayservice.yaml by the
openAPIV3Schema of KubeRay's RayService CRD (vendored in tests/data, unknown fields refused as `kubectl apply`'s
strict field validation does) and by the operator's own rules, with its serveConfigV2 checked like serve.yaml."""

from __future__ import annotations

import copy
import gzip
import ipaddress
import json
import re
from pathlib import Path, PurePosixPath
from unittest import mock

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from tests.test_launch import _constraints

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "cluster" / "launch"
# KubeRay v1.7.0 (commit 59d663aeec13760646da3db9c1cf8cfe883e30b7), ray-operator/config/crd/bases/
# ray.io_rayservices.yaml: versions[name=v1].schema.openAPIV3Schema as compact JSON; see tests/data/README.md.
RAYSERVICE_SCHEMA = ROOT / "tests" / "data" / "kuberay-v1.7.0-rayservice-v1.schema.json.gz"
HEAD_RESOURCE = "node:__internal_head__"  # ray._common.constants.HEAD_NODE_RESOURCE_NAME


def _yaml(name: str) -> dict:
    return yaml.safe_load((LAUNCH / name).read_text())


# -- Ray Serve's config schema ----------------------------------------------------------------------------------------


def _unknown_keys(model: BaseModel, raw, path: str = "") -> list[str]:
    """Keys of `raw` the validated `model` has no field for. Serve's schema models ignore unknown keys (pydantic's
    default), so a misspelt `ray_actor_option` would be dropped without a word; `serve deploy` would run without it."""
    if not isinstance(raw, dict):
        return []
    fields = type(model).model_fields
    names = {n for n, f in fields.items()} | {f.alias for f in fields.values() if f.alias}
    unknown = [f"{path}{k}" for k in raw if k not in names]
    for name in fields:
        value, sub = getattr(model, name), raw.get(name, raw.get(fields[name].alias or name))
        if isinstance(value, BaseModel):
            unknown += _unknown_keys(value, sub, f"{path}{name}.")
        elif isinstance(value, list) and isinstance(sub, list):
            unknown += [k for i, (v, r) in enumerate(zip(value, sub)) if isinstance(v, BaseModel)
                        for k in _unknown_keys(v, r, f"{path}{name}[{i}].")]
    return unknown


def serve_config(raw: dict):
    """A Serve config file's content -> ServeDeploySchema, as `serve deploy` validates it, unknown keys refused."""
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(raw)
    unknown = _unknown_keys(config, raw)
    assert not unknown, f"keys Ray Serve does not know (it would ignore them): {unknown}"
    return config


def build(app_config) -> tuple[dict, str]:
    """What Serve's controller does with one application of a config file (build_serve_application and
    override_deployment_info in ray.serve._private.application_state), without Ray: import the builder, call it with
    the args, build the deployments, apply the file's overrides. -> ({name: DeploymentInfo}, ingress name)."""
    import ray.serve._private.deploy_utils as deploy_utils
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app

    app = call_user_app_builder_with_args_if_necessary(import_attr(app_config.import_path), app_config.args)
    built = build_app(app, name=app_config.name, default_runtime_env={})
    built.validate_single_fastapi_ingress()
    infos = {}
    # get_deploy_args records the deploying job's id (it would start a local Ray to ask for one)
    job = mock.Mock(get_job_id=lambda: "01000000")
    with mock.patch.object(deploy_utils.ray, "get_runtime_context", return_value=job):
        for d in built.deployments:
            ingress = d.name == built.ingress_deployment_name
            args = deploy_utils.get_deploy_args(name=d.name, replica_config=d._replica_config, ingress=ingress,
                                                deployment_config=d._deployment_config, version="test",
                                                route_prefix="/" if ingress else None)
            infos[d.name] = (deploy_utils.deploy_args_to_deployment_info(app_name=app_config.name, **args),
                             d._replica_config.ray_actor_options or {})
    overridden = override_deployment_info({n: info for n, (info, _) in infos.items()}, app_config)
    return {n: (overridden[n], code) for n, (_, code) in infos.items()}, built.ingress_deployment_name


def _on_this_machine(app_config, folder: Path):
    """The application with its head's paths mapped into `folder`: output_dir, and token_file (a private file)."""
    args = {**app_config.args, "output_dir": str(folder / "out")}
    if args.get("token_file"):
        token = folder / "token"
        token.write_text("t0ken-for-this-test-0123456789\n")
        token.chmod(0o600)
        args["token_file"] = str(token)
    return app_config.model_copy(update={"args": args})


def check_application(app_config, tmp_path: Path) -> None:
    """The application of serve.yaml and of the RayService: `odyssey`'s builder at /, its ingress alone, on the head
    (it owns the job store in output_dir), with everything the code gives it unless the file restates it."""
    assert app_config.name == "odyssey" and app_config.route_prefix == "/"
    assert app_config.import_path == "cluster.serve.app:build_app"
    args = app_config.args
    assert args["config"] and isinstance(args.get("set", []), list)
    assert PurePosixPath(args["output_dir"]).is_absolute(), "a relative output_dir lands in Ray's working dir cache"
    deployments, ingress = build(_on_this_machine(app_config, tmp_path))
    info, code_options = deployments[ingress]
    options = info.replica_config.ray_actor_options
    assert options.get("resources", {}).get(HEAD_RESOURCE, 0) > 0, "the ingress must run on the head"
    # ray_actor_options in a file replaces the code's as a whole: what the code asks for must be restated.
    for key, value in code_options.items():
        if key == "resources":
            for name, amount in value.items():
                assert options["resources"].get(name) == amount, f"the override drops the code's resource {name!r}"
        else:
            assert options.get(key) == value, f"the override changes the code's ray_actor_options[{key!r}] = " \
                                              f"{value!r} to {options.get(key)!r}"
    # One service per output folder (it locks it): never two ingress replicas, not even during a redeploy (a
    # surge would start the new replica while the old one holds the lock).
    config = info.deployment_config
    assert config.num_replicas == 1 and config.autoscaling_config is None and not config.max_surge_percent


# -- serve.yaml -------------------------------------------------------------------------------------------------------


def test_serve_yaml_is_a_serve_config_that_listens_on_loopback():
    config = serve_config(_yaml("serve.yaml"))
    assert ipaddress.ip_address(config.http_options.host).is_loopback, "nothing listens publicly unless asked"
    assert config.http_options.port == 8000
    assert config.http_options.request_timeout_s is None, "event streams and downloads must not be cut off"
    (app,) = config.applications
    assert "token_file" not in app.args or app.args["token_file"], "an empty token_file is no token"


def test_serve_yaml_builds_odyssey_with_the_ingress_on_the_head(tmp_path):
    (app,) = serve_config(_yaml("serve.yaml")).applications
    check_application(app, tmp_path)


def test_the_checks_refuse_what_serve_would_ignore_or_reject(tmp_path):
    raw = _yaml("serve.yaml")
    typo = copy.deepcopy(raw)
    typo["applications"][0]["deployments"][0]["ray_actor_option"] = typo["applications"][0]["deployments"][0].pop(
        "ray_actor_options")
    with pytest.raises(AssertionError, match=r"applications\[0\]\.deployments\[0\]\.ray_actor_option"):
        serve_config(typo)
    (app,) = serve_config(raw).applications
    wrong = app.model_copy(update={"deployments": [d.model_copy(update={"name": "NoSuchDeployment"})
                                                   for d in app.deployments]})
    with pytest.raises(ValueError, match="NoSuchDeployment"):
        build(_on_this_machine(wrong, tmp_path))
    unpinned = app.model_copy(update={"deployments": []})
    with pytest.raises(AssertionError, match="on the head"):
        check_application(unpinned, tmp_path)


# -- KubeRay RayService -----------------------------------------------------------------------------------------------


def _strict(schema: dict) -> dict:
    """The CRD schema as the API server applies it with strict field validation (kubectl's default): an object
    schema that lists its properties takes no others, unless it says x-kubernetes-preserve-unknown-fields.
    jsonschema alone would let a misspelt field through, and Kubernetes would drop it."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = _strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(s) for s in schema[key]]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator():
    schema = _strict(json.loads(gzip.decompress(RAYSERVICE_SCHEMA.read_bytes())))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, document) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def _kuberay_rules(service: dict) -> list[str]:
    """Checks KubeRay's operator makes beyond the schema (controllers/ray/utils/validation.go, v1.7.0) that this
    manifest could break: ValidateRayServiceMetadata, ValidateRayServiceSpec, ValidateRayClusterSpec."""
    problems = []
    name = service["metadata"]["name"]
    if len(name) > 47 or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"name {name!r}: a DNS-1035 label of at most 47 characters")
    spec = service["spec"]
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
        problems.append(f"upgradeStrategy.type {upgrade!r}")
    cluster = spec["rayClusterConfig"]
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        version = tuple(int(p) for p in cluster.get("rayVersion", "0").split(".")[:3])
        if version < (2, 52, 0):
            problems.append("authOptions token needs rayVersion >= 2.52.0")
    if not cluster["headGroupSpec"]["template"]["spec"].get("containers"):
        problems.append("the head needs a container")
    for group in cluster.get("workerGroupSpecs", []):
        if not group["template"]["spec"].get("containers"):
            problems.append(f"worker group {group['groupName']} needs a container")
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31 - 1)
        if not 0 <= lo <= n <= hi:
            problems.append(f"worker group {group['groupName']}: minReplicas <= replicas <= maxReplicas")
    return problems


def test_rayservice_matches_kuberay_crd_schema(rayservice_validator):
    service = _yaml("kuberay-rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert _errors(rayservice_validator, service) == []
    assert _kuberay_rules(service) == []


def test_the_crd_check_refuses_misspelt_and_mistyped_fields(rayservice_validator):
    service = _yaml("kuberay-rayservice.yaml")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    typo = copy.deepcopy(service)
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = \
        head["volumeMounts"]
    assert any("volumeMount" in e for e in _errors(rayservice_validator, typo))
    mistyped = copy.deepcopy(service)
    mistyped["spec"]["serveConfigV2"] = yaml.safe_load(service["spec"]["serveConfigV2"])  # a map, not a string
    assert any(e.startswith("spec.serveConfigV2") for e in _errors(rayservice_validator, mistyped))
    unnamed = copy.deepcopy(service)
    unnamed["metadata"]["name"] = "Odyssey_Serve"
    assert _kuberay_rules(unnamed)


def _head(service: dict) -> tuple[dict, dict]:
    pod = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "ray-head"]
    return pod, container


def _mount_of(pod: dict, container: dict, path: str) -> tuple[dict, dict]:
    """The (volumeMount, volume) a file path lies under, the deepest mount first."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    for m in mounts:
        if PurePosixPath(path).is_relative_to(m["mountPath"]):
            return m, volumes[m["name"]]
    raise AssertionError(f"{path} is on no volume of the head pod: the container's own disk dies with the pod")


def _application(app_config) -> dict:
    """What makes two Serve applications the same one: all but args (and the head's label, which only KubeRay sets)."""
    same = app_config.model_dump(include={"name", "route_prefix", "import_path", "runtime_env", "deployments"},
                                 exclude_unset=True)
    for d in same.get("deployments") or []:
        (d.get("ray_actor_options") or {}).pop("label_selector", None)
    return same


def _check_token_reaches_the_api(pod: dict, head: dict, token_file: str, tmp_path: Path) -> None:
    """token_file is filled by an init container from the Secret. Run its command against a Secret-like file (root's,
    0440 for the fsGroup, as Kubernetes projects it) with the pod's paths mapped to tmp_path: the API's reader
    refuses the Secret's own file and takes the copy."""
    import shlex
    import subprocess

    from cluster.serve.app import read_token_file

    mount, volume = _mount_of(pod, head, token_file)
    assert mount.get("readOnly") and volume.get("emptyDir", {}).get("medium") == "Memory", \
        "the token's copy: read-only for the Ray container, never on the node's disk"
    (init,) = [c for c in pod.get("initContainers", []) if any(m["name"] == volume["name"]
                                                               for m in c.get("volumeMounts", []))]
    volumes = {v["name"]: v for v in pod["volumes"]}
    paths = {}
    for m in init["volumeMounts"]:
        local = paths[m["mountPath"]] = tmp_path / m["name"]
        local.mkdir()
        secret = volumes[m["name"]].get("secret")
        if secret:
            assert m.get("readOnly")
            given = local / "token"
            given.write_text("s3cret-token-of-the-secret-0123\n")
            given.chmod(secret["defaultMode"])
            with pytest.raises(ValueError, match="readable or writable by other users"):
                read_token_file(given)
    command = init["command"]
    assert command[:2] == ["sh", "-c"]
    line = command[2]
    for pod_path, local in sorted(paths.items(), key=lambda p: -len(p[0])):
        line = line.replace(pod_path, shlex.quote(str(local)))
    subprocess.run(["sh", "-c", line], check=True)
    copy_path = paths[mount["mountPath"]] / PurePosixPath(token_file).relative_to(mount["mountPath"])
    assert read_token_file(copy_path) == "s3cret-token-of-the-secret-0123"


def test_rayservice_runs_the_serve_yaml_application_on_the_head(tmp_path):
    service = _yaml("kuberay-rayservice.yaml")
    config = serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    check_application(app, tmp_path)
    (local,) = serve_config(_yaml("serve.yaml")).applications
    assert _application(app) == _application(local), "the RayService runs serve.yaml's application (but its args)"
    # The head's Ray node carries KubeRay's group label: the ingress and the task that builds the application
    # (it reads token_file, which only the head has) are both pinned to it.
    from ray.serve._private.application_state import _get_shared_build_app_label_selector

    assert _get_shared_build_app_label_selector(app) == {"ray.io/node-group": "headgroup"}
    pod, head = _head(service)
    assert not ipaddress.ip_address(config.http_options.host).is_loopback
    assert app.args.get("token_file"), "the API is on the pod network: it needs a token"
    _check_token_reaches_the_api(pod, head, app.args["token_file"], tmp_path)
    # The job store and videos: on the outputs claim, which only the head mounts (ReadWriteOnce).
    mount, volume = _mount_of(pod, head, app.args["output_dir"])
    claims = {c["metadata"]["name"]: c["spec"] for c in yaml.safe_load_all((LAUNCH / "kuberay-volumes.yaml")
                                                                           .read_text())}
    claim = claims[volume["persistentVolumeClaim"]["claimName"]]
    assert not mount.get("readOnly")
    if "ReadWriteOnce" in claim["accessModes"]:
        # Two clusters at once (KubeRay's default upgrade) would both need the claim, and share one job store.
        assert service["spec"]["upgradeStrategy"]["type"] == "None"
    # Serve's port is the head container's `serve` port, which KubeRay puts on the head and serve Services.
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == config.http_options.port
    assert {"gcs-server", "dashboard", "client"} <= set(ports), "listing ports replaces KubeRay's defaults"
    assert config.http_options.request_timeout_s is None
    # The GPU workers keep KubeRay's readiness probe (raylet + a Serve proxy on 8000): Serve runs proxies only on
    # the head and where Serve replicas are, so it keeps the workers, which the serve Service selects (KubeRay
    # labels every RayService worker ray.io/serve=true), out of that Service. A probe of our own (raylet only)
    # would make them Ready endpoints that refuse the API's port.
    assert all(d.name == "OdysseyIngress" for d in app.deployments), "a Serve replica would put a proxy on a worker"
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert "readinessProbe" not in container, "workers would join odyssey-serve-serve-svc without a proxy"


def test_rayservice_cluster_is_the_rayjob_cluster():
    """Same image, Ray version, token auth, GPU nodes and volumes as kuberay-rayjob.yaml: one image and one set
    of claims serve both."""
    service = _yaml("kuberay-rayservice.yaml")["spec"]["rayClusterConfig"]
    job = _yaml("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]
    assert service["rayVersion"] == job["rayVersion"] == _constraints()["ray"]
    assert service["authOptions"] == job["authOptions"] == {"mode": "token"}
    s_pod, s_head = _head({"spec": {"rayClusterConfig": service}})
    j_pod = job["headGroupSpec"]["template"]["spec"]
    assert s_head["image"] == j_pod["containers"][0]["image"]
    assert s_pod["securityContext"] == j_pod["securityContext"]
    assert service["headGroupSpec"]["rayStartParams"] == job["headGroupSpec"]["rayStartParams"]
    (s_workers,), (j_workers,) = service["workerGroupSpecs"], job["workerGroupSpecs"]
    assert s_workers["template"] == j_workers["template"], "GPU workers: same image, selector, weights, /dev/shm"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in s_pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {v["persistentVolumeClaim"]["claimName"] for v in j_pod["volumes"]
                      if "persistentVolumeClaim" in v}


# -- `serve deploy cluster/launch/serve.yaml` on a real head ----------------------------------------------------------


def test_serve_deploy_of_serve_yaml_serves_videos(tmp_path):
    """The documented deploy, for real: a token-protected `ray start --head`, then `RAY_AUTH_MODE=token serve deploy`
    of serve.yaml with only its head paths and port changed (output_dir, the HTTP port: this machine is shared); the
    API answers on loopback, makes a video, and the ingress's records land in output_dir."""
    import os
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    from cluster.video import read_mp4
    from tests.test_launch import _free_port, _sweep

    bin_dir = Path(sys.executable).parent
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True, mode=0o700)
    (home / ".ray" / "auth_token").write_text(os.urandom(32).hex())
    (home / ".ray" / "auth_token").chmod(0o600)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8", "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0"}
    port, dash, http = _free_port(), _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="ody", dir="/tmp")  # short: Ray's socket paths live under it
    raw = _yaml("serve.yaml")
    raw["http_options"]["port"] = http
    raw["applications"][0]["args"]["output_dir"] = str(tmp_path / "serve-out")
    deploy_file = tmp_path / "serve.yaml"
    deploy_file.write_text(yaml.safe_dump(raw))
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={_free_port()}",
         # free ports for what Ray would put on fixed ones (52365, 10001): other heads may run on this machine
         f"--metrics-export-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
         "--num-cpus=2", f"--temp-dir={temp}"],
        env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{http}"
    try:
        deadline = time.time() + 300  # head, dashboard, Serve, the embedded model: a minute on a busy 2-core box
        while True:
            done = subprocess.run([str(bin_dir / "serve"), "deploy", "-a", f"http://127.0.0.1:{dash}",
                                   str(deploy_file)], env=env, cwd=home, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, \
                f"serve deploy failed: {done.stderr[-2000:]}\n{(tmp_path / 'head.log').read_text()[-2000:]}"
            time.sleep(2)
        token = (home / ".ray" / "auth_token").read_text()
        while (status := _http_json(f"{api}/healthz")[0]) != 200:
            assert head.poll() is None and time.time() < deadline, f"/healthz answered {status} for 5 minutes"
            apps = _http_json(f"http://127.0.0.1:{dash}/api/serve/applications/", token=token)[1] or {}
            app = (apps.get("applications") or {}).get("odyssey") or {}
            assert app.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), \
                [app.get("message")] + [d.get("message", "")[-1500:] for d in (app.get("deployments") or {}).values()]
            time.sleep(1)
        code, video = _http_json(f"{api}/v1/videos", {"prompt": "a red circle moving right", "seed": 1, "steps": 4})
        assert code == 200 and video["status"] == "queued" and video["model"] == "tiny", video
        while video["status"] in ("queued", "in_progress"):
            assert time.time() < deadline, video
            time.sleep(0.5)
            video = _http_json(f"{api}/v1/videos/{video['id']}")[1]
        assert video["status"] == "completed" and video["progress"] == 100, video
        with urllib.request.urlopen(f"{api}/v1/videos/{video['id']}/content", timeout=30) as r:
            assert r.headers["Content-Type"] == "video/mp4"
            (tmp_path / "v.mp4").write_bytes(r.read())
        frames, fps = read_mp4(tmp_path / "v.mp4")
        assert frames.shape == (video["frames"], 32, 32, 3) and fps == video["fps"] == 8
        assert (tmp_path / "serve-out" / "videos" / f"{video['id']}.mp4").is_file(), "the ingress writes output_dir"
    finally:
        # Nothing here is about a graceful stop (SIGTERM waits for Ray's own teardown): end the head's group, then
        # any process of this head outside it (naming its --temp-dir or living in its HOME), and check none is left.
        left = _sweep(temp, [home], head)
        log.close()
        assert not left, f"processes of the head survived its teardown: {left}"


def _http_json(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict | None]:
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:  # Serve's proxy answers 404 in plain text until the application is up
        text = e.read()
        return e.code, json.loads(text) if text.startswith(b"{") else None
    except OSError:
        return 0, None
