"""Step caching (issue #11): what each policy saves and what it costs, measured side by side in one run.

1. embedded: the embedded model (tiny preset: UniPC, guidance 4, shift 2) through the Runner, in this process (SP=1,
   a one-rank gloo group on a HashStore), at 20 and 50 steps over the 40 canonical prompts "a {color} {shape}
   moving {direction}" (seed 1000). Every prompt runs uncached and with every setting, interleaved (the order
   rotates per prompt), so the time ratios compare runs made seconds apart on the same prompts. Per setting:
   computed steps / steps (mean and worst prompt), DiT block evaluations relative to off (fbcache's probe block runs
   on every step: computed * layers + skipped * probe_blocks), denoise and whole-clip time vs off, PSNR of the
   decoded uint8 video vs its uncached twin (mean and worst prompt), and the analyzer's colour / direction / shape
   accuracy against the prompt. The goal (issue #11): at most 55% of the steps computed (mean), colour and direction
   accuracy no lower than off, mean PSNR >= 25 dB.
2. random: a 1.3B-shaped Wan DiT (dim 1536, 12 heads, ffn 8960, text 512 x 4096) cut to --layers layers with random
   weights, on a small latent grid, no guidance, driven by the sampler directly (StepCache.velocities with a
   one-rank agree): time ratio and relative L2 error of the final latents vs off, for teacache, fbcache and
   easycache. Random weights say nothing about quality; they measure what the decision costs against real-width
   blocks and that teacache's rescaled schedule runs on the 1.3B coefficients.

A setting is POLICY:THRESHOLD[:WARMUP[:MAX_SKIPS]]; warm-up (the fraction of the steps always computed first; 0 for
none at all: only step 0, which has no residual to reuse) and the skip cap override pipeline.step_cache.POLICIES for
that run only (this process).

    python bench/step_cache.py                 # the full run (11 minutes on 2 CPU cores)
    python bench/step_cache.py --quick         # 8 prompts, few settings, small random DiT (about 1 minute)
    python bench/step_cache.py --sections embedded --steps 20 --settings fbcache:0.1,easycache:0.2:0.1:4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import step_cache  # noqa: E402
from pipeline.tiny.analyze import analyze_frames  # noqa: E402
from pipeline.tiny.data import all_specs  # noqa: E402

# The full run's settings: each calibration-free policy's threshold range at the default warm-up (20%) and skip cap
# (3), then the warm-up and cap varied at the threshold that meets the goal at both step counts, then the extreme
# (threshold 1, the largest accepted, no warm-up, no cap: about step 0 and the last step only) to show what skipping
# nearly everything costs.
EMBEDDED_SETTINGS = (
    "fbcache:0.04", "fbcache:0.08", "fbcache:0.12", "fbcache:0.16", "fbcache:0.24", "fbcache:0.4",
    "easycache:0.05", "easycache:0.1", "easycache:0.2", "easycache:0.3", "easycache:0.5",
    "fbcache:0.16:0.1:4", "easycache:0.3:0.1:4", "fbcache:1:0:48", "easycache:1:0:48",
)
QUICK_SETTINGS = ("fbcache:0.08", "fbcache:0.16", "easycache:0.05", "easycache:0.3")
# Random weights change the time embedding by ~90% a step, so teacache never skips there (shown at its default and
# at the largest threshold); block 0's residual changes by 18-27% a step, so fbcache skips from about 0.25.
RANDOM_SETTINGS = ("teacache:0.08", "teacache:1", "fbcache:0.16", "fbcache:0.3", "easycache:0.05", "easycache:0.3")
PSNR_CAP_DB = 100.0  # an identical video; one level off in one sample of a 17x32x32 clip is 95 dB


@dataclasses.dataclass(frozen=True)
class Setting:
    policy: str
    threshold: float | None = None
    warmup: float | None = None
    max_skips: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Setting":
        parts = text.split(":")
        if parts[0] == "off" and len(parts) == 1:
            return cls("off")
        if parts[0] not in step_cache.POLICIES or not 2 <= len(parts) <= 4:
            raise ValueError(f"setting {text!r}: want POLICY:THRESHOLD[:WARMUP[:MAX_SKIPS]] with POLICY one of "
                             f"{', '.join(step_cache.POLICIES)}")
        try:
            threshold = float(parts[1])
            warmup = float(parts[2]) if len(parts) > 2 else None
            max_skips = int(parts[3]) if len(parts) > 3 else None
        except ValueError:
            raise ValueError(f"setting {text!r}: threshold and warm-up must be numbers, max_skips an integer") from None
        if not (0 < threshold <= 1) or (warmup is not None and not 0 <= warmup < 1) \
                or (max_skips is not None and max_skips < 1):
            raise ValueError(f"setting {text!r}: want 0 < threshold <= 1, 0 <= warmup < 1, max_skips >= 1")
        return cls(parts[0], threshold, warmup, max_skips)

    @property
    def spec(self) -> step_cache.CachePolicy:
        """The policy as this setting runs it."""
        spec = step_cache.POLICIES[self.policy]
        if self.warmup is not None:
            # warm-up 0: none at all (step 0 still runs: there is no residual to reuse before it)
            spec = dataclasses.replace(spec, warmup=self.warmup, min_warmup=spec.min_warmup if self.warmup else 1)
        return spec if self.max_skips is None else dataclasses.replace(spec, max_skips=self.max_skips)

    @contextlib.contextmanager
    def applied(self):
        """POLICIES[policy] with this setting's warm-up and skip cap, restored afterwards."""
        if self.policy == "off":
            yield
            return
        saved = step_cache.POLICIES[self.policy]
        step_cache.POLICIES[self.policy] = self.spec
        try:
            yield
        finally:
            step_cache.POLICIES[self.policy] = saved

    def cells(self) -> list[str]:
        if self.policy == "off":
            return ["off", "-", "-", "-"]
        s = self.spec
        return [self.policy, f"{self.threshold:g}", f"{s.warmup:g}", str(s.max_skips)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / mse))


