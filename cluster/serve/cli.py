"""`odyssey serve`: the video generation service on Ray Serve (registered in cluster/cli.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

import click

__all__ = ["serve", "check_listen", "is_loopback"]

APP_NAME = "odyssey"


# --shard-weights and --ring of every command that takes --ulysses (cluster/cli.py imports them from here: see
# _config_options)
SHARD_WEIGHTS_HELP = ("Shard the DiT's weights over the replica's ranks (FSDP2) instead of a whole copy on each GPU, "
                      "so a model larger than one GPU fits; costs one all-gather of each block's weights per forward, "
                      "prefetched (parallel.shard_weights=true; needs --ulysses 2+ or --cfg-parallel).")
ULYSSES_HELP = "Ranks per Ulysses group: they share a video's tokens by all-to-all, on one node."
RING_HELP = ("Ulysses groups per video, sharing its tokens by ring attention (point to point, may cross nodes): a "
             "video runs on ring x ulysses ranks (parallel.ring_degree; e.g. --ulysses 8 --ring 2 on 2 nodes of 8 "
             "GPUs).")


def _config_options(fn):
    """cluster/cli.py's --config/--set. That module registers this command when it loads, so this one imports it
    only inside functions (a module-level import is circular whenever this module is imported first)."""
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a setting, e.g. --set sampling.steps=20 (repeatable).")(fn)
    return click.option("--config", "config_source", metavar="NAME_OR_PATH",
                        help="Preset name or YAML file (default: tiny, the embedded model).")(fn)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_listen(host: str, port: int) -> None:
    """Bind host:port once (as uvicorn will: SO_REUSEADDR) so a taken port or an address this machine does not have
    is one line now, not a traceback from Serve's proxy later. ValueError."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(1)
        except OSError as e:
            if e.errno == 98:  # EADDRINUSE
                raise ValueError(f"port {port} on {host} is already in use (choose another with --port)") from None
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _url(host: str, port: int) -> str:
    return f"http://[{host.strip('[]')}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve_running() -> bool:
    """Whether the cluster already runs Ray Serve (then this command only adds and removes its application)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def check_folder_free(output_dir: Path) -> None:
    """Another `odyssey serve` holding the output folder's lock (service.py takes it for the service's life) is one
    line now; the ingress would otherwise fail to start after Ray and Serve came up. ValueError."""
    from .service import LOCK_NAME, _lock_folder

    if (output_dir / LOCK_NAME).exists():
        os.close(_lock_folder(output_dir / LOCK_NAME))


def _deploy_error(e: Exception) -> str:
    """Why the ingress did not start: the last exception line of the replica's traceback, which Serve keeps in the
    deployment's status (serve.run's own error only says that the deployment failed)."""
    from ray import serve as ray_serve

    text = str(e)
    try:
        app = ray_serve.status().applications[APP_NAME]
        text = "\n".join([text, app.message, *(d.message for d in app.deployments.values())])
    except Exception:  # noqa: BLE001 - the status is a nicety; serve.run's error stands
        pass
    for line in reversed([line.strip() for line in text.splitlines() if line.strip()]):
        kind, sep, message = line.partition(": ")
        if sep and re.fullmatch(r"[\w.]*(Error|Exception)", kind):
            return message
    return str(e).splitlines()[0] if str(e) else type(e).__name__


@click.command("serve")
@_config_options
@click.option("--ulysses", type=click.IntRange(1), help=ULYSSES_HELP)
@click.option("--ring", type=click.IntRange(1), help=RING_HELP)
@click.option("--shard-weights", is_flag=True, help=SHARD_WEIGHTS_HELP)
@click.option("--cfg-parallel", is_flag=True, help="Run the two guidance passes on two halves of the ranks.")
@click.option("--replicas", type=click.IntRange(1), help="Model copies serving requests at once.")
@click.option("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster in-process).")
@click.option("--host", help="Interface to listen on (default: serve.host, 127.0.0.1). Any but loopback needs "
                             "--token-file, or --insecure.")
@click.option("--port", type=click.IntRange(1, 65535), help="TCP port (default: serve.port, 8000).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the API token (one line, chmod 600); clients send Authorization: Bearer <token>.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs/serve"),
              show_default=True, help="Jobs database and videos (kept across restarts).")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token.")
def serve(config_source, overrides, ulysses, ring, shard_weights, cfg_parallel, replicas, address, host, port,
          token_file, output_dir, insecure):
    """Serve text-to-video over HTTP (OpenAI's video API, live progress and previews, a web page at /)."""
    from ..cli import InputError, RunFailed, resolve_config
    from ..driver import Driver, connect_ray
    from ..placement import PlacementError, cluster_nodes, plan_placement
    from ..submit import check_job_output
    from .app import ingress, model_name_of, read_token_file, with_previews

    config = with_previews(resolve_config(config_source, overrides, ulysses=ulysses, ring=ring,
                                          cfg_parallel=cfg_parallel, replicas=replicas, shard_weights=shard_weights))
    host = host if host is not None else config.serve.host
    port = port if port is not None else config.serve.port
    token = None
    try:
        if token_file is not None:
            token = read_token_file(token_file)
        if not is_loopback(host) and token is None and not insecure:
            raise ValueError(f"refusing to listen on {host} without a token: anyone who reaches it could use the "
                             f"service; give --token-file FILE (or --insecure to allow it)")
        check_job_output(output_dir, "--output-dir")
        if output_dir.is_symlink():
            raise ValueError(f"the output folder {output_dir} is a symbolic link; pass the folder it points to")
        check_folder_free(output_dir)
        Driver(config, address=address, progress=None).validate()  # weights folder, step cache: before Ray
        joins = bool(address or os.environ.get("RAY_ADDRESS"))
        if not joins:  # a Ray of its own, so a Serve of its own: its proxy binds host:port on this machine
            check_listen(host, port)
    except ValueError as e:
        raise InputError(str(e)) from None
    model_name = model_name_of(config_source)

    import ray
    from ray import serve as ray_serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    ctx = click.get_current_context(silent=True)
    debug = bool(ctx and ctx.find_root().params.get("debug"))  # --debug: a local Ray's own lines too
    owns_ray = connect_ray(address, ray_logs=debug)
    # Ray's core worker takes SIGTERM over (a stack dump, then death, leaving the Serve app behind): SIGTERM
    # stops the service like Ctrl-C again.
    signal.signal(signal.SIGTERM, _interrupt)
    owns_serve = deployed = False
    try:
        try:  # a layout this cluster can never place would be deployed, then wait forever: refused before Serve
            plan_placement(config, cluster_nodes())
        except PlacementError as e:
            raise InputError(str(e)) from None
        if _serve_running():
            # another user's application of that name would be replaced, then deleted when this command stops
            if APP_NAME in ray_serve.status().applications:
                raise InputError(f"Ray Serve on this cluster already runs an application named {APP_NAME} (`serve "
                                 f"status` shows it; `serve shutdown` removes it, or stop the odyssey serve that "
                                 f"deployed it)")
        else:
            owns_serve = True
            if joins:
                try:
                    check_listen(host, port)
                except ValueError as e:
                    raise InputError(str(e)) from None
        ray_serve.start(http_options={"host": host, "port": port, "request_timeout_s": None})
        host, port = _listening(host, port, owns_serve, token is not None or insecure)
        config = dataclasses.replace(config, serve=dataclasses.replace(config.serve, host=host, port=port))
        # the ingress runs on this machine, where --output-dir is (any node would do for HTTP and bookkeeping)
        here = {"num_cpus": 0, "resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}}
        app = ingress(config, output_dir=output_dir.expanduser().resolve(), model_name=model_name, token=token,
                      ray_actor_options=here, max_constructor_retry_count=1)
        deployed = True  # from here on the application is this command's, even if the deploy fails half-way
        try:
            ray_serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise RunFailed(f"the service did not start: {_deploy_error(e)}") from None
        n = config.parallel.replicas
        click.echo(f"odyssey: serving {model_name} on {_url(host, port)} ({n} replica{'s' if n != 1 else ''}); "
                   f"Ctrl-C stops", err=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            click.echo("odyssey: stopping", err=True)
    finally:
        _stop(owns_serve, owns_ray, deployed)


def _listening(host: str, port: int, owns_serve: bool, allowed_public: bool) -> tuple[str, int]:
    """Where Serve's proxies really listen. A Serve already running keeps the address it started with and ignores
    the one asked for (with a warning in its log only): refused here unless they agree, so what this command
    prints is where the API is. InputError."""
    from ..cli import InputError, RunFailed
    from .app import proxy_address

    real = proxy_address()
    if real is None:
        if not owns_serve:
            raise RunFailed("cannot read the HTTP address of the Ray Serve running on this cluster")
        real = (host, port)  # this command started it with these
    real_host, real_port = real
    if real_host is None:
        raise InputError("Ray Serve on this cluster runs without HTTP proxies; `serve shutdown` it first (then "
                         "this command starts Serve with --host/--port)")
    if real_host.strip("[]").lower() != host.strip("[]").lower() or real_port != port:
        raise InputError(f"Ray Serve on this cluster already listens on {_url(real_host, real_port)}, not "
                         f"{_url(host, port)} (a running Serve keeps its address): pass --host {real_host} --port "
                         f"{real_port}, or `serve shutdown` first")
    if not is_loopback(real_host) and not allowed_public:
        raise InputError(f"Ray Serve on this cluster listens on {real_host} without a token: give --token-file FILE "
                         f"(or --insecure to allow it)")
    return real_host, real_port


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop(owns_serve: bool, owns_ray: bool, deployed: bool) -> None:
    """Undo what this command did, and only that: its application (never one it found), the Serve it started,
    the Ray it started."""
    import ray
    from ray import serve as ray_serve

    try:
        if deployed:
            try:  # streams ended and model replicas stopped first: Serve's drain would wait for every open stream
                ray_serve.get_app_handle(APP_NAME).shutdown_service.remote().result(timeout_s=60)
            except Exception as e:  # noqa: BLE001 - a failed start, or already gone
                logging.getLogger(__name__).debug("shutdown_service: %s", e)
            if not owns_serve:
                ray_serve.delete(APP_NAME)
        if owns_serve:
            ray_serve.shutdown()
    finally:
        if owns_ray:
            ray.shutdown()
