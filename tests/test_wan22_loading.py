"""Loading Wan2.2 (issue #17): T2V-A14B's two experts and TI2V-5B's 48-channel DiT, from the diffusers pipeline
layout and the original release layout (tiny random models of tests/tiny_models.py). Each loaded expert must hold
exactly the weights of the diffusers model it was saved from (the high-noise one as `dit`), the boundary comes from
the config, else model_index.json, else 0.875, and every missing or mismatched piece is one line naming it."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import torch.distributed as dist

from configs import ModelConfig
from pipeline.components import load_components
from pipeline.weights import WeightsError, dit_folders, download_hint, model_boundary_ratio
from tests.tiny_models import (diffusers_dit, diffusers_vae, save_dit, save_vae, to_original_key, wan22_a14b_dits,
                               wan22_a14b_folder, wan22_ti2v_dit, wan22_ti2v_folder)

LAYOUTS = ("pipeline", "original")


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    root = tmp_path_factory.mktemp("a14b")
    return {layout: wan22_a14b_folder(root / layout, layout, seed=5) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti2v")
    return {layout: wan22_ti2v_folder(root / layout, layout, seed=7) for layout in LAYOUTS}


def _load(path, **model):
    path = None if path is None else str(path)
    return load_components(ModelConfig(path=path, **model), device=torch.device("cpu"), encode=True, decode=True)


def _assert_same_weights(dit, reference) -> None:
    """dit (ours, original Wan names) holds exactly the diffusers model's tensors."""
    ours = dit.state_dict()
    theirs = {to_original_key(k): v for k, v in reference.state_dict().items()}
    assert set(ours) == set(theirs)
    unequal = [k for k in theirs if not torch.equal(ours[k], theirs[k])]
    assert unequal == [], unequal[:4]


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# -- both layouts load ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a14b_loads_both_experts_in_order(a14b, layout, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.components"):
        comp = _load(a14b[layout])
    high, low = wan22_a14b_dits(seed=5)
    _assert_same_weights(comp.dit, high)
    _assert_same_weights(comp.dit_low, low)
    assert comp.experts() == [comp.dit, comp.dit_low] and comp.dit_low is not comp.dit
    assert comp.boundary_ratio == 0.875 and comp.dit.config == comp.dit_low.config
    # t >= 0.875 * 1000 runs the high-noise expert (diffusers' rule), below it the low-noise one
    assert [comp.expert_index(t) for t in (999.0, 875.0, 874.9, 500.0, 0.0)] == [0, 0, 1, 1, 1]
    assert (comp.z_dim, comp.temporal_stride, comp.spatial_stride) == (16, 4, 8)
    assert comp.text_encoder is not None and comp.decoder is not None
    # the original layout's config.json has no text_dim or patch_size: read from the weights' shapes
    assert comp.dit.config.text_dim == 24 and comp.dit.config.patch_size == (1, 2, 2)
    source = "model_index.json" if layout == "pipeline" else "default"
    assert any(source in r.getMessage() and "boundary_ratio 0.875" in r.getMessage() for r in caplog.records)
    names = ["transformer", "transformer_2"] if layout == "pipeline" else ["high_noise_model", "low_noise_model"]
    assert [f.name for f in dit_folders(a14b[layout])] == names


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ti2v_loads_one_48_channel_dit_and_the_wan22_vae(ti2v, layout):
    comp = _load(ti2v[layout])
    _assert_same_weights(comp.dit, wan22_ti2v_dit(seed=7))
    assert comp.dit_low is None and comp.boundary_ratio is None and comp.experts() == [comp.dit]
    assert comp.expert_index(999.0) == comp.expert_index(0.0) == 0
    assert (comp.dit.config.in_dim, comp.dit.config.out_dim, comp.z_dim) == (48, 48, 48)
    assert (comp.temporal_stride, comp.spatial_stride) == (4, 16)
    # 121 frames of 1280x704 (upstream's default): 31 latent frames of 44 x 80; sides are multiples of 32
    assert comp.latent_shape(121, 704, 1280) == (1, 48, 31, 44, 80)
    with pytest.raises(ValueError, match="multiples of 32"):
        comp.latent_shape(121, 720, 1280)
    assert model_boundary_ratio(ti2v[layout]) is None


