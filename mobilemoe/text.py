"""Tokenizer and chat template of a package (the HF `tokenizers` library and jinja2)."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from mobilemoe.errors import MobileMoEError, PackageError


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return value.get("content")
    return value


class TextCodec:
    def __init__(self, tokenizer_path: Path, chat_template: str | None, bos_id: int | None,
                 eos_ids: list[int]):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise PackageError(f"{tokenizer_path}: cannot read the tokenizer ({e})") from None
        config_path = tokenizer_path.parent / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackageError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise PackageError(f"{config_path}: not a JSON object")
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token")) or (
            self.tokenizer.id_to_token(bos_id) if bos_id is not None else None)
        self.eos_token = _token_text(config.get("eos_token")) or (
            self.tokenizer.id_to_token(eos_ids[0]) if eos_ids else None)
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation; plain concatenation if there is no template."""
        if self._template is None:
            return "".join(m["content"] for m in messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token or "",
                                         eos_token=self.eos_token or "")
        except TemplateError as e:
            raise MobileMoEError(f"chat template failed: {e}") from None


def _raise(message: str):
    raise TemplateError(message)


class StreamDecoder:
    """Turns generated ids into text pieces, holding back incomplete characters."""

    def __init__(self, codec: TextCodec):
        self._codec = codec
        self._ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._codec.decode(self._ids)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        piece = text[len(self.text):]
        self.text = text
        return piece
