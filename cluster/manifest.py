"""manifest.jsonl: one JSON line per finished video, appended without ever following a link.

An output folder can be shared: whoever can write in it could replace manifest.jsonl with a symbolic link (or a hard
link) to ~/.bashrc, and the next line appended, holding a prompt like `$(curl ... | sh)`, would run at the next
login. So the file is opened with O_NOFOLLOW and must be a regular file with a single link.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from pathlib import Path

from configs.loader import open_regular

from .prompts import UNPRINTABLE, printable

__all__ = ["ManifestError", "append_manifest_line", "check_manifest", "manifest_line", "read_records",
           "record_config", "request_changes"]


class ManifestError(ValueError):
    """A manifest path that must not be written: a link, not a regular file, outside its folder."""


def manifest_line(record: dict) -> str:
    """One line of JSON (UTF-8, readable non-ASCII) with every control character escaped, ending in a newline."""
    # JSON escapes C0 controls itself; with ensure_ascii=False it leaves DEL, C1 (CSI is 0x9b), the line separators
    # and the bidi controls raw: they move some terminals' cursors, split a log line or reorder how it reads.
    text = json.dumps(record, ensure_ascii=False)
    return UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def check_manifest(path: Path, inside: Path | None = None) -> None:
    """ManifestError unless `path` is absent or a regular, singly linked file (not a link), and, with `inside`, its
    folder is `inside`. Called before anything runs; append_manifest_line checks again as it opens."""
    path = Path(path)
    if inside is not None and path.parent.resolve() != Path(inside).resolve():
        raise ManifestError(f"the manifest {path} must be inside the output folder {inside}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ManifestError(f"cannot use the manifest {path}: {e.strerror or e}") from None
    _check_stat(path, st)


def _check_stat(path: Path, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise ManifestError(f"the manifest {path} is a symbolic link; refusing to write through it")
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"the manifest {path} is not a regular file; refusing to write to it")
    if st.st_nlink != 1:
        raise ManifestError(f"the manifest {path} has {st.st_nlink} hard links; refusing to write to it")


def append_manifest_line(path: Path, record: dict) -> None:
    """Append `record` as one line to the manifest at `path` (created 0644), refusing links and anything that is not
    a regular file. One write(2) with O_APPEND: lines from concurrent runs into one folder never interleave."""
    path = Path(path)
    data = manifest_line(record).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_NONBLOCK: a FIFO planted under the name fails at once (ENXIO) instead of blocking the batch.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ManifestError(f"the manifest {path} is a symbolic link; refusing to write through it") from None
        raise ManifestError(f"cannot open the manifest {path}: {e.strerror or e}") from None
    try:
        _check_stat(path, os.fstat(fd))
        written = os.write(fd, data)
        while written < len(data):  # a regular file takes it whole; a full disk is the exception
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)


# What a finished video was made from, as its manifest record holds it: the request's fields (the driver records
# dataclasses.asdict of the resolved GenerateRequest) and the settings outside the request that change the pixels.
# Not the layout (ulysses, ring, cfg, replicas, sharding: the same video up to rounding) nor runtime settings.
REQUEST_FIELDS = ("negative_prompt", "height", "width", "frames", "fps", "steps", "guidance_scale",
                  "low_noise_guidance_scale", "shift", "sampler", "cache", "cache_threshold")
CONFIG_FIELDS = (("model", "path"), ("model", "dtype"), ("parallel", "fp8_comm"))
BOUNDARY = "model.boundary_ratio"  # recorded as the run used it (record_config), compared as the next run would


def _boundary(config) -> float | None:
    """validate.model_boundary, or config's own value where the folder cannot say (broken since the checks ran:
    a finished video is never lost to its record)."""
    from .validate import model_boundary

    try:
        return model_boundary(config)
    except (ValueError, OSError):
        return config.model.boundary_ratio


def record_config(config) -> dict:
    """The config as a manifest record holds it: to_dict(config), with the boundary a two-expert model ran with
    (model.boundary_ratio, else its model_index.json's, else 0.875; null for one DiT) instead of a null."""
    from configs import to_dict

    record = to_dict(config)
    record["model"]["boundary_ratio"] = _boundary(config)
    return record


MAX_RECORD_BYTES = 1024 * 1024
"""A manifest line longer than this is skipped unread (a record is a few KiB: prompts are capped far below)."""


def _lines(f, limit: int = MAX_RECORD_BYTES):
    """Each line of the binary file f, or None for one longer than `limit`, which is read past in bounded chunks:
    a line of a gigabyte with no newline is never held whole."""
    while line := f.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while (rest := f.readline(64 * 1024)) and not rest.endswith(b"\n"):
            pass
        yield None


def read_records(path: Path) -> dict[str, dict]:
    """{output file name: what its latest record says it was made from} (see request_changes) from the manifest at
    `path`; {} when there is none. Read like it is written: never through a link, never blocking on a FIFO. Lines
    that are not JSON objects (one cut short by a full disk), nested too deep for the parser or longer than
    MAX_RECORD_BYTES say nothing: a video they were about has no record (kept, said so)."""
    path = Path(path)
    check_manifest(path)
    try:
        fd = open_regular(path, follow_links=False)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ManifestError(f"cannot read the manifest {path}: {e.strerror or e}") from None
    records = {}
    with os.fdopen(fd, "rb") as f:
        _check_stat(path, os.fstat(f.fileno()))
        for raw in _lines(f):
            if raw is None:
                continue
            try:
                record = json.loads(raw)
                name = Path(record["output"]).name
            except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: '[' * 200000
                continue
            request, config = record.get("request"), record.get("config")
            if not isinstance(request, dict) or not isinstance(config, dict):
                records[name] = {}  # a record that cannot say what made the video
                continue
            made = {"prompt": record.get("prompt"), "seed": request.get("seed")}
            made.update({k: request.get(k) for k in REQUEST_FIELDS if k in request})
            if "low_noise_guidance_scale" not in made and "guidance_scale" in made:
                # a record from before two-expert models: its requests resolved every step's guidance to this
                made["low_noise_guidance_scale"] = made["guidance_scale"]
            for section, key in CONFIG_FIELDS + (("model", "boundary_ratio"),):
                if isinstance(config.get(section), dict) and key in config[section]:
                    made[f"{section}.{key}"] = config[section][key]
            records[name] = made
    return records


def _same_path(a, b) -> bool:
    norm = (lambda p: p if p is None else os.path.realpath(os.path.expanduser(str(p))))
    return norm(a) == norm(b)


def request_changes(made: dict, request, config, *, seed_drawn: bool = False) -> list[str] | None:
    """What differs between a finished video's record (read_records) and `request` (resolved) under `config`, one
    short phrase each ('steps 20 -> 30', 'prompt'); [] when nothing does; None when the record cannot say (no
    record, or one without the request). seed_drawn: the new request's seed was drawn at random, so the recorded
    one (drawn too, or chosen) stands."""
    wanted = {"prompt": request.prompt, **{k: getattr(request, k) for k in REQUEST_FIELDS}}
    if not seed_drawn:
        wanted["seed"] = request.seed
    for section, key in CONFIG_FIELDS:
        wanted[f"{section}.{key}"] = getattr(getattr(config, section), key)
    if not made or any(k not in made for k in wanted):
        return None
    wanted[BOUNDARY] = _boundary(config)
    if made.get(BOUNDARY) is None and wanted[BOUNDARY] is not None:
        # a record from before boundaries were recorded (none, or the config's null): a one-DiT model's has nothing
        # to compare; a two-expert model's ran with the folder's own boundary, as a null asks for now
        made = {**made, BOUNDARY: _boundary(dataclasses.replace(
            config, model=dataclasses.replace(config.model, boundary_ratio=None)))}
    changes = []
    for key, value in wanted.items():
        was = made.get(key)  # only the boundary can be absent (a record from before it was recorded)
        if key == "model.path" and _same_path(was, value):
            continue
        if was == value and isinstance(was, bool) == isinstance(value, bool):  # JSON's 5 is 5.0; true is not 1
            continue
        if key == "prompt" or key == "negative_prompt":
            changes.append(key)  # can be 10,000 characters
        else:
            changes.append(f"{key} {printable(json.dumps(was), 200)} -> {printable(json.dumps(value), 200)}")
    return changes
