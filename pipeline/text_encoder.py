"""The umt5-xxl text encoder (transformers' UMT5EncoderModel) with Wan2.1's prompt handling.

Legend: N prompts, T text_len (512) token rows, C d_model (4096).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .weights import WeightsError, check_keys, inside_model, model_root, rename_first

__all__ = ["WanTextEncoder", "ORIGINAL_T5_FILE", "ORIGINAL_TOKENIZER_DIR", "locate", "load_tokenizer", "original_state",
           "original_config"]

log = logging.getLogger(__name__)

ORIGINAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER_DIR = "google/umt5-xxl"

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


def _hf_name(key: str) -> str:
    name = rename_first(key, _ORIGINAL_TO_HF)
    if name is None:
        raise WeightsError(f"unknown key {key} in {ORIGINAL_T5_FILE}")
    return name


def original_state(path: Path) -> dict[str, torch.Tensor]:
    """The original release's .pth under transformers' names, memory-mapped (weights_only: no code runs; mmap: a
    tensor's pages are read only when used, so slicing a row range reads just those rows)."""
    raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {_hf_name(k): v for k, v in raw.items()}


def original_config(shapes: dict[str, tuple[int, ...]]):
    """UMT5Config of the original release's encoder, from its tensors' shapes (transformers' names)."""
    from transformers import UMT5Config

    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")),
        num_heads=heads, relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
    )


def _load_original(path: Path, dtype):
    from transformers import UMT5EncoderModel

    state = original_state(path)
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    with torch.device("meta"):
        model = UMT5EncoderModel(original_config({k: tuple(v.shape) for k, v in state.items()}))
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()},
               {k: tuple(v.shape) for k, v in state.items()}, f"{path} does not fit UMT5")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.tie_weights()
    return model


def locate(path) -> tuple[bool, Path, Path]:
    """(diffusers layout?, tokenizer folder, weights: text_encoder/ or the .pth) of a model folder, after checking
    that everything to be read resolves inside it (the .pth is unpickled): WeightsError before any load."""
    path = Path(path)
    if (path / "text_encoder" / "config.json").is_file():
        diffusers, tok_dir = True, path / "tokenizer"
    elif (path / ORIGINAL_T5_FILE).is_file():
        diffusers, tok_dir = False, path / ORIGINAL_TOKENIZER_DIR
    else:
        raise WeightsError(f"{path} holds no text encoder: expected text_encoder/ + tokenizer/ (diffusers) or "
                           f"{ORIGINAL_T5_FILE} + {ORIGINAL_TOKENIZER_DIR}/ (original Wan2.1)")
    if not tok_dir.is_dir():
        raise WeightsError(f"tokenizer folder {tok_dir} is missing")
    root = model_root(path)
    for folder in (path / "text_encoder",) * diffusers + (tok_dir,):
        inside_model(root, folder, "text encoder file")
        for file in folder.iterdir():
            inside_model(root, file, "text encoder file")
    weights = path / "text_encoder" if diffusers else inside_model(root, path / ORIGINAL_T5_FILE, "text encoder file")
    return diffusers, tok_dir, weights


def load_tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(tok_dir)


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
