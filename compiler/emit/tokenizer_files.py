"""Put the source's tokenizer into the artifact as tokenizer.json, the one file the runtime reads.

The runtime uses the `tokenizers` library alone (no transformers in a serving process), so a model that
ships only a slow tokenizer is converted to its fast form here, at compile time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from ...errors import SourceError, first_line

# Copied as-is when present: tokenizer.json is what the runtime loads, the rest keeps the artifact usable
# by transformers' AutoTokenizer too.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "generation_config.json",
)


def write_tokenizer(out_dir: Path, tokenizer=None, source_dir: Path | None = None) -> list[str]:
    """Write tokenizer files into ``out_dir``; return their names ([] when the source has no tokenizer)."""
    if tokenizer is not None:
        (out_dir / "tokenizer.json").write_text(tokenizer.to_str())
        return ["tokenizer.json"]
    if source_dir is None:
        return []
    written = []
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
            written.append(name)
    if "tokenizer.json" in written:
        require_readable_tokenizer(out_dir / "tokenizer.json", source_dir / "tokenizer.json")
    elif written:
        fast = _convert_to_fast(source_dir)
        if fast is not None:
            fast.save(str(out_dir / "tokenizer.json"))
            written.append("tokenizer.json")
    return written


def require_readable_tokenizer(path: Path, source: Path) -> None:
    """Parse tokenizer.json with the runtime's own library now: a file it cannot read would otherwise be
    published, hashed as intact, and fail on the first request."""
    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception with serde's message
        raise SourceError(f"{source}: the tokenizers library cannot read it ({first_line(exc)})") from None


def _convert_to_fast(source_dir: Path):
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source_dir, use_fast=True, trust_remote_code=False, local_files_only=True)
    except Exception:  # a tokenizer we cannot convert is not fatal: the artifact still runs on token ids
        return None
    return getattr(tok, "backend_tokenizer", None)


def generation_ids_beside(path: Path) -> dict:
    """bos/eos/pad ids from a config.json or generation_config.json next to an ONNX file, if any."""
    ids: dict = {}
    for name in ("config.json", "generation_config.json"):
        f = path.parent / name
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError:
                continue
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if data.get(key) is not None:
                    ids[key] = data[key]
    return ids


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def write_chat_template(out_dir: Path, source_dir: Path | None = None, template: str | None = None,
                        special: dict | None = None) -> dict | None:
    """Put the model's chat template into the artifact as chat_template.jinja; returns the manifest's
    ``chat_template`` record (file, bos_token, eos_token) or None when the model has none.

    From ``template`` (a zoo model's), else the source directory's chat_template.jinja, else
    tokenizer_config.json's ``chat_template`` (a string, or a list of named templates: "default").
    """
    config = _tokenizer_config(source_dir) if source_dir is not None else {}
    if template is None and source_dir is not None and (source_dir / CHAT_TEMPLATE_FILE).is_file():
        template = (source_dir / CHAT_TEMPLATE_FILE).read_text()
    if template is None:
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
    if not isinstance(template, str) or not template.strip():
        return None
    (out_dir / CHAT_TEMPLATE_FILE).write_text(template)
    special = special or {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    return {"file": CHAT_TEMPLATE_FILE, "bos_token": special.get("bos_token"), "eos_token": special.get("eos_token")}


def _tokenizer_config(source_dir: Path) -> dict:
    path = source_dir / "tokenizer_config.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None
