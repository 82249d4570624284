"""The umt5-xxl text encoder (transformers' UMT5EncoderModel) with Wan2.1's prompt handling.

Legend: N prompts, T text_len (512) token rows, C d_model (4096).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .weights import (MissingWeightsError, WeightsError, check_blocks, check_keys, dit_weight_files, download_hint,
                      inside_model, load_pth, model_root, read_header, read_model_json, rename_first, user_path)

__all__ = ["WanTextEncoder", "ORIGINAL_T5_FILE", "ORIGINAL_TOKENIZER_DIR", "locate", "load_tokenizer", "original_state",
           "original_config"]

log = logging.getLogger(__name__)

ORIGINAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER_DIR = "google/umt5-xxl"
MAX_T5_LAYERS = 128  # umt5-xxl has 24: a header naming block 4999 must not build 5000 on meta
_HF_BLOCK = r"encoder\.block\.(\d+)\."
# The tensors original_config reads its sizes from (transformers' names): each must be there and 2-D.
_CONFIG_KEYS = ("shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")

# original Wan2.1 T5 names -> transformers UMT5EncoderModel names
_ORIGINAL_TO_HF = [
    (r"^token_embedding\.", "shared."),
    (r"^norm\.", "encoder.final_layer_norm."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
]


def _hf_name(key: object, path: Path) -> str:
    name = rename_first(key, _ORIGINAL_TO_HF) if isinstance(key, str) else None
    if name is None:
        raise WeightsError(f"unknown key {key!r:.80} in {path}")
    return name


def original_state(path: Path) -> dict[str, torch.Tensor]:
    """The original release's .pth under transformers' names, memory-mapped (weights_only: no code runs; mmap: a
    tensor's pages are read only when used, so slicing a row range reads just those rows). WeightsError naming the
    file (one line) for anything but a dict of real tensors with the keys the config is read from."""
    raw = load_pth(path)
    state = {_hf_name(key, path): value for key, value in raw.items()}
    state_shapes = {k: tuple(v.shape) for k, v in state.items()}
    _check_config_shapes(state_shapes, str(path))
    return state


def _check_config_shapes(shapes: dict[str, tuple[int, ...]], what: str) -> int:
    """The number of encoder blocks, after checking the tensors original_config reads are there and 2-D and that the
    blocks run 0..L-1 with one key set, L <= MAX_T5_LAYERS (names only: nothing is built yet)."""
    for key in _CONFIG_KEYS:
        if key not in shapes:
            raise WeightsError(f"{what} lacks {key}: not a umt5 encoder checkpoint")
        if len(shapes[key]) != 2:
            raise WeightsError(f"{what}: {key} has shape {shapes[key]}, expected 2-D")
    return check_blocks(shapes, _HF_BLOCK, MAX_T5_LAYERS, what)


def original_config(shapes: dict[str, tuple[int, ...]], what: str = ORIGINAL_T5_FILE):
    """UMT5Config of the original release's encoder, from its tensors' shapes (transformers' names)."""
    from transformers import UMT5Config

    layers = _check_config_shapes(shapes, what)
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
    )


def _load_original(path: Path, dtype):
    from transformers import UMT5EncoderModel

    state = original_state(path)
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    with torch.device("meta"):
        model = UMT5EncoderModel(original_config({k: tuple(v.shape) for k, v in state.items()}, str(path)))
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()},
               {k: tuple(v.shape) for k, v in state.items()}, f"{path} does not fit UMT5")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.tie_weights()
    return model


