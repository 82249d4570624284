"""Loading Wan DiT weights from a local folder: diffusers model folder, diffusers pipeline folder, or the original
release, of Wan2.1 (one DiT) or Wan2.2 (T2V-A14B: two experts; TI2V-5B: one 48-channel DiT). safetensors only; the
model is built on the meta device and the loaded tensors are assigned, so it is never materialised twice.

Where a model's DiTs are (dit_folders), high-noise expert first:
    a DiT folder                      config.json + safetensors                  [folder]
    a diffusers pipeline folder       transformer/ (+ transformer_2/)            [transformer (, transformer_2)]
    an original Wan2.1 / TI2V-5B      config.json + safetensors at the root      [root]
    an original Wan2.2 T2V-A14B       high_noise_model/ + low_noise_model/       [high_noise_model, low_noise_model]
"""

from __future__ import annotations

import contextlib
import dataclasses
import contextvars
import hashlib
import json
import math
import pickle
import re
import shlex
import struct
import zipfile
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .dit import WanDiT, WanDiTConfig

__all__ = ["load_dit", "read_dit_headers", "dit_weight_files", "read_dit_config", "check_keys", "rename_first",
           "WeightsError", "model_root", "inside_model", "read_header", "check_blocks", "file_fingerprint",
           "MAX_DIT_LAYERS", "user_path", "download_hint", "hint_preset", "WAN_REPOS", "MissingWeightsError",
           "dit_folders", "model_boundary_ratio", "one_dit", "EXPERT_FOLDERS", "PIPELINE_EXPERTS", "WAN_PRESETS",
           "read_model_json", "MAX_JSON_BYTES"]

MAX_DIT_LAYERS = 256  # Wan2.1 has 30 (1.3B) or 40 (14B): a header naming block 4999 must not build 5000 on meta
FINGERPRINT_BYTES = 1 << 20  # tensor data hashed per weight file when ranks compare what they loaded
MAX_JSON_BYTES = 16 << 20  # a model's config or index (a 14B index: ~100 KB); the driver and every rank read them

_COMFY_PREFIX = "model.diffusion_model."

# diffusers name -> original Wan2.1 name (the model's own), applied in order
_DIFFUSERS_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


class WeightsError(ValueError):
    """Weights that do not fit: missing or unknown files, keys or shapes."""


class MissingWeightsError(WeightsError):
    """Weight files that are not there (a download that never ran or was cut short): the loaders that know the
    model folder add download_hint to it."""


def read_model_json(file: Path):
    """The JSON of a model's config.json, model_index.json or safetensors index: WeightsError, one line naming the
    file, when it cannot be read, is over MAX_JSON_BYTES (read no further), is not JSON, or nests past the
    recursion limit (json raises RecursionError, which no loader's except catches)."""
    if not Path(file).is_file():  # a FIFO would block the open
        raise WeightsError(f"cannot read {file}: not a regular file")
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise WeightsError(f"cannot read {file}: {e.strerror or e}") from None
    if len(data) > MAX_JSON_BYTES:
        raise WeightsError(f"cannot read {file}: over {MAX_JSON_BYTES} bytes (not a model's JSON file)")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeightsError(f"cannot read {file}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
                           ) from None


def user_path(path) -> Path:
    """Path(path) with a leading ~ (or ~user) expanded: every loader that takes a model path takes '~/Wan2.1-...'.
    A config keeps model.path as written; each node expands it where it reads the weights."""
    return Path(path).expanduser()


WAN_REPOS = {"1.3B": "Wan-AI/Wan2.1-T2V-1.3B", "14B": "Wan-AI/Wan2.1-T2V-14B", "A14B": "Wan-AI/Wan2.2-T2V-A14B",
             "5B": "Wan-AI/Wan2.2-TI2V-5B"}
"""The Hugging Face repositories of the supported text-to-video models (the -Diffusers variants load too)."""

WAN_PRESETS = {"1.3B": "wan2.1-t2v-1.3b", "14B": "wan2.1-t2v-14b", "A14B": "wan2.2-t2v-a14b", "5B": "wan2.2-ti2v-5b"}
"""The preset of each model in WAN_REPOS."""

EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")
"""An original Wan2.2 T2V-A14B release's two DiTs, high-noise expert first (upstream's high/low_noise_checkpoint)."""

PIPELINE_EXPERTS = ("transformer", "transformer_2")
"""A diffusers pipeline's DiTs: transformer is the high-noise expert, transformer_2 (when there) the low-noise one."""


