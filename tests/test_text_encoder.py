"""Wan's prompt handling on transformers' UMT5EncoderModel, from both folder layouts."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.text_encoder import WanTextEncoder
from tests.tiny_models import hf_umt5, save_t5, tiny_tokenizer


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    tokenizer = tiny_tokenizer(root / "spm")
    model = hf_umt5(len(tokenizer), seed=0)
    folders = {layout: save_t5(model, tokenizer, root / layout, layout) for layout in ("pipeline", "original")}
    return model, tokenizer, folders


def expected(model, tokenizer, prompts, text_len):
    """Wan2.1: tokenize to text_len with EOS, encode with the mask, keep the real rows, zero-pad the rest."""
    out = torch.zeros(len(prompts), text_len, model.config.d_model)
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, max_length=text_len, truncation=True, add_special_tokens=True,
                        return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0]
        out[i, : ids.shape[1]] = hidden
    return out


@pytest.mark.parametrize("layout", ["pipeline", "original"])
def test_matches_wan_prompt_handling(parts, layout):
    model, tokenizer, folders = parts
    encoder = WanTextEncoder.from_pretrained(folders[layout], dtype=torch.float32, text_len=32)
    prompts = ["a red circle moving right", "waves crash on a rocky shore at sunset, cinematic", ""]
    got = encoder.encode(prompts)
    want = expected(model, tokenizer, prompts, 32)
    assert got.shape == (3, 32, 24) and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-5
    n_real = len(tokenizer(prompts[0])["input_ids"])
    assert (got[0, n_real:] == 0).all() and (got[0, :n_real].abs().sum(-1) > 0).all()


def test_long_prompts_are_truncated_with_a_warning(parts, caplog):
    model, tokenizer, folders = parts
    encoder = WanTextEncoder.from_pretrained(folders["pipeline"], dtype=torch.float32, text_len=8)
    prompt = "the quick brown fox jumps over the lazy dog " * 3
    with caplog.at_level(logging.WARNING):
        got = encoder.encode([prompt])
    assert "truncated" in caplog.text and "quick brown fox" in caplog.text
    assert (got - expected(model, tokenizer, [prompt], 8)).abs().max() < 1e-5
    assert (got[0].abs().sum(-1) > 0).all()  # all 8 rows are real tokens (the last one is EOS)
