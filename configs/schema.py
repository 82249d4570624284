"""The Odyssey config: one frozen dataclass per section, a docstring under every field.

Checks that one section can make alone live in its __post_init__; checks across sections in OdysseyConfig's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


def _require(ok: bool, message: str, *values: object) -> None:
    """ValueError(message) unless ok; with values, message is formatted with them (briefly) only on failure:
    str() of an int of more than 4300 digits raises, and of a long one is quadratic."""
    if not ok:
        raise ValueError(message.format(*map(_brief, values)) if values else message)


def _brief(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "beyond 2^64" if value > 0 else "below -2^64"
    return str(value)


def _finite(owner: object, *names: str) -> None:
    """YAML reads `.inf` and `.nan` as floats: no numeric setting may be either."""
    for name in names:
        value = getattr(owner, name)
        _require(value is None or math.isfinite(value), f"{name} must be a finite number, got {{}}", value)


CACHE_POLICIES = ("off", "teacache", "fbcache", "easycache")


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    """Folder holding the weights: a diffusers pipeline folder or an original release folder of Wan2.1 (T2V 1.3B,
    14B) or Wan2.2 (T2V-A14B: two experts; TI2V-5B). null runs the embedded tiny model that ships inside the
    package."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the DiT: auto is bfloat16 on GPUs with native bf16 (Ampere, sm80, on), float16 on older
    ones (V100, T4: no fused bf16 attention there) and float32 on CPU. Modulation, norms and the time embedding
    stay in float32 whatever this says."""

    text_encoder_device: Literal["auto", "cpu"] = "auto"
    """Where the umt5-xxl text encoder (bfloat16, 10.6 GiB) lives and runs, on rank 0 only: auto uses that rank's
    GPU; cpu keeps it in CPU memory and encodes there, with the worker's CPU threads (never on the GPU, so
    offload_text_encoder is then moot)."""

    offload_text_encoder: bool = False
    """With text_encoder_device=auto on a GPU: keep the encoder in CPU memory between prompts and move it to the
    GPU only to encode (two transfers of 10.6 GiB per prompt), leaving its GPU memory to the DiT and the VAE."""

    vae_tiling: bool = False
    """Decode the VAE in 256-pixel spatial tiles: bounds the activations of each decoded chunk by the tile size.
    It does not bound the causal caches: each tile keeps one for the whole video, together ~1.65x the untiled
    cache at 480p and 720p (720p, fp32: 13.4 GiB instead of 8.1). The decode's peak still falls: 720p ~14.4 GiB
    instead of ~19.4, 480p ~6.7 instead of ~8.4 (bench/vae_cache.py). Neither grows with the video's length."""

    shard_text_encoder: bool = False
    """Shard the umt5-xxl text encoder's weights over every rank of the replica (FSDP2, like
    parallel.shard_weights) instead of holding it whole on rank 0: each GPU then keeps ~10.6 GiB / ranks of it,
    and every rank encodes each prompt together, on its own GPU, gathering one layer's weights at a time (rank 0's
    result is what the replica uses). Needs a replica of 2 or more ranks, text_encoder_device=auto and
    offload_text_encoder=false. For 14B on 24 GB GPUs; see the README's "Big models on small GPUs"."""

    boundary_ratio: float | None = None
    """Two-expert models (Wan2.2 T2V-A14B): denoising steps with timestep t >= boundary_ratio x 1000 run the
    high-noise expert, the rest the low-noise expert (diffusers' rule). null: the folder's model_index.json
    boundary_ratio, else 0.875 (T2V-A14B's). In (0, 1) when set; set on a folder holding one DiT, loading refuses
    it."""

    offload_idle_expert: bool = False
    """Two-expert models on a GPU: keep the expert not in use in (pinned) CPU memory and swap the two at the
    boundary (one transfer each way per video), halving the DiTs' GPU memory (A14B in bf16: 27 GiB instead of
    54). Not with parallel.shard_weights (both experts are then sharded over the replica instead). Moot for
    models of one DiT and on CPU ranks."""

    def __post_init__(self) -> None:
        _finite(self, "boundary_ratio")
        _require(self.boundary_ratio is None or 0 < self.boundary_ratio < 1,
                 "boundary_ratio must be in (0, 1) (null: the model's own), got {}", self.boundary_ratio)


