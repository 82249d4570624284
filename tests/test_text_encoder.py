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


# -- where the encoder lives and runs (model.text_encoder_device, model.offload_text_encoder) ----------------------

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)  # a device object only: no GPU is needed to decide


@pytest.mark.parametrize("te_device, offload, device, home, run", [
    ("cpu", False, GPU, CPU, CPU),
    ("cpu", True, GPU, CPU, CPU),    # offloading a CPU encoder is moot: it never goes to the GPU
    ("auto", True, GPU, CPU, GPU),   # parked in CPU memory, on the GPU only to encode
    ("auto", False, GPU, GPU, GPU),
    ("auto", True, CPU, CPU, CPU),   # a CPU rank has no GPU to move to
])
def test_encoder_placement(te_device, offload, device, home, run):
    from pipeline.components import encoder_placement

    place = encoder_placement(te_device, offload, device)
    assert (place.home, place.run) == (home, run)
    assert place.moves == (home != run)


class RecordingEncoder:
    """Pretends to move; records every move and the device each encode ran on."""

    def __init__(self, device):
        self.device, self.moves, self.ran_on = torch.device(device), [], []

    def to(self, device):
        self.device = torch.device(device)
        self.moves.append(self.device)
        return self

    def encode(self, prompts):
        self.ran_on.append(self.device)
        return torch.zeros(len(prompts), 4, 3)


@pytest.mark.parametrize("te_device, offload, moves", [
    ("cpu", True, []),
    ("auto", True, [GPU, CPU]),
    ("auto", False, []),
])
def test_encode_text_runs_where_placed_and_returns_home(te_device, offload, moves):
    from pipeline.components import Components, encoder_placement

    place = encoder_placement(te_device, offload, GPU)
    encoder = RecordingEncoder(place.home)
    comp = Components(None, encoder, None, 16, 4, 8, place)
    for _ in range(2):
        assert comp.encode_text(["a", "b"]).shape == (2, 4, 3)
    assert encoder.ran_on == [place.run] * 2 and encoder.device == place.home
    assert encoder.moves == moves * 2


def test_encoder_goes_home_when_encoding_fails():
    from pipeline.components import Components, encoder_placement

    encoder = RecordingEncoder(CPU)
    encoder.encode = lambda prompts: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    comp = Components(None, encoder, None, 16, 4, 8, encoder_placement("auto", True, GPU))
    with pytest.raises(RuntimeError, match="out of memory"):
        comp.encode_text(["a"])
    assert encoder.device == CPU


def test_cpu_encoder_loads_in_bf16_and_keeps_the_granted_threads(tmp_path):
    """On CPU: the encoder is loaded in bfloat16 on the CPU (half the fp32 bytes), encodes close to the fp32
    reference, and nothing in loading or encoding changes the worker's torch thread count."""
    from configs import ModelConfig
    from pipeline.components import load_components
    from tests.tiny_models import wan_pipeline_folder

    folder = wan_pipeline_folder(tmp_path / "wan")
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        comp = load_components(ModelConfig(path=str(folder), text_encoder_device="cpu", offload_text_encoder=True),
                               device=CPU, encode=True, decode=False)
        encoder = comp.text_encoder
        assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
        assert encoder.device == CPU and not comp.text_placement.moves
        got = comp.encode_text(["a red circle moving right"])
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
    fp32 = WanTextEncoder.from_pretrained(folder, dtype=torch.float32, text_len=comp.text_len)
    want = fp32.encode(["a red circle moving right"])
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got - want).norm() / want.norm()) < 0.03


def test_a_tokenizer_without_its_vocabulary_is_refused(tmp_path):
    # What transformers 5 made of T5Tokenizer(vocab_file=...) for a while: only the special tokens, every word <unk>.
    # A model would then encode every prompt as the same text; the loader refuses such a tokenizer instead.
    from transformers import T5Tokenizer

    from pipeline.text_encoder import load_tokenizer
    from pipeline.weights import WeightsError

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    T5Tokenizer(vocab=specials, extra_ids=0, unk_id=2).save_pretrained(tmp_path / "bare")
    with pytest.raises(WeightsError, match="has only 4 tokens"):
        load_tokenizer(tmp_path / "bare")
    tiny_tokenizer(tmp_path / "tok").save_pretrained(tmp_path / "saved")
    assert len(load_tokenizer(tmp_path / "saved")) > 16
