"""Live previews (issue #14): what a Preview costs a denoising step, measured side by side in one run.

What this measures is ONE CPU RANK: no all-gather of the estimate (SP=1), no per-step cancel all_reduce (world 1:
no collective), no NCCL, no GPU. It says what the rank-0 arithmetic of a preview costs, not what a preview costs a
GPU replica. The GPU check still to run: Wan2.1-T2V-1.3B at 480p (81 frames) on SP >= 2 GPUs, the same requests
with sampling.preview_every=1 and 0 interleaved, reporting the step time both ways (the preview's gather of the
fp32 x0 over rank 0's SP group and the one int64 cancel all_reduce per step included), and the fit's time at the
first preview of the real decoder.

For each model, the same requests run through one Runner (SP=1, in this process, a one-rank gloo group on a
HashStore) with sampling.preview_every=1 (a preview after every step but the last) and 0 (off), interleaved: the
mean step time is the mean gap between consecutive denoising Progress events (with previews on, each gap holds one
step and one preview), which a loaded machine makes noisy; so also the time inside Runner._preview during those
runs over their step time (in-run share: what a preview costs a step). Beside it, the preview's own time per call,
timed alone: x0 = x - sigma * v on this rank's
tokens, the gather (none on one rank), unpatchify, the linear map of the middle latent frame, the upscale and the
copy to a uint8 array (Runner._preview), and the fit of the map (once per decoder, at the first preview).

1. embedded: the embedded model (tiny preset: 32 x 32, 17 frames, UniPC, guidance 4), its own decoder.
2. random: a 1.3B-shaped Wan DiT (dim 1536, 12 heads, ffn 8960, text 512 x 4096, --layers blocks, random weights)
   on a small latent grid, guidance off, with a random decoder of the Wan2.1 VAE's shape (the preview map is fitted
   to it, as at the first preview). Also the preview's time per call on 480p-sized latents (21 x 60 x 104), where a DiT step of
   1.3B is far beyond this machine.

    python bench/preview.py                 # both (a few minutes on 2 CPU cores)
    python bench/preview.py --sections embedded --prompts 4
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

PROMPTS = ["a red circle moving right", "a green square moving up", "a blue circle moving left",
           "a yellow square moving down", "a white circle moving up", "a red square moving left",
           "a green circle moving down", "a blue square moving right"]


def _runner(config, components=None):
    import torch.distributed as dist

    from pipeline.runner import Runner

    runner = Runner(config, 0, 1, store=dist.HashStore(), load=components is None)
    if components is not None:
        runner.use_components(components)
    return runner


def _with_every(config, every: int):
    return dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, preview_every=every))


def _step_gaps(runner, request) -> tuple[list[float], int]:
    """Gaps (s) between consecutive denoising Progress events, and the Previews seen."""
    from pipeline.request import Preview, Progress

    stamps, previews = [], 0
    for event in runner.generate(request):
        if isinstance(event, Progress) and event.stage == "denoise":
            stamps.append(time.perf_counter())
        elif isinstance(event, Preview):
            previews += 1
    return [b - a for a, b in zip(stamps, stamps[1:])], previews


def _compare(runner, config, requests, log) -> dict:
    """Every request with previews every step and off, the order alternating per request. Also the time spent in
    Runner._preview inside the runs with previews, over those runs' own step time (robust to a machine whose load
    drifts between runs, which the on/off difference is not)."""
    gaps = {0: [], 1: []}
    inside: list[float] = []
    preview = runner._preview

    def timed(*args):
        t0 = time.perf_counter()
        try:
            return preview(*args)
        finally:
            inside.append(time.perf_counter() - t0)

    runner._preview = timed
    for n, request in enumerate(requests):
        for every in ((1, 0) if n % 2 else (0, 1)):
            runner.config = _with_every(config, every)
            g, previews = _step_gaps(runner, request)
            assert previews == (request.steps - 1 if every else 0), previews
            gaps[every] += g
        log(f"  request {n + 1}/{len(requests)}: step {statistics.mean(gaps[0]) * 1e3:.2f} ms off, "
            f"{statistics.mean(gaps[1]) * 1e3:.2f} ms with previews")
    del runner._preview
    off, on = statistics.mean(gaps[0]), statistics.mean(gaps[1])
    return {"step_off_ms": off * 1e3, "step_preview_ms": on * 1e3, "extra_pct": (on - off) / off * 100,
            "step_off_median_ms": statistics.median(gaps[0]) * 1e3,
            "step_preview_median_ms": statistics.median(gaps[1]) * 1e3, "gaps": len(gaps[0]),
            "in_run_preview_ms": statistics.mean(inside) * 1e3,
            "in_run_preview_median_ms": statistics.median(inside) * 1e3,
            "in_run_share_pct": sum(inside) / sum(gaps[1]) * 100,
            "median_share_pct": statistics.median(inside) / statistics.median(gaps[1]) * 100}


def _preview_call_ms(runner, latent_shape, reps: int) -> float:
    """Runner._preview with the x0 formula before it, on random latents of latent_shape, per call."""
    dit = runner.components.dit
    grid = dit.grid(latent_shape)
    x = dit.patchify(torch.randn(latent_shape))
    v = torch.randn_like(x)
    seq_len = x.shape[1]
    for _ in range(3):
        runner._preview(x - 0.5 * v, seq_len, grid, "bench")
    t0 = time.perf_counter()
    for _ in range(reps):
        image = runner._preview(x.float() - 0.5 * v.float(), seq_len, grid, "bench")
    assert image is not None and image.dtype.name == "uint8" and max(image.shape[:2]) <= 256
    return (time.perf_counter() - t0) / reps * 1e3


def _fit_s(runner) -> float:
    """Fitting the map to the runner's decoder (once per decoder, at the first preview): timed without the cache."""
    from pipeline.preview import LatentPreviewer

    comp = runner.components
    t0 = time.perf_counter()
    runner.previewer = LatentPreviewer.fit(comp.decoder, comp.z_dim, comp.spatial_stride, comp.temporal_stride,
                                           device=runner.device)
    return time.perf_counter() - t0


