"""MP4 files written as frames arrive: H.264 yuv420p under a temporary name, renamed only when complete, so an
interrupted or failed video never leaves a file that looks finished."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

__all__ = ["StreamingMP4", "read_mp4", "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".partial.mp4"


class StreamingMP4:
    def __init__(self, path: Path, fps: int, crf: int = 18):
        self.path, self.fps, self.crf = Path(path), fps, crf
        self.tmp = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        self._writer = None
        self.frames = 0

    def append(self, frame: np.ndarray) -> None:
        """One RGB frame [H, W, 3] uint8 (H and W even)."""
        if self._writer is None:
            import imageio_ffmpeg

            h, w = frame.shape[:2]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = imageio_ffmpeg.write_frames(
                str(self.tmp), (w, h), fps=self.fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
                macro_block_size=2, quality=None, ffmpeg_log_level="error",
                output_params=["-crf", str(self.crf), "-movflags", "+faststart"],
            )
            self._writer.send(None)
        self._writer.send(np.ascontiguousarray(frame))
        self.frames += 1

    def commit(self) -> Path:
        """Finish the file and give it its final name."""
        if self._writer is None:
            raise RuntimeError(f"no frames were written for {self.path}")
        self._writer.close()
        self._writer = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - ffmpeg may already be gone
                pass
            self._writer = None
        self.tmp.unlink(missing_ok=True)


def read_mp4(path: Path) -> tuple[np.ndarray, float]:
    """(frames [N, H, W, 3] uint8, fps) decoded back from an MP4."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames), meta["fps"]
