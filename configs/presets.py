"""Named presets (YAML files shipped in configs/presets/) and the one function that turns a preset or a file plus
`key=value` overrides into a validated OdysseyConfig.

Layers, later ones win: the built-in defaults (the dataclasses'), the default preset (tiny, the embedded model) or
the preset a file names with a top-level `preset: NAME`, the file, then the overrides. A config file therefore
only says what differs from its base: `sampling: {steps: 8}` alone stays on the embedded model and its sizes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .loader import ConfigError, _show, apply_overrides, check_keys, from_dict, read_yaml
from .schema import OdysseyConfig

PRESETS_DIR = Path(__file__).parent / "presets"

DEFAULT_PRESET = "tiny"
"""The preset a config file starts from when it names none, and the CLI's config when given none: the embedded
model. It is the root preset: it starts from the built-in defaults."""

_MAX_PRESET_CHAIN = 8


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    if not isinstance(name, str):  # `preset:` left empty, a number, a list
        raise ConfigError(f"must be a preset name, got {'nothing' if name is None else _show(name)}; "
                          f"presets: {', '.join(list_presets()) or 'none'}")
    if name not in list_presets():  # never a path: '../x' must not reach a file
        near = difflib.get_close_matches(str(name).lower()[:100], list_presets(), n=1, cutoff=0.75)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"unknown preset {_show(name)}; {hint}presets: {', '.join(list_presets()) or 'none'}")
    return PRESETS_DIR / f"{name}.yaml"


def preset_description(name: str) -> str:
    """The first line of the comment that opens a preset's file (its one-line summary); '' when it has none."""
    for line in preset_path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            return ""
        text = line.lstrip("#").strip()
        if text:
            return text
    return ""


def _is_file(text: str) -> bool:
    if text.endswith((".yaml", ".yml")) or "/" in text or text.startswith("~"):
        return True
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a name too long for a file (ENAMETOOLONG), a NUL: a preset name, then
        return False


@dataclass(frozen=True)
class ConfigSource:
    """Where a resolved config came from: the preset chain it started from (base first; empty: the built-in
    defaults), the file applied on top (None for a preset by name), the overrides applied last, and whether the
    first preset is there by default (the file named none)."""

    presets: tuple[str, ...] = ()
    file: Path | None = None
    overrides: tuple[str, ...] = ()
    default_base: bool = False

    def describe(self) -> str:
        """One line: 'preset tiny (the default: the file names none), then my.yaml, then --set sampling.steps=20';
        a preset over others: 'preset cpu-smoke (over tiny)'."""
        if self.presets:
            named, *under = reversed(self.presets)
            parts = [f"preset {named}" + (f" (over {' over '.join(under)})" if under else "")
                     + (" (the default: the file names none)" if self.default_base else "")]
        else:
            parts = ["the built-in defaults"]
        if self.file is not None:
            parts.append(str(self.file))
        parts += [f"--set {o}" for o in self.overrides]
        return ", then ".join(parts)


def _preset_layers(name: str) -> tuple[dict, tuple[str, ...]]:
    """A preset's data merged over the presets it names (its `preset:` chain), and that chain, base first. A
    shipped preset that names none starts from the built-in defaults: a Wan preset never inherits a setting of the
    embedded model's (a user's config file, which is not a preset, starts from the default preset instead)."""
    chain: list[str] = []
    layers: list[dict] = []
    while True:
        if name in chain:
            raise ConfigError(f"presets name each other in a loop: {' -> '.join([*chain, name])}")
        if len(chain) >= _MAX_PRESET_CHAIN:
            raise ConfigError(f"preset {chain[0]}: more than {_MAX_PRESET_CHAIN} presets chained by `preset:`")
        chain.append(name)
        data = read_yaml(preset_path(name))
        base = _pop_preset(data, preset_path(name))
        layers.append(data)
        if base is None:  # a shipped preset that names no base is a root: the built-in defaults under it
            break
        name = base
    merged: dict = {}
    for data in reversed(layers):
        merged = _merge(merged, data)
    return merged, tuple(reversed(chain))


def _pop_preset(data: dict, path: Path) -> str | None:
    """The file's top-level `preset:` (removed from data), checked to name a shipped preset; None without one."""
    if "preset" not in data:
        return None
    name = data.pop("preset")
    try:
        preset_path(name)
    except ConfigError as e:
        raise ConfigError(f"{path}: preset: {e}") from None
    return name


def _merge(base: dict, top: dict) -> dict:
    """top over base, section by section: a section in top replaces only the settings it names. A section left
    empty in YAML (`video:` with nothing under it) sets nothing; any other non-mapping is kept for from_dict to
    refuse with its path."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in top.items():
        if value is None:
            out.setdefault(key, {})
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def resolve(source: str | Path | None = None, overrides: Sequence[str] = ()) -> tuple[OdysseyConfig, ConfigSource]:
    """load_config, and where the config came from (for `config show`)."""
    data: dict[str, Any] = {}
    origin = ConfigSource(overrides=tuple(overrides))
    if source is not None:
        text = str(source)
        if _is_file(text):
            path = Path(text).expanduser()
            top = read_yaml(path)
            named = _pop_preset(top, path)
            try:
                check_keys(top, OdysseyConfig)  # before merging: the file's own keys, named as it spells them
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
            base, chain = _preset_layers(named or DEFAULT_PRESET)
            data = _merge(base, top)
            origin = ConfigSource(chain, path, tuple(overrides), default_base=named is None)
        else:
            data, chain = _preset_layers(text)
            origin = ConfigSource(chain, None, tuple(overrides))
    return from_dict(OdysseyConfig, apply_overrides(data, overrides, OdysseyConfig)), origin


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> OdysseyConfig:
    """source: a preset name, a path to a YAML file ('~' expanded), or None for the built-in defaults. A file
    starts from the default preset (the embedded model's) or from the preset its top-level `preset: NAME` key
    names. Overrides are 'section.key=value' strings applied on top. Raises ConfigError (a ValueError) naming the
    offending key."""
    return resolve(source, overrides)[0]