@dataclass(frozen=True)
class ParallelConfig:
    ulysses_degree: int = 1
    """Ranks of one all-to-all group (Ulysses sequence parallelism), kept on one node. Heads need not divide it."""

    ring_degree: int = 1
    """Ulysses groups that share one video's tokens by ring attention (Ulysses x Ring, as USP / xDiT): each keeps
    its heads and passes key/value blocks around the ring point to point, so the ring may cross nodes where an
    all-to-all would crawl. A video's tokens are split over ring_degree x ulysses_degree ranks. Use it to run one
    video on more than one node (e.g. 2 nodes x 8 GPUs: ulysses 8 x ring 2) or where heads divide unevenly among
    the ranks (12 heads on 8 ranks: ulysses 4 x ring 2); within one NVLink node Ulysses alone is faster."""

    cfg_degree: Literal[1, 2] = 1
    """2 runs the conditional and unconditional passes of classifier-free guidance at once on two halves of
    the ranks."""

    replicas: int = 1
    """Independent copies of the model; each serves its own prompts.
    world = replicas * cfg_degree * ring_degree * ulysses_degree."""

    fuse_qkv: bool | Literal["auto"] = "auto"
    """Send Q, K and V in one all-to-all (true) or three concurrent ones (false); auto measures both once per
    message size and keeps the faster. The results are identical."""

    fp8_comm: bool = False
    """Carry the all-to-alls in float8 e4m3 with a scale per vector: about half the bytes, ~5% attention error."""

    head_chunks: int = 1
    """Attend each rank's heads in this many chunks, overlapping chunk i+1's all-to-all with chunk i's attention."""

    vae_parallel: bool = True
    """Decode each video on every rank of its replica, each a band of rows of every frame (exact: the same frames
    as one rank decoding alone), instead of on rank 0 while the others wait. Rank 0 still streams the frames. Not
    combined with model.vae_tiling (then rank 0 decodes alone, tiled); the embedded model decodes on rank 0."""

    attention_backend: Literal["auto", "flash", "sdpa", "reference"] = "auto"
    """Local attention kernel: flash (flash-attn, CUDA fp16/bf16), sdpa (torch), reference (slow, exact) or auto."""

    shard_weights: bool = False
    """Shard the DiT's weights over every rank of the replica (FSDP2 over its cfg x ring x ulysses ranks)
    instead of a whole copy on each: every rank keeps 1/ranks of each block's weights plus the small non-block
    ones (14B: 27 GiB whole, 4.1 GiB on each of 8 ranks), so the replica's GPUs add up their memory. Cost: one
    all-gather of each block's weights per forward (14B: 0.65 GiB per block, 2 x 40 per step with guidance),
    prefetched one block ahead so it overlaps the block running; fast on NVLink, noticeable on PCIe. The videos
    are the same as unsharded. Needs a replica of 2 or more ranks."""

    def __post_init__(self) -> None:
        _require(self.ulysses_degree >= 1, "ulysses_degree must be >= 1, got {}", self.ulysses_degree)
        _require(self.ring_degree >= 1, "ring_degree must be >= 1, got {}", self.ring_degree)
        _require(self.replicas >= 1, "replicas must be >= 1, got {}", self.replicas)
        _require(self.head_chunks >= 1, "head_chunks must be >= 1, got {}", self.head_chunks)

    @property
    def group_size(self) -> int:
        """Ranks of one replica."""
        return self.cfg_degree * self.ring_degree * self.ulysses_degree

    @property
    def world_size(self) -> int:
        return self.replicas * self.group_size


