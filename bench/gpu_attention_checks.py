"""Checks 1 and 3 of bench/gpu_check.py: local attention backends, Ulysses on a one-rank group, the fp8 codec.

Legend: B batch, L local tokens, T joint tokens, H heads, D head dim, N rows.
"""

from __future__ import annotations

import itertools
import time

import torch

from attention import local_attention
from attention.local import available_backends
from bench.gpu_common import BF16, CheckFailed, Ctx, Row, median_time, one_rank_group, rel_l2

# --------------------------------------------------------------------------------------------------------------
# 1. local attention


def reference_fp64(q, k, v, chunk_scores: int = 2**28):
    """fp64 softmax attention of q, k, v written out here (not local_attention's code, so every backend, reference
    included, is measured against an independent yardstick), in query chunks whose scores fit ~chunk_scores
    doubles (the whole 32k x 32k x 12 score tensor would be 96 GiB). Row-wise softmax makes chunking exact."""
    B, S, H, D = q.shape
    rows = max(1, chunk_scores // (B * H * k.shape[1]))
    k_BHTD, v_BHTD = k.double().transpose(1, 2), v.double().transpose(1, 2)
    out = []
    for i in range(0, S, rows):
        q_BHSD = q[:, i : i + rows].double().transpose(1, 2)
        p_BHST = torch.softmax(q_BHSD @ k_BHTD.transpose(-1, -2) / D**0.5, dim=-1)
        out.append((p_BHST @ v_BHTD).transpose(1, 2))
        del p_BHST
    return torch.cat(out, 1)


def check_local_attention(ctx: Ctx, row: Row) -> None:
    s, dev = ctx.sizes, ctx.device
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, s.attn_tokens, s.attn_heads, s.attn_dim, generator=g, device=dev).to(BF16)
               for _ in range(3))
    truth = reference_fp64(q, k, v)  # the same bf16 inputs, upcast
    backends = ["flash", "sdpa", "reference"]
    missing = [b for b in backends if b not in available_backends()]
    row.figures["shape"] = f"{s.attn_tokens} tok x {s.attn_heads} heads x {s.attn_dim}, bf16"
    bad = []
    for name in backends:
        if name in missing:
            row.figures[name] = "skipped: flash-attn not installed" if dev.type == "cuda" else "skipped: needs CUDA"
            continue
        if name == "reference":  # explicit scores: chunked like the yardstick, so it fits at 32k tokens
            fn = lambda: torch.cat([local_attention(q[:, i : i + 2048], k, v, backend="reference")  # noqa: E731
                                    for i in range(0, q.shape[1], 2048)], 1)
        else:
            fn = lambda name=name: local_attention(q, k, v, backend=name)  # noqa: E731
        out = fn()
        assert out.dtype == BF16 and out.device == q.device, (out.dtype, out.device)
        err, mx = rel_l2(out, truth), float((out.double() - truth).abs().max())
        seconds = median_time(fn, s.reps, dev)
        chunked = " (2048-query chunks)" if name == "reference" else ""
        row.figures[name] = f"rel err {err:.1e}, max {mx:.1e} vs fp64, {seconds * 1e3:.2f} ms/call{chunked}"
        # bf16 output rounding alone is ~2e-3 relative; a wrong kernel is O(1)
        if not err < 1e-2:
            bad.append(f"{name} rel err {err:.2e}")
    if bad:
        raise CheckFailed("; ".join(bad))


# --------------------------------------------------------------------------------------------------------------
# 3. Ulysses on a one-rank group


def fp8_round_trip(x: torch.Tensor) -> tuple[float, float]:
    """Encode x [N, D] with FP8Codec on its device and decode there and on the CPU. Returns (worst error as a
    fraction of its vector's amax, worst error relative to itself among normal-range elements); raises
    CheckFailed if the device and CPU decodes differ."""
    from attention.comm import E4M3_MAX, FP8Codec

    codec = FP8Codec()
    dtype, width = codec.wire(x.dtype, x.shape[-1])
    rows = torch.empty((x.shape[0], width), dtype=dtype, device=x.device)
    codec.encode_into(rows, x)
    back = codec.decode(rows, x.shape[-1], torch.float32)
    on_cpu = codec.decode(rows.cpu(), x.shape[-1], torch.float32)
    if not torch.equal(back.cpu(), on_cpu):
        raise CheckFailed(f"fp8 decode on {x.device} differs from the CPU table decode")
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    err = (back - xf).abs()
    normal = xf.abs() >= amax * 2.0**-6 / E4M3_MAX * 2  # scaled value in e4m3's normal range
    return float((err / amax).max()), float((err[normal] / xf.abs()[normal]).max())


# Same math on the same inputs is expected bit-for-bit (reported as "bitwise"); a GPU kernel picked differently
# for a strided view may move the last bf16 bit, so only more than this relative error fails.
SAME = 1e-3


