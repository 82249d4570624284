r"""GPU memory per rank for Wan2.2 T2V-A14B and TI2V-5B: the numbers of the README's "Wan2.2" section.

    python bench/wan22_memory.py            # Markdown tables on stdout
    python bench/wan22_memory.py --json F   # and the numbers as JSON

Two sources, both without a weight file (nothing is downloaded; the folders need not exist):
    parameters  each model's DiT (both experts of A14B), the umt5-xxl encoder and the VAE decoders built on the meta
                device from the real configs (upstream's wan_t2v_A14B.py / wan_ti2v_5B.py shapes, diffusers'
                AutoencoderKLWan configs), bytes counted in the dtype each loads in (bf16 DiT with its fp32 norms,
                modulation and time embedding; bf16 encoder; fp32 decoders); --shard-weights per rank as FSDP2 keeps
                them (padded shards of every block of every expert) and the three blocks gathered at once.
    estimate    pipeline.memory.estimate_rank_memory for the preset at each layout and size: what every rank checks
                before it loads (weights + DiT activations at its tokens + the decode's caches + 1 GiB reserve;
                the largest phase counts), rank 0 (encodes and decodes) and rank 1 standing for the others.
`--replicas` does not change a rank's need: every replica is its own group of ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import load_config  # noqa: E402
from pipeline.memory import (WAN22_A14B_EXPERT, WAN22_TI2V_5B, GiB, _dit_param_bytes, _dit_sharded,  # noqa: E402
                             _text_encoder_shape, _vae_param_bytes, replica_estimates)
from pipeline.vae import WAN22_VAE_CONFIG, DecoderSpec  # noqa: E402

MODELS = {  # preset, DiT shapes, experts, VAE decoder, sizes (width x height)
    "T2V-A14B": ("wan2.2-t2v-a14b", WAN22_A14B_EXPERT, 2, DecoderSpec(), ((832, 480), (1280, 720))),
    "TI2V-5B": ("wan2.2-ti2v-5b", WAN22_TI2V_5B, 1, DecoderSpec.from_diffusers_config(WAN22_VAE_CONFIG),
                ((1280, 704),)),
}
LAYOUTS = {  # README row -> --set overrides; replicas are left out (they do not change a rank's need)
    "`--ulysses 8`": ["parallel.ulysses_degree=8"],
    "`--ulysses 4`": ["parallel.ulysses_degree=4"],
    "`--ulysses 2`": ["parallel.ulysses_degree=2"],
    "`--ulysses 1` (one GPU)": ["parallel.ulysses_degree=1"],
    "`--ulysses 1`, `offload_idle_expert`": ["parallel.ulysses_degree=1", "model.offload_idle_expert=true"],
    "`--ulysses 2`, `offload_idle_expert`": ["parallel.ulysses_degree=2", "model.offload_idle_expert=true"],
    "`--ulysses 4`, `shard_text_encoder`": ["parallel.ulysses_degree=4", "model.shard_text_encoder=true"],
    "`--ulysses 8`, `shard_text_encoder`": ["parallel.ulysses_degree=8", "model.shard_text_encoder=true"],
    "`--ulysses 4`, `text_encoder_device=cpu`": ["parallel.ulysses_degree=4", "model.text_encoder_device=cpu"],
    "`--ulysses 8 --shard-weights`": ["parallel.ulysses_degree=8", "parallel.shard_weights=true"],
    "`--ulysses 8 --shard-weights`, `shard_text_encoder`": ["parallel.ulysses_degree=8",
                                                           "parallel.shard_weights=true",
                                                           "model.shard_text_encoder=true"],
    "`--ulysses 4 --shard-weights`, `shard_text_encoder`": ["parallel.ulysses_degree=4",
                                                           "parallel.shard_weights=true",
                                                           "model.shard_text_encoder=true"],
}


def parameters() -> dict:
    # umt5-xxl in bf16: the published shapes for a folder that is not here (None would be the embedded model's)
    text = _text_encoder_shape(Path("/nonexistent/Wan2.2-T2V-A14B"))[0] * 2
    out = {}
    for name, (_, cfg, experts, spec, _) in MODELS.items():
        dit = _dit_param_bytes(cfg, torch.bfloat16)
        shard8, gather8 = _dit_sharded(cfg, torch.bfloat16, 8)
        out[name] = {"dit_bytes_each": dit, "experts": experts, "dit_numel_each": sum(
            p.numel() for p in _meta_dit(cfg).parameters()), "dit_shard8_bytes_each": shard8,
            "dit_gather8_bytes": gather8, "text_encoder_bytes": text, "vae_decoder_bytes": _vae_param_bytes(spec)}
    return out


def _meta_dit(cfg):
    from pipeline import WanDiT

    with torch.device("meta"):
        return WanDiT(cfg)


def estimates() -> dict:
    """{layout: {"MODEL WxH": [rank 0 bytes, other ranks' bytes]}} (a layout a model cannot use is left out)."""
    out = {}
    for layout, sets in LAYOUTS.items():
        for name, (preset, _, experts, _, sizes) in MODELS.items():
            if "offload_idle_expert" in layout and experts == 1:
                continue  # one DiT: nothing to park
            for width, height in sizes:
                config = load_config(preset, [f"video.width={width}", f"video.height={height}", *sets])
                short = name.split("-", 1)[1] if name.startswith("T2V") else name  # the README's column names
                out.setdefault(layout, {})[f"{short} {width}x{height}"] = [
                    e.total for e in replica_estimates(config, device_type="cuda")]
    return out


def estimate_table(est: dict) -> list[str]:
    """The README's table: a row per layout, rank 0 / other ranks in GiB per model and size."""
    columns = [f"{(n.split('-', 1)[1] if n.startswith('T2V') else n)} {w}x{h}"
               for n, m in MODELS.items() for w, h in m[4]]
    rows = ["| layout (per replica) | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for layout, cells in est.items():
        shown = [" / ".join(f"{b / GiB:.1f}" for b in cells[c]) if c in cells else "" for c in columns]
        rows.append(" ".join(["|", layout, "|", *[part for cell in shown for part in (cell, "|") if part]]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    params, est = parameters(), estimates()
    print("| model | DiT | --shard-weights on 8 GPUs, per GPU | umt5-xxl | VAE decoder |\n|---|---|---|---|---|")
    for name, p in params.items():
        n = p["experts"]
        each = f"{p['dit_bytes_each'] / GiB:.2f} GiB ({p['dit_numel_each'] / 1e9:.2f} B parameters{' each' * (n > 1)})"
        print(f"| {name} | {f'{n} x ' if n > 1 else ''}{each} | {f'{n} x ' if n > 1 else ''}"
              f"{p['dit_shard8_bytes_each'] / GiB:.2f} GiB + {p['dit_gather8_bytes'] / GiB:.2f} gathered | "
              f"{p['text_encoder_bytes'] / GiB:.2f} GiB | {p['vae_decoder_bytes'] / GiB:.2f} GiB |")
    print("\nrank 0 / other ranks, GiB\n\n" + "\n".join(estimate_table(est)))
    if args.json:
        args.json.write_text(json.dumps({"parameters": params, "estimates": est}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