def test_the_boundary_comes_from_the_config_then_model_index_then_0875(a14b, tmp_path, caplog):
    assert model_boundary_ratio(a14b["pipeline"]) == 0.875 and model_boundary_ratio(a14b["original"]) is None
    with caplog.at_level(logging.INFO, logger="pipeline.components"):
        assert _load(a14b["original"], boundary_ratio=0.9).boundary_ratio == 0.9
    assert any("from model.boundary_ratio" in r.getMessage() for r in caplog.records)
    folder = shutil.copytree(a14b["pipeline"], tmp_path / "p")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.6}))
    assert _load(folder).boundary_ratio == 0.6
    assert _load(folder, boundary_ratio=0.7).boundary_ratio == 0.7
    (folder / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    assert _load(folder).boundary_ratio == 0.875
    (folder / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 1.5}))
    with pytest.raises(WeightsError) as e:
        _load(folder)
    assert _one_line(e).endswith("model_index.json: boundary_ratio must be a number in (0, 1), got 1.5")


def test_offload_idle_expert_on_cpu_keeps_both_where_they_are(a14b):
    # On a CPU rank there is nothing to park: both experts are on the compute device, unpinned.
    comp = _load(a14b["original"], offload_idle_expert=True)
    assert {p.device.type for e in comp.experts() for p in e.parameters()} == {"cpu"}


# -- missing and mismatched pieces: one line each ----------------------------------------------------------------


def test_half_an_original_a14b_is_named(a14b, tmp_path):
    folder = shutil.copytree(a14b["original"], tmp_path / "Wan2.2-T2V-A14B")
    shutil.rmtree(folder / "low_noise_model")
    with pytest.raises(WeightsError) as e:
        _load(folder)
    text = _one_line(e)
    assert text.startswith(f"{folder} holds half of a two-expert model (Wan2.2 T2V-A14B): high_noise_model/ but "
                           f"no low_noise_model/;"), text
    assert "hf download Wan-AI/Wan2.2-T2V-A14B " in text
    (folder / "low_noise_model").mkdir()  # there, but empty: its config.json is named
    with pytest.raises(WeightsError, match=r"high_noise_model/ but no low_noise_model/config\.json;"):
        dit_folders(folder)
    shutil.rmtree(folder / "high_noise_model")
    with pytest.raises(WeightsError, match=r": neither but no high_noise_model/ and no low_noise_model/config\.json"):
        dit_folders(folder)


def test_half_a_pipeline_a14b_is_named(a14b, tmp_path):
    folder = shutil.copytree(a14b["pipeline"], tmp_path / "Wan2.2-T2V-A14B-Diffusers")
    shutil.move(folder / "transformer_2", tmp_path / "low")
    with pytest.raises(WeightsError) as e:  # model_index.json names transformer_2: it must be there
        _load(folder)
    assert _one_line(e).startswith(f"{folder} holds transformer/ (the high-noise expert) but no "
                                   f"transformer_2/config.json (the low-noise expert, which model_index.json names);")
    assert "hf download Wan-AI/Wan2.2-T2V-A14B-Diffusers " in str(e.value)
    shutil.move(tmp_path / "low", folder / "transformer_2")
    shutil.rmtree(folder / "transformer")
    with pytest.raises(WeightsError) as e:
        _load(folder)
    assert _one_line(e).startswith(f"{folder} holds transformer_2/ (the low-noise expert) but no "
                                   f"transformer/config.json")


def test_experts_of_different_shapes_are_refused_before_loading(a14b, tmp_path):
    folder = shutil.copytree(a14b["pipeline"], tmp_path / "p")
    shutil.rmtree(folder / "transformer_2")
    diffusers_dit(9, ffn_dim=64).save_pretrained(folder / "transformer_2")
    with pytest.raises(ValueError) as e:
        _load(folder)
    assert _one_line(e) == (f"the two experts in {folder} (transformer/, transformer_2/) differ: ffn_dim 48 vs 64: "
                            f"both must have the same shape")


def test_a_16_channel_vae_with_a_48_channel_dit_is_refused(ti2v, tmp_path):
    folder = shutil.copytree(ti2v["pipeline"], tmp_path / "p")
    shutil.rmtree(folder / "vae")
    save_vae(diffusers_vae(1), folder, "pipeline")  # the Wan2.1 VAE: z 16
    with pytest.raises(ValueError) as e:
        _load(folder)
    assert _one_line(e) == (f"the VAE in {folder} has 16 latent channels but the DiT takes 48: a 48-channel DiT "
                            f"(Wan2.2 TI2V-5B) needs the Wan2.2 VAE (Wan2.2_VAE.pth, or vae/ with z_dim 48)")


