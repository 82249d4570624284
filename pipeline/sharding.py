"""Weights sharded over the replica with FSDP2 (torch's fully_shard): each rank keeps 1/P of every block's rows and
gathers a block's full weights just before it runs, freeing them after, the next block's gather prefetched so it
overlaps the current block's compute. Pure torch: knows no config and no Ray (the Runner decides when).

Legend: P ranks in the group, n rows of a parameter (its dim 0), c = ceil(n / P) rows per rank (FSDP2 shards dim 0
like torch.chunk: rank r holds rows [r*c, min((r+1)*c, n)), possibly none, in a buffer of c rows on every rank).

What is sharded and what is not:
- WanDiT: each of dit.blocks is its own FSDP module (reshard_after_forward); the root is an FSDP module too but
  ignores every non-block parameter (patch/text/time embeddings, head: ~0.24 B of 14B's 14 B), which stays whole
  on every rank. The root must be an FSDP module: without one each block is its own root, and a root never
  reshards after forward (FSDP2's heuristic), so nothing would be saved.
  Block i prefetches block i+1, except the last block a partial run_blocks(..., start, stop) runs (the step
  cache's probe): if the step is then skipped nothing would use that gather, and it would stay alive (one whole
  block) until the next computed step. Block 0 is not prefetched by the root, on purpose: the step cache calls
  run_blocks twice per step, and a root prefetch would gather block 0 again for the second call. On CUDA FSDP2
  issues block 0's all-gather on its own stream when the CPU reaches block 0, usually while the GPU still runs
  the embeddings, so little of it is exposed.
- umt5-xxl: each encoder block is its own FSDP module; the token embedding (256k x 4096, 2.1 GB in bf16) is split
  by vocabulary rows instead (VocabParallelEmbedding: this rank's c rows, one all_reduce of the looked-up rows),
  since gathering it whole would move 2.1 GB to look up at most 1,024 tokens. It stays tied (shared and
  encoder.embed_tokens are one module). The root ignores the rest (the final norm).
Loading never materialises a whole model on one rank: the model is built on the meta device, sharded, given
empty local storage, then each rank reads only its own rows (safetensors get_slice, or a memory-mapped .pth).
"""
from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from .dit import WanDiT
from .weights import check_keys, dit_weight_files, one_dit, read_dit_headers

__all__ = ["fsdp_unavailable", "shard_dit", "load_dit_sharded", "shard_text_encoder", "load_text_encoder_sharded",
           "resident_param_bytes", "is_sharded", "VocabParallelEmbedding"]

log = logging.getLogger(__name__)

# The Runner and the step cache call these, not forward: FSDP2 must wrap them with its root pre/post-forward
# (lazy init, the root's state) or the blocks would each act as a root.
DIT_FORWARD_METHODS = ("forward_tokens", "run_blocks")


def fsdp_unavailable() -> str | None:
    """None when this torch can shard (FSDP2's fully_shard, register_fsdp_forward_method, ignored_params); else the
    reason, one line."""
    version = torch.__version__.split("+")[0]
    if not dist.is_available():
        return f"torch {version} was built without torch.distributed: parallel.shard_weights needs it"
    try:
        import torch.distributed.fsdp as fsdp
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:
        fsdp = DeviceMesh = None
    if not all(hasattr(fsdp, name) for name in ("fully_shard", "register_fsdp_forward_method", "FSDPModule")):
        return f"torch {version} has no FSDP2 (torch.distributed.fsdp.fully_shard): parallel.shard_weights needs " \
               f"torch >= 2.7"
    if "ignored_params" not in inspect.signature(fsdp.fully_shard).parameters or not hasattr(DeviceMesh, "from_group"):
        return f"torch {version} has no fully_shard(ignored_params=...): parallel.shard_weights needs torch >= 2.7"
    return None


def _mesh(group, device_type: str):
    from torch.distributed.device_mesh import DeviceMesh

    reason = fsdp_unavailable()
    if reason is not None:
        raise ValueError(reason)
    return DeviceMesh.from_group(group, device_type)


def _device_type(module: nn.Module) -> str:
    device = next(module.parameters()).device
    assert device.type != "meta", "shard a built model (params on their device), or load it with load_*_sharded"
    return device.type


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


