"""Prompt files (.txt, .jsonl) and output names that never leave the output folder."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PromptSpec", "PromptFileError", "read_prompt_file", "slugify", "output_path", "OVERRIDABLE"]

# Per-prompt settings a .jsonl line may set (GenerateRequest fields).
OVERRIDABLE = {"steps": int, "guidance_scale": (int, float), "shift": (int, float), "sampler": str, "height": int,
               "width": int, "frames": int, "fps": int}
_KEYS = {"prompt", "name", "seed", "negative_prompt", *OVERRIDABLE}


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and line."""


@dataclass
class PromptSpec:
    prompt: str
    line: int
    name: str | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    overrides: dict = field(default_factory=dict)


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PromptFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM is fine
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not valid UTF-8") from None
    return text.splitlines()  # \n, \r\n and \r


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """.txt: one prompt per line, blank lines and '#' lines skipped. .jsonl: one object per line with 'prompt' and
    optional name, seed, negative_prompt and sampling/video settings. Any bad line -> PromptFileError(file:line)."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise PromptFileError(f"{path}: prompt files must be .txt or .jsonl")
    specs = []
    for number, line in enumerate(_read_lines(path), start=1):
        stripped = line.strip()
        if not stripped or (path.suffix.lower() == ".txt" and stripped.startswith("#")):
            continue
        specs.append(_txt_spec(stripped, number) if path.suffix.lower() == ".txt" else _jsonl_spec(path, stripped, number))
    if not specs:
        raise PromptFileError(f"{path}: no prompts")
    return specs


def _txt_spec(line: str, number: int) -> PromptSpec:
    return PromptSpec(prompt=line, line=number)


def _jsonl_spec(path: Path, line: str, number: int) -> PromptSpec:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise PromptFileError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_KEYS))})")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
    for key, kind in (("name", str), ("negative_prompt", str), *OVERRIDABLE.items()):
        if key in obj and (not isinstance(obj[key], kind) or isinstance(obj[key], bool)):
            raise PromptFileError(f"{where}: '{key}' has the wrong type ({obj[key]!r})")
    seed = obj.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise PromptFileError(f"{where}: 'seed' must be an integer in 0..2^63-1")
    return PromptSpec(prompt=prompt.strip(), line=number, name=obj.get("name"), seed=seed,
                      negative_prompt=obj.get("negative_prompt"),
                      overrides={k: obj[k] for k in OVERRIDABLE if k in obj})


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe ASCII slug: no separators, no dots, no way out of a folder; 'video' if nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:max_len].strip("-")
    return slug or "video"


def output_path(out_dir: Path, index: int, total: int, spec: PromptSpec) -> Path:
    """OUT_DIR/<zero-padded index>-<slug of name or prompt>.mp4, checked to be inside OUT_DIR."""
    width = max(4, len(str(total - 1)))
    path = out_dir / f"{index:0{width}d}-{slugify(spec.name or spec.prompt)}.mp4"
    if path.resolve().parent != out_dir.resolve():
        raise PromptFileError(f"output name for line {spec.line} escapes {out_dir}")  # unreachable by construction
    return path
