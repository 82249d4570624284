"""Ulysses wire options side by side: gloo, 2 processes, one thread each, bf16, 12 heads x 128.

Two tables, every variant timed in the same run, interleaved, so the ratios compare like with like:
- comm: the two all-to-alls of one attention call (sequence->heads for Q, K, V, heads->sequence for the output)
  without the attention in between; bytes each rank sends to the other rank per call.
- call: the whole ulysses_attention call, attention included (where head_chunks can overlap the wire with compute).

    python bench/attention_comm.py                      # 1k..16k tokens comm, 1k..4k full calls
    python bench/attention_comm.py --tokens 1024 --call-tokens 1024 --reps 3   # quick
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import ulysses_attention  # noqa: E402
from attention.comm import FP8Codec, HeadLayout, HeadToSeq, NativeCodec, SeqToHead, plan_fuse  # noqa: E402

HEADS, HEAD_DIM = 12, 128

# name -> ulysses_attention options
VARIANTS = {
    "fused": dict(fuse_qkv=True),
    "unfused": dict(fuse_qkv=False),
    "auto": dict(fuse_qkv="auto"),
    "fp8 unfused": dict(fuse_qkv=False, fp8_comm=True),
    "fp8 fused": dict(fuse_qkv=True, fp8_comm=True),
    "chunks=2": dict(fuse_qkv=False, head_chunks=2),
    "chunks=3": dict(fuse_qkv=False, head_chunks=3),
}


def _comm_round(q, layout, rank, group, fuse, fp8):
    codec = FP8Codec() if fp8 else NativeCodec()
    to_heads, to_seq = SeqToHead(layout, rank, codec, fuse, group), HeadToSeq(layout, rank, codec, group)
    out = torch.empty_like(q)
    for c in layout.live_chunks():
        qc, _, _ = to_heads.finish(to_heads.start((q, q, q), c), q, c)
        to_seq.finish(to_seq.start(qc, c), out, c)


def _bytes_sent(tokens, world, rank, opts, dtype):
    """Bytes this rank sends to other ranks in one call (inbound Q, K, V plus the outbound output)."""
    layout = HeadLayout(HEADS, world, 1)
    codec = FP8Codec() if opts.get("fp8_comm") else NativeCodec()
    wire_dtype, width = codec.wire(dtype, HEAD_DIM)
    item = torch.empty(0, dtype=wire_dtype).element_size()
    L = tokens // world
    others = HEADS - layout.counts[rank]
    return (3 * L * others + L * others) * width * item


def _time(fn, reps):
    fn()  # warm-up (and, for auto, the one-off measurement)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _worker(rank, world, port, args, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    group = dist.group.WORLD
    dtype = torch.bfloat16
    rows = []
    for table, token_list in (("comm", args.tokens), ("call", args.call_tokens)):
        for tokens in token_list:
            L = tokens // world
            g = torch.Generator().manual_seed(rank)
            q, k, v = (torch.randn(1, L, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(3))
            times = {}
            for name, opts in VARIANTS.items():
                if table == "comm":
                    layout = HeadLayout(HEADS, world, opts.get("head_chunks", 1))
                    codec = FP8Codec() if opts.get("fp8_comm") else NativeCodec()
                    fuse = opts["fuse_qkv"]
                    if fuse == "auto":
                        fuse = plan_fuse(group, layout, rank, codec, q, torch.device("cpu"))
                    fn = lambda: _comm_round(q, layout, rank, group, fuse, opts.get("fp8_comm", False))  # noqa: E731
                else:
                    fn = lambda: ulysses_attention(q, k, v, group=group, **opts)  # noqa: E731
                dist.barrier()
                times[name] = _time(fn, args.reps)
            chosen = plan_fuse(group, HeadLayout(HEADS, world, 1), rank, NativeCodec(), q, torch.device("cpu"))
            rows.append((table, tokens, times, {n: _bytes_sent(tokens, world, rank, o, dtype)
                                                for n, o in VARIANTS.items()}, chosen))
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384],
                        help="global sequence lengths for the comm table (comma separated)")
    parser.add_argument("--call-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096],
                        help="global sequence lengths for the full-call table")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    rows = results.get()
    for p in procs:
        p.join()

    print(f"gloo, {world} processes x 1 thread, bf16, {HEADS} heads x {HEAD_DIM}, median of {args.reps}; "
          f"ratio = time / fused time (lower is better)")
    names = list(VARIANTS)
    for table in ("comm", "call"):
        print(f"\n{table}: " + ("the two all-to-alls only" if table == "comm" else "whole ulysses_attention call"))
        print("| tokens | " + " | ".join(names) + " | auto chose |")
        print("|---|" + "---|" * (len(names) + 1))
        for t, tokens, times, sent, chosen in rows:
            if t != table:
                continue
            cells = [f"{times[n] * 1e3:.1f} ms ({times[n] / times['fused']:.2f}x)" for n in names]
            print(f"| {tokens} | " + " | ".join(cells) + f" | {'fused' if chosen else 'unfused'} |")
        if table == "comm":
            print("\nbytes sent per rank per call: " + ", ".join(
                f"{n}: {rows[0][3][n] / 2**20:.2f} MiB" for n in ("fused", "fp8 fused")) + f" (at {rows[0][1]} tokens)")


if __name__ == "__main__":
    main()
