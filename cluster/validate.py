"""The driver's last check of a batch before any job goes to a worker.

The CLI resolves and checks every request as it reads them, but a Driver can be fed by other code (a server, a
notebook): every request is checked again here against the config's limits, so none can ask a worker for a 2 TB
latent or 10^8 steps, and a bad one fails the batch with one line before anything runs.

A step cache the model cannot use (teacache on a DiT TeaCache has no coefficients for) is refused here too, from the
DiT config read on the driver (config.json and safetensors headers, never a weight): the ranks would refuse it
anyway, but only after the cluster had placed and loaded every replica.

Sharded weights (parallel.shard_weights, model.shard_text_encoder) on a torch without FSDP2's pieces are refused
here too, on the driver, before any actor starts, for the driver's torch. Ray does not make the workers' torch the
same as the driver's (each node has its own environment unless a runtime_env pins one): each worker's Runner checks
its own torch again before loading and refuses with the same message, naming its node.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from configs import OdysseyConfig
from pipeline.dit import WanDiTConfig
from pipeline.sharding import fsdp_unavailable
from pipeline.step_cache import check_cache

from .manifest import check_manifest

__all__ = ["check_batch", "check_config", "check_config_cache", "check_config_sharding", "check_request_cache",
           "model_dit_config"]


def check_batch(jobs: Sequence, config: OdysseyConfig, manifest: Path | None) -> None:
    """ValueError naming the first job whose request is unresolved, over config.limits or asks for a step cache
    the model cannot use, or a manifest path that must not be written (a link, not a regular file)."""
    for job in jobs:
        try:
            job.request.validate(config)
            check_request_cache(job.request, config)
        except ValueError as e:
            raise ValueError(f"prompt {job.index}: {e}") from None
    if manifest is not None:
        check_manifest(manifest)


def model_dit_config(config: OdysseyConfig) -> WanDiTConfig | None:
    """The DiT config of config.model.path, read without loading a weight: the embedded model's for null, the
    folder's config.json and safetensors headers where the folder exists on this machine; None where it does not
    (the weights live on the cluster's nodes: the ranks check there). A broken folder is a ValueError."""
    path = config.model.path
    if path is None:
        return _embedded_dit_config()
    folder = Path(path).expanduser()
    if not folder.exists():
        return None
    return _folder_dit_config(folder.resolve())


@functools.lru_cache(maxsize=1)
def _embedded_dit_config() -> WanDiTConfig:
    from safetensors import safe_open

    from pipeline.tiny import WEIGHTS
    from pipeline.tiny.model import TinySpec

    with safe_open(str(WEIGHTS), framework="pt") as f:
        return TinySpec.from_json(f.metadata()["spec"]).dit_config()


@functools.lru_cache(maxsize=4)  # once per folder: a batch checks every line, and 14B's headers span six files
def _folder_dit_config(folder: Path) -> WanDiTConfig:
    from pipeline.weights import read_dit_headers

    return read_dit_headers(folder)[1]


def check_config_cache(config: OdysseyConfig) -> None:
    """ValueError (one line) when config.sampling's step cache cannot run on the configured model."""
    s = config.sampling
    if s.cache != "off":
        try:
            check_cache(s.cache, s.cache_threshold, s.steps, model_dit_config(config))
        except ValueError as e:
            raise ValueError(f"sampling.cache: {e}") from None


def check_config_sharding(config: OdysseyConfig) -> None:
    """ValueError (one line) when the config shards weights but this torch cannot (pipeline.sharding says why)."""
    if not (config.parallel.shard_weights or config.model.shard_text_encoder):
        return
    reason = fsdp_unavailable()
    if reason is not None:
        key = "parallel.shard_weights" if config.parallel.shard_weights else "model.shard_text_encoder"
        raise ValueError(f"{key}: {reason.replace(': parallel.shard_weights needs', ': needs')}")  # the key once


def check_config(config: OdysseyConfig) -> None:
    """Every check of the config alone that needs the model's headers or this torch (the step cache, sharding):
    what the driver runs before it starts anything."""
    check_config_cache(config)
    check_config_sharding(config)


def check_request_cache(request, config: OdysseyConfig) -> None:
    """ValueError (one line) when a resolved request's step cache cannot run on the configured model."""
    if request.cache not in (None, "off"):
        check_cache(request.cache, request.cache_threshold, request.steps, model_dit_config(config))