_HINT_PRESET: contextvars.ContextVar[str | None] = contextvars.ContextVar("odyssey_hint_preset", default=None)


@contextlib.contextmanager
def hint_preset(preset: str | None):
    """Within it, download_hint (from any loader's check) names the repository of the Wan size `preset` says
    (wan2.1-t2v-14b: the 14B one) before the folder's name, and says when the preset is not a Wan one (tiny's
    sizes and steps with Wan weights). The driver's check of a model folder runs in one; the ranks, which do not
    know the preset, go by the folder's name."""
    token = _HINT_PRESET.set(preset)
    try:
        yield
    finally:
        _HINT_PRESET.reset(token)


_SIZE_TAGS = (("14B", r"(?<!a)14b"), ("1.3B", r"1[._-]?3b"), ("A14B", r"a14b"), ("5B", r"(?<![\d.])5b"))


def _wan_sizes(name: str) -> list[str]:
    """The Wan models a folder or preset name says (keys of WAN_REPOS): ['14B'], ['A14B'], several or none."""
    name = name.lower()
    return [size for size, tag in _SIZE_TAGS if re.search(tag, name)]


def download_hint(path, preset: str | None = None) -> str:
    """How to put the weights at `path`: the `hf download` command for the Wan model the config's preset says
    (`preset`, else the hint_preset in effect), else the folder's name (Wan2.1 1.3B or 14B, Wan2.2 A14B or 5B; the
    1.3B one, naming the 14B repo as the alternative, when neither says), of the -Diffusers repo when the folder's
    name says so. A preset that is not a Wan one (tiny, cpu-smoke) also gets the --config that gives Wan's sizes
    and settings."""
    path = user_path(path)
    preset = preset if preset is not None else _HINT_PRESET.get()
    by_preset = _wan_sizes(preset) if preset else []
    sizes = by_preset if len(by_preset) == 1 else _wan_sizes(path.name)
    suffix = "-Diffusers" if "diffusers" in path.name.lower() else ""
    size = sizes[0] if len(sizes) == 1 else "1.3B"
    other = "" if len(sizes) == 1 else f"or {WAN_REPOS['14B']}{suffix}; "
    hint = (f"download the weights with `hf download {WAN_REPOS[size]}{suffix} --local-dir "
            f"{shlex.quote(str(path))}` ({other}hf comes with `pip install huggingface_hub`), or set model.path to "
            f"a folder that has them")
    if preset and not by_preset:
        wan = WAN_PRESETS[size]
        alt = "" if len(sizes) == 1 else " (or wan2.1-t2v-14b)"
        hint += (f"; preset {preset} keeps the embedded model's sizes and settings: add `--config {wan}`{alt} for "
                 f"Wan's")
    return hint