def test_boundary_ratio_on_a_one_dit_model_is_refused(ti2v, tmp_path):
    with pytest.raises(ValueError) as e:
        _load(ti2v["original"], boundary_ratio=0.9)
    assert _one_line(e).startswith(f"model.boundary_ratio is set but {ti2v['original']} holds one DiT")
    with pytest.raises(ValueError, match=r"^model\.boundary_ratio is set but the embedded model"):
        _load(None, boundary_ratio=0.9)
    wan21 = save_dit(diffusers_dit(0), tmp_path / "dit", "diffusers")
    assert dit_folders(wan21) == [wan21]


def test_download_hint_knows_wan22():
    assert "`hf download Wan-AI/Wan2.2-T2V-A14B --local-dir /m/Wan2.2-T2V-A14B`" in download_hint(
        "/m/Wan2.2-T2V-A14B")
    assert "`hf download Wan-AI/Wan2.2-TI2V-5B-Diffusers --local-dir /m/ti2v-5b-diffusers`" in download_hint(
        "/m/ti2v-5b-diffusers")
    assert "`hf download Wan-AI/Wan2.2-TI2V-5B --local-dir /m/x`" in download_hint("/m/x", "wan2.2-ti2v-5b")
    assert "`hf download Wan-AI/Wan2.1-T2V-14B --local-dir /m/Wan2.1-T2V-14B`" in download_hint("/m/Wan2.1-T2V-14B")
    assert "add `--config wan2.2-t2v-a14b` for Wan's" in download_hint("/m/wan2.2-a14b", "tiny")


# -- sharded: both experts over 2 gloo ranks ---------------------------------------------------------------------


def _load_sharded_experts(folder: str):
    from pipeline.sharding import is_sharded, resident_param_bytes

    comp = load_components(ModelConfig(path=folder), device=torch.device("cpu"), encode=False, decode=False,
                           shard_group=dist.group.WORLD)
    high, low = wan22_a14b_dits(seed=5)
    with torch.no_grad():
        latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(3))
        ctx = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(4))
        t = torch.tensor([700.0])
        outputs = [dit(latents, t, ctx) for dit in comp.experts()]
        expected = [model(latents, t, ctx, return_dict=False)[0] for model in (high, low)]
    errors = [float((o - e).abs().max() / e.abs().max()) for o, e in zip(outputs, expected)]
    return ([is_sharded(d) for d in comp.experts()], errors, comp.boundary_ratio,
            [resident_param_bytes(d) for d in comp.experts()], sum(p.numel() * 4 for p in high.parameters()))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_both_experts_shard_over_two_gloo_ranks(dist_pools, a14b, layout):
    for rank, (sharded, errors, boundary, resident, whole) in enumerate(
            dist_pools(2).run(_load_sharded_experts, str(a14b[layout]), timeout=120)):
        assert sharded == [True, True] and boundary == 0.875, rank
        assert max(errors) < 1e-5, (rank, errors)  # each expert is its own diffusers model, not the other's
        assert all(b < whole for b in resident), (rank, resident, whole)


# -- what the driver and the memory estimate read of a Wan2.2 folder ---------------------------------------------


def _config(path, *sets):
    from configs import load_config

    return load_config(None, [f"model.path={path}", "model.dtype=float32", "video.height=32", "video.width=32",
                              "video.frames=5", *sets])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_driver_reads_both_layouts_and_refuses_teacache_on_two_experts(a14b, ti2v, layout, tmp_path):
    from cluster.validate import check_config_cache, model_dit_config, model_experts

    high, _ = wan22_a14b_dits(seed=5)
    config = _config(a14b[layout])
    assert model_experts(config) == 2 and model_dit_config(config).ffn_dim == high.config.ffn_dim
    with pytest.raises(ValueError, match=r"^sampling\.cache: .*two-expert"):
        check_config_cache(_config(a14b[layout], "sampling.cache=teacache"))
    check_config_cache(_config(a14b[layout], "sampling.cache=fbcache"))
    ti2v_config = _config(ti2v[layout])
    assert model_experts(ti2v_config) == 1 and model_dit_config(ti2v_config).in_dim == 48
    if layout == "original":  # experts of different shapes: one line, on the driver too
        folder = shutil.copytree(a14b[layout], tmp_path / "o")
        shutil.rmtree(folder / "low_noise_model")
        save_dit(diffusers_dit(1, num_layers=3), folder / "low_noise_model", "original")
        with pytest.raises(ValueError) as e:
            model_dit_config(_config(folder))
        assert _one_line(e) == (f"the two experts in {folder.resolve()} (high_noise_model/, low_noise_model/) differ: "
                                f"num_layers 2 vs 3: both must have the same shape")


