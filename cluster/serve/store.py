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
        try:  # the database must be ours: a link planted under its name would send our writes elsewhere
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"the job database {path} is not a regular file")
        except FileNotFoundError:
            pass
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        os.chmod(path, 0o600)  # prompts are the users' data
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
