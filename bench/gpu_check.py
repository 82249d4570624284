r"""One command that checks every CUDA path of Odyssey on one GPU (issue #10), sized to fit a short device lease.

    PYTHONPATH=. python bench/gpu_check.py [--quick] [--device cuda|cpu] [--json FILE] [--checks a,b]
                                           [--time-limit S]

Prints one markdown row per check (ok / FAIL / skipped with its reason, and the check's figures) and a summary line;
exits 1 when a check FAILs (skipped is not a failure). Each check runs on its own: one failure does not stop the
others, except a sticky CUDA error (illegal address, device-side assert), after which the remaining checks are
skipped as "CUDA context poisoned by <check>". Each check has a time limit (TIMEOUT_S, about 4-5x its H100
estimate; the whole run --time-limit, default 400 s): past it faulthandler prints every thread's stack and ends the
process, and the JSON's last row names the check that did not finish. Checks, in the order they run (the
single-process ones before anything starts NCCL):

1. local_attention  every backend that imports, bf16, vs an fp64 reference written out in the check (query chunks);
                    time per call at 32760 tokens x 12 heads x 128 (Wan2.1-1.3B at 480p).
2. wan_dit          WanDiT at the 1.3B shape (30 layers, random weights, bf16) on a 21x60x104 latent: time per
                    forward, peak memory, measured first; then diffusers' WanTransformer3DModel on the same weights
                    when it imports: rel. error after the first 2 layers (tight bound, catches a wrong kernel) and
                    after all 30 (loose: diffusers rounds the residual to bf16 per block, WanDiT keeps fp32).
3. vae_stream       WanVAEDecoder.decode_stream at 480p, 21 latent frames, random Wan2.1 VAE, fp32 with TF32 off:
                    first frame, total, peak memory; vs diffusers' AutoencoderKLWan.decode when it imports (max
                    level difference).
   step_cache       every sampling.cache policy on the 1.3B shape (random weights, bf16, guidance on, 20 steps,
                    half of 480p's tokens): computed steps, time vs cache off in the same run, rel. error of the final
                    latents (FAIL when not finite, or when steps were skipped but nothing changed).
4. ulysses_nccl     one-rank NCCL group: (a) validation and the P=1 path of ulysses_attention for every option
                    combination (with one rank it attends locally before any codec, so fp8/fused/chunked are not
                    exercised there); (c) the real SeqToHead/HeadToSeq all-to-alls, native and fp8, fused or not,
                    chunked, on NCCL; (b) the fp8 codec round trip on CUDA; (d) fuse_qkv="auto" planning returns.
   sharding         pipeline.sharding.shard_dit over the one-rank NCCL group on the 1.3B shape (bf16, 480p's 32760
                    tokens): FSDP2's all-gather streams, prefetch and reshard on CUDA; the forward (and forward_tokens)
                    vs the same model unsharded, time ratio, peak memory of both.
5. runner           the Runner on the device in bf16 (one rank, NCCL) on a small random Wan pipeline, 20 steps, vs the
                    same request on CPU in fp32 (PSNR of the frames), and again with a live preview after every
                    step (count, time vs without, the video unchanged); runner_embedded: the embedded model through
                    the Runner on the device, analyzer vs prompt for the 40 canonical prompts at seed 1000. Times
                    are of generate only (no process-group start-up or model load).
6. ray_generate     `odyssey generate` with runtime.device=cuda through one Ray actor holding the GPU (needs Ray).

`--quick` shrinks the sizes (GPU: about 2-3 min; CPU: tiny shapes in well under a minute, run by the tests so the
script cannot rot). `--device cpu` runs the same code with gloo instead of NCCL (flash skipped with its reason).

How to run it on the lent GPU machine (Python 3.12, torch 2.11 + CUDA 13, accelerate, transformers, tokenizers; no
Ray, no diffusers, no flash-attn, no network). The diffusers comparisons need diffusers 0.42 as a wheel (6.4 MB, pure
Python; its dependencies are all there); without it they are skipped with their reason and everything else runs.
Once, here, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1

Then one device call (the `run` tool) with carry [".whl"] and timeout_s 420 (a full run is sized for about 3-5
minutes on an H100; the JSON is rewritten after every check, so a run stopped at the limit keeps its rows):

    set -o pipefail; mkdir -p /tmp/site; if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q \
      --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; fi; export PYTHONPATH=.:/tmp/site \
      PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN TORCH_NCCL_ASYNC_ERROR_HANDLING=1; nvidia-smi -L; \
      python3 bench/gpu_check.py --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

If it stops at the limit, rerun only the missing rows with `--quick --checks name,...`; give the machine back
(give_back) when done. Paste the printed markdown table into docs/benchmarks.md's GPU section with the card's name.
The CPU rehearsal (what tests/test_gpu_check.py runs):

    PYTHONPATH=. python bench/gpu_check.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_attention_checks import check_local_attention, check_ulysses  # noqa: E402
from bench.gpu_common import CheckFailed, Ctx, Row, Skip, sizes_for  # noqa: E402
from bench.gpu_model_checks import (check_ray_generate, check_runner, check_runner_embedded,  # noqa: E402
                                    check_step_cache, check_vae, check_wan_dit)
from bench.gpu_sharding_checks import check_sharding  # noqa: E402

__all__ = ["CHECKS", "main", "run_check"]


# --------------------------------------------------------------------------------------------------------------
# Driver


# Order: the single-process checks first, then those that start NCCL (a hang there must not cost the figures
# above), the Runner's last.
CHECKS: dict[str, Callable[[Ctx, Row], None]] = {
    "local_attention": check_local_attention,
    "wan_dit": check_wan_dit,
    "vae_stream": check_vae,
    "step_cache": check_step_cache,
    "ulysses_nccl": check_ulysses,
    "sharding": check_sharding,
    "runner": check_runner,
    "runner_embedded": check_runner_embedded,
    "ray_generate": check_ray_generate,
}

# Seconds a check may run before faulthandler prints every thread's stack and ends the process: about 4-5x the
# H100 estimates (attention ~10 s, DiT ~60 s with diffusers, VAE ~30 s, Ulysses ~5 s, sharding ~25 s, Runner
# ~15 s, embedded ~60 s), so a hang (a stuck NCCL call, a wedged kernel) leaves a trace well inside the device
# call's limit instead of burning it. The whole run is also held to --time-limit (default 400 s, under the
# documented 420 s call).
TIMEOUT_S = {"local_attention": 50, "wan_dit": 240, "vae_stream": 150, "step_cache": 120, "ulysses_nccl": 30,
             "sharding": 120, "runner": 75, "runner_embedded": 240, "ray_generate": 320}
DEFAULT_TIMEOUT_S = 120

# A FAIL whose note says this leaves the CUDA context unusable (illegal address, device-side assert): every later
# CUDA call fails with the same error, so the checks after it are skipped rather than reported as failures.
STICKY = ("CUDA error", "AcceleratorError", "device-side assert", "illegal memory access")


def run_check(name: str, fn: Callable[[Ctx, Row], None], ctx: Ctx) -> Row:
    """One check, isolated: an exception is a FAIL row with its message, Skip a skipped row; memory is freed."""
    row = Row(name)
    t0 = time.perf_counter()
    try:
        fn(ctx, row)
    except Skip as e:
        row.status, row.note = "skipped", str(e)
    except CheckFailed as e:
        row.status, row.note = "FAIL", str(e)
    except Exception as e:  # a crash in a check is that check's failure, not the run's
        row.status, row.note = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        traceback.print_exc(file=sys.stderr)
    finally:
        cleanup(ctx.device)
    row.seconds = round(time.perf_counter() - t0, 1)
    return row


def cleanup(device: torch.device) -> None:
    """Destroy a group a check died inside and free its memory; after a sticky CUDA error these raise too, and
    that must not end the run (the rows after it say why they were skipped)."""
    import torch.distributed as dist

    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:
        print(f"gpu_check: destroying the process group: {type(e).__name__}: {e}", file=sys.stderr)
    if device.type == "cuda":
        gc.collect()  # a failed check's models may sit in reference cycles until collected
        try:
            torch.cuda.empty_cache()
        except Exception as e:
            print(f"gpu_check: emptying the CUDA cache: {type(e).__name__}: {e}", file=sys.stderr)


def poisons_cuda(row: Row) -> bool:
    return row.status == "FAIL" and any(s in row.note for s in STICKY)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def markdown(rows: list[Row]) -> str:
    lines = ["| check | status | s | figures |", "|---|---|---|---|"]
    for r in rows:
        status = r.status if not r.note else f"{r.status}: {r.note}"
        figures = "; ".join(f"{k} {v}" for k, v in r.figures.items() if v is not None)
        lines.append(f"| {r.name} | {status.replace('|', '/')} | {r.seconds} | {figures.replace('|', '/')} |")
    return "\n".join(lines)


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.status == "FAIL" for r in rows) else 0


def main(argv: list[str] | None = None, checks: dict[str, Callable] = CHECKS) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (GPU ~3 min; CPU well under a minute)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every row (and the device) as JSON")
    parser.add_argument("--checks", help=f"comma-separated subset of: {', '.join(checks)}")
    parser.add_argument("--time-limit", type=float, default=400.0, metavar="S",
                        help="end the run with every thread's stack printed after S seconds in all (default 400); "
                             "each check has its own, shorter limit too")
    args = parser.parse_args(argv)
    names = list(checks) if not args.checks else [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in checks]
    if unknown:
        print(f"gpu_check: unknown check(s) {', '.join(unknown)}; known: {', '.join(checks)}", file=sys.stderr)
        return 2
    if not args.time_limit > 0:
        print(f"gpu_check: --time-limit must be positive, got {args.time_limit}", file=sys.stderr)
        return 2
    if args.json and not args.json.resolve().parent.is_dir():
        print(f"gpu_check: --json {args.json}: folder {args.json.resolve().parent} does not exist", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no GPU (use --device cpu for the CPU rehearsal)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the CPU run checks code paths, not speed; more threads on a busy shared CPU oversubscribe badly
        torch.set_num_threads(1)
    where = describe_device(device)
    print(f"gpu_check on {where}{' (--quick)' if args.quick else ''}", flush=True)
    rows: list[Row] = []
    t0 = time.perf_counter()
    poisoned_by = None
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for name in names:
            limit = min(TIMEOUT_S.get(name, DEFAULT_TIMEOUT_S), args.time_limit - (time.perf_counter() - t0))
            if poisoned_by is not None:
                rows.append(Row(name, "skipped", f"CUDA context poisoned by {poisoned_by}"))
            elif limit < 1:
                rows.append(Row(name, "skipped", f"the run's --time-limit of {args.time_limit:g} s is spent"))
            else:
                workdir = Path(tmp) / name
                workdir.mkdir()
                ctx = Ctx(device, args.quick, sizes_for(device, args.quick), workdir)
                if args.json:  # what a run ended by a limit (ours or the lease's) says about the check it was in
                    write_json(args.json, where, args.quick, time.perf_counter() - t0, rows + [Row(
                        name, "FAIL", f"did not finish: ran past {limit:.0f} s or the process died")])
                # a hang (NCCL, a wedged kernel) prints every thread's stack and ends the process
                faulthandler.dump_traceback_later(limit, exit=True)
                try:
                    rows.append(run_check(name, checks[name], ctx))
                finally:
                    faulthandler.cancel_dump_traceback_later()
                if poisons_cuda(rows[-1]):
                    poisoned_by = name
            r = rows[-1]
            print(f"  {r.name}: {r.status}{' (' + r.note + ')' if r.note else ''} in {r.seconds} s; {r.figures}",
                  flush=True)
            if args.json:  # after every check: a run stopped at the lease's limit keeps what it measured
                write_json(args.json, where, args.quick, time.perf_counter() - t0, rows)
    total = time.perf_counter() - t0
    count = {s: sum(r.status == s for r in rows) for s in ("ok", "FAIL", "skipped")}
    print()
    print(markdown(rows))
    print(f"\nsummary: {count['ok']} ok, {count['FAIL']} FAIL, {count['skipped']} skipped in {total:.0f} s on {where}")
    if args.json:
        write_json(args.json, where, args.quick, total, rows)
    return exit_code(rows)


def write_json(path: Path, where: str, quick: bool, seconds: float, rows: list[Row]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"device": where, "quick": quick, "seconds": round(seconds, 1),
                               "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
