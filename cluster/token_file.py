"""The local Ray cluster's auth token, created private before Ray creates it readable by everyone.

ray.init() without an address turns token authentication on and, when there is no token, writes one to
~/.ray/auth_token with the process umask: 0644 in a 0755 folder on most machines. Anyone on the machine can then read
it, and it opens the local cluster, whose GCS listens on every interface (run code as this user). Writing the token
first, 0600 in a 0700 folder, leaves Ray nothing to create: it reads ours.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

__all__ = ["secure_default_token", "default_token_path"]

log = logging.getLogger(__name__)


def default_token_path() -> Path:
    """Where Ray looks when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set."""
    return Path.home() / ".ray" / "auth_token"


def secure_default_token() -> Path | None:
    """Before a local ray.init(): make sure the token Ray will use is private. Returns the token file checked or
    created, or None when Ray will not use a file (RAY_AUTH_MODE set to anything but token, RAY_AUTH_TOKEN set).

    Missing: ~/.ray is created 0700 and the token file 0600 (O_EXCL, O_NOFOLLOW), holding a fresh 256-bit token, the
    format Ray generates. Present and readable by group or others: one warning line; the file is not changed (it
    may be the token of a cluster other machines share)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if (mode is not None and mode.lower() != "token") or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    explicit = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(explicit).expanduser() if explicit else default_token_path()
    if not explicit:
        _private_folder(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            return path
    try:
        st = os.stat(path)
    except OSError:
        return path  # Ray reports a missing RAY_AUTH_TOKEN_PATH itself
    if st.st_mode & 0o077:
        log.warning("the Ray auth token %s is readable by other users (mode %o): anyone on this machine can use "
                    "the cluster as you; run chmod 600 %s", path, stat.S_IMODE(st.st_mode), path)
    return path


def _private_folder(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        return  # not ours to change: it may hold other Ray state; the file's own mode is what protects the token
    os.chmod(folder, 0o700)  # mkdir's mode goes through the umask; a umask can only have removed bits, but be exact
