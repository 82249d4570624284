"""Finding and reading Wan2.1 VAE decoder weights: diffusers folders (safetensors) or the original Wan2.1_VAE.pth
(torch.load with weights_only=True), mapped onto WanVAEDecoder's (diffusers) names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .vae import DecoderSpec, WanVAEDecoder
from .weights import WeightsError, check_keys, download_hint, inside_model, model_root, user_path

ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"

_RESNET = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
           "shortcut.": "conv_shortcut."}


def _resnet_key(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    raise WeightsError(f"unknown residual block key ...{rest} in {ORIGINAL_VAE_FILE}")


def _from_original(raw: dict[str, torch.Tensor]) -> tuple[DecoderSpec, dict[str, torch.Tensor]]:
    """Original Decoder3d keys (decoder.conv1, decoder.middle.N, decoder.upsamples.N, decoder.head.N, conv2)."""
    if "decoder.conv1.weight" not in raw:
        raise WeightsError(f"{ORIGINAL_VAE_FILE} has no decoder.conv1.weight: not a Wan2.1 VAE")
    state = {"post_quant_conv.weight": raw["conv2.weight"], "post_quant_conv.bias": raw["conv2.bias"]}
    ups: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        if not key.startswith("decoder."):
            continue
        rest = key[len("decoder."):]
        if rest.startswith("conv1."):
            state["decoder.conv_in." + rest[6:]] = t
        elif m := re.match(r"middle\.(\d)\.(.*)", rest):
            n, sub = int(m.group(1)), m.group(2)
            if n == 1:
                state[f"decoder.mid_block.attentions.0.{sub}"] = t
            else:
                state[f"decoder.mid_block.resnets.{n // 2}.{_resnet_key(sub)}"] = t
        elif m := re.match(r"upsamples\.(\d+)\.(.*)", rest):
            ups.setdefault(int(m.group(1)), {})[m.group(2)] = t
        elif m := re.match(r"head\.(\d)\.(.*)", rest):
            state[{"0": "decoder.norm_out.", "2": "decoder.conv_out."}[m.group(1)] + m.group(2)] = t
        else:
            raise WeightsError(f"unknown key {key} in {ORIGINAL_VAE_FILE}")
    # upsamples is one flat Sequential: residual blocks, a resample closing each up block but the last.
    blocks, block, res_i = [], 0, 0
    current: list = []
    for n in sorted(ups):
        entry = ups[n]
        if "resample.1.weight" in entry:
            mode = "upsample3d" if "time_conv.weight" in entry else "upsample2d"
            for sub, t in entry.items():
                state[f"decoder.up_blocks.{block}.upsamplers.0.{sub}"] = t
            blocks.append((*current[0], len(current), mode))
            block, res_i, current = block + 1, 0, []
        else:
            for sub, t in entry.items():
                state[f"decoder.up_blocks.{block}.resnets.{res_i}.{_resnet_key(sub)}"] = t
            w = entry["residual.2.weight"]
            current.append((w.shape[1], w.shape[0]))
            res_i += 1
    if current:
        blocks.append((*current[0], len(current), None))
    if not blocks:
        raise WeightsError(f"{ORIGINAL_VAE_FILE} has no decoder.upsamples: not a Wan2.1 VAE")
    conv_in = raw["decoder.conv1.weight"]
    spec = DecoderSpec(z_dim=conv_in.shape[1], mid_dim=conv_in.shape[0],
                       blocks=tuple((cin, cout, n, mode) for cin, cout, n, mode in blocks))
    if spec.z_dim != len(spec.latents_mean):
        raise WeightsError(f"{ORIGINAL_VAE_FILE} has z_dim {spec.z_dim}; the Wan2.1 VAE has 16")
    return spec, state


def _locate(path: Path) -> Path:
    """The VAE's own file or folder inside whatever layout `path` is; given a folder, what is read must resolve
    inside it (a .pth is unpickled: a link must not pull one in from elsewhere)."""
    path = user_path(path)
    if not path.exists():
        raise WeightsError(f"VAE weights {path} do not exist: {download_hint(path)}")
    root = model_root(path) if path.is_dir() else None
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if path.is_dir() and (path / ORIGINAL_VAE_FILE).is_file():
        path = path / ORIGINAL_VAE_FILE
    if path.is_file() and path.suffix not in (".pth", ".pt"):
        raise WeightsError(f"{path}: expected {ORIGINAL_VAE_FILE} or a diffusers VAE folder")
    if path.is_dir() and not ((path / "config.json").is_file()
                              and (path / "diffusion_pytorch_model.safetensors").is_file()):
        raise WeightsError(f"{path} holds no VAE: expected vae/, config.json + diffusion_pytorch_model."
                           f"safetensors, or {ORIGINAL_VAE_FILE}; {download_hint(path)}")
    if root is not None:
        for file in [path] if path.is_file() else [path / "config.json", path / "diffusion_pytorch_model.safetensors"]:
            inside_model(root, file, "VAE weights")
    return path


def read_vae_spec(path: Path) -> DecoderSpec:
    """The decoder's structure (latent channels, strides) without reading the weights' data."""
    path = _locate(Path(path))
    if path.is_file():  # memory-mapped: only the headers are read
        return _from_original(torch.load(path, map_location="cpu", weights_only=True, mmap=True))[0]
    return DecoderSpec.from_diffusers_config(json.loads((path / "config.json").read_text()))


def load_vae_state(path: Path) -> tuple[DecoderSpec, dict[str, torch.Tensor]]:
    """(decoder structure, decoder state dict in WanVAEDecoder's names) from any supported layout."""
    path = _locate(Path(path))
    if path.is_file():
        spec, state = _from_original(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    else:
        spec = DecoderSpec.from_diffusers_config(json.loads((path / "config.json").read_text()))
        state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
        state = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WanVAEDecoder(spec).state_dict().items()}
    check_keys(expected, {k: tuple(v.shape) for k, v in state.items()},
               f"VAE weights in {path} do not fit the Wan2.1 decoder")
    return spec, state
