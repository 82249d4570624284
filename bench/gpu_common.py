"""What the checks of bench/gpu_check.py share: rows, sizes, timing, peak memory, a one-rank process group."""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from bench.dit_vs_diffusers import _median_time as median_time  # noqa: F401 (one warm-up, synced)
from bench.dit_vs_diffusers import _sync as sync

BF16 = torch.bfloat16


class Skip(Exception):
    """Raised by a check that cannot run here; the message is the reason."""


class CheckFailed(Exception):
    """Raised by a check whose figures are out of bounds; the message says which."""


@dataclass
class Row:
    name: str
    status: str = "ok"  # ok | FAIL | skipped
    note: str = ""  # the reason for a skip or a failure
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Sizes:
    attn_tokens: int
    attn_heads: int
    attn_dim: int
    dit_layers: int
    dit_short_layers: int  # the first layers of both models, compared with a tight bound
    dit_dims: dict  # WanDiTConfig overrides (the 1.3B shape unless cut down for the CPU)
    dit_latent: tuple
    vae_latent: tuple  # (T, h, w) latent frames and grid
    reps: int
    embedded_prompts: int  # of the 40 canonical ones (every k-th)


def sizes_for(device: torch.device, quick: bool) -> Sizes:
    if device.type == "cuda":
        return Sizes(attn_tokens=8192 if quick else 32760, attn_heads=12, attn_dim=128, dit_layers=30,
                     dit_short_layers=2, dit_dims={},
                     dit_latent=(21, 60, 104), vae_latent=(6 if quick else 21, 60, 104), reps=2 if quick else 5,
                     embedded_prompts=40)
    # CPU: the same code at small sizes (full 1.3B layer widths, few tokens)
    small = dict(dim=1536, ffn_dim=8960, num_heads=12)
    if quick:
        return Sizes(attn_tokens=512, attn_heads=12, attn_dim=128, dit_layers=2, dit_short_layers=1, dit_dims=small,
                     dit_latent=(2, 8, 8), vae_latent=(2, 4, 4), reps=1, embedded_prompts=4)
    return Sizes(attn_tokens=2048, attn_heads=12, attn_dim=128, dit_layers=3, dit_short_layers=2, dit_dims=small,
                 dit_latent=(3, 16, 16), vae_latent=(2, 8, 16), reps=2, embedded_prompts=40)


@dataclass
class Ctx:
    device: torch.device
    quick: bool
    sizes: Sizes
    tmp: Path


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since reset_peak; None on CPU (no per-check figure there)."""
    if device.type != "cuda":
        return None
    sync(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def store_url() -> str:
    """init_method for a one-rank group: a fresh file store, so no port is picked (and raced for) on a shared host."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="gpu_check-store-")
    os.close(fd)
    os.unlink(path)  # FileStore creates it; a stale file would hold another group's keys
    return f"file://{path}"


def first_line(e: BaseException, limit: int = 160) -> str:
    return " ".join(str(e).split())[:limit]


def optional(module: str):
    """The module, or Skip with why it cannot be imported."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install (diffusers with a missing dependency)
        raise Skip(f"{module} does not import ({type(e).__name__}: {first_line(e, 80)})") from None


def diffusers_class(name: str):
    """diffusers.<name>, or Skip with why not. `import diffusers` is lazy: it succeeds even where the model's own
    module (or a dependency of it) fails, which only shows when the class is looked up, so look it up here."""
    module = optional("diffusers")
    try:
        return getattr(module, name)
    except Exception as e:  # diffusers wraps the submodule's ImportError in a RuntimeError
        raise Skip(f"diffusers.{name} does not import ({type(e).__name__}: {first_line(e)})") from None


@contextlib.contextmanager
def loopback_gloo():
    """GLOO_SOCKET_IFNAME=lo (unless set) for one-rank gloo groups, whatever the host's name resolves to; restored."""
    before = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)


@contextlib.contextmanager
def no_tf32():
    """Full fp32 convolutions and matmuls on CUDA (cuDNN uses TF32 for convs by default); restored after."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@contextlib.contextmanager
def one_rank_group(device: torch.device, timeout_s: float = 120.0):
    """A one-rank process group: NCCL on CUDA, gloo on CPU; destroyed on exit."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    with loopback_gloo():
        dist.init_process_group(backend, init_method=store_url(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
