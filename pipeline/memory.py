"""How much GPU memory one rank needs, known before anything is loaded, and a refusal naming what would fit.

Nothing here reads weights: parameter bytes come from the real modules built on the meta device (WanDiT, the
Wan VAE decoder, transformers' UMT5EncoderModel) from the folder's config.json / safetensors headers, or from
the published shapes when the folder is not there. A two-expert model (Wan2.2 T2V-A14B) keeps both DiTs resident
(model.offload_idle_expert on a GPU: one, the other parked in CPU memory), both sharded with
parallel.shard_weights (one expert's blocks gathered at a time: the experts never run together). Activation peaks come from running the real code on meta
tensors under LiveBytes, which adds up the bytes of every tensor alive at once (what a tracemalloc would see):
    - DiT: one forward_tokens at the request's tokens per rank, L = ceil(S / (ring x ulysses)). Attention runs as
      flash / memory-efficient kernels do (output and log-sum-exp only, no S x S scores) when one can run
      (fused_attention_available), else as torch's math SDPA and the reference backend do: q, k, v upcast to
      fp32 and two fp32 [h, S, S] score / probability matrices alive at once (attention_backend=reference, or
      bf16 on a card before Ampere: the reason dtype=auto picks fp16 there). The Ulysses
      all-to-alls allocate the buffers attention/comm.py allocates (fused Q/K/V, native wire: send, receive and
      the decoded [S, h, D] tensors). Blocks are identical, so two are traced for forty. Measured this way in
      bf16, per token of a rank: 14B (C 5120, F 13824) 134 kB alone, 155 kB under Ulysses (the all-to-all
      buffers); 1.3B (C 1536, F 8960) 52 kB: the fp32 residual stream and its fp32 normalised / modulated
      copies, the FFN's [L, F] input and GELU output, q / k / v and the rope's fp32 temporaries. 14B at 480p
      (32,760 tokens): 4.1 GiB on one GPU, 0.59 GiB per rank on eight.
    - VAE decode (rank 0): a 32 x 32 latent (one 256-pixel tile) through three streamed chunks (from the third
      on every causal cache holds its 2 frames), scaled by area: every conv activation and cache scales with the
      pixels it covers. Untiled: the whole frame; tiled: every tile's cache (tile_cache_factor x the untiled
      cache) plus one tile's activations. fp32 at 720p: 19.4 GiB untiled, 14.4 tiled; 480p: 8.4, 6.7.
    - Split decode (parallel.vae_parallel, a replica of several ranks, no tiling): every rank holds the VAE and
      decodes the tallest band of rows plus its 2 halo rows, with the gathered mid-block keys and values.
    - Step cache (sampling.cache): step_cache.cache_buffers, alive next to the DiT's activations, freed before
      the decode (an upper bound; 14B at 720p on one GPU with guidance: 5.8 GiB teacache, 11.5 the others).
    - Live previews (sampling.preview_every > 0), on the ranks of rank 0's SP group, after a step's velocity (the
      DiT's activations are freed by then, so the larger of the two counts): the fp32 clean-video estimate of this
      rank's tokens and its all-gathered whole sequence, and on rank 0 the unpatchified copy. 1.3B at 720p on one rank: 39 MB.
    - Sharded weights (parallel.shard_weights): every rank keeps ceil(rows / ranks) rows of each block parameter
      (FSDP2 allocates that padded shard on every rank) and the parameters outside the blocks whole; while block i
      runs, three blocks are whole next to its activations: block i's unsharded parameters, block i's all-gather
      output (FSDP2 frees it only at block i+1's copy-out) and block i+1's, prefetched (measured: 3.00 blocks on
      gloo at 2 ranks, 3.07 on an H200 at a fake 8 ranks). 14B in bf16: 27.0 GiB whole; on 8 ranks 4.05 GiB each
      (0.78 outside the blocks + 3.27 of block shards) and 1.96 GiB gathered. model.shard_text_encoder: every rank
      keeps ceil(V / ranks) rows of the token embedding (split by vocabulary, never gathered: one all_reduce of
      the looked-up rows) and its shards of the blocks (umt5-xxl: 10.6 GiB whole, 1.33 on 8 ranks) and, while
      encoding, three blocks whole (0.97 GiB) and the all_reduce's [2, 512, 4096] buffer.
Assumptions: batch 1, the size is config.video (Runner.generate checks each request's own size against the
free memory it measured before loading: check_request), the text encoder encodes two prompts of 512 tokens.
Then the allocator's share: activation peaks x 1.1 (fragmentation) and RESERVE_BYTES (NCCL buffers, cuBLAS
workspaces, the sampler's state, rope tables). The CUDA context is not counted: free memory is measured after it.
Free memory can be low for a while after a replica is rebuilt (the killed rank's process may still hold its
memory): check_fits refuses (ValueError, a config problem) only what exceeds the card's total less CONTEXT_BYTES,
and wait_until_fits polls up to FREE_WAIT_S for the rest before a retryable MemoryBusy (a RuntimeError).

Known limits, not built:
    - Tiled decode keeps every tile's causal cache for the whole decode (tile_cache_factor x the untiled cache,
      13.4 GiB at 720p in fp32). A per-tile-outer, time-inner mode (each tile decoded over all its frames, then
      blended, as diffusers' tiled_decode does) would need one tile's cache only, ~2 GiB at 720p, but gives up
      streaming frames in order: not built.
    - RESERVE_BYTES is a fixed 1 GiB, and NCCL allocates its sub-communicators' buffers lazily, at the first
      collective of each group, after this check: on a card filled to the brim they can still run it out.
    - Only the fused-Q/K/V, native-wire Ulysses buffers are traced; the other wire options (separate Q/K/V,
      fp8_comm, head_chunks) allocate less, so the estimate is an upper bound for them.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from configs import OdysseyConfig

from .components import TEXT_ENCODER_DTYPE, encoder_placement, resolve_dtype
from .dit import WanDiT, WanDiTConfig
from .step_cache import cache_buffers
from .vae import tile_cache_factor
from .vae_parallel import splits_decode

__all__ = ["MemoryEstimate", "vae_spec", "estimate_rank_memory", "replica_estimates", "check_fits", "check_request",
           "fit_decision", "wait_until_fits", "MemoryBusy", "fused_attention_available", "LiveBytes",
           "dit_activation_bytes", "vae_decode_bytes", "WAN21_1_3B", "WAN21_14B", "WAN22_A14B_EXPERT", "WAN22_TI2V_5B",
           "GiB"]

GiB = 2**30
RESERVE_BYTES = 1 * GiB
FRAGMENTATION = 1.1
CONTEXT_BYTES = GiB // 2  # what no process gets of a card's total: our own CUDA context (~0.5 GiB with CUDA 12)
FREE_WAIT_S = 60.0  # how long a rank waits for memory another process still holds (a replaced rank exiting)
POLL_S = 2.0

WAN21_1_3B = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN21_14B = WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN22_A14B_EXPERT = WAN21_14B  # each of T2V-A14B's two experts (upstream wan/configs/wan_t2v_A14B.py)
WAN22_TI2V_5B = WanDiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)


# -- measuring on meta tensors ----------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors created inside it while they are alive (storages shared by views count
    once); .peak is the most alive at once. Works on real and meta tensors alike."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                if key not in self._refs:
                    self._refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._refs[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


def fused_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA on `device` can run a fused kernel (flash or memory-efficient: no S x S scores) for `dtype`,
    per torch's rules (sdp_utils): flash needs sm80+, memory-efficient sm50+ and bf16 only from sm80. Otherwise
    it falls back to the math kernel. A CPU has torch's flash kernel; a "cuda" device in a process without CUDA
    (an offline report) is assumed to be a card with fused kernels."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    capability = torch.cuda.get_device_capability(device)
    if capability >= (8, 0):
        return True
    return capability >= (5, 0) and dtype in (torch.float16, torch.float32)


class _FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention ([B, H, S, D]) as it allocates on the GPU. fused: as flash / memory-efficient
    kernels do, the output and an fp32 log-sum-exp, never the [S, T] scores (which meta tensors would otherwise
    materialise). Not fused: as torch's math kernel (which upcasts fp16 / bf16 to fp32) and the reference
    backend do: fp32 q, k, v, then scores and probabilities, both [H, S, T] fp32, alive at once."""

    def __init__(self, fused: bool = True):
        super().__init__()
        self.fused = fused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            if not self.fused:
                q32, k32, v32 = (t.to(torch.float32) for t in (q, k, v))
                probs = torch.softmax(q32 @ k32.transpose(-1, -2), dim=-1)
                return (probs @ v32).to(q.dtype)
            torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # log-sum-exp, freed on return
            return q.new_empty((*q.shape[:-1], v.shape[-1]))
        return func(*args, **(kwargs or {}))


