"""Causal-cache bytes and peak live bytes of the streaming Wan2.1 VAE decode, tiled vs untiled, at full video
sizes: the real decoder architecture run on meta tensors (shapes only, no compute, no weights), so 720p costs
seconds on a laptop. Peak = the most tensor bytes alive at once (pipeline.memory.LiveBytes) with attention
allocated as fused kernels do (no score matrix); fp32, as the Runner decodes. Three latent chunks: from the third
on every cache holds its 2 frames, and nothing grows after that.

    python bench/vae_cache.py                      # 480p and 720p
    python bench/vae_cache.py --sizes 480x832
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.memory import GiB, LiveBytes, _FusedAttention  # noqa: E402
from pipeline.vae import DecoderSpec, WanVAEDecoder, tile_cache_factor  # noqa: E402


@torch.no_grad()
def measure(height: int, width: int, tiling: bool) -> tuple[float, float, float]:
    """(cache GiB, peak GiB, seconds) for three latent chunks of a height x width decode."""
    with torch.device("meta"):
        decoder = WanVAEDecoder(DecoderSpec())
    decoder.tiling = tiling
    caches = {}
    original = decoder._decode_chunk

    def spy(z, cache):
        caches[id(cache)] = cache
        return original(z, cache)

    decoder._decode_chunk = spy
    latents = torch.empty((1, 16, 3, height // 8, width // 8), device="meta")
    t0 = time.perf_counter()
    with _FusedAttention(), LiveBytes() as live:
        for _ in decoder.decode_chunks(latents):
            pass
    cache = sum(v.numel() * v.element_size() for c in caches.values() for v in c.values()
                if isinstance(v, torch.Tensor))
    return cache / GiB, live.peak / GiB, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["480x832", "720x1280"], help="HEIGHTxWIDTH")
    args = parser.parse_args()
    print("| video | decode | causal caches | tiled / untiled | expected (tile areas) | peak live |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        height, width = map(int, size.split("x"))
        (c0, p0, _), (c1, p1, _) = measure(height, width, False), measure(height, width, True)
        factor = tile_cache_factor(height // 8, width // 8)
        print(f"| {height}x{width} | untiled | {c0:.2f} GiB | | | {p0:.2f} GiB |")
        print(f"| {height}x{width} | tiled 256/192 px | {c1:.2f} GiB | {c1 / c0:.3f} | {factor:.3f} | {p1:.2f} GiB |")


if __name__ == "__main__":
    main()
