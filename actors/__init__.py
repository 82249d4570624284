"""Ray actor shells that host one per-rank Runner each."""

from .worker import SPWorker, WorkerInfo

__all__ = ["SPWorker", "WorkerInfo"]
