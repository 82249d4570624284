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


# ---------------------------------------------------------------------------------------------------------------
# VAE

VAE_KW = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True])


def diffusers_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(**{**VAE_KW, **overrides}).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb everything so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _vae_to_original(state: dict, num_res_blocks: int, n_blocks: int) -> dict:
    """diffusers AutoencoderKLWan decoder keys -> original Wan2.1_VAE.pth keys (independent of pipeline/)."""
    res = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}
    out = {"conv2.weight": state["post_quant_conv.weight"], "conv2.bias": state["post_quant_conv.bias"],
           "conv1.weight": state["quant_conv.weight"], "conv1.bias": state["quant_conv.bias"],
           "encoder.conv1.weight": state["encoder.conv_in.weight"]}  # encoder weights ride along, ignored
    per_block = num_res_blocks + 2  # resnets + one resample
    for key, t in state.items():
        if not key.startswith("decoder."):
            continue
        parts = key.split(".")
        if parts[1] == "conv_in":
            out["decoder.conv1." + parts[-1]] = t
        elif parts[1] == "norm_out":
            out["decoder.head.0." + parts[-1]] = t
        elif parts[1] == "conv_out":
            out["decoder.head.2." + parts[-1]] = t
        elif parts[1] == "mid_block":
            if parts[2] == "attentions":
                out["decoder.middle.1." + ".".join(parts[4:])] = t
            else:
                out[f"decoder.middle.{2 * int(parts[3])}.{res[parts[4]]}.{parts[5]}"] = t
        elif parts[1] == "up_blocks":
            block = int(parts[2])
            if parts[3] == "resnets":
                n = block * per_block + int(parts[4])
                out[f"decoder.upsamples.{n}.{res[parts[5]]}.{parts[6]}"] = t
            else:  # upsamplers.0.<rest>
                n = block * per_block + num_res_blocks + 1
                out[f"decoder.upsamples.{n}." + ".".join(parts[5:])] = t
    return out


def save_vae(model, folder: Path, layout: str) -> Path:
    folder = Path(folder)
    if layout == "diffusers":
        model.save_pretrained(folder)
    elif layout == "pipeline":
        model.save_pretrained(folder / "vae")
    elif layout == "original":
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(_vae_to_original(state, model.config.num_res_blocks, len(model.config.dim_mult)),
                   folder / "Wan2.1_VAE.pth")
    else:
        raise ValueError(layout)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Text encoder

CORPUS = """a red circle moving right
a green square moving left across a dark background
a blue ball bouncing up and down
the quick brown fox jumps over the lazy dog
a cinematic shot of a city at night with neon lights
waves crash on a rocky shore at sunset
ein Hund läuft über eine grüne Wiese
un chat noir dort sur le canapé
a yellow square moving up, a white circle moving down
close-up of a flower opening in time lapse
"""


