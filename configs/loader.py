"""Typed config from YAML: frozen dataclasses built from nested dicts with strict keys and types.

Every error is a ConfigError (a ValueError) whose message starts with the dotted path of the offending key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, failed validation, missing file."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """value (as YAML gives it) checked against and converted to the annotation tp."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        # bool is an int in Python: True must not match a Literal[1] or the reverse.
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return value
        raise ConfigError(f"{path}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {path}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a nested mapping: unknown keys and wrong types are errors naming their path;
    missing keys take the field's default. Validation errors from __post_init__ are prefixed with the path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = _join(path, str(unknown[0]))
        raise ConfigError(f"{key}: unknown config key (known here: {', '.join(fields)})")
    hints = _hints(cls)
    kwargs = {name: _coerce(value, hints[name], _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg: Any) -> Any:
    """A config as plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """'sampling.steps=20' -> (['sampling', 'steps'], 20); the value is read as YAML ('true', '1e-3', '[1, 2]')."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot read value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], cls: type | None = None) -> dict:
    """Nested dict with each 'a.b=value' applied. With `cls`, the key path is checked against its fields first,
    so a typo is reported as the override's own dotted path."""
    out = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node, node_cls = out, cls
        for i, key in enumerate(keys):
            dotted = ".".join(keys[: i + 1])
            if node_cls is not None:
                names = {f.name: f for f in dataclasses.fields(node_cls)}
                if key not in names:
                    raise ConfigError(f"{dotted}: unknown config key (known here: {', '.join(names)})")
                sub = _hints(node_cls)[key]
                node_cls = sub if dataclasses.is_dataclass(sub) else None
                if i < len(keys) - 1 and node_cls is None:
                    raise ConfigError(f"{dotted}: is a setting, not a section; cannot set {'.'.join(keys)}")
            if i == len(keys) - 1:
                node[key] = value
            else:
                child = node.setdefault(key, {})
                if not isinstance(child, dict):
                    raise ConfigError(f"{dotted}: is a setting, not a section; cannot set {'.'.join(keys)}")
                node = child
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string literal that follows it)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
