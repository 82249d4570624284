"""The driver's last check of a batch before any job goes to a worker.

The CLI resolves and checks every request as it reads them, but a Driver can be fed by other code (a server, a
notebook): every request is checked again here against the config's limits, so none can ask a worker for a 2 TB
latent or 10^8 steps, and a bad one fails the batch with one line before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from configs import OdysseyConfig

from .manifest import check_manifest

__all__ = ["check_batch"]


def check_batch(jobs: Sequence, config: OdysseyConfig, manifest: Path | None) -> None:
    """ValueError naming the first job whose request is unresolved or over config.limits, or a manifest path that
    must not be written (a link, not a regular file)."""
    for job in jobs:
        try:
            job.request.validate(config)
        except ValueError as e:
            raise ValueError(f"prompt {job.index}: {e}") from None
    if manifest is not None:
        check_manifest(manifest)
