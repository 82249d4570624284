"""The `odyssey` command line: thin over the config, the driver and Ray's job and cluster tools.

Exit codes: 0 done; 1 a runtime failure (a prompt that kept failing, a lost cluster); 2 bad usage, config or input;
130 interrupted. Errors are one line on stderr; --debug shows the traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import stat
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import click
import yaml

from configs import DEFAULT_PRESET, OdysseyConfig, field_docs, load_config, to_dict

from .serve.cli import RING_HELP, SHARD_WEIGHTS_HELP, ULYSSES_HELP  # that module imports nothing of this one


def _version() -> str:
    try:
        return version("odyssey")
    except PackageNotFoundError:
        return "0+unknown"


class InputError(click.ClickException):
    """Bad usage, config or input: exit 2."""

    exit_code = 2


class RunFailed(click.ClickException):
    """The work ran and failed: exit 1."""

    exit_code = 1


def _config_options(fn):
    @click.option("--config", "config_source", metavar="NAME_OR_PATH",
                  help=f"Preset name or YAML file (default: {DEFAULT_PRESET}, the embedded model).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a setting, e.g. --set sampling.steps=20 (repeatable).")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def parse_cache(text: str) -> tuple[str, float | None]:
    """--cache POLICY[:THRESHOLD] -> (policy, threshold or None for the policy's default); ValueError, one line."""
    from configs.schema import CACHE_POLICIES

    policy, sep, threshold = text.strip().partition(":")
    policy = policy.strip().lower()
    if not policy:
        raise ValueError(f"no policy given; choose one of {', '.join(CACHE_POLICIES)} (POLICY or POLICY:THRESHOLD)")
    if policy not in CACHE_POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose one of {', '.join(CACHE_POLICIES)} "
                         f"(POLICY or POLICY:THRESHOLD)")
    if not sep:
        return policy, None
    if policy == "off":
        raise ValueError("off takes no threshold")
    if not re.fullmatch(r"\s*[0-9.eE+-]+\s*", threshold):  # float() also takes '1_0', 'nan' and other digits
        raise ValueError(f"the threshold must be a number, got {threshold.strip()!r:.40}")
    try:
        value = float(threshold)
    except ValueError:
        raise ValueError(f"the threshold must be a number, got {threshold.strip()!r:.40}") from None
    if not 0 < value <= 1:
        raise ValueError(f"the threshold must be a number in (0, 1], got {threshold.strip():.40}")
    return policy, value