@functools.cache
def _freed_blocks_leave_the_heap() -> bool:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap, once per process; whether it could.

    Sharded on a CPU, each block's gathered weights are allocated and freed once per forward. glibc's default
    threshold grows to the largest freed chunk (up to 32 MiB), after which gathered blocks come from the heap and
    their freed pages stay in the process (RSS grew ~75 MB per block in the 1.3B bench and ended high): the memory
    sharding saves would not show in Result.memory's peak_bytes. mmap'ed chunks go back to the OS when freed.
    A no-op where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 20))


def _on_device(device_type: str) -> None:
    """What sharding on a device type needs of the process (see _freed_blocks_leave_the_heap)."""
    if device_type == "cpu":
        _freed_blocks_leave_the_heap()


def _shard_stack(root: nn.Module, children: list[nn.Module], mesh, prefetch: bool) -> None:
    """children each an FSDP module (gathered for their forward, resharded after, in list order), root an FSDP
    module that ignores every parameter not in a child: those stay whole on every rank."""
    from torch.distributed.fsdp import fully_shard

    for child in children:
        fully_shard(child, mesh=mesh, reshard_after_forward=True)
    in_children = {id(p) for child in children for p in child.parameters()}
    fully_shard(root, mesh=mesh, ignored_params={p for p in root.parameters() if id(p) not in in_children})
    if prefetch:  # at most two children gathered at once: the one running and the next
        for this, following in zip(children, children[1:]):
            this.set_modules_to_forward_prefetch([following])


def _shard_dit(dit: WanDiT, mesh, prefetch: bool) -> WanDiT:
    from torch.distributed.fsdp import register_fsdp_forward_method

    _on_device(mesh.device_type)
    _shard_stack(dit, list(dit.blocks), mesh, prefetch)
    for name in DIT_FORWARD_METHODS:
        register_fsdp_forward_method(dit, name)
    if prefetch:
        _no_prefetch_past_stop(dit)
    return dit


def _no_prefetch_past_stop(dit: WanDiT) -> None:
    """Wrap dit.run_blocks (FSDP2's root pre/post-forward around it) so that a partial run, blocks[start:stop] with
    stop < len(blocks), does not prefetch blocks[stop]: the step cache runs its probe blocks, then skips the rest on
    most steps, and the unused gather would stay alive (a whole block) until the next computed step, or into the
    next request after a cancel. The run that goes on from `stop` gathers blocks[stop] itself; full runs keep the
    prefetch chain."""
    fsdp_run_blocks, blocks = dit.run_blocks, dit.blocks

    @functools.wraps(fsdp_run_blocks)
    def run_blocks(s, x_BLC, start: int = 0, stop: int | None = None):
        last = len(blocks) if stop is None else stop
        if not start < last < len(blocks):
            return fsdp_run_blocks(s, x_BLC, start, stop)
        blocks[last - 1].set_modules_to_forward_prefetch([])
        try:
            return fsdp_run_blocks(s, x_BLC, start, stop)
        finally:
            blocks[last - 1].set_modules_to_forward_prefetch([blocks[last]])

    dit.run_blocks = run_blocks


def shard_dit(dit: WanDiT, group, *, prefetch: bool = True) -> WanDiT:
    """Shard an already built DiT's blocks over `group` (in place; returns it). Params already on their device."""
    return _shard_dit(dit, _mesh(group, _device_type(dit)), prefetch)


def _row_range(n: int, group) -> tuple[int, int]:
    """[start, stop) of the dim-0 rows this rank holds of an n-row parameter (FSDP2's even dim-0 sharding)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    c = -(-n // world)
    start = min(rank * c, n)
    return start, min(start + c, n)


@torch.no_grad()
def _fill(model: nn.Module, group, read_rows) -> None:
    """Copy each parameter's local part in: read_rows(name, start, stop) -> those rows (any dtype; CPU), or the
    whole tensor when stop is None. A sharded parameter (a DTensor, or a VocabParallelEmbedding's rows) reads only
    this rank's rows."""
    from torch.distributed.tensor import DTensor

    vocab_rows = {id(m.weight): (m.vocab_start, m.vocab_stop) for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding)}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            local, (start, stop) = p.to_local(), _row_range(p.shape[0], group)
        elif id(p) in vocab_rows:  # c rows: its own, then zeros
            start, stop = vocab_rows[id(p)]
            local = p[:stop - start]
            p[stop - start:].zero_()
        else:
            p.copy_(read_rows(name, 0, None))
            continue
        assert local.shape[0] == stop - start, (name, tuple(local.shape), start, stop)
        if stop > start:
            local.copy_(read_rows(name, start, stop))


