"""Hostile Wan2.2 model folders (issue #17, a reviewer's findings): deeply nested or oversized JSON, expert folders
linked out of the model folder, a folder holding two layouts, a Wan2.2_VAE.pth with a zero dimension, and a VAE
config.json naming thousands of blocks. Each is one WeightsError line (a ValueError: exit 2 from the CLI) naming
the file or folder, raised before any module is built from it."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import pipeline.weights as weights
from pipeline.vae_weights import read_vae_spec
from pipeline.weights import WeightsError, dit_folders, model_boundary_ratio, read_dit_headers
from tests.tiny_models import (diffusers_vae, diffusers_vae22, save_vae, save_vae22, wan22_a14b_folder,
                               wan_pipeline_folder)

DEEP = "[" * 200_000 + "]" * 200_000  # past any recursion limit


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return {"pipeline": wan22_a14b_folder(root / "pipe", "pipeline", seed=3),
            "original": wan22_a14b_folder(root / "orig", "original", seed=3),
            "wan21": wan_pipeline_folder(root / "wan21")}


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and len(text) < 600, text
    return text


def test_deep_model_index_is_one_line(models, tmp_path):
    folder = _copy(models["pipeline"], tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index)[:-1] + ', "boundary_ratio": ' + DEEP + "}")
    with pytest.raises(WeightsError) as e:
        model_boundary_ratio(folder)
    assert _one_line(e).startswith(f"cannot read {folder / 'model_index.json'}: "), str(e.value)
    folder = _copy(models["wan21"], tmp_path / "w")  # no transformer_2/: dit_folders asks model_index.json
    (folder / "model_index.json").write_text('{"transformer_2": ' + DEEP + "}")
    with pytest.raises(WeightsError) as e:
        dit_folders(folder)
    assert _one_line(e).startswith(f"cannot read {folder / 'model_index.json'}: "), str(e.value)


@pytest.mark.parametrize("what", ["config.json", "diffusion_pytorch_model.safetensors.index.json"])
def test_deep_dit_json_is_one_line(models, tmp_path, what):
    folder = _copy(models["original"], tmp_path / "m")
    expert = folder / "high_noise_model"
    file = expert / what
    assert file.is_file()  # the tiny experts are sharded, as the release's
    file.write_text('{"weight_map": ' + DEEP + "}" if what.endswith("index.json") else '{"dim": ' + DEEP + "}")
    with pytest.raises(WeightsError) as e:
        read_dit_headers(expert)
    assert _one_line(e).startswith(f"cannot read {file}: "), str(e.value)


def test_oversized_json_is_refused_unread(models, tmp_path, monkeypatch):
    folder = _copy(models["original"], tmp_path / "m")
    config = folder / "high_noise_model" / "config.json"
    config.write_text(config.read_text() + " " * 8192)  # the largest of the expert's JSON files
    monkeypatch.setattr(weights, "MAX_JSON_BYTES", config.stat().st_size - 1)
    with pytest.raises(WeightsError) as e:
        read_dit_headers(folder / "high_noise_model")
    assert _one_line(e) == f"cannot read {config}: over {config.stat().st_size - 1} bytes (not a model's JSON file)"
    monkeypatch.setattr(weights, "MAX_JSON_BYTES", config.stat().st_size)
    read_dit_headers(folder / "high_noise_model")
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError) as e:
        weights.read_model_json(fifo)  # not opened: that would block
    assert _one_line(e) == f"cannot read {fifo}: not a regular file"


def test_deep_vae_config_is_one_line(tmp_path):
    folder = save_vae22(diffusers_vae22(), tmp_path / "v", "folder")
    (folder / "config.json").write_text('{"dim_mult": ' + DEEP + "}")
    with pytest.raises(WeightsError) as e:
        read_vae_spec(folder)
    assert _one_line(e).startswith(f"cannot read {folder / 'config.json'}: "), str(e.value)


@pytest.mark.parametrize("layout,names", [("pipeline", ["transformer", "transformer_2"]),
                                          ("original", ["high_noise_model", "low_noise_model"]),
                                          ("wan21", ["transformer"])])
def test_expert_folder_linked_outside_is_refused(models, tmp_path, layout, names):
    for name in names:
        folder = _copy(models[layout], tmp_path / f"{name}-m")
        outside = tmp_path / f"{name}-elsewhere"
        shutil.move(folder / name, outside)
        (folder / name).symlink_to(outside, target_is_directory=True)
        with pytest.raises(WeightsError) as e:
            dit_folders(folder)
        assert _one_line(e) == (f"DiT folder {folder / name} points outside the model folder {folder.resolve()}; "
                                f"refusing to read it")
        with pytest.raises(WeightsError, match="points outside the model folder"):
            read_dit_headers(folder)
    # a link that stays inside the model folder is fine
    folder = _copy(models[layout], tmp_path / "inside")
    shutil.move(folder / names[0], folder / "real")
    (folder / names[0]).symlink_to("real", target_is_directory=True)
    assert [p.name for p in dit_folders(folder)] == names


def test_both_layouts_are_refused(models, tmp_path):
    folder = _copy(models["pipeline"], tmp_path / "m")
    shutil.copytree(models["original"] / "high_noise_model", folder / "high_noise_model")
    with pytest.raises(WeightsError) as e:
        dit_folders(folder)
    assert _one_line(e).startswith(f"{folder} holds both transformer/ and transformer_2/ (a diffusers pipeline) and "
                                   f"high_noise_model/ "
                                   f"(the original Wan2.2 release)"), str(e.value)


def _pth_variant(tmp_path, edit):
    folder = save_vae22(diffusers_vae22(), tmp_path / "v", "original")
    file = folder / "Wan2.2_VAE.pth"
    sd = torch.load(file, weights_only=True)
    edit(sd)
    torch.save(sd, file)
    return file


@pytest.mark.parametrize("key,shape,word", [
    ("decoder.head.2.weight", (0, 12, 3, 3, 3), "patch"),
    ("decoder.upsamples.0.upsamples.0.residual.2.weight", (48, 0, 3, 3, 3), "channels"),
    ("decoder.upsamples.1.upsamples.0.residual.2.weight", (0, 48, 3, 3, 3), "channels"),
    ("decoder.conv1.weight", (0, 48, 3, 3, 3), "channels"),
])
def test_vae22_pth_zero_dimension_is_refused(tmp_path, key, shape, word):
    file = _pth_variant(tmp_path, lambda sd: sd.update({key: torch.zeros(shape)}))
    with pytest.raises(WeightsError) as e:
        read_vae_spec(file.parent)
    assert _one_line(e).startswith(f"{file}: ") and word in str(e.value)[len(str(file)):], str(e.value)


@pytest.mark.parametrize("field,value,word", [
    ("dim_mult", [1] * 9, "dim_mult"), ("dim_mult", [1] * 200_000, "dim_mult"),
    ("num_res_blocks", 17, "num_res_blocks"), ("num_res_blocks", 4096, "num_res_blocks"),
    ("num_res_blocks", 10 ** 2000, "num_res_blocks"), ("patch_size", 0, "patch_size"),
    ("decoder_base_dim", -3, "decoder_base_dim"), ("z_dim", 0, "z_dim"),
])
def test_vae_config_caps(tmp_path, field, value, word):
    folder = save_vae22(diffusers_vae22(), tmp_path / "v", "folder")
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    if field == "dim_mult":
        cfg["temperal_downsample"] = [False] * (len(value) - 1)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError) as e:
        read_vae_spec(folder)
    prefix = f"{folder / 'config.json'}: VAE config: "  # the folder's name holds the test's, and so `word`
    assert _one_line(e).startswith(prefix) and word in str(e.value)[len(prefix):], str(e.value)


def test_vae_config_at_the_caps_loads(tmp_path):
    """8 up blocks of 16 residual blocks each + 1 (as the decoder builds them) is within the caps."""
    folder = save_vae22(diffusers_vae22(), tmp_path / "v", "folder")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(dim_mult=[1] * 8, num_res_blocks=16, temperal_downsample=[False] * 7)
    (folder / "config.json").write_text(json.dumps(cfg))
    spec = read_vae_spec(folder)
    assert len(spec.blocks) == 8 and {b[2] for b in spec.blocks} == {17}


@pytest.mark.parametrize("edit,says", [
    (lambda sd: sd.pop("conv2.weight"), "not a Wan VAE (KeyError: 'conv2.weight')"),
    (lambda sd: sd.update({"decoder.upsamples.0.residual.2.weight": torch.zeros(32, 0, 3, 3, 3)}),
     "up block 0 has 0 -> 32 channels; each must be at least 1"),
    # the flat upsamples: 40 residual blocks in a row are one up block of 40
    (lambda sd: sd.update({f"decoder.upsamples.{100 + i}.residual.2.weight": torch.zeros(32, 32, 3, 3, 3)
                           for i in range(40)}),
     "up block 3 has 42 residual blocks; 1 to 17 are supported"),
])
def test_wan21_pth_structure_errors_are_one_line(tmp_path, edit, says):
    folder = save_vae(diffusers_vae(), tmp_path / "v", "original")
    file = folder / "Wan2.1_VAE.pth"
    sd = torch.load(file, weights_only=True)
    edit(sd)
    torch.save(sd, file)
    with pytest.raises(WeightsError) as e:
        read_vae_spec(folder)
    assert _one_line(e).startswith(f"{file}: {says}"), str(e.value)


def test_deep_text_encoder_config_is_one_line(models, tmp_path):
    """text_encoder/config.json goes through the same reader (it used to end in RecursionError, exit 1)."""
    from pipeline.text_encoder import locate

    folder = _copy(models["wan21"], tmp_path / "t")
    (folder / "text_encoder" / "config.json").write_text('{"num_layers": ' + DEEP + "}")
    with pytest.raises(WeightsError) as e:
        locate(folder)
    assert _one_line(e).startswith(f"cannot read {folder / 'text_encoder' / 'config.json'}: "), str(e.value)
