"""WanDiT against diffusers' WanTransformer3DModel with the same random weights, in every folder layout, unsharded
and sequence parallel over 1-4 gloo ranks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline import WanDiT, apply_sequence_parallel
from pipeline.weights import WeightsError
from tests.tiny_models import diffusers_dit, save_dit


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(seed=0, B=2, F=3, H=6, W=8, T=7, text_dim=24):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, F, H, W, generator=g), torch.tensor([999.0, 250.5])[:B],
            torch.randn(B, T, text_dim, generator=g))


@pytest.fixture(scope="module")
def reference():
    return diffusers_dit(seed=0)


@pytest.fixture(scope="module")
def folders(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {layout: save_dit(reference, root / layout, layout) for layout in ("diffusers", "pipeline", "original")}


@pytest.mark.parametrize("layout", ["diffusers", "pipeline", "original"])
def test_matches_diffusers(reference, folders, layout):
    model = WanDiT.from_pretrained(folders[layout])
    assert model.config.text_dim == 24 and model.config.patch_size == (1, 2, 2) and model.config.num_layers == 2
    latents, t, ctx = inputs()
    with torch.no_grad():
        want = reference(latents, t, ctx, return_dict=False)[0]
        got = model(latents, t, ctx)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-4


def test_integer_and_scalar_timesteps(reference, folders):
    model = WanDiT.from_pretrained(folders["diffusers"])
    latents, _, ctx = inputs(B=1)
    with torch.no_grad():
        want = reference(latents, torch.tensor([500]), ctx, return_dict=False)[0]
        assert rel_err(model(latents, torch.tensor([500]), ctx), want) <= 1e-4
        assert rel_err(model(latents, torch.tensor(500.0), ctx), want) <= 1e-4


def test_loads_on_meta_then_assigns(folders):
    model = WanDiT.from_pretrained(folders["original"])
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_bf16_keeps_sensitive_parts_fp32(reference, folders):
    model = WanDiT.from_pretrained(folders["diffusers"], dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["blocks.0.modulation"] == dtypes["head.modulation"] == torch.float32
    assert dtypes["time_embedding.0.weight"] == dtypes["time_projection.1.weight"] == torch.float32
    assert dtypes["blocks.0.norm3.weight"] == torch.float32
    assert dtypes["blocks.0.self_attn.q.weight"] == dtypes["head.head.weight"] == torch.bfloat16
    latents, t, ctx = inputs()
    with torch.no_grad():
        want = reference(latents, t, ctx, return_dict=False)[0]
        assert rel_err(model(latents, t, ctx), want) < 3e-2


def _corrupt(folder, tmp_path, edit):
    """Copy a diffusers folder with its state dict edited."""
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    edit(state)
    save_file(state, str(out / "diffusion_pytorch_model.safetensors"))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.1.attn1.to_q.weight"), r"missing keys: blocks\.1\.self_attn\.q\.weight"),
    (lambda s: s.__setitem__("blocks.0.extra.weight", torch.zeros(2)), r"unexpected keys: blocks\.0\.extra\.weight"),
    (lambda s: s.__setitem__("blocks.0.attn1.to_k.bias", torch.zeros(5)),
     r"mis-shaped keys: blocks\.0\.self_attn\.k\.bias \(5,\) \(expected \(36,\)\)"),
])
def test_bad_weights_are_named(folders, tmp_path, edit, message):
    with pytest.raises(WeightsError, match=message):
        WanDiT.from_pretrained(_corrupt(folders["diffusers"], tmp_path, edit))


def test_bad_folders(folders, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        WanDiT.from_pretrained(tmp_path / "nope")
    with pytest.raises(WeightsError, match="holds no DiT"):
        WanDiT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 3}))
    (tmp_path / "model.bin").write_bytes(b"pickle!")
    with pytest.raises(WeightsError, match=r"only safetensors are loaded"):
        WanDiT.from_pretrained(tmp_path)
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    cfg = json.loads((folders["original"] / "config.json").read_text())
    (i2v / "config.json").write_text(json.dumps({**cfg, "model_type": "i2v"}))
    save_file({"patch_embedding.weight": torch.zeros(1)}, str(i2v / "w.safetensors"))
    with pytest.raises(WeightsError, match="only text-to-video"):
        WanDiT.from_pretrained(i2v)


# ---------------------------------------------------------------------------------------------------------------
# Sequence parallel


def _sp_case(folder, grids, options):
    """On every rank: the SP model's output vs the plain model's, for each latent grid and option set."""
    torch.manual_seed(0)
    plain = WanDiT.from_pretrained(folder)
    sp = apply_sequence_parallel(WanDiT.from_pretrained(folder), dist.group.WORLD, **options)
    errors = []
    for F, H, W in grids:
        latents, t, ctx = inputs(seed=F * 100 + H + W, F=F, H=H, W=W)
        with torch.no_grad():
            errors.append(rel_err(sp(latents, t, ctx), plain(latents, t, ctx)))
    return errors


GRIDS = [(1, 2, 2), (3, 6, 8), (2, 4, 10), (5, 2, 6)]  # 1, 36, 40, 15 tokens: padding for most group sizes


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sequence_parallel_matches_plain(dist_pools, folders, world):
    # 3 heads: uneven on 2 and 4 ranks, one rank idle on 4.
    for errors in dist_pools(world).run(_sp_case, folders["diffusers"], GRIDS, {}):
        assert max(errors) <= 1e-4, errors


@pytest.mark.parametrize("options", [dict(fuse_qkv=True, head_chunks=2), dict(fuse_qkv=False, head_chunks=3)])
def test_sequence_parallel_wire_options(dist_pools, folders, options):
    for errors in dist_pools(3).run(_sp_case, folders["diffusers"], GRIDS[1:3], options):
        assert max(errors) <= 1e-4, errors


def test_sequence_parallel_fp8(dist_pools, folders):
    for errors in dist_pools(2).run(_sp_case, folders["diffusers"], GRIDS[1:3], dict(fp8_comm=True)):
        assert 1e-5 < max(errors) < 0.1, errors


def _sp_mismatch():
    model = apply_sequence_parallel(WanDiT.from_pretrained(_sp_mismatch.folder), dist.group.WORLD)
    latents, t, ctx = inputs(F=3 + dist.get_rank() * 4)  # 36 vs 132 tokens
    try:
        model(latents, t, ctx)
    except ValueError as e:
        return str(e)


def _sp_mismatch_with(folder):
    _sp_mismatch.folder = folder
    return _sp_mismatch()


def test_sequence_parallel_shape_mismatch_is_an_error_everywhere(dist_pools, folders):
    messages = dist_pools(2).run(_sp_mismatch_with, folders["diffusers"], timeout=60)
    assert all(m and "S_local differs across ranks" in m for m in messages), messages
