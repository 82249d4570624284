"""Single-device attention behind one entry point with named backends.

Legend: B batch, S query tokens, T key tokens, H heads, D head dim.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["local_attention", "local_attention_lse", "available_backends", "resolve_backend", "BACKENDS"]

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


# --------------------------------------------------------------------------------------------------------------
# Attention that also returns the log-sum-exp of each query's scaled scores (what ring attention merges by)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _explicit_lse(q_BSHD, k_BTHD, v_BTHD, max_scores: int = 2**26):
    """Softmax written out in fp32 (fp64 for fp64 inputs), in query chunks of at most ~max_scores scores so that
    long sequences fit; softmax is row-wise, so chunking is exact. Returns (out [B,S,H,D], lse [B,H,S])."""
    acc = _lse_dtype(q_BSHD.dtype)
    B, S, H, D = q_BSHD.shape
    k, v = k_BTHD.to(acc), v_BTHD.to(acc)
    rows = max(1, max_scores // max(1, B * H * k.shape[1]))
    outs, lses = [], []
    for i in range(0, S, rows):
        scores_BHST = torch.einsum("bshd,bthd->bhst", q_BSHD[:, i : i + rows].to(acc), k) / math.sqrt(D)
        lse_BHS = torch.logsumexp(scores_BHST, dim=-1)
        probs_BHST = torch.exp(scores_BHST - lse_BHS.unsqueeze(-1))
        outs.append(torch.einsum("bhst,bthd->bshd", probs_BHST, v))
        lses.append(lse_BHS)
    return torch.cat(outs, 1).to(q_BSHD.dtype), torch.cat(lses, -1)


# (dtype, head_dim, device index, query and key lengths rounded up to a power of two) -> the CUDA aten kernel that
# accepted it last time, so a kernel that refuses such a shape is tried once, not on every call; a new size class
# (kernels also refuse by length) tries them all again.
_CUDA_LSE_KERNEL: dict[tuple, str] = {}
# Errors that say nothing about whether a kernel takes a shape (torch.AcceleratorError: torch >= 2.8)
_FATAL = (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))


def _cuda_sdpa_lse(q_BHSD, k_BHTD, v_BHTD):
    """torch's fused CUDA kernels that return a real log-sum-exp, fastest first: cuDNN (fp16/bf16; as fast as
    F.scaled_dot_product_attention, measured on an H200), flash (fp16/bf16; ~1.6x slower there), memory-efficient
    (fp32 too; its LSE is padded to a multiple of 32 queries). Not the math path: it returns weights, not an LSE.
    None accepting the tensors -> None (the caller computes it explicitly)."""
    S = q_BHSD.shape[2]
    key = (q_BHSD.dtype, q_BHSD.shape[-1], q_BHSD.device.index, 1 << (S - 1).bit_length(),
           1 << (k_BHTD.shape[2] - 1).bit_length())
    tried = [_CUDA_LSE_KERNEL[key]] if key in _CUDA_LSE_KERNEL else ["cudnn", "flash", "efficient", "explicit"]
    for name in tried:
        try:
            if name == "cudnn" and q_BHSD.dtype in (torch.float16, torch.bfloat16):
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(q_BHSD, k_BHTD, v_BHTD, None, True)
                out_BHSD, lse_BHS = res[0], res[1].reshape(res[1].shape[:3])  # cuDNN's LSE is [B, H, S, 1]
            elif name == "flash" and q_BHSD.dtype in (torch.float16, torch.bfloat16):
                res = torch.ops.aten._scaled_dot_product_flash_attention(q_BHSD, k_BHTD, v_BHTD, 0.0, False, False)
                out_BHSD, lse_BHS = res[0], res[1]
            elif name == "efficient" and q_BHSD.dtype != torch.float64:
                res = torch.ops.aten._scaled_dot_product_efficient_attention(q_BHSD, k_BHTD, v_BHTD, None, True)
                out_BHSD, lse_BHS = res[0], res[1][..., :S]
            elif name == "explicit":
                _CUDA_LSE_KERNEL[key] = name
                log.warning("attention with log-sum-exp: no fused CUDA kernel takes %s queries %s keys head_dim %d "
                            "(%s); computing it in fp32 chunks, slower", S, k_BHTD.shape[2], q_BHSD.shape[-1],
                            q_BHSD.dtype)
                return None
            else:
                continue
        except _FATAL:
            raise  # out of memory or a CUDA fault is not "this kernel refuses the shape": never fall back on it
        except (RuntimeError, NotImplementedError):  # the kernel refuses this dtype/head_dim/length/GPU/build
            continue
        _CUDA_LSE_KERNEL[key] = name
        return out_BHSD, lse_BHS
    return None


def _sdpa_lse(q_BSHD, k_BTHD, v_BTHD):
    q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BTHD, v_BTHD))
    if q.is_cuda:
        res = _cuda_sdpa_lse(q, k, v)
    elif q.device.type == "cpu":
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    else:
        res = None
    if res is None:
        return _explicit_lse(q_BSHD, k_BTHD, v_BTHD)
    return res[0].transpose(1, 2), res[1]


def _flash_lse(q_BSHD, k_BTHD, v_BTHD):
    fn = _flash_impl()
    try:
        res = fn(q_BSHD, k_BTHD, v_BTHD, return_attn_probs=True)  # FA2: (out, softmax_lse, probs); FA3: (out, lse)
    except TypeError:  # FA3 builds without the argument always return (out, softmax_lse)
        res = fn(q_BSHD, k_BTHD, v_BTHD)
    assert isinstance(res, tuple) and len(res) >= 2, "flash_attn_func returned no softmax_lse"
    return res[0], res[1]


_LSE_IMPLS = {"flash": _flash_lse, "sdpa": _sdpa_lse, "reference": _explicit_lse}


def local_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    kv_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `local_attention`, plus each query's log-sum-exp of its scaled scores (q.k/sqrt(D)) over the keys.

    Returns (out ``[B, S, H, D]`` in q's dtype, lse ``[B, H, S]`` in fp32, fp64 for fp64 inputs).
    Where the LSE comes from: flash-attn's softmax_lse; sdpa on CPU
    aten._scaled_dot_product_flash_attention_for_cpu; sdpa on CUDA aten's cuDNN, flash or memory-efficient kernel
    (the first that accepts the tensors), else the explicit softmax; reference: the explicit softmax in fp32/fp64.
    """
    k, v = _check(q, k, v, kv_len, "local_attention_lse")
    out, lse = _LSE_IMPLS[resolve_backend(backend, q)](q, k, v)
    return out, lse.to(_lse_dtype(q.dtype))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int | None, who: str):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{who} expects [B, S, H, D] tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"{who} shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{who} dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if kv_len is not None:
        if not 0 < kv_len <= k.shape[1]:
            raise ValueError(f"kv_len must be in 1..{k.shape[1]}, got {kv_len}")
        # Dropping the padded keys is exact and cheaper than masking them.
        k, v = k[:, :kv_len], v[:, :kv_len]
    return k, v


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
    k, v = _check(q, k, v, kv_len, "local_attention")
    return _IMPLS[resolve_backend(backend, q)](q, k, v)