def locate(path) -> tuple[bool, Path, Path]:
    """(diffusers layout?, tokenizer folder, weights: text_encoder/ or the .pth) of a model folder, after checking
    that everything to be read resolves inside it (the .pth is unpickled): WeightsError before any load."""
    path = user_path(path)
    if not path.exists():
        raise WeightsError(f"model folder {path} does not exist: {download_hint(path)}")
    if (path / "text_encoder" / "config.json").is_file():
        diffusers, tok_dir = True, path / "tokenizer"
    elif (path / ORIGINAL_T5_FILE).is_file():
        diffusers, tok_dir = False, path / ORIGINAL_TOKENIZER_DIR
    else:
        raise WeightsError(f"{path} holds no text encoder: expected text_encoder/ + tokenizer/ (diffusers) or "
                           f"{ORIGINAL_T5_FILE} + {ORIGINAL_TOKENIZER_DIR}/ (original Wan2.1); {download_hint(path)}")
    if not tok_dir.is_dir():
        raise WeightsError(f"tokenizer folder {tok_dir} is missing")
    root = model_root(path)
    for folder in (path / "text_encoder",) * diffusers + (tok_dir,):
        inside_model(root, folder, "text encoder file")
        for file in folder.iterdir():
            resolved = inside_model(root, file, "text encoder file")
            if not (resolved.is_file() or resolved.is_dir()):  # a FIFO would block its reader forever
                raise WeightsError(f"text encoder file {file} is not a regular file")
    weights = path / "text_encoder" if diffusers else inside_model(root, path / ORIGINAL_T5_FILE, "text encoder file")
    if diffusers:
        try:
            _check_diffusers_layers(weights)
        except MissingWeightsError as e:
            raise MissingWeightsError(f"{e}; {download_hint(path)}") from None
    return diffusers, tok_dir, weights


def _check_diffusers_layers(folder: Path) -> None:
    """A diffusers text_encoder/ whose config.json num_layers matches the blocks its safetensors headers name
    (0..L-1, one key set, L <= MAX_T5_LAYERS): checked before any loader builds the model config.json declares."""
    config = folder / "config.json"
    raw = read_model_json(config)
    layers = raw.get("num_layers") if isinstance(raw, dict) else None
    if not isinstance(layers, int) or isinstance(layers, bool) or not 0 < layers <= MAX_T5_LAYERS:
        raise WeightsError(f"{config}: num_layers {layers!r:.40} is not a number of blocks from 1 to {MAX_T5_LAYERS}")
    names = [name for file in dit_weight_files(folder) for name in read_header(file)]
    found = check_blocks(names, _HF_BLOCK, MAX_T5_LAYERS, f"text encoder weights in {folder}")
    if found != layers:
        raise WeightsError(f"{config} says num_layers {layers} but the weights hold {found} blocks")


MIN_VOCAB = 16  # a tokenizer with no more tokens than this read only its special tokens


def load_tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    # transformers 5 builds a T5 tokenizer from spiece.model alone with only its special tokens (every word <unk>)
    # instead of failing: a model would then render every prompt as the same text. umt5-xxl has 256,384 tokens.
    if len(tokenizer) <= MIN_VOCAB:
        raise WeightsError(f"the tokenizer in {tok_dir} has only {len(tokenizer)} tokens: transformers could not read "
                           f"its vocabulary (a folder with spiece.model but no tokenizer.json?); use the model's "
                           f"tokenizer folder as released (with tokenizer.json)")
    return tokenizer


class WanTextEncoder:
    """encode(prompts) -> [N, text_len, d_model]: real tokens (with EOS) encoded under the attention mask, then
    zero rows up to text_len, exactly as Wan2.1 feeds its DiT."""

    def __init__(self, model, tokenizer, text_len: int = 512):
        self.model, self.tokenizer, self.text_len = model.eval().requires_grad_(False), tokenizer, text_len

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.bfloat16, text_len: int = 512) -> "WanTextEncoder":
        """A diffusers pipeline folder (text_encoder/ + tokenizer/) or the original Wan2.1 folder
        (models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/)."""
        from transformers import UMT5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        diffusers, tok_dir, weights = locate(path)  # everything read resolves inside the model folder
        if diffusers:
            model = UMT5EncoderModel.from_pretrained(weights, dtype=dtype, use_safetensors=True)
        else:
            model = _load_original(weights, dtype)
        tokenizer = load_tokenizer(tok_dir)
        return cls(model.to(device), tokenizer, text_len)

    def to(self, device) -> "WanTextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        full = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        for prompt, ids in zip(prompts, full):
            if len(ids) > self.text_len:
                log.warning("prompt truncated to %d of its %d tokens: %.80r", self.text_len, len(ids), prompt)
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.text_len, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        hidden_NTC = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        # Rows past each prompt's length become zeros, not the encoder's outputs at PAD.
        return (hidden_NTC * mask.unsqueeze(-1).to(hidden_NTC.dtype)).float()