# -- 1. the embedded model ------------------------------------------------------------------------------------------

def _runner():
    import torch.distributed as dist

    from configs import load_config
    from pipeline.runner import Runner

    config = load_config("tiny", ["runtime.device=cpu"])
    return config, Runner(config, 0, 1, store=dist.HashStore())


def _generate(runner, config, setting: Setting, prompt: str, steps: int):
    from pipeline.request import Frame, GenerateRequest, Result

    req = GenerateRequest(prompt, seed=1000, steps=steps, cache=setting.policy, cache_threshold=setting.threshold)
    with setting.applied():
        events = list(runner.generate(req.resolve(config)))
    frames = np.stack([e.image for e in events if isinstance(e, Frame)])
    result = next(e for e in events if isinstance(e, Result))
    return frames, result


def bench_embedded(settings: list[Setting], steps_list: list[int], specs, log) -> list[dict]:
    config, runner = _runner()
    layers = runner.components.dit.config.num_layers
    runs = [Setting("off")] + settings
    rows = []
    try:
        for steps in steps_list:
            _generate(runner, config, runs[0], specs[0].caption(), steps)  # warm-up: first-call allocations
            per = {s: [] for s in runs}
            t0 = time.perf_counter()
            for p, spec in enumerate(specs):
                order = runs[p % len(runs):] + runs[:p % len(runs)]
                out = {s: _generate(runner, config, s, spec.caption(), steps) for s in order}
                ref = out[runs[0]][0]
                for s in runs:
                    frames, result = out[s]
                    v = analyze_frames(frames)
                    computed = result.cache["computed_steps"] if result.cache else steps
                    per[s].append({"computed": computed, "skipped": result.cache["skipped"] if result.cache else [],
                                   "denoise_s": result.timings["denoise_s"], "total_s": result.timings["total_s"],
                                   "psnr": psnr(frames, ref), "color": v.color == spec.color,
                                   "direction": v.direction == spec.direction, "shape": v.shape == spec.shape})
            log(f"embedded {steps} steps: {len(specs)} prompts x {len(runs)} runs in {time.perf_counter() - t0:.0f} s")
            off = per[runs[0]]
            for s in runs:
                rs, probe = per[s], (s.spec.probe_blocks if s.policy != "off" else 0)
                n = len(rs)
                fracs = [r["computed"] / steps for r in rs]
                evals = sum(r["computed"] * layers + (steps - r["computed"]) * probe for r in rs) / (n * steps * layers)
                rows.append({
                    "steps": steps, "layers": layers, "setting": dataclasses.asdict(s), "cells": s.cells(), "prompts": n,
                    "computed_mean": statistics.mean(fracs), "computed_max": max(fracs), "block_evals": evals,
                    "denoise_ratio": sum(r["denoise_s"] for r in rs) / sum(r["denoise_s"] for r in off),
                    "total_ratio": sum(r["total_s"] for r in rs) / sum(r["total_s"] for r in off),
                    "psnr_mean": statistics.mean(r["psnr"] for r in rs), "psnr_min": min(r["psnr"] for r in rs),
                    **{k: sum(r[k] for r in rs) / n for k in ("color", "direction", "shape")},
                    "direction_lost": sum(a["direction"] and not b["direction"] for a, b in zip(off, rs)),
                    "skipped_first": min((r["skipped"][0] for r in rs if r["skipped"]), default=None),
                })
    finally:
        runner.close()
    for row in rows:
        off = next(r for r in rows if r["steps"] == row["steps"] and r["setting"]["policy"] == "off")
        row["goal"] = (row["setting"]["policy"] != "off" and row["computed_mean"] <= 0.55 + 1e-9
                       and row["color"] >= off["color"] and row["direction"] >= off["direction"]
                       and row["psnr_mean"] >= 25.0)
    return rows


