"""Tiny random reference models (diffusers / transformers) and the folder layouts real weights come in.

Every test that needs weights builds them here; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DIT_KW = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=12, in_channels=16, out_channels=16,
              text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2)

# diffusers -> original Wan2.1 key names, written out independently of pipeline/weights.py
_TO_ORIGINAL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
}
_BLOCK_TO_ORIGINAL = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}


def diffusers_dit(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**DIT_KW, **overrides}).eval()
    # diffusers zero-initialises nothing that matters here, but make the modulation tables clearly non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale_shift_table" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def to_original_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    for old, new in _TO_ORIGINAL.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        if rest == "scale_shift_table":
            return f"blocks.{i}.modulation"
        for old, new in _BLOCK_TO_ORIGINAL.items():
            if rest.startswith(old + "."):
                return f"blocks.{i}.{new}{rest[len(old):]}"
    return key


def save_dit(model, folder: Path, layout: str) -> Path:
    """Save a diffusers WanTransformer3DModel as 'diffusers' (model folder), 'pipeline' (transformer/ inside a
    pipeline folder) or 'original' (Wan2.1 release names, sharded with an index, config without text_dim and
    patch_size). Returns the folder to pass to from_pretrained."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if layout == "diffusers":
        model.save_pretrained(folder)
    elif layout == "pipeline":
        model.save_pretrained(folder / "transformer")
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    elif layout == "original":
        folder.mkdir(parents=True, exist_ok=True)
        cfg = model.config
        state = {to_original_key(k): v.contiguous() for k, v in model.state_dict().items()}
        names = sorted(state)
        shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
        weight_map = {}
        for file, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(folder / file))
            weight_map.update({k: file for k in keys})
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (folder / "config.json").write_text(json.dumps({
            "_class_name": "WanModel", "dim": cfg.num_attention_heads * cfg.attention_head_dim,
            "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels, "out_dim": cfg.out_channels,
            "num_heads": cfg.num_attention_heads, "num_layers": cfg.num_layers, "eps": cfg.eps, "text_len": 512,
            "model_type": "t2v", "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True,
        }))
    else:
        raise ValueError(layout)
    return folder
