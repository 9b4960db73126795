"""Tokenizer, chat template and generation settings: copied so the package works offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(src: Path, out: Path) -> str | None:
    """Copy the tokenizer files; returns the tokenizer.json name, or None if there is none."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return "tokenizer.json" if (src / "tokenizer.json").is_file() else None


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def chat_template(src: Path) -> str | None:
    template = _load_json(src / "tokenizer_config.json").get("chat_template")
    if template is None and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def generation_settings(src: Path, config: dict) -> tuple[int | None, list[int], dict[str, Any]]:
    """bos id, eos ids and sampling defaults from generation_config.json (config.json as fallback)."""
    gen = _load_json(src / "generation_config.json")
    bos = gen.get("bos_token_id", config.get("bos_token_id"))
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    keep = ("temperature", "top_k", "top_p", "do_sample", "repetition_penalty")
    settings = {k: gen[k] for k in keep if gen.get(k) is not None}
    return bos, eos_ids, settings
