"""Streaming VAE decode vs whole-video decode, side by side in one run (each mode in a fresh process so peak
memory is its own): time to the first RGB frame, time for all frames, peak memory.

Modes: "stream" = WanVAEDecoder.decode_stream (frames handed out one by one, as the Runner does);
"whole" = the same decoder, all frames concatenated before any is used; "diffusers" = AutoencoderKLWan.decode.
The VAE is the real Wan2.1 architecture (127M parameters) with random weights.

--ranks P: the decode split by rows over P ranks (decode_stream with a gloo group, one thread per rank) against
P=1 (one process, one thread), the same weights and latents, measured in one run: time to the first frame, total,
CPU time and peak memory per rank (live tensor bytes during the decode, pipeline.memory.LiveBytes, and the peak
RSS above the loaded model), and the largest difference between the two decodes' frames in 8-bit levels.

--exchange P: on paper, the bytes each rank exchanges per decoded frame at P ranks for 480p and 720p, counted by
running the real decoder on meta tensors with every collective recorded (no process group needed).

    python bench/vae_stream.py                              # CPU, 21 frames at 256x256
    python bench/vae_stream.py --device cuda --frames 81 --height 480 --width 832
    python bench/vae_stream.py --ranks 2 --frames 9 --height 240 --width 416
    python bench/vae_stream.py --exchange 8
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.vae import DecoderSpec, WanVAEDecoder  # noqa: E402
from pipeline.vae_parallel import Bands, band_rows  # noqa: E402


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _run(mode, folder, shape, device_name, threads, out):
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if mode == "diffusers":
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(folder).eval().to(device)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        z = (latents * std + mean).to(device)
    else:
        from pipeline import WanVAEDecoder

        vae = WanVAEDecoder.from_pretrained(folder, device=device)
    base = _peak_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
    t0 = time.perf_counter()
    first = None
    n = 0
    with torch.no_grad():
        if mode == "stream":
            for _frame in vae.decode_stream(latents):
                first = first or time.perf_counter() - t0
                n += 1
        else:
            video = vae.decode(z).sample if mode == "diffusers" else vae.decode(latents)
            frames = ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
            first = time.perf_counter() - t0
            n = frames.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out.put((mode, first, time.perf_counter() - t0, _peak_mb(device) - base, n))


# -- split decode: P ranks vs one ------------------------------------------------------------------------------


def _rss_reset() -> bool:
    """Resets this process's peak RSS (VmHWM) so the next read is the decode's own peak (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_wait_s() -> float:
    """Seconds this process's main thread (where the decode's one thread computes) has been runnable but waiting
    for a core: what other work on the machine costs it."""
    try:
        return int(Path("/proc/self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def _decode_rank(folder: str, shape: tuple, split: bool) -> dict:
    """One rank's decode (run in a DistPool worker: gloo group formed, threads set); rank 0 returns the frames."""
    import torch.distributed as dist

    from pipeline import WanVAEDecoder
    from pipeline.memory import LiveBytes

    vae = WanVAEDecoder.from_pretrained(folder)
    for p in vae.parameters():  # fault in the memory-mapped weights now, or the decode's RSS would include them
        p.sum()
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    group = dist.group.WORLD if split else None
    dist.barrier()  # every rank loaded: start the clocks together
    load = os.getloadavg()[0]  # other work on the machine slows both decodes
    rss_exact = _rss_reset()
    rss0 = _rss_mb("VmRSS")
    frames, first, n = [], None, 0
    t0, cpu0, wait0 = time.perf_counter(), time.process_time(), _cpu_wait_s()
    with LiveBytes() as live:
        for frame in vae.decode_stream(latents, group=group):
            first = first or time.perf_counter() - t0
            n += 1
            if frame is not None:
                frames.append(frame)
    total, cpu, wait = time.perf_counter() - t0, time.process_time() - cpu0, _cpu_wait_s() - wait0
    return dict(first=first, total=total, cpu=cpu, wait=wait, live_mb=live.peak / 2**20, rss_mb=_rss_mb("VmHWM") - rss0,
                rss_exact=rss_exact, items=n, load=load, frames=np.stack(frames) if frames else None)


def split_vs_one(args) -> None:
    from diffusers import AutoencoderKLWan

    from tests.dist_pool import DistPool

    shape = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    threads = args.threads or 1
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        AutoencoderKLWan().save_pretrained(folder)
        for ranks in (1, args.ranks):  # one after the other: the two never share the cores
            pool = DistPool(ranks, threads=threads)
            try:
                runs[ranks] = pool.run(_decode_rank, folder, shape, ranks > 1, timeout=args.timeout)
            finally:
                pool.close()
    one, split = runs[1][0], runs[args.ranks]
    diff = int(np.abs(one["frames"].astype(np.int16) - split[0]["frames"].astype(np.int16)).max())
    print(f"Wan2.1 VAE (random weights), {args.frames} frames {args.height}x{args.width} (latents "
          f"{shape[2]}x{shape[3]}x{shape[4]}), CPU fp32, gloo, {threads} thread(s) per rank; peak live = most "
          f"tensor bytes alive during the decode (LiveBytes), peak RSS = VmHWM above the RSS before the decode"
          f"{'' if one['rss_exact'] else ' (peak not reset: includes the load)'}")
    print("| ranks | rank | first frame | all frames | CPU time | waited for a core | peak live | peak RSS | items | "
          "load before |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ranks, rows in runs.items():
        for rank, r in enumerate(rows):
            print(f"| {ranks} | {rank} | {r['first']:.2f} s | {r['total']:.2f} s | {r['cpu']:.2f} s | {r['wait']:.2f} s | "
                  f"{r['live_mb']:.0f} MiB | {r['rss_mb']:.0f} MiB | {r['items']} | {r['load']:.1f} |")
    speed = one["total"] / max(r["total"] for r in split)
    sooner = one["first"] / split[0]["first"]
    live = max(r["live_mb"] for r in split) / one["live_mb"]
    rss = max(r["rss_mb"] for r in split) / one["rss_mb"]
    cpu = max(r["cpu"] for r in split) / one["cpu"]
    ok = lambda good: "met" if good else "MISSED"  # noqa: E731
    print(f"P={args.ranks} vs P=1: {speed:.2f}x faster (goal >= 1.8x: {ok(speed >= 1.8)}), first frame "
          f"{sooner:.2f}x sooner (goal >= 1.8x: {ok(sooner >= 1.8)}), peak live per rank {live:.2f}x (goal <= "
          f"0.6x: {ok(live <= 0.6)}), peak RSS per rank {rss:.2f}x, CPU time per rank {cpu:.2f}x; frames: max "
          f"difference {diff} levels ({one['frames'].shape[0]} frames)")


# -- on paper: what a rank exchanges --------------------------------------------------------------------------


class _PaperBands(Bands):
    """Bands of rank `rank` of `world` without a process group (meta tensors: shapes only)."""

    def __init__(self, world: int, rank: int, latent_rows: int):
        self.group, self.world, self.rank, self.latent_rows = None, world, rank, latent_rows
        self.bands = band_rows(latent_rows, world)
        self.active = min(world, latent_rows)


@torch.no_grad()
def exchange(height: int, width: int, ranks: int, rank: int, dtype=torch.float32) -> dict:
    """Bytes one rank sends and receives in the steady-state chunk (4 frames) of a split decode, by collective
    kind: every all_gather the decoder makes is recorded on meta tensors. "needed" is what the maths needs from
    the neighbours (2 halo rows, the other bands' K/V, the frame only on rank 0)."""
    from pipeline import vae_parallel
    from pipeline.vae import Cache

    with torch.device("meta"):
        decoder = WanVAEDecoder(DecoderSpec()).to(dtype)
    h, w = height // 8, width // 8
    bands = _PaperBands(ranks, rank, h)
    log = []

    def gather(x, group):
        log.append((kind[0], x.shape, x.element_size()))
        return x.new_empty((ranks, *x.shape))

    kind = ["halo"]
    real_gather, real_whole = vae_parallel._all_gather, Bands.whole

    def whole(self, x):
        kind[0] = "kv" if x.dtype != torch.uint8 else "frame"
        try:
            return real_whole(self, x)
        finally:
            kind[0] = "halo"

    vae_parallel._all_gather, Bands.whole = gather, whole
    try:
        cache = Cache()
        cache.bands = bands
        z = bands.mine(torch.empty((1, 16, 3, h, w), device="meta", dtype=dtype))
        for t in range(3):  # the third chunk: every cache full, 4 frames at the top
            log.clear()
            chunk = decoder._decode_chunk(z[:, :, t : t + 1], cache)
            bands.whole(chunk[0].to(torch.uint8))
    finally:
        vae_parallel._all_gather, Bands.whole = real_gather, real_whole
    frames = chunk.shape[2]
    out = {k: dict(sent=0, received=0, needed=0, calls=0) for k in ("halo", "kv", "frame")}
    start, stop = bands.bands[rank]
    for k, shape, size in log:
        nbytes = size * math.prod(shape)
        row = out[k]
        row["calls"] += 1
        row["sent"] += nbytes
        row["received"] += (ranks - 1) * nbytes
        if k == "halo":  # [2, ..., W]: the first and last row; a middle rank needs one from each neighbour
            row["needed"] += nbytes
        elif k == "kv":  # padded to the tallest band: needed is every other band's real rows
            row["needed"] += nbytes * (h - (stop - start)) // shape[-2]
        elif rank == 0:
            row["needed"] += nbytes * (h * 8 - (stop - start) * 8) // shape[-2]
    return dict(frames=frames, **{k: {n: v / frames if n != "calls" else v for n, v in row.items()}
                                  for k, row in out.items()})


def exchange_table(ranks: int, sizes: list[str], frames: int = 81, link_gbs: float = 300.0) -> None:
    print(f"Bytes per decoded frame per rank at P={ranks}, fp32, steady-state chunk (4 frames) / 4, rank 1 (a "
          f"middle band; rank 0 also needs the frames). all_gather: what the implementation moves (every rank "
          f"receives every rank's piece); needed: the neighbours' 2 rows per 3x3 conv, the other bands' K/V.")
    print("| video | collective | calls per chunk | sent | received (all_gather) | needed |")
    print("|---|---|---|---|---|---|")
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    links = []
    for size in sizes:
        height, width = map(int, size.split("x"))
        e = exchange(height, width, ranks, rank=1)
        total = {n: sum(e[k][n] for k in ("halo", "kv", "frame")) for n in ("sent", "received", "needed")}
        for k, label in (("halo", "halo rows (3x3 convs)"), ("kv", "mid-block K/V"), ("frame", "uint8 frame")):
            r = e[k]
            print(f"| {height}x{width} | {label} | {r['calls']} | {mib(r['sent'])} | {mib(r['received'])} | "
                  f"{mib(r['needed'])} |")
        calls = sum(e[k]["calls"] for k in ("halo", "kv", "frame"))
        print(f"| {height}x{width} | total | {calls} | {mib(total['sent'])} | {mib(total['received'])} | "
              f"{mib(total['needed'])} |")
        links.append((size, calls, total))
    for size, calls, total in links:  # every frame charged the steady state's bytes: an upper bound
        chunks = (frames - 1) // 4 + 1
        print(f"{size}, {frames} frames ({chunks} chunks, {calls * chunks} collectives) at {link_gbs:g} GB/s: "
              f"all_gather {frames * total['received'] / link_gbs / 1e6:.0f} ms, needed "
              f"{frames * total['needed'] / link_gbs / 1e6:.0f} ms per rank")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default 21; --exchange: 81)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default 2; with --ranks 1 per rank)")
    parser.add_argument("--ranks", type=int, default=0, help="split decode over this many gloo ranks vs one")
    parser.add_argument("--timeout", type=float, default=900.0, help="--ranks: seconds each decode may take")
    parser.add_argument("--exchange", type=int, default=0, metavar="P",
                        help="on paper: bytes each of P ranks exchanges per frame (480p and 720p)")
    parser.add_argument("--sizes", nargs="+", default=["480x832", "720x1280"], help="--exchange: HEIGHTxWIDTH")
    parser.add_argument("--link-gbs", type=float, default=300.0, help="--exchange: link bandwidth, GB/s")
    args = parser.parse_args()
    if args.ranks == 1 or args.ranks < 0 or args.exchange < 0 or args.exchange == 1:
        parser.error("--ranks and --exchange take a number of ranks >= 2")
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        parser.error(f"--frames must be 4k + 1 (1, 5, 9, ...), got {args.frames}")
    if args.height < 8 or args.width < 8 or args.height % 8 or args.width % 8:
        parser.error(f"--height and --width must be multiples of 8, got {args.height}x{args.width}")
    for size in args.sizes:
        h, _, w = size.partition("x")
        if not (h.isdigit() and w.isdigit() and int(h) >= 8 and int(w) >= 8 and int(h) % 8 == int(w) % 8 == 0):
            parser.error(f"--sizes takes HEIGHTxWIDTH in multiples of 8 (480x832), got {size!r}")
    if args.ranks and args.device != "cpu":
        parser.error("--ranks runs on CPU (gloo, one thread per rank)")
    if args.exchange:
        return exchange_table(args.exchange, args.sizes, args.frames or 81, args.link_gbs)
    args.frames = args.frames or 21
    if args.ranks:
        return split_vs_one(args)
    args.threads = args.threads or 2
    from diffusers import AutoencoderKLWan

    shape = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        AutoencoderKLWan().save_pretrained(folder)
        rows = []
        for mode in ("stream", "whole", "diffusers"):
            out = ctx.Queue()
            p = ctx.Process(target=_run, args=(mode, folder, shape, args.device, args.threads, out))
            p.start()
            rows.append(out.get())
            p.join()
    print(f"Wan2.1 VAE (random weights), {args.frames} frames {args.height}x{args.width}, {args.device}, "
          f"{args.threads} threads; memory = peak {'allocated' if args.device == 'cuda' else 'RSS'} above the "
          f"loaded model")
    print("| mode | first frame | all frames | first / all | peak memory | frames |")
    print("|---|---|---|---|---|---|")
    for mode, first, total, peak, n in rows:
        print(f"| {mode} | {first:.2f} s | {total:.2f} s | {first / total:.2f} | {peak:.0f} MiB | {n} |")


if __name__ == "__main__":
    main()
