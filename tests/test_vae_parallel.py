"""The Wan VAE decode split by rows over a gloo group (issue 12): the same frames as one rank and as diffusers, every
rank finishing, caches holding a band, the first frame streamed early; then through the Runner and into an MP4.

Each rank function below runs on every rank of a session DistPool (tests/dist_pool.py); the expectation is always
computed in the test process, by the single-rank decode or by diffusers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import WanVAEDecoder
from pipeline.request import Frame, GenerateRequest, Result
from tests.test_vae import reference_frames
from tests.tiny_models import diffusers_vae, save_vae, wan_pipeline_folder

LAYOUTS = ("diffusers", "pipeline", "original")


@pytest.fixture(scope="module")
def reference():
    return diffusers_vae(seed=0)


@pytest.fixture(scope="module")
def folders(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_parallel")
    return {layout: str(save_vae(reference, root / layout, layout)) for layout in LAYOUTS}


def _latents(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _world():
    import torch.distributed as dist

    return dist.group.WORLD


def _one_rank(folder, shape, seed):
    """(decode_chunks pixels, decode_stream frames) of the single-rank decode, in this process."""
    decoder = WanVAEDecoder.from_pretrained(folder)
    latents = _latents(shape, seed)
    return [c.numpy() for c in decoder.decode_chunks(latents)], list(decoder.decode_stream(latents))


# -- rank functions (run on every rank of the pool) ---------------------------------------------------------------


def _rank_decode(folder, shapes, seed):
    """Per shape: (this rank's decode_chunks bands, its decode_stream items) with the group."""
    decoder = WanVAEDecoder.from_pretrained(folder)
    out = []
    for shape in shapes:
        latents = _latents(shape, seed)
        bands = [c.numpy() for c in decoder.decode_chunks(latents, group=_world())]
        out.append((bands, list(decoder.decode_stream(latents, group=_world()))))
    return out


def _cache_bytes(cache) -> int:
    return sum(v.numel() * v.element_size() for v in cache.values() if isinstance(v, torch.Tensor))


def _spy_cache_bytes(decoder, sizes):
    original = decoder._decode_chunk

    def spy(z, cache):
        out = original(z, cache)
        sizes.append(_cache_bytes(cache))
        return out

    decoder._decode_chunk = spy


def _rank_cache_bytes(folder, shape, seed):
    decoder = WanVAEDecoder.from_pretrained(folder)
    sizes = []
    _spy_cache_bytes(decoder, sizes)
    for _ in decoder.decode_stream(_latents(shape, seed), group=_world()):
        pass
    return sizes


def _rank_streaming(folder, shape, seed):
    """What had been decoded when the first item came out, and after the last."""
    decoder = WanVAEDecoder.from_pretrained(folder)
    calls = []
    original = decoder._decode_chunk
    decoder._decode_chunk = lambda z, cache: calls.append(z.shape[2]) or original(z, cache)
    stream = decoder.decode_stream(_latents(shape, seed), group=_world())
    first = next(stream)
    at_first = list(calls)
    rest = list(stream)
    return at_first, first, rest, list(calls)


_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce", "broadcast", "send",
                "recv", "isend", "irecv", "batch_isend_irecv", "barrier", "gather", "scatter", "all_to_all",
                "all_to_all_single", "reduce_scatter_tensor", "all_gather_object")


def _rank_tiling_refused(folder, shape, seed):
    """(error type, message, collectives entered before it); then proves the group is still in step."""
    import torch.distributed as dist

    decoder = WanVAEDecoder.from_pretrained(folder)
    decoder.tiling, decoder.tile_sample_min, decoder.tile_sample_stride = True, 32, 24  # this frame is tiled
    entered, saved = [], {}
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            saved[name] = fn = getattr(dist, name)
            setattr(dist, name, lambda *a, _n=name, _f=fn, **k: entered.append(_n) or _f(*a, **k))
    try:
        try:
            list(decoder.decode_stream(_latents(shape, seed), group=_world()))
            got = (None, "", list(entered))
        except Exception as e:  # noqa: BLE001 - reported to the test
            got = (type(e).__name__, str(e), list(entered))
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    ok = torch.ones(1)
    dist.all_reduce(ok)  # every rank is here and none is stuck inside a decode collective
    return got, int(ok.item())


# -- decoder over the group ---------------------------------------------------------------------------------------


