"""What one generation asks for, and the events a Runner yields while serving it."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from dataclasses import dataclass, field

import numpy as np

from configs import OdysseyConfig, SamplingConfig, VideoConfig

from .step_cache import check_cache, finite

__all__ = ["GenerateRequest", "Progress", "Frame", "Preview", "Result", "Event", "RequestRejectedError",
           "RequestCancelledError"]


class RequestRejectedError(ValueError):
    """Raised by every rank of a replica when any rank refused a request in its first collective (Runner._agree):
    no rank went further, so the group is intact and serves the next request. Any other error while serving may
    leave ranks inside a collective."""


class RequestCancelledError(RuntimeError):
    """Raised on EVERY rank at the same point after Runner.cancel(request_id): the group stays in step.

    The ranks agree on it before the first denoising step and after each one (a cancel seen by any rank stops all
    of them at the same step); during a decode on rank 0 alone, rank 0 raises it between frames."""


@dataclass(frozen=True)
class GenerateRequest:
    """One video. Unset fields take the config's value when resolved; a resolved request is fully concrete, so
    every rank that receives it does the same thing."""

    prompt: str
    request_id: str = ""
    seed: int | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    fps: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None  # two-expert models: the high-noise expert's
    low_noise_guidance_scale: float | None = None  # resolved: this, else the config's, else guidance_scale
    shift: float | None = None
    sampler: str | None = None
    cache: str | None = None
    cache_threshold: float | None = None  # stays None when resolved: the policy's default for the model

    def resolve(self, config: OdysseyConfig) -> "GenerateRequest":
        """Every field concrete and validated (ValueError): types, ranges, and config.limits (so a request can never
        ask a worker for more than the operator allows); seed drawn if unset."""
        self._check_types()
        s, v = config.sampling, config.video
        sampling = SamplingConfig(
            sampler=self.sampler or s.sampler, steps=_pick(self.steps, s.steps),
            guidance_scale=float(_pick(self.guidance_scale, s.guidance_scale)), shift=float(_pick(self.shift, s.shift)),
            low_noise_guidance_scale=float(_pick(self.low_noise_guidance_scale, _pick(
                s.low_noise_guidance_scale, _pick(self.guidance_scale, s.guidance_scale)))),
            negative_prompt=_pick(self.negative_prompt, s.negative_prompt), seed=_pick(self.seed, s.seed),
            cache=_pick(self.cache, s.cache),
            # a threshold is on its policy's scale: the config's applies only to the config's policy
            cache_threshold=self.cache_threshold if self.cache_threshold is not None
            else s.cache_threshold if _pick(self.cache, s.cache) == s.cache else None,
        )
        check_cache(sampling.cache, sampling.cache_threshold, sampling.steps)
        if sampling.sampler not in ("unipc", "euler"):
            raise ValueError(f"sampler must be unipc or euler, got {sampling.sampler!r}")
        video = VideoConfig(height=_pick(self.height, v.height), width=_pick(self.width, v.width),
                            frames=_pick(self.frames, v.frames), fps=_pick(self.fps, v.fps))
        if config.parallel.cfg_degree == 2 and 1.0 in (sampling.guidance_scale, sampling.low_noise_guidance_scale):
            which = "" if sampling.guidance_scale == 1.0 else " for the low-noise expert's steps"
            raise ValueError(f"this replica runs CFG in parallel (cfg_degree=2) but the request turns guidance off"
                             f"{which}")
        config.limits.check(sampling, video, (self.prompt,))
        seed = sampling.seed if sampling.seed is not None else secrets.randbelow(2**63)
        return GenerateRequest(
            prompt=self.prompt, request_id=self.request_id or f"req-{seed:x}", seed=seed,
            negative_prompt=sampling.negative_prompt, height=video.height, width=video.width, frames=video.frames,
            fps=video.fps, steps=sampling.steps, guidance_scale=sampling.guidance_scale,
            low_noise_guidance_scale=sampling.low_noise_guidance_scale, shift=sampling.shift,
            sampler=sampling.sampler, cache=sampling.cache,
            cache_threshold=None if sampling.cache_threshold is None else float(sampling.cache_threshold),
        )

    def validate(self, config: OdysseyConfig) -> None:
        """ValueError unless this request is resolved and resolving it again under `config` changes nothing: what
        the driver checks before a job goes to any worker."""
        if not self.is_resolved:
            raise ValueError("the request is not resolved (seed and sizes must be set)")
        if self.resolve(config) != self:
            raise ValueError("the request does not match the config (was it resolved under another one?)")

    def _check_types(self) -> None:
        """Requests can come from JSON or code, where any type can appear: no bool for an int, no NaN or inf."""
        for name in ("prompt", "request_id", "negative_prompt", "sampler", "cache"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")
            if value is not None and not is_utf8(value):  # a lone surrogate from JSON: no file or reply could hold it
                raise ValueError(f"{name} is not valid text (it holds a lone UTF-16 surrogate)")
        if len(self.request_id) > 128 or not self.request_id.isprintable():
            raise ValueError(f"request_id must be at most 128 printable characters, got {self.request_id!r:.60}")
        for name in ("seed", "height", "width", "frames", "fps", "steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} must be an integer, got {value!r:.40}")
        for name in ("guidance_scale", "low_noise_guidance_scale", "shift", "cache_threshold"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not finite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r:.40}")

    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, f.name) is not None for f in dataclasses.fields(self) if f.name != "cache_threshold")

    def fingerprint(self) -> int:
        """63-bit digest of every field: ranks compare it before the first collective."""
        text = repr(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8 (a lone surrogate from JSON cannot)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _pick(value, default):
    return default if value is None else value


@dataclass
class Progress:
    request_id: str
    stage: str  # "encode" | "denoise"
    step: int
    total: int
    computed: int | None = None  # denoise with a step cache: steps so far that ran the DiT's blocks


@dataclass
class Frame:
    """One decoded RGB frame [H, W, 3] uint8, from rank 0, as soon as it exists."""

    request_id: str
    index: int
    total: int
    image: np.ndarray
    created_at: float = 0.0  # wall clock on the worker when the frame left the decoder


@dataclass
class Preview:
    """The model's current estimate of the clean video (x0 = x_t - sigma * v) as one small RGB image of its middle
    latent frame (pipeline/preview.py), from rank 0, every sampling.preview_every denoising steps."""

    request_id: str
    step: int  # denoising steps done (1-based), the estimate is after this step
    total: int
    image: np.ndarray  # [h, w, 3] uint8, longest side <= 256 px
    created_at: float = 0.0


@dataclass
class Result:
    request_id: str
    seed: int
    num_frames: int
    timings: dict = field(default_factory=dict)  # seconds per stage
    shapes: dict = field(default_factory=dict)
    latents: object = None  # final latents [1, z, T, h, w] when the Runner was asked to return them
    finished_at: float = 0.0  # wall clock on the worker when the generation finished
    cache: dict | None = None  # step cache: policy, threshold, computed_steps, steps, skipped (step indices)
    # rank 0: {"param_bytes": [per rank], "peak_bytes": [per rank]}: the model weights on each rank's device (its
    # shards of sharded ones; on a GPU not those in host memory: the expert parked by model.offload_idle_expert, a
    # text encoder on or offloaded to the CPU), and its peak this request. CUDA: torch.cuda.max_memory_allocated
    # (tensors only: not NCCL's buffers nor the caching allocator's reserve). CPU: the process's peak RSS, reset
    # per request through /proc/self/clear_refs; where that fails, the process's lifetime peak.
    memory: dict | None = None


Event = Progress | Frame | Preview | Result
