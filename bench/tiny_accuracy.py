"""Accuracy of the embedded model: every (color, shape, direction) of its vocabulary, generated through the real
path (Ray driver, Runner, streamed MP4) at SP=1 and SP=2, then read back from the MP4 by the analyzer.

Prints accuracy per attribute, per direction, the direction confusion table, whether SP=1 and SP=2 agree, the
time per clip, and the wall time of one `odyssey generate` command (Ray start included).

    python bench/tiny_accuracy.py [--seeds 1] [--weights pipeline/tiny/tiny.safetensors]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import load_config  # noqa: E402
from pipeline.request import GenerateRequest  # noqa: E402
from pipeline.tiny.analyze import analyze_file  # noqa: E402
from pipeline.tiny.data import DIRECTIONS, all_specs  # noqa: E402


def generate_all(sp: int, seeds: int, out: Path):
    import ray

    from cluster.driver import Driver, Job

    config = load_config("tiny", [f"parallel.ulysses_degree={sp}", "runtime.device=cpu"])
    specs = [(spec, seed) for seed in range(seeds) for spec in all_specs()]
    jobs = [Job(i, GenerateRequest(spec.caption(), seed=1000 + seed).resolve(config), out / f"sp{sp}-{i:03d}.mp4")
            for i, (spec, seed) in enumerate(specs)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        with Driver(config, progress=False) as driver:
            outcomes = driver.run(jobs)
    finally:
        ray.shutdown()
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    verdicts = [analyze_file(str(o.path)) for o in outcomes]
    return [s for s, _ in specs], verdicts, [o.result.timings["total_s"] for o in outcomes]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1, help="videos per (color, shape, direction)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {sp: generate_all(sp, args.seeds, tmp) for sp in (1, 2)}
        t0 = time.perf_counter()
        cmd = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "a red circle moving right",
                              "-o", str(tmp / "cli.mp4"), "--progress", "none"], capture_output=True, text=True)
        cli_s = time.perf_counter() - t0
        assert cmd.returncode == 0, cmd.stderr

    specs, verdicts, times = runs[1]
    n = len(specs)
    print(f"embedded model, {n} videos per layout ({args.seeds} seed(s) x 40 prompts 'a {{color}} {{shape}} moving "
          f"{{direction}}'), tiny preset, CPU, read back from the MP4s")
    print("| attribute | SP=1 | SP=2 |")
    print("|---|---|---|")
    for key in ("color", "shape", "direction"):
        cells = [sum(getattr(v, key) == getattr(s, key) for s, v in zip(runs[sp][0], runs[sp][1])) / n
                 for sp in (1, 2)]
        print(f"| {key} | {cells[0]:.1%} | {cells[1]:.1%} |")
    agree = sum(a == b for a, b in zip(runs[1][1], runs[2][1]))
    same = sum((a.color, a.shape, a.direction) == (b.color, b.shape, b.direction)
               for a, b in zip(runs[1][1], runs[2][1]))
    print(f"\nSP=1 and SP=2 give the same verdict (color, shape, direction) for {same}/{n} videos "
          f"(identical analyses: {agree}/{n})")
    print("\ndirection confusion at SP=1 (rows: asked, columns: seen)")
    names = list(DIRECTIONS) + ["none"]
    table = Counter((s.direction, v.direction) for s, v in zip(specs, verdicts))
    print("| asked \\ seen | " + " | ".join(names) + " | accuracy |")
    print("|---|" + "---|" * (len(names) + 1))
    for d in DIRECTIONS:
        row = [table[(d, seen)] for seen in names]
        print(f"| {d} | " + " | ".join(map(str, row)) + f" | {table[(d, d)] / sum(row):.0%} |")
    print(f"\ngeneration per clip (text + denoise + decode on the worker): median {statistics.median(times):.2f} s, "
          f"max {max(times):.2f} s")
    print(f"`odyssey generate \"a red circle moving right\"` wall time, Ray start included: {cli_s:.1f} s")


if __name__ == "__main__":
    main()