def tiny_tokenizer(folder: Path):
    """A T5 tokenizer over a sentencepiece unigram model trained here on a small corpus."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS * 5, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    # transformers 5 builds T5Tokenizer from a (piece, score) list; given only vocab_file it keeps 4 special tokens
    # and every word becomes <unk>, so the pieces are passed explicitly (the same ids sentencepiece gives).
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, unk_id=2, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    assert len(tokenizer) == sp.get_piece_size() and tokenizer("a cat")["input_ids"][:-1] == sp.encode("a cat")
    return tokenizer


def hf_umt5(vocab_size: int, seed: int = 0, d_model: int = 24):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=6, d_ff=40, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
    return UMT5EncoderModel(cfg).eval()


def _t5_to_original(state: dict) -> dict:
    out = {}
    for key, t in state.items():
        if key == "encoder.embed_tokens.weight":
            continue
        if key == "shared.weight":
            out["token_embedding.weight"] = t
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = t
        else:
            _, _, i, _, layer, *rest = key.split(".")
            rest = ".".join(rest)
            name = {
                "layer_norm.weight": "norm1.weight" if layer == "0" else "norm2.weight",
                "SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
                "DenseReluDense.wi_0.weight": "ffn.gate.0.weight", "DenseReluDense.wi_1.weight": "ffn.fc1.weight",
                "DenseReluDense.wo.weight": "ffn.fc2.weight",
            }.get(rest) or "attn." + rest.split(".", 1)[1]
            out[f"blocks.{i}.{name}"] = t
    return out


def save_t5(model, tokenizer, folder: Path, layout: str) -> Path:
    folder = Path(folder)
    if layout == "pipeline":
        model.save_pretrained(folder / "text_encoder")
        tokenizer.save_pretrained(folder / "tokenizer")
    elif layout == "original":
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(_t5_to_original(state), folder / "models_t5_umt5-xxl-enc-bf16.pth")
        tokenizer.save_pretrained(folder / "google" / "umt5-xxl")
    else:
        raise ValueError(layout)
    return folder


def wan_pipeline_folder(folder: Path, seed: int = 0, heads: int = 3, layers: int = 2) -> Path:
    """A complete tiny Wan2.1 diffusers pipeline folder (transformer/, text_encoder/, tokenizer/, vae/)."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder / "_spm")
    t5 = hf_umt5(len(tokenizer), seed=seed, d_model=24)
    save_t5(t5, tokenizer, folder, "pipeline")
    save_dit(diffusers_dit(seed, num_attention_heads=heads, attention_head_dim=12, text_dim=24, num_layers=layers),
             folder, "pipeline")
    save_vae(diffusers_vae(seed), folder, "pipeline")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Wan2.2 VAE (TI2V-5B's: 48 latent channels, residual up blocks, a 2x2 output patch; 16x spatial, 4x temporal)

# Upstream's Wan2_2_VAE hard-codes these (wan/modules/vae2_2.py); diffusers' conversion script copies them into the
# VAE config. Written out here independently of pipeline/vae.py: the "original" layout carries no config, so a
# loader must supply exactly these for the original .pth to decode like the diffusers folder.
VAE22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667]
VAE22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]

# The released structure (z 48, is_residual, patch 2, 12 in/out channels, 16x spatial) at tiny widths: decoder
# dims 48, 48, 48, 24, 12 (the real one: 1024, 1024, 1024, 512, 256).
VAE22_KW = dict(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                latents_mean=VAE22_LATENTS_MEAN, latents_std=VAE22_LATENTS_STD)


def diffusers_vae22(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(**{**VAE22_KW, **overrides}).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb everything so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _vae22_to_original(state: dict, num_res_blocks: int) -> dict:
    """diffusers AutoencoderKLWan (Wan2.2) decoder keys -> upstream Wan2.2_VAE.pth keys (wan/modules/vae2_2.py:
    Decoder3d.upsamples.i is an Up_ResidualBlock whose own `upsamples` Sequential holds the residual blocks and then
    the Resample; its DupUp3D shortcut has no weights). Independent of pipeline/."""
    res = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}
    out = {"conv2.weight": state["post_quant_conv.weight"], "conv2.bias": state["post_quant_conv.bias"],
           "conv1.weight": state["quant_conv.weight"], "conv1.bias": state["quant_conv.bias"],
           "encoder.conv1.weight": state["encoder.conv_in.weight"],  # encoder weights ride along, ignored
           "encoder.conv1.bias": state["encoder.conv_in.bias"]}
    for key, t in state.items():
        if not key.startswith("decoder."):
            continue
        parts = key.split(".")
        if parts[1] == "conv_in":
            out["decoder.conv1." + parts[-1]] = t
        elif parts[1] == "norm_out":
            out["decoder.head.0." + parts[-1]] = t
        elif parts[1] == "conv_out":
            out["decoder.head.2." + parts[-1]] = t
        elif parts[1] == "mid_block":
            if parts[2] == "attentions":
                out["decoder.middle.1." + ".".join(parts[4:])] = t
            else:
                out[f"decoder.middle.{2 * int(parts[3])}.{res[parts[4]]}.{parts[5]}"] = t
        elif parts[1] == "up_blocks":
            block = int(parts[2])
            if parts[3] == "resnets":
                out[f"decoder.upsamples.{block}.upsamples.{parts[4]}.{res[parts[5]]}.{parts[6]}"] = t
            else:  # upsampler.<resample.1 | time_conv>.<weight | bias>: the Sequential's last entry
                out[f"decoder.upsamples.{block}.upsamples.{num_res_blocks + 1}." + ".".join(parts[4:])] = t
        else:
            raise AssertionError(key)
    return out