@dataclass(frozen=True)
class SamplingConfig:
    sampler: Literal["unipc", "euler"] = "unipc"
    """Flow-matching sampler: unipc (multistep, order 2, Wan's default) or euler."""

    steps: int = 50
    """Denoising steps."""

    guidance_scale: float = 5.0
    """Classifier-free guidance weight; 1.0 turns guidance off (one model pass per step). On two-expert models
    (Wan2.2 T2V-A14B) the high-noise expert's (diffusers' guidance_scale)."""

    low_noise_guidance_scale: float | None = None
    """Two-expert models: the guidance weight of the low-noise expert's steps (t < the boundary; diffusers'
    guidance_scale_2). null: guidance_scale. A model of one DiT refuses a value other than guidance_scale."""

    shift: float = 5.0
    """Flow shift of the sigma schedule: s' = shift*s / (1 + (shift-1)*s). Higher spends more steps at high noise.
    At least 0.001: near 0 every sigma collapses to 0 and the samplers divide by zero."""

    negative_prompt: str = ""
    """Prompt that guidance steers away from."""

    seed: int | None = None
    """Seed of the initial noise; null draws one per prompt (recorded in the manifest)."""

    cache: Literal["off", "teacache", "fbcache", "easycache"] = "off"
    """Step caching: on steps where the DiT's input changed little since the last computed step, reuse that step's
    block-stack residual instead of running the blocks (patch embedding, text conditioning and the head always
    run). teacache: TeaCache's rescaled timestep-modulation rule (Wan2.1 1.3B and 14B weights only); fbcache: the
    first block runs every step and the rest are skipped while its residual barely changes (any model); easycache:
    EasyCache's transformation-rate estimate on the block stack's input (any model). Faster, not identical: see
    docs/benchmarks.md for what each costs in quality."""

    cache_threshold: float | None = None
    """How much accumulated change a cached step may hide before the blocks run again: higher skips more steps
    (a relative change, at most 1). null: the policy's measured default."""

    preview_every: int = 0
    """Live previews: every this many denoising steps (never after the last), rank 0 emits a Preview event, a small
    RGB image (longest side <= 256 px) of the model's current estimate of the clean video's middle latent frame,
    through a linear latent-to-RGB map fitted to the loaded decoder at the first preview (once: a few small decodes
    on rank 0). 0 turns previews off; `odyssey serve` and
    `odyssey generate --preview` use 5 when this is 0."""

    def __post_init__(self) -> None:
        _finite(self, "guidance_scale", "low_noise_guidance_scale", "shift", "cache_threshold")
        _require(self.preview_every >= 0, "preview_every must be >= 0 (0 turns previews off), got {}",
                 self.preview_every)
        _require(self.cache in CACHE_POLICIES, "cache must be one of {}, got {}", ", ".join(CACHE_POLICIES),
                 self.cache)
        _require(self.cache_threshold is None or 0 < self.cache_threshold <= 1,
                 "cache_threshold must be in (0, 1], got {}", self.cache_threshold)
        _require(self.cache != "off" or self.cache_threshold is None,
                 "cache_threshold is set but cache is off: set a cache policy, or cache_threshold null")
        _require(self.steps >= 1, "steps must be >= 1, got {}", self.steps)
        _require(self.guidance_scale >= 0, "guidance_scale must be >= 0, got {}", self.guidance_scale)
        _require(self.low_noise_guidance_scale is None or self.low_noise_guidance_scale >= 0,
                 "low_noise_guidance_scale must be >= 0, got {}", self.low_noise_guidance_scale)
        _require(self.shift >= 1e-3, "shift must be >= 0.001, got {}", self.shift)
        _require(self.seed is None or 0 <= self.seed < 2**63, "seed must be in 0..2^63-1, got {}", self.seed)


