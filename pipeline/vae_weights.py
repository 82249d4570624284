"""Finding and reading Wan VAE decoder weights (Wan2.1's and Wan2.2's): diffusers folders (safetensors) or the
original Wan2.1_VAE.pth / Wan2.2_VAE.pth (torch.load with weights_only=True), mapped onto WanVAEDecoder's (diffusers)
names. The original files carry no config: the structure is read from the tensors' names and shapes."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .vae import MAX_RESNETS, MAX_UP_BLOCKS, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, DecoderSpec, WanVAEDecoder
from .weights import (WeightsError, check_keys, download_hint, inside_model, load_pth, model_root, read_model_json,
                      user_path)

ORIGINAL_VAE_FILE = "Wan2.1_VAE.pth"
ORIGINAL_VAE22_FILE = "Wan2.2_VAE.pth"  # TI2V-5B's; the A14B release ships Wan2.1_VAE.pth

_RESNET = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
           "shortcut.": "conv_shortcut."}


def _resnet_key(rest: str, file: str = ORIGINAL_VAE_FILE) -> str:
    for old, new in _RESNET.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    raise WeightsError(f"unknown residual block key ...{rest} in {file}")


def _from_original(raw: dict[str, torch.Tensor], file: str = ORIGINAL_VAE_FILE
                   ) -> tuple[DecoderSpec, dict[str, torch.Tensor]]:
    """Original Decoder3d keys (decoder.conv1, decoder.middle.N, decoder.upsamples.N, decoder.head.N, conv2): Wan2.2's
    when its up blocks nest (decoder.upsamples.N.upsamples.M), else Wan2.1's flat Sequential."""
    if any(k.startswith("decoder.upsamples.") and ".upsamples." in k[len("decoder.upsamples."):] for k in raw):
        return _from_original22(raw, file)
    if "decoder.conv1.weight" not in raw:
        raise WeightsError(f"{file} has no decoder.conv1.weight: not a Wan2.1 VAE")
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
                state[f"decoder.mid_block.resnets.{n // 2}.{_resnet_key(sub, file)}"] = t
        elif m := re.match(r"upsamples\.(\d+)\.(.*)", rest):
            ups.setdefault(int(m.group(1)), {})[m.group(2)] = t
        elif m := re.match(r"head\.(\d)\.(.*)", rest):
            state[{"0": "decoder.norm_out.", "2": "decoder.conv_out."}[m.group(1)] + m.group(2)] = t
        else:
            raise WeightsError(f"unknown key {key} in {file}")
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
                state[f"decoder.up_blocks.{block}.resnets.{res_i}.{_resnet_key(sub, file)}"] = t
            w = entry["residual.2.weight"]
            current.append((w.shape[1], w.shape[0]))
            res_i += 1
    if current:
        blocks.append((*current[0], len(current), None))
    if not blocks:
        raise WeightsError(f"{file} has no decoder.upsamples: not a Wan2.1 VAE")
    conv_in = raw["decoder.conv1.weight"]
    spec = DecoderSpec(z_dim=conv_in.shape[1], mid_dim=conv_in.shape[0],
                       blocks=tuple((cin, cout, n, mode) for cin, cout, n, mode in blocks))
    if spec.z_dim != len(spec.latents_mean):
        raise WeightsError(f"{file} has z_dim {spec.z_dim}; the Wan2.1 VAE has 16")
    return spec, state