def test_the_memory_estimate_counts_both_experts(a14b):
    from pipeline.memory import GiB, check_fits, estimate_rank_memory

    high, _ = wan22_a14b_dits(seed=5)
    expert = 4 * sum(p.numel() for p in high.parameters())  # float32, from the diffusers model
    path = a14b["pipeline"]
    both = estimate_rank_memory(_config(path))
    assert both.dit_params == 2 * expert and both.dit_experts == 2 and "DiT x2 " in both.summary()
    assert estimate_rank_memory(_config(path), experts=1).dit_params == expert
    # offload_idle_expert: one expert on the GPU; on a CPU rank nothing is parked
    assert estimate_rank_memory(_config(path, "model.offload_idle_expert=true")).dit_params == expert
    assert estimate_rank_memory(_config(path, "model.offload_idle_expert=true"),
                                device_type="cpu").dit_params == 2 * expert
    # sharded: both experts' shards stay, one expert's blocks are gathered at a time
    sharded = _config(path, "parallel.ulysses_degree=2", "parallel.shard_weights=true")
    two, one = estimate_rank_memory(sharded), estimate_rank_memory(sharded, experts=1)
    assert two.dit_params == 2 * one.dit_params and two.dit_gather == one.dit_gather > 0
    # too small for both experts, big enough for one: the refusal names offload_idle_expert
    parked = estimate_rank_memory(_config(path, "model.offload_idle_expert=true"))
    capacity = parked.total + 1
    with pytest.raises(ValueError, match=r"use .*--set model\.offload_idle_expert=true"):
        check_fits(_config(path), 0, capacity, capacity + GiB // 2)


def test_the_memory_estimate_of_a_folder_not_here_goes_by_its_name():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from pipeline.memory import estimate_rank_memory
    from pipeline.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WAN22_VAE_CONFIG

    def estimate(name, *sets):
        from configs import load_config

        return estimate_rank_memory(load_config(name, [f"model.path=/not/here/{name}", *sets]))

    with torch.device("meta"):  # the published shapes, counted by diffusers
        a14b_expert = WanTransformer3DModel(num_attention_heads=40, attention_head_dim=128, in_channels=16,
                                            out_channels=16, text_dim=4096, ffn_dim=13824, num_layers=40,
                                            cross_attn_norm=True, qk_norm="rms_norm_across_heads")
        ti2v_dit = WanTransformer3DModel(num_attention_heads=24, attention_head_dim=128, in_channels=48,
                                         out_channels=48, text_dim=4096, ffn_dim=14336, num_layers=30,
                                         cross_attn_norm=True, qk_norm="rms_norm_across_heads")
        vae22 = AutoencoderKLWan(**WAN22_VAE_CONFIG, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD)
    n_a14b, n_ti2v = (sum(p.numel() for p in m.parameters()) for m in (a14b_expert, ti2v_dit))
    assert (round(n_a14b / 1e9, 2), round(n_ti2v / 1e9, 2)) == (14.29, 5.0)
    a14b = estimate("wan2.2-t2v-a14b")
    # bf16 weights, the modulation tables, norms and time embedding kept in fp32 (a few percent)
    assert a14b.dit_experts == 2 and 2 * 2 * n_a14b < a14b.dit_params < 1.02 * 2 * 2 * n_a14b
    assert estimate("wan2.2-t2v-a14b", "model.offload_idle_expert=true").dit_params == a14b.dit_params // 2
    ti2v = estimate("wan2.2-ti2v-5b")
    assert ti2v.dit_experts == 1 and 2 * n_ti2v < ti2v.dit_params < 1.02 * 2 * n_ti2v
    decoder = sum(p.numel() for n, p in vae22.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))
    assert ti2v.vae_params == 4 * decoder  # the Wan2.2 VAE's decoder in fp32, not the Wan2.1 one


def test_loading_the_dit_of_a_two_expert_root_names_both(a14b):
    from pipeline import WanDiT

    for layout in LAYOUTS:
        high, low = dit_folders(a14b[layout])
        with pytest.raises(WeightsError) as e:
            WanDiT.from_pretrained(a14b[layout])
        assert _one_line(e) == (f"{a14b[layout]} holds two DiTs (the high- and low-noise experts of a two-expert "
                                f"model): load {high} or {low} (load_components loads both)")
        _assert_same_weights(WanDiT.from_pretrained(low), wan22_a14b_dits(seed=5)[1])


