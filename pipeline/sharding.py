"""Weights sharded over the replica with FSDP2 (torch's fully_shard): each rank keeps 1/P of every block's rows and
gathers a block's full weights just before it runs, freeing them after, the next block's gather prefetched so it
overlaps the current block's compute. Pure torch: knows no config and no Ray (the Runner decides when).

Legend: P ranks in the group, n rows of a parameter (its dim 0), c = ceil(n / P) rows per rank (FSDP2 shards dim 0
like torch.chunk: rank r holds rows [r*c, min((r+1)*c, n)), possibly none).

What is sharded and what is not:
- WanDiT: each of dit.blocks is its own FSDP module (reshard_after_forward); the root is an FSDP module too but
  ignores every non-block parameter (patch/text/time embeddings, head: ~0.24 B of 14B's 14 B), which stays whole
  on every rank. The root must be an FSDP module: without one each block is its own root, and a root never
  reshards after forward (FSDP2's heuristic), so nothing would be saved.
- umt5-xxl: each encoder block, and the token embedding (256k x 4096, 2.1 GB in bf16; shared with
  encoder.embed_tokens, so both names are made one module) as its own FSDP module; the root ignores the rest (the
  final norm).
Loading never materialises a whole model on one rank: the model is built on the meta device, sharded, given
empty local storage, then each rank reads only its own rows (safetensors get_slice, or a memory-mapped .pth).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .dit import WanDiT
from .weights import check_keys, dit_weight_files, read_dit_headers

__all__ = ["fsdp_unavailable", "shard_dit", "load_dit_sharded", "shard_text_encoder", "load_text_encoder_sharded",
           "resident_param_bytes", "is_sharded"]

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

    _shard_stack(dit, list(dit.blocks), mesh, prefetch)
    for name in DIT_FORWARD_METHODS:
        register_fsdp_forward_method(dit, name)
    return dit


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
    whole tensor when stop is None. A sharded parameter (DTensor) reads only this rank's rows."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            local = p.to_local()
            start, stop = _row_range(p.shape[0], group)
            assert local.shape[0] == stop - start, (name, tuple(local.shape), p.shape[0])
            if stop > start:
                local.copy_(read_rows(name, start, stop))
        else:
            p.copy_(read_rows(name, 0, None))


def load_dit_sharded(path, group, *, device, dtype, attention_backend="auto") -> WanDiT:
    """Like weights.load_dit, but each rank reads only its rows of each block parameter (meta build, no full copy)."""
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


def _shard_umt5(model: nn.Module, mesh, prefetch: bool) -> nn.Module:
    """model: transformers' UMT5EncoderModel. Its token embedding is two modules sharing one weight (shared,
    encoder.embed_tokens); made one module so FSDP shards the weight once and the encoder's call gathers it."""
    assert model.shared.weight is model.encoder.embed_tokens.weight, "the token embedding is not tied"
    model.set_input_embeddings(model.shared)  # encoder.embed_tokens becomes the same module
    # The embedding runs first: it prefetches block 0 like each block the next.
    _shard_stack(model, [model.shared, *model.encoder.block], mesh, prefetch)
    return model


def shard_text_encoder(encoder, group):
    """Shard an already built WanTextEncoder's umt5 over `group` (in place; returns it). Every rank of the group
    must then call encode with the same prompts at the same time (each layer's forward is a collective)."""
    _shard_umt5(encoder.model, _mesh(group, _device_type(encoder.model)), prefetch=True)
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
        _shard_umt5(model, _mesh(group, device.type), prefetch=True)
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


def resident_param_bytes(*modules) -> int:
    """Bytes of the parameters and buffers this rank holds now (a sharded parameter counts its local shard)."""
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0
    for module in _modules(modules):
        for t in (*module.parameters(), *module.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            local = t.to_local() if isinstance(t, DTensor) else t
            total += local.numel() * local.element_size()
    return total


def is_sharded(module) -> bool:
    """Whether `module` (or a WanTextEncoder's model), or any module inside it, was sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for root in _modules([module]) for m in root.modules())
