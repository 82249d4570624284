"""Loaders against hostile or mismatched checkpoints: every rank of a replica checks it loaded the same model as
rank 0 (pipeline/load_guard.py, gloo at 2 ranks), and a header or .pth that declares a huge or malformed model is
refused with one WeightsError line before anything is built (pipeline/weights.py, pipeline/text_encoder.py)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.load_guard import check_same_models, model_record
from pipeline.text_encoder import ORIGINAL_T5_FILE, WanTextEncoder
from pipeline.weights import WeightsError, load_dit, read_dit_headers
from pipeline.vae import WanVAEDecoder
from tests.tiny_models import (diffusers_vae, hf_umt5, save_t5, save_vae, tiny_tokenizer,
                                 wan_pipeline_folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A: the reference pipeline folder; same: a copy of it elsewhere; layers: one more block; weights: the same
    shapes, another seed; text: A with another seed's text encoder."""
    root = tmp_path_factory.mktemp("guard")
    a = wan_pipeline_folder(root / "A", seed=0, heads=4, layers=3)
    out = {"A": a, "same": shutil.copytree(a, root / "same"),
           "layers": wan_pipeline_folder(root / "layers", seed=0, heads=4, layers=4),
           "weights": wan_pipeline_folder(root / "weights", seed=1, heads=4, layers=3)}
    text = shutil.copytree(a, root / "text")
    shutil.rmtree(text / "text_encoder")
    tok = tiny_tokenizer(root / "_spm")
    hf_umt5(len(tok), seed=5, d_model=24).save_pretrained(text / "text_encoder")
    out["text"] = text
    vae = shutil.copytree(a, root / "vae")
    shutil.rmtree(vae / "vae")
    save_vae(diffusers_vae(seed=7), vae, "pipeline")
    out["vae"] = vae
    return out


# -- ranks that loaded different models -------------------------------------------------------------------------


OLD_TORCH = "torch 2.4 has no fully_shard(ignored_params=...): parallel.shard_weights needs torch >= 2.7"


def _rank_main(rank, cases, q):
    import pipeline.runner as runner_mod
    from configs import load_config
    from pipeline.runner import Runner

    for i, (folders, shard, rendezvous) in enumerate(cases):
        # folders None: this worker's torch cannot shard (the driver's could: Ray does not make them the same)
        runner_mod.fsdp_unavailable = (lambda: OLD_TORCH) if folders is None else (lambda: None)
        folders = folders or cases[0][0]
        cfg = load_config(None, [f"model.path={folders[rank]}", "runtime.device=cpu", "runtime.collective_timeout_s=30",
                                 "parallel.ulysses_degree=2", f"parallel.shard_weights={str(shard).lower()}"])
        t0 = time.time()
        try:
            runner = Runner(cfg, rank, 2, init_method=f"file://{rendezvous}")
            runner.close()
            q.put((i, rank, "ok", time.time() - t0))
        except Exception as e:  # noqa: BLE001 - reported to the test
            q.put((i, rank, f"{type(e).__name__}: {e}", time.time() - t0))
            torch.distributed.destroy_process_group()


