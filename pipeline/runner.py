"""The per-rank Runner: one process, one device, one rank of one replica. Knows nothing of Ray.

Legend: B batch (1), L this rank's latent tokens, P patch vector, T text tokens, C text width.
"""

from __future__ import annotations

import logging
import math
import resource
import socket
import sys
import threading
import time
from collections import OrderedDict
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from configs import OdysseyConfig

from .components import Components, load_components
from .experts import ExpertSwitch
from .load_guard import check_same_models, decode_record, encode_record, model_record
from .memory import check_request, wait_until_fits
from .parallel import Mesh, apply_sequence_parallel, build_mesh, _all_gather_dim0
from .preview import LatentPreviewer, fitted_previewer
from .request import (Event, Frame, GenerateRequest, Preview, Progress, RequestCancelledError, RequestRejectedError,
                      Result)
from .samplers import make_sampler
from .sharding import fsdp_unavailable, resident_param_bytes
from .step_cache import StepCache, check_cache
from .vae_parallel import splits_decode

__all__ = ["Runner", "pick_device", "guided_velocity", "cfg_combine"]

log = logging.getLogger(__name__)

MAX_PENDING_CANCELS = 1024  # ids cancelled but not (yet) seen: a cancel racing a request's end leaves one behind


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + g * (cond - uncond)."""
    return v_uncond + guidance * (v_cond - v_uncond)


def guided_velocity(dit, x_BLP, grid, t_B, cond, uncond, guidance: float) -> torch.Tensor:
    """Sequential CFG: the conditional and the unconditional pass one after the other on the same ranks."""
    return cfg_combine(dit.forward_tokens(x_BLP, grid, t_B, cond), dit.forward_tokens(x_BLP, grid, t_B, uncond),
                       guidance)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator peak, or on Linux the process's peak RSS (VmHWM, reset by writing 5 to
    /proc/self/clear_refs). False where it could not be reset (peak_memory_bytes then reports the process's
    lifetime peak RSS)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device, since_reset: bool) -> int:
    """Bytes at the peak since reset_peak_memory: CUDA's max allocated, or the process's peak RSS (CPU ranks)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if since_reset:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, kB elsewhere


