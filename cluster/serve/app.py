"""The Ray Serve application of `odyssey serve`: one ingress replica (FastAPI, cluster/serve/api.py) that owns the
VideoService, which drives the model replicas (Ray actors it places itself, as the batch driver does).

`odyssey serve` builds it with ingress(); `serve deploy cluster/launch/serve.yaml` with build_app(args) (import
path cluster.serve.app:build_app).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import stat
from pathlib import Path

from ray import serve

from configs import OdysseyConfig, from_dict, load_config, to_dict
from configs.loader import NotRegularFile, open_regular

__all__ = ["OdysseyIngress", "ingress", "build_app", "read_token_file", "with_previews", "model_name_of",
           "proxy_address", "DEFAULT_PREVIEW_EVERY"]

log = logging.getLogger(__name__)

DEFAULT_PREVIEW_EVERY = 5
BUILD_ARGS = ("config", "set", "output_dir", "token_file", "model_name")
MIN_TOKEN_CHARS = 16
API_HEADROOM = 744  # concurrent requests beside serve.max_streams event streams (1000 with the default 256)
MAX_QUEUED_REQUESTS = 200  # requests waiting for a slot past max_ongoing_requests; more: Serve answers 503 at once


@serve.deployment(
    name="OdysseyIngress",
    num_replicas=1,  # one service per output folder (it locks the folder): never two
    ray_actor_options={"num_cpus": 0},  # HTTP and bookkeeping only: every core stays with the model workers
    max_ongoing_requests=1000,  # each open event stream holds one for as long as the client watches (ingress()
    # raises it to serve.max_streams + API_HEADROOM when streams alone could take them all)
    max_queued_requests=MAX_QUEUED_REQUESTS,  # overload fails fast with 503 instead of hanging clients
    graceful_shutdown_wait_loop_s=0.5,
    # short: event streams resume on reconnect (/events sends the state first), while the old replica keeps the
    # output folder's lock, which a redeploy's new service waits for (service.LOCK_WAIT_S)
    graceful_shutdown_timeout_s=5,
)
@serve.ingress()
class OdysseyIngress:
    """The ingress replica: creates and starts the VideoService (returns at once; the model replicas load in the
    background, /healthz says when they are up), then serves create_app() over it."""

    def __init__(self, config: dict, output_dir: str, model_name: str, token: str | None = None):
        from .service import VideoService

        self.config = from_dict(OdysseyConfig, config)
        self.token = token
        self._app = None
        self._closed = False
        self.service = VideoService(self.config, output_dir=Path(output_dir), model_name=model_name)
        self.service.start()

    def __serve_build_asgi_app__(self):
        from .api import create_app

        serve_config = self.config.serve
        # the Host names it answers to follow from where Serve's proxies really listen (serve deploy sets that in
        # its own file, not in the config)
        listening = proxy_address()
        host = listening[0] if listening is not None else serve_config.host
        self._app = create_app(self.service, token=self.token, max_body_bytes=serve_config.max_body_bytes,
                               max_streams=serve_config.max_streams, host=host)
        return self._app

    async def check_health(self) -> None:
        """Serve's health check: raising makes Serve replace this replica (a new service, new model replicas).
        Only for a fatal error that is not the config's: a config that cannot work (a ValueError: weights missing,
        more replicas than the cluster can place) would fail the same way after a restart, so it stays reported
        by /healthz and every request instead of a restart loop."""
        health = await asyncio.to_thread(self.service.health)
        if not health.get("error"):
            return
        fatal = getattr(self.service, "fatal", None)
        if fatal is not None and not isinstance(fatal, ValueError):
            raise RuntimeError(f"the service stopped: {health['error']}")

    def shutdown_service(self) -> None:
        """End the event streams (a graceful shutdown would otherwise wait for every watching browser) and stop
        the service and its model replicas. Called by `odyssey serve` before serve.shutdown(); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._app is not None:
            self._app.state.end_streams()
        self.service.close()

    def __del__(self):  # Serve's graceful shutdown (serve shutdown, a redeploy): the model replicas go too
        if getattr(self, "service", None) is not None:
            self.shutdown_service()


