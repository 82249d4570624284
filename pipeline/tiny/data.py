"""The procedural dataset of the embedded model: one shape of one color moving in one direction on a dark
background, with plain-English captions. Deterministic by seed.

Legend: N clips, F frames, S pixels per side, C=3 RGB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS = {"red": (225, 45, 40), "green": (45, 205, 70), "blue": (55, 90, 235), "yellow": (235, 220, 50),
          "white": (238, 238, 238)}
SHAPES = ("circle", "square")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image coordinates
FRAMES, SIZE = 17, 32  # the clips the shipped weights were trained on: SIZE x SIZE pixels, FRAMES frames

TEMPLATES = (
    "a {color} {shape} moving {direction}",
    "a {color} {shape} moves {direction}",
    "the {color} {shape} is moving {direction}",
    "{color} {shape} going {direction}",
    "a {shape} in {color} moving {direction}",
    "a {color} {shape} sliding {direction}",
    "a {color} {shape} travelling {direction} across the frame",
    "a {shape} that is {color} moves to the {direction}",
)
SYNONYMS = {"circle": ("circle", "ball", "disc", "dot"), "square": ("square", "box", "block")}


@dataclass(frozen=True)
class ClipSpec:
    color: str
    shape: str
    direction: str

    def caption(self, template: int = 0, synonym: int = 0) -> str:
        names = SYNONYMS[self.shape]
        return TEMPLATES[template % len(TEMPLATES)].format(color=self.color, shape=names[synonym % len(names)],
                                                           direction=self.direction)


def split_words(text: str) -> list[str]:
    """The words the tiny text encoder reads from text: lower-cased runs of letters (digits and punctuation
    separate words and are dropped)."""
    return "".join(c if c.isalpha() else " " for c in text.lower()).split()


def vocabulary() -> list[str]:
    """Every word a caption can contain (the tiny text encoder's vocabulary)."""
    words = set()
    for template in TEMPLATES:
        words.update(w for w in template.replace("{", " ").replace("}", " ").split() if w.isalpha())
    words -= {"color", "shape", "direction"}
    for names in SYNONYMS.values():
        words.update(names)
    words.update(COLORS, SHAPES, DIRECTIONS)
    return sorted(words)


def all_specs() -> list[ClipSpec]:
    return [ClipSpec(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def render(spec: ClipSpec, rng: np.random.Generator, frames: int = 17, size: int = 32) -> np.ndarray:
    """[F, S, S, 3] uint8: the shape crosses most of the frame, starting near the edge it moves away from."""
    radius = rng.uniform(4.0, 5.5)
    dx, dy = DIRECTIONS[spec.direction]
    travel = rng.uniform(0.5, 0.62) * size
    margin = radius + rng.uniform(1.0, 2.5)
    along0 = margin if (dx + dy) > 0 else size - margin
    across = rng.uniform(radius + 2, size - radius - 2)
    t = np.linspace(0, 1, frames)[:, None, None]
    along = along0 + (dx + dy) * travel * t
    cx, cy = (along, across) if dx else (across, along)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if spec.shape == "circle":
        dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - radius
    else:
        half = radius * 0.9
        dist = np.maximum(np.abs(xx - cx), np.abs(yy - cy)) - half
    coverage = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # anti-aliased edge
    background = rng.uniform(8, 24)
    color = np.clip(np.array(COLORS[spec.color]) + rng.normal(0, 8, 3), 0, 255)
    clip = background + coverage * (color - background)
    return np.clip(np.round(clip), 0, 255).astype(np.uint8)


def sample_batch(rng: np.random.Generator, n: int, frames: int = 17, size: int = 32):
    """n random clips and captions: ([N, F, S, S, 3] uint8, [str], [ClipSpec])."""
    specs = all_specs()
    chosen = [specs[i] for i in rng.integers(0, len(specs), n)]
    clips = np.stack([render(s, rng, frames, size) for s in chosen])
    captions = [s.caption(int(rng.integers(0, 1000)), int(rng.integers(0, 1000))) for s in chosen]
    return clips, captions, chosen