def pick_device(preference: str, rank: int) -> torch.device:
    """cuda when asked for or available (one GPU per process: under Ray each actor sees exactly one), else cpu."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("runtime.device is cuda but this process sees no GPU")
    index = rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class Runner:
    """Joins the replica's process group, builds the (cfg, ring, ulysses) mesh, loads the models once, then serves
    generate(request) as an iterator of events: Progress per step, Preview every sampling.preview_every steps and
    Frame per decoded frame (rank 0), Result. cancel(request_id), from any thread, stops a request on every rank
    at the same step (RequestCancelledError)."""

    def __init__(self, config: OdysseyConfig, rank: int, world_size: int, init_method: str | None = None, *,
                 store: dist.Store | None = None, load: bool = True):
        """Joins the group at init_method, or through an already connected store (rank 0 hosting it: no port race;
        exactly one of the two), collectively: every rank at once. Unless load=False, loads the models (then call
        load_models() yourself: the Ray actors make the two steps separate calls)."""
        assert (init_method is None) != (store is None), "give init_method or store"
        par = config.parallel
        if world_size != par.group_size:
            raise ValueError(f"world_size {world_size} != cfg_degree {par.cfg_degree} x ring_degree "
                             f"{par.ring_degree} x ulysses_degree {par.ulysses_degree}")
        self.config, self.rank, self.world_size = config, rank, world_size
        # accelerator_check=false (fake GPU resources in tests): a worker that sees no GPU computes on CPU
        preference = config.runtime.device
        if preference == "cuda" and not config.runtime.accelerator_check and not torch.cuda.is_available():
            preference = "cpu"
        self.device = pick_device(preference, rank)
        self.keep_latents_sharded = True  # False gathers the latents every step (benchmarked against)
        self.return_latents = False  # rank 0 puts the final latents in its Result (tests, comparisons)
        self.components: Components | None = None
        self.experts: ExpertSwitch | None = None  # which expert is on the device (use_components)
        self.memory_budget: int | None = None  # GPU bytes free before loading (load_models); None: no checks
        self.load_s = 0.0
        self.shard_text = False  # every rank holds shards of the text encoder and encodes (load_models)
        self._peak_reset = False  # whether this request's peak memory could be reset at its start
        self.progress = (None, "idle", 0, 0)  # (request id, stage, step, total), read by health checks
        self.previewer: LatentPreviewer | None = None  # rank 0, fitted at the first preview a request asks for
        self._preview_failed: str | None = None  # the last request whose preview failed (logged once each)
        self._cancel_lock = threading.Lock()
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # request ids to stop, oldest first
        timeout = timedelta(seconds=config.runtime.collective_timeout_s)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        kwargs = {"device_id": self.device} if backend == "nccl" else {}
        rendezvous = {"store": store} if store is not None else {"init_method": init_method}
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **rendezvous, **kwargs)
        self._comm_device = self.device if backend == "nccl" else torch.device("cpu")
        self.mesh: Mesh = build_mesh(par.cfg_degree, par.ulysses_degree, timeout, ring_degree=par.ring_degree)
        if load:
            self.load_models()

    @property
    def split_decode(self) -> bool:
        """Every rank of the replica decodes a band of rows (vae_parallel.splits_decode)."""
        return splits_decode(self.config)

    def load_models(self) -> float:
        """Load the DiT (and on rank 0 the text encoder and decoder) once; returns the seconds it took. With
        parallel.shard_weights the DiT's blocks are sharded over the replica (pipeline/sharding.py: each rank
        reads only its rows), with model.shard_text_encoder the umt5 encoder too (every rank then holds a part
        of it and encodes). On a GPU, first checks that this rank's estimated memory fits, before reading any
        weights and before any collective: ValueError naming settings that would when the card is too small;
        when it fits the card but others still hold memory (a replaced rank exiting), waits up to
        memory.FREE_WAIT_S, then MemoryBusy (a RuntimeError: retried). The free bytes it fitted in become
        memory_budget, which every request's size is checked against."""
        par = self.config.parallel
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            estimate, self.memory_budget = wait_until_fits(self.config, self.rank,
                                                           lambda: torch.cuda.mem_get_info(self.device))
            log.info("%s", estimate.summary())
        # Sharded weights are sharded over the whole replica (every SP and CFG rank), before sequence parallelism
        # is applied (which only swaps the token layout). The embedded model's encoder (a few MB) is never sharded.
        world = dist.group.WORLD
        self.shard_text = self.config.model.shard_text_encoder and self.config.model.path is not None
        if self.config.model.shard_text_encoder and not self.shard_text and self.rank == 0:
            log.info("model.shard_text_encoder: the embedded model's text encoder is a few MB, kept whole on rank 0")
        if par.shard_weights or self.shard_text:
            # The driver checked its own torch; a worker's may differ (Ray does not make them the same).
            reason = fsdp_unavailable()
            if reason is not None:
                key = "parallel.shard_weights" if par.shard_weights else "model.shard_text_encoder"
                raise ValueError(f"{key}: {reason.replace(': parallel.shard_weights needs', ': needs')} "
                                 f"(on node {socket.gethostname()})")
        self.use_components(load_components(
            self.config.model, device=self.device, encode=self.rank == 0 or self.shard_text,
            decode=self.rank == 0 or self.split_decode, attention_backend=par.attention_backend,
            shard_group=world if par.shard_weights else None, shard_text_group=world if self.shard_text else None))
        self.load_s = time.perf_counter() - t0
        return self.load_s

    def use_components(self, components: Components) -> None:
        """Serve with these models (load_models' second half; tests pass models built in memory). Collective: checks
        every rank loaded the same models, then shards both experts' tokens over the sequence group. With
        model.offload_idle_expert on a GPU the idle expert of a two-expert model waits in CPU memory."""
        par, mesh = self.config.parallel, self.mesh
        self.components = components
        self._check_same_models()
        experts = components.experts()
        for dit in experts:
            apply_sequence_parallel(dit, mesh.ulysses_group, fuse_qkv=par.fuse_qkv, fp8_comm=par.fp8_comm,
                                    head_chunks=par.head_chunks, ring_group=mesh.ring_group,
                                    sequence_group=mesh.sp_group)
        offload = self.config.model.offload_idle_expert and len(experts) == 2 and self.device.type == "cuda"
        if self.config.model.offload_idle_expert and not offload and self.rank == 0:
            log.info("model.offload_idle_expert: nothing to offload (%s)", "a CPU rank keeps both experts in host "
                     "memory already" if len(experts) == 2 else "this model has one DiT")
        self.experts = ExpertSwitch(experts, self.device, offload=offload, synchronize=self._sync)

    def _check_same_models(self) -> None:
        """Before any collective uses the weights: every rank loaded the same model (nodes read model.path on their
        own disks), else the same ValueError on every rank naming those that differ (pipeline/load_guard.py). One
        all_gather, under the group's timeout."""
        if self.world_size == 1:
            return
        comp = self.components
        record = model_record(comp.dit, self.config.model.path, comp.text_encoder if self.shard_text else None,
                              comp.decoder if self.split_decode else None, dit_low=comp.dit_low)
        rows = self._gather_table(encode_record(record))
        check_same_models([decode_record(row) for row in rows])

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def cancel(self, request_id: str) -> None:
        """Stop `request_id` (thread-safe, returns at once): every rank raises RequestCancelledError at the first
        step they all reach after any of them saw this; before the request starts, at its first collective. An
        id never served is forgotten after MAX_PENDING_CANCELS newer ones."""
        with self._cancel_lock:
            self._cancelled[request_id] = None
            self._cancelled.move_to_end(request_id)
            while len(self._cancelled) > MAX_PENDING_CANCELS:
                self._cancelled.popitem(last=False)

    def _is_cancelled(self, request_id: str) -> bool:
        with self._cancel_lock:
            return request_id in self._cancelled

    def _forget(self, request_id: str) -> None:
        with self._cancel_lock:
            self._cancelled.pop(request_id, None)

    def _cancel_agreed(self, request_id: str) -> bool:
        """Whether any rank was asked to cancel, the same answer on every rank: one 8-byte all_reduce (MAX) per
        call, with the group's collective timeout; none on one rank."""
        flag = self._is_cancelled(request_id)
        if self.world_size > 1:
            flag_1 = torch.tensor([int(flag)], dtype=torch.int64, device=self._comm_device)
            dist.all_reduce(flag_1, op=dist.ReduceOp.MAX)
            flag = bool(flag_1.item())
        return flag

    def _stop_if_cancelled(self, request_id: str, step: int) -> None:
        """Every rank raises together when any rank was asked to cancel."""
        if self._cancel_agreed(request_id):
            raise RequestCancelledError(f"request {request_id} cancelled after step {step}")

    def _previewer(self) -> LatentPreviewer:
        """Rank 0's latent-to-RGB map, fitted to its decoder once, at the first preview (not at load: the full
        Wan2.1 decoder on a CPU takes seconds), and kept per decoder instance (pipeline/preview.py)."""
        if self.previewer is None:
            comp = self.components
            t0 = time.perf_counter()
            self.previewer = fitted_previewer(comp.decoder, comp.z_dim, comp.spatial_stride, comp.temporal_stride,
                                              device=self.device)
            log.info("preview map ready for the decoder in %.2f s", time.perf_counter() - t0)
        return self.previewer

    def _preview(self, x0_BLP: torch.Tensor | None, seq_len: int, grid, request_id: str) -> np.ndarray | None:
        """The clean-video estimate's preview image on rank 0, None elsewhere. A collective over the SP group that
        holds rank 0 (its ranks call this at the same steps); the other CFG half has nothing to send."""
        if self.mesh.cfg_rank != 0:
            return None
        dit = self.components.dit
        x0_BSP = dit.layout.gather(x0_BLP, seq_len)
        if self.rank != 0:
            return None
        # Rank 0 alone between two collectives: a failure here (CUDA OOM, a bug, the fit) costs this preview, not
        # the replica (a rank that left the group's step would get it rebuilt, minutes at 14B, for a thumbnail).
        try:
            return self._previewer().image(dit.unpatchify(x0_BSP, grid))
        except Exception:
            if self._preview_failed != request_id:
                self._preview_failed = request_id
                log.warning("request %s: a preview failed, skipped (logged once per request)", request_id,
                            exc_info=True)
            return None

    # -- helpers ----------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _agree(self, request: GenerateRequest, error: Exception | None) -> None:
        """The first collective of a request: every rank shows (valid?, fingerprint); any invalid or different
        request is a RequestRejectedError on every rank (and only here: the group is still in step)."""
        mine = torch.tensor([0 if error else 1, request.fingerprint() if not error else -1,
                             int(self._is_cancelled(request.request_id))], dtype=torch.int64)
        table = self._gather_table(mine).tolist()
        if error is not None:
            raise RequestRejectedError(str(error)) from error
        bad = [r for r, (ok, _, _) in enumerate(table) if not ok]
        if bad:
            raise RequestRejectedError(f"rank(s) {bad} rejected request {request.request_id!r}")
        if len({fp for _, fp, _ in table}) > 1:
            raise RequestRejectedError(f"ranks received different versions of request {request.request_id!r}")
        if any(cancelled for _, _, cancelled in table):  # cancelled before it started: nothing encoded yet
            raise RequestCancelledError(f"request {request.request_id} cancelled after step 0")

    def _guidances(self, request: GenerateRequest) -> list[float]:
        """The guidance scale of each expert's steps: [high-noise (guidance_scale), low-noise
        (low_noise_guidance_scale)] on two-expert models, [guidance_scale] on one DiT."""
        if self.components.dit_low is None:
            return [request.guidance_scale]
        return [request.guidance_scale, request.low_noise_guidance_scale]

    def _context(self, request: GenerateRequest) -> torch.Tensor:
        """[1 or 2, T, C] text embeddings (conditional, then unconditional when any expert's guidance is on):
        encoded on rank 0, broadcast to the replica. A sharded encoder encodes on every rank together (each layer's
        forward gathers its weights: a collective); rank 0's result is still broadcast, so every rank's context is
        bit-identical."""
        n = 1 if all(g == 1.0 for g in self._guidances(request)) else 2
        comp = self.components
        ctx = torch.empty((n, comp.text_len, comp.text_dim), dtype=torch.float32, device=self._comm_device)
        if self.rank == 0 or self.shard_text:
            prompts = [request.prompt] + ([request.negative_prompt] if n == 2 else [])
            ctx.copy_(comp.encode_text(prompts))  # where it runs: components.encoder_placement
        if self.world_size > 1:
            dist.broadcast(ctx, src=0)
        return ctx.to(self.device)

    def _branch_contexts(self, ctx: torch.Tensor, guidance: float) -> list[torch.Tensor]:
        """The text of each CFG branch this rank runs at a step guided by `guidance`: cond (and uncond when
        sequential and guided), or its half's branch (CFG-parallel replicas refuse unguided steps)."""
        if self.mesh.cfg_degree == 2:
            assert ctx.shape[0] == 2 and guidance != 1.0, "CFG-parallel needs guidance on every step"
            return [ctx[self.mesh.cfg_rank : self.mesh.cfg_rank + 1]]
        if ctx.shape[0] == 1 or guidance == 1.0:
            return [ctx[:1]]
        return [ctx[:1], ctx[1:]]

    def _velocity(self, step: int, dit, expert: int, x_BLP, grid, t, ctx, guidance: float,
                  cache: StepCache | None) -> torch.Tensor:
        """This step's velocity of this rank's tokens from `dit` (expert `expert` of the model)."""
        t_B = torch.full((1,), float(t), device=self.device)
        contexts = self._branch_contexts(ctx, guidance)
        if cache is not None:
            v = cache.velocities(dit, step, x_BLP, grid, t_B, contexts, expert=expert)
        elif len(contexts) == 2:
            return guided_velocity(dit, x_BLP, grid, t_B, contexts[0], contexts[1], guidance)
        else:
            v = [dit.forward_tokens(x_BLP, grid, t_B, contexts[0])]
        if len(v) == 2:
            return cfg_combine(v[0], v[1], guidance)
        if self.mesh.cfg_degree == 2:
            # This half of the ranks ran one branch; partners (same tokens, other branch) swap results.
            v_BLP = v[0]
            both = v_BLP.new_empty((2, *v_BLP.shape))
            _all_gather_dim0(both.view(-1, *v_BLP.shape[1:]), v_BLP.contiguous(), self.mesh.cfg_group)
            return cfg_combine(both[0], both[1], guidance)
        return v[0]

    def _gather_table(self, vec: torch.Tensor) -> torch.Tensor:
        """[world, n]: every rank's vec, the same table on every rank (the first collective of a request, and the
        step cache's one per step)."""
        if self.world_size == 1:
            return vec[None]
        mine = vec.to(self._comm_device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        return torch.stack(every).cpu()

    def _step_cache(self, request: GenerateRequest, ctx: torch.Tensor, seq_len: int) -> StepCache | None:
        """Its state follows the first expert (velocities() starts it afresh at the switch)."""
        if request.cache == "off":
            return None
        dit = self.components.dit
        return StepCache(request.cache, request.cache_threshold, request.steps, dit.config,
                         branches=len(self._branch_contexts(ctx, self._guidances(request)[0])),
                         valid=dit.layout.valid_tokens(seq_len), agree=self._gather_table, stats_rank=self.rank == 0,
                         experts=len(self.components.experts()))

    def _memory_row(self) -> list[int]:
        """[bytes of the model weights on this rank's device (its shards of sharded ones), peak bytes this request].
        Weights elsewhere (the idle expert parked in host memory, an encoder on the CPU) are not in a GPU's peak, so
        not in its row either; on a CPU rank that is every weight."""
        comp = self.components
        return [resident_param_bytes(*comp.experts(), comp.text_encoder, comp.decoder, on=self.device),
                peak_memory_bytes(self.device, self._peak_reset)]

    def _memory_table(self) -> list[list[int]]:
        """[[param bytes, peak bytes] per rank], rank order: one all_gather of two int64 per rank (none on one)."""
        return self._gather_table(torch.tensor(self._memory_row(), dtype=torch.int64)).tolist()

    # -- the job ----------------------------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> Iterator[Event]:
        """The events of one request (see the class). However it ends, a pending cancel of its id is dropped."""
        try:
            yield from self._generate(request)
        finally:
            self._forget(request.request_id)
            self._preview_failed = None

    @torch.no_grad()
    def _generate(self, request: GenerateRequest) -> Iterator[Event]:
        assert self.components is not None, "load_models() before generate()"
        self._peak_reset = reset_peak_memory(self.device)
        error = None
        try:
            if not request.is_resolved:
                raise ValueError(f"request {request.request_id!r} is not resolved (seed and sizes must be set)")
            comp = self.components
            shape = comp.latent_shape(request.frames, request.height, request.width)
            if comp.dit_low is None and request.low_noise_guidance_scale != request.guidance_scale:
                raise ValueError(f"low_noise_guidance_scale applies to two-expert models (Wan2.2 T2V-A14B); this "
                                 f"model has one DiT: use guidance_scale (got {request.low_noise_guidance_scale} "
                                 f"and {request.guidance_scale})")
            guidances = self._guidances(request)
            if self.mesh.cfg_degree == 2 and 1.0 in guidances:
                which = "" if len(guidances) == 1 else (" (low_noise_guidance_scale 1.0)" if guidances[0] != 1.0
                                                        else " (guidance_scale 1.0)")
                raise ValueError(f"CFG-parallel replica (cfg_degree=2) got a request with guidance off{which}")
            check_cache(request.cache, request.cache_threshold, request.steps, comp.dit.config,
                        experts=len(comp.experts()))
            if self.memory_budget is not None:  # prompt lines may ask for more than config.video, checked at load
                # guidance on for any expert: the context and the cache's buffers hold two branches
                guided = next((g for g in guidances if g != 1.0), 1.0)
                check_request(self.config, self.rank, self.memory_budget, request.frames, request.height,
                              request.width, request_id=request.request_id, device_type=self.device.type,
                              dit_config=comp.dit.config, cache=request.cache, guidance_scale=guided,
                              experts=len(comp.experts()))
        except ValueError as e:
            error = e
        self._agree(request, error)

        rid, comp, dit = request.request_id, self.components, self.components.dit
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        ctx = self._context(request)
        self._sync()
        timings["text_s"] = time.perf_counter() - t_start
        self.progress = (rid, "encode", 1, 1)
        yield Progress(rid, "encode", 1, 1)

        # The noise depends only on the seed and the shape, never on the layout: drawn whole on the CPU, then sharded.
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed), dtype=torch.float32)
        grid = dit.grid(shape)
        seq_len = math.prod(grid)
        layout = dit.layout
        x_BLP = layout.shard(dit.patchify(noise)).to(self.device)
        sampler = make_sampler(request.sampler, request.steps, request.shift)
        cache = self._step_cache(request, ctx, seq_len)
        guidances = self._guidances(request)
        every = self.config.sampling.preview_every
        t0 = time.perf_counter()
        self._stop_if_cancelled(rid, 0)
        self.experts.begin_request()
        for i, t in enumerate(sampler.timesteps.tolist()):
            # two-expert models: t >= boundary_ratio * 1000 is the high-noise expert's step (diffusers' rule)
            expert = comp.expert_index(t)
            v_BLP = self._velocity(i, self.experts.use(expert), expert, x_BLP, grid, t, ctx, guidances[expert],
                                   cache)
            # after steps every, 2*every, ... but the last (the frames follow): the estimate of the clean video
            # from this step's input and velocity, x0 = x_t - sigma_t * v, as both samplers see it
            previewing = every > 0 and (i + 1) % every == 0 and i + 1 < request.steps
            # (the other CFG half has nothing to send: _preview gathers over rank 0's SP group only)
            x0_BLP = (x_BLP.float() - float(sampler.sigmas[i]) * v_BLP.float()
                      if previewing and self.mesh.cfg_rank == 0 else None)
            if self.keep_latents_sharded:
                x_BLP = sampler.step(i, v_BLP, x_BLP)
            else:
                x_full = sampler.step(i, layout.gather(v_BLP, seq_len), layout.gather(x_BLP, seq_len))
                x_BLP = layout.shard(x_full)
            self._stop_if_cancelled(rid, i + 1)
            self.progress = (rid, "denoise", i + 1, request.steps)
            yield Progress(rid, "denoise", i + 1, request.steps, len(cache.computed) if cache else None)
            if previewing:
                image = self._preview(x0_BLP, seq_len, grid, rid)
                x0_BLP = None
                if image is not None:
                    yield Preview(rid, i + 1, request.steps, image, time.time())
        cache_summary, cache = (cache.summary() if cache else None), None  # frees its residuals before the decode
        latents = dit.unpatchify(layout.gather(x_BLP, seq_len), grid)
        self._sync()
        timings["denoise_s"] = time.perf_counter() - t0

        num_frames = (shape[2] - 1) * comp.temporal_stride + 1
        # Memory per rank, gathered once. With rank 0 decoding alone the others are done now: gathering here, not
        # after the decode, keeps them out of a collective while rank 0 decodes (and rank 0's cancel between
        # frames, which it decides alone, leaves no rank waiting in one); rank 0 then puts in its final numbers.
        memory = None if self.split_decode else self._memory_table()
        if self.rank == 0 or self.split_decode:
            t0 = time.perf_counter()
            # Split: every rank decodes a band of rows of each frame; rank 0 gets the whole frames, the others None.
            frames = (comp.decoder.decode_stream(latents, group=dist.group.WORLD) if self.split_decode
                      else comp.decoder.decode_stream(latents))
            for index, image in enumerate(frames):
                self.progress = (rid, "decode", index + 1, num_frames)
                if image is not None:
                    if index == 0:
                        timings["first_frame_s"] = time.perf_counter() - t_start
                    yield Frame(rid, index, num_frames, image, time.time())
                if index + 1 == num_frames:
                    continue
                # Rank 0 decoding alone stops between frames. A split decode is a collective per latent chunk (1
                # frame, then temporal_stride each) that every rank iterates alike: they agree once per chunk, at
                # its last frame (one 8-byte all_reduce, ~21 at 720p), so they all stop at the same chunk.
                if self.split_decode:
                    stop = index % comp.temporal_stride == 0 and self._cancel_agreed(rid)
                else:
                    stop = self._is_cancelled(rid)
                if stop:
                    raise RequestCancelledError(f"request {rid} cancelled while decoding, after frame {index + 1} "
                                                f"of {num_frames}")
            timings["decode_s"] = time.perf_counter() - t0
        if self.split_decode:
            memory = self._memory_table()
        elif self.rank == 0:
            memory[0] = self._memory_row()  # after its decode
        timings["total_s"] = time.perf_counter() - t_start
        self.progress = (rid, "done", 0, 0)
        yield Result(rid, request.seed, num_frames, timings,
                     {"latents": list(shape), "tokens": seq_len, "tokens_per_rank": x_BLP.shape[1],
                      "video": [num_frames, request.height, request.width, 3]},
                     latents.cpu() if self.return_latents and self.rank == 0 else None, time.time(),
                     cache_summary, _memory_summary(memory) if self.rank == 0 else None)


def _memory_summary(table: list[list[int]]) -> dict:
    """Result.memory from the gathered [[param bytes, peak bytes] per rank]."""
    return {"param_bytes": [row[0] for row in table], "peak_bytes": [row[1] for row in table]}
