"""Ray orchestration overhead, measured side by side in one run:

- the same batch (N prompts, one SP=2 replica on CPU, MP4s written as frames arrive) through the Ray driver vs the
  plain torch.multiprocessing launcher: time per prompt and the ratio;
- time from the last decoded frame leaving the worker to its arrival at the driver;
- first vs second prompt latency with the models already loaded, and the one-off start-up (actors + load).

    python bench/orchestration.py [--prompts 6] [--steps 10] [--size 64] [--frames 17]

--cold-start: where a whole `odyssey generate` with the embedded model spends its time, from the process's start to
its exit (python and imports, Ray's start, placement, actor start, rendezvous, model load, the prompt, shutdown), as
a breakdown table (medians of --runs runs, each a fresh process; the phases come from its manifest line's
timings.startup and timings). --baseline REV runs REV's code too (git archive of that commit, the same venv),
alternating with this tree's (or --current REV's), and prints both side by side.

    python bench/orchestration.py --cold-start [--runs 5] [--baseline REV] [--current REV]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import load_config  # noqa: E402
from pipeline.request import Frame, GenerateRequest  # noqa: E402


def through_launcher(config, requests, out: Path) -> list[float]:
    from cluster.video import StreamingMP4
    from pipeline.launcher import LocalLauncher

    times = []
    with LocalLauncher(config) as group:
        for i, request in enumerate(requests):
            t0 = time.perf_counter()
            writer = StreamingMP4(out / f"plain-{i}.mp4", request.fps)
            for event in group.generate(request):
                if isinstance(event, Frame):
                    writer.append(event.image)
            writer.commit()
            times.append(time.perf_counter() - t0)
    return times


def through_ray(config, requests, out: Path):
    import ray

    from cluster.driver import Driver, Job

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        with Driver(config, progress=False) as driver:
            startup = time.perf_counter() - t0
            outcomes = []
            for i, request in enumerate(requests):  # one at a time, like the launcher loop
                outcomes += driver.run([Job(i, request, out / f"ray-{i}.mp4")])
    finally:
        ray.shutdown()
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    return startup, outcomes


COLD_PHASES = [  # (label, how to get it from (wall seconds, the manifest line's timings))
    ("python, imports, config and checks (until the driver starts)",
     lambda wall, spawned, t: t["startup"]["began_at"] - spawned),
    ("Ray start (local cluster in-process)", lambda wall, spawned, t: t["startup"]["ray_init_s"]),
    ("placement group ready", lambda wall, spawned, t: t["startup"]["placement_s"]),
    ("actor start (worker process, its imports)", lambda wall, spawned, t: t["startup"]["actors_s"]),
    ("rendezvous (store, process group)", lambda wall, spawned, t: t["startup"]["rendezvous_s"]),
    ("model load", lambda wall, spawned, t: t["startup"]["load_s"]),
    ("prompt: text encoding", lambda wall, spawned, t: t["text_s"]),
    ("prompt: denoising", lambda wall, spawned, t: t["denoise_s"]),
    ("prompt: decode, stream, write the MP4", lambda wall, spawned, t: t["driver_total_s"] - t["text_s"] - t["denoise_s"]),
]


def cold_run(code: Path, out: Path, seed: int) -> tuple[float, list[float]]:
    """One `odyssey generate` of `code`'s tree in a fresh process: (wall seconds, seconds per COLD_PHASES row, then
    the rest: between the phases, shutdown and the process's exit)."""
    manifest = out / f"cold-{seed}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(code)}  # the Ray workers inherit it: they run the same tree
    spawned = time.time()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "a red circle moving right", "--seed",
                           str(seed), "-o", str(out / f"cold-{seed}.mp4"), "--manifest", str(manifest),
                           "--progress", "none"], cwd=code, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"odyssey generate failed ({done.returncode}): {done.stderr[-2000:]}")
    timings = json.loads(manifest.read_text().splitlines()[-1])["timings"]
    phases = [get(wall, spawned, timings) for _, get in COLD_PHASES]
    return wall, phases + [wall - sum(phases)]