@dataclass(frozen=True)
class VideoConfig:
    height: int = 480
    """Frame height in pixels, a multiple of 16."""

    width: int = 832
    """Frame width in pixels, a multiple of 16."""

    frames: int = 81
    """Frames per video, 4n+1 (the VAE compresses time 4x after the first frame)."""

    fps: int = 16
    """Frames per second of the written MP4."""

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(value >= 16 and value % 16 == 0, f"{name} must be a positive multiple of 16, got {{}}", value)
        _require(
            self.frames >= 1 and self.frames % 4 == 1,
            "frames must be 4n+1 (1, 5, 9, ..., 81), got {}", self.frames,
        )
        _require(self.fps >= 1, "fps must be >= 1, got {}", self.fps)


@dataclass(frozen=True)
class RuntimeConfig:
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where ranks compute, and what the driver reserves: cuda places one GPU per rank (waiting for an autoscaler
    to add GPU nodes when the cluster has too few); cpu places CPU shares; auto uses GPUs when the cluster has
    some when the job starts, else CPU shares (gloo)."""

    collective_timeout_s: float = 300.0
    """Timeout of every torch.distributed collective; a stuck or dead rank fails its replica after this long."""

    placement_timeout_s: float = 120.0
    """How long a replica's workers may take to start once their resources are reserved."""

    scale_up_timeout_s: float = 900.0
    """How long a replica waits for its resources (GPUs, CPUs) to exist: an autoscaling cluster boots nodes
    meanwhile (cloud GPU nodes take minutes). When no replica at all could be placed in this time, the batch fails
    naming what is missing. Resources that are already there are taken at once."""

    rebuild_backoff_s: float = 2.0
    """First pause before rebuilding a lost replica; doubles after each failed rebuild, up to rebuild_backoff_max_s.
    A replica slot is never given up while the batch has work."""

    rebuild_backoff_max_s: float = 60.0
    """Longest pause between two attempts to rebuild a replica."""

    accelerator_check: bool = True
    """Fail (with a clear message) when Ray gave a worker a GPU but torch in that worker sees none, instead of
    silently computing on CPU. Only for clusters with fake GPU resources (tests) set false: such workers then
    compute on CPU."""

    encoder_cpus: float | None = None
    """Extra CPUs reserved for rank 0, whose torch then uses that many more threads, when the text encoder runs on
    CPU next to GPU ranks (model.text_encoder_device=cpu). null: the spare cores of the GPU nodes up when the job
    starts (a node's CPUs beyond one per GPU and 2 left for Ray, shared by the replicas it can hold), at most 16;
    8 when no GPU node is up yet (an autoscaling cluster right after `up`): set it when your GPU nodes have fewer."""

    load_timeout_s: float = 1800.0
    """How long loading the models on a replica may take."""

    max_retries: int = 2
    """Times a prompt is retried on a rebuilt replica after a worker or node of its replica died. A prompt whose
    worker raised (out of memory, bad input) fails at once with that error instead."""

    num_cpus_per_worker: float | None = None
    """CPUs Ray reserves per worker actor on CPU-only clusters (fractions allowed); null sizes workers to fit."""

    placement: Literal["auto", "STRICT_PACK", "PACK"] = "auto"
    """How a replica's Ulysses groups are packed: each group is one placement-group bundle, so it always sits on one
    node (its all-to-alls never cross nodes); STRICT_PACK puts the whole replica on one node, PACK lets the cfg
    halves (cfg_degree=2) land on different nodes; auto is STRICT_PACK when a replica fits a node, else PACK."""

    def __post_init__(self) -> None:
        _finite(self, "collective_timeout_s", "placement_timeout_s", "load_timeout_s", "num_cpus_per_worker",
                "scale_up_timeout_s", "rebuild_backoff_s", "rebuild_backoff_max_s", "encoder_cpus")
        _require(self.collective_timeout_s > 0, "collective_timeout_s must be > 0, got {}", self.collective_timeout_s)
        _require(self.max_retries >= 0, "max_retries must be >= 0, got {}", self.max_retries)
        _require(self.placement_timeout_s > 0 and self.load_timeout_s > 0, "timeouts must be > 0")
        _require(self.scale_up_timeout_s > 0, "scale_up_timeout_s must be > 0, got {}", self.scale_up_timeout_s)
        _require(0 < self.rebuild_backoff_s <= self.rebuild_backoff_max_s,
                 "rebuild_backoff_s must be > 0 and <= rebuild_backoff_max_s")
        _require(self.encoder_cpus is None or self.encoder_cpus >= 0,
                 "encoder_cpus must be >= 0, got {}", self.encoder_cpus)
        _require(
            self.num_cpus_per_worker is None or self.num_cpus_per_worker > 0,
            "num_cpus_per_worker must be > 0, got {}", self.num_cpus_per_worker,
        )


