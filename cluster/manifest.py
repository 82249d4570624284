"""manifest.jsonl: one JSON line per finished video, appended without ever following a link.

An output folder can be shared: whoever can write in it could replace manifest.jsonl with a symbolic link (or a hard
link) to ~/.bashrc, and the next line appended, holding a prompt like `$(curl ... | sh)`, would run at the next
login. So the file is opened with O_NOFOLLOW and must be a regular file with a single link.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from .prompts import UNPRINTABLE

__all__ = ["ManifestError", "append_manifest_line", "check_manifest", "manifest_line"]


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