def checkout(root: Path, rev: str, into: Path) -> tuple[str, Path]:
    """REV's tree (git archive) in `into`: (short hash, folder)."""
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, capture_output=True, text=True,
                           check=True).stdout.strip()
    into.mkdir()
    archive = subprocess.run(["git", "archive", short], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return short, into


def cold_start(runs: int, baseline: str | None, current: str | None) -> None:
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {}
        if baseline:
            rev, folder = checkout(root, baseline, tmp / "baseline")
            trees[f"baseline {rev}"] = folder
        if current:
            rev, folder = checkout(root, current, tmp / "current")
            trees[f"{rev}"] = folder
        else:
            trees["this tree"] = root
        results: dict[str, list] = {name: [] for name in trees}
        for i in range(runs):  # alternated, so a busy moment of the machine hits both alike
            for name, code in trees.items():
                results[name].append(cold_run(code, tmp, i))
                print(f"run {i + 1}/{runs} {name}: {results[name][-1][0]:.2f} s", file=sys.stderr, flush=True)
    labels = [label for label, _ in COLD_PHASES] + ["shutdown and exit (the rest)"]
    print(f"`odyssey generate \"a red circle moving right\"` (embedded model, 20 steps, 17 frames 32x32), "
          f"median of {runs} fresh processes, seconds")
    print("| phase | " + " | ".join(trees) + " |")
    print("|---|" + "---|" * len(trees))
    for k, label in enumerate(labels):
        print(f"| {label} | " + " | ".join(f"{statistics.median(r[1][k] for r in results[n]):.2f}" for n in trees)
              + " |")
    print("| **total (wall)** | " + " | ".join(f"**{statistics.median(r[0] for r in results[n]):.2f}** "
                                               f"({min(r[0] for r in results[n]):.2f}-"
                                               f"{max(r[0] for r in results[n]):.2f})" for n in trees) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--cold-start", action="store_true", help="Break a cold `odyssey generate` down instead.")
    parser.add_argument("--runs", type=int, default=5, help="--cold-start: fresh processes per tree.")
    parser.add_argument("--baseline", metavar="REV", help="--cold-start: also run this commit's code, side by side.")
    parser.add_argument("--current", metavar="REV", help="--cold-start: run this commit's code instead of this tree.")
    args = parser.parse_args()
    if args.cold_start:
        cold_start(args.runs, args.baseline, args.current)
        return
    from tests.tiny_models import wan_pipeline_folder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = wan_pipeline_folder(tmp / "wan", heads=4, layers=4)
        config = load_config(None, [f"model.path={folder}", "runtime.device=cpu", "parallel.ulysses_degree=2",
                                    f"video.height={args.size}", f"video.width={args.size}",
                                    f"video.frames={args.frames}", f"sampling.steps={args.steps}"])
        requests = [GenerateRequest(f"prompt {i}", seed=i).resolve(config) for i in range(args.prompts)]
        # Alternate the two paths twice; the first prompt of each run is the warm-up.
        plain, ray_runs = [], []
        for _ in range(2):
            plain.append(through_launcher(config, requests, tmp))
            ray_runs.append(through_ray(config, requests, tmp))
    plain_per = min(statistics.median(t[1:]) for t in plain)
    ray_per = min(statistics.median([o.timings["driver_total_s"] for o in outcomes[1:]]) for _, outcomes in ray_runs)
    latency = [o.timings["last_frame_latency_s"] for _, outcomes in ray_runs for o in outcomes]
    first = statistics.median([outcomes[0].timings["driver_total_s"] for _, outcomes in ray_runs])
    startup = min(s for s, _ in ray_runs)
    print(f"{args.prompts} prompts x {args.frames} frames {args.size}x{args.size}, {args.steps} steps, SP=2 on CPU "
          f"(gloo), small random Wan pipeline (4 heads x 12, 4 layers); best of 2 alternated runs, first prompt excluded")
    print("| path | per prompt | ratio |")
    print("|---|---|---|")
    print(f"| plain launcher (torch.multiprocessing) | {plain_per * 1e3:.0f} ms | 1.000 |")
    print(f"| Ray actors + driver | {ray_per * 1e3:.0f} ms | {ray_per / plain_per:.3f} |")
    print(f"\nlast decoded frame -> driver: median {statistics.median(latency) * 1e3:.1f} ms, "
          f"max {max(latency) * 1e3:.1f} ms")
    print(f"Ray start-up (place actors, rendezvous, load models): {startup:.1f} s; first prompt {first * 1e3:.0f} ms, "
          f"later prompts {ray_per * 1e3:.0f} ms (models stay loaded)")


if __name__ == "__main__":
    main()