def check_keys(expected: dict[str, tuple], got: dict[str, tuple], what: str) -> None:
    """WeightsError naming every missing, unexpected and mis-shaped key (up to 8 of each)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = [f"{k} {got[k]} (expected {expected[k]})" for k in sorted(set(expected) & set(got))
                 if got[k] != expected[k]]
    problems = [f"{name} keys: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''} ({len(items)})"
                for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise WeightsError(f"{what}: " + "; ".join(problems))


def check_blocks(names, pattern: str, cap: int, what: str) -> int:
    """L, the number of blocks the names declare (pattern's group 1 is a block index), after checking from the
    names alone that the indices run 0..L-1, that L <= cap and that every block has block 0's key set: a hostile
    header otherwise makes us build (on meta, yet one module per block) whatever L it names. WeightsError."""
    blocks: dict[int, set[str]] = {}
    prefix: dict[int, str] = {}
    regex = re.compile(pattern)
    for name in names:
        if m := regex.match(name):
            if len(m.group(1)) > 6:
                raise WeightsError(f"{what}: block index {m.group(1)[:12]}... (at most {cap} blocks)")
            blocks.setdefault(int(m.group(1)), set()).add(name[m.end():])
            prefix[int(m.group(1))] = name[:m.end()]
    if not blocks:
        raise WeightsError(f"{what}: no blocks")
    top = max(blocks)
    if top >= cap:
        raise WeightsError(f"{what}: names block {top}, more than the {cap} blocks any supported model has")
    gaps = sorted(set(range(top + 1)) - set(blocks))
    if gaps:
        raise WeightsError(f"{what}: blocks 0..{top} named but {', '.join(map(str, gaps[:8]))} missing")
    if any(keys != blocks[0] for keys in blocks.values()):
        # Named against the key set most blocks share; with no majority, against the union (missing) and the
        # intersection (unexpected) of all blocks.
        counts = Counter(frozenset(keys) for keys in blocks.values()).most_common(2)
        if len(counts) == 1 or counts[0][1] > counts[1][1]:
            full = common = counts[0][0]
        else:
            full, common = set().union(*blocks.values()), set.intersection(*blocks.values())
        missing = [prefix[i] + k for i in sorted(blocks) for k in sorted(full - blocks[i])]
        unexpected = [prefix[i] + k for i in sorted(blocks) for k in sorted(blocks[i] - common)]
        detail = "; ".join(f"{kind} keys: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''} ({len(items)})"
                           for kind, items in (("missing", missing), ("unexpected", unexpected)) if items)
        raise WeightsError(f"{what}: blocks do not all have the same keys: {detail}")
    return top + 1


def read_header(file: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape of a safetensors file, from its header only; WeightsError naming the file when it is not one
    (a malformed header, a truncated file)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{file} is not a readable safetensors file: {str(e).splitlines()[0][:200]}") from None


def file_fingerprint(file: Path) -> str:
    """sha256 of a weight file's size, its safetensors header and the first FINGERPRINT_BYTES of tensor data
    (any other file: its first bytes): cheap, and two checkpoints of the same shapes but different weights (the
    same model trained further, another seed) differ in it."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        h.update(str(size).encode())
        head = f.read(8)
        h.update(head)
        if file.name.endswith(".safetensors") and len(head) == 8:
            n = struct.unpack("<Q", head)[0]
            h.update(f.read(min(n, max(size - 8, 0))))
        h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def model_root(folder: Path) -> Path:
    """The folder every weight, config and tokenizer file of a model must resolve inside: `folder` itself, or, for
    a Hugging Face hub cache snapshot (.../models--org--name/snapshots/<rev>/...), its cache entry, since a
    snapshot's files are links into the entry's blobs/."""
    root = user_path(folder).resolve()
    for parent in (root, *root.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
            return parent.parent.parent
    return root


def inside_model(root: Path, path: Path, what: str) -> Path:
    """`path` resolved (links followed) when it lies inside `root` (a model_root); else WeightsError. A link
    planted in a model folder must not make us read (or, for a .pth, unpickle) a file from anywhere else."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):  # a link loop
        resolved = None
    if resolved is None or not resolved.is_relative_to(root):
        raise WeightsError(f"{what} {path} points outside the model folder {root}; refusing to read it")
    return resolved


def _has_config(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _two_expert_hint(path: Path, two: bool = True) -> str:
    """download_hint for a folder that is evidently half of a two-expert model: Wan2.2 T2V-A14B's repository unless
    the preset in effect names a Wan model (then that one, as everywhere)."""
    preset = _HINT_PRESET.get()
    if not two or (preset and _wan_sizes(preset)):
        return download_hint(path)
    return download_hint(path, WAN_PRESETS["A14B"])


def dit_folders(path) -> list[Path]:
    """The DiT folders of the model at `path`, high-noise expert first: [one] for a single-DiT model, [high, low]
    for a two-expert one (see the module's table). WeightsError, one line naming what is missing, for a folder
    with no DiT or half of a two-expert model (one expert folder without the other, transformer_2/ without
    transformer/, a model_index.json naming a transformer_2 that is not there)."""
    path = user_path(path)
    if not path.exists():
        raise WeightsError(f"weights folder {path} does not exist: {download_hint(path)}")
    if not path.is_dir():
        raise WeightsError(f"{path} is not a folder; pass the folder that holds config.json and the weights")
    return [_inside_model_dit(path, folder) for folder in _dit_folders(path)]


def _inside_model_dit(path: Path, folder: Path) -> Path:
    """folder (as named) once it resolves inside the model folder: an expert folder linked elsewhere would make
    every file under it read from there (its shards are then checked against it, not the model)."""
    inside_model(model_root(path), folder, "DiT folder")
    return folder


def _dit_folders(path: Path) -> list[Path]:
    high, low = (path / name for name in PIPELINE_EXPERTS)
    experts = [path / name for name in EXPERT_FOLDERS]
    pipeline = [f"{folder.name}/" for folder in (high, low) if folder.exists()]
    original = [f"{folder.name}/" for folder in experts if folder.exists()]
    if pipeline and original:
        raise WeightsError(f"{path} holds both {' and '.join(pipeline)} (a diffusers pipeline) and "
                           f"{' and '.join(original)} (the original Wan2.2 release): keep one layout, or set "
                           f"model.path to the folder of the other")
    if pipeline:
        if not _has_config(high):
            what = "transformer_2/ (the low-noise expert) but " if low.exists() else ""
            raise MissingWeightsError(f"{path} holds {what}no transformer/config.json (the DiT; the high-noise "
                                      f"expert of a two-expert model); {_two_expert_hint(path, low.exists())}")
        if low.exists() or _index_names_transformer_2(path):
            if not _has_config(low):
                raise MissingWeightsError(
                    f"{path} holds transformer/ (the high-noise expert) but no transformer_2/config.json (the "
                    f"low-noise expert{', which model_index.json names' if _index_names_transformer_2(path) else ''}"
                    f"); {_two_expert_hint(path)}")
            return [high, low]
        return [high]
    if original:
        missing = [f"{folder.name}/" + ("config.json" if folder.exists() else "") for folder in experts
                   if not _has_config(folder)]
        if missing:
            have = [f"{folder.name}/" for folder in experts if _has_config(folder)]
            raise MissingWeightsError(
                f"{path} holds half of a two-expert model (Wan2.2 T2V-A14B): {' and '.join(have) or 'neither'} "
                f"but no {' and no '.join(missing)}; {_two_expert_hint(path)}")
        return experts
    if _has_config(path):
        return [path]
    raise WeightsError(
        f"{path} holds no DiT: expected config.json (a diffusers model or original Wan2.1 / TI2V-5B folder), "
        f"transformer/config.json (a diffusers pipeline folder) or high_noise_model/ and low_noise_model/ (the "
        f"original Wan2.2 T2V-A14B); {download_hint(path)}"
    )


def _model_index(path: Path) -> dict:
    """model_index.json of a diffusers pipeline folder as a dict; {} when there is none."""
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    raw = read_model_json(index)
    if not isinstance(raw, dict):
        raise WeightsError(f"{index} is not a JSON object")
    return raw


def _index_names_transformer_2(path: Path) -> bool:
    entry = _model_index(path).get("transformer_2")
    return isinstance(entry, list) and any(item is not None for item in entry)


def model_boundary_ratio(path) -> float | None:
    """The boundary_ratio a diffusers pipeline folder's model_index.json gives (Wan2.2 T2V-A14B-Diffusers: 0.875),
    None where it gives none (null, absent, no model_index.json: the original release). WeightsError when it is
    not a number in (0, 1)."""
    path = user_path(path)
    ratio = _model_index(path).get("boundary_ratio")
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise WeightsError(f"{path / 'model_index.json'}: boundary_ratio must be a number in (0, 1), got "
                           f"{json.dumps(ratio)[:40]}")
    return float(ratio)


def _dit_folder(path: Path) -> Path:
    """The (first, high-noise) DiT folder of the model at `path`, the whole model's layout checked."""
    return dit_folders(path)[0]


def dit_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a DiT folder: one file, or the shards an index names. Only regular files count
    (checked before any is opened: a FIFO named *.safetensors would block the reader forever)."""
    indexes = sorted(f for f in folder.glob("*.safetensors.index.json") if f.is_file())
    if indexes:
        raw = read_model_json(indexes[0])
        try:
            names = set(raw["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"{indexes[0]} is not a safetensors index (a JSON object with a weight_map)") from None
        root = model_root(folder)
        files = sorted(_shard_inside(folder, root, name, indexes[0]) for name in names)
        missing = [str(f.relative_to(root)) for f in files if not f.is_file()]
        if missing:
            raise MissingWeightsError(f"{indexes[0]} names shards that are not there (or not regular files): "
                               f"{', '.join(missing)}")
        return files
    root = model_root(folder)
    files = sorted(f for f in (inside_model(root, f, "weights file") for f in folder.glob("*.safetensors"))
                   if f.is_file())
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
        hint = f" (found {', '.join(others)}: only safetensors are loaded, for safety)" if others else ""
        raise MissingWeightsError(f"no .safetensors weights in {folder}{hint}")
    return files


def _shard_inside(folder: Path, root: Path, name: object, index: Path) -> Path:
    """folder/name, resolved, when it lies inside root (model_root(folder); links followed). An index is data from
    whoever made the checkpoint: an absolute name, '..' or a link out of the folder would read any file, and 'not
    there' would tell which exist. Decided before anything outside is touched, with one message whatever is
    there."""
    try:
        path = (folder.resolve() / name).resolve() if isinstance(name, str) and name and "\x00" not in name else None
    except (OSError, RuntimeError):  # a link loop
        path = None
    if path is None or path == root or not path.is_relative_to(root) or not path.name.endswith(".safetensors"):
        raise WeightsError(f"{index} names a shard outside its folder or not a .safetensors file: {name!r:.80}")
    return path


def rename_first(key: str, table: list[tuple[str, str]]) -> str | None:
    """key rewritten by the first (regex, replacement) of table that matches it, or None."""
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def _our_name(key: str, diffusers: bool) -> str:
    if key.startswith(_COMFY_PREFIX):
        key = key[len(_COMFY_PREFIX):]
    return (rename_first(key, _DIFFUSERS_TO_ORIGINAL) or key) if diffusers else key


def read_dit_config(raw: dict, shapes: dict[str, tuple[int, ...]]) -> WanDiTConfig:
    """WanDiTConfig from a config.json (diffusers or original keys) and the weights' shapes (our names), which
    supply what the config omits (original configs have no text_dim or patch_size)."""
    # ti2v (Wan2.2 TI2V-5B): its DiT takes no image input of its own (an image would enter through the latents)
    if raw.get("image_dim") or raw.get("added_kv_proj_dim") or raw.get("model_type", "t2v") not in ("t2v", "ti2v",
                                                                                                  None):
        raise WeightsError(
            f"only text-to-video Wan checkpoints are supported; this one is "
            f"{raw.get('model_type') or 'image-conditioned (image_dim / added_kv_proj_dim set)'}"
        )
    if any(k.startswith("img_emb.") or ".k_img." in k for k in shapes):
        raise WeightsError("only text-to-video Wan checkpoints are supported; these weights have image inputs")
    for key in ("patch_embedding.weight", "text_embedding.0.weight", "head.head.weight", "blocks.0.ffn.0.weight"):
        if key not in shapes:
            raise WeightsError(f"weights lack {key}: not a Wan2.1 DiT checkpoint")
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    heads = raw.get("num_heads", raw.get("num_attention_heads"))
    if heads is None:
        raise WeightsError("config.json has neither num_heads nor num_attention_heads")
    qk_norm = raw.get("qk_norm", True)
    if isinstance(qk_norm, str):
        if qk_norm != "rms_norm_across_heads":
            raise WeightsError(f"unsupported qk_norm {qk_norm!r}")
        qk_norm = True
    if tuple(raw.get("window_size", (-1, -1))) != (-1, -1):
        raise WeightsError(f"windowed attention is not supported (window_size {raw['window_size']})")
    layers = check_blocks(shapes, r"blocks\.(\d+)\.", MAX_DIT_LAYERS, "DiT weights")
    cfg = WanDiTConfig(
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_heads=int(heads),
        num_layers=layers,
        in_dim=in_dim,
        out_dim=shapes["head.head.weight"][0] // math.prod(patch),
        text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes.get("time_embedding.0.weight", (0, raw.get("freq_dim", 256)))[1],
        patch_size=tuple(patch),
        eps=float(raw.get("eps", 1e-6)),
        qk_norm=bool(qk_norm),
        cross_attn_norm=bool(raw.get("cross_attn_norm", True)),
        text_len=int(raw.get("text_len", 512)),
    )
    declared = {"dim": raw.get("dim"), "num_layers": raw.get("num_layers"), "ffn_dim": raw.get("ffn_dim")}
    if "attention_head_dim" in raw:
        declared["dim"] = raw["attention_head_dim"] * int(heads)
    wrong = [f"{k}={v} (weights: {getattr(cfg, k)})" for k, v in declared.items() if v is not None and v != getattr(cfg, k)]
    if wrong:
        raise WeightsError(f"config.json disagrees with the weights: {', '.join(wrong)}")
    return cfg


def read_dit_headers(path, *, model=None) -> tuple[Path, WanDiTConfig, dict[str, tuple[Path, str]],
                                                   dict[str, tuple[int, ...]]]:
    """(DiT folder, its config, our name -> (file, key in file), our name -> shape) from config.json and the
    safetensors headers only: no tensor is read. model: the model folder `path` (an expert's folder) lies in, the
    one a missing shard's download hint names (default: `path`)."""
    folder = _dit_folder(user_path(path))
    raw = read_model_json(folder / "config.json")
    source: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    if not isinstance(raw, dict):
        raise WeightsError(f"{folder / 'config.json'} is not a JSON object")
    try:
        files = dit_weight_files(folder)
    except MissingWeightsError as e:
        raise MissingWeightsError(f"{e}; {download_hint(path if model is None else model)}") from None
    for file in files:
        header = read_header(file)
        diffusers = any(k.startswith(("condition_embedder.", "proj_out.")) for k in header) or (
            "_diffusers_version" in raw
        )
        for key, shape in header.items():
            ours = _our_name(key, diffusers)
            source[ours] = (file, key)
            shapes[ours] = shape
    return folder, read_dit_config(raw, shapes), source, shapes


def read_dit_configs(path) -> tuple[list[Path], list[WanDiTConfig]]:
    """(dit_folders(path), each DiT's config from its config.json and safetensors headers), high-noise expert
    first; WeightsError naming the first differences when a two-expert model's experts differ in shape."""
    folders = dit_folders(path)
    configs = [read_dit_headers(folder, model=path)[1] for folder in folders]
    if len(configs) == 2 and configs[0] != configs[1]:
        high, low = configs
        fields = [f"{f.name} {getattr(high, f.name)} vs {getattr(low, f.name)}" for f in dataclasses.fields(high)
                  if getattr(high, f.name) != getattr(low, f.name)]
        raise WeightsError(f"the two experts in {user_path(path)} ({folders[0].name}/, {folders[1].name}/) differ: "
                           f"{', '.join(fields[:4])}: both must have the same shape")
    return folders, configs


def one_dit(path) -> None:
    """WeightsError unless the model at `path` has one DiT: a two-expert folder's root names two, and loading
    "the" DiT of it would silently pick one expert."""
    folders = dit_folders(path)
    if len(folders) > 1:
        raise WeightsError(f"{user_path(path)} holds two DiTs (the high- and low-noise experts of a two-expert "
                           f"model): load {folders[0]} or {folders[1]} (load_components loads both)")


def load_dit(path, *, device="cpu", dtype: torch.dtype | None = None, attention_backend: str = "auto") -> WanDiT:
    one_dit(path)
    # Shapes first (headers only): the config needs them and every mismatch is reported before any tensor loads.
    folder, cfg, source, shapes = read_dit_headers(path)

    with torch.device("meta"):
        model = WanDiT(cfg, attention_backend=attention_backend)
    check_keys({name: tuple(p.shape) for name, p in model.named_parameters()}, shapes,
               f"weights in {folder} do not fit the Wan2.1 DiT")

    state = {}
    by_file: dict[Path, list[str]] = {}
    for ours, (file, _) in source.items():
        by_file.setdefault(file, []).append(ours)
    load_device = str(torch.device(device))
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device=load_device) as f:
            for ours in names:
                t = f.get_tensor(source[ours][1])
                want = torch.float32 if WanDiT.keeps_fp32(ours) else (dtype or t.dtype)
                state[ours] = t.to(want) if t.dtype != want else t
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_pth(path: Path, checked=lambda key: True) -> dict[str, torch.Tensor]:
    """An original release's .pth as {name: tensor}, memory-mapped (weights_only: no code runs; mmap: a tensor's
    pages are read only when used). WeightsError naming the file (one line) for anything but a dict of named
    tensors, or for a tensor `checked(name)` selects whose shape its storage does not back (see backed)."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"{path} is not a loadable weights file: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path} holds a {type(raw).__name__}, not a dict of tensors")
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: {str(key)[:80]} is a {type(value).__name__}, not a tensor")
        # the shapes decide what is built: a view over a short storage could declare gigabytes it does not hold
        if checked(key) and not backed(value):
            raise WeightsError(f"{path}: {key} declares {tuple(value.shape)} over {value.untyped_storage().nbytes()}"
                               f" bytes of data (a zero stride or a short storage); refusing it")
    return raw


def backed(t: torch.Tensor) -> bool:
    """Whether every element of t has its own bytes in its storage: a zero stride (an expand()ed row) or a storage
    smaller than the view lets a 51 KB file declare gigabytes, which a loader would then allocate."""
    if t.numel() == 0:
        return True
    if any(stride == 0 for size, stride in zip(t.shape, t.stride()) if size > 1):
        return False
    extent = t.storage_offset() + 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    have = t.untyped_storage().nbytes()
    return have >= extent * t.element_size() and have >= t.numel() * t.element_size()
