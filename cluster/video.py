"""MP4 files written as frames arrive: H.264 yuv420p under a temporary name, renamed only when complete, so an
interrupted or failed video never leaves a file that looks finished.

Partial files belong to the run (process) that writes them: `.<stem>.<run id>.<nonce>.partial.mp4`, next to a lock
file `.odyssey-run-<run id>.lock` the run holds (flock) while any of its partials exist. Several runs can share an
output folder: clean_stale_partials removes only the partials of runs whose lock nobody holds (killed runs).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import threading
import time
import uuid
from pathlib import Path

import numpy as np

__all__ = ["StreamingMP4", "png_bytes", "read_mp4", "clean_stale_partials", "PARTIAL_SUFFIX", "RUN_ID"]

PARTIAL_SUFFIX = ".partial.mp4"
RUN_ID = uuid.uuid4().hex[:12]
"""This process's run id, in its partial files' and its lock file's names."""

_RUN_ID_RE = re.compile(r"[0-9a-f]{12}")
_LOCK_RE = re.compile(r"\.odyssey-run-([0-9a-f]{12})\.lock")


def _lock_path(folder: Path, run_id: str) -> Path:
    return folder / f".odyssey-run-{run_id}.lock"


class _RunLocks:
    """This run's lock file per output folder, held while the run has partial files there (counted)."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._held: dict[Path, list] = {}  # folder -> [fd, count]

    def acquire(self, folder: Path) -> None:
        folder = folder.resolve()  # one lock per folder however it is spelled: a second flock would deadlock
        with self._mutex:
            held = self._held.get(folder)
            if held is not None:
                held[1] += 1
                return
            self._held[folder] = [_lock_new(_lock_path(folder, RUN_ID)), 1]

    def release(self, folder: Path) -> None:
        folder = folder.resolve()
        with self._mutex:
            held = self._held[folder]
            held[1] -= 1
            if held[1] == 0:
                del self._held[folder]
                _lock_path(folder, RUN_ID).unlink(missing_ok=True)  # before unlocking: no window where it looks dead
                os.close(held[0])


_LOCKS = _RunLocks()

_LOCK_WAIT_S = 30.0


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _lock_new(path: Path) -> int:
    """An fd holding flock on the file now named `path`. Between our open(O_CREAT) and our flock another run's
    cleanup can take the still unlocked file for a dead run's and unlink it (it does so under its own flock): we
    would then hold a lock nobody can see and the next batch would delete our partials. So, the usual lock-file
    loop: once locked, the name must still be our file; else start again. The other side only ever holds the lock
    for an instant (and a file of someone else's under our name is given up after _LOCK_WAIT_S)."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"the run lock {path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                locked = False
            else:
                try:
                    locked = _same_file(os.stat(path, follow_symlinks=False), os.fstat(fd))
                except FileNotFoundError:
                    locked = False
            if locked:
                return fd
            if time.monotonic() > deadline:
                raise OSError(f"cannot lock the run lock {path}: another process holds it")
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        time.sleep(0.005)


def _run_alive(folder: Path, run_id: str) -> bool:
    """Whether run `run_id` still holds its lock in `folder`; a dead run's lock file is removed. Anything that is
    not a regular file under the lock's name (a FIFO would block a plain open for ever), or that cannot be opened,
    counts as alive: we cannot tell, so its partials are left alone."""
    path = _lock_path(folder, run_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by a live run
            return True
        try:  # remove the dead run's lock (still under our flock), unless the name now belongs to a new file
            if _same_file(os.stat(path, follow_symlinks=False), os.fstat(fd)):
                path.unlink()
        except OSError:
            pass
        return False
    finally:
        os.close(fd)


def clean_stale_partials(folder: Path) -> list[Path]:
    """Remove the partial files of runs that are gone (killed before they could clean up) and their lock files;
    partials of live runs, this one included, are left alone. Returns the files removed. Whatever cannot be
    removed or judged (a folder or FIFO under such a name, a file we may not delete) is skipped: anyone who can
    write in the folder could plant one, and it must not stop the batch."""
    folder = Path(folder)
    removed, alive = [], {RUN_ID: True}
    for partial in sorted(folder.glob(f".*{PARTIAL_SUFFIX}")):
        parts = partial.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 2)
        run_id = parts[1] if len(parts) == 3 and _RUN_ID_RE.fullmatch(parts[1]) else None
        try:
            if run_id is not None:
                if run_id not in alive:
                    alive[run_id] = _run_alive(folder, run_id)
                if alive[run_id]:
                    continue
            mode = os.lstat(partial).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                continue
            partial.unlink()  # a dead run's, or not named by any run (an older Odyssey's)
        except OSError:
            continue
        removed.append(partial)
    for lock in folder.glob(".odyssey-run-*.lock"):  # dead runs that left no partials
        m = _LOCK_RE.fullmatch(lock.name)
        if m and m.group(1) not in alive:
            _run_alive(folder, m.group(1))
    return removed


class StreamingMP4:
    def __init__(self, path: Path, fps: int, crf: int = 18):
        self.path, self.fps, self.crf = Path(path), fps, crf
        self.tmp = self.path.with_name(f".{self.path.stem}.{RUN_ID}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        self._writer = None
        self._locked: Path | None = None  # the folder whose run lock this file holds
        self.frames = 0

    def append(self, frame: np.ndarray) -> None:
        """One RGB frame [H, W, 3] uint8 (H and W even)."""
        if self._writer is None:
            import imageio_ffmpeg

            h, w = frame.shape[:2]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._locked is None:  # before the partial exists, so no other run ever sees it unowned
                _LOCKS.acquire(self.path.parent)
                self._locked = self.path.parent
            self._writer = imageio_ffmpeg.write_frames(
                str(self.tmp), (w, h), fps=self.fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
                macro_block_size=2, quality=None, ffmpeg_log_level="error",
                output_params=["-crf", str(self.crf), "-movflags", "+faststart"],
            )
            self._writer.send(None)
        self._writer.send(np.ascontiguousarray(frame))
        self.frames += 1

    def commit(self) -> Path:
        """Finish the file and give it its final name."""
        if self._writer is None:
            raise RuntimeError(f"no frames were written for {self.path}")
        self._writer.close()
        self._writer = None
        os.replace(self.tmp, self.path)
        self._unlock()
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - ffmpeg may already be gone
                pass
            self._writer = None
        self.tmp.unlink(missing_ok=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._locked is not None:
            _LOCKS.release(self._locked)
            self._locked = None


def png_bytes(image: np.ndarray) -> bytes:
    """One RGB image [H, W, 3] uint8 as PNG (live previews: the service's and `generate --preview`'s)."""
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", image, extension=".png")


def read_mp4(path: Path) -> tuple[np.ndarray, float]:
    """(frames [N, H, W, 3] uint8, fps) decoded back from an MP4."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames), meta["fps"]
