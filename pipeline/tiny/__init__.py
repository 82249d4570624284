"""The embedded default model: a tiny WanDiT with its own text encoder and chunk decoder, trained in this repo on
procedural clips (pipeline/tiny/train.py) and shipped as one safetensors file inside the package.

What it can draw, for the checks made before a run (cluster/validate.py): VOCABULARY, unknown_words, and the sizes
and lengths below."""

from __future__ import annotations

from pathlib import Path

from .data import COLORS, DIRECTIONS, FRAMES, SIZE, SYNONYMS, split_words, vocabulary

__all__ = ["WEIGHTS", "VOCABULARY", "SIDES", "TRAINED_FRAMES", "TRAINED_SIZE", "describe_vocabulary", "load_tiny",
           "load_tiny_components", "unknown_words"]

WEIGHTS = Path(__file__).with_name("tiny.safetensors")

VOCABULARY: tuple[str, ...] = tuple(vocabulary())  # the words it knows (its text encoder's, sorted)

TRAINED_SIZE, TRAINED_FRAMES = SIZE, FRAMES  # 32x32 clips of 17 frames
# Frame sides (pixels) at which it draws one object. Measured, 20 prompts each, read back by pipeline.tiny.analyze:
# 32x32 gets color, direction 20/20; 32x48 and 48x32 one object, direction 16-17/20; 48x48 one object that wraps
# around the edge, direction 12/20. At 64 pixels a side it draws two or four copies (a grid of dots at 128), at
# 16 a smudge of the wrong color. Lengths: direction 20/20 for 5-17 frames, 11/20 at 21, 0-2/20 from 25 frames on,
# where the object stalls or turns back (it still draws the right color and shape).
SIDES = (32, 48)


def unknown_words(text: str) -> list[str]:
    """The words of text the embedded model does not know, each once, in the order they first appear (as its text
    encoder reads them: lower case, letters only)."""
    known = set(VOCABULARY)
    return list(dict.fromkeys(w for w in split_words(text) if w not in known))


def describe_vocabulary() -> str:
    """VOCABULARY in one line, grouped: what to put in a prompt."""
    grouped = set(COLORS) | set(DIRECTIONS) | {w for names in SYNONYMS.values() for w in names}
    shapes = ", ".join(f"{names[0]} (or {', '.join(names[1:])})" for names in SYNONYMS.values())
    rest = [w for w in VOCABULARY if w not in grouped]
    return (f"colors {', '.join(COLORS)}; shapes {shapes}; directions {', '.join(DIRECTIONS)}; "
            f"and the words {', '.join(rest)}")


def load_tiny(path: Path = WEIGHTS, device="cpu", attention_backend: str = "auto"):
    """(spec, dit, text encoder, decoder) from the shipped weights."""
    from safetensors import safe_open

    from ..dit import WanDiT
    from .model import TinyDecoder, TinySpec, TinyTextEncoder

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"the embedded model's weights are missing ({path}); train them with "
                                f"`python -m pipeline.tiny.train`")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        spec = TinySpec.from_json(f.metadata()["spec"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    parts = {}
    for prefix, module in (("dit.", WanDiT(spec.dit_config(), attention_backend)), ("text.", TinyTextEncoder(spec)),
                           ("decoder.", TinyDecoder(spec))):
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=True)
        parts[prefix] = module.to(device).eval().requires_grad_(False)
    return spec, parts["dit."], parts["text."], parts["decoder."]


def load_tiny_components(*, device, dtype, encode: bool, decode: bool, attention_backend: str = "auto"):
    import torch

    from ..components import Components
    from .model import CHUNK, STRIDE

    spec, dit, text, decoder = load_tiny(device=device, attention_backend=attention_backend)
    if dtype != torch.float32:
        dit.to_compute_dtype(dtype)
    return Components(dit, text if encode else None, decoder if decode else None, spec.z_dim, CHUNK, STRIDE)
