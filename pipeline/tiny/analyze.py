"""Reads a video of the embedded model's world and says what moved: dominant color, shape, direction.

    python -m pipeline.tiny.analyze video.mp4 [...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from .data import COLORS

__all__ = ["Verdict", "analyze_frames", "analyze_file"]


@dataclass(frozen=True)
class Verdict:
    color: str
    shape: str
    direction: str
    displacement: tuple[float, float]  # centroid motion (dx, dy) in pixels, last third minus first third
    fill: float  # object area / bounding-box area, averaged over frames (circle ~0.79, square ~1)


def _object_mask(frame: np.ndarray) -> np.ndarray:
    lum = frame.astype(np.float32).max(axis=-1)
    background = np.median(lum)
    return lum > background + 0.5 * (lum.max() - background)


def analyze_frames(frames: np.ndarray) -> Verdict:
    """frames [F, H, W, 3] uint8."""
    masks = np.stack([_object_mask(f) for f in frames])
    pixels = frames[masks].astype(np.float32)
    if len(pixels) == 0:
        return Verdict("none", "none", "none", (0.0, 0.0), 0.0)
    mean = pixels.mean(axis=0)
    names = list(COLORS)
    refs = np.array([COLORS[n] for n in names], dtype=np.float32)
    # Compare chromaticity and brightness separately so that a dim white is still white, a dark red still red.
    def chroma(c):
        return c / (np.linalg.norm(c, axis=-1, keepdims=True) + 1e-6)
    color = names[int(np.argmin(np.linalg.norm(chroma(refs) - chroma(mean), axis=1)))]

    centroids, fills = [], []
    for m in masks:
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            continue
        centroids.append((xs.mean(), ys.mean()))
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        fills.append(len(xs) / box)
    centroids = np.array(centroids)
    third = max(1, len(centroids) // 3)
    dx, dy = centroids[-third:].mean(axis=0) - centroids[:third].mean(axis=0)
    if max(abs(dx), abs(dy)) < 1.0:
        direction = "none"
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    fill = float(np.median(fills))
    return Verdict(color, "square" if fill > 0.89 else "circle", direction, (float(dx), float(dy)), fill)


def analyze_file(path: str) -> Verdict:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
    w, h = next(reader)["size"]
    return analyze_frames(np.stack([np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        v = analyze_file(p)
        print(f"{p}: {v.color} {v.shape} moving {v.direction} (dx {v.displacement[0]:+.1f}, dy "
              f"{v.displacement[1]:+.1f}, fill {v.fill:.2f})")
