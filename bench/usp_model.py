"""A model on paper of one Wan2.1-14B 720p denoising step on 2 nodes x 8 GPUs: Ulysses 16, Ulysses 8 x Ring 2, and
two replicas of Ulysses 8 (issue #13), and CFG-parallel halves of Ulysses 8 for comparison. Prints one table; every input is a named constant below, with its source.

    python bench/usp_model.py [--inter-gbps 400] [--nvlink-gbs 370] [--block-ms 39.1]

Per layer and rank it adds compute (the measured time of one 14B block's forward for one rank of 8 at 720p, on an
H200, scaled by the tokens per rank; its attention share computed from FLOPs) and the bytes each layout moves:
- Ulysses P: Q, K, V to heads and the output back, 4 x S x C x 2 bytes / P, of which (P-1)/P leaves the rank; on
  2 nodes, 8 of each rank's 15 peers are across the network. An all-to-all blocks the attention: not overlapped.
- Ulysses 8 x Ring 2: the same all-to-all inside a node on half the sequence, then one K/V block (S/2 tokens x
  H/8 heads) to the ring partner on the other node, posted before the local block is attended: hidden behind that
  half of the attention when it is shorter. The ring's extra compute (two kernels and an fp32 merge instead of one
  kernel) is the ratio measured on an H200 for 75,600 tokens x 40 heads at P=2 (tests of attention/ring.py).
Link speeds are effective per GPU and direction; NCCL rarely reaches more. Not modelled: the all-to-all's latency
terms, head_chunks overlap (which would shorten Ulysses' exposed time), text cross-attention (no communication),
the VAE decode and the text encoder (outside the step).
"""

from __future__ import annotations

import argparse

# Wan2.1-14B at 720p, 81 frames: 21 x 45 x 80 latent patches (1280x720 / 16 per patch), 40 heads of 128
TOKENS = 75_600
DIM = 5_120
HEADS = 40
LAYERS = 40
BLOCK_PARAMS = 351e6  # per block: self and cross attention 8 x C^2, FFN 2 x C x 13824 (weights.py's shapes)
BYTES = 2  # bf16 on the wire

# Measured (docs/benchmarks.md): one 14B block, one rank of 8 (9,450 tokens, 5 heads), 720p, H200 bf16
BLOCK_MS_P8 = 39.1
RING_COMPUTE = 1.03  # ring P=2 attention / one sdpa call, 75,600 tokens x 40 heads, H200 (helper's measurement)


def attention_share(tokens_per_rank: float) -> float:
    """Fraction of a block's FLOPs in self-attention for one rank: 4*L*S*C (QK^T and PV over all S keys, the rank's
    heads = its share of C) against 2*params*L for the matmuls."""
    attn = 4 * tokens_per_rank * TOKENS * DIM
    dense = 2 * BLOCK_PARAMS * tokens_per_rank
    return attn / (attn + dense)