def load_dit_sharded(path, group, *, device, dtype, attention_backend="auto") -> WanDiT:
    """Like weights.load_dit, but each rank reads only its rows of each block parameter (meta build, no full copy)."""
    one_dit(path)  # a two-expert model's root: each expert folder is loaded on its own
    # Headers only first: the config needs the shapes, and every mismatch is reported before any tensor loads.
    folder, cfg, source, shapes = read_dit_headers(path)
    device = torch.device(device)
    with torch.device("meta"):
        dit = WanDiT(cfg, attention_backend=attention_backend)
    check_keys({name: tuple(p.shape) for name, p in dit.named_parameters()}, shapes,
               f"weights in {folder} do not fit the Wan2.1 DiT")
    dit.to_compute_dtype(dtype).eval().requires_grad_(False)
    assert not list(dit.buffers()), "WanDiT has buffers: to_empty would leave them unfilled"
    _shard_dit(dit, _mesh(group, device.type), prefetch=True)
    dit.to_empty(device=device)

    from safetensors import safe_open

    files: dict[Path, object] = {}
    try:
        for file in {file for file, _ in source.values()}:
            files[file] = safe_open(str(file), framework="pt")

        def read_rows(name, start, stop):
            file, key = source[name]
            return files[file].get_slice(key)[start:stop] if stop is not None else files[file].get_tensor(key)

        _fill(dit, group, read_rows)
    finally:
        files.clear()
    return dit


# -- the text encoder --------------------------------------------------------------------------------------------


class VocabParallelEmbedding(nn.Module):
    """A token embedding split by vocabulary rows over `group`: this rank holds rows [vocab_start, vocab_stop) of the
    whole [num_embeddings, embedding_dim] table (FSDP2's dim-0 chunk, so the rows the sharded loader reads). Each
    rank looks up the ids in its range (zeros for the others) and one all_reduce(SUM) over the group gives every
    rank the whole lookup: exact, each value being one rank's plus zeros, so equal to the unsharded lookup.
    weight has c = ceil(num_embeddings / P) rows on every rank, like an FSDP2 shard: its rows first, then zeros
    (the last ranks' chunks are short): the same shape everywhere, so the ranks' load records agree
    (pipeline/load_guard.py hashes parameter shapes).

    Every rank of the group must call it at the same time with ids of the same shape (a collective, under the
    group's timeout). Ids outside [0, num_embeddings) give zero rows here, where nn.Embedding raises: the tokenizer
    that made them has this vocabulary."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group, *, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        self.vocab_start, self.vocab_stop = _row_range(num_embeddings, group)
        rows = -(-num_embeddings // dist.get_world_size(group))
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, group) -> "VocabParallelEmbedding":
        """This rank's rows of `embedding` (a copy: the whole table is freed with the module; meta stays meta)."""
        n, dim = embedding.weight.shape
        out = cls(n, dim, group, device=embedding.weight.device, dtype=embedding.weight.dtype)
        rows = out.vocab_stop - out.vocab_start
        out.weight[:rows].copy_(embedding.weight[out.vocab_start:out.vocab_stop])
        out.weight[rows:].zero_()
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.vocab_stop - self.vocab_start
        mine = (ids >= self.vocab_start) & (ids < self.vocab_stop)
        if rows:
            out = F.embedding((ids - self.vocab_start).clamp(0, rows - 1), self.weight[:rows])
            out = out.masked_fill(~mine.unsqueeze(-1), 0)
        else:  # a rank past the end of the vocabulary (more ranks than ceil-sized chunks): zeros only
            out = self.weight.new_zeros(*ids.shape, self.embedding_dim)
        dist.all_reduce(out, group=self.group)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_stop})"


def _shard_umt5(model: nn.Module, group, mesh, prefetch: bool) -> nn.Module:
    """model: transformers' UMT5EncoderModel (built, or on meta). Its token embedding, two modules sharing one
    weight (shared, encoder.embed_tokens), becomes one VocabParallelEmbedding of this rank's rows; each encoder
    block an FSDP module, block i prefetching block i+1."""
    assert model.shared.weight is model.encoder.embed_tokens.weight, "the token embedding is not tied"
    _on_device(mesh.device_type)
    model.set_input_embeddings(VocabParallelEmbedding.from_embedding(model.shared, group))  # both names
    _shard_stack(model, list(model.encoder.block), mesh, prefetch)
    return model


def shard_text_encoder(encoder, group):
    """Shard an already built WanTextEncoder's umt5 over `group` (in place; returns it). Every rank of the group
    must then call encode with the same prompts at the same time (each layer's forward is a collective)."""
    _shard_umt5(encoder.model, group, _mesh(group, _device_type(encoder.model)), prefetch=True)
    return encoder


