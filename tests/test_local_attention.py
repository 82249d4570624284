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
