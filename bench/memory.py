r"""Sharded DiT weights (issue #15) vs every rank holding the whole model, measured side by side in one run.

    python bench/memory.py [--layers 30] [--tokens 256] [--reps 3] [--json FILE]
    python bench/memory.py --quick           # a tiny DiT, seconds: what tests/test_bench_memory.py runs

What runs: a Wan2.1-1.3B-shaped WanDiT (dim 1536, ffn 8960, 12 heads, --layers blocks, text 512 x 4096; random
weights, fp32, CPU) at SP=2: two processes, gloo on loopback, one torch thread each, apply_sequence_parallel. Two
variants, each in two fresh processes, one after the other (never both at once: the whole 1.3B model is 5.7 GB of
fp32 per rank):
    whole    every rank holds every parameter (what parallel.shard_weights=false does)
    sharded  pipeline.sharding.shard_dit over the two ranks (FSDP2: each block's weights all-gathered just before it
             runs, freed after, the next block's gather prefetched)
Both build the DiT on the meta device and draw every parameter whole from its own seeded generator, one at a time,
keeping this rank's rows (sharded) or all of it (whole): the same weights in both, and no rank ever holds the whole
model unless the variant does. What each rank reports:
    param bytes     pipeline.sharding.resident_param_bytes after loading, and again after the forwards (equal:
                    every gathered block was freed again)
    peak RSS        VmHWM from /proc/self/status, reset (write "5" to /proc/self/clear_refs) before loading and
                    again before the forwards: "load" includes drawing the weights, "forwards" is the steady state
    s / forward     median of --reps forwards after one warm-up (rank 0; the ranks run in lockstep)
    gathers alone   (sharded) --reps timings of one gloo all_gather_into_tensor of a block's fp32 bytes, x layers:
                    the wire part of the forward's gathers, without FSDP's copy-in/copy-out
and rank 0's output, compared across the variants (same weights, same inputs: bitwise equal expected).
On CPU the all-gathers are memory copies through gloo's loopback TCP, not NVLink or PCIe transfers overlapping GPU
compute: the time ratio measures FSDP's cost on this machine, not on a GPU node (docs/benchmarks.md works that out
on paper). Exit 1 when a variant fails, 2 for bad arguments or too little free memory for the whole-model variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import statistics
import sys
import time
import traceback
import zlib
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import WanDiT, WanDiTConfig, apply_sequence_parallel  # noqa: E402

WAN_1_3B = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
# --quick: every code path at toy sizes (4 blocks of 128 wide; text 16 x 64)
TINY = WanDiTConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=4, text_dim=64, freq_dim=32, text_len=16)
WORLD = 2
VARIANTS = ("whole", "sharded")
# glibc raises its mmap threshold to the size of each mmapped block it frees (up to 32 MB), after which the
# gathered blocks' 9-32 MB parameters come from the heap and stay in the RSS when freed: measured at 6 blocks of
# the 1.3B shape, the RSS grew 75 MB per block and ended 473 MB above its start with no tensor alive. A fixed
# threshold keeps every allocation above 1 MB in its own mapping, returned when freed, so the RSS follows the
# live bytes, in both variants alike. Set MALLOC_MMAP_THRESHOLD_ yourself to measure something else.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
COLLECTIVE_TIMEOUT_S = 600  # a 30-block fp32 forward takes ~10 s per rank here; a stuck gather must still end


# --------------------------------------------------------------------------------------------------------------
# What a rank reads about itself


def proc_status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """VmHWM := VmRSS now, so the next read is the peak of what runs in between."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# --------------------------------------------------------------------------------------------------------------
# The same random weights whatever the sharding


def local_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of rank's dim-0 chunk of n rows as FSDP2 shards: ceil(n / world) rows per rank, the last
    ranks fewer or none. Worked out here, not taken from pipeline.sharding: the expected figure is a check."""
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return start, max(0, min(chunk, n - start))


def draw(name: str, shape: torch.Size, dim: int, seed: int = 0) -> torch.Tensor:
    """Parameter `name`, whole, fp32, from its own generator (seeded by its name): nn.Linear/Conv3d's default bound
    1/sqrt(fan_in) for matrices, Wan's randn/sqrt(dim) for the modulations, norms near 1."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    full = torch.empty(shape)
    leaf = name.rsplit(".", 2)
    if name.endswith("modulation"):
        return full.normal_(generator=g).div_(dim**0.5)
    if len(leaf) > 1 and "norm" in leaf[-2]:  # RMSNorm / LayerNorm weight (and norm3's bias)
        full.uniform_(-0.05, 0.05, generator=g)
        return full.add_(1.0) if leaf[-1] == "weight" else full
    bound = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) > 1 else 1 / math.sqrt(dim)
    return full.uniform_(-bound, bound, generator=g)


