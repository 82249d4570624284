"""Streaming VAE decode vs whole-video decode, side by side in one run (each mode in a fresh process so peak
memory is its own): time to the first RGB frame, time for all frames, peak memory.

Modes: "stream" = WanVAEDecoder.decode_stream (frames handed out one by one, as the Runner does);
"whole" = the same decoder, all frames concatenated before any is used; "diffusers" = AutoencoderKLWan.decode.
The VAE is the real Wan2.1 architecture (127M parameters) with random weights.

    python bench/vae_stream.py                              # CPU, 21 frames at 256x256
    python bench/vae_stream.py --device cuda --frames 81 --height 480 --width 832
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
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