def bench_embedded(n_prompts: int, steps: int, log) -> dict:
    from configs import load_config
    from pipeline.request import GenerateRequest

    config = load_config("tiny", ["runtime.device=cpu", "sampling.preview_every=1"])
    runner = _runner(config)
    requests = [GenerateRequest(p, seed=1000 + i, steps=steps, request_id=f"e{i}").resolve(config)
                for i, p in enumerate(PROMPTS[:n_prompts])]
    list(runner.generate(requests[0]))  # warm-up
    log(f"embedded model, {steps} steps, {n_prompts} prompts")
    out = _compare(runner, config, requests, log)
    out["preview_call_ms"] = _preview_call_ms(runner, (1, 8, 5, 8, 8), 500)
    out["fit_s"] = _fit_s(runner)
    runner.close()
    return out


class _ZeroText:
    """A text encoder of umt5-xxl's output shape (512 x 4096): what it says does not matter to the timing."""

    def encode(self, prompts):
        return torch.zeros(len(prompts), 512, 4096)

    def to(self, device):
        return self


def bench_random(layers: int, latent: tuple[int, int, int], steps: int, n_requests: int, log) -> dict:
    from configs import load_config
    from pipeline.components import Components
    from pipeline.dit import WanDiT, WanDiTConfig
    from pipeline.request import GenerateRequest
    from pipeline.vae import WanVAEDecoder

    T, h, w = latent
    config = load_config("wan2.1-t2v-1.3b", ["model.path=/unused", "runtime.device=cpu", "sampling.preview_every=1",
                                            "sampling.guidance_scale=1.0", f"video.frames={(T - 1) * 4 + 1}",
                                            f"video.height={h * 8}", f"video.width={w * 8}"])
    torch.manual_seed(0)
    dit = WanDiT(WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=layers)).eval().requires_grad_(False)
    decoder = WanVAEDecoder().eval().requires_grad_(False)  # the Wan2.1 VAE's decoder shape, random weights
    runner = _runner(config, Components(dit, _ZeroText(), decoder, 16, 4, 8))
    fit_s = _fit_s(runner)
    requests = [GenerateRequest("random", seed=i, steps=steps, request_id=f"r{i}").resolve(config)
                for i in range(n_requests)]
    log(f"random 1.3B-shaped DiT ({layers} blocks), latent {T}x{h}x{w}, {steps} steps, {n_requests} requests; "
        f"map fitted in {fit_s:.1f} s")
    out = _compare(runner, config, requests, log)
    out["preview_call_ms"] = _preview_call_ms(runner, (1, 16, T, h, w), 200)
    out["preview_call_480p_ms"] = _preview_call_ms(runner, (1, 16, 21, 60, 104), 20)
    out["fit_s"] = fit_s
    runner.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="embedded,random")
    parser.add_argument("--prompts", type=int, default=8, help="embedded: requests (each with and without)")
    parser.add_argument("--steps", type=int, default=20, help="embedded: denoising steps")
    parser.add_argument("--layers", type=int, default=30, help="random: DiT blocks (30: the whole 1.3B)")
    parser.add_argument("--latent", default="2x8x8", help="random: latent frames x rows x columns")
    parser.add_argument("--random-steps", type=int, default=6)
    parser.add_argument("--random-requests", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")

    def log(text):
        print(text, flush=True)

    rows = {}
    if "embedded" in sections:
        rows["embedded"] = bench_embedded(args.prompts, args.steps, log)
    if "random" in sections:
        latent = tuple(int(x) for x in args.latent.split("x"))
        rows["random"] = bench_random(args.layers, latent, args.random_steps, args.random_requests, log)
    print(f"\n{'model':<10} {'step off':>10} {'step +preview':>14} {'extra':>7} {'median off/on':>18} "
          f"{'in-run preview mean/median':>27} {'share mean/median':>18} {'alone':>8} {'fit':>7}")
    for name, r in rows.items():
        print(f"{name:<10} {r['step_off_ms']:>8.2f}ms {r['step_preview_ms']:>12.2f}ms {r['extra_pct']:>6.1f}% "
              f"{r['step_off_median_ms']:>8.2f}/{r['step_preview_median_ms']:<7.2f}ms "
              f"{r['in_run_preview_ms']:>15.3f}/{r['in_run_preview_median_ms']:.3f}ms "
              f"{r['in_run_share_pct']:>11.2f}/{r['median_share_pct']:.2f}% {r['preview_call_ms']:>6.3f}ms "
              f"{r['fit_s']:>6.2f}s")
    if "random" in rows:
        print(f"preview call on 480p latents (21 x 60 x 104, 16 channels): {rows['random']['preview_call_480p_ms']:.2f} ms")


if __name__ == "__main__":
    main()
