"""The driver's last check of a batch before any job goes to a worker.

The CLI resolves and checks every request as it reads them, but a Driver can be fed by other code (a server, a
notebook): every request is checked again here against the config's limits, so none can ask a worker for a 2 TB
latent or 10^8 steps, and a bad one fails the batch with one line before anything runs.

A step cache the model cannot use (teacache on a DiT TeaCache has no coefficients for) is refused here too, from the
DiT config read on the driver (config.json and safetensors headers, never a weight): the ranks would refuse it
anyway, but only after the cluster had placed and loaded every replica.

The embedded model (model.path null) draws only what it was trained on: a frame size it cannot draw is refused
here; words it does not know and lengths or sizes it draws less reliably are one warning line each (the CLI
prints them before Ray starts, or refuses unknown words with --strict-vocab; a Driver fed by other code logs them).
Real Wan models are never checked for either.

Sharded weights (parallel.shard_weights, model.shard_text_encoder) on a torch without FSDP2's pieces are refused
here too, on the driver, before any actor starts, for the driver's torch. Ray does not make the workers' torch the
same as the driver's (each node has its own environment unless a runtime_env pins one): each worker's Runner checks
its own torch again before loading and refuses with the same message, naming its node.
"""

from __future__ import annotations

import functools
import logging
import weakref
from pathlib import Path
from typing import Sequence

from configs import OdysseyConfig
from pipeline.dit import WanDiTConfig
from pipeline.sharding import fsdp_unavailable
from pipeline.memory import vae_spec
from pipeline.step_cache import check_cache

from .manifest import check_manifest

__all__ = ["check_batch", "check_config", "check_config_cache", "check_config_model", "check_config_sharding",
           "check_request_cache", "check_request_model", "check_request_size", "embedded_model_notes", "model_boundary",
           "model_dit_config", "model_experts"]

log = logging.getLogger(__name__)


def check_batch(jobs: Sequence, config: OdysseyConfig, manifest: Path | None) -> None:
    """ValueError naming the first job whose request is unresolved, over config.limits or asks for a step cache
    the model cannot use, or a manifest path that must not be written (a link, not a regular file)."""
    for job in jobs:
        try:
            job.request.validate(config)
            check_request_cache(job.request, config)
            check_request_size(job.request, config)
            check_request_model(job.request, config)
        except ValueError as e:
            raise ValueError(f"prompt {job.index}: {e}") from None
    if manifest is not None:
        check_manifest(manifest)
    for note in embedded_model_notes([(f"prompt {job.index}", job.request) for job in jobs
                                      if job.request not in _noted], config):
        log.warning("%s", note)


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


def model_experts(config: OdysseyConfig) -> int | None:
    """The DiTs of config.model.path (2 for a two-expert model, Wan2.2 T2V-A14B), read from its layout; 1 for the
    embedded model; None where the folder is not on this machine."""
    path = config.model.path
    if path is None:
        return 1
    folder = Path(path).expanduser()
    if not folder.exists():
        return None
    return len(_folder_dits(folder.resolve()))


@functools.lru_cache(maxsize=4)  # once per folder: a batch checks every line, and 14B's headers span six files
def _folder_dits(folder: Path) -> tuple[WanDiTConfig, ...]:
    """Each DiT's config (high-noise expert first), from config.json and the safetensors headers; a two-expert
    folder whose experts differ is a ValueError naming the first differences."""
    from pipeline.weights import read_dit_configs

    return tuple(read_dit_configs(folder)[1])


def _folder_dit_config(folder: Path) -> WanDiTConfig:
    return _folder_dits(folder)[0]


def check_config_cache(config: OdysseyConfig) -> None:
    """ValueError (one line) when config.sampling's step cache cannot run on the configured model."""
    s = config.sampling
    if s.cache != "off":
        try:
            check_cache(s.cache, s.cache_threshold, s.steps, model_dit_config(config),
                        experts=model_experts(config) or 1)
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


