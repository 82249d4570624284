"""The `odyssey` command line."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import click
import yaml

from configs import ConfigError, OdysseyConfig, field_docs, load_config, to_dict


def _version() -> str:
    try:
        return version("odyssey")
    except PackageNotFoundError:
        return "0+unknown"


class UsageError(click.UsageError):
    """Bad input: one line on stderr, exit 2."""


def _config_options(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override one setting, e.g. --set sampling.steps=20 (repeatable).")(fn)
    fn = click.option("--config", "config_source", metavar="NAME_OR_PATH",
                      help="Preset name or YAML file (default: built-in defaults).")(fn)
    return fn


def resolve_config(config_source, overrides) -> OdysseyConfig:
    try:
        return load_config(config_source, overrides)
    except ConfigError as e:
        raise UsageError(f"config: {e}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="odyssey")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def cli(ctx, debug):
    """Odyssey: text-to-video generation on Ray clusters."""
    ctx.obj = {"debug": debug}


@cli.group()
def config():
    """Inspect configs."""


@config.command("show")
@_config_options
@click.option("--explain", is_flag=True, help="Print each setting's description above it.")
def config_show(config_source, overrides, explain):
    """Print the resolved config as YAML."""
    cfg = resolve_config(config_source, overrides)
    if not explain:
        click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
        return
    for section_name, section in to_dict(cfg).items():
        click.echo(f"{section_name}:")
        docs = field_docs(type(getattr(cfg, section_name)))
        for key, value in section.items():
            for line in docs.get(key, "").splitlines():
                click.echo(f"  # {line}")
            click.echo("  " + yaml.safe_dump({key: value}, default_flow_style=True, width=10_000).strip()[1:-1])


def main(argv=None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="odyssey", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("odyssey: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        if debug:
            raise
        click.echo(f"odyssey: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one line, exit 1
        if debug:
            raise
        click.echo(f"odyssey: error: {type(e).__name__}: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
