"""The Wan2.2 VAE (TI2V-5B's: 48 channels, residual up blocks, 2x2 output patch) in the streaming WanVAEDecoder:
against diffusers' AutoencoderKLWan.decode with the same random weights in the three layouts, streamed frame by
frame, split over 2 gloo ranks, tiled, and one-line errors for files that do not fit. The expectation is always
diffusers' decode (or our own one-rank decode, for the parallel split), computed in the test process."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline import WanVAEDecoder
from pipeline.weights import WeightsError
from tests.test_vae import reference_frames
from tests.tiny_models import VAE22_LATENTS_MEAN, VAE22_LATENTS_STD, diffusers_vae22, save_vae22

LAYOUTS = ("folder", "pipeline", "original")


@pytest.fixture(scope="module")
def reference():
    return diffusers_vae22(seed=0)


@pytest.fixture(scope="module")
def folders(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae22")
    return {layout: str(save_vae22(reference, root / layout, layout)) for layout in LAYOUTS}


def _latents(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b) -> int:
    return int(np.abs(np.stack(a).astype(int) - np.stack(b).astype(int)).max())


STREAM_SHAPE = (1, 48, 4, 3, 4)


@pytest.fixture(scope="module")
def reference_stream(reference):
    return reference_frames(reference, _latents(STREAM_SHAPE, 1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stream_matches_diffusers(reference_stream, folders, layout):
    """Every layout gives the Wan2.2 structure (the original .pth from its shapes alone, with upstream's hard-coded
    latent statistics) and decodes diffusers' frames: 1 + 4 per later latent frame, 16 pixels per latent pixel."""
    decoder = WanVAEDecoder.from_pretrained(folders[layout])
    spec = decoder.spec
    assert (spec.z_dim, spec.is_residual, spec.patch_size, spec.spatial_stride, spec.temporal_stride) == \
        (48, True, 2, 16, 4)
    assert list(spec.latents_mean) == VAE22_LATENTS_MEAN and list(spec.latents_std) == VAE22_LATENTS_STD
    frames = list(decoder.decode_stream(_latents(STREAM_SHAPE, 1)))
    assert len(frames) == 1 + 4 * 3
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    want = reference_stream
    signed = np.stack(frames).astype(float) - want.astype(float)
    assert np.abs(signed).max() <= 2 and abs(signed.mean()) < 0.1, (np.abs(signed).max(), signed.mean())


def test_frames_come_out_one_latent_frame_at_a_time(folders):
    decoder = WanVAEDecoder.from_pretrained(folders["folder"])
    calls = []
    original = decoder._decode_chunk
    decoder._decode_chunk = lambda z, cache: calls.append(z.shape[2]) or original(z, cache)
    stream = decoder.decode_stream(_latents((1, 48, 3, 2, 2), 2))
    first = next(stream)
    assert calls == [1] and first.shape == (32, 32, 3)
    assert len(list(stream)) == 8 and calls == [1, 1, 1]


# -- split over a gloo group (the rank function runs on every rank of the session's DistPool) ----------------------


def _rank_decode(folder, shape, seed):
    import torch.distributed as dist

    decoder = WanVAEDecoder.from_pretrained(folder)
    latents = _latents(shape, seed)
    bands = [c.numpy() for c in decoder.decode_chunks(latents, group=dist.group.WORLD)]
    return bands, list(decoder.decode_stream(latents, group=dist.group.WORLD))


def test_two_ranks_decode_what_one_rank_decodes(dist_pools, folders):
    """3 latent rows on 2 ranks (bands of 2 and 1 rows: 32 and 16 pixel rows after the patch): the halo rows, the
    DupUp3D shortcuts and the unpatchify are exact, so the ranks' bands stack to the one-rank pixels."""
    shape = (1, 48, 3, 3, 5)
    got = dist_pools(2).run(_rank_decode, folders["original"], shape, 3)
    decoder = WanVAEDecoder.from_pretrained(folders["original"])
    latents = _latents(shape, 3)
    chunks = [c.numpy() for c in decoder.decode_chunks(latents)]
    frames = list(decoder.decode_stream(latents))
    assert [got[0][0][t].shape[-2] for t in range(len(chunks))] == [32] * len(chunks)
    assert [got[1][0][t].shape[-2] for t in range(len(chunks))] == [16] * len(chunks)
    for t, chunk in enumerate(chunks):
        stacked = np.concatenate([got[0][0][t], got[1][0][t]], axis=-2)
        assert stacked.shape == chunk.shape and float(np.abs(stacked - chunk).max()) <= 1e-5, t
    assert len(got[0][1]) == len(frames) == 9 and _max_diff(got[0][1], frames) <= 1
    assert got[1][1] == [None] * 9


