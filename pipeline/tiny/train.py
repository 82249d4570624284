"""Train the embedded model on a CPU: the chunk autoencoder first, then the WanDiT and the text encoder together
by flow matching on its latents. Seeded; prints progress; checks colour and direction accuracy as it goes and
keeps the best weights.

    python -m pipeline.tiny.train                     # writes pipeline/tiny/tiny.safetensors
    python -m pipeline.tiny.train --minutes 10 --out /tmp/tiny.safetensors

Legend: B clips, T latent frames, z latent channels, s latent side, L text tokens.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..dit import WanDiT
from ..runner import guided_velocity
from ..samplers import make_sampler
from . import WEIGHTS
from .analyze import analyze_frames
from .data import FRAMES, SIZE, all_specs, sample_batch, vocabulary
from .model import ChunkDecoder, ChunkEncoder, TinyDecoder, TinySpec, TinyTextEncoder, frames_to_chunks


def log(start: float, text: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)


def train_autoencoder(spec: TinySpec, rng, steps: int, batch: int, start: float):
    enc, dec = ChunkEncoder(spec.z_dim), ChunkDecoder(spec.z_dim)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in range(1, steps + 1):
        clips, _, _ = sample_batch(rng, batch, FRAMES, SIZE)
        x = frames_to_chunks(torch.from_numpy(clips)).flatten(0, 1)  # (B*T) 12 S S
        z = enc(x)
        # A little latent noise makes the decoder forgiving of the DiT's small errors.
        recon = dec(z + 0.05 * z.detach().std() * torch.randn_like(z))
        loss = F.mse_loss(recon, x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps:
            log(start, f"autoencoder step {step}/{steps}: mse {F.mse_loss(recon, x).item():.5f}")
    return enc.eval(), dec.eval()


@torch.no_grad()
def encode_pool(enc, rng, n: int):
    """n clips -> raw latents [n, z, T, s, s] and their specs."""
    latents, specs = [], []
    for i in range(0, n, 64):
        clips, _, chosen = sample_batch(rng, min(64, n - i), FRAMES, SIZE)
        chunks = frames_to_chunks(torch.from_numpy(clips))
        B, T = chunks.shape[:2]
        latents.append(enc(chunks.flatten(0, 1)).unflatten(0, (B, T)).transpose(1, 2))
        specs += chosen
    return torch.cat(latents), specs


@torch.no_grad()
def sample(dit, text, decoder, prompts, seeds, steps=20, guidance=4.0, shift=2.0, sampler="unipc"):
    """Videos [N, F, S, S, 3] for prompts: the Runner's sampling loop in one process."""
    shape = (1, decoder.latents_mean.shape[1], (FRAMES - 1) // 4 + 1, SIZE // 4, SIZE // 4)
    grid = dit.grid(shape)
    cond, uncond = text.encode(prompts), text.encode([""])
    videos = []
    for i, seed in enumerate(seeds):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        x = dit.patchify(noise)
        s = make_sampler(sampler, steps, shift)
        for k, t in enumerate(s.timesteps.tolist()):
            v = guided_velocity(dit, x, grid, torch.tensor([float(t)]), cond[i : i + 1], uncond, guidance)
            x = s.step(k, v, x)
        videos.append(np.stack(list(decoder.decode_stream(dit.unpatchify(x, grid)))))
    return videos


def evaluate(dit, text, decoder, seed: int = 0, n_specs: int = 40, **kw) -> dict:
    specs = all_specs()[:: max(1, len(all_specs()) // n_specs)]
    videos = sample(dit, text, decoder, [s.caption() for s in specs], [seed + i for i in range(len(specs))], **kw)
    verdicts = [analyze_frames(v) for v in videos]
    return {key: sum(getattr(v, key) == getattr(s, key) for v, s in zip(verdicts, specs)) / len(specs)
            for key in ("color", "shape", "direction")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ae-steps", type=int, default=1200)
    parser.add_argument("--ae-batch", type=int, default=16, help="clips per autoencoder step (x5 chunks)")
    parser.add_argument("--dit-steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=4000, help="pre-encoded clips the DiT trains on")
    parser.add_argument("--minutes", type=float, default=55.0, help="stop the DiT stage when this much time is used")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-specs", type=int, default=40, help="prompts per evaluation (40 = all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    spec = TinySpec(vocab=tuple(vocabulary()))

    enc, dec = train_autoencoder(spec, rng, args.ae_steps, args.ae_batch, start)
    raw, pool_specs = encode_pool(enc, rng, args.pool)
    mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4))
    spec = replace(spec, latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))
    pool = (raw - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    decoder = TinyDecoder(spec)
    decoder.net.load_state_dict(dec.state_dict())
    decoder.eval()
    log(start, f"latent pool {tuple(pool.shape)} encoded; per-channel std {std.numpy().round(3)}")

    dit, text = WanDiT(spec.dit_config()), TinyTextEncoder(spec)
    params = [*dit.parameters(), *text.parameters()]
    log(start, f"DiT {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M params, text encoder "
               f"{sum(p.numel() for p in text.parameters()) / 1e6:.2f}M")
    ema_dit, ema_text = copy.deepcopy(dit).eval(), copy.deepcopy(text).eval()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    warmup, total = 200, args.dit_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k, total) / total))))
    grid = dit.grid((1, spec.z_dim, *pool.shape[2:]))
    best, best_state = -1.0, None
    deadline = start + args.minutes * 60
    for step in range(1, total + 1):
        idx = torch.from_numpy(rng.integers(0, len(pool), args.batch))
        x0 = dit.patchify(pool[idx])
        captions = [pool_specs[i].caption(int(rng.integers(0, 1000)), int(rng.integers(0, 1000)))
                    if rng.random() > 0.1 else "" for i in idx.tolist()]
        sigma = torch.sigmoid(torch.randn(args.batch)).view(-1, 1, 1)
        eps = torch.randn_like(x0)
        xt = (1 - sigma) * x0 + sigma * eps
        ctx = text(*text.tokenize(captions))
        v = dit.forward_tokens(xt, grid, sigma.view(-1) * 1000, ctx)
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for ema, live in ((ema_dit, dit), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        if step % 100 == 0:
            log(start, f"DiT step {step}/{total}: loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}")
        last = step == total or time.perf_counter() > deadline
        if step % args.eval_every == 0 or last:
            acc = evaluate(ema_dit, ema_text, decoder, n_specs=args.eval_specs)
            score = acc["color"] + acc["direction"] + 0.5 * acc["shape"]
            log(start, f"eval at step {step}: color {acc['color']:.0%} shape {acc['shape']:.0%} "
                       f"direction {acc['direction']:.0%}")
            if score > best:
                best = score
                best_state = {**{f"dit.{k}": v.clone() for k, v in ema_dit.state_dict().items()},
                              **{f"text.{k}": v.clone() for k, v in ema_text.state_dict().items()},
                              **{f"decoder.{k}": v.clone() for k, v in decoder.state_dict().items()}}
                save(best_state, spec, args.out)
                log(start, f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
        if last:
            break
    log(start, "done")


def save(state: dict, spec: TinySpec, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"spec": spec.to_json()})


if __name__ == "__main__":
    main()