def _from_original22(raw: dict[str, torch.Tensor], file: str) -> tuple[DecoderSpec, dict[str, torch.Tensor]]:
    """Upstream vae2_2.py keys: decoder.upsamples.N is an Up_ResidualBlock whose `upsamples` Sequential holds its
    residual blocks, then (all but the last block) a Resample: entry M = the block's residual-block count."""
    for key in ("decoder.conv1.weight", "decoder.head.2.weight", "conv2.weight"):
        if key not in raw:
            raise WeightsError(f"{file} has no {key}: not a Wan2.2 VAE")
    state = {"post_quant_conv.weight": raw["conv2.weight"], "post_quant_conv.bias": raw.get("conv2.bias")}
    ups: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in raw.items():
        if not key.startswith("decoder."):
            continue
        rest = key[len("decoder."):]
        if rest.startswith("conv1."):
            state["decoder.conv_in." + rest[6:]] = t
        elif m := re.fullmatch(r"middle\.([012])\.(.*)", rest):
            n, sub = int(m.group(1)), m.group(2)
            if n == 1:
                state[f"decoder.mid_block.attentions.0.{sub}"] = t
            else:
                state[f"decoder.mid_block.resnets.{n // 2}.{_resnet_key(sub, file)}"] = t
        elif m := re.fullmatch(r"upsamples\.(\d{1,3})\.upsamples\.(\d{1,3})\.(.*)", rest):
            i, j = int(m.group(1)), int(m.group(2))
            if i >= MAX_UP_BLOCKS or j >= MAX_RESNETS + 1:
                raise WeightsError(f"{file}: {key} is beyond the {MAX_UP_BLOCKS} up blocks of {MAX_RESNETS} "
                                   f"residual blocks any Wan VAE has")
            ups.setdefault(i, {}).setdefault(j, {})[m.group(3)] = t
        elif m := re.fullmatch(r"head\.([02])\.(.*)", rest):
            state[{"0": "decoder.norm_out.", "2": "decoder.conv_out."}[m.group(1)] + m.group(2)] = t
        else:
            raise WeightsError(f"unknown key {key} in {file}")
    if sorted(ups) != list(range(len(ups))) or not ups:
        raise WeightsError(f"{file}: decoder.upsamples must be numbered 0..N-1, got {sorted(ups)}")
    blocks = []
    for i in range(len(ups)):
        entries = ups[i]
        resample = [j for j, e in entries.items() if any(k.startswith(("resample.", "time_conv.")) for k in e)]
        n_res = len(entries) - len(resample)
        if sorted(entries) != list(range(len(entries))) or resample not in ([], [n_res]):
            raise WeightsError(f"{file}: decoder.upsamples.{i} must hold residual blocks 0..N-1 and then at most "
                               f"one resample, got entries {sorted(entries)}")
        for j in range(n_res):
            for sub, t in entries[j].items():
                state[f"decoder.up_blocks.{i}.resnets.{j}.{_resnet_key(sub, file)}"] = t
        mode = None
        if resample:
            entry = entries[n_res]
            mode = "upsample3d" if "time_conv.weight" in entry else "upsample2d"
            for sub, t in entry.items():
                state[f"decoder.up_blocks.{i}.upsampler.{sub}"] = t
        w = entries[0].get("residual.2.weight") if n_res else None
        if w is None or w.dim() != 5:
            raise WeightsError(f"{file}: decoder.upsamples.{i}.upsamples.0 has no residual.2.weight (a 3-D conv)")
        blocks.append((w.shape[1], w.shape[0], n_res, mode))
    conv_in, head = raw["decoder.conv1.weight"], raw["decoder.head.2.weight"]
    if conv_in.dim() != 5 or head.dim() != 5:
        raise WeightsError(f"{file}: decoder.conv1 and decoder.head.2 must be 3-D convolutions")
    patch = round((head.shape[0] / 3) ** 0.5)
    if 3 * patch * patch != head.shape[0]:
        raise WeightsError(f"{file}: decoder.head.2 has {head.shape[0]} output channels, not RGB x a square patch")
    z = conv_in.shape[1]
    if z != len(WAN22_LATENTS_MEAN):
        raise WeightsError(f"{file} has z_dim {z}; the Wan2.2 VAE has {len(WAN22_LATENTS_MEAN)}")
    spec = DecoderSpec(z_dim=z, mid_dim=conv_in.shape[0], blocks=tuple(blocks), latents_mean=tuple(WAN22_LATENTS_MEAN),
                       latents_std=tuple(WAN22_LATENTS_STD), is_residual=True, patch_size=patch)
    try:
        spec.check()
    except ValueError as e:
        raise WeightsError(f"{file}: {e}") from None
    return spec, {k: v for k, v in state.items() if v is not None}


