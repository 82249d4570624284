"""The models one rank needs, loaded once from the config: the DiT everywhere (both experts of a two-expert model),
the text encoder and the decoder only where they run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from configs import ModelConfig

from .dit import WanDiT

__all__ = ["Components", "TextEncoder", "FrameDecoder", "EncoderPlacement", "encoder_placement", "load_components",
           "resolve_dtype", "TEXT_ENCODER_DTYPE", "DEFAULT_BOUNDARY_RATIO", "NUM_TRAIN_TIMESTEPS"]

log = logging.getLogger(__name__)

DEFAULT_BOUNDARY_RATIO = 0.875
"""Wan2.2 T2V-A14B's boundary (upstream wan/configs/wan_t2v_A14B.py: boundary), for a two-expert folder whose
model_index.json gives none (the original release has no model_index.json)."""

NUM_TRAIN_TIMESTEPS = 1000  # the model timestep t = sigma * 1000

# umt5-xxl runs in bfloat16 wherever it runs: its released weights are bfloat16 (nothing is gained by fp32), upstream
# Wan2.1 keeps it bfloat16 on CPU too (t5_cpu), and fp32 would double its 11.4 GB (10.6 GiB) to 22.7 GB. On a CPU
# with bf16 instructions it is also faster (tiny umt5, d_model 1024, 2 x 512 tokens, 2 threads on an AMD EPYC:
# 303 ms bf16 vs 521 ms fp32, 0.7% relative difference); on CPUs without them torch emulates bf16, slower.
TEXT_ENCODER_DTYPE = torch.bfloat16


class TextEncoder(Protocol):
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[N, text_len, text_dim] float32, zero rows past each prompt."""

    def to(self, device) -> "TextEncoder": ...


