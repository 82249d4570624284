"""WanDiT speed, side by side in one run:

1. forward: WanDiT vs diffusers' WanTransformer3DModel, same weights and inputs (default: CPU fp32, a 1.3B-shaped
   model cut to --layers layers, small latents; on a GPU: --device cuda --dtype bfloat16 --layers 30 --latent 21,60,104
   for the full 1.3B at 480p).
2. sp: one DiT forward on SP=1 (one process) vs SP=2 (two gloo processes), one thread per rank.
3. latents: the Runner's denoising step with the latents kept sharded between steps vs gathered every step.

    python bench/dit_vs_diffusers.py                    # all three, CPU
    python bench/dit_vs_diffusers.py --sections forward --device cuda --dtype bfloat16 --layers 30 --latent 21,60,104
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import WanDiT, WanDiTConfig, apply_sequence_parallel  # noqa: E402

WAN_1_3B = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, reps, device):
    fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _inputs(latent, device, dtype, text_dim=4096, text_len=512):
    g = torch.Generator().manual_seed(0)
    f, h, w = latent
    return (torch.randn(1, 16, f, h, w, generator=g).to(device, dtype), torch.tensor([500.0], device=device),
            torch.randn(1, text_len, text_dim, generator=g).to(device, dtype))


def bench_forward(args):
    from diffusers import WanTransformer3DModel

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=args.layers,
                              text_dim=4096, freq_dim=256).save_pretrained(tmp)
        # Both load the same file; diffusers keeps its fp32 modules itself when given torch_dtype.
        ref = WanTransformer3DModel.from_pretrained(tmp, torch_dtype=dtype).eval().to(device)
        ours = WanDiT.from_pretrained(tmp, device=device, dtype=dtype)
    print(f"\nforward: {args.layers}-layer 1.3B-shaped DiT, {args.device} {args.dtype}, median of {args.reps}")
    print("| latent (F,H,W) | tokens | diffusers | WanDiT | WanDiT / diffusers |")
    print("|---|---|---|---|---|")
    for latent in args.latent:
        x, t, ctx = _inputs(latent, device, dtype)
        with torch.no_grad():
            t_ref = _median_time(lambda: ref(x, t, ctx, return_dict=False), args.reps, device)
            t_ours = _median_time(lambda: ours(x, t, ctx), args.reps, device)
        tokens = latent[0] * latent[1] * latent[2] // 4
        print(f"| {latent} | {tokens} | {t_ref * 1e3:.0f} ms | {t_ours * 1e3:.0f} ms | {t_ours / t_ref:.2f}x |")


def _sp_worker(rank, world, port, cfg, latent, reps, results):
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    torch.manual_seed(0)
    model = apply_sequence_parallel(WanDiT(cfg).eval(), dist.group.WORLD, fuse_qkv=False)
    x, t, ctx = _inputs(latent, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        seconds = _median_time(lambda: model(x, t, ctx), reps, torch.device("cpu"))
    if rank == 0:
        results.put(seconds)
    dist.destroy_process_group()


def _spawn(world, target, *args):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = results.get()
    for p in procs:
        p.join()
    return out


def bench_sp(args):
    cfg = dataclasses.replace(WAN_1_3B, num_layers=args.layers)
    print(f"\nsp: {args.layers}-layer 1.3B-shaped DiT forward, CPU fp32, gloo, one thread per rank, median of {args.reps}")
    print("| latent (F,H,W) | tokens | SP=1 | SP=2 | speedup |")
    print("|---|---|---|---|---|")
    for latent in args.latent:
        t1 = _spawn(1, _sp_worker, cfg, latent, args.reps)
        t2 = _spawn(2, _sp_worker, cfg, latent, args.reps)
        tokens = latent[0] * latent[1] * latent[2] // 4
        print(f"| {latent} | {tokens} | {t1 * 1e3:.0f} ms | {t2 * 1e3:.0f} ms | {t1 / t2:.2f}x |")


def bench_latents(args):
    from configs import load_config
    from pipeline.launcher import LocalLauncher
    from pipeline.request import GenerateRequest
    from tests.tiny_models import wan_pipeline_folder

    steps = 8
    print(f"\nlatents: Runner denoising step, SP=2 on CPU (gloo, 1 thread/rank), small random Wan pipeline, "
          f"{steps} steps, guidance on")
    print("| video | tokens | sharded between steps | gathered every step | gathered / sharded |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = wan_pipeline_folder(Path(tmp) / "wan", heads=4, layers=4)
        for h, w, frames in ((64, 64, 17), (128, 128, 17)):
            cfg = load_config(None, [f"model.path={folder}", "runtime.device=cpu", "parallel.ulysses_degree=2",
                                     f"video.height={h}", f"video.width={w}", f"video.frames={frames}",
                                     f"sampling.steps={steps}"])
            per_step = {}
            for sharded in (True, False, True, False):
                with LocalLauncher(cfg, runner_options={"keep_latents_sharded": sharded}) as group:
                    result = list(group.generate(GenerateRequest("a red circle", seed=0)))[-1]
                per_step.setdefault(sharded, []).append(result.timings["denoise_s"] / steps)
            s, g = min(per_step[True]), min(per_step[False])
            print(f"| {frames}x{h}x{w} | {result.shapes['tokens']} | {s * 1e3:.1f} ms | {g * 1e3:.1f} ms | {g / s:.3f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="forward,sp,latents")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--latent", default="3,16,16;5,32,32",
                        type=lambda s: [tuple(int(x) for x in part.split(",")) for part in s.split(";")],
                        help="latent grids F,H,W separated by ';'")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    for section in args.sections.split(","):
        {"forward": bench_forward, "sp": bench_sp, "latents": bench_latents}[section](args)


if __name__ == "__main__":
    main()