def _cache_option(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_cache(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def _run_options(fn):
    @_config_options
    @click.option("--cache", callback=_cache_option, metavar="POLICY[:THRESHOLD]",
                  help="Step caching: off, teacache, fbcache or easycache, optionally with its threshold "
                       "(fbcache:0.1); a shortcut for sampling.cache and sampling.cache_threshold.")
    @click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Seed of the initial noise (batch: seed + index).")
    @click.option("--negative-prompt", help="What guidance steers away from.")
    @click.option("--ulysses", type=click.IntRange(1), help=ULYSSES_HELP)
    @click.option("--ring", type=click.IntRange(1), help=RING_HELP)
    @click.option("--shard-weights", is_flag=True, help=SHARD_WEIGHTS_HELP)
    @click.option("--cfg-parallel", is_flag=True, help="Run the two guidance passes on two halves of the ranks.")
    @click.option("--replicas", type=click.IntRange(1), help="Model copies serving prompts at once.")
    @click.option("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster in-process).")
    @click.option("--progress", type=click.Choice(["auto", "bars", "lines", "none"]), default="auto", show_default=True,
                  help="Progress bars on a terminal, plain lines in logs.")
    @click.option("--strict-vocab", is_flag=True,
                  help="With the embedded model: refuse (exit 2) a prompt with words it does not know instead of "
                       "warning.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def _config_policy(config_source) -> str | None:
    """The step cache policy a config file or preset names (None when it cannot be read: loading it again with
    the flags reports why)."""
    try:
        return load_config(config_source or DEFAULT_PRESET).sampling.cache
    except ValueError:
        return None


def resolve_config(config_source, overrides, *, ulysses=None, ring=None, cfg_parallel=False, replicas=None,
                   negative_prompt=None, cache=None, shard_weights=False) -> OdysseyConfig:
    flags = list(overrides)
    if cache is not None:
        policy, threshold = cache
        # a threshold is on its policy's scale: a YAML's threshold for another policy must not carry over (its own
        # policy's does, as on a prompt line), but a --set sampling.cache_threshold beside --cache POLICY still
        # applies (hence before the user's overrides)
        if threshold is None and _config_policy(config_source) != policy:
            flags.insert(0, "sampling.cache_threshold=null")
        flags.append(f"sampling.cache={policy}")
        if threshold is not None:
            flags.append(f"sampling.cache_threshold={threshold!r}")
    if ulysses:
        flags.append(f"parallel.ulysses_degree={ulysses}")
    if ring:
        flags.append(f"parallel.ring_degree={ring}")
    if shard_weights:
        flags.append("parallel.shard_weights=true")
    if cfg_parallel:
        flags.append("parallel.cfg_degree=2")
    if replicas:
        flags.append(f"parallel.replicas={replicas}")
    try:
        config = load_config(config_source or DEFAULT_PRESET, flags)
        if negative_prompt is not None:  # free text: never through the YAML reader of --set
            config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling,
                                                                               negative_prompt=negative_prompt))
        return config
    except ValueError as e:
        raise InputError(f"config: {e}") from None


def _embedded_model_notes(items, config, strict_vocab: bool) -> None:
    """The embedded model's warnings (unknown words, sizes and lengths it was not trained on), one line each,
    before Ray starts; with --strict-vocab unknown words are an input error. Nothing for a Wan model."""
    from .validate import embedded_model_notes

    try:
        notes = embedded_model_notes(items, config, strict_vocab=strict_vocab)
    except ValueError as e:
        raise InputError(str(e)) from None
    for note in notes:
        click.echo(f"odyssey: warning: {_printable(note)}", err=True)


def _preset_of(config_source) -> str | None:
    """The preset --config starts from (a file's `preset:`, else the default), for the missing-weights hint; None
    when it cannot be read (resolve_config has read it by now, so it can)."""
    from configs.presets import resolve

    try:
        chain = resolve(config_source or DEFAULT_PRESET)[1].presets
    except ValueError:
        return None
    return chain[-1] if chain else None


def _run(config, jobs, address, manifest, progress, on_event=None, preset=None):
    from .driver import Driver
    from .prompts import printable

    ctx = click.get_current_context(silent=True)
    debug = bool(ctx and ctx.find_root().params.get("debug"))  # --debug: a local Ray's own lines too
    with Driver(config, address=address, manifest=manifest, progress=None if progress == "none" else progress,
                on_event=on_event, ray_logs=debug, preset=preset) as d:
        outcomes = d.run(jobs)
    failed = [o for o in outcomes if not o.ok]
    for o in outcomes:
        if o.ok:
            click.echo(printable(o.path))
    if failed:
        for o in failed:
            click.echo(f"odyssey: prompt {o.job.index} ({printable(o.job.name or o.job.request.prompt, 40)}) failed: "
                       f"{printable(o.error, 2000)}", err=True)
        raise RunFailed(f"{len(failed)} of {len(outcomes)} prompts failed")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(_version(), prog_name="odyssey")
@click.option("--debug", is_flag=True, help="Also print the traceback of an error (the exit code stays the same), "
              "and a local Ray's own start-up lines.")
def cli(debug):
    """Odyssey: text-to-video generation on Ray clusters."""


# -- generate / batch ---------------------------------------------------------------------------------------------


def _complete(path: Path) -> bool:
    """Whether a finished video is at `path`: a regular file (never a link, a folder or a FIFO planted under the
    name; a video is only ever renamed into place whole)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _unique(path: Path) -> Path:
    n, candidate = 2, path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


class PreviewFile:
    """`generate --preview FILE.png`: on_event(job, event) for the Driver that keeps FILE.png the latest Preview,
    replaced whole each time (written beside it under a hidden name, then renamed over it: a viewer never reads a
    half-written image, and a link at FILE.png is replaced, never written through). A write that fails warns once
    and never fails the video."""

    def __init__(self, path: Path):
        self.path = path
        self.written = 0
        self._warned = False

    def __call__(self, job, event) -> None:
        from pipeline.request import Preview

        if isinstance(event, Preview):
            try:
                self.write(event.image)
            except OSError as e:
                if not self._warned:
                    self._warned = True
                    click.echo(f"odyssey: warning: could not write the preview {self.path}: {e}", err=True)

    def write(self, image) -> None:
        import tempfile

        from .video import png_bytes

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(png_bytes(image))
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the image from a viewer run by someone else
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.written += 1


@cli.command()
@click.argument("prompt")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output MP4 (default: outputs/<prompt>.mp4).")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="Append a JSON line about the result to this file.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Keep FILE.png updated with a small live preview of the video while it denoises (every "
                   "sampling.preview_every steps; 5 when that is 0).")
@_run_options
def generate(prompt, output, manifest, preview, config_source, overrides, cache, seed, negative_prompt, ulysses,
             ring, shard_weights, cfg_parallel, replicas, address, progress, strict_vocab):
    """Generate one video from PROMPT."""
    from pipeline.request import GenerateRequest
    from pipeline.weights import hint_preset

    from .driver import Job
    from .manifest import check_manifest
    from .prompts import slugify
    from .submit import check_job_output
    from .validate import check_request_cache, check_request_model, check_request_size

    check_job_output(output or Path("outputs"), "-o")  # a Ray Job's relative paths land in Ray's cache
    if manifest is not None:
        check_job_output(manifest, "--manifest")
    if preview is not None:
        if preview.suffix.lower() != ".png":
            raise InputError(f"--preview must end in .png, got {preview}")
        if preview.is_dir():
            raise InputError(f"--preview {preview} is a folder")
        check_job_output(preview, "--preview")
    config = resolve_config(config_source, overrides, ulysses=ulysses, ring=ring, cfg_parallel=cfg_parallel,
                            replicas=replicas, negative_prompt=negative_prompt, cache=cache,
                            shard_weights=shard_weights)
    if preview is not None and config.sampling.preview_every == 0:
        config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, preview_every=5))
    if not prompt.strip():
        raise InputError("the prompt is empty")
    if output is None:
        output = _unique(Path("outputs") / f"{slugify(prompt)}.mp4")
    elif output.suffix.lower() != ".mp4":
        raise InputError(f"--output must end in .mp4, got {output}")
    try:
        request = GenerateRequest(prompt, seed=seed).resolve(config)
        with hint_preset(_preset_of(config_source)):  # a broken folder's download hint names the preset's model
            check_request_cache(request, config)  # the model's DiT read here: refused before Ray starts
            check_request_size(request, config)
            check_request_model(request, config)
        if manifest is not None:
            check_manifest(manifest)  # the user chose the path; still never through a link
    except ValueError as e:
        raise InputError(str(e)) from None
    _embedded_model_notes([("the prompt", request)], config, strict_vocab)
    _run(config, [Job(0, request, output, name=prompt)], address, manifest, progress,
         on_event=PreviewFile(preview) if preview is not None else None, preset=_preset_of(config_source))


@cli.command()
@click.argument("prompts_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs"),
              show_default=True, help="Folder for the MP4s and manifest.jsonl.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip prompts whose output is complete and was made with the same settings (its manifest.jsonl "
                   "record); regenerate those made with other settings.")
@_run_options
def batch(prompts_file, output_dir, resume, config_source, overrides, cache, seed, negative_prompt, ulysses,
          ring, shard_weights, cfg_parallel, replicas, address, progress, strict_vocab):
    """Generate a video per prompt of PROMPTS_FILE (.txt: a prompt per line; .jsonl: objects with 'prompt' and
    optional name, seed, negative_prompt and sampling/video settings)."""
    from pipeline.request import GenerateRequest
    from pipeline.weights import hint_preset

    from .driver import Job
    from .manifest import check_manifest, read_records, request_changes
    from .prompts import output_path, read_prompt_file
    from .submit import check_job_output
    from .validate import check_config, check_request_cache, check_request_model, check_request_size
    from .video import clean_stale_partials

    check_job_output(output_dir, "-o")  # a Ray Job's relative paths land in Ray's cache
    if output_dir.is_symlink():  # videos, manifest and the partials' cleanup would all happen where it points
        raise InputError(f"the output folder {output_dir} is a symbolic link; pass the folder it points to")
    config = resolve_config(config_source, overrides, ulysses=ulysses, ring=ring, cfg_parallel=cfg_parallel,
                            replicas=replicas, negative_prompt=negative_prompt, cache=cache,
                            shard_weights=shard_weights)
    try:
        check_config(config)  # even when every line sets its own cache: the Driver refuses such a config
    except ValueError as e:
        raise InputError(f"config: {e}") from None
    specs = read_prompt_file(prompts_file, config.limits)
    manifest = output_dir / "manifest.jsonl"
    check_manifest(manifest, inside=output_dir)
    records = read_records(manifest) if resume else {}  # what made each finished video: redo what changed
    jobs, skipped, unknown, redone, changes_seen = [], 0, 0, 0, {}
    for i, spec in enumerate(specs):  # every line is checked before anything runs
        path = output_path(output_dir, i, len(specs), spec)
        try:
            request = GenerateRequest(spec.prompt, seed=spec.seed if spec.seed is not None else
                                      (seed + i if seed is not None else None),
                                      negative_prompt=spec.negative_prompt, **spec.overrides).resolve(config)
            with hint_preset(_preset_of(config_source)):
                check_request_cache(request, config)
                check_request_size(request, config)
                check_request_model(request, config)
        except ValueError as e:
            raise InputError(f"{prompts_file}:{spec.line}: {e}") from None
        if resume and _complete(path):
            seed_drawn = spec.seed is None and seed is None and config.sampling.seed is None
            changes = request_changes(records.get(path.name, {}), request, config, seed_drawn=seed_drawn)
            if changes is None or not changes:
                skipped += 1
                unknown += changes is None
                continue
            redone += 1
            changes_seen.update(dict.fromkeys(changes))  # in order, each once
        jobs.append(Job(i, request, path, name=spec.name or spec.prompt))
    _embedded_model_notes([(f"{prompts_file}:{specs[job.index].line}", job.request) for job in jobs], config,
                          strict_vocab)
    if skipped:
        click.echo(f"odyssey: {skipped} of {len(specs)} outputs already complete in {_printable(output_dir)}, skipped",
                   err=True)
    if unknown:  # a video with no record (a deleted manifest, a file put there): its settings cannot be compared
        click.echo(f"odyssey: {unknown} of them have no record in {_printable(manifest)}, so they were kept without "
                   f"comparing their settings (--no-resume regenerates every output)", err=True)
    if redone:
        shown = list(changes_seen)[:4]
        more = f", and {len(changes_seen) - len(shown)} more" if len(changes_seen) > len(shown) else ""
        click.echo(f"odyssey: {redone} of {len(specs)} outputs in {_printable(output_dir)} were made with other "
                   f"settings ({'; '.join(shown)}{more}), regenerating them", err=True)
    if not jobs:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(output_dir)  # killed runs' only: another batch may be writing into this folder too
    _run(config, jobs, address, manifest, progress, preset=_preset_of(config_source))


# -- submit / cluster -----------------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--address", default=None,
              help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265). The auth token travels "
                   "with every request: reach a remote head through an SSH tunnel (`ray dashboard cluster.yaml`, "
                   "then http://127.0.0.1:8265) or https://, never plain http:// across a network.")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False),
              help="Folder uploaded as the job's working directory (e.g. with your prompt files).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help="Ray auth token file (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).")
@click.option("--pip", "pip", multiple=True, metavar="SPEC",
              help="A pip requirement Ray installs for the job on every node (repeatable), e.g. a wheel or "
                   "git+https:// URL of Odyssey when the nodes do not have it.")
@click.option("--runtime-env", "runtime_env_file", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Ray runtime_env for the job, YAML or JSON (working_dir, pip, env_vars, ...); --working-dir and "
                   "--pip add to it.")
@click.option("--no-wait", is_flag=True, help="Print the job id and return instead of streaming its logs.")
@click.argument("odyssey_args", nargs=-1, type=click.UNPROCESSED)
def submit(address, working_dir, token_file, pip, runtime_env_file, no_wait, odyssey_args):
    """Run `odyssey ODYSSEY_ARGS...` on a Ray cluster as a Ray Job: odyssey submit -- batch prompts.txt"""
    if not odyssey_args:
        raise InputError("nothing to submit: odyssey submit [OPTIONS] -- generate 'a prompt' ...")
    from .submit import enable_token_auth, job_runtime_env, submit_job

    enable_token_auth(token_file)  # before Ray is imported
    try:
        runtime_env = job_runtime_env(working_dir, pip, runtime_env_file)
    except ValueError as e:
        raise InputError(str(e)) from None
    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    debug = bool(click.get_current_context().find_root().params.get("debug"))
    code = submit_job(address, list(odyssey_args), runtime_env, wait=not no_wait, debug=debug)
    if code:
        sys.exit(code)


@cli.command("cluster")
@click.argument("action", type=click.Choice(["up", "down", "status"]))
@click.argument("cluster_yaml", type=click.Path(exists=True, dir_okay=False))
def cluster_cmd(action, cluster_yaml):
    """Start, stop or inspect a cluster from a Ray cluster-launcher YAML (see cluster/launch/). Run it from an
    Odyssey checkout: `up` copies that repository to every node (and on AWS pins the images per cluster)."""
    from .submit import cluster_command, validate_cluster_yaml

    try:
        validate_cluster_yaml(cluster_yaml)
    except ValueError as e:
        raise InputError(str(e)) from None
    code = cluster_command(action, cluster_yaml)
    if code:
        sys.exit(code)


# -- config ---------------------------------------------------------------------------------------------------------


@cli.group()
def config():
    """Inspect configs and presets."""


@config.command("show")
@_config_options
@click.option("--explain", is_flag=True, help="Print each setting's description above it.")
def config_show(config_source, overrides, explain):
    """Print the resolved config as YAML, after a comment line saying what it was resolved from (a config file
    starts from the default preset, or from the one its top-level `preset: NAME` names)."""
    from configs import resolve

    try:
        cfg, origin = resolve(config_source or DEFAULT_PRESET, overrides)
    except ValueError as e:
        raise InputError(f"config: {e}") from None
    click.echo(f"# resolved from {_printable(origin.describe())}")
    if not explain:
        text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True).rstrip()
        click.echo("\n".join(_printable(line) for line in text.split("\n")))  # YAML leaves C1, DEL, bidi raw
        return
    for section_name, section in to_dict(cfg).items():
        click.echo(f"{section_name}:")
        docs = field_docs(type(getattr(cfg, section_name)))
        for key, value in section.items():
            for line in docs.get(key, "").splitlines():
                click.echo(f"  # {line}")
            click.echo(f"  {key}: {_printable(json.dumps(value, ensure_ascii=False))}")


@config.command("presets")
def config_presets():
    """List the shipped presets, one a line with what it is for; the default is marked."""
    from configs import list_presets, preset_description

    names = [f"{n} (default)" if n == DEFAULT_PRESET else n for n in list_presets()]
    width = max(map(len, names), default=0)
    for name, label in zip(list_presets(), names):
        click.echo(f"{label:<{width}}  {preset_description(name)}".rstrip())


# -- serve ----------------------------------------------------------------------------------------------------------

from .serve.cli import serve  # noqa: E402 - the command's module imports neither Ray nor FastAPI until it runs

cli.add_command(serve)


class _UserPath(click.Path):
    """click.Path with a leading ~ expanded: the shell leaves it in --output=~/a.mp4 and in a quoted "~/a.mp4"."""

    def convert(self, value, param, ctx):
        return super().convert(os.path.expanduser(value) if isinstance(value, str) else value, param, ctx)


def _expand_user_paths(group: click.Group) -> None:
    """Every path option and argument of every command takes ~ (their click.Path types become _UserPath)."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _expand_user_paths(command)
        for param in command.params:
            if type(param.type) is click.Path:
                expanded = _UserPath.__new__(_UserPath)
                expanded.__dict__.update(vars(param.type))
                param.type = expanded


_expand_user_paths(cli)


# -- entry point ----------------------------------------------------------------------------------------------------


def _printable(text) -> str:
    """Error lines may quote prompts, names and paths: never raw control characters (terminal escapes, forged
    log lines), never more than a few lines' worth."""
    from .prompts import printable

    return printable(text, 2000)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    # only odyssey's own --debug, before the command, counts: after it, it is the command's (unknown) option or
    # the value of one (a prompt), and the traceback of its usage error is no help
    command_at = next((i for i, a in enumerate(args) if a == "--" or not a.startswith("-")), len(args))
    debug = "--debug" in args[:command_at]
    # SIGTERM unwinds like Ctrl-C: partial files removed, actors and placement groups released, local Ray stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cli.main(args=args, prog_name="odyssey", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("odyssey: interrupted", err=True)
        sys.exit(130)
    except click.NoSuchOption as e:
        if e.option_name == "--debug" and e.ctx is not None and e.ctx.parent is not None:
            command = e.ctx.command_path.split(" ", 1)[1]
            _fail(f"put --debug before the command: odyssey --debug {command} ...", e.exit_code, False)
        _fail(e.format_message(), e.exit_code, debug)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code, debug)
    except ValueError as e:  # config, input, weights and placement problems
        _fail(str(e), 2, debug)
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one line, exit 1
        _fail(f"{type(e).__name__}: {e}", 1, debug)


def _fail(message: str, code: int, debug: bool):
    """The error's one line and its exit code; --debug prints the traceback above it and changes nothing else (a
    config error is exit 2 with or without it)."""
    if debug:
        import traceback

        error, seen = sys.exc_info()[1], set()
        while error is not None and id(error) not in seen:  # what one-line errors hid with `from None` shows here
            seen.add(id(error))
            error.__suppress_context__ = False
            error = error.__cause__ or error.__context__
        traceback.print_exc()
    click.echo(f"odyssey: error: {_printable(message)}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