def check_config_model(config: OdysseyConfig) -> None:
    """ValueError (one line, load_components' own) when the model the config names cannot load, read from headers
    where the folder is on this machine (else the ranks refuse it, after Ray and placement): model.boundary_ratio set
    on a model of one DiT, a model_index.json boundary_ratio that is not a number in (0, 1) (read only where
    model.boundary_ratio is null, as the load does), a VAE whose latent channels are not the DiT's input channels.
    A folder missing its files is left to check_model_folder and the request checks (they name the download)."""
    from pipeline.components import check_latent_channels, resolve_boundary_ratio  # the load's own rules
    from pipeline.weights import MissingWeightsError, dit_folders

    path = config.model.path
    if path is None:
        resolve_boundary_ratio(config.model, None, [])
        return
    folder = Path(path).expanduser()
    if not folder.exists():
        return
    try:
        resolve_boundary_ratio(config.model, folder, dit_folders(folder))
        in_dim, z_dim = _folder_dit_config(folder.resolve()).in_dim, vae_spec(folder.resolve()).z_dim
    except MissingWeightsError:
        return
    check_latent_channels(folder, z_dim, in_dim)


def model_boundary(config: OdysseyConfig) -> float | None:
    """The boundary a run of `config` uses (what its manifest records and --resume compares): model.boundary_ratio,
    else, for a two-expert folder on this machine, its model_index.json's, else 0.875 (load_components' rule); None
    for a model of one DiT. Where the folder is not on this machine only model.boundary_ratio is known."""
    from pipeline.components import DEFAULT_BOUNDARY_RATIO
    from pipeline.weights import model_boundary_ratio

    experts = model_experts(config)
    if experts == 1:
        return None
    if config.model.boundary_ratio is not None or experts is None:
        return config.model.boundary_ratio
    folder = Path(config.model.path).expanduser().resolve()
    ratio = model_boundary_ratio(folder)
    return DEFAULT_BOUNDARY_RATIO if ratio is None else ratio


def check_config(config: OdysseyConfig) -> None:
    """Every check of the config alone that needs the model's headers or this torch (the model, the step cache,
    sharding): what the driver runs before it starts anything."""
    check_config_model(config)
    check_config_cache(config)
    check_config_sharding(config)


def check_request_cache(request, config: OdysseyConfig) -> None:
    """ValueError (one line) when a resolved request's step cache cannot run on the configured model."""
    if request.cache not in (None, "off"):
        check_cache(request.cache, request.cache_threshold, request.steps, model_dit_config(config),
                    experts=model_experts(config) or 1)


def check_request_model(request, config: OdysseyConfig) -> None:
    """ValueError (one line) when a resolved request asks the configured model for what it cannot do, read from the
    folder's headers where it is on this machine (else every rank checks it at the request's start, after Ray and
    the load): a low-noise guidance of its own on a model of one DiT (only Wan2.2 T2V-A14B has two experts), or a
    frame size its VAE and patch do not divide (TI2V-5B: multiples of 32, its VAE compresses 16x and the DiT
    patches 2x2; the embedded model's sizes are check_request_size's)."""
    experts = model_experts(config)
    if experts == 1 and request.low_noise_guidance_scale != request.guidance_scale:
        raise ValueError(f"low_noise_guidance_scale applies to two-expert models (Wan2.2 T2V-A14B); this model has "
                         f"one DiT: use guidance_scale (got {request.low_noise_guidance_scale} and "
                         f"{request.guidance_scale})")
    if config.model.path is None or experts is None:
        return
    stride, ph, pw = _size_factors(Path(config.model.path).expanduser().resolve())
    if request.height % (stride * ph) or request.width % (stride * pw):
        sides = (f"a height and width that are multiples of {stride * ph}" if ph == pw else
                 f"a height that is a multiple of {stride * ph} and a width that is a multiple of {stride * pw}")
        raise ValueError(f"this model needs {sides} (its VAE compresses {stride}x and its DiT patches {ph}x{pw}), "
                         f"not {request.height}x{request.width} (height x width)")


@functools.lru_cache(maxsize=4)
def _size_factors(folder: Path) -> tuple[int, int, int]:
    """(the VAE's spatial stride, the DiT's patch height and width) of a model folder, from headers only."""
    _, ph, pw = _folder_dit_config(folder).patch_size
    return vae_spec(folder).spatial_stride, ph, pw