@dataclass(frozen=True)
class LimitsConfig:
    """Upper bounds on what one request or prompt file may ask for. Every request is checked against them before
    anything is sent to a worker, so a hostile or mistaken request fails with one line instead of exhausting a
    worker's memory. Raise them deliberately for long or large videos; the defaults cover Wan2.1's 720p."""

    max_steps: int = 1000
    """Most denoising steps a request may ask for (the schedule alone grows with the step count)."""

    max_frames: int = 1025
    """Most frames per video (Wan2.1 is trained on 81; memory and time grow at least linearly)."""

    max_pixels: int = 1280 * 1280
    """Most pixels per frame, height x width (720p is 1280 x 720)."""

    max_fps: int = 120
    """Highest frame rate of a written MP4."""

    max_guidance_scale: float = 50.0
    """Largest classifier-free guidance weight (useful values are 1 to 15)."""

    max_shift: float = 100.0
    """Largest flow shift of the sigma schedule (useful values are 1 to 20)."""

    max_prompt_chars: int = 10_000
    """Longest prompt, negative prompt or output name in characters (the text encoder reads 512 tokens, about
    2,000 characters of English)."""

    max_prompt_file_bytes: int = 64 * 1024 * 1024
    """Largest prompt file a batch reads."""

    max_prompt_lines: int = 100_000
    """Most lines in a prompt file (blank and comment lines count)."""

    def __post_init__(self) -> None:
        _finite(self, "max_guidance_scale", "max_shift")
        for f in ("max_steps", "max_frames", "max_pixels", "max_fps", "max_prompt_chars", "max_prompt_file_bytes",
                  "max_prompt_lines"):
            _require(getattr(self, f) >= 1, f"{f} must be >= 1, got {{}}", getattr(self, f))
        _require(self.max_guidance_scale >= 0 and self.max_shift > 0,
                 "max_guidance_scale must be >= 0 and max_shift > 0")

    def check(self, sampling: SamplingConfig, video: VideoConfig, prompts: tuple[str, ...] = ()) -> None:
        """ValueError naming the first setting over its limit."""
        bounds = [
            ("steps", sampling.steps, self.max_steps, "max_steps"),
            ("frames", video.frames, self.max_frames, "max_frames"),
            ("height x width", video.height * video.width, self.max_pixels, "max_pixels"),
            ("fps", video.fps, self.max_fps, "max_fps"),
            ("guidance_scale", sampling.guidance_scale, self.max_guidance_scale, "max_guidance_scale"),
            ("low_noise_guidance_scale", sampling.low_noise_guidance_scale or 0.0, self.max_guidance_scale,
             "max_guidance_scale"),
            ("shift", sampling.shift, self.max_shift, "max_shift"),
        ]
        for name, value, limit, key in bounds:
            shown = value if not isinstance(value, int) or value.bit_length() <= 64 else "beyond 2^64"
            _require(value <= limit, f"{name} {shown} is over the limit {limit} (limits.{key})")
        for text in (sampling.negative_prompt, *prompts):
            _require(len(text) <= self.max_prompt_chars, f"a prompt of {len(text)} characters is over the limit "
                     f"{self.max_prompt_chars} (limits.max_prompt_chars)")