def _max_diff(a, b) -> int:
    return int(np.abs(np.stack(a).astype(int) - np.stack(b).astype(int)).max())


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bands_decode_exactly_what_one_rank_decodes(dist_pools, folders, world):
    """Odd heights and widths, several latent frames: rank 0 streams the one-rank frames, the rest as many None;
    the ranks' float bands stacked in rank order are the one-rank pixels."""
    shapes = [(1, 16, 3, 5, 7), (1, 16, 2, 7, 5)]
    got = dist_pools(world).run(_rank_decode, folders["diffusers"], shapes, 1)
    for s, shape in enumerate(shapes):
        chunks, frames = _one_rank(folders["diffusers"], shape, 1)
        assert len(frames) == 1 + 4 * (shape[2] - 1)
        streamed = got[0][s][1]
        assert len(streamed) == len(frames) and all(f.shape == frames[0].shape for f in streamed)
        assert _max_diff(streamed, frames) <= 1, (world, shape)
        for rank in range(1, world):
            assert [item is None for item in got[rank][s][1]] == [True] * len(frames), (world, shape, rank)
        float_diff = 0.0
        for t, chunk in enumerate(chunks):
            stacked = np.concatenate([got[rank][s][0][t] for rank in range(world)], axis=-2)
            assert stacked.shape == chunk.shape, (world, shape, t)
            float_diff = max(float_diff, float(np.abs(stacked - chunk).max()))
        print(f"P={world} latents {shape[2:]}: decode_chunks max |diff| vs P=1 = {float_diff:.3g}")
        assert float_diff <= 1e-5, (world, shape, float_diff)


def _split_cases():
    return [(layout, 2) for layout in LAYOUTS] + [("original", 3)]


@pytest.mark.parametrize("layout,world", _split_cases())
def test_split_decode_matches_diffusers(dist_pools, reference, folders, layout, world):
    shape = (1, 16, 3, 5, 7)
    got = dist_pools(world).run(_rank_decode, folders[layout], [shape], 2)
    frames = got[0][0][1]
    want = reference_frames(reference, _latents(shape, 2))
    assert np.stack(frames).shape == want.shape == (9, 40, 56, 3)
    assert _max_diff(frames, want) <= 2
    assert all(item is None for rank in range(1, world) for item in got[rank][0][1])


@pytest.mark.parametrize("world", [3, 4])
def test_latents_shorter_than_the_group(dist_pools, folders, world):
    """Two latent rows on 3 or 4 ranks: fewer bands than ranks, still the one-rank frames, every rank finishes."""
    shape = (1, 16, 3, 2, 5)
    got = dist_pools(world).run(_rank_decode, folders["diffusers"], [shape], 3)
    _, frames = _one_rank(folders["diffusers"], shape, 3)
    assert _max_diff(got[0][0][1], frames) <= 1
    for rank in range(1, world):
        assert len(got[rank][0][1]) == len(frames) and all(item is None for item in got[rank][0][1])


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_caches_only_its_band(dist_pools, folders, world):
    """After warm-up a rank's causal caches are its band's rows (+ one halo row above and below) of the one-rank
    caches, constant over time."""
    h, shape = 12, (1, 16, 5, 12, 5)
    decoder = WanVAEDecoder.from_pretrained(folders["diffusers"])
    whole = []
    _spy_cache_bytes(decoder, whole)
    list(decoder.decode_stream(_latents(shape, 4)))
    per_rank = dist_pools(world).run(_rank_cache_bytes, folders["diffusers"], shape, 4)
    band = -(-h // world)  # the tallest band
    for rank, sizes in enumerate(per_rank):
        assert sizes[2] == sizes[-1], (rank, sizes)
        share = sizes[-1] / whole[-1]
        print(f"P={world} rank {rank}: cache {sizes[-1]} B = {share:.3f} of P=1 ({whole[-1]} B)")
        assert sizes[-1] <= (band + 2) / h * whole[-1] * 1.1, (rank, share)
        assert share < 1 / world + 0.1, (rank, share)  # well below one rank's whole cache (P=2: 0.54, P=4: 0.29)
    assert sum(s[-1] for s in per_rank) >= whole[-1]  # the bands cover the frame: nothing is left undecoded


def test_first_frame_streams_after_one_latent_frame(dist_pools, folders):
    """As test_vae's test_frames_come_out_before_the_end, with the group: one latent frame decoded per item."""
    ranks = dist_pools(2).run(_rank_streaming, folders["diffusers"], (1, 16, 3, 3, 3), 5)
    for rank, (at_first, first, rest, calls) in enumerate(ranks):
        assert at_first == [1] and calls == [1, 1, 1], (rank, at_first, calls)
        assert len(rest) == 8
        if rank == 0:
            assert isinstance(first, np.ndarray) and first.shape == (24, 24, 3)
        else:
            assert first is None and rest == [None] * 8


def test_tiling_with_a_group_is_refused_on_every_rank(dist_pools, folders):
    results = dist_pools(2).run(_rank_tiling_refused, folders["diffusers"], (1, 16, 2, 5, 7), 6)
    for (kind, message, entered), in_step in results:
        assert kind == "ValueError", (kind, message)
        assert "vae_tiling" in message and "vae_parallel" in message and "\n" not in message
        assert entered == [], entered
        assert in_step == 2


# -- through the Runner ---------------------------------------------------------------------------------------------


def _every_rank(config, request):
    """On every rank of a session pool (the Runner forgotten afterwards): (rank 0's events or None, this rank's
    Result)."""
    import torch.distributed as dist

    from tests import pool_runner as pr

    try:
        runner = pr.pool_runner(config, return_latents=True)
        events = list(runner.generate(request.resolve(config)))
    finally:
        pr._RUNNERS.pop(repr(config), None)  # not runner.close(): that would end the pool's own group
    assert isinstance(events[-1], Result), events[-1]
    return (events if dist.get_rank() == 0 else None), events[-1]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "wan")


