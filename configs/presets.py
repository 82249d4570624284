"""Named presets (YAML files shipped in configs/presets/) and the one function that turns a preset or a file plus
`key=value` overrides into a validated OdysseyConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .loader import ConfigError, apply_overrides, from_dict, read_yaml
from .schema import OdysseyConfig

PRESETS_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(list_presets()) or 'none'}")
    return path


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> OdysseyConfig:
    """source: a preset name, a path to a YAML file, or None for the built-in defaults. Overrides are
    'section.key=value' strings applied on top. Raises ConfigError (a ValueError) naming the offending key."""
    data: dict = {}
    if source is not None:
        text = str(source)
        looks_like_file = text.endswith((".yaml", ".yml")) or "/" in text or Path(text).is_file()
        data = read_yaml(Path(text) if looks_like_file else preset_path(text))
    return from_dict(OdysseyConfig, apply_overrides(data, overrides, OdysseyConfig))
