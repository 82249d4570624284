"""Ulysses wire options, ring attention and Ulysses x Ring side by side: gloo, one thread per process, bf16,
12 heads x 128.

Every variant of a table is timed in the same run, interleaved, so the ratios compare like with like:
- comm (2 processes): the two all-to-alls of one Ulysses call (sequence->heads for Q, K, V, heads->sequence for the
  output) without the attention in between, and the ring's K/V passes (P-1 batched isend/irecv) without it;
  bytes each rank sends per call.
- call (2 processes): the whole ulysses_attention / ring_attention call, attention included (where head_chunks
  and the ring overlap the wire with compute).
- mesh (4 processes, --mesh-tokens; 0 skips it): Ulysses 4, ring 4 and Ulysses 2 x Ring 2 (Ulysses groups {0,1},
  {2,3}, rings {0,2}, {1,3}), whole calls, and the bytes rank 0 sends per call (= per layer), split into the
  all-to-all (inside a node) and ring (across nodes) parts. 4 processes share this machine's cores: the ratios
  say how the schemes compare on equal footing here, not on a real cluster.

    python bench/attention_comm.py                      # 1k..16k tokens comm, 1k..4k full calls, mesh 1k..4k
    python bench/attention_comm.py --tokens 1024 --call-tokens 1024 --mesh-tokens 1024 --reps 3   # quick
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

from attention import ring_attention, ulysses_attention  # noqa: E402
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


def _bytes_sent(tokens, world, rank, opts, dtype, heads=HEADS):
    """Bytes this rank sends to other ranks in one Ulysses call (inbound Q, K, V plus the outbound output)."""
    layout = HeadLayout(heads, world, 1)
    codec = FP8Codec() if opts.get("fp8_comm") else NativeCodec()
    wire_dtype, width = codec.wire(dtype, HEAD_DIM)
    item = torch.empty(0, dtype=wire_dtype).element_size()
    L = tokens // world
    others = heads - layout.counts[rank]
    return (3 * L * others + L * others) * width * item


def _ring_bytes_sent(tokens, world, dtype, heads=HEADS):
    """Bytes each rank sends in one ring call over `tokens` gathered tokens: its K and V block (P-1 hops)."""
    L = tokens // world
    return (world - 1) * 2 * L * heads * HEAD_DIM * torch.empty(0, dtype=dtype).element_size()


def _hybrid_bytes_sent(tokens, U, R, rank, dtype):
    """(all-to-all bytes inside the Ulysses group, ring bytes across it) rank `rank` sends in one U x R call."""
    heads_here = HeadLayout(HEADS, U, 1).counts[rank % U]
    return (_bytes_sent(tokens // R, U, rank % U, {}, dtype),
            _ring_bytes_sent(tokens, R, dtype, heads_here))  # ring block: U*L tokens of this rank's heads


def _ring_comm_round(k, v, world, rank, group):
    """The ring's K/V passes alone: world-1 batched isend/irecv hops of a [2, B, L, H, D] block."""
    kv = torch.stack((k, v))
    for _ in range(world - 1):
        incoming = torch.empty_like(kv)
        ops = [dist.P2POp(dist.isend, kv, (rank + 1) % world, group),
               dist.P2POp(dist.irecv, incoming, (rank - 1) % world, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        kv = incoming


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
            if table == "comm":
                fn = lambda: _ring_comm_round(k, v, world, rank, group)  # noqa: E731
            else:
                fn = lambda: ring_attention(q, k, v, group=group)  # noqa: E731
            dist.barrier()
            times["ring"] = _time(fn, args.reps)
            chosen = plan_fuse(group, HeadLayout(HEADS, world, 1), rank, NativeCodec(), q, torch.device("cpu"))
            sent = {n: _bytes_sent(tokens, world, rank, o, dtype) for n, o in VARIANTS.items()}
            sent["ring"] = _ring_bytes_sent(tokens, world, dtype)
            rows.append((table, tokens, times, sent, chosen))
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def _mesh_worker(rank, world, port, args, results):
    """Ulysses `world`, ring `world` and Ulysses 2 x Ring world/2 on the same tokens, whole calls."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    U, R = 2, world // 2
    ulysses_groups = [dist.new_group(list(range(i * U, (i + 1) * U))) for i in range(R)]
    ring_groups = [dist.new_group(list(range(j, world, U))) for j in range(U)]
    group, ring_group = ulysses_groups[rank // U], ring_groups[rank % U]
    dtype, rows = torch.bfloat16, []
    for tokens in args.mesh_tokens:
        L = tokens // world
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, L, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(3))
        calls = {
            f"ulysses {world}": lambda: ulysses_attention(q, k, v, fuse_qkv=True),
            f"ring {world}": lambda: ring_attention(q, k, v),
            f"ulysses {U} x ring {R}": lambda: ulysses_attention(q, k, v, group=group, ring_group=ring_group,
                                                                fuse_qkv=True),
        }
        times = {}
        for name, fn in calls.items():
            dist.barrier()
            times[name] = _time(fn, args.reps)
        sent = {f"ulysses {world}": (_bytes_sent(tokens, world, rank, {}, dtype), 0),
                f"ring {world}": (0, _ring_bytes_sent(tokens, world, dtype)),
                f"ulysses {U} x ring {R}": _hybrid_bytes_sent(tokens, U, R, rank, dtype)}
        rows.append((tokens, times, sent))
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def _spawn(target, world, args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    rows = results.get()
    for p in procs:
        p.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384],
                        help="global sequence lengths for the comm table (comma separated)")
    parser.add_argument("--call-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096],
                        help="global sequence lengths for the full-call table")
    parser.add_argument("--mesh-tokens", type=lambda s: [int(x) for x in s.split(",") if int(x)], default=[1024, 4096],
                        help="global sequence lengths for the 4-process mesh table (0: skip it)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    world = 2
    rows = _spawn(_worker, world, args)

    print(f"gloo, {world} processes x 1 thread, bf16, {HEADS} heads x {HEAD_DIM}, median of {args.reps}; "
          f"ratio = time / fused time (lower is better)")
    names = [*VARIANTS, "ring"]
    for table in ("comm", "call"):
        print(f"\n{table}: " + ("the two all-to-alls only; ring: its K/V passes only" if table == "comm"
                                else "whole ulysses_attention / ring_attention call"))
        print("| tokens | " + " | ".join(names) + " | auto chose |")
        print("|---|" + "---|" * (len(names) + 1))
        for t, tokens, times, sent, chosen in rows:
            if t != table:
                continue
            cells = [f"{times[n] * 1e3:.1f} ms ({times[n] / times['fused']:.2f}x)" for n in names]
            print(f"| {tokens} | " + " | ".join(cells) + f" | {'fused' if chosen else 'unfused'} |")
        if table == "comm":
            print("\nbytes sent per rank per call: " + ", ".join(
                f"{n}: {rows[0][3][n] / 2**20:.2f} MiB" for n in ("fused", "fp8 fused", "ring"))
                + f" (at {rows[0][1]} tokens)")
    if not args.mesh_tokens:
        return
    mesh_world = 4
    mesh_rows = _spawn(_mesh_worker, mesh_world, args)
    names = list(mesh_rows[0][1])
    print(f"\nmesh: {mesh_world} processes x 1 thread on this machine, whole calls, median of {args.reps}; "
          f"ratio = time / {names[0]} time")
    print("| tokens | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for tokens, times, _ in mesh_rows:
        cells = [f"{times[n] * 1e3:.1f} ms ({times[n] / times[names[0]]:.2f}x)" for n in names]
        print(f"| {tokens} | " + " | ".join(cells) + " |")
    tokens, _, sent = mesh_rows[-1]
    print(f"\nbytes rank 0 sends per call (per layer) at {tokens} tokens, all-to-all + ring: " + ", ".join(
        f"{n}: {a / 2**20:.2f} + {r / 2**20:.2f} MiB" for n, (a, r) in sent.items()))


if __name__ == "__main__":
    main()