def _sdpa_BSHD(q_BSHD, k_BSHD, v_BSHD) -> torch.Tensor:
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))).transpose(1, 2)


class _UlyssesBuffers:
    """A TokenLayout for rank 0 of P that allocates what UlyssesLayout + attention/comm.py allocate (fused Q/K/V
    on a native wire), with no communication: shapes and lifetimes only. With a ring of R > 1 the attention is
    attention/ring.py's ring_pass over the gathered ring block: its own and the incoming K/V blocks, the fp32
    running output and LSE, each block's partial output and the merge's fp32 temporaries."""

    def __init__(self, world: int, heads: int, ring: int = 1):
        self.world, self.heads, self.ring = world, heads, ring
        self.mine = heads // world + (1 if heads % world else 0)  # rank 0 owns the most heads

    def shard(self, x_BS: torch.Tensor) -> torch.Tensor:
        L = -(-x_BS.shape[1] // (self.ring * self.world))
        return x_BS.new_empty((x_BS.shape[0], L, *x_BS.shape[2:]))

    def gather(self, x_BL: torch.Tensor, seq_len: int) -> torch.Tensor:
        return x_BL.new_empty((x_BL.shape[0], seq_len, *x_BL.shape[2:]))

    def _ring(self, q_BSHD, k_BSHD, v_BSHD) -> torch.Tensor:
        B, S, h, D = q_BSHD.shape
        kv, incoming = (q_BSHD.new_empty((2, B, S, h, D)) for _ in range(2))
        acc = q_BSHD.new_empty((B, S, h, D), dtype=torch.float32)
        lse = q_BSHD.new_empty((B, S, h), dtype=torch.float32)
        part = _sdpa_BSHD(q_BSHD, k_BSHD, v_BSHD)  # a block's partial output (its LSE is freed with it)
        part_lse = q_BSHD.new_empty((B, h, S), dtype=torch.float32)
        diff, weighted = (q_BSHD.new_empty((B, S, h, D), dtype=torch.float32) for _ in range(2))
        del diff, weighted, part, part_lse, kv, incoming, lse
        out = acc.to(q_BSHD.dtype)
        return out

    def attend(self, q_BLHD, k_BLHD, v_BLHD, seq_len: int, layer: int) -> torch.Tensor:
        attention = _sdpa_BSHD if self.ring == 1 else self._ring
        if self.world == 1:
            return attention(q_BLHD, k_BLHD, v_BLHD)
        B, L, H, D = q_BLHD.shape
        S, h = L * self.world, self.mine
        send = q_BLHD.new_empty((3 * B * L * H, D))
        recv = q_BLHD.new_empty((3 * B * S * h, D))
        q, k, v = (q_BLHD.new_empty((B, S, h, D)) for _ in range(3))  # decoded contiguous copies
        del send, recv
        out = attention(q, k, v)
        del q, k, v
        send = out.new_empty((B * S * h, D))
        del out
        result = q_BLHD.new_empty((B, L, H, D))
        del send
        return result


@functools.lru_cache(maxsize=32)
@torch.no_grad()
def dit_activation_bytes(cfg: WanDiTConfig, grid: tuple[int, int, int], ulysses_degree: int,
                         dtype: torch.dtype, fused: bool = True, ring_degree: int = 1) -> int:
    """Peak bytes alive during one forward_tokens of rank 0 (the rank with the most heads) at this token grid;
    fused=False: attention materialises its fp32 scores (see _FusedAttention)."""
    # Blocks are identical and hand on only the residual stream: two of them peak like forty.
    with torch.device("meta"):
        dit = WanDiT(replace(cfg, num_layers=min(cfg.num_layers, 2))).to_compute_dtype(dtype)
    dit.layout = _UlyssesBuffers(ulysses_degree, cfg.num_heads, ring_degree)
    S = math.prod(grid)
    x_BLP = torch.empty((1, -(-S // (ring_degree * ulysses_degree)), cfg.patch_dim), device="meta")
    ctx = torch.empty((1, cfg.text_len, cfg.text_dim), device="meta")
    with _FusedAttention(fused), LiveBytes() as live:
        dit.forward_tokens(x_BLP, grid, torch.ones(1, device="meta"), ctx)
    return live.peak


@functools.lru_cache(maxsize=8)
@torch.no_grad()
def _vae_per_pixel(spec) -> tuple[float, float]:
    """(cache bytes, peak bytes including the caches) per latent pixel of the fp32 streaming decoder, from three
    chunks of a 32 x 32 latent (after two chunks every cache holds its frames: the third is the steady state)."""
    from .vae import Cache, WanVAEDecoder

    with torch.device("meta"):
        decoder = WanVAEDecoder(spec)
    side = 32
    z = torch.empty((1, spec.z_dim, 1, side, side), device="meta")
    cache = Cache()
    with _FusedAttention(), LiveBytes() as live:
        for _ in range(3):
            decoder._decode_chunk(z, cache)
    cache_bytes = sum(v.numel() * v.element_size() for v in cache.values() if isinstance(v, torch.Tensor))
    return cache_bytes / side**2, live.peak / side**2


def vae_decode_bytes(spec, h: int, w: int, tiling: bool, tile_min: int = 256, tile_stride: int = 192) -> int:
    """Peak bytes of decode_stream for h x w latents beyond the decoder's weights: caches + one chunk's peak."""
    cache_px, peak_px = _vae_per_pixel(spec)
    s = spec.spatial_stride
    tile, stride = tile_min // s, tile_stride // s
    if not tiling or (h * s <= tile_min and w * s <= tile_min):
        return int(peak_px * h * w)
    tiles = len(range(0, h, stride)) * len(range(0, w, stride))
    outputs = tiles * 3 * 4 * tile_min**2 * 4  # every tile's 4 fp32 RGB frames of the chunk, kept for blending
    caches = cache_px * h * w * tile_cache_factor(h, w, tile, stride)
    return int(caches + (peak_px - cache_px) * tile * tile + outputs)


# -- what the model folder says ---------------------------------------------------------------------------------


def _meta_bytes(module: torch.nn.Module, dtype_of) -> int:
    return sum(p.numel() * dtype_of(name).itemsize for name, p in module.named_parameters())


@functools.lru_cache(maxsize=8)
def _dit_param_bytes(cfg: WanDiTConfig, dtype: torch.dtype) -> int:
    """As load_dit keeps them: matmul weights in the compute dtype, WanDiT.FP32_PARAMS in float32."""
    with torch.device("meta"):
        dit = WanDiT(cfg)
    return _meta_bytes(dit, lambda name: torch.float32 if WanDiT.keeps_fp32(name) else dtype)


# -- sharded weights (parallel.shard_weights, model.shard_text_encoder) -------------------------------------------

_LAYER = re.compile(r"(?:^|\.)(?:blocks|block|layers)\.(\d+)\.")  # WanDiT, transformers' UMT5, Wan's T5, tiny
_EMBEDDING = re.compile(r"^(?:shared|encoder\.embed_tokens|token_embedding)\.")  # umt5's tied token embedding


def _shard_bytes(shape: tuple[int, ...], itemsize: int, world: int) -> int:
    """Bytes FSDP2 keeps of one parameter on each of `world` ranks: ceil(rows / world) rows of dim 0. Every rank
    allocates that padded shard, the last ranks too when their rows run out (their local view is shorter)."""
    if not shape:
        return itemsize
    return -(-shape[0] // world) * math.prod(shape[1:]) * itemsize


def _sharded(named, itemsize_of, unit_of, world: int) -> tuple[int, int]:
    """(bytes each rank keeps, bytes gathered at once) of a model sharded as pipeline.sharding does: unit_of(name)
    -> the FSDP unit holding the parameter (units run in sorted order), None for one left whole on every rank, -1
    for rows split over the ranks and never gathered (umt5's VocabParallelEmbedding: ceil(rows / world) rows).
    While unit i runs, FSDP2 at 2+ ranks holds three whole units: unit i's unsharded parameters, unit i's
    all-gather output (kept in the all-gather state until unit i+1's copy-out frees it) and unit i+1's prefetched
    all-gather output (measured: 3.00 blocks on gloo at 2 ranks, 3.07 on an H200 at a fake 8 ranks). At 1 rank
    there is no gather: the shard is copied into the unsharded parameters, one unit at a time."""
    whole = 0
    shards: dict[int, int] = {}
    for name, shape in named:
        unit, itemsize = unit_of(name), itemsize_of(name)
        if unit is None:
            whole += math.prod(shape) * itemsize
        elif unit < 0:
            whole += _shard_bytes(shape, itemsize, world)
        else:
            shards[unit] = shards.get(unit, 0) + _shard_bytes(shape, itemsize, world)
    order = [world * shards[u] for u in sorted(shards)]
    held = 1 if world == 1 else 3
    windows = [sum(order[i:i + held]) for i in range(max(1, len(order) - held + 1))]
    return whole + sum(shards.values()), max(windows, default=0)


def _layer(name: str) -> int | None:
    m = _LAYER.search(name)
    return None if m is None else int(m.group(1))


@functools.lru_cache(maxsize=16)
def _dit_sharded(cfg: WanDiTConfig, dtype: torch.dtype, world: int) -> tuple[int, int]:
    """(bytes each rank keeps, bytes gathered at once) with parallel.shard_weights: each block one FSDP unit, the
    rest (patch, text and time embeddings, head: 0.84 GB of 14B's 29 GB) whole on every rank."""
    with torch.device("meta"):
        dit = WanDiT(cfg)
    return _sharded([(n, tuple(p.shape)) for n, p in dit.named_parameters()],
                    lambda n: (torch.float32 if WanDiT.keeps_fp32(n) else dtype).itemsize, _layer, world)


def _text_sharded(path: Path | None, itemsize: int, world: int, text_len: int, d_model: int) -> tuple[int, int]:
    """(bytes each rank keeps, bytes of the encode-phase transient) with model.shard_text_encoder: the token
    embedding (2 GiB of umt5-xxl's 10.6) split by vocabulary rows (ceil(V / world) rows resident, never gathered),
    each block one FSDP unit (three whole at once, see _sharded), the final norm whole. The transient adds the
    embedding lookup's all_reduce buffer: two prompts' [text_len, d_model] rows."""
    resident, gather = _sharded(_text_encoder_named(path)[0], lambda n: itemsize,
                                lambda n: -1 if _EMBEDDING.match(n) else _layer(n), world)
    return resident, gather + 2 * text_len * d_model * itemsize


def _dit_config(path: Path | None) -> WanDiTConfig:
    if path is None:
        return _tiny_spec().dit_config()
    if not path.exists():
        return _known_by_name(path)
    from .weights import read_dit_headers

    return read_dit_headers(path)[1]


# (name pattern, the DiT's shapes, experts), first match wins: "a14b" before "14b"
_KNOWN = ((r"a14b", WAN22_A14B_EXPERT, 2), (r"(?<![\d.])5b", WAN22_TI2V_5B, 1), (r"14b", WAN21_14B, 1),
          (r"1[._-]?3b", WAN21_1_3B, 1))


def _known_by_name(path: Path) -> WanDiTConfig:
    return _known_model(path)[0]


def _known_model(path: Path) -> tuple[WanDiTConfig, int]:
    """(DiT shapes, experts) of a model folder that is not here, from its name (Wan2.1-T2V-14B, Wan2.2-T2V-A14B...)."""
    name = path.name.lower()
    for tag, cfg, experts in _KNOWN:
        if re.search(tag, name):
            return cfg, experts
    raise ValueError(f"model.path {path} does not exist (and its name says no Wan model, Wan2.1 1.3B or 14B, Wan2.2 "
                     f"A14B or 5B, whose memory could be estimated without it)")


def _dit_experts(path: Path | None) -> int:
    """The DiTs of the model at path: 2 for a two-expert model (Wan2.2 T2V-A14B), else 1."""
    if path is None:
        return 1
    if not path.exists():
        return _known_model(path)[1]
    from .weights import dit_folders

    return len(dit_folders(path))


def _tiny_spec():
    from safetensors import safe_open

    from .tiny import WEIGHTS
    from .tiny.model import TinySpec

    with safe_open(str(WEIGHTS), framework="pt") as f:
        return TinySpec.from_json(f.metadata()["spec"])


@functools.lru_cache(maxsize=8)  # read once per process: Runner.generate estimates every request
def _text_encoder_named(path: Path | None) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], dict]:
    """(name, shape) of every parameter (tied embeddings once), and the UMT5 dims."""
    if path is None:
        from safetensors import safe_open

        from .tiny import WEIGHTS

        with safe_open(str(WEIGHTS), framework="pt") as f:
            return tuple((k, tuple(f.get_slice(k).get_shape())) for k in f.keys() if k.startswith("text.")), {}
    from transformers import UMT5Config, UMT5EncoderModel

    from .text_encoder import ORIGINAL_T5_FILE

    if (path / "text_encoder" / "config.json").is_file():
        cfg = UMT5Config.from_json_file(path / "text_encoder" / "config.json")
    elif (path / ORIGINAL_T5_FILE).is_file():  # memory-mapped: only the pickle's metadata is read
        state = torch.load(path / ORIGINAL_T5_FILE, map_location="cpu", weights_only=True, mmap=True)
        dims = {"d_model": state["token_embedding.weight"].shape[1], "d_ff": state["blocks.0.ffn.fc1.weight"].shape[0],
                "num_heads": state["blocks.0.pos_embedding.embedding.weight"].shape[1]}
        return tuple((k, tuple(t.shape)) for k, t in state.items()), dims
    else:
        cfg = UMT5Config(**UMT5_XXL)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    named = tuple((k, tuple(p.shape)) for k, p in model.named_parameters())
    return named, {k: getattr(cfg, k) for k in ("d_model", "d_ff", "num_heads")}


def _text_encoder_shape(path: Path | None) -> tuple[int, dict]:
    """(parameter count with tied embeddings once, UMT5 dims for the activations; {} for the embedded model)."""
    named, dims = _text_encoder_named(path)
    return sum(math.prod(shape) for _, shape in named), dims


def _text_encode_activations(dims: dict, text_len: int) -> int:
    """Two prompts through transformers' eager UMT5 attention: bf16 scores and probabilities plus the fp32
    position bias per head, and the gated FFN's three [T, d_ff] tensors."""
    if not dims:
        return 0
    N, T = 2, text_len
    return N * dims["num_heads"] * T * T * (4 + 2 * 2) + N * T * (3 * dims["d_ff"] + 6 * dims["d_model"]) * 2


@functools.lru_cache(maxsize=8)
def vae_spec(path: Path | None):
    """The VAE structure of a model folder (headers only, cached), or of the model a folder not here is named for."""
    from .vae import WAN22_VAE_CONFIG, DecoderSpec

    if path is None or not path.exists():
        try:  # a folder not downloaded yet: its name says the model, a 48-channel DiT (TI2V-5B) the Wan2.2 VAE
            wan22 = path is not None and _known_model(path)[0].in_dim == 48
        except ValueError:
            wan22 = False
        return DecoderSpec.from_diffusers_config(WAN22_VAE_CONFIG) if wan22 else DecoderSpec()
    from .vae_weights import read_vae_spec

    return read_vae_spec(path)


# -- the estimate -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs on its GPU. Rank 0 goes through three phases (encode, denoise, decode); the weights
    it keeps are there in all three, the rest only in its own phase."""

    rank: int
    dit_params: int
    text_encoder: int  # the encoder's weights on this GPU (0 when it lives and runs on the CPU)
    text_encoder_resident: bool  # True: on the GPU all the time; False: only while encoding (offload)
    vae_params: int
    dit_activations: int
    vae_decode: int  # caches + the peak of one latent chunk
    text_activations: int = 0  # encoding on this GPU
    step_cache: int = 0  # residuals a step cache keeps between denoising steps (freed before the decode)
    preview: int = 0  # a live preview's fp32 x0 (this rank's, gathered, unpatchified), after the DiT's forward
    reserve: int = RESERVE_BYTES
    dit_gather: int = 0  # parallel.shard_weights: three blocks whole at once (see _sharded), while denoising
    text_gather: int = 0  # model.shard_text_encoder: three umt5 blocks whole + the embedding's all_reduce (encode)
    dit_experts: int = 1  # the DiTs dit_params holds (2: both experts of Wan2.2 T2V-A14B on this GPU)

    @property
    def total(self) -> int:
        resident = self.dit_params + self.vae_params + self.reserve
        resident += self.text_encoder if self.text_encoder_resident else 0
        encode = (0 if self.text_encoder_resident else self.text_encoder) + self.text_activations + self.text_gather
        # a block's gathered weights are freed after it runs: gone by the time a preview is computed
        denoise = self.step_cache + max(self.dit_activations + self.dit_gather, self.preview)
        return resident + max(encode, denoise, self.vae_decode)

    def summary(self) -> str:
        parts = [("DiT" + (" x2" if self.dit_experts == 2 else "") + (" shard" if self.dit_gather else ""),
                  self.dit_params),
                 ("T5" + (" shard" if self.text_gather else "" if self.text_encoder_resident else " while encoding"),
                  self.text_encoder),
                 ("VAE", self.vae_params), ("T5 gathered", self.text_gather),
                 ("T5 activations", self.text_activations), ("DiT gathered", self.dit_gather),
                 ("DiT activations", self.dit_activations), ("step cache", self.step_cache),
                 ("preview", self.preview),
                 ("VAE decode", self.vae_decode), ("reserve", self.reserve)]
        shown = " + ".join(f"{name} {b / GiB:.1f}" for name, b in parts if b)
        return f"rank {self.rank} needs ~{self.total / GiB:.1f} GiB ({shown}; the largest phase counts)"


def estimate_rank_memory(config: OdysseyConfig, rank: int = 0, *, device_type: str = "cuda",
                         dit_config: WanDiTConfig | None = None, experts: int | None = None) -> MemoryEstimate:
    """GPU bytes `rank` of a replica needs to generate config.video with config.model and config.parallel.
    dit_config: the DiT's shapes when known (else read from model.path's headers, or taken from the published
    shapes when the folder is not there and its name says which); experts: its DiTs (1, or 2 for Wan2.2
    T2V-A14B; None: model.path's layout, or its name)."""
    model, par, video = config.model, config.parallel, config.video
    if not 0 <= rank < par.group_size:
        raise ValueError(f"rank {rank} is not in a replica of {par.group_size} ranks")
    path = None if model.path is None else Path(model.path).expanduser()
    device = torch.device(device_type)
    dtype = resolve_dtype(model.dtype, device)
    cfg = dit_config or _dit_config(path)
    experts = experts or _dit_experts(path)
    # offload_idle_expert on a GPU: the idle expert waits in CPU memory, one is on the GPU at a time
    resident_experts = 1 if model.offload_idle_expert and device.type == "cuda" and not par.shard_weights else experts
    if par.shard_weights:  # every expert's shards stay; only the running expert's blocks are gathered
        dit_params, dit_gather = _dit_sharded(cfg, dtype, par.group_size)
        dit_params *= experts
    else:
        dit_params, dit_gather = resident_experts * _dit_param_bytes(cfg, dtype), 0

    spec = vae_spec(path)
    ts, ss = spec.temporal_stride, spec.spatial_stride
    pt, ph, pw = cfg.patch_size
    h, w = video.height // ss, video.width // ss
    grid = (((video.frames - 1) // ts + 1) // pt, h // ph, w // pw)
    fused = par.attention_backend != "reference" and fused_attention_available(device, dtype)
    acts = int(dit_activation_bytes(cfg, grid, par.ulysses_degree, dtype, fused, par.ring_degree) * FRAGMENTATION)
    sampling = config.sampling
    guided = sampling.guidance_scale != 1.0 or (experts > 1 and sampling.low_noise_guidance_scale not in (None, 1.0))
    branches = 2 if guided and par.cfg_degree == 1 else 1
    sequence_ranks = par.ring_degree * par.ulysses_degree  # the ranks one video's tokens are split over
    tokens_per_rank = -(-math.prod(grid) // sequence_ranks)
    cached = cache_buffers(sampling.cache, tokens_per_rank, cfg.dim, branches)
    preview = 0
    if sampling.preview_every > 0 and rank // sequence_ranks == 0:  # the CFG half holding rank 0 gathers
        patch_bytes = cfg.out_dim * math.prod(cfg.patch_size) * 4  # fp32 x0 per token
        gathered = tokens_per_rank * sequence_ranks if sequence_ranks > 1 else 0  # 1 rank: a view
        preview = (tokens_per_rank + gathered + (math.prod(grid) if rank == 0 else 0)) * patch_bytes

    text = text_acts = text_gather = vae = decode = 0
    resident = True
    # parallel.vae_parallel: every rank decodes a band of rows (pipeline.vae_parallel), rank 0 alone otherwise
    split = splits_decode(config)
    shard_text = model.shard_text_encoder and path is not None  # the embedded model's few MB: whole on rank 0
    if rank == 0 or shard_text:  # sharded: every rank holds its shards and encodes with the others
        place = encoder_placement(model.text_encoder_device, model.offload_text_encoder, device)
        if place.run.type != "cpu":
            n, dims = _text_encoder_shape(path)
            itemsize = 4 if path is None else TEXT_ENCODER_DTYPE.itemsize
            text_acts = _text_encode_activations(dims, cfg.text_len)
            if shard_text:
                text, text_gather = _text_sharded(path, itemsize, par.group_size, cfg.text_len, dims["d_model"])
            else:
                text, resident = n * itemsize, place.home.type != "cpu"
    if rank == 0 and path is None:  # the embedded model's 32 x 32 frames: its decoder is a few MB
        vae = _tiny_decoder_bytes()
    if path is not None and (rank == 0 or split):
        vae = _vae_param_bytes(spec)
        if split:
            # the tallest band and the halo rows it reads; plus the mid-block's gathered keys and values (2 x
            # mid_dim channels of the whole latent frame) and every rank's uint8 rows of one decoded chunk
            band = -(-h // min(par.group_size, h)) + 2
            gathered = 2 * spec.mid_dim * h * w * 4 + 3 * ts * h * ss * w * ss
            decode = int(vae_decode_bytes(spec, band, w, False) * FRAGMENTATION) + gathered
        else:
            decode = int(vae_decode_bytes(spec, h, w, model.vae_tiling) * FRAGMENTATION)
    return MemoryEstimate(rank, dit_params, text, resident, vae, acts, decode, text_acts, cached, preview,
                          dit_gather=dit_gather, text_gather=text_gather,
                          dit_experts=experts if par.shard_weights else resident_experts)


def replica_estimates(config: OdysseyConfig, *, device_type: str = "cuda") -> list[MemoryEstimate]:
    """One estimate per kind of rank in a replica: rank 0 (encodes and decodes), then rank 1 standing for every
    other rank (they only run the DiT), when the replica has more than one. For `odyssey config` style reports."""
    ranks = [0, 1] if config.parallel.group_size > 1 else [0]
    return [estimate_rank_memory(config, r, device_type=device_type) for r in ranks]


@functools.lru_cache(maxsize=8)  # check_fits estimates dozens of alternatives: build the decoder once
def _vae_param_bytes(spec) -> int:
    from .vae import WanVAEDecoder

    with torch.device("meta"):
        return _meta_bytes(WanVAEDecoder(spec), lambda name: torch.float32)


def _tiny_decoder_bytes() -> int:
    from safetensors import safe_open

    from .tiny import WEIGHTS

    with safe_open(str(WEIGHTS), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys() if k.startswith("decoder."))


class MemoryBusy(RuntimeError):
    """The rank would fit this GPU, but other processes hold too much of it now: retryable, unlike ValueError."""


def fit_decision(need: int, free: int, total: int | None = None) -> Literal["ok", "wait", "refuse"]:
    """ok: fits what is free now. refuse: more than the card could ever give this process (its total less our
    CUDA context; with total unknown, what is free). wait: fits the card, not what others leave free now (a
    replaced rank's process still exiting holds its memory for a few seconds)."""
    if need <= free:
        return "ok"
    if total is None or need > total - CONTEXT_BYTES:
        return "refuse"
    return "wait"


def check_fits(config: OdysseyConfig, rank: int, free_bytes: int, total_bytes: int | None = None, *,
               device_type: str = "cuda", dit_config: WanDiTConfig | None = None,
               free_label: str = "free", experts: int | None = None) -> MemoryEstimate:
    """The estimate when it fits in free_bytes. When it cannot fit the card at all (total_bytes less
    CONTEXT_BYTES; free_bytes when total_bytes is None): ValueError, one line: what is needed, what the card
    holds, and the settings that would fit (each alone, else together), or that none does. When it fits the
    card but not what is free now: MemoryBusy (see wait_until_fits)."""
    est = estimate_rank_memory(config, rank, device_type=device_type, dit_config=dit_config, experts=experts)
    decision = fit_decision(est.total, free_bytes, total_bytes)
    if decision == "ok":
        return est
    if decision == "wait":
        raise MemoryBusy(f"{est.summary()}, which fits this GPU ({total_bytes / GiB:.1f} GiB) but only "
                         f"{free_bytes / GiB:.1f} GiB is free: other processes hold the rest (a replaced rank "
                         f"still exiting?)")
    capacity = free_bytes if total_bytes is None else total_bytes - CONTEXT_BYTES
    where = (f"{free_bytes / GiB:.1f} GiB {free_label}" if total_bytes is None else
             f"the {capacity / GiB:.1f} GiB this GPU can hold ({total_bytes / GiB:.1f} GiB less its CUDA context)")
    cfg = dit_config or _dit_config(None if config.model.path is None else Path(config.model.path).expanduser())
    experts = experts or _dit_experts(None if config.model.path is None else Path(config.model.path).expanduser())

    def fits(changes: dict) -> bool:
        sections = {}
        for key, value in changes.items():
            section, name = key.split(".")
            sections.setdefault(section, {})[name] = value
        try:
            changed = replace(config, **{s: replace(getattr(config, s), **kv) for s, kv in sections.items()})
        except ValueError:  # settings that exclude each other (a sharded encoder on the CPU, sharding 1 rank)
            return False
        # every kind of rank of the replica must fit, not only this one: the advice is the same on every rank
        ranks = {0, min(1, changed.parallel.group_size - 1), rank}
        return all(estimate_rank_memory(changed, r, device_type=device_type, dit_config=cfg,
                                        experts=experts).total <= capacity for r in ranks)

    # rank 0 holds what only it holds (the whole encoder, the decoder): the options come from it on every rank
    est0 = est if rank == 0 else estimate_rank_memory(config, 0, device_type=device_type, dit_config=dit_config,
                                                      experts=experts)
    options = []
    if not config.parallel.shard_weights:  # over a replica of 2+ ranks: alone, or with a Ulysses degree below
        options.append({"parallel.shard_weights": True})
        if experts == 2 and not config.model.offload_idle_expert:  # not with shard_weights: the config refuses both
            options.append({"model.offload_idle_expert": True})
    if est0.text_encoder:
        options.append({"model.text_encoder_device": "cpu"})
        if est0.text_encoder_resident and not config.model.shard_text_encoder:
            options.append({"model.offload_text_encoder": True})
        if not config.model.shard_text_encoder and config.model.path is not None:  # adds a shard to every rank
            options.append({"model.shard_text_encoder": True})
    if not config.model.vae_tiling and config.model.path is not None:
        options.append({"model.vae_tiling": True})
    if config.parallel.attention_backend == "reference":
        options.append({"parallel.attention_backend": "auto"})
    device = torch.device(device_type)
    dtype = resolve_dtype(config.model.dtype, device)
    if not fused_attention_available(device, dtype) and fused_attention_available(device, torch.float16):
        options.append({"model.dtype": "float16"})  # bf16 before Ampere: the math kernel's S x S scores
    # The fewest changes that fit: each alone, then pairs, ...; Ulysses (which shards activations, not weights)
    # with the smallest degree that fits.
    def fewest(degrees: list) -> list[dict]:
        working = []
        for size in range(0, len(options) + 1):
            for combo in itertools.combinations(options, size):
                changes = {k: v for o in combo for k, v in o.items()}
                if size and "model.text_encoder_device" in changes and "model.offload_text_encoder" in changes:
                    continue  # offloading a CPU encoder is moot
                d = next((d for d in degrees if (size or d) and fits(
                    changes if d is None else {**changes, "parallel.ulysses_degree": d})), False)
                if d is not False:
                    working.append(changes if d is None else {**changes, "parallel.ulysses_degree": d})
            if working:
                return working
        return working

    working = fewest([None] + [d for d in (2, 4, 8, 16) if d > config.parallel.ulysses_degree])
    if working and all("parallel.ulysses_degree" in o for o in working):
        working += fewest([None])  # and what fits the GPUs the replica has, when more settings can do it
    if est.step_cache and fits({"sampling.cache": "off"}):
        working.insert(0, {"sampling.cache": "off"})  # the one change that costs no GPU and no setting

    def show(o: dict) -> str:
        shown = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in o.items())
        if "parallel.ulysses_degree" in o:
            par = config.parallel
            shown += f" (needs {par.cfg_degree * par.ring_degree * o['parallel.ulysses_degree']} GPUs per replica)"
        return shown

    advice = ("use " + ", or ".join(show(o) for o in working) if working else
              "no setting here makes it fit: use a GPU with more memory or a smaller video")
    raise ValueError(f"{est.summary()} of {where}: {advice}")


def wait_until_fits(config: OdysseyConfig, rank: int, mem_get_info: Callable[[], tuple[int, int]], *,
                    timeout_s: float | None = None, poll_s: float | None = None, device_type: str = "cuda",
                    dit_config: WanDiTConfig | None = None, sleep=None, clock=None,
                    experts: int | None = None) -> tuple[MemoryEstimate, int]:
    """check_fits against mem_get_info() -> (free, total), polled every poll_s (POLL_S) while the rank fits the
    card but not what is free, for up to timeout_s (FREE_WAIT_S); then MemoryBusy (retryable: the driver rebuilds
    with backoff). Returns the estimate and the free bytes it fitted in (the budget requests are checked against)."""
    timeout_s = FREE_WAIT_S if timeout_s is None else timeout_s
    poll_s = POLL_S if poll_s is None else poll_s
    sleep, clock = sleep or time.sleep, clock or time.monotonic
    deadline = clock() + timeout_s
    while True:
        free, total = mem_get_info()
        try:
            return check_fits(config, rank, free, total, device_type=device_type, dit_config=dit_config,
                              experts=experts), free
        except MemoryBusy as busy:
            if clock() >= deadline:
                raise MemoryBusy(f"{busy} after waiting {timeout_s:.0f} s") from None
        sleep(poll_s)


def check_request(config: OdysseyConfig, rank: int, budget: int, frames: int, height: int, width: int, *,
                  request_id: str = "", device_type: str = "cuda", dit_config: WanDiTConfig | None = None,
                  cache: str | None = None, guidance_scale: float | None = None,
                  experts: int | None = None) -> MemoryEstimate:
    """A request's own size (prompt lines may override config.video, the step cache and guidance) against
    `budget`, the bytes that were free before this rank loaded its models: ValueError, one line, when it would
    not fit."""
    video = replace(config.video, frames=frames, height=height, width=width)
    sampling = replace(config.sampling, cache=config.sampling.cache if cache is None else cache,
                       guidance_scale=config.sampling.guidance_scale if guidance_scale is None else guidance_scale,
                       # a given guidance_scale stands for every expert's (guidance on in any: two branches)
                       low_noise_guidance_scale=config.sampling.low_noise_guidance_scale if guidance_scale is None
                       else None)
    try:
        return check_fits(replace(config, video=video, sampling=sampling), rank, budget, device_type=device_type,
                          dit_config=dit_config, free_label="free before loading", experts=experts)
    except ValueError as e:
        raise ValueError(f"request {request_id!r} ({width}x{height}, {frames} frames) is too large for this "
                         f"replica: {e}") from None