def _run(pools, folder, *overrides, seed=3):
    """(rank 0's frames [9, 48, 32, 3], every rank's Result by rank) of one request on a fresh Runner on the
    session's gloo pool, after checking the stream's shape: frames 0..8 in order, the first before the Result, the
    Result last."""
    from configs import load_config

    config = load_config("cpu-smoke", [f"model.path={folder}", "video.height=48", "video.width=32", *overrides])
    out = pools(config.parallel.group_size).run(_every_rank, config, GenerateRequest(PROMPT, seed=seed))
    events, results = out[0][0], {rank: result for rank, (_, result) in enumerate(out)}
    frames = [e for e in events if isinstance(e, Frame)]
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("Frame") < kinds.index("Result") == len(kinds) - 1
    assert [f.index for f in frames] == list(range(9))
    return np.stack([f.image for f in frames]), results


PROMPT = "a red circle moving right"


def _decoded_here(folder, result) -> np.ndarray:
    """The single-rank decode, in this process, of the latents the Runner denoised."""
    return np.stack(list(WanVAEDecoder.from_pretrained(folder).decode_stream(result.latents)))


@pytest.fixture(scope="module")
def sp2_unsplit(dist_pools, wan_folder):
    """Frames of the SP=2 run with rank 0 decoding alone."""
    frames, results = _run(dist_pools, wan_folder, "parallel.ulysses_degree=2", "parallel.vae_parallel=false")
    assert "decode_s" in results[0].timings and "decode_s" not in results[1].timings  # rank 1 did not decode
    return frames


@pytest.mark.parametrize("parallel", ["parallel.ulysses_degree=2", "parallel.cfg_degree=2"])
def test_runner_split_decode_gives_the_same_frames(dist_pools, wan_folder, sp2_unsplit, parallel):
    """vae_parallel on: both ranks decode (CFG-parallel ranks included) and rank 0 streams the frames rank 0 alone
    decodes: for SP=2 the vae_parallel=false run's; for CFG=2 the one-rank decode of the same latents."""
    frames, results = _run(dist_pools, wan_folder, parallel, "parallel.vae_parallel=true")
    assert all("decode_s" in r.timings for r in results.values()), results  # every rank decoded its band
    want = _decoded_here(wan_folder, results[0])
    if parallel.startswith("parallel.ulysses"):
        assert _max_diff(sp2_unsplit, want) == 0  # same latents as the split run: the comparison is fair
        want = sp2_unsplit
    assert frames.shape == want.shape == (9, 48, 32, 3)
    print(f"{parallel} vae_parallel on vs rank 0 alone: max |diff| {_max_diff(frames, want)} levels")
    assert _max_diff(frames, want) <= 1


def test_runner_with_tiling_decodes_on_rank_zero(dist_pools, wan_folder, sp2_unsplit):
    frames, results = _run(dist_pools, wan_folder, "parallel.ulysses_degree=2", "parallel.vae_parallel=true",
                           "model.vae_tiling=true")
    assert "decode_s" in results[0].timings and "decode_s" not in results[1].timings
    assert _max_diff(frames, sp2_unsplit) <= 1  # 48 x 32 pixels: smaller than a tile, so not tiled either


# -- through Ray into an MP4 ----------------------------------------------------------------------------------------


def test_ray_sp2_mp4_equals_the_unsplit_mp4(wan_folder, sp2_unsplit, tmp_path):
    """One generation through the Ray driver at SP=2 with the split decode, written as MP4 and decoded back: the
    MP4 the same writer makes of the vae_parallel=false frames, within 1 level."""
    ray = pytest.importorskip("ray")
    from cluster.driver import Driver, Job
    from cluster.video import StreamingMP4, read_mp4
    from tests.ray_helpers import assert_cluster_clean, ray_config

    unsplit = StreamingMP4(tmp_path / "unsplit.mp4", fps=16)
    for frame in sp2_unsplit:
        unsplit.append(frame)
    unsplit.commit()
    config = ray_config(wan_folder, "video.height=48", "video.width=32", "parallel.ulysses_degree=2",
                        "parallel.vae_parallel=true")
    assert config.parallel.vae_parallel and config.video.fps == 16
    streamed = []
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        with Driver(config, progress=False, on_event=lambda job, e: isinstance(e, Frame) and streamed.append(e)) \
                as driver:
            job = Job(0, GenerateRequest(PROMPT, seed=3).resolve(config), tmp_path / "split.mp4", name=PROMPT)
            (outcome,) = driver.run([job])
        assert outcome.ok, outcome.error
        assert_cluster_clean()
    finally:
        ray.shutdown()
    split, fps = read_mp4(outcome.path)
    want, _ = read_mp4(tmp_path / "unsplit.mp4")
    assert split.shape == want.shape == (9, 48, 32, 3) and fps == 16
    print(f"SP=2 MP4 split vs unsplit decode: max |diff| {_max_diff(split, want)} levels")
    assert _max_diff(split, want) <= 1
    assert _max_diff([e.image for e in streamed], sp2_unsplit) <= 1
