"""The service's job records in SQLite, in the output folder: what a restart needs to resume (queued and interrupted
jobs) and to keep serving finished ones. One row per video: its id, when it was made, and its record as JSON."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
from pathlib import Path

__all__ = ["JobStore"]


class JobStore:
    """Thread-safe (one connection behind a lock); every write is its own committed transaction, so a killed service
    loses at most the progress of running jobs, never a record."""

    def __init__(self, path: Path):
        path = Path(path)
        # The database must be ours: a link planted under its name (or its -wal/-shm) would send our writes
        # elsewhere. Open (or create, 0600: prompts are the users' data) without following links, check what we
        # opened, and keep the descriptor open while SQLite opens the same name.
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if name.is_symlink():
                raise ValueError(f"{name} is a symbolic link; refusing to use it as the job database")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise ValueError(f"the job database {path} is not a regular, singly linked file")
            os.fchmod(fd, 0o600)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        finally:
            os.close(fd)
        self.path = path
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS videos (id TEXT PRIMARY KEY, created_at REAL NOT NULL, "
                         "record TEXT NOT NULL)")

    def put(self, video_id: str, created_at: float, record: dict) -> None:
        text = json.dumps(record)
        with self._lock:
            self._db.execute("INSERT INTO videos (id, created_at, record) VALUES (?, ?, ?) ON CONFLICT(id) DO "
                             "UPDATE SET record = excluded.record", (video_id, created_at, text))

    def delete(self, video_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM videos WHERE id = ?", (video_id,))

    def load(self) -> list[dict]:
        """Every record, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT record FROM videos ORDER BY created_at, id").fetchall()
        return [json.loads(text) for (text,) in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