def test_ranks_that_loaded_different_models_all_fail_with_one_line(folders, tmp_path):
    """Rank 1 reads another folder than rank 0 (another node's model.path): with sharding a different block count
    would abort or hang in the first all-gather, without it the same shapes with other weights would mix rows
    silently. Both ranks must raise the same ValueError naming rank 1 and what differs, fast; the same content
    in another folder loads."""
    a = str(folders["A"])
    cases = [((a, str(folders["layers"])), True), ((a, str(folders["weights"])), False),
             ((a, str(folders["weights"])), True), ((a, str(folders["same"])), True), ((a, str(folders["same"])), False),
             (None, True)]
    want = ["num_layers 3 vs 4", "the same shapes, different weight files", "the same shapes, different weight files",
            None, None, "worker refuses"]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = [(f, s, tmp_path / f"rdv{i}") for i, (f, s) in enumerate(cases)]
    procs = [ctx.Process(target=_rank_main, args=(r, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(2 * len(cases)):
            i, rank, outcome, seconds = q.get(timeout=240)
            got[i, rank] = outcome
            assert seconds < 25, f"case {i} rank {rank} took {seconds:.0f} s: it waited for a timeout"
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for i, expected in enumerate(want):
        outcomes = (got[i, 0], got[i, 1])
        if expected is None:
            assert outcomes == ("ok", "ok"), (cases[i], outcomes)
            continue
        if expected == "worker refuses":  # before loading, its key once, naming its node
            for rank, line in enumerate(outcomes):
                assert line == (f"ValueError: parallel.shard_weights: torch 2.4 has no fully_shard(ignored_params=...):"
                                f" needs torch >= 2.7 (on node {os.uname().nodename})"), (rank, line)
            continue
        assert outcomes[0] == outcomes[1], f"ranks disagree on the message: {outcomes}"
        line = outcomes[0]
        assert "\n" not in line and line.startswith("ValueError: ranks [1] loaded a different DiT than rank 0"), line
        assert expected in line and f"rank 1 on {os.uname().nodename}" in line, line


def test_model_records_tell_what_differs(folders):
    """The record of a folder's DiT, (sharded) text encoder and (split) decoder: the same content in another folder
    gives the same record, another text encoder or VAE a different one, named as such."""
    def record(name, text=True):
        dit = load_dit(folders[name])
        encoder = WanTextEncoder.from_pretrained(folders[name], dtype=torch.float32) if text else None
        decoder = WanVAEDecoder.from_pretrained(folders[name], device="cpu", dtype=torch.float32) if text else None
        return model_record(dit, folders[name], encoder, decoder)

    a = record("A")
    check_same_models([a, record("same")])
    with pytest.raises(ValueError, match=r"^ranks \[1\] loaded a different text encoder than rank 0"):
        check_same_models([a, record("text")])
    with pytest.raises(ValueError, match=r"^ranks \[1\] loaded a different VAE decoder than rank 0"):
        check_same_models([a, record("vae")])
    with pytest.raises(ValueError, match=r"^ranks \[2\] loaded a different DiT than rank 0 .*rank 2 on "):
        check_same_models([a, a, record("weights", text=False) | {"text": a["text"], "vae": a["vae"]}])


def test_the_drivers_refusal_names_the_key_once(monkeypatch):
    import cluster.validate as validate_mod
    from configs import load_config

    monkeypatch.setattr(validate_mod, "fsdp_unavailable", lambda: OLD_TORCH)
    for overrides, key in ((["parallel.ulysses_degree=2", "parallel.shard_weights=true"], "parallel.shard_weights"),
                           (["parallel.cfg_degree=2", "model.shard_text_encoder=true", "model.path=/x",
                             "model.text_encoder_device=auto"], "model.shard_text_encoder")):
        with pytest.raises(ValueError) as e:
            validate_mod.check_config_sharding(load_config(None, overrides))
        assert str(e.value) == f"{key}: torch 2.4 has no fully_shard(ignored_params=...): needs torch >= 2.7"


# -- hostile DiT headers ----------------------------------------------------------------------------------------


def _edit_header(folder, edit):
    """A copy of folder's DiT (transformer/) with its safetensors header edited by edit(header dict)."""
    file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    file.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


def _empty_tensor(header):
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    return {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.__setitem__("blocks.4999.ffn.net.0.proj.weight", _empty_tensor(h)),
     r"names block 4999, more than the 256 blocks"),
    (lambda h: h.__setitem__("blocks.9.ffn.net.0.proj.weight", _empty_tensor(h)),
     r"blocks 0\.\.9 named but 3, 4, 5, 6, 7, 8 missing"),
    (lambda h: h.__setitem__("blocks.2.extra.weight", h.pop("blocks.2.attn1.to_q.weight")),
     r"blocks do not all have the same keys: missing keys: blocks\.2\.self_attn\.q\.weight \(1\); "
     r"unexpected keys: blocks\.2\.extra\.weight \(1\)$"),
])
def test_a_header_declaring_other_blocks_is_refused_before_building(folders, tmp_path, monkeypatch, edit, message):
    folder = shutil.copytree(folders["A"], tmp_path / "m")
    _edit_header(folder, edit)
    built = []
    import pipeline.weights as weights_mod

    monkeypatch.setattr(weights_mod, "WanDiT", lambda *a, **k: built.append(1))
    with pytest.raises(WeightsError, match=message) as e:
        load_dit(folder)
    assert "\n" not in str(e.value) and not built


def test_malformed_safetensors_and_fifos_are_weights_errors(folders, tmp_path):
    folder = shutil.copytree(folders["A"], tmp_path / "m")
    file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    file.write_bytes(struct.pack("<Q", 40) + b"{not json" + b" " * 31)
    with pytest.raises(WeightsError, match=rf"^{file} is not a readable safetensors file: "):
        read_dit_headers(folder)
    file.unlink()
    os.mkfifo(file)  # opening it blocks until a writer comes
    # A regression must fail, not hang: a writer process (safe_open blocks holding the GIL, so not a thread)
    # gives whoever opens the FIFO an empty file.
    writer = subprocess.Popen(["sh", "-c", 'while :; do : > "$0"; sleep 0.2; done', str(file)])
    try:
        with pytest.raises(WeightsError, match=r"^no \.safetensors weights in "):
            read_dit_headers(folder)
        index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"a": file.name}}))
        with pytest.raises(WeightsError, match=r"names shards that are not there \(or not regular files\)"):
            read_dit_headers(folder)
    finally:
        writer.kill()
        writer.wait()