# -- the embedded model ---------------------------------------------------------------------------------------------

# Requests already warned about in this process (the CLI warns before Ray starts; the Driver's check_batch then
# sees the same request objects and stays quiet). Weak: forgotten with the request.
_noted: "weakref.WeakSet" = weakref.WeakSet()
_LISTED = 12  # unknown words named in a warning; more are counted


def check_request_size(request, config: OdysseyConfig) -> None:
    """ValueError (one line) when the embedded model is asked for a frame size it does not draw one object at."""
    from pipeline.tiny import SIDES, TRAINED_SIZE

    if config.model.path is not None or (request.height in SIDES and request.width in SIDES):
        return
    side = TRAINED_SIZE
    others = ", ".join(f"{h}x{w}" for h in SIDES for w in SIDES if (h, w) != (side, side))
    raise ValueError(f"the embedded model draws {side}x{side} (what it was trained on), or less reliably {others} "
                     f"(height x width), not {request.height}x{request.width} (it draws a grid of copies at 64 pixels "
                     f"a side and more, a smudge at 16): ask for height {side} and width {side}, or use a Wan model "
                     f"(--config wan2.1-t2v-1.3b)")


def embedded_model_notes(items: Sequence[tuple[str, object]], config: OdysseyConfig, *,
                         strict_vocab: bool = False) -> list[str]:
    """The warnings (one line each) about the embedded model's requests: words it does not know (in the prompt or
    the negative prompt), and sizes or lengths it draws but was not trained on. items: (where, resolved request),
    `where` naming the request in a batch ("prompts.txt:3"). With strict_vocab unknown words are a ValueError
    instead (one line). Nothing for a Wan model."""
    if config.model.path is None:
        notes = [note for note in (_vocabulary_note(items, strict_vocab), _training_note(items)) if note]
    else:
        notes = []
    for _, request in items:
        _noted.add(request)
    return notes


def _where(found: list[str], items) -> str:
    if len(items) == 1:
        return ""
    if len(found) == len(items):
        return f" (in all {len(items)} prompts)"
    return f" (in {len(found)} of {len(items)} prompts, first {found[0]})"


def _vocabulary_note(items, strict: bool) -> str | None:
    from pipeline.tiny import describe_vocabulary, unknown_words

    unknown, found = {}, []
    for where, request in items:
        words = unknown_words(f"{request.prompt} {request.negative_prompt or ''}")
        if words:
            found.append(where)
            unknown.update(dict.fromkeys(words))
    if not unknown:
        return None
    named = ", ".join(repr(w[:40]) for w in list(unknown)[:_LISTED])
    if len(unknown) > _LISTED:
        named += f" and {len(unknown) - _LISTED} more"
    plural = "s" if len(unknown) > 1 else ""
    text = (f"the embedded model does not know the word{plural} {named}{_where(found, items)}, so it cannot draw "
            f"what they say; it knows {describe_vocabulary()}")
    if strict:
        raise ValueError(f"--strict-vocab: {text}")
    return f"{text} (--strict-vocab refuses such prompts)"


def _training_note(items) -> str | None:
    from pipeline.tiny import TRAINED_FRAMES, TRAINED_SIZE

    sizes, lengths, found = {}, {}, []
    for where, request in items:
        off_size = (request.height, request.width) != (TRAINED_SIZE, TRAINED_SIZE)
        if off_size:
            sizes[f"{request.height}x{request.width}"] = None
        if request.frames > TRAINED_FRAMES:
            lengths[request.frames] = None
        if off_size or request.frames > TRAINED_FRAMES:
            found.append(where)
    if not found:
        return None
    asked = " and ".join(part for part in (", ".join(sizes),
                                          ", ".join(map(str, sorted(lengths))) + " frames" if lengths else "") if part)
    if sizes:
        asked = asked.replace(" and ", " (height x width) and ", 1) if lengths else f"{asked} (height x width)"
    return (f"the embedded model was trained on {TRAINED_SIZE}x{TRAINED_SIZE} clips of {TRAINED_FRAMES} frames; at "
            f"{asked}{_where(found, items)} its motion is unreliable (the object stalls, turns back or wraps around)")
