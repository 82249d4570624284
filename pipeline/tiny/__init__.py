"""The embedded default model: a tiny WanDiT with its own text encoder and chunk decoder, trained in this repo on
procedural clips (pipeline/tiny/train.py) and shipped as one safetensors file inside the package."""

from __future__ import annotations

from pathlib import Path

import torch

from .model import STRIDE, CHUNK, TinyDecoder, TinySpec, TinyTextEncoder

__all__ = ["WEIGHTS", "load_tiny_components", "load_tiny"]

WEIGHTS = Path(__file__).with_name("tiny.safetensors")


def load_tiny(path: Path = WEIGHTS, device="cpu", attention_backend: str = "auto"):
    """(spec, dit, text encoder, decoder) from the shipped weights."""
    from safetensors import safe_open

    from ..dit import WanDiT

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
    from ..components import Components

    spec, dit, text, decoder = load_tiny(device=device, attention_backend=attention_backend)
    if dtype != torch.float32:
        dit.to_compute_dtype(dtype)
    return Components(dit, text if encode else None, decoder if decode else None, spec.z_dim, CHUNK, STRIDE)