def fill_random_(dit: WanDiT, group, seed: int = 0) -> None:
    """Give dit's parameters (whole, or FSDP2 DTensor shards) the same values in every variant, through the
    loader's own row filling (pipeline.sharding._fill): one whole parameter is alive at a time."""
    from pipeline.sharding import _fill

    shapes = {name: p.shape for name, p in dit.named_parameters()}  # DTensor.shape is the whole parameter's
    _fill(dit, group, lambda name, start, stop: draw(name, shapes[name], dit.config.dim, seed)[start:stop])


def expected_param_bytes(cfg: WanDiTConfig, rank: int, world: int) -> int:
    """Bytes rank holds with the blocks sharded, from the shapes alone: every non-block parameter whole, its
    dim-0 chunk of every block parameter."""
    with torch.device("meta"):
        dit = WanDiT(cfg)
    total = 0
    for name, p in dit.named_parameters():
        rows = local_rows(p.shape[0], rank, world)[1] if name.startswith("blocks.") else p.shape[0]
        total += rows * math.prod(p.shape[1:]) * p.element_size()
    return total


def whole_param_bytes(cfg: WanDiTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() * p.element_size() for p in WanDiT(cfg).parameters())


# --------------------------------------------------------------------------------------------------------------
# One rank of one variant


def inputs(latent: tuple[int, int, int], cfg: WanDiTConfig):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, cfg.in_dim, *latent, generator=g), torch.tensor([500.0]),
            torch.randn(1, cfg.text_len, cfg.text_dim, generator=g))


def median_seconds(fn, reps: int) -> float:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def gather_seconds(block: torch.nn.Module, world: int, reps: int) -> float:
    """One all_gather_into_tensor of a block's fp32 parameters (each rank sends its ceil(n / world) share)."""
    import torch.distributed as dist

    numel = sum(math.prod(p.shape) for p in block.parameters())  # whole shapes (DTensor.shape is global)
    send = torch.zeros(-(-numel // world))
    recv = torch.empty(send.numel() * world)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # as pipeline.parallel
    gather(recv, send)  # warm-up: gloo sets up its pairs on the first call
    return median_seconds(lambda: gather(recv, send), reps)


def rank_main(rank: int, variant: str, cfg: WanDiTConfig, latent: tuple, reps: int, store: str, results) -> None:
    import torch.distributed as dist

    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)  # two ranks on two cores
        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        importlib.import_module("torch.distributed.tensor")  # slow to import: here, not inside the timed load

        from pipeline.sharding import resident_param_bytes, shard_dit

        rec: dict = {"rank": rank, "rss_before_load": proc_status_bytes("VmRSS")}
        reset_peak_rss()
        t0 = time.perf_counter()
        with torch.device("meta"):
            dit = WanDiT(cfg)
        dit.eval().requires_grad_(False)
        # Allocated, not yet written: a sharded rank only ever touches its own rows.
        dit.to_empty(device="cpu")
        if variant == "sharded":
            shard_dit(dit, dist.group.WORLD)
        fill_random_(dit, dist.group.WORLD)
        rec["load_s"] = round(time.perf_counter() - t0, 2)
        rec["peak_rss_load"] = proc_status_bytes("VmHWM")
        rec["param_bytes"] = resident_param_bytes(dit)
        apply_sequence_parallel(dit, dist.group.WORLD, fuse_qkv=False)
        x, t, ctx = inputs(latent, cfg)
        reset_peak_rss()
        with torch.no_grad():
            out = dit(x, t, ctx)
            rec["forward_s"] = median_seconds(lambda: dit(x, t, ctx), reps)
        rec["peak_rss_forwards"] = proc_status_bytes("VmHWM")
        rec["param_bytes_after"] = resident_param_bytes(dit)
        if variant == "sharded":
            rec["gathers_alone_s"] = gather_seconds(dit.blocks[0], WORLD, reps) * len(dit.blocks)
        if rank == 0:
            rec["output"] = out.numpy()  # plain pickling: the process may be gone before it is read
        dist.barrier()
        dist.destroy_process_group()
        results.put(rec)
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc(limit=8)})
        raise


