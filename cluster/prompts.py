"""Prompt files (.txt, .jsonl) and output names that never leave the output folder."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from configs import LimitsConfig

__all__ = ["PromptSpec", "PromptFileError", "read_prompt_file", "slugify", "output_path", "printable", "OVERRIDABLE",
           "UNPRINTABLE"]

# Per-prompt settings a .jsonl line may set (GenerateRequest fields).
OVERRIDABLE = {"steps": int, "guidance_scale": (int, float), "low_noise_guidance_scale": (int, float),
               "shift": (int, float), "sampler": str, "height": int,
               "width": int, "frames": int, "fps": int, "cache": str, "cache_threshold": (int, float)}
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


def _read_lines(path: Path, limits: LimitsConfig) -> list[str]:
    try:
        with open(path, "rb") as f:
            raw = f.read(limits.max_prompt_file_bytes + 1)  # bounded even for a FIFO, /dev/zero or a growing file
    except OSError as e:
        raise PromptFileError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > limits.max_prompt_file_bytes:
        raise PromptFileError(f"{path}: larger than {limits.max_prompt_file_bytes} bytes "
                              f"(limits.max_prompt_file_bytes); split it into several batches")
    # \n, \r\n and \r end lines; counted on the bytes so a million-line file is refused before it is split
    lines = raw.count(b"\n") + raw.count(b"\r") - raw.count(b"\r\n") + (not raw.endswith((b"\n", b"\r")))
    if lines > limits.max_prompt_lines:
        raise PromptFileError(f"{path}: {lines} lines, more than {limits.max_prompt_lines} (limits.max_prompt_lines); "
                              f"split it into several batches")
    try:
        text = raw.decode("utf-8-sig")  # a BOM is fine
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not valid UTF-8") from None
    return re.split(r"\r\n|\r|\n", text)  # not str.splitlines: it also splits on \f, \x1c, \x85, \u2028...


def read_prompt_file(path: str | Path, limits: LimitsConfig | None = None) -> list[PromptSpec]:
    """.txt: one prompt per line, blank lines and '#' lines skipped. .jsonl: one object per line with 'prompt' and
    optional name, seed, negative_prompt and sampling/video settings. Any bad line -> PromptFileError(file:line).
    The file's size, its line count and each prompt's length are capped by `limits` (default: LimitsConfig())."""
    path = Path(path)
    limits = limits or LimitsConfig()
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise PromptFileError(f"{path}: prompt files must be .txt or .jsonl")
    specs = []
    for number, line in enumerate(_read_lines(path, limits), start=1):
        stripped = line.strip()
        if not stripped or (path.suffix.lower() == ".txt" and stripped.startswith("#")):
            continue
        spec = _txt_spec(stripped, number) if path.suffix.lower() == ".txt" else _jsonl_spec(path, stripped, number)
        for what, text in (("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt or ""),
                           ("name", spec.name or "")):
            if len(text) > limits.max_prompt_chars:
                raise PromptFileError(f"{path}:{number}: the {what} has {len(text)} characters, more than "
                                      f"{limits.max_prompt_chars} (limits.max_prompt_chars)")
        specs.append(spec)
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
    except ValueError:  # an integer of more than 4300 digits
        raise PromptFileError(f"{where}: not valid JSON (a number too long)") from None
    except RecursionError:
        raise PromptFileError(f"{where}: not valid JSON (nested too deeply)") from None
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
    # Cut first: normalising and lower-casing copy the text several times, and only its start can reach the slug
    # (a run of symbols collapses to one '-'; NFKD only ever expands). 8x keeps room for leading symbols.
    text = text[: 8 * max_len]
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:max_len].strip("-")
    return slug or "video"


# C0, DEL and C1 controls, line/paragraph separators and bidi overrides: what can move a terminal's cursor, clear
# it, or forge a log line or reorder how text reads.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object, max_len: int | None = None) -> str:
    """str(text) safe to echo to a terminal or a log: every control character shown as an escape (\\x1b, \\n);
    cut to max_len characters (before escaping: a long prompt costs nothing to print)."""
    text = str(text)
    cut = max_len is not None and len(text) > max_len
    text = text[:max_len] if cut else text
    shown = UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return shown + "..." if cut else shown


def output_path(out_dir: Path, index: int, total: int, spec: PromptSpec) -> Path:
    """OUT_DIR/<zero-padded index>-<slug of name or prompt>.mp4, checked to be inside OUT_DIR."""
    width = max(4, len(str(total - 1)))
    path = out_dir / f"{index:0{width}d}-{slugify(spec.name or spec.prompt)}.mp4"
    if path.resolve().parent != out_dir.resolve():
        raise PromptFileError(f"output name for line {spec.line} escapes {out_dir}")  # unreachable by construction
    return path
