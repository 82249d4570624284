"""Reads a video of the embedded model's world and says what moved: dominant color, shape, direction.

    python -m pipeline.tiny.analyze video.mp4 [...]

Prints one line per video; a missing or unreadable file is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
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


# ffmpeg's banner: its version, build and library versions, which it prints before anything it has to say.
_BANNER = re.compile(r"^(?:ffmpeg version |built with |configuration: |lib\w+\s+\d+\.\s*\d+\.\s*\d+ / )")


def _ffmpeg_reason(e: Exception) -> str:
    """The last line of what ffmpeg said that is not its banner (the error comes with the whole banner and log)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    said = [line for line in lines if not _BANNER.match(line)]
    return said[-1] if said else "ffmpeg stopped before reading a frame"


def analyze_file(path: str) -> Verdict:
    """The Verdict of a video file; ValueError (one line) when it is missing, not a regular file (a FIFO would
    leave ffmpeg waiting for a writer) or not a video ffmpeg can read."""
    import imageio_ffmpeg

    from configs.loader import open_regular

    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not a video")
    try:
        os.close(open_regular(path))  # never blocks, whatever path is
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    # absolute: ffmpeg would read '-' as stdin and 'name:...' as a protocol
    reader = imageio_ffmpeg.read_frames(os.path.abspath(path), pix_fmt="rgb24")
    try:
        w, h = next(reader)["size"]
        frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]
    except (OSError, RuntimeError, StopIteration) as e:
        raise ValueError(f"{path}: not a video ffmpeg can read ({_ffmpeg_reason(e)})") from None
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    return analyze_frames(np.stack(frames))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # a file name never forges a line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def main(argv=None) -> int:
    parser = _Parser(prog="python -m pipeline.tiny.analyze",
                     description="Say what moved in videos of the embedded model's world: the color and shape of the "
                                 "object, its direction, its centroid's displacement (last third of the clip minus "
                                 "the first) and how much of its bounding box it fills (circle ~0.79, square ~1).")
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="an MP4 (or any video ffmpeg reads)")
    args = parser.parse_args(argv)
    # imageio-ffmpeg warns when it kills an ffmpeg that would not stop: the video's error line says it all
    logging.getLogger("imageio_ffmpeg").setLevel(logging.ERROR)
    failed = 0
    for path in args.videos:
        try:
            v = analyze_file(path)
        except ValueError as e:
            print(f"{parser.prog}: error: {_printable(str(e))}", file=sys.stderr)
            failed += 1
            continue
        print(f"{_printable(path)}: {v.color} {v.shape} moving {v.direction} (dx {v.displacement[0]:+.1f}, dy "
              f"{v.displacement[1]:+.1f}, fill {v.fill:.2f})", flush=True)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
