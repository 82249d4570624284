"""The `sharding` check of bench/gpu_check.py: FSDP2-sharded DiT weights (pipeline.sharding) on a one-rank group.

One GPU means one rank, so nothing is split, and FSDP2 skips the all-gather entirely (unshard issues no collective:
the shard is copied into the unsharded parameters on the current stream). What runs is the one-rank path of FSDP2's
hooks on CUDA (unshard, the reshard after each block, the forward methods the Runner calls) against the same model
unsharded: NCCL all-gathers, their overlap on FSDP2's streams and the 3-block transient of 2+ ranks are not
exercised. On CUDA it also times one Wan2.1-14B block's compute per rank
of an 8-rank replica at 720p and 480p: what each block's prefetched all-gather must hide behind.
Legend: B batch, S tokens of the video, L tokens per rank, H heads, D head dim, C model dim, T text tokens,
P patch vector.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from bench.gpu_common import (BF16, CheckFailed, Ctx, Row, median_time, one_rank_group, peak_gib, rel_l2,
                              reset_peak)

# Same math on the same weights: bitwise expected (reported as such); a kernel picked differently for a buffer at
# another address may move the last bf16 bit, so only more than this relative error fails.
SAME = 1e-3


def sharding_latent(ctx: Ctx) -> tuple[int, int, int]:
    """480p's 21x60x104 latent (32760 tokens) on CUDA, a quarter of it with --quick; the CPU sizes as they are."""
    f, h, w = ctx.sizes.dit_latent
    return (f, h // 2, w // 2) if ctx.quick and ctx.device.type == "cuda" else (f, h, w)


class _UlyssesCompute:
    """A TokenLayout whose attend does one Ulysses rank's attention work without the all-to-alls: all S tokens of
    ceil(H / P) heads (random q, k, v made once), returning the query unchanged. With a block's other work on
    L = ceil(S / P) tokens this is one rank's compute per block at P ranks, the time a prefetched gather hides
    behind."""

    def __init__(self, S: int, heads: int, head_dim: int, device: torch.device):
        g = torch.Generator(device=device).manual_seed(2)
        self.qkv = [torch.randn(1, S, heads, head_dim, generator=g, device=device).to(BF16) for _ in range(3)]

    def attend(self, q_BLHD, k_BLHD, v_BLHD, seq_len: int, layer: int) -> torch.Tensor:
        from attention import local_attention

        local_attention(*self.qkv)
        return q_BLHD


def block_ms(dev: torch.device, grid: tuple[int, int, int], ranks: int, reps: int) -> float:
    """Milliseconds of one Wan2.1-14B block's compute on one of `ranks` Ulysses ranks (bf16; random weights)."""
    from pipeline.dit import Block, rope_angles
    from pipeline.memory import WAN21_14B as cfg

    S = math.prod(grid)
    L, heads = -(-S // ranks), -(-cfg.num_heads // ranks)
    torch.manual_seed(0)
    with torch.device(dev):
        block = Block(cfg, "auto").eval().requires_grad_(False)
    for name, p in block.named_parameters():  # as WanDiT.to_compute_dtype: modulation and norm3 stay fp32
        p.data = p.data.to(torch.float32 if "modulation" in name or "norm3" in name else BF16)
    cos, sin = rope_angles(grid, cfg.head_dim, dev)
    x_BLC = torch.randn(1, L, cfg.dim, device=dev)
    e0_B6C = torch.randn(1, 6, cfg.dim, device=dev) * 0.1
    ctx_BTC = torch.randn(1, cfg.text_len, cfg.dim, device=dev).to(BF16)
    layout = _UlyssesCompute(S, heads, cfg.head_dim, dev)
    with torch.no_grad():
        seconds = median_time(lambda: block(x_BLC, e0_B6C, ctx_BTC, (cos[:L], sin[:L]), layout, S, 0), reps, dev)
    return seconds * 1e3


# Wan2.1-14B on 8 ranks: 720p (81 frames: 21x45x80 latent tokens after the 1x2x2 patch) and 480p (21x30x52)
BLOCK_GRIDS = {"720p": (21, 45, 80), "480p": (21, 30, 52)}


def check_sharding(ctx: Ctx, row: Row) -> None:
    from torch.distributed.tensor import DTensor

    from bench.dit_vs_diffusers import WAN_1_3B, _inputs
    from pipeline import WanDiT
    from pipeline.sharding import fsdp_unavailable, is_sharded, resident_param_bytes, shard_dit

    why = fsdp_unavailable()
    if why is not None:
        raise CheckFailed(f"pipeline.sharding cannot shard on this torch: {why}")
    s, dev = ctx.sizes, ctx.device
    cfg = dataclasses.replace(WAN_1_3B, num_layers=s.dit_layers, **s.dit_dims)
    torch.manual_seed(0)
    with torch.device(dev):
        dit = WanDiT(cfg).eval().requires_grad_(False)
    dit.to_compute_dtype(BF16)  # bf16 but the fp32 modules: mixed dtypes inside every block, as loaded
    x, t, text = _inputs(sharding_latent(ctx), dev, BF16, text_dim=cfg.text_dim)
    grid = dit.grid(x.shape)
    row.figures.update(layers=cfg.num_layers, tokens=math.prod(grid))
    whole_bytes = resident_param_bytes(dit)
    block_bytes = resident_param_bytes(dit.blocks[0])
    with torch.no_grad():
        reset_peak(dev)
        want = dit(x, t, text)
        whole_s = median_time(lambda: dit(x, t, text), s.reps, dev)
        whole_peak = peak_gib(dev)
    with one_rank_group(dev) as group:
        row.figures["backend"] = str(torch.distributed.get_backend(group))
        shard_dit(dit, group)  # in place: the same weights, now FSDP2 DTensors over one rank
        if not is_sharded(dit):
            raise CheckFailed("shard_dit returned without sharding the blocks")
        with torch.no_grad():
            reset_peak(dev)
            got = dit(x, t, text)
            sharded_s = median_time(lambda: dit(x, t, text), s.reps, dev)
            sharded_peak = peak_gib(dev)
            # the Runner and StepCache call forward_tokens / run_blocks, registered as FSDP forward methods
            v_BLP = dit.forward_tokens(dit.layout.shard(dit.patchify(x)), grid, t, text)
            by_tokens = dit.unpatchify(dit.layout.gather(v_BLP, math.prod(grid)), grid)
        # reshard_after_forward: between forwards every block holds its DTensor shard again, not gathered weights
        gathered = [n for n, p in dit.blocks.named_parameters() if not isinstance(p, DTensor)]
        sharded_bytes = resident_param_bytes(dit)
    ratio = sharded_s / whole_s
    row.figures.update(whole_s=round(whole_s, 3), sharded_s=round(sharded_s, 3), ratio=f"{ratio:.3f}x",
                       whole_peak_GiB=whole_peak, sharded_peak_GiB=sharded_peak,
                       param_GiB=round(whole_bytes / 2**30, 2))
    if whole_peak is not None:  # one rank's shard is the whole block, so every gathered copy is extra
        row.figures["gather_extra_blocks"] = round((sharded_peak - whole_peak) * 2**30 / block_bytes, 1)
    problems = []
    for label, out in (("forward", got), ("forward_tokens", by_tokens)):
        err = rel_l2(out, want)
        row.figures[label] = "bitwise" if torch.equal(out, want) else f"rel err {err:.1e}"
        if not (out.shape == want.shape and err < SAME):
            problems.append(f"sharded {label} differs from the unsharded model: rel err {err:.2e}")
    if gathered:
        problems.append(f"{len(gathered)} block parameters still gathered after the forward ({gathered[0]})")
    if sharded_bytes != whole_bytes:  # one rank's shard is the whole parameter
        problems.append(f"resident parameters {sharded_bytes} bytes sharded over one rank vs {whole_bytes} whole")
    if problems:
        raise CheckFailed("; ".join(problems))
    # What a prefetched gather must hide behind on a real replica (docs/benchmarks.md, "Sharded weights"): one
    # 14B block's compute per rank at P=8. Needs the GPU (the CPU's bf16 is far too slow at these sizes).
    if dev.type == "cuda":
        del dit
        for name, grid in BLOCK_GRIDS.items():
            row.figures[f"block_14b_{name}_p8_ms"] = round(block_ms(dev, grid, 8, s.reps), 1)
