"""Typed config from YAML: frozen dataclasses built from nested dicts with strict keys and types.

Every error is a ConfigError (a ValueError) whose message starts with the dotted path of the offending key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import re
import stat
import reprlib
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

MAX_CONFIG_BYTES = 1024 * 1024
"""A config file larger than this is refused unread (the presets are under 1 KiB)."""

_MAX_YAML_DEPTH = 32


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


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 4, 4, 40, 40, 40


def _show(value: Any) -> str:
    """A value for an error message, bounded however big or deep it is (reprlib never walks the whole value).
    repr escapes control characters."""
    return _REPR.repr(value)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """value (as YAML gives it) checked against and converted to the annotation tp."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} settings, got {_show(value)}")
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        # YAML 1.1 reads a bare `off` / `on` as false / true: a choice spelled that way means the word.
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            return "on" if value else "off"
        if isinstance(value, bool) and "off" in typing.get_args(tp):
            raise ConfigError(f"{path}: expected one of {_type_name(tp)}, got {str(value).lower()} (YAML reads "
                              f"on / yes / true as a boolean: name one of the choices)")
        # bool is an int in Python: True must not match a Literal[1] or the reverse.
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return value
        raise ConfigError(f"{path}: expected one of {_type_name(tp)}, got {_show(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
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
            try:
                return float(value)
            except OverflowError:  # an int beyond 1.8e308
                raise ConfigError(f"{path}: expected float, got a number too large") from None
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {path}")
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a nested mapping: unknown keys and wrong types are errors naming their path;
    missing keys take the field's default. Validation errors from __post_init__ are prefixed with the path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        keys = [*path.split("."), str(unknown[0])] if path else [str(unknown[0])]
        raise unknown_key_error(keys, len(keys) - 1, cls, root=None if path else cls)
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


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _is_section(cls: type, name: str) -> bool:
    return dataclasses.is_dataclass(_hints(cls)[name])


def check_key(keys: Sequence[str], root: type) -> None:
    """ConfigError unless the dotted key (split) names a setting or a section of dataclass `root`: the message
    quotes the key as typed and says what is there instead (see unknown_key_error)."""
    cls = root
    for i, key in enumerate(keys):
        if cls is None:
            where = _show(".".join(keys[:i]))[1:-1]
            raise ConfigError(f"unknown config key {_show('.'.join(keys))} ({where!r} is a setting, not a section)")
        if key not in _fields(cls):
            raise unknown_key_error(keys, i, cls, root=root)
        cls = _hints(cls)[key] if _is_section(cls, key) else None


def check_keys(data: Mapping[str, Any], root: type) -> None:
    """check_key for every key of a nested mapping (a config file), in file order; values are not checked."""
    def walk(node: Mapping[str, Any], prefix: list[str], cls: type) -> None:
        for key, value in node.items():
            keys = [*prefix, str(key)]
            if str(key) not in _fields(cls):
                raise unknown_key_error(keys, len(prefix), cls, root=root)
            if _is_section(cls, str(key)) and isinstance(value, Mapping):
                walk(value, keys, _hints(cls)[str(key)])

    if isinstance(data, Mapping):
        walk(data, [], root)


def unknown_key_error(keys: Sequence[str], depth: int, cls: type, root: type | None = None) -> ConfigError:
    """The error for a key path whose keys[:depth] are fine and lead to dataclass `cls` (root when depth is 0),
    which has no field keys[depth]: 'unknown config key 'no.such.key' ('no' is not a section; sections: ...)', a
    section's settings listed, or 'did you mean ...?' for a near miss (difflib). With `root`, a setting's name is
    also looked for in every section ('steps' -> 'sampling.steps')."""
    typed = _show(".".join(str(k)[:60] for k in keys))  # a key can be anything a file holds: never echo much
    bad = _show(str(keys[depth])[:60])
    prefix = ".".join(keys[:depth])
    names = _fields(cls)
    guess = _near(list(keys[depth:]), cls)
    if guess is None and root is not None:
        guess = _near_anywhere(str(keys[-1]), root)
    elif guess is not None and prefix:
        guess = f"{prefix}.{guess}"
    if all(_is_section(cls, n) for n in names):
        what = f"{bad} is not a section"
        listing = f"sections: {', '.join(names)}"
    else:
        what = f"{prefix} has no setting {bad}"
        listing = f"{prefix} settings: {', '.join(names)}"
    if list(keys) == ["preset"] and root is not None:
        return ConfigError("unknown config key 'preset' (`preset: NAME` goes at the top of a config file; on the "
                           "command line name the preset with --config NAME)")
    return ConfigError(f"unknown config key {typed} ({what}; "
                       + (f"did you mean {guess!r}?)" if guess else f"{listing})"))


def _near(keys: list[str], cls: type) -> str | None:
    """keys (relative to cls) with each unknown part replaced by its closest field, when every part has one and
    the path ends where a value can go; else None."""
    out = []
    for i, key in enumerate(keys):
        if cls is None:
            return None
        names = _fields(cls)
        match = key if key in names else next(iter(difflib.get_close_matches(key, names, n=1, cutoff=0.6)), None)
        if match is None:
            return None
        out.append(match)
        cls = _hints(cls)[match] if _is_section(cls, match) else None
    return ".".join(out)


def _near_anywhere(leaf: str, root: type) -> str | None:
    """'section.setting' of root whose setting is named `leaf`, or closely (cutoff 0.75), or None."""
    paths = {}
    for section in _fields(root):
        if _is_section(root, section):
            for name in _fields(_hints(root)[section]):
                paths.setdefault(name, f"{section}.{name}")
    match = difflib.get_close_matches(leaf, list(paths), n=1, cutoff=0.75)
    return paths[match[0]] if match else None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases and with a nesting limit. An alias makes the composed tree a graph, and every deep
    copy or repr expands it: nine levels of nine aliases, 641 bytes, become 387 million nodes. No config needs
    an alias, so refusing them is simpler and safer than keeping them shared."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _YamlRefused("aliases (*name) are not allowed", self.peek_event().start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > _MAX_YAML_DEPTH:
                raise _YamlRefused(f"nested more than {_MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys: `pip: [a]` then `pip: [b]` would drop [a] without a word.
        first = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if seen is not key_node.start_mark:
                raise _YamlRefused(f"a key given twice (first on line {seen.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


# YAML 1.1's int and float, less base 60 (`1:30` is 90 there): its constructor is quadratic in the digits, so
# a 1 MiB `1:1:1...` took 94 s of CPU, and no setting is written that way. Floats also take YAML 1.2's `1e-3`
# (1.1 wants a dot and reads it as a string). Typed numbers are at most _MAX_NUMBER_CHARS long.
_MAX_NUMBER_CHARS = 100
_INT_RE = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT_RE = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_RE, list("-+0123456789"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _number_constructor(base):
    def construct(loader, node):
        value = loader.construct_scalar(node)
        if len(value) > _MAX_NUMBER_CHARS:
            raise _YamlRefused(f"a number of more than {_MAX_NUMBER_CHARS} characters", node.start_mark)
        if ":" in value:  # an explicit !!int / !!float tag still reaches 1.1's base-60 reader
            raise _YamlRefused("base-60 numbers (1:30) are not allowed", node.start_mark)
        return base(loader, node)

    return construct


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _number_constructor(yaml.SafeLoader.construct_yaml_int))
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _number_constructor(yaml.SafeLoader.construct_yaml_float))


class _YamlRefused(Exception):
    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


def _yaml_problem(e: Exception) -> str:
    """Where and what, never the offending text: a YAMLError's str() quotes the lines around the error, and a
    mistaken --config path (a credentials file) would be echoed. Quoted fragments of the problem are elided."""
    problem = re.sub(r"'[^']*'|\x22[^\x22]*\x22", "'...'", str(getattr(e, "problem", None) or "cannot parse"))
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def safe_yaml_load(text: str):
    """yaml.safe_load without aliases, deeper than 32 levels nesting, or error messages quoting the text.
    Raises ConfigError('not valid YAML (line L, column C: problem)')."""
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader refuses some characters (raw C1 controls) here already
        return loader.get_single_data()
    except (yaml.YAMLError, _YamlRefused) as e:
        raise ConfigError(f"not valid YAML ({_yaml_problem(e)})") from None
    except ValueError as e:  # a constructor's: an integer of more than 4300 digits
        raise ConfigError(f"not valid YAML ({e})") from None
    finally:
        if loader is not None:
            loader.dispose()


MAX_OVERRIDE_CHARS = 64 * 1024
"""Longest `--set` value: it is YAML, read like a config file; strings in it still meet limits.max_prompt_chars."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """'sampling.steps=20' -> (['sampling', 'steps'], 20); the value is read as YAML ('true', '1e-3', '[1, 2]')."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {_show(text)}: expected key.sub=value")
    if len(raw) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"{_show(key)[1:-1]}: the value is longer than {MAX_OVERRIDE_CHARS} characters")
    try:
        value = safe_yaml_load(raw) if raw.strip() else ""
    except ConfigError as e:
        raise ConfigError(f"{key}: cannot read the value: {e}") from None
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], cls: type | None = None) -> dict:
    """Nested dict with each 'a.b=value' applied. With `cls`, the key path is checked against its fields first,
    so a typo is reported as the override's own dotted path."""
    out = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        if cls is not None:
            check_key(keys, cls)
        node = out
        for i, key in enumerate(keys):
            if i == len(keys) - 1:
                node[key] = value
            else:
                child = node.setdefault(key, {})
                if child is None:  # an empty section in a file (`video:` with nothing under it)
                    child = node[key] = {}
                if not isinstance(child, dict):
                    raise ConfigError(f"{_show('.'.join(keys[: i + 1]))[1:-1]}: is a setting, not a section; "
                                      f"cannot set {_show('.'.join(keys))[1:-1]}")
                node = child
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


class NotRegularFile(OSError):
    """A path that names a FIFO, a device, a folder or a socket where a file is expected."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def open_regular(path: str | Path, *, follow_links: bool = True) -> int:
    """A read-only descriptor of `path`, which must be a regular file: NotRegularFile (an OSError whose strerror
    says what it is instead) for a FIFO, a device, a folder; ELOOP for a link without follow_links. Opened
    O_NONBLOCK: a plain open() of a FIFO waits for a writer, for ever (reads of a regular file never block)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(0, f"not a regular file ({_kind(mode)})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_yaml_file(path: str | Path, what: str = "config file"):
    """The YAML data of the file at path ("~" expanded), whatever it is: at most MAX_CONFIG_BYTES, a regular file,
    UTF-8, YAML without aliases or repeated keys. ConfigErrors name the file (as `what`) and the line, never its
    contents."""
    path = Path(path).expanduser()
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # bounded even for a growing file
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: a {what} may be at most {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        return safe_yaml_load(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_yaml(path: str | Path) -> dict:
    """A config file as a dict (read_yaml_file): a mapping of sections, {} when empty."""
    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{Path(path).expanduser()}: a config file must be a mapping of sections, got "
                          f"{type(data).__name__}")
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