def print_embedded(rows: list[dict]) -> None:
    layers = rows[0]["layers"]
    for steps in sorted({r["steps"] for r in rows}):
        print(f"\nembedded model ({layers} blocks), {steps} steps, {rows[0]['prompts']} prompts, seed 1000; times "
              f"and PSNR vs the uncached run of the same prompt:")
        print("| policy | threshold | warm-up | max skips | computed steps mean (max) | block evals | denoise time | "
              "clip time | PSNR mean (min) | colour | direction | shape | goal |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["steps"] == steps):
            psnr_cell = "identical" if r["psnr_min"] >= PSNR_CAP_DB else f"{r['psnr_mean']:.1f} ({r['psnr_min']:.1f})"
            lost = f" (-{r['direction_lost']})" if r["direction_lost"] else ""
            goal = "-" if r["setting"]["policy"] == "off" else ("yes" if r["goal"] else "no")
            print("| " + " | ".join(r["cells"]) + f" | {r['computed_mean']:.0%} ({r['computed_max']:.0%}) | "
                  f"{r['block_evals']:.0%} | {r['denoise_ratio']:.2f}x | {r['total_ratio']:.2f}x | {psnr_cell} | "
                  f"{r['color']:.0%} | {r['direction']:.0%}{lost} | {r['shape']:.0%} | {goal} |")
    steps_all = sorted({r["steps"] for r in rows})
    at = " and ".join(map(str, steps_all))
    print(f"\nsettings meeting the goal (<= 55% of steps computed, colour and direction accuracy of off, mean PSNR >= "
          f"25 dB) at {at} steps (threshold/warm-up/max skips: block evaluations, worst PSNR, at each step count):")
    for policy in ("fbcache", "easycache"):
        default = step_cache.POLICIES[policy]
        both, pick = [], None
        for key in dict.fromkeys(json.dumps(r["setting"], sort_keys=True) for r in rows):
            setting = json.loads(key)
            mine = [r for r in rows if json.dumps(r["setting"], sort_keys=True) == key]
            if setting["policy"] != policy or len(mine) != len(steps_all) or not all(r["goal"] for r in mine):
                continue
            both.append("/".join(mine[0]["cells"][1:]) + ": " + ", ".join(
                f"{r['block_evals']:.0%} {r['psnr_min']:.1f} dB" for r in mine))
            # the most conservative (smallest) threshold that meets it at the policy's warm-up and skip cap
            if setting["warmup"] is None and setting["max_skips"] is None and (pick is None or
                                                                                setting["threshold"] < pick):
                pick = setting["threshold"]
        print(f"- {policy}: " + ("; ".join(both) if both else "none at every step count"))
        if pick is not None:
            print(f"  smallest threshold meeting it at every step count with the default warm-up {default.warmup:g} "
                  f"and max skips {default.max_skips}: {pick:g}")
    lost = [f"{'/'.join(r['cells'])} at {r['steps']} ({r['direction_lost']} videos)" for r in rows
            if r["direction_lost"]]
    print(f"settings that lose direction accuracy (motion) vs off: {'; '.join(lost) if lost else 'none'}")


# -- 2. a random 1.3B-shaped DiT ------------------------------------------------------------------------------------

@torch.no_grad()
def _denoise(dit, setting: Setting, steps: int, noise, ctx):
    from pipeline.samplers import make_sampler

    grid = dit.grid(noise.shape)
    x_BLP = dit.patchify(noise)
    sampler = make_sampler("unipc", steps, 3.0)
    cache = None
    with setting.applied():
        if setting.policy != "off":
            cache = step_cache.StepCache(setting.policy, setting.threshold, steps, dit.config, branches=1,
                                         valid=x_BLP.shape[1], agree=lambda v: v[None])
        t0 = time.perf_counter()
        for i, t in enumerate(sampler.timesteps.tolist()):
            t_B = torch.full((1,), float(t))
            v_BLP = (cache.velocities(dit, i, x_BLP, grid, t_B, [ctx])[0] if cache
                     else dit.forward_tokens(x_BLP, grid, t_B, ctx))
            x_BLP = sampler.step(i, v_BLP, x_BLP)
        elapsed = time.perf_counter() - t0
    return dit.unpatchify(x_BLP, grid), elapsed, (len(cache.computed) if cache else steps)


def bench_random(settings: list[Setting], layers: int, latent, steps: int, log) -> list[dict]:
    from pipeline.dit import WanDiT, WanDiTConfig

    torch.manual_seed(0)
    dit = WanDiT(WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=layers)).eval()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, *latent, generator=g)
    ctx = torch.randn(1, 512, 4096, generator=g)
    off = Setting("off")
    _denoise(dit, off, 5, noise, ctx)  # warm-up: first-call allocations, the RoPE table
    # off before and after every group of three settings: each setting's base is the mean of the two off runs around
    # it, so drift on a shared machine shows in the off times instead of in the ratios
    groups = [settings[i:i + 3] for i in range(0, len(settings), 3)]
    t_all = time.perf_counter()
    ref, _, _ = first = _denoise(dit, off, steps, noise, ctx)
    off_s = [first[1]]
    rows = [{"setting": dataclasses.asdict(off), "cells": off.cells(), "steps": steps, "seconds": first[1],
             "computed": steps, "block_evals": 1.0, "rel_err": 0.0}]
    for group in groups:
        done = [(s, _denoise(dit, s, steps, noise, ctx)) for s in group]
        off_s.append(_denoise(dit, off, steps, noise, ctx)[1])
        base = (off_s[-2] + off_s[-1]) / 2
        for s, (x, elapsed, computed) in done:
            probe = s.spec.probe_blocks
            rows.append({"setting": dataclasses.asdict(s), "cells": s.cells(), "steps": steps, "seconds": elapsed,
                         "time_ratio": elapsed / base, "computed": computed,
                         "block_evals": (computed * layers + (steps - computed) * probe) / (steps * layers),
                         "rel_err": float((x - ref).norm() / ref.norm())})
    log(f"random DiT: {len(settings) + len(off_s)} runs of {steps} steps in {time.perf_counter() - t_all:.0f} s")
    rows[0]["off_seconds"] = off_s
    return rows