def check_ulysses(ctx: Ctx, row: Row) -> None:
    from attention import ulysses_attention
    from attention.comm import FP8Codec, HeadLayout, HeadToSeq, NativeCodec, SeqToHead, plan_fuse

    dev = ctx.device
    g = torch.Generator(device=dev).manual_seed(1)
    B, L, H, D, T = 1, 96, 12, 128, 16
    q, k, v = (torch.randn(B, L, H, D, generator=g, device=dev).to(BF16) for _ in range(3))
    jq, jk, jv = (torch.randn(B, T, H, D, generator=g, device=dev).to(BF16) for _ in range(3))
    problems = []
    with one_rank_group(dev) as group:
        row.figures["backend"] = str(torch.distributed.get_backend(group))
        # (a) validation and the P=1 path: every option combination through ulysses_attention. With one rank it
        # validates the options and attends locally before any codec or all-to-all, so fp8/fused/chunked are only
        # accepted here, not exercised: (c) runs those on the wire.
        n = exact = 0
        for fuse, fp8, chunks, seq_len, joint in itertools.product(
                (True, False, "auto"), (False, True), (1, 2), (None, L - 7), (None, "after", "first")):
            kw = dict(group=group, fuse_qkv=fuse, fp8_comm=fp8, head_chunks=chunks, seq_len=seq_len)
            if joint is None:
                got = ulysses_attention(q, k, v, **kw)
                want = local_attention(q, k, v, kv_len=seq_len)
            else:
                first = joint == "first"
                got, got_j = ulysses_attention(q, k, v, joint=(jq, jk, jv), joint_first=first, **kw)
                kk, vv = k[:, : seq_len or L], v[:, : seq_len or L]
                cat = (lambda a, b: torch.cat([b, a], 1)) if first else (lambda a, b: torch.cat([a, b], 1))
                full = local_attention(cat(q, jq), cat(kk, jk), cat(vv, jv))
                want, want_j = (full[:, T:], full[:, :T]) if first else (full[:, :L], full[:, L:])
                got, want = torch.cat([got, got_j], 1), torch.cat([want, want_j], 1)
            exact += torch.equal(got, want)
            if not rel_l2(got, want) < SAME:
                problems.append(f"P=1 path differs: fuse={fuse} fp8={fp8} chunks={chunks} seq_len={seq_len} "
                                f"joint={joint}")
            n += 1
        row.figures["p1_path_combos_bitwise"] = f"{exact}/{n}"
        # (b) the fp8 codec round trip on this device
        x = torch.randn(4096, D, generator=g, device=dev) * torch.logspace(-3, 3, 4096, device=dev)[:, None]
        of_amax, of_self = fp8_round_trip(x)
        row.figures["fp8_err_of_amax"] = f"{of_amax:.4f}"
        row.figures["fp8_err_of_self"] = f"{of_self:.4f}"
        if not (of_amax <= 1 / 28 and of_self <= 2.0**-4):
            problems.append(f"fp8 round trip error {of_amax:.4f} of amax, {of_self:.4f} of itself")
        # (c) the codecs, fused QKV and head chunks: the real SeqToHead/HeadToSeq all-to-alls on this group,
        # sequence -> heads -> attention -> sequence, as ulysses_attention runs them for P > 1
        wire_exact = 0
        for codec, fused, chunks in itertools.product((NativeCodec(), FP8Codec()), (True, False), (1, 3)):
            layout = HeadLayout(H, 1, chunks)
            to_heads, to_seq = SeqToHead(layout, 0, codec, fused, group), HeadToSeq(layout, 0, codec, group)
            out = torch.full_like(q, float("nan"))
            for c in layout.live_chunks():
                qc, kc, vc = to_heads.finish(to_heads.start((q, k, v), c), q, c)
                to_seq.finish(to_seq.start(local_attention(qc, kc, vc), c), out, c)
            err = rel_l2(out, local_attention(q, k, v))
            key = f"wire_{codec.name}{'_fused' if fused else ''}_x{chunks}"
            if codec.name == "native":
                wire_exact += err == 0.0
                if not err < SAME:
                    problems.append(f"{key} rel err {err:.1e} (a native wire is lossless)")
            if codec.name == "fp8":
                row.figures[key] = f"{err:.3f}"
                if not err < 0.08:  # documented 4.5-5.3% at these sizes
                    problems.append(f"{key} rel err {err:.3f}")
        row.figures["wire_native_bitwise"] = f"{wire_exact}/4"
        # (d) fuse_qkv="auto" planning on this group: it times both ways and all_reduces; it must return
        t0 = time.perf_counter()
        comm_device = dev if dev.type == "cuda" else torch.device("cpu")
        choice = plan_fuse(group, HeadLayout(H, 1, 1), 0, NativeCodec(), q, comm_device)
        row.figures["plan_fuse"] = f"{'fused' if choice else 'unfused'} in {time.perf_counter() - t0:.2f} s"
    if problems:
        raise CheckFailed("; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