def test_a_fifo_in_the_tokenizer_folder_is_refused(folders, tmp_path):
    folder = shutil.copytree(folders["A"], tmp_path / "m")
    os.mkfifo(folder / "tokenizer" / "spiece.model.fifo")
    with pytest.raises(WeightsError, match=r"is not a regular file$"):
        WanTextEncoder.from_pretrained(folder, dtype=torch.float32)


# -- hostile text encoders ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_state(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    tok = tiny_tokenizer(root / "_spm")
    save_t5(hf_umt5(len(tok), seed=2, d_model=24), tok, root / "base", "original")
    return root / "base", torch.load(root / "base" / ORIGINAL_T5_FILE, weights_only=True)


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("make, message", [
    (lambda s: [1, 2, 3], r"holds a list, not a dict of tensors$"),
    (lambda s: _without(s, "token_embedding.weight"), r"lacks shared\.weight: not a umt5 encoder checkpoint$"),
    (lambda s: s | {"token_embedding.weight": torch.zeros(5)}, r"shared\.weight has shape \(5,\), expected 2-D$"),
    (lambda s: s | {"norm.weight": "hello"}, r"norm\.weight is a str, not a tensor$"),
    (lambda s: s | {"token_embedding.weight": s["token_embedding.weight"][:1].expand(8_000_000, 24)},
     r"token_embedding\.weight declares \(8000000, 24\) over \d+ bytes of data"),
    (lambda s: s | {"blocks.4999.norm1.weight": torch.zeros(24)}, r"names block 4999, more than the 128 blocks"),
    (lambda s: _without(s, "blocks.1.attn.q.weight"), r"missing keys: encoder\.block\.1\.layer\.0\.SelfAttention"),
])
def test_hostile_pth_contents_are_one_weights_error_naming_the_file(t5_state, tmp_path, make, message):
    base, state = t5_state
    folder = shutil.copytree(base, tmp_path / "m")
    torch.save(make(state), folder / ORIGINAL_T5_FILE)
    t0 = time.time()
    with pytest.raises(WeightsError, match=message) as e:
        WanTextEncoder.from_pretrained(folder, dtype=torch.float32)
    assert str(folder / ORIGINAL_T5_FILE) in str(e.value) and "\n" not in str(e.value)
    assert time.time() - t0 < 30, "it built what the file declared"


def test_a_diffusers_encoder_config_must_match_its_blocks(folders, tmp_path):
    folder = shutil.copytree(folders["A"], tmp_path / "m")
    config = folder / "text_encoder" / "config.json"
    raw = json.loads(config.read_text())
    for layers, message in ((5000, r"num_layers 5000 is not a number of blocks from 1 to 128"),
                            (raw["num_layers"] + 1, rf"says num_layers {raw['num_layers'] + 1} but the weights hold")):
        config.write_text(json.dumps(raw | {"num_layers": layers}))
        with pytest.raises(WeightsError, match=message):
            WanTextEncoder.from_pretrained(folder, dtype=torch.float32)
