"""Single-device attention behind one entry point with named backends.

Legend: B batch, S query tokens, T key tokens, H heads, D head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["local_attention", "available_backends", "resolve_backend", "BACKENDS"]

BACKENDS = ("flash", "sdpa", "reference")


@functools.cache
def _flash_impl() -> Callable | None:
    """flash_attn_func from FlashAttention-3 (Hopper) or -2, whichever is installed."""
    try:
        from flash_attn_interface import flash_attn_func  # FA3

        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # FA2

        return flash_attn_func
    except ImportError:
        return None


def available_backends() -> list[str]:
    """Backends usable in this process (for some tensors)."""
    names = ["sdpa", "reference"]
    if _flash_impl() is not None and torch.cuda.is_available():
        names.insert(0, "flash")
    return names


def _flash_can_run(q: torch.Tensor) -> bool:
    return (
        _flash_impl() is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
    )


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The concrete backend name for these tensors; ValueError if it cannot run them."""
    if backend == "auto":
        return "flash" if _flash_can_run(q) else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; available: {', '.join(['auto', *available_backends()])}"
        )
    if backend == "flash" and not _flash_can_run(q):
        why = (
            "flash-attn is not installed (pip install 'odyssey[flash]')"
            if _flash_impl() is None
            else f"it needs CUDA fp16/bf16 tensors with head_dim <= 256, got {q.dtype} on {q.device} "
            f"with head_dim {q.shape[-1]}"
        )
        raise ValueError(
            f"attention backend 'flash' is unavailable: {why}; available: "
            f"{', '.join(['auto', *available_backends()])}"
        )
    return backend


def _sdpa(q_BSHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> torch.Tensor:
    out_BHSD = F.scaled_dot_product_attention(
        q_BSHD.transpose(1, 2), k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2)
    )
    return out_BHSD.transpose(1, 2)


def _reference(q_BSHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> torch.Tensor:
    # Explicit softmax in fp64 for fp64 inputs, fp32 otherwise: the yardstick the fast backends are tested against.
    acc = torch.float64 if q_BSHD.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(acc) for t in (q_BSHD, k_BTHD, v_BTHD))
    scores_BHST = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.shape[-1])
    probs_BHST = torch.softmax(scores_BHST, dim=-1)
    return torch.einsum("bhst,bthd->bshd", probs_BHST, v).to(q_BSHD.dtype)


def _flash(q_BSHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> torch.Tensor:
    out = _flash_impl()(q_BSHD, k_BTHD, v_BTHD)
    return out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)


_IMPLS = {"flash": _flash, "sdpa": _sdpa, "reference": _reference}


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    kv_len: int | None = None,
) -> torch.Tensor:
    """Softmax attention on one device: q ``[B, S, H, D]``, k and v ``[B, T, H, D]`` -> ``[B, S, H, D]``.

    backend: ``flash`` (flash-attn, CUDA fp16/bf16), ``sdpa`` (torch), ``reference`` (explicit fp32/fp64
    softmax, for tests) or ``auto`` (the fastest that can run these tensors).
    kv_len: keys and values at positions >= kv_len are ignored (padding); None means all T.
    The result may be a strided view; it has q's dtype and device.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"local_attention expects [B, S, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"local_attention shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"local_attention dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    name = resolve_backend(backend, q)
    if kv_len is not None:
        if not 0 < kv_len <= k.shape[1]:
            raise ValueError(f"kv_len must be in 1..{k.shape[1]}, got {kv_len}")
        # Dropping the padded keys is exact and cheaper than masking them.
        k, v = k[:, :kv_len], v[:, :kv_len]
    return _IMPLS[name](q, k, v)
