"""The streaming VAE decoder against diffusers' AutoencoderKLWan.decode with the same random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import WanVAEDecoder
from pipeline.weights import WeightsError
from tests.tiny_models import diffusers_vae, save_vae


@pytest.fixture(scope="module")
def reference():
    return diffusers_vae(seed=0)


@pytest.fixture(scope="module")
def folders(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return {layout: save_vae(reference, root / layout, layout) for layout in ("diffusers", "pipeline", "original")}


def reference_frames(ref, latents, tiled=False):
    """diffusers decode of the de-normalised latents, mapped from [-1, 1] to 0..255 like a video writer does."""
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    if tiled:
        ref.enable_tiling()
    try:
        with torch.no_grad():
            video = ref.decode(latents * std + mean).sample
    finally:
        ref.disable_tiling()
    return ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("layout", ["diffusers", "pipeline", "original"])
def test_stream_matches_diffusers(reference, folders, layout):
    decoder = WanVAEDecoder.from_pretrained(folders[layout])
    latents = torch.randn(1, 16, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    frames = list(decoder.decode_stream(latents))
    assert len(frames) == 1 + 4 * 3
    assert all(f.shape == (24, 40, 3) and f.dtype == np.uint8 for f in frames)
    want = reference_frames(reference, latents)
    diff = np.abs(np.stack(frames).astype(int) - want.astype(int))
    assert diff.max() <= 2, diff.max()


def test_frames_come_out_before_the_end(folders):
    """A generator: the first frame exists after one latent frame was decoded, the rest still pending."""
    decoder = WanVAEDecoder.from_pretrained(folders["diffusers"])
    calls = []
    original = decoder._decode_chunk
    decoder._decode_chunk = lambda z, cache: calls.append(z.shape[2]) or original(z, cache)
    stream = decoder.decode_stream(torch.randn(1, 16, 3, 2, 2))
    next(stream)
    assert calls == [1]
    assert len(list(stream)) == 8 and calls == [1, 1, 1]


def test_cache_memory_does_not_grow(folders):
    decoder = WanVAEDecoder.from_pretrained(folders["diffusers"])
    sizes = []
    original = decoder._decode_chunk

    def spy(z, cache):
        out = original(z, cache)
        sizes.append(sum(v.numel() for v in cache.values() if isinstance(v, torch.Tensor)))
        return out

    decoder._decode_chunk = spy
    list(decoder.decode_stream(torch.randn(1, 16, 6, 2, 2)))
    assert sizes[2] == sizes[-1], sizes  # bounded by 2 cached frames per conv after warm-up


def test_tiling_matches_diffusers_tiled_decode(reference, folders):
    decoder = WanVAEDecoder.from_pretrained(folders["diffusers"])
    decoder.tiling, decoder.tile_sample_min, decoder.tile_sample_stride = True, 32, 24
    reference.tile_sample_min_height = reference.tile_sample_min_width = 32
    reference.tile_sample_stride_height = reference.tile_sample_stride_width = 24
    latents = torch.randn(1, 16, 2, 7, 9, generator=torch.Generator().manual_seed(2))
    frames = np.stack(list(decoder.decode_stream(latents)))
    want = reference_frames(reference, latents, tiled=True)
    assert frames.shape == want.shape == (5, 56, 72, 3)
    assert np.abs(frames.astype(int) - want.astype(int)).max() <= 2
    # (Against the untiled decode, tiles this small differ a lot with random weights: each tile sees zero padding
    # and its own mid-block attention. diffusers' tiled decode is the reference for what tiling should give.)


def test_bad_vae_folders(folders, tmp_path):
    with pytest.raises(WeightsError, match="do not exist"):
        WanVAEDecoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(WeightsError, match="holds no VAE"):
        WanVAEDecoder.from_pretrained(tmp_path)
    state = torch.load(folders["original"] / "Wan2.1_VAE.pth", weights_only=True)
    del state["decoder.upsamples.1.residual.6.weight"]
    torch.save(state, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(WeightsError, match=r"missing keys: decoder\.up_blocks\.0\.resnets\.1\.conv2\.weight"):
        WanVAEDecoder.from_pretrained(tmp_path)
    torch.save({"decoder.conv1.weight": torch.zeros(8, 16, 3, 3, 3), "conv2.weight": torch.zeros(16, 16, 1, 1, 1),
                "conv2.bias": torch.zeros(16)}, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(WeightsError, match="no decoder.upsamples"):
        WanVAEDecoder.from_pretrained(tmp_path)


def test_rounding_to_uint8_is_unbiased(reference, folders):
    """The 2-level tolerance above hides a systematic half-level bias (floor or truncation instead of rounding):
    over many pixels the signed differences must average out."""
    decoder = WanVAEDecoder.from_pretrained(folders["diffusers"])
    latents = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(5))
    frames = np.stack(list(decoder.decode_stream(latents))).astype(float)
    signed = frames - reference_frames(reference, latents).astype(float)
    assert np.abs(signed).max() <= 2 and abs(signed.mean()) < 0.1, signed.mean()


def _cache_bytes_after(decoder, latents) -> list[int]:
    """Bytes of every causal cache alive after each streamed chunk (all tiles' caches when tiling)."""
    caches, sizes = {}, []
    original = decoder._decode_chunk

    def spy(z, cache):
        caches[id(cache)] = cache
        return original(z, cache)

    decoder._decode_chunk = spy
    for _ in decoder.decode_chunks(latents):
        sizes.append(sum(v.numel() * v.element_size() for c in caches.values() for v in c.values()
                         if isinstance(v, torch.Tensor)))
    return sizes


def test_tiled_caches_cover_the_overlapped_area(folders):
    """What tiling does not bound, stated exactly: one cache per tile for the whole decode, together the tiles'
    areas (overlaps once per tile) over the frame's times the untiled cache; constant over time either way."""
    from pipeline.vae import tile_cache_factor

    decoder = WanVAEDecoder.from_pretrained(folders["diffusers"])
    decoder.tile_sample_min, decoder.tile_sample_stride = 32, 24  # 4-latent-pixel tiles every 3
    latents = torch.randn(1, 16, 5, 7, 9, generator=torch.Generator().manual_seed(3))
    untiled = _cache_bytes_after(decoder, latents)
    decoder.tiling = True
    tiled = _cache_bytes_after(decoder, latents)
    assert untiled[2] == untiled[-1] and tiled[2] == tiled[-1], (untiled, tiled)  # no growth with length
    # tiles at 0, 3, 6: rows 4 + 4 + 1 of 7, columns 4 + 4 + 3 of 9
    assert tile_cache_factor(7, 9, 4, 3) == pytest.approx(9 * 11 / 63)
    assert tiled[-1] / untiled[-1] == pytest.approx(tile_cache_factor(7, 9, 4, 3), rel=1e-9)
    assert tile_cache_factor(90, 160) == pytest.approx(1.65, abs=0.005)  # 720p with the default 256 / 192 px
