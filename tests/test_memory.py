"""Per-rank GPU memory estimates: parameter bytes from meta models against published counts, activation peaks
traced on meta tensors against the same code run for real, and the one-line refusal naming what would fit."""

from __future__ import annotations

import pytest
import torch

from configs import load_config
from pipeline.dit import WanDiT, WanDiTConfig
from pipeline.memory import (GiB, LiveBytes, check_fits, dit_activation_bytes, estimate_rank_memory,
                             replica_estimates, vae_decode_bytes)

# Published parameter counts (Wan2.1 report / model cards): DiT 14B 14.29e9, 1.3B 1.419e9; umt5-xxl encoder 5.68e9.
# Named by a folder that is not there, the presets' known shapes are used.
BIG = ["model.path=/nonexistent/Wan2.1-T2V-14B", "parallel.ulysses_degree=8"]


def test_live_bytes_counts_what_is_alive_at_once():
    with LiveBytes() as live:
        a = torch.empty(1000)            # 4000 B
        b = torch.empty(500, dtype=torch.float64)  # +4000 B
        view = a[10:]                    # a view: same storage, counted once
        del a
        c = torch.empty(250)             # +1000 B while a (via view) and b live: peak 9000
        del view, b, c
        d = torch.empty(100)             # 400 B
    assert live.peak == 9000 and live.live == 400
    del d


def _diffusers_decoder_params() -> int:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan()  # the Wan2.1 VAE's defaults; the whole VAE is ~127e6, its decoder ~73e6
    return sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv.")))


def test_14b_at_480p_on_8_ranks():
    config = load_config("wan2.1-t2v-14b", BIG)
    est0, est1 = estimate_rank_memory(config, 0), estimate_rank_memory(config, 1)
    # bf16 weights, a few fp32 tables: within 5% of the published count x 2 bytes
    assert est0.dit_params == pytest.approx(14.29e9 * 2, rel=0.05)
    assert est0.text_encoder == pytest.approx(5.68e9 * 2, rel=0.05) and est0.text_encoder_resident
    assert est0.vae_params == _diffusers_decoder_params() * 4  # fp32
    # rank 1 neither encodes nor decodes; activations are sharded 8 ways: a fraction of the weights
    assert (est1.text_encoder, est1.vae_params, est1.vae_decode) == (0, 0, 0)
    assert 0.1 * GiB < est1.dit_activations < 2 * GiB
    assert est1.total < est0.total < 80 * GiB
    assert replica_estimates(config) == [est0, est1]
    # sharded activations shrink with the degree (about 1/P: 32,760 tokens)
    one = estimate_rank_memory(load_config("wan2.1-t2v-14b", BIG[:1]), 0)
    assert 6 < one.dit_activations / est0.dit_activations <= 8


def test_1_3b_parameters_match_the_published_count():
    config = load_config("wan2.1-t2v-1.3b", ["model.path=/nonexistent/Wan2.1-T2V-1.3B"])
    assert estimate_rank_memory(config, 0).dit_params == pytest.approx(1.419e9 * 2, rel=0.05)
    with pytest.raises(ValueError, match=r"^model.path /nonexistent/my-model does not exist"):
        estimate_rank_memory(load_config(None, ["model.path=/nonexistent/my-model"]), 0)


def test_text_encoder_settings_move_its_bytes():
    base = load_config("wan2.1-t2v-14b", BIG)
    resident = estimate_rank_memory(base, 0)
    offload = estimate_rank_memory(load_config("wan2.1-t2v-14b", BIG + ["model.offload_text_encoder=true"]), 0)
    cpu = estimate_rank_memory(load_config("wan2.1-t2v-14b", BIG + ["model.text_encoder_device=cpu"]), 0)
    assert cpu.text_encoder == 0 and offload.text_encoder == resident.text_encoder
    assert not offload.text_encoder_resident
    # offloaded: the encoder shares the GPU only with the weights, never with the DiT's or the VAE's peak
    assert cpu.total < offload.total < resident.total
    assert resident.total - cpu.total == resident.text_encoder


def test_too_small_a_gpu_is_refused_naming_what_fits():
    config = load_config("wan2.1-t2v-14b", BIG)
    need = estimate_rank_memory(config, 0).total
    assert check_fits(config, 0, need).total == need
    with pytest.raises(ValueError) as err:
        check_fits(config, 0, need - 5 * GiB)
    message = str(err.value)
    assert "\n" not in message and message.startswith("rank 0 needs ~")
    assert "--set model.text_encoder_device=cpu" in message and "--set model.offload_text_encoder=true" in message
    assert f"of {(need - 5 * GiB) / GiB:.1f} GiB free" in message
    with pytest.raises(ValueError, match="no setting here makes it fit"):
        check_fits(config, 0, 20 * GiB)  # less than the DiT's weights


