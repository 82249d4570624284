from __future__ import annotations

import math

import pytest
import torch

from attention import available_backends, local_attention


def naive(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    w = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.shape[-1]), -1)
    return torch.einsum("bhst,bthd->bshd", w, v)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2)])
def test_backends_match_naive(backend, dtype, tol):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 3, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, 11, 3, 16, generator=g).to(dtype) for _ in range(2))  # cross-attention lengths
    out = local_attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert (out.double() - naive(q, k, v)).abs().max() < tol


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_kv_len_ignores_the_tail(backend):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 8, generator=g) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:], v2[:, 5:] = 1e4, -1e4  # garbage past kv_len must not matter
    out = local_attention(q, k2, v2, backend=backend, kv_len=5)
    assert (out.double() - naive(q, k[:, :5], v[:, :5])).abs().max() < 1e-5


def test_errors_list_the_available_backends():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"unknown attention backend 'magic'; available: auto, .*sdpa, reference"):
        local_attention(q, q, q, backend="magic")
    if "flash" not in available_backends():
        with pytest.raises(ValueError, match="'flash' is unavailable.*available: auto"):
            local_attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="kv_len"):
        local_attention(q, q, q, kv_len=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        local_attention(q, q[:, :, :1], q)
    with pytest.raises(ValueError, match="dtype mismatch"):
        local_attention(q, q.double(), q)


def test_cuda_lse_kernel_choice_falls_back_on_refusals_only(monkeypatch):
    # The CUDA LSE path tries cuDNN, flash, memory-efficient in turn when a kernel refuses a shape (RuntimeError),
    # and caches the one that took it; an out-of-memory error must surface instead of silently caching a slower,
    # heavier kernel for good. Faked aten ops: this machine has no CUDA.
    import types

    import attention.local as L

    calls = []

    def refuse(name, error):
        def f(*a, **k):
            calls.append(name)
            raise error
        return f

    def flash(q, k, v, *a):
        calls.append("flash")
        return torch.zeros_like(q), torch.zeros(q.shape[:3])

    aten = types.SimpleNamespace(
        _scaled_dot_product_cudnn_attention=refuse("cudnn", RuntimeError("cuDNN: no kernel for this shape")),
        _scaled_dot_product_flash_attention=flash,
        _scaled_dot_product_efficient_attention=refuse("efficient", RuntimeError("unsupported")))
    shim = types.SimpleNamespace(ops=types.SimpleNamespace(aten=aten), float16=torch.float16,
                                 bfloat16=torch.bfloat16, float64=torch.float64)
    monkeypatch.setattr(L, "torch", shim)
    monkeypatch.setattr(L, "_CUDA_LSE_KERNEL", {})
    q = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    assert L._cuda_sdpa_lse(q, q, q) is not None and calls == ["cudnn", "flash"]
    assert list(L._CUDA_LSE_KERNEL.values()) == ["flash"]
    calls.clear()
    L._cuda_sdpa_lse(q, q, q)
    assert calls == ["flash"], "the cached kernel is used directly"
    # a new length class tries them all again
    calls.clear()
    long_q = torch.zeros(1, 2, 1000, 64, dtype=torch.bfloat16)
    L._cuda_sdpa_lse(long_q, long_q, long_q)
    assert calls == ["cudnn", "flash"]
    # out of memory is raised, never cached as a refusal
    aten._scaled_dot_product_cudnn_attention = refuse("cudnn", torch.OutOfMemoryError("CUDA out of memory"))
    L._CUDA_LSE_KERNEL.clear()
    calls.clear()
    with pytest.raises(torch.OutOfMemoryError):
        L._cuda_sdpa_lse(q, q, q)
    assert calls == ["cudnn"] and not L._CUDA_LSE_KERNEL