def save_vae22(model, folder: Path, layout: str) -> Path:
    """Save a Wan2.2 AutoencoderKLWan as 'folder' (a diffusers VAE folder: config.json + safetensors), 'pipeline'
    (folder/vae/) or 'original' (folder/Wan2.2_VAE.pth in upstream key names, no config). Returns `folder`."""
    folder = Path(folder)
    if layout == "folder":
        model.save_pretrained(folder)
    elif layout == "pipeline":
        model.save_pretrained(folder / "vae")
    elif layout == "original":
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(_vae22_to_original(state, model.config.num_res_blocks), folder / "Wan2.2_VAE.pth")
    else:
        raise ValueError(layout)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Wan2.2 folders

def wan22_a14b_dits(seed: int = 0, **overrides):
    """(high-noise, low-noise) tiny diffusers DiTs of one config (DIT_KW + overrides), seeds seed and seed + 1."""
    return diffusers_dit(seed, **overrides), diffusers_dit(seed + 1, **overrides)


def wan22_a14b_folder(folder: Path, layout: str, seed: int = 0) -> Path:
    """A tiny Wan2.2 T2V-A14B-style model: two DiTs of the same config (wan22_a14b_dits(seed)), the Wan2.1 VAE
    (diffusers_vae(seed)) and umt5 (hf_umt5(seed)). 'pipeline': the diffusers layout, transformer/ (high) +
    transformer_2/ (low) + model_index.json with boundary_ratio 0.875; 'original': the release's high_noise_model/ +
    low_noise_model/ (Wan names, sharded, config.json without text_dim and patch_size), Wan2.1_VAE.pth, the umt5
    .pth and google/umt5-xxl/."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder / "_spm")
    save_t5(hf_umt5(len(tokenizer), seed=seed, d_model=24), tokenizer, folder, layout)
    high, low = wan22_a14b_dits(seed)
    vae = diffusers_vae(seed)
    if layout == "pipeline":
        save_dit(high, folder, "pipeline")
        low.save_pretrained(folder / "transformer_2")
        save_vae(vae, folder, "pipeline")
        (folder / "model_index.json").write_text(json.dumps(_model_index(boundary_ratio=0.875, two=True)))
    elif layout == "original":
        save_dit(high, folder / "high_noise_model", "original")
        save_dit(low, folder / "low_noise_model", "original")
        save_vae(vae, folder, "original")
    else:
        raise ValueError(layout)
    return folder


def wan22_ti2v_dit(seed: int = 0, **overrides):
    """The tiny TI2V-5B-style DiT: 48 latent channels in and out."""
    return diffusers_dit(seed, **{"in_channels": 48, "out_channels": 48, **overrides})


def wan22_ti2v_folder(folder: Path, layout: str, seed: int = 0) -> Path:
    """A tiny Wan2.2 TI2V-5B-style model: one 48-channel DiT (wan22_ti2v_dit(seed)), the Wan2.2 VAE
    (diffusers_vae22(seed)) and umt5. 'pipeline': transformer/, vae/, model_index.json with expand_timesteps true
    and boundary_ratio null; 'original': the DiT at the root (Wan names, config.json model_type ti2v),
    Wan2.2_VAE.pth, the umt5 .pth and google/umt5-xxl/."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder / "_spm")
    save_t5(hf_umt5(len(tokenizer), seed=seed, d_model=24), tokenizer, folder, layout)
    dit = wan22_ti2v_dit(seed)
    if layout == "pipeline":
        save_dit(dit, folder, "pipeline")
        (folder / "model_index.json").write_text(json.dumps(_model_index(boundary_ratio=None, two=False,
                                                                         expand_timesteps=True)))
    elif layout == "original":
        save_dit(dit, folder, "original")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "ti2v"}))
    else:
        raise ValueError(layout)
    save_vae22(diffusers_vae22(seed), folder, layout)
    return folder


def _model_index(boundary_ratio, two: bool, expand_timesteps: bool = False) -> dict:
    """A WanPipeline model_index.json as diffusers 0.42 writes it."""
    return {"_class_name": "WanPipeline", "_diffusers_version": "0.42.0", "boundary_ratio": boundary_ratio,
            "expand_timesteps": expand_timesteps, "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "transformer_2": ["diffusers", "WanTransformer3DModel"] if two else [None, None],
            "vae": ["diffusers", "AutoencoderKLWan"]}