def test_more_gpus_are_named_when_activations_are_the_problem():
    """720p: on a rank that neither encodes nor decodes (CFG-parallel's other half), the DiT's activations
    (~10 GiB) are what Ulysses can shard."""
    config = load_config("wan2.1-t2v-14b", ["model.path=/nonexistent/Wan2.1-T2V-14B", "video.height=720",
                                            "video.width=1280", "parallel.cfg_degree=2"])
    est = estimate_rank_memory(config, 1)
    assert est.text_encoder == est.vae_decode == 0 and est.dit_activations > 8 * GiB
    with pytest.raises(ValueError, match=r"use --set parallel.ulysses_degree=2$"):
        check_fits(config, 1, est.total - int(0.4 * est.dit_activations))
    with pytest.raises(ValueError, match=r"use --set parallel.ulysses_degree=4$"):
        check_fits(config, 1, est.total - int(0.6 * est.dit_activations))


SMALL = WanDiTConfig(dim=96, ffn_dim=256, num_heads=4, num_layers=2, text_dim=32, freq_dim=32, text_len=16)
GRID = (3, 8, 10)  # 240 tokens


def _real_forward_peak(dtype: torch.dtype) -> int:
    """Rank 0's live-bytes peak in one real forward_tokens (Ulysses over the pool's gloo group when it has
    several ranks, fused Q/K/V as the estimate assumes)."""
    import torch.distributed as dist

    from pipeline.parallel import apply_sequence_parallel

    torch.manual_seed(0)
    dit = WanDiT(SMALL, attention_backend="sdpa").to_compute_dtype(dtype).eval()
    if dist.is_initialized():
        apply_sequence_parallel(dit, dist.group.WORLD, fuse_qkv=True)
    x_BLP = dit.layout.shard(torch.randn(1, 240, SMALL.patch_dim))
    ctx = torch.randn(1, SMALL.text_len, SMALL.text_dim)
    with torch.no_grad(), LiveBytes() as live:
        dit.forward_tokens(x_BLP, GRID, torch.ones(1), ctx)
    return live.peak


def test_meta_trace_matches_a_real_forward():
    """The estimate runs the DiT on meta tensors; the same forward on real bf16 CPU tensors (sdpa: no scores)
    peaks at the same live bytes."""
    assert dit_activation_bytes(SMALL, GRID, 1, torch.bfloat16) == pytest.approx(_real_forward_peak(torch.bfloat16),
                                                                                 rel=0.1)


def test_meta_trace_matches_a_real_ulysses_forward(dist_pools):
    """With 3 ranks (4 heads: rank 0 owns 2) the simulated all-to-all buffers peak like the real exchange. The
    real peak is the smallest of three runs: now and then gloo's worker thread lets go of a finished exchange's
    buffers a little late (581 kB most runs, 704 kB in about one of eight), a timing artefact of gloo."""
    pool = dist_pools(3)
    real = min(pool.run(_real_forward_peak, torch.float32)[0] for _ in range(3))
    traced = dit_activation_bytes(SMALL, GRID, 3, torch.float32)
    assert traced == pytest.approx(real, rel=0.15)
    assert traced < dit_activation_bytes(SMALL, GRID, 1, torch.float32)


def test_vae_decode_estimate_matches_a_real_decode():
    """Scaled from a traced 32 x 32 latent: a real decode of a different size, tiled and not, peaks within 10%."""
    from pipeline import WanVAEDecoder
    from pipeline.vae import DecoderSpec

    spec = DecoderSpec(mid_dim=16, blocks=((16, 16, 1, "upsample3d"), (8, 16, 1, "upsample3d"),
                                           (8, 8, 1, "upsample2d"), (4, 4, 1, None)))
    torch.manual_seed(0)
    decoder = WanVAEDecoder(spec).eval()
    decoder.tile_sample_min, decoder.tile_sample_stride = 64, 48  # small tiles keep the real decode quick
    latents = torch.randn(1, 16, 3, 10, 8)  # tiled: 2 x 2 tiles of 8 x 8
    for tiling in (False, True):
        decoder.tiling = tiling
        with LiveBytes() as live:
            for _ in decoder.decode_chunks(latents):
                pass
        assert vae_decode_bytes(spec, 10, 8, tiling, 64, 48) == pytest.approx(live.peak, rel=0.1), tiling


def test_a_model_folder_is_read_from_its_headers(tmp_path):
    """For a real folder the shapes come from config.json and the safetensors headers: the bytes match what
    loading it actually puts in memory."""
    from pipeline.components import load_components
    from tests.tiny_models import wan_pipeline_folder

    folder = wan_pipeline_folder(tmp_path / "wan")
    config = load_config(None, [f"model.path={folder}", "model.dtype=bfloat16", "video.height=32", "video.width=48",
                                "video.frames=9"])
    est = estimate_rank_memory(config, 0)
    comp = load_components(config.model, device=torch.device("cpu"), encode=True, decode=True)

    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    assert est.dit_params == nbytes(comp.dit)
    assert est.vae_params == nbytes(comp.decoder)
    assert est.text_encoder == nbytes(comp.text_encoder.model)  # bfloat16, tied embeddings once
    assert 0 < est.text_activations < 32 * 2**20  # 2 prompts x 4 heads x 512^2 scores dominate: ~17 MB


def test_the_embedded_model_needs_little():
    est = estimate_rank_memory(load_config("tiny", ["parallel.ulysses_degree=2"]), 0)
    assert 0 < est.dit_params < 16 * 2**20 and 0 < est.text_encoder < 16 * 2**20 and est.vae_params > 0
    assert est.total - est.reserve < 64 * 2**20