# -- tiling -------------------------------------------------------------------------------------------------------


def test_tiling_matches_diffusers_tiled_decode(reference, folders):
    """Tiles of 64 pixels every 48 (4 latent pixels every 3) over 5 x 6 latents, blended before the unpatchify as
    diffusers does; sizes that split the 2 x 2 patch are refused."""
    decoder = WanVAEDecoder.from_pretrained(folders["folder"])
    decoder.tiling, decoder.tile_sample_min, decoder.tile_sample_stride = True, 64, 48
    reference.tile_sample_min_height = reference.tile_sample_min_width = 64
    reference.tile_sample_stride_height = reference.tile_sample_stride_width = 48
    latents = _latents((1, 48, 2, 5, 6), 4)
    frames = np.stack(list(decoder.decode_stream(latents)))
    want = reference_frames(reference, latents, tiled=True)
    assert frames.shape == want.shape == (5, 80, 96, 3)
    assert _max_diff(frames, want) <= 2
    # (Against the untiled decode, tiles this small differ a lot with random weights: each tile sees zero padding
    # and its own mid-block attention. diffusers' tiled decode is the reference for what tiling should give.)
    decoder.tile_sample_stride = 47
    with pytest.raises(ValueError, match="multiples of the decoder's 2x2 output patch"):
        list(decoder.decode_stream(latents))


# -- files that do not fit ----------------------------------------------------------------------------------------


def _one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_mismatched_or_missing_pieces_are_one_line(folders, tmp_path):
    original = torch.load(f"{folders['original']}/Wan2.2_VAE.pth", weights_only=True)

    def write(state, name="Wan2.2_VAE.pth"):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        torch.save(state, folder / name)
        return folder

    state = dict(original)
    del state["decoder.upsamples.1.upsamples.0.residual.6.weight"]
    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(write(state))
    _one_line(e, "Wan2.2_VAE.pth", "do not fit the Wan2.2 decoder",
              "missing keys: decoder.up_blocks.1.resnets.0.conv2.weight")

    state = dict(original)
    state["decoder.upsamples.0.upsamples.1.residual.2.weight"] = torch.zeros(48, 24, 3, 3, 3)
    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(write(state))
    _one_line(e, "mis-shaped keys: decoder.up_blocks.0.resnets.1.conv1.weight (48, 24, 3, 3, 3) "
                 "(expected (48, 48, 3, 3, 3))")

    state = {k: v for k, v in original.items() if k != "decoder.head.2.weight"}
    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(write(state))
    _one_line(e, "Wan2.2_VAE.pth has no decoder.head.2.weight")

    state = dict(original)
    state["decoder.upsamples.7.upsamples.0.residual.2.weight"] = torch.zeros(12, 12, 3, 3, 3)
    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(write(state))
    _one_line(e, "decoder.upsamples must be numbered 0..N-1")

    state = dict(original)
    state["decoder.upsamples.0.upsamples.900.residual.2.weight"] = torch.zeros(48, 48, 3, 3, 3)
    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(write(state))
    _one_line(e, "beyond the 8 up blocks")

    state = dict(original)
    state["decoder.conv1.weight"] = state["decoder.conv1.weight"][:, :16]
    state["conv2.weight"], state["conv2.bias"] = torch.zeros(16, 16, 1, 1, 1), torch.zeros(16)
    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(write(state))
    _one_line(e, "Wan2.2_VAE.pth has z_dim 16; the Wan2.2 VAE has 48")

    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(write([torch.zeros(1)]))
    _one_line(e, "Wan2.2_VAE.pth holds a list, not a dict of tensors")

    garbage = write({})
    (garbage / "Wan2.2_VAE.pth").write_bytes(b"not a zip or a pickle\n" * 3)
    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(garbage)
    _one_line(e, "Wan2.2_VAE.pth is not a loadable weights file")

    state = dict(original)  # a 1024-channel conv over 4 bytes: shapes that would build (and copy) gigabytes
    state["decoder.conv1.weight"] = torch.zeros(1).expand(1024, 48, 3, 3, 3)
    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(write(state))
    _one_line(e, "decoder.conv1.weight declares (1024, 48, 3, 3, 3) over 4 bytes of data")

    both = write(original)
    torch.save({}, both / "Wan2.1_VAE.pth")
    with pytest.raises(WeightsError) as e:
        WanVAEDecoder.from_pretrained(both)
    _one_line(e, "holds both Wan2.1_VAE.pth and Wan2.2_VAE.pth")

    config_path = f"{folders['folder']}/config.json"
    config = json.loads(open(config_path).read())
    bad = tmp_path / "bad_config"
    bad.mkdir()
    shutil.copy(f"{folders['folder']}/diffusion_pytorch_model.safetensors", bad)
    for change, needle in (({"out_channels": 3}, "out_channels 3 is not RGB times the 2x2 patch (12)"),
                           ({"latents_mean": [0.0] * 16}, "z_dim 48 needs 48 latents_mean and latents_std values"),
                           ({"dim_mult": [1, 2, 3, 4]}, "36 -> 24 channels cannot shortcut")):
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(WeightsError) as e:
            WanVAEDecoder.from_pretrained(bad)
        _one_line(e, "config.json", needle)