def _locate(path: Path) -> Path:
    """The VAE's own file or folder inside whatever layout `path` is; given a folder, what is read must resolve
    inside it (a .pth is unpickled: a link must not pull one in from elsewhere)."""
    path = user_path(path)
    if not path.exists():
        raise WeightsError(f"VAE weights {path} do not exist: {download_hint(path)}")
    root = model_root(path) if path.is_dir() else None
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if path.is_dir():
        originals = [path / f for f in (ORIGINAL_VAE_FILE, ORIGINAL_VAE22_FILE) if (path / f).is_file()]
        if len(originals) == 2:
            raise WeightsError(f"{path} holds both {ORIGINAL_VAE_FILE} and {ORIGINAL_VAE22_FILE}: keep the one of "
                               f"its model (TI2V-5B: {ORIGINAL_VAE22_FILE}, the others {ORIGINAL_VAE_FILE})")
        if originals:
            path = originals[0]
    if path.is_file() and path.suffix not in (".pth", ".pt"):
        raise WeightsError(f"{path}: expected {ORIGINAL_VAE_FILE}, {ORIGINAL_VAE22_FILE} or a diffusers VAE folder")
    if path.is_dir() and not ((path / "config.json").is_file()
                              and (path / "diffusion_pytorch_model.safetensors").is_file()):
        raise WeightsError(f"{path} holds no VAE: expected vae/, config.json + diffusion_pytorch_model."
                           f"safetensors, {ORIGINAL_VAE_FILE} or {ORIGINAL_VAE22_FILE}; {download_hint(path)}")
    if root is not None:
        for file in [path] if path.is_file() else [path / "config.json", path / "diffusion_pytorch_model.safetensors"]:
            inside_model(root, file, "VAE weights")
    return path


def _read_original(path: Path) -> tuple[DecoderSpec, dict[str, torch.Tensor]]:
    """The structure and decoder tensors of an original .pth (weights_only: no code runs; memory-mapped: only what
    is used is read). WeightsError naming the file for anything but a dict of real tensors."""
    raw = load_pth(path, checked=lambda key: key.startswith(("decoder.", "conv2.")))
    try:
        spec, state = _from_original(raw, str(path))
        spec.check()  # Wan2.1's too: its flat upsamples may name any number of blocks
    except WeightsError:
        raise
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None
    except (ArithmeticError, IndexError, KeyError) as e:  # shapes or keys no Wan VAE has
        raise WeightsError(f"{path}: not a Wan VAE ({type(e).__name__}: {str(e)[:80]})") from None
    return spec, state


def _config_spec(path: Path) -> DecoderSpec:
    file = path / "config.json"
    cfg = read_model_json(file)
    try:
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        return DecoderSpec.from_diffusers_config(cfg)
    except (ValueError, TypeError, ArithmeticError) as e:
        raise WeightsError(f"{file}: {str(e)[:300]}") from None


def read_vae_spec(path: Path) -> DecoderSpec:
    """The decoder's structure (latent channels, strides) without reading the weights' data."""
    path = _locate(Path(path))
    return _read_original(path)[0] if path.is_file() else _config_spec(path)


def load_vae_state(path: Path) -> tuple[DecoderSpec, dict[str, torch.Tensor]]:
    """(decoder structure, decoder state dict in WanVAEDecoder's names) from any supported layout."""
    path = _locate(Path(path))
    if path.is_file():
        spec, state = _read_original(path)
    else:
        spec = _config_spec(path)
        state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
        state = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WanVAEDecoder(spec).state_dict().items()}
    version = "Wan2.2" if spec.is_residual else "Wan2.1"
    check_keys(expected, {k: tuple(v.shape) for k, v in state.items()},
               f"VAE weights in {path} do not fit the {version} decoder")
    return spec, state