@dataclass(frozen=True)
class ServeConfig:
    """`odyssey serve`: where the service listens and how much it takes in. What one request may ask for is bounded
    by limits.* (steps, frames, pixels, prompt length), checked on every request before it is queued."""

    host: str = "127.0.0.1"
    """Interface the HTTP server binds. Loopback by default; any other needs a token (--token-file) or --insecure."""

    port: int = 8000
    """TCP port of the HTTP server."""

    max_body_bytes: int = 1_048_576
    """Largest request body accepted (413 beyond)."""

    max_queued: int = 1000
    """Jobs waiting for a replica before new ones are refused with 429 and Retry-After."""

    max_attempts: int = 3
    """Times a job is started at most: one interrupted by a restart of the service or by a lost replica is queued
    again until then, and fails after."""

    retry_after_s: int = 10
    """Seconds a client refused with 429 is told to wait (the Retry-After header)."""

    max_streams: int = 256
    """Event streams (GET /v1/videos/{id}/events) open at once; more are refused with 429. Each holds one of the
    server's concurrent requests for as long as its client watches."""

    keep_jobs: int = 10_000
    """Job records kept; beyond, the oldest finished ones are forgotten and their videos deleted."""

    def __post_init__(self) -> None:
        _require(bool(self.host) and self.host.strip() == self.host, "host must be a host name or address, got {}",
                 repr(self.host))
        _require(0 < self.port < 65536, "port must be in 1..65535, got {}", self.port)
        for name in ("max_body_bytes", "max_queued", "max_attempts", "retry_after_s", "keep_jobs", "max_streams"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {{}}", getattr(self, name))


@dataclass(frozen=True)
class OdysseyConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Weights and precision."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel degrees and the attention wire."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """The denoising loop."""

    video: VideoConfig = field(default_factory=VideoConfig)
    """Size and rate of the output video."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Devices, timeouts, retries and placement."""

    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Upper bounds on what a request or prompt file may ask for."""

    serve: ServeConfig = field(default_factory=ServeConfig)
    """The video generation service (odyssey serve)."""

    def __post_init__(self) -> None:
        self.limits.check(self.sampling, self.video)
        _require(
            self.parallel.cfg_degree == 1 or self.sampling.guidance_scale != 1.0,
            "parallel.cfg_degree=2 needs classifier-free guidance, but sampling.guidance_scale is 1.0 (off)",
        )
        _require(
            self.parallel.cfg_degree == 1 or self.sampling.low_noise_guidance_scale != 1.0,
            "parallel.cfg_degree=2 needs classifier-free guidance, but sampling.low_noise_guidance_scale is 1.0 "
            "(off)",
        )
        par, model = self.parallel, self.model
        _require(not (model.offload_idle_expert and par.shard_weights),
                 "model.offload_idle_expert parks one whole expert in CPU memory, but parallel.shard_weights shards "
                 "both experts over the replica instead: choose one")
        _require(not par.shard_weights or par.group_size > 1,
                 "parallel.shard_weights needs a replica of 2 or more ranks (ulysses_degree x cfg_degree is 1): "
                 "there is nothing to shard over (--ulysses 2 or more, or --cfg-parallel)")
        if model.shard_text_encoder:
            _require(par.group_size > 1,
                     "model.shard_text_encoder needs a replica of 2 or more ranks (ulysses_degree x cfg_degree is "
                     "1): there is nothing to shard over")
            _require(model.text_encoder_device != "cpu",
                     "model.shard_text_encoder shards the encoder over the replica's devices, but "
                     "model.text_encoder_device=cpu keeps it whole on rank 0's CPU: choose one")
            _require(not model.offload_text_encoder,
                     "model.shard_text_encoder keeps the encoder's shards on every rank's GPU, but "
                     "model.offload_text_encoder=true moves the whole encoder to one GPU per prompt: choose one")