class FrameDecoder(Protocol):
    def decode_stream(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """uint8 RGB frames [H, W, 3], one at a time, from latents [1, z, T, h, w]."""


@dataclass(frozen=True)
class EncoderPlacement:
    """Where the text encoder lives between prompts (home) and where it encodes (run)."""

    home: torch.device
    run: torch.device

    @property
    def moves(self) -> bool:
        return self.home != self.run


def encoder_placement(text_encoder_device: str, offload: bool, device: torch.device) -> EncoderPlacement:
    """The one decision behind model.text_encoder_device and model.offload_text_encoder, for a rank on `device`:

    - text_encoder_device=cpu (or a CPU rank): lives and runs on the CPU, always; offloading is moot.
    - auto on a GPU with offload: lives in CPU memory, moves to the GPU only to encode, then back.
    - auto on a GPU without offload: lives and runs on the GPU.
    A CPU-configured encoder never touches the GPU."""
    cpu = torch.device("cpu")
    if text_encoder_device == "cpu" or device.type == "cpu":
        return EncoderPlacement(cpu, cpu)
    return EncoderPlacement(cpu if offload else device, device)


@dataclass
class Components:
    dit: WanDiT
    text_encoder: TextEncoder | None
    decoder: FrameDecoder | None
    z_dim: int
    temporal_stride: int
    spatial_stride: int
    text_placement: EncoderPlacement = EncoderPlacement(torch.device("cpu"), torch.device("cpu"))
    dit_low: WanDiT | None = None  # two-expert models: the low-noise expert (dit is then the high-noise one)
    boundary_ratio: float | None = None  # set iff dit_low is: t >= boundary_ratio * 1000 runs dit

    def __post_init__(self) -> None:
        assert (self.dit_low is None) == (self.boundary_ratio is None), "boundary_ratio goes with dit_low"

    def experts(self) -> list[WanDiT]:
        """The DiTs, high-noise expert first: [dit] or [dit, dit_low]."""
        return [self.dit] if self.dit_low is None else [self.dit, self.dit_low]

    def expert_index(self, t: float) -> int:
        """Which of experts() denoises at model timestep t (0..1000): 0 (dit) when there is one DiT or t >=
        boundary_ratio * 1000 (diffusers' WanPipeline rule), else 1 (dit_low)."""
        if self.dit_low is None or t >= self.boundary_ratio * NUM_TRAIN_TIMESTEPS:
            return 0
        return 1

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """[N, text_len, text_dim] float32 on the encoder's run device; the encoder is back home afterwards."""
        place, encoder = self.text_placement, self.text_encoder
        assert encoder is not None, "this rank loaded no text encoder"
        if place.moves:
            encoder.to(place.run)
        try:
            return encoder.encode(prompts)
        finally:
            if place.moves:
                encoder.to(place.home)

    @property
    def text_len(self) -> int:
        return self.dit.config.text_len

    @property
    def text_dim(self) -> int:
        return self.dit.config.text_dim

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """[1, z, T, h, w] for a video, or ValueError if the model cannot make that size."""
        ts, ss = self.temporal_stride, self.spatial_stride
        pt, ph, pw = self.dit.config.patch_size
        if (frames - 1) % ts:
            raise ValueError(f"frames must be {ts}n+1 for this model, got {frames}")
        if height % (ss * ph) or width % (ss * pw):
            raise ValueError(f"height and width must be multiples of {ss * ph} for this model, got {height}x{width}")
        T = (frames - 1) // ts + 1
        if T % pt:
            raise ValueError(f"{T} latent frames are not a multiple of the temporal patch size {pt}")
        return (1, self.z_dim, T, height // ss, width // ss)


def bf16_native(device: torch.device) -> bool:
    """Whether the current CUDA card computes bf16 natively (sm80+, Ampere on). Before that torch emulates it and
    SDPA has no fused bf16 kernel: the math kernel's S x S scores would not fit a video's sequence."""
    if not torch.cuda.is_available():
        return True  # an estimate made without a GPU assumes a current card
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation (and counts emulation as support)
        return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """dtype=auto: bfloat16 on a GPU with native bf16, float16 on older GPUs (V100, T4), float32 on a CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if bf16_native(device) else torch.float16
    return getattr(torch, name)


def load_components(model: ModelConfig, *, device: torch.device, encode: bool, decode: bool,
                    attention_backend: str = "auto", shard_group=None, shard_text_group=None) -> Components:
    """The DiT (compute dtype per config, on `device`), plus the text encoder if `encode` (in bfloat16, loaded
    straight to its home, see encoder_placement) and the decoder if `decode`. model.path None loads the embedded
    tiny model. shard_group: the DiT's blocks sharded over it (pipeline.sharding; every rank of it loads
    together); shard_text_group: the umt5 encoder too (needs `encode`; the embedded model's few-MB encoder is
    never sharded). A two-expert model (Wan2.2 T2V-A14B) loads both experts (Components.dit_low, boundary_ratio:
    model.boundary_ratio, else its model_index.json's, else 0.875), sharded alike over shard_group; with
    model.offload_idle_expert on a GPU the low-noise one starts in pinned CPU memory (the Runner swaps them)."""
    dtype = resolve_dtype(model.dtype, device)
    place = encoder_placement(model.text_encoder_device, model.offload_text_encoder, device)
    if model.path is None:
        from .tiny import load_tiny_components

        resolve_boundary_ratio(model, None, [])
        comp = load_tiny_components(device=device, dtype=dtype, encode=encode, decode=decode,
                                    attention_backend=attention_backend)
        if shard_group is not None:
            from .sharding import shard_dit

            shard_dit(comp.dit, shard_group)
        if comp.text_encoder is not None:
            comp.text_encoder.to(place.home)  # a few MB: its float32 is kept
        comp.text_placement = place
        return comp
    from .text_encoder import WanTextEncoder
    from .vae import WanVAEDecoder
    from .vae_weights import read_vae_spec
    from .weights import read_dit_configs

    path = Path(model.path).expanduser()
    # Everything that can be refused from configs and headers is, before a weight is read.
    folders, configs = read_dit_configs(path)
    boundary = resolve_boundary_ratio(model, path, folders)
    spec = read_vae_spec(path)
    check_latent_channels(path, spec.z_dim, configs[0].in_dim)

    def load(folder: Path, on: torch.device) -> WanDiT:
        if shard_group is not None:
            from .sharding import load_dit_sharded

            return load_dit_sharded(folder, shard_group, device=on, dtype=dtype, attention_backend=attention_backend)
        return WanDiT.from_pretrained(folder, device=on, dtype=dtype, attention_backend=attention_backend)

    # offload_idle_expert on a GPU: the low-noise expert waits in pinned CPU memory until the Runner swaps it in
    # (pinned: the swap is one fast DMA copy). Sharded experts both stay (config refuses the two together).
    park = len(folders) == 2 and model.offload_idle_expert and device.type == "cuda" and shard_group is None
    if park:
        from .memory import _dit_param_bytes

        _check_host_memory(_dit_param_bytes(configs[1], dtype))
    dit = load(folders[0], device)
    dit_low = None
    if len(folders) == 2:
        dit_low = load(folders[1], torch.device("cpu") if park else device)
        if park:
            _pin(dit_low)
    text_encoder = decoder = None
    if encode and shard_text_group is not None:
        from .sharding import load_text_encoder_sharded

        assert not place.moves, "a sharded encoder stays where its shards are (config forbids offloading it)"
        text_encoder = load_text_encoder_sharded(path, shard_text_group, device=place.home, dtype=TEXT_ENCODER_DTYPE,
                                                 text_len=dit.config.text_len)
    elif encode:
        text_encoder = WanTextEncoder.from_pretrained(path, device=place.home, dtype=TEXT_ENCODER_DTYPE,
                                                      text_len=dit.config.text_len)
    if text_encoder is not None and text_encoder.dim != dit.config.text_dim:
        raise ValueError(f"the text encoder's width {text_encoder.dim} does not match the DiT's text_dim "
                         f"{dit.config.text_dim}")
    if decode:
        decoder = WanVAEDecoder.from_pretrained(path, device=device, dtype=torch.float32)
        decoder.tiling = model.vae_tiling
    return Components(dit, text_encoder, decoder, spec.z_dim, spec.temporal_stride, spec.spatial_stride, place,
                      dit_low=dit_low, boundary_ratio=boundary)


def resolve_boundary_ratio(model: ModelConfig, path: Path | None, folders: list[Path]) -> float | None:
    """The boundary of a two-expert model at `path` (its DiT folders `folders`): model.boundary_ratio, else its
    model_index.json's, else DEFAULT_BOUNDARY_RATIO (logged with its source); None for one DiT, or the embedded
    model (path None), where setting it is a ValueError. The driver's check (cluster/validate.py) runs it too."""
    from .weights import model_boundary_ratio

    if path is None or len(folders) == 1:
        if model.boundary_ratio is not None:
            where = "the embedded model (model.path null)" if path is None else str(path)
            raise ValueError(f"model.boundary_ratio is set but {where} holds one DiT (only two-expert models such as "
                             f"Wan2.2 T2V-A14B have a boundary): set it null")
        return None
    if model.boundary_ratio is not None:
        ratio, source = model.boundary_ratio, "model.boundary_ratio"
    elif (from_index := model_boundary_ratio(path)) is not None:
        ratio, source = from_index, f"{path / 'model_index.json'}"
    else:
        ratio, source = DEFAULT_BOUNDARY_RATIO, "Wan2.2 T2V-A14B's default (the folder gives none)"
    log.info("two experts in %s: steps with t >= %g run %s/, the rest %s/ (boundary_ratio %g from %s)", path,
             ratio * NUM_TRAIN_TIMESTEPS, folders[0].name, folders[1].name, ratio, source)
    return ratio


def check_latent_channels(path: Path, z_dim: int, in_dim: int) -> None:
    """ValueError unless the VAE's latent channels are the DiT's input channels (the load's and the driver's check)."""
    if z_dim == in_dim:
        return
    if in_dim == 48:
        hint = "a 48-channel DiT (Wan2.2 TI2V-5B) needs the Wan2.2 VAE (Wan2.2_VAE.pth, or vae/ with z_dim 48)"
    elif in_dim == 16:
        hint = "a 16-channel DiT (Wan2.1, Wan2.2 T2V-A14B) needs the Wan2.1 VAE (Wan2.1_VAE.pth, or vae/ with z_dim 16)"
    else:
        hint = "the VAE and the DiT come from different models"
    raise ValueError(f"the VAE in {path} has {z_dim} latent channels but the DiT takes {in_dim}: {hint}")


PIN_MARGIN_BYTES = 2 << 30  # left for the OS and the rest of this process (one tensor is unpinned while pinning)


def host_memory_available() -> int | None:
    """/proc/meminfo's MemAvailable in bytes; None where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_host_memory(need: int) -> None:
    """Refuse, before a weight is read, to park an expert of `need` bytes in pinned memory the host does not have
    (pinned pages cannot be swapped: the kernel's OOM killer would end this rank instead, mid-load)."""
    available = host_memory_available()
    if available is not None and available < need + PIN_MARGIN_BYTES:
        raise ValueError(f"model.offload_idle_expert parks the idle expert in pinned host memory on every GPU's "
                         f"process: this one needs {need / 2**30:.1f} GiB (+{PIN_MARGIN_BYTES >> 30} GiB margin) but "
                         f"the host has {available / 2**30:.1f} GiB available: turn it off and use "
                         f"parallel.shard_weights (--shard-weights) to fit both experts, or free host memory")


@torch.no_grad()
def _pin(module: torch.nn.Module) -> None:
    """Move a CPU module's parameters and buffers into page-locked memory (fast, asynchronous copies to the GPU)."""
    for t in (*module.parameters(), *module.buffers()):
        t.data = t.data.pin_memory()
