"""Ray orchestration overhead, measured side by side in one run:

- the same batch (N prompts, one SP=2 replica on CPU, MP4s written as frames arrive) through the Ray driver vs the
  plain torch.multiprocessing launcher: time per prompt and the ratio;
- time from the last decoded frame leaving the worker to its arrival at the driver;
- first vs second prompt latency with the models already loaded, and the one-off start-up (actors + load).

    python bench/orchestration.py [--prompts 6] [--steps 10] [--size 64] [--frames 17]
"""

from __future__ import annotations

import argparse
import statistics
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    args = parser.parse_args()
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
