"""Ulysses x Ring in the model: the replica's (cfg, ring, ulysses) mesh, and a WanDiT sharded over a ring of Ulysses
groups equals the unparallel model (issue #13)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from pipeline import WanDiT, apply_sequence_parallel
from pipeline.parallel import build_mesh
from tests.tiny_models import diffusers_dit, save_dit

# cfg 2 x ring 2 x ulysses 2, written out by hand: Ulysses innermost (consecutive ranks), rings strided by U.
TABLE_2x2x2 = {
    "sp": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "ulysses": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "ring": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "cfg": [[0, 4], [1, 5], [2, 6], [3, 7]],
    # rank: (cfg_rank, ring_rank, ulysses_rank, sp_rank)
    "coords": [(0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 0, 2), (0, 1, 1, 3),
               (1, 0, 0, 0), (1, 0, 1, 1), (1, 1, 0, 2), (1, 1, 1, 3)],
}


class _FakeDist:
    """torch.distributed's group calls for one rank of a world, recording every new_group in order."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.calls = rank, world, []

    def new_group(self, ranks, timeout=None):
        self.calls.append((tuple(ranks), timeout))
        return tuple(ranks)

    def get_world_size(self, group=None):
        return self.world if group is None else len(group)

    def get_rank(self, group=None):
        return self.rank if group is None else group.index(self.rank)


def test_mesh_groups_for_cfg2_ring2_ulysses2(monkeypatch):
    timeout = timedelta(seconds=7)
    orders = set()
    for rank in range(8):
        fake = _FakeDist(rank, 8)
        for name in ("new_group", "get_world_size", "get_rank"):
            monkeypatch.setattr(dist, name, getattr(fake, name))
        mesh = build_mesh(2, 2, timeout, ring_degree=2)
        mine = lambda table: next(list(g) for g in TABLE_2x2x2[table] if rank in g)  # noqa: E731
        assert list(mesh.sp_group) == mine("sp") and list(mesh.ulysses_group) == mine("ulysses")
        assert list(mesh.ring_group) == mine("ring") and list(mesh.cfg_group) == mine("cfg")
        assert (mesh.cfg_rank, mesh.ring_rank, mesh.ulysses_rank, mesh.sp_rank) == TABLE_2x2x2["coords"][rank]
        assert (mesh.cfg_degree, mesh.ring_degree, mesh.ulysses_degree) == (2, 2, 2)
        # the slice a rank holds is its index in the sequence group: ring index * U + Ulysses index
        assert mesh.sp_group.index(rank) == mesh.ring_rank * 2 + mesh.ulysses_rank
        assert all(t == timeout for _, t in fake.calls)
        orders.add(tuple(ranks for ranks, _ in fake.calls))
    # new_group is collective: every rank must create the same groups in the same order
    assert len(orders) == 1
    assert sorted(map(list, next(iter(orders)))) == sorted(TABLE_2x2x2["sp"] + TABLE_2x2x2["ulysses"]
                                                           + TABLE_2x2x2["ring"] + TABLE_2x2x2["cfg"])


def test_mesh_without_a_ring_is_the_cfg_ulysses_mesh(monkeypatch):
    calls = []
    for rank in range(4):
        fake = _FakeDist(rank, 4)
        for name in ("new_group", "get_world_size", "get_rank"):
            monkeypatch.setattr(dist, name, getattr(fake, name))
        mesh = build_mesh(2, 2)
        assert mesh.ring_group is None and mesh.ulysses_group is mesh.sp_group and mesh.ring_degree == 1
        assert (mesh.cfg_rank, mesh.sp_rank) == divmod(rank, 2)
        calls.append([r for r, _ in fake.calls])
    assert calls == [[(0, 1), (2, 3), (0, 2), (1, 3)]] * 4  # exactly the groups (and order) of before the ring


def test_mesh_refuses_degrees_that_do_not_multiply_to_the_world(monkeypatch):
    fake = _FakeDist(0, 4)
    for name in ("new_group", "get_world_size", "get_rank"):
        monkeypatch.setattr(dist, name, getattr(fake, name))
    with pytest.raises(ValueError, match="cfg_degree 1 x ring_degree 2 x ulysses_degree 3 != world size 4"):
        build_mesh(1, 3, ring_degree=2)
    assert fake.calls == []  # refused before any collective