def load_text_encoder_sharded(path, group, *, device, dtype, text_len):
    """Like WanTextEncoder.from_pretrained, but each rank reads only its rows of the embedding and of every block's
    parameters: safetensors slices (diffusers text_encoder/) or a memory-mapped .pth (original release)."""
    from transformers import UMT5Config, UMT5EncoderModel
    from safetensors import safe_open

    from .text_encoder import WanTextEncoder, load_tokenizer, locate, original_config, original_state

    diffusers, tok_dir, weights = locate(path)
    device = torch.device(device)
    files: dict[Path, object] = {}
    try:
        if diffusers:
            source, shapes = {}, {}
            for file in dit_weight_files(weights):
                files[file] = f = safe_open(str(file), framework="pt")
                for key in f.keys():
                    source[key], shapes[key] = (file, key), tuple(f.get_slice(key).get_shape())
            config = UMT5Config.from_pretrained(weights)
        else:
            state = original_state(weights)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            config = original_config(shapes)
        # The tied embedding is saved under either name (or both): one weight, read from whichever is there.
        embedding = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
        if embedding in shapes:
            shapes.setdefault("shared.weight", shapes[embedding])
            shapes.pop("encoder.embed_tokens.weight", None)
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        model.to(dtype).eval().requires_grad_(False)
        check_keys({name: tuple(p.shape) for name, p in model.named_parameters()}, shapes,
                   f"text encoder weights in {weights} do not fit UMT5")
        assert not list(model.buffers()), "UMT5 has buffers: to_empty would leave them unfilled"
        _shard_umt5(model, group, _mesh(group, device.type), prefetch=True)
        model.to_empty(device=device)

        def read_rows(name, start, stop):
            key = embedding if name == "shared.weight" else name
            if not diffusers:
                return state[key][start:stop]  # mmap: only these rows' pages are read
            file, key = source[key]
            return files[file].get_slice(key)[start:stop] if stop is not None else files[file].get_tensor(key)

        _fill(model, group, read_rows)
    finally:
        files.clear()
    return WanTextEncoder(model, load_tokenizer(tok_dir), text_len)


# -- reporting ---------------------------------------------------------------------------------------------------


def _modules(objects) -> list[nn.Module]:
    """nn.Modules of the arguments (a WanTextEncoder counts as its .model); None skipped."""
    out = []
    for m in objects:
        if m is None:
            continue
        m = m if isinstance(m, nn.Module) else getattr(m, "model", None)
        assert isinstance(m, nn.Module), f"not a module: {type(m).__name__}"
        out.append(m)
    return out


def _allocated_bytes(t: torch.Tensor) -> int:
    """Bytes this rank allocates for t: a DTensor sharded on dim 0 over a mesh of P ranks (FSDP2's) is a buffer of
    ceil(n / P) rows on every rank, the last ranks' shorter (or empty) views included; anything else its own size."""
    # No DTensor exists before its module is imported: an unsharded rank must not pay that import (~0.5 s on a
    # 2-core CPU) in its first request's memory report.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not isinstance(t, dtensor.DTensor):
        return t.numel() * t.element_size()
    from torch.distributed.tensor import Shard

    if t.ndim and tuple(t.placements) == (Shard(0),):
        return -(-t.shape[0] // t.device_mesh.size()) * math.prod(t.shape[1:]) * t.element_size()
    local = t.to_local()
    return local.numel() * local.element_size()


def resident_param_bytes(*modules, on: torch.device | None = None) -> int:
    """Bytes of the parameters and buffers this rank holds now, as allocated: a parameter sharded by FSDP2 counts
    its padded shard (ceil(n / P) rows on every rank: what FSDP2 allocates, and what pipeline.memory estimates),
    as does a VocabParallelEmbedding's weight (a plain tensor of that many rows); anything else its whole size; a
    tensor shared by modules once. on: only tensors on that device (an index-less device matches any index)."""
    seen: set[int] = set()
    total = 0
    for module in _modules(modules):
        for t in (*module.parameters(), *module.buffers()):
            if id(t) in seen:
                continue
            if on is not None and (t.device.type != on.type or on.index not in (None, t.device.index)):
                continue
            seen.add(id(t))
            total += _allocated_bytes(t)
    return total


def is_sharded(module) -> bool:
    """Whether `module` (or a WanTextEncoder's model), or any module inside it, was sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for root in _modules([module]) for m in root.modules())
