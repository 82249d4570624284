"""MP4 files written as frames arrive: H.264 yuv420p under a temporary name, renamed only when complete, so an
interrupted or failed video never leaves a file that looks finished.

Partial files belong to the run (process) that writes them: `.<stem>.<run id>.<nonce>.partial.mp4`, next to a lock
file `.odyssey-run-<run id>.lock` the run holds (flock) while any of its partials exist. Several runs can share an
output folder: clean_stale_partials removes only the partials of runs whose lock nobody holds (killed runs).

ffmpeg is started with its own session (start_new_session), not with imageio-ffmpeg's preexec_fn=os.setpgrp: a
preexec_fn makes Python fork() and run Python code in the child of a process with many threads (Ray's, torch's,
the service's), where library fork handlers run too; a driver that had run a few Ray jobs got a SIGSEGV in that child
and every later video failed with a broken pipe. A new session keeps the terminal's Ctrl-C from ffmpeg the same way,
and lets Python use vfork with nothing of ours in the child.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import subprocess
import tempfile
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
        frame = np.ascontiguousarray(frame)
        if self._writer is None:
            h, w = frame.shape[:2]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._locked is None:  # before the partial exists, so no other run ever sees it unowned
                _LOCKS.acquire(self.path.parent)
                self._locked = self.path.parent
            self._size = (h, w)
            self._writer = _Ffmpeg(self.tmp, w, h, self.fps, self.crf)
        if frame.shape != (*self._size, 3) or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.shape} {frame.dtype} is not {self._size[0]}x{self._size[1]}x3 uint8")
        self._writer.write(frame)
        self.frames += 1

    def commit(self) -> Path:
        """Finish the file and give it its final name."""
        if self._writer is None:
            raise RuntimeError(f"no frames were written for {self.path}")
        writer, self._writer = self._writer, None
        writer.finish(check=True)
        os.replace(self.tmp, self.path)
        self._unlock()
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.finish(check=False, kill=True)
        self.tmp.unlink(missing_ok=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._locked is not None:
            _LOCKS.release(self._locked)
            self._locked = None


class _Ffmpeg:
    """One ffmpeg encoding raw RGB frames from its stdin into an H.264 MP4."""

    def __init__(self, path: Path, w: int, h: int, fps: int, crf: int):
        import imageio_ffmpeg

        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-v", "error",
               "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{w}x{h}", "-pix_fmt", "rgb24", "-r", str(fps),
               "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf),
               "-movflags", "+faststart", str(path)]
        self.stderr = tempfile.TemporaryFile()  # not a pipe: nobody reads it while frames go in, so it never fills
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                         start_new_session=True, close_fds=True)
        except BaseException:
            self.stderr.close()
            raise

    def write(self, frame: np.ndarray) -> None:
        try:
            self.proc.stdin.write(frame.tobytes())
        except OSError as e:  # ffmpeg is gone: say what it said
            raise OSError(f"ffmpeg stopped taking frames ({e}): {self.finish(check=False)}") from None

    def finish(self, *, check: bool, kill: bool = False) -> str:
        """Close its input and wait for it; what it printed. check: OSError unless it exited 0."""
        if kill:
            self.proc.kill()
        try:
            self.proc.stdin.close()
        except OSError:  # a broken pipe on the last flush: the exit status says the rest
            pass
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.stderr.seek(0)
        said = self.stderr.read().decode(errors="replace").strip()[-2000:]
        self.stderr.close()
        if check and code != 0:
            raise OSError(f"ffmpeg exited with {code} writing the video: {said or '(it said nothing)'}")
        return said or f"exit status {code}"


def png_bytes(image: np.ndarray) -> bytes:
    """One RGB image [H, W, 3] uint8 as PNG (live previews: the service's and `generate --preview`'s)."""
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", image, extension=".png")


def read_mp4(path: Path) -> tuple[np.ndarray, float]:
    """(frames [N, H, W, 3] uint8, fps) decoded back from an MP4."""
    import imageio_ffmpeg

    # imageio-ffmpeg's preexec_fn off (see the module's docstring): a decode needs no shelter from Ctrl-C
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames), meta["fps"]