def print_random(rows: list[dict], layers: int, latent) -> None:
    f, h, w = latent
    off = ", ".join(f"{t:.1f}" for t in rows[0]["off_seconds"])
    print(f"\nrandom 1.3B-shaped DiT (dim 1536, 12 heads, ffn 8960, {layers} blocks, random weights), latent {f}x{h}x{w} "
          f"({f * h * w // 4} tokens), text 512 x 4096, UniPC {rows[0]['steps']} steps, shift 3, no guidance, CPU fp32; "
          f"off ran before and after every three settings ({off} s); a setting's base is the mean of the two around it:")
    print("| policy | threshold | warm-up | max skips | computed steps | block evals | time | time vs off | "
          "final latents rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["setting"]["policy"] == "off":
            continue
        print("| " + " | ".join(r["cells"]) + f" | {r['computed']}/{r['steps']} | {r['block_evals']:.0%} | "
              f"{r['seconds']:.1f} s | {r['time_ratio']:.2f}x | {r['rel_err']:.2e} |")


# -- main -----------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 prompts, 4 settings, a small random DiT (< 2 min)")
    parser.add_argument("--sections", default="embedded,random", help="comma list of: embedded, random")
    parser.add_argument("--steps", default=None, help="embedded step counts, comma list (default 20,50)")
    parser.add_argument("--prompts", type=int, default=None, help="first N of the 40 canonical prompts, spread "
                        "over the vocabulary (default all 40; --quick 8)")
    parser.add_argument("--settings", default=None, help="embedded settings, comma list of "
                        "POLICY:THRESHOLD[:WARMUP[:MAX_SKIPS]]")
    parser.add_argument("--random-settings", default=None, help="random-DiT settings, same form")
    parser.add_argument("--layers", type=int, default=2, help="random DiT blocks (default 2)")
    parser.add_argument("--latent", default=None, help="random DiT latent F,H,W (default 5,16,26; --quick 3,8,12)")
    parser.add_argument("--random-steps", type=int, default=None, help="random DiT steps (default 20; --quick 10)")
    parser.add_argument("--json", default=None, help="also write every row to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # like the other CPU benches: one thread, the VM's second core for the OS and others

    try:
        sections = args.sections.split(",")
        if not set(sections) <= {"embedded", "random"}:
            raise ValueError(f"--sections: unknown {sorted(set(sections) - {'embedded', 'random'})}")
        try:
            steps_list = [int(s) for s in (args.steps or "20,50").split(",")]
        except ValueError:
            raise ValueError(f"--steps: want comma-separated integers, got {args.steps!r}") from None
        settings = [Setting.parse(s) for s in (args.settings.split(",") if args.settings else
                                               QUICK_SETTINGS if args.quick else EMBEDDED_SETTINGS)]
        rsettings = [Setting.parse(s) for s in (args.random_settings.split(",") if args.random_settings else
                                                ("teacache:0.08", "fbcache:0.3", "easycache:0.3") if args.quick
                                                else RANDOM_SETTINGS)]
        if "embedded" in sections and any(s.policy == "teacache" for s in settings):
            raise ValueError("teacache has no coefficients for the embedded model: give it in --random-settings")
        latent = tuple(int(v) for v in (args.latent or ("3,8,12" if args.quick else "5,16,26")).split(","))
        if len(latent) != 3 or latent[1] % 2 or latent[2] % 2 or min(latent) < 1:
            raise ValueError("--latent: want F,H,W with H and W even")
        n_prompts = args.prompts or (8 if args.quick else 40)
        if not 1 <= n_prompts <= 40:
            raise ValueError("--prompts: 1 to 40")
        random_steps = args.random_steps or (10 if args.quick else 20)
        for s in settings + rsettings:
            with s.applied():
                step_cache.check_cache(s.policy, s.threshold, min(steps_list + [random_steps]))
    except ValueError as e:
        print(f"step_cache.py: {e}", file=sys.stderr)
        return 2

    # Spread the subset over the vocabulary: every 5th of (color, shape, direction) covers every direction and shape.
    specs = all_specs()
    stride = max(1, len(specs) // n_prompts)
    specs = (specs[::stride] + [s for i, s in enumerate(specs) if i % stride])[:n_prompts]

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    out = {}
    t0 = time.perf_counter()
    if "embedded" in sections:
        out["embedded"] = bench_embedded(settings, steps_list, specs, log)
        print_embedded(out["embedded"])
    if "random" in sections:
        out["random"] = bench_random(rsettings, args.layers, latent, random_steps, log)
        print_random(out["random"], args.layers, latent)
    print(f"\n(wall time {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