def with_previews(config: OdysseyConfig) -> OdysseyConfig:
    """The service shows live previews: sampling.preview_every 5 unless the config asks for another interval."""
    if config.sampling.preview_every:
        return config
    return dataclasses.replace(config, sampling=dataclasses.replace(config.sampling,
                                                                    preview_every=DEFAULT_PREVIEW_EVERY))


def model_name_of(config_source: str | None) -> str:
    """What clients pass as `model`: the preset's name, or a YAML file's stem."""
    text = str(config_source or "tiny")
    return Path(text).stem if text.endswith((".yaml", ".yml")) or "/" in text else text


def read_token_file(path: str | os.PathLike) -> str:
    """The API token: one line (stripped), printable, no spaces, at least MIN_TOKEN_CHARS. A file that others can
    read or write is refused: anyone who can read it can use the service as you (chmod 600)."""
    path = Path(path).expanduser()
    try:
        fd = open_regular(path)
    except NotRegularFile:
        raise ValueError(f"the token file {path} is not a regular file") from None
    except OSError as e:
        raise ValueError(f"cannot read the token file {path}: {e.strerror}") from None
    st = os.fstat(fd)
    with os.fdopen(fd, "rb") as f:
        if st.st_mode & 0o077:
            raise ValueError(f"the token file {path} is readable or writable by other users (mode "
                             f"{stat.S_IMODE(st.st_mode):o}); run chmod 600 {path}")
        raw = f.read(4097)
    if len(raw) > 4096:
        raise ValueError(f"the token file {path} is over 4096 bytes; it should hold one line, the token")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"the token file {path} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"the token file {path} is empty")
    if "\n" in text or not re.fullmatch(r"[\x21-\x7e]+", text):
        raise ValueError(f"the token file {path} must hold one line of printable ASCII without spaces (the token)")
    if len(text) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token in {path} is {len(text)} characters: use at least {MIN_TOKEN_CHARS} random ones, "
                         f"e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}")
    return text


def proxy_address(timeout_s: float = 10.0) -> tuple[str | None, int] | None:
    """(host, port) Serve's HTTP proxies listen on, as its controller has them (Serve keeps the options it started
    with: a later serve.start's are ignored); host None when Serve runs without HTTP proxies. None when there is no
    controller or it does not answer (then the caller falls back on the config)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        options = ray.get(controller.get_http_config.remote(), timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - no Serve, or a controller that does not answer
        log.warning("cannot read Serve's HTTP options: %s", e)
        return None
    return options.host, int(options.port)


def ingress(config: OdysseyConfig, *, output_dir: str | os.PathLike, model_name: str, token: str | None = None,
            **options) -> serve.Application:
    """The bound application (options: deployment option overrides, e.g. max_constructor_retry_count). The
    ingress's concurrent requests leave API_HEADROOM beside serve.max_streams event streams."""
    options.setdefault("max_ongoing_requests", max(OdysseyIngress.max_ongoing_requests,
                                                   config.serve.max_streams + API_HEADROOM))
    return OdysseyIngress.options(**options).bind(to_dict(config), str(output_dir), model_name, token)


def build_app(args: dict) -> serve.Application:
    """For `serve deploy` (import_path cluster.serve.app:build_app). args: config (preset name or YAML path),
    set (list of KEY=VALUE), output_dir (absolute), token_file (optional), model_name (optional; default the
    preset's name or the YAML's stem). Previews are on (sampling.preview_every 5) unless the config sets them."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ValueError(f"unknown args {', '.join(map(repr, unknown))} for cluster.serve.app:build_app (known: "
                         f"{', '.join(BUILD_ARGS)})")
    source = args.get("config") or "tiny"
    overrides = args.get("set") or []
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ValueError("args.set must be a list of KEY=VALUE strings")
    output_dir = args.get("output_dir")
    if not output_dir or not Path(str(output_dir)).expanduser().is_absolute():
        raise ValueError(f"args.output_dir must be an absolute path on the ingress's node, got {output_dir!r} "
                         f"(a relative one lands in Ray's working directory)")
    token = read_token_file(args["token_file"]) if args.get("token_file") else None
    config = with_previews(load_config(source, list(overrides)))
    return ingress(config, output_dir=Path(str(output_dir)).expanduser(),
                   model_name=str(args.get("model_name") or model_name_of(source)), token=token)