def test_ranks_that_loaded_different_experts_are_told_apart(a14b, tmp_path):
    from pipeline.load_guard import check_same_models, model_record

    comp = _load(a14b["original"])
    record = model_record(comp.dit, a14b["original"], dit_low=comp.dit_low)
    assert record["config"]["experts"] == 2
    # another node's folder: the same shapes, another low-noise expert
    other = shutil.copytree(a14b["original"], tmp_path / "other")
    shutil.rmtree(other / "low_noise_model")
    save_dit(diffusers_dit(11), other / "low_noise_model", "original")
    theirs = _load(other)
    with pytest.raises(ValueError, match=r"^ranks \[1\] loaded a different DiT than rank 0 \(model\.path on their "
                                         r"nodes: the same shapes, different weight files"):
        check_same_models([record, model_record(theirs.dit, other, dit_low=theirs.dit_low)])
    # a rank that loaded only the high-noise expert
    with pytest.raises(ValueError, match=r"loaded a different DiT than rank 0 .*experts 2 vs 1"):
        check_same_models([record, model_record(comp.dit, a14b["original"])])


@pytest.mark.parametrize("offload, device, low_on, pinned", [(True, "cuda", "cpu", 1), (False, "cuda", "cuda", 0),
                                                             (True, "cpu", "cpu", 0)])
def test_offload_idle_expert_parks_the_low_noise_expert_in_pinned_memory(a14b, monkeypatch, offload, device, low_on,
                                                                        pinned):
    """Where each expert is loaded (no GPU here: the loader records the device it was asked for)."""
    import pipeline.components as components
    from pipeline import WanDiT

    asked, pins = [], []
    monkeypatch.setattr(WanDiT, "from_pretrained", classmethod(
        lambda cls, folder, device, **kw: asked.append((folder.name, str(device))) or f"dit:{folder.name}"))
    monkeypatch.setattr(components, "_pin", pins.append)
    monkeypatch.setattr(components, "host_memory_available", lambda: 1 << 50)  # not this machine's: it may be busy
    comp = load_components(ModelConfig(path=str(a14b["original"]), offload_idle_expert=offload),
                           device=torch.device(device), encode=False, decode=False)
    assert asked == [("high_noise_model", device), ("low_noise_model", low_on)]
    assert pins == ["dit:low_noise_model"] * pinned and comp.experts() == ["dit:high_noise_model", "dit:low_noise_model"]


@pytest.mark.parametrize("short_by, refused", [(1, True), (0, False), (None, False)])
def test_offload_idle_expert_is_refused_when_the_host_cannot_pin_an_expert(a14b, monkeypatch, short_by, refused):
    """Before any weight is read, a GPU rank that would park the idle expert checks /proc/meminfo's MemAvailable
    against that expert's bytes (as loaded: the loaded low-noise expert's) plus PIN_MARGIN_BYTES: one byte short
    is one line naming the need, what is available and parallel.shard_weights; enough loads; unreadable
    (None) skips the check."""
    import pipeline.components as components
    from pipeline import WanDiT

    assert components.host_memory_available() > 0  # the real reader, on this Linux machine
    low = WanDiT.from_pretrained(a14b["original"] / "low_noise_model", device=torch.device("cpu"),
                                 dtype=torch.bfloat16)
    need = sum(t.numel() * t.element_size() for t in (*low.parameters(), *low.buffers()))
    available = None if short_by is None else need + components.PIN_MARGIN_BYTES - short_by
    asked = []
    monkeypatch.setattr(components, "host_memory_available", lambda: available)
    monkeypatch.setattr(WanDiT, "from_pretrained", classmethod(
        lambda cls, folder, device, **kw: asked.append(folder.name) or f"dit:{folder.name}"))
    monkeypatch.setattr(components, "_pin", lambda module: None)
    model = ModelConfig(path=str(a14b["original"]), dtype="bfloat16", offload_idle_expert=True)
    if not refused:
        load_components(model, device=torch.device("cuda"), encode=False, decode=False)
        assert asked == ["high_noise_model", "low_noise_model"]
        return
    gib = f"{need / 2**30:.1f}"
    with pytest.raises(ValueError, match=rf"^model\.offload_idle_expert parks the idle expert in pinned host memory "
                                         rf"on every GPU's process: this one needs {gib} GiB \(\+2 GiB margin\) but "
                                         rf"the host has {available / 2**30:.1f} GiB available: turn it off and use "
                                         rf"parallel\.shard_weights \(--shard-weights\) to fit both experts, or free "
                                         rf"host memory$"):
        load_components(model, device=torch.device("cuda"), encode=False, decode=False)
    assert asked == []
