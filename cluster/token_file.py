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
    may be the token of a cluster other machines share). At the default path, a symbolic link (Ray would write
    through it), anything but a regular file, or a file another user owns: ValueError (one line, exit 2 from the
    CLI); a ~/.ray another user owns or can write in: a warning."""
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
    if explicit:  # the user named it: follow a link if that is what they set
        try:
            st = os.stat(path)
        except OSError:
            return path  # Ray reports a missing RAY_AUTH_TOKEN_PATH itself
    else:
        st = os.lstat(path)
        # Ray would write its token through a (dangling) link, with the umask's mode, wherever it points; and a
        # token someone else owns is one they can read or swap.
        if stat.S_ISLNK(st.st_mode):
            raise ValueError(f"the Ray auth token {path} is a symbolic link; refusing to use it (remove it, or set "
                             f"RAY_AUTH_TOKEN_PATH to the file)")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"the Ray auth token {path} is not a regular file; refusing to use it")
        if st.st_uid != os.geteuid():
            raise ValueError(f"the Ray auth token {path} is owned by another user (uid {st.st_uid}); refusing "
                             f"to use it")
    if st.st_mode & 0o077:
        log.warning("the Ray auth token %s is readable by other users (mode %o): anyone on this machine can use "
                    "the cluster as you; run chmod 600 %s", path, stat.S_IMODE(st.st_mode), path)
    return path


def _private_folder(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        # Not ours to change: it may hold other Ray state; the file's own checks protect the token. But whoever
        # owns or can write in the folder can swap the token file: say so.
        try:
            st = os.stat(folder)
        except OSError:
            return
        if st.st_uid != os.geteuid():
            log.warning("%s is owned by another user (uid %d), who can replace the Ray auth token in it",
                        folder, st.st_uid)
        elif st.st_mode & 0o022:
            log.warning("%s is writable by other users (mode %o), who can replace the Ray auth token in it; run "
                        "chmod 700 %s", folder, stat.S_IMODE(st.st_mode), folder)
        return
    os.chmod(folder, 0o700)  # mkdir's mode goes through the umask; a umask can only have removed bits, but be exact