def layer_ms(layout: str, ranks: int, nvlink_gbs: float, inter_gbs: float, block_ms_p8: float) -> dict:
    """Per-layer time for one rank of a replica of `ranks` GPUs (compute scales as 1/ranks from the measured P=8)."""
    compute = block_ms_p8 * 8 / ranks
    attn = compute * attention_share(TOKENS / ranks)
    act = TOKENS * DIM * BYTES  # one [S, C] activation
    if layout == "ulysses":
        sent = 4 * act / ranks * (ranks - 1) / ranks
        nodes = ranks // 8
        across = sent * (8 * (nodes - 1)) / (ranks - 1) if nodes > 1 else 0.0
        comm = max(across / inter_gbs, (sent - across) / nvlink_gbs) * 1e3 if nodes > 1 else sent / nvlink_gbs * 1e3
        return {"compute": compute, "a2a": comm, "ring_exposed": 0.0, "ring_bytes": 0.0, "a2a_bytes": sent,
                "total": compute + comm}
    assert layout == "hybrid"  # Ulysses 8 inside each node x Ring 2 across
    half = TOKENS / 2
    sent = 4 * half * DIM * BYTES / 8 * 7 / 8
    a2a = sent / nvlink_gbs * 1e3
    ring_bytes = 2 * half * (HEADS / 8) * (DIM // HEADS) * BYTES  # K and V of the partner's half, this rank's heads
    hop = ring_bytes / inter_gbs * 1e3
    local = attn / 2 * RING_COMPUTE  # the local block, attended while the partner's block travels
    exposed = max(0.0, hop - local)
    total = (compute - attn) + attn * RING_COMPUTE + a2a + exposed
    return {"compute": compute - attn + attn * RING_COMPUTE, "a2a": a2a, "ring_exposed": exposed,
            "ring_bytes": ring_bytes, "a2a_bytes": sent, "total": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nvlink-gbs", type=float, default=370.0,
                    help="NVLink all-to-all, GB/s per GPU and direction (H100 NVLink4: 450 nominal)")
    ap.add_argument("--inter-gbps", type=float, nargs="*", default=[400.0, 100.0 / 8],
                    help="network per GPU in Gb/s: 400 = one 400G NIC per GPU (DGX H100, p5); 12.5 = one 100G "
                         "NIC shared by 8 GPUs")
    ap.add_argument("--block-ms", type=float, default=BLOCK_MS_P8, help="one 14B block, one rank of 8, 720p")
    args = ap.parse_args()
    nvlink = args.nvlink_gbs * 1e9
    print(f"Wan2.1-14B 720p ({TOKENS} tokens), one denoising step = {LAYERS} layers x 2 forwards (CFG), "
          f"2 nodes x 8 GPUs; NVLink {args.nvlink_gbs:g} GB/s per GPU; block {args.block_ms:g} ms at 8 ranks")
    print("| network per GPU | layout | compute ms/layer | all-to-all ms | ring exposed ms | step s | "
          "one video, 50 steps (vs ideal) | videos/min on 16 GPUs |")
    print("|---|---|---|---|---|---|---|---|")
    for gbps in args.inter_gbps:
        inter = gbps / 8 * 1e9 * 0.9  # 90% of the line rate
        u8 = layer_ms("ulysses", 8, nvlink, inter, args.block_ms)
        ideal_step = u8["total"] * LAYERS * 2 / 1e3 / 2  # 16 GPUs scaling perfectly from Ulysses 8 on one node
        # (name, per-layer times, replicas, forwards per step and rank: CFG-parallel halves run one branch each,
        # exchanging one velocity per step: [S, 64] fp32, 19 MB, negligible next to the step)
        rows = [("Ulysses 16", layer_ms("ulysses", 16, nvlink, inter, args.block_ms), 1, 2),
                ("Ulysses 8 x Ring 2", layer_ms("hybrid", 16, nvlink, inter, args.block_ms), 1, 2),
                ("cfg 2 x Ulysses 8", u8, 1, 1),
                ("2 replicas x Ulysses 8", u8, 2, 2)]
        for name, r, replicas, forwards in rows:
            step_s = r["total"] * LAYERS * forwards / 1e3
            per_min = replicas * 60 / (step_s * 50)  # 50 steps a video
            print(f"| {gbps:g} Gb/s | {name} | {r['compute']:.1f} | {r['a2a']:.2f} | {r['ring_exposed']:.2f} | "
                  f"{step_s:.2f} | {step_s * 50:.0f} s ({step_s / ideal_step:.2f}x) | {per_min:.2f} |")
    r = layer_ms("hybrid", 16, nvlink, 1.0, args.block_ms)
    u16 = layer_ms("ulysses", 16, nvlink, 1.0, args.block_ms)
    print(f"bytes per rank per layer: Ulysses 16 all-to-all {u16['a2a_bytes'] / 1e6:.0f} MB (8/15 of it across "
          f"nodes); hybrid all-to-all {r['a2a_bytes'] / 1e6:.0f} MB inside a node + ring {r['ring_bytes'] / 1e6:.0f} MB "
          f"across; Ulysses 8 on one node {layer_ms('ulysses', 8, nvlink, 1.0, args.block_ms)['a2a_bytes'] / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