# -- memory estimate (pipeline/memory.py's VAE functions) -----------------------------------------------------------


def test_memory_estimate_fits_the_wan22_decoder(folders):
    """Parameter bytes: the loaded decoder's. Decode bytes, scaled from a traced 32 x 32 latent: a real decode of a
    different size peaks within 10%."""
    from pipeline.memory import LiveBytes, _vae_param_bytes, vae_decode_bytes

    decoder = WanVAEDecoder.from_pretrained(folders["folder"])
    assert _vae_param_bytes(decoder.spec) == sum(p.numel() * 4 for p in decoder.parameters())
    latents = _latents((1, 48, 3, 6, 5), 5)
    with LiveBytes() as live:
        for _ in decoder.decode_chunks(latents):
            pass
    assert vae_decode_bytes(decoder.spec, 6, 5, False) == pytest.approx(live.peak, rel=0.1), live.peak


def test_the_released_structure_is_diffusers_own():
    """WAN22_VAE_CONFIG (TI2V-5B's VAE, 1024-channel decoder) builds, on meta, exactly the decoder parameter shapes
    diffusers builds from the same config; 555e6 parameters, 16x spatial and 4x temporal strides."""
    from diffusers import AutoencoderKLWan

    from pipeline.vae import WAN22_VAE_CONFIG, DecoderSpec

    spec = DecoderSpec.from_diffusers_config(WAN22_VAE_CONFIG)
    with torch.device("meta"):
        ours = WanVAEDecoder(spec)
        theirs = AutoencoderKLWan(**WAN22_VAE_CONFIG, latents_mean=VAE22_LATENTS_MEAN, latents_std=VAE22_LATENTS_STD)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k.startswith(("decoder.", "post_quant"))}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert sum(p.numel() for p in ours.parameters()) == pytest.approx(555.05e6, rel=1e-4)
    assert (spec.spatial_stride, spec.temporal_stride, spec.z_dim) == (16, 4, 48)


def test_a_ti2v_folder_not_downloaded_yet_is_estimated_with_the_wan22_vae():
    """Before the download, the folder's name says the model: Wan2.2-TI2V-5B's 48-channel DiT decodes with the
    Wan2.2 VAE (2.2 GB of fp32 weights, 16x), the other Wan models with Wan2.1's (0.29 GB, 8x)."""
    from pathlib import Path

    from pipeline.memory import _vae_param_bytes, vae_spec
    from pipeline.vae import WAN22_VAE_CONFIG, DecoderSpec

    spec = vae_spec(Path("/nonexistent/Wan2.2-TI2V-5B-Diffusers"))
    assert spec == DecoderSpec.from_diffusers_config(WAN22_VAE_CONFIG) and spec.spatial_stride == 16
    assert _vae_param_bytes(spec) == 555_051_580 * 4
    for name in ("Wan2.2-T2V-A14B", "Wan2.1-T2V-14B", "somewhere"):
        assert vae_spec(Path("/nonexistent") / name) == DecoderSpec(), name
