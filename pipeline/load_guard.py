"""Every rank of a replica must have loaded the same model: ranks on different nodes read model.path on their own
node, and two nodes may hold different folders there (another size, another version, a half-finished copy).
Different shapes make the sharded weights' all-gathers mismatch (a gloo abort, an NCCL hang until the watchdog);
the same shapes with different weights silently mix the ranks' rows into one video. So after loading, each rank
describes what it loaded (model_record) and the Runner compares them all (one all_gather) with check_same_models.

A record: the DiT's config, a hash of its parameters' names, global shapes and dtypes (both experts' for a two-expert
model, the low-noise one's after the high-noise one's), a hash of each weight file's
size, safetensors header and first MiB of tensor data (weights.file_fingerprint: cheap, and different weights of
the same shapes differ in it), the same for the text encoder when every rank runs it (sharded), and the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
from pathlib import Path

import torch
from torch import nn

from .weights import dit_folders, file_fingerprint, read_dit_headers

__all__ = ["model_record", "check_same_models", "encode_record", "decode_record", "RECORD_BYTES"]

RECORD_BYTES = 2048  # one record as a fixed-size uint8 tensor (all_gather needs equal sizes)


def _param_hash(module: nn.Module) -> str:
    """sha256 of (name, global shape, dtype) of every parameter (a sharded one counts its whole shape)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(f"{name} {tuple(p.shape)} {p.dtype}\n".encode())
    return h.hexdigest()


def _files_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for file in files:
        h.update(f"{file.name} {file_fingerprint(file)}\n".encode())
    return h.hexdigest()


def _text_files(path: Path) -> list[Path]:
    from .text_encoder import locate
    from .weights import dit_weight_files

    diffusers, _, weights = locate(path)
    return dit_weight_files(weights) if diffusers else [weights]


def _vae_files(path: Path) -> list[Path]:
    from .vae_weights import _locate

    found = _locate(path)
    return [found] if found.is_file() else [found / "diffusion_pytorch_model.safetensors"]


def model_record(dit, path, text_encoder=None, decoder=None, dit_low=None) -> dict:
    """What this rank loaded: dit (a WanDiT; the high-noise expert of a two-expert model, dit_low the low-noise
    one), path its model.path (None: the embedded model, no files), the text encoder when every rank holds (a shard
    of) it and encodes, the decoder when every rank decodes a band."""
    params = _param_hash(dit) if dit_low is None else hashlib.sha256(
        f"{_param_hash(dit)} {_param_hash(dit_low)}".encode()).hexdigest()
    record = {"host": socket.gethostname()[:64],
              "config": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(dit.config).items()},
              "params": params[:32], "files": "", "text": "", "vae": ""}
    record["config"]["experts"] = 1 if dit_low is None else 2
    if decoder is not None:
        files = _files_hash(_vae_files(Path(path))) if path is not None else ""
        record["vae"] = hashlib.sha256((_param_hash(decoder) + files).encode()).hexdigest()[:32]
    if path is not None:  # every expert's files, each expert's in order (high-noise first)
        files = []
        for folder in dit_folders(path):
            _, _, source, _ = read_dit_headers(folder)
            files += sorted({file for file, _ in source.values()})
        record["files"] = _files_hash(files)[:32]
    if text_encoder is not None:
        files = _files_hash(_text_files(Path(path))) if path is not None else ""
        record["text"] = hashlib.sha256((_param_hash(text_encoder.model) + files).encode()).hexdigest()[:32]
    return record


def encode_record(record: dict) -> torch.Tensor:
    data = json.dumps(record, sort_keys=True).encode()
    assert len(data) <= RECORD_BYTES, f"load record of {len(data)} bytes"
    out = torch.zeros(RECORD_BYTES, dtype=torch.uint8)
    out[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def decode_record(row: torch.Tensor) -> dict:
    data = bytes(row.cpu().numpy().tobytes()).rstrip(b"\0")
    return json.loads(data)


def _difference(mine: dict, first: dict) -> tuple[str, str]:
    """(what differs: 'DiT' or 'text encoder', how) between a rank's record and rank 0's."""
    if mine["config"] != first["config"]:
        fields = [f"{k} {first['config'].get(k)} vs {mine['config'].get(k)}"
                  for k in sorted(set(first["config"]) | set(mine["config"]))
                  if first["config"].get(k) != mine["config"].get(k)]
        return "DiT", ", ".join(fields[:4])
    if mine["params"] != first["params"]:
        return "DiT", "the same config, different parameter names, shapes or dtypes"
    if mine["files"] != first["files"]:
        return "DiT", "the same shapes, different weight files (size, header or first MiB of data)"
    if mine["text"] != first["text"]:
        return "text encoder", "different text encoder weights (shapes, sizes, headers or first MiB of data)"
    return "VAE decoder", "different VAE weights (shapes, sizes, headers or first MiB of data)"


def check_same_models(records: list[dict]) -> None:
    """ValueError (one line, the same on every rank) when a rank's record differs from rank 0's: names the ranks
    that differ, the first difference and the hosts."""
    first = records[0]
    keys = ("config", "params", "files", "text", "vae")
    bad = [r for r, rec in enumerate(records) if any(rec[k] != first[k] for k in keys)]
    if not bad:
        return
    what, how = _difference(records[bad[0]], first)
    hosts = ", ".join(f"rank {r} on {records[r]['host']}" for r in [0, *bad][:5])
    raise ValueError(f"ranks {bad} loaded a different {what} than rank 0 (model.path on their nodes: {how}; "
                     f"{hosts}): give every node the same model folder")