# --------------------------------------------------------------------------------------------------------------
# On 4 gloo processes


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(seed, F, H, W, B=2, T=7, text_dim=24):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, F, H, W, generator=g), torch.tensor([999.0, 250.5])[:B],
            torch.randn(B, T, text_dim, generator=g))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_dit(diffusers_dit(seed=0), tmp_path_factory.mktemp("dit") / "dit", "diffusers")


# 15, 5, 1, 36 and 9 tokens: not divisible by 4 (padded), a ring block that is partly or wholly padding
GRIDS = [(5, 2, 6), (5, 2, 2), (1, 2, 2), (3, 6, 8), (1, 6, 6)]


def _mesh_case(folder, cfg: int, ring: int, ulysses: int, grids, gather_over_sequence_group: bool):
    """On every rank: the mesh's group members, and the sharded model's output error vs the plain model's."""
    torch.manual_seed(0)
    mesh = build_mesh(cfg, ulysses, timedelta(seconds=60), ring_degree=ring)
    members = {name: dist.get_process_group_ranks(getattr(mesh, name)) if getattr(mesh, name) is not None else None
               for name in ("sp_group", "ulysses_group", "ring_group", "cfg_group")}
    plain = WanDiT.from_pretrained(folder)
    sp = apply_sequence_parallel(WanDiT.from_pretrained(folder), mesh.ulysses_group, ring_group=mesh.ring_group,
                                 sequence_group=mesh.sp_group if gather_over_sequence_group else None)
    errors = []
    for F, H, W in grids:
        latents, t, ctx = inputs(F * 100 + H + W, F, H, W)
        with torch.no_grad():
            errors.append(rel_err(sp(latents, t, ctx), plain(latents, t, ctx)))
    tokens = [sp.layout.valid_tokens(F * H * W // 4) for F, H, W in grids]
    return members, (mesh.cfg_rank, mesh.ring_rank, mesh.ulysses_rank, mesh.sp_rank), errors, tokens


@pytest.mark.parametrize("over_sequence_group", [True, False])
def test_dit_over_ulysses2_x_ring2_equals_the_plain_model(dist_pools, folder, over_sequence_group):
    # 3 heads: uneven inside each Ulysses group of 2
    out = dist_pools(4).run(_mesh_case, folder, 1, 2, 2, GRIDS, over_sequence_group)
    for rank, (members, coords, errors, tokens) in enumerate(out):
        assert members == {"sp_group": [0, 1, 2, 3], "ulysses_group": [rank & ~1, rank | 1],
                           "ring_group": [rank % 2, rank % 2 + 2], "cfg_group": None}
        assert coords == (0, rank // 2, rank % 2, rank)
        assert max(errors) <= 1e-4, (rank, errors)
    # 15 tokens / 4 ranks: slices of 4, 4, 4, 3 (patch 1x2x2: F*H*W/4 tokens)
    assert [t[0] for _, _, _, t in out] == [4, 4, 4, 3]


def test_dit_over_cfg2_x_ring2_x_ulysses1_equals_the_plain_model(dist_pools, folder):
    out = dist_pools(4).run(_mesh_case, folder, 2, 2, 1, GRIDS[:3], True)
    for rank, (members, coords, errors, _) in enumerate(out):
        half = [0, 1] if rank < 2 else [2, 3]
        assert members == {"sp_group": half, "ulysses_group": [rank], "ring_group": half,
                           "cfg_group": [rank % 2, rank % 2 + 2]}
        assert coords == (rank // 2, rank % 2, 0, rank % 2)
        assert max(errors) <= 1e-4, (rank, errors)


# --------------------------------------------------------------------------------------------------------------
# Memory: the estimate's tokens per rank and ring buffers against a real forward

SMALL = dict(dim=96, ffn_dim=256, num_heads=4, num_layers=2, text_dim=32, freq_dim=32, text_len=16)
GRID = (3, 8, 10)  # 240 tokens: 60 per rank on 4


def _ring_forward_peak(ring: int, ulysses: int) -> int:
    """Rank 0's live-bytes peak in one real fp32 forward_tokens over ring x ulysses ranks (fused Q/K/V)."""
    from pipeline.dit import WanDiTConfig
    from pipeline.memory import LiveBytes

    torch.manual_seed(0)
    mesh = build_mesh(1, ulysses, timedelta(seconds=60), ring_degree=ring)
    cfg = WanDiTConfig(**SMALL)
    dit = WanDiT(cfg, attention_backend="sdpa").eval()
    apply_sequence_parallel(dit, mesh.ulysses_group, ring_group=mesh.ring_group, fuse_qkv=True)
    x_BLP = dit.layout.shard(torch.randn(1, 240, cfg.patch_dim))
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    with torch.no_grad(), LiveBytes() as live:
        dit.forward_tokens(x_BLP, GRID, torch.ones(1), ctx)
    return live.peak


def test_memory_estimate_of_a_ring_matches_a_real_ring_forward(dist_pools):
    from pipeline.dit import WanDiTConfig
    from pipeline.memory import dit_activation_bytes

    pool = dist_pools(4)
    real = min(pool.run(_ring_forward_peak, 2, 2)[0] for _ in range(2))  # gloo may free a buffer late
    cfg = WanDiTConfig(**SMALL)
    traced = dit_activation_bytes(cfg, GRID, 2, torch.float32, True, 2)
    assert traced == pytest.approx(real, rel=0.1)  # measured: 410 kB traced, 429 kB real
    # a video's tokens split over ring x ulysses: fewer bytes than Ulysses 2 alone, more than Ulysses 4 (the ring's
    # K/V blocks in flight and its fp32 running output)
    assert dit_activation_bytes(cfg, GRID, 4, torch.float32) < traced < dit_activation_bytes(cfg, GRID, 2,
                                                                                            torch.float32)


# --------------------------------------------------------------------------------------------------------------
# The Runner builds the mesh from the config and applies the layout


def _runner_case(config, request):
    from tests.pool_runner import pool_runner

    runner = pool_runner(config, return_latents=True)
    mesh, layout = runner.mesh, runner.components.dit.layout
    events = list(runner.generate(request))
    where = (mesh.ring_degree, mesh.ring_rank, mesh.ulysses_rank, layout.ring, layout.ulysses, layout.rank,
             layout.sequence_group is mesh.sp_group)
    return where, events[-1].latents if dist.get_rank() == 0 else None


RUNNER_BASE = ["video.height=32", "video.width=48", "video.frames=9", "sampling.steps=3", "sampling.guidance_scale=4.0",
               "runtime.device=cpu"]


def _request():
    from pipeline.request import GenerateRequest

    return GenerateRequest("a red circle moving right", seed=1234, negative_prompt="blurry")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from tests.tiny_models import wan_pipeline_folder

    return wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="module")
def one_rank_latents(dist_pools, wan):
    """The same Runner on one rank (the session's one-process pool: no process of its own to start)."""
    from configs import load_config

    config = load_config(None, [f"model.path={wan}", *RUNNER_BASE])
    (where, latents), = dist_pools(1).run(_runner_case, config, _request().resolve(config))
    assert where[:3] == (1, 0, 0), where  # no ring, no Ulysses
    return latents


@pytest.mark.parametrize("cfg, ring, ulysses", [(1, 2, 2), (2, 2, 1)])
def test_runner_over_a_ring_gives_the_latents_of_one_rank(dist_pools, wan, one_rank_latents, cfg, ring, ulysses):
    from configs import load_config

    config = load_config(None, [f"model.path={wan}", *RUNNER_BASE, f"parallel.cfg_degree={cfg}",
                                f"parallel.ring_degree={ring}", f"parallel.ulysses_degree={ulysses}"])
    out = dist_pools(4).run(_runner_case, config, _request().resolve(config))
    P = ring * ulysses
    for rank, (where, _) in enumerate(out):
        s = rank % P  # the token slice: ring index * U + Ulysses index
        assert where == (ring, s // ulysses, s % ulysses, ring, ulysses, s, True), (rank, where)
    got, want = out[0][1], one_rank_latents
    assert ((got - want).norm() / want.norm()) < 1e-4  # 18 tokens over 4 ranks: padded


def _wrong_sequence_group(folder):
    mesh = build_mesh(1, 2, timedelta(seconds=60), ring_degree=2)
    try:  # the ring's ranks passed as the sequence group
        apply_sequence_parallel(WanDiT.from_pretrained(folder), mesh.ulysses_group, ring_group=mesh.ring_group,
                                sequence_group=mesh.ring_group)
    except ValueError as e:
        return str(e)


def test_a_sequence_group_that_is_not_ring_x_ulysses_is_refused(dist_pools, folder):
    messages = dist_pools(4).run(_wrong_sequence_group, folder)
    assert messages == [f"sequence_group must hold the ring x Ulysses ranks with this rank at index {r} of 4, got "
                        f"index {r // 2} of 2" for r in range(4)]