def run_variant(variant: str, cfg: WanDiTConfig, latent: tuple, reps: int, timeout_s: float) -> list[dict]:
    """The variant on WORLD fresh processes; their records in rank order. Raises RuntimeError when one fails."""
    import queue

    import torch.multiprocessing as mp

    from bench.gpu_common import store_url

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = store_url()
    procs = [ctx.Process(target=rank_main, args=(r, variant, cfg, latent, reps, store, results), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    records: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < WORLD:
            try:
                rec = results.get(timeout=2.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:  # killed before it could report (the OOM killer does that)
                    raise RuntimeError(f"{variant}: a rank died with exit code {dead[0].exitcode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{variant}: no result after {timeout_s:.0f} s") from None
                continue
            if "error" in rec:
                raise RuntimeError(f"{variant}: rank {rec['rank']} failed:\n{rec['error']}")
            records[rec["rank"]] = rec
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:  # only ours, by object
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    return [records[r] for r in range(WORLD)]


# --------------------------------------------------------------------------------------------------------------
# Report


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def per_rank(recs: list[dict], key: str, fmt=gb) -> str:
    return " / ".join(fmt(r[key]) for r in recs)


def report(cfg: WanDiTConfig, tokens: int, reps: int, runs: dict[str, list[dict]]) -> dict:
    whole, sharded = runs["whole"], runs["sharded"]
    full = whole_param_bytes(cfg)
    expected = [expected_param_bytes(cfg, r, WORLD) for r in range(WORLD)]
    out_w, out_s = (torch.from_numpy(r[0]["output"]) for r in (whole, sharded))
    diff = float((out_s - out_w).abs().max())
    rel = float((out_s.double() - out_w.double()).norm() / out_w.double().norm().clamp_min(1e-30))

    def worst(recs, key):
        return max(r[key] for r in recs)

    ratios = {k: worst(sharded, k) / worst(whole, k)
              for k in ("param_bytes", "peak_rss_forwards", "peak_rss_load", "forward_s")}
    print(f"\n{cfg.num_layers}-block WanDiT of dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_heads} heads "
          f"({full / 4e6:.0f} M parameters, {gb(full)} fp32), SP={WORLD} on CPU (gloo, 1 thread per rank), "
          f"{tokens} tokens, text {cfg.text_len} x {cfg.text_dim}; median of {reps} forwards after a warm-up. "
          "Per rank: rank 0 / rank 1.")
    print("| variant | param bytes | after forwards | peak RSS, forwards | peak RSS, load | RSS before load "
          "| load | s / forward |")
    print("|---|---|---|---|---|---|---|---|")
    for name, recs in runs.items():
        print(f"| {name} | {per_rank(recs, 'param_bytes')} | {per_rank(recs, 'param_bytes_after')} "
              f"| {per_rank(recs, 'peak_rss_forwards')} | {per_rank(recs, 'peak_rss_load')} "
              f"| {per_rank(recs, 'rss_before_load')} | {per_rank(recs, 'load_s', lambda s: f'{s:.1f} s')} "
              f"| {per_rank(recs, 'forward_s', lambda s: f'{s:.2f} s')} |")
    goal = ("met" if ratios["param_bytes"] <= 0.55 else "NOT met") if cfg.dim == WAN_1_3B.dim else \
        "for the 1.3B shape, not these toy sizes"
    print(f"\nsharded / whole (worst rank): resident parameters {ratios['param_bytes']:.3f}x (goal <= 0.55x: {goal}; "
          f"from the shapes: {' / '.join(gb(e) for e in expected)}), peak RSS during the forwards "
          f"{ratios['peak_rss_forwards']:.3f}x, while loading {ratios['peak_rss_load']:.3f}x, "
          f"time per forward {ratios['forward_s']:.2f}x.")
    gathers = sharded[0]["gathers_alone_s"]
    print(f"The {cfg.num_layers} block all-gathers alone (gloo, {gb(full / cfg.num_layers * (WORLD - 1) / WORLD)} "
          f"received per block per rank): {gathers:.2f} s per forward; on CPU they are memory copies through "
          f"loopback TCP competing with the compute for the same 2 cores, not transfers overlapping GPU compute.")
    # what the sharded forward holds beyond its own params, less what the whole model's forward holds beyond its
    # (activations): FSDP's gathered blocks and all-gather buffers, in blocks' worth
    block = (full - whole_param_bytes(dataclasses.replace(cfg, num_layers=0))) / cfg.num_layers
    transient = max(r["peak_rss_forwards"] - r["param_bytes"] for r in sharded) - \
        max(r["peak_rss_forwards"] - r["param_bytes"] for r in whole)
    print(f"The sharded forward's peak over its resident params, less the whole model's (activations): "
          f"{gb(transient)} = {transient / block:.1f} blocks of {gb(block)} (the block running, the one prefetched, "
          f"FSDP's all-gather buffers).")
    resharded = all(r["param_bytes_after"] == r["param_bytes"] for r in sharded)
    print(f"Outputs, sharded vs whole: {'bitwise equal' if diff == 0 else f'max |diff| {diff:.2e}, rel {rel:.2e}'}; "
          f"every gathered block freed after the forward: {'yes' if resharded else 'NO'}.")
    strip = lambda r: {k: v for k, v in r.items() if k != "output"}  # noqa: E731
    return {"config": dataclasses.asdict(cfg), "tokens": tokens, "reps": reps, "world": WORLD,
            "whole_param_bytes": full, "expected_sharded_param_bytes": expected,
            "variants": {k: [strip(r) for r in v] for k, v in runs.items()},
            "block_bytes": block, "gather_transient_bytes": transient, "malloc_env": {
                k: os.environ.get(k) for k in MALLOC_ENV},
            "ratios": ratios, "output_max_abs_diff": diff, "output_rel_l2": rel, "resharded": resharded}


# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help="DiT blocks (default 30, the 1.3B model; --quick: 4)")
    parser.add_argument("--tokens", type=int, help="video tokens after patching, split over the 2 ranks "
                                                   "(default 256; --quick: 16)")
    parser.add_argument("--reps", type=int, help="timed forwards per variant after one warm-up (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a tiny DiT (dim 128, 4 blocks): seconds, for the tests")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a variant may take (default 1800)")
    args = parser.parse_args(argv)
    base = TINY if args.quick else WAN_1_3B
    layers = base.num_layers if args.layers is None else args.layers
    tokens = (16 if args.quick else 256) if args.tokens is None else args.tokens
    reps = (1 if args.quick else 3) if args.reps is None else args.reps
    for flag, value in (("--layers", layers), ("--tokens", tokens), ("--reps", reps)):
        if value < 1:
            print(f"memory: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if args.json and not args.json.resolve().parent.is_dir():
        print(f"memory: --json {args.json}: folder {args.json.resolve().parent} does not exist", file=sys.stderr)
        return 2
    if not os.path.exists("/proc/self/clear_refs"):
        print("memory: needs Linux's /proc/self/clear_refs to reset the peak RSS between phases", file=sys.stderr)
        return 2
    cfg = dataclasses.replace(base, num_layers=layers)
    need = int(whole_param_bytes(cfg) * WORLD * 1.2)  # the whole variant: a copy per rank, plus activations
    from pipeline.components import host_memory_available

    free = host_memory_available()
    if free is not None and need > free:
        print(f"memory: the whole-model variant needs ~{gb(need)} ({WORLD} ranks x {gb(whole_param_bytes(cfg))} of "
              f"fp32 weights), {gb(free)} is available; use fewer --layers", file=sys.stderr)
        return 2
    for key, value in MALLOC_ENV.items():  # the ranks are spawned: they inherit it, and glibc reads it at start
        os.environ.setdefault(key, value)
    latent = (1, 2, 2 * tokens)  # token grid (1, 1, tokens) with the (1, 2, 2) patch
    runs = {}
    try:
        for variant in VARIANTS:
            t0 = time.perf_counter()
            runs[variant] = run_variant(variant, cfg, latent, reps, args.timeout)
            print(f"memory: {variant} done in {time.perf_counter() - t0:.0f} s", flush=True)
    except RuntimeError as e:
        print(f"memory: {e}", file=sys.stderr)
        return 1
    summary = report(cfg, tokens, reps, runs)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
