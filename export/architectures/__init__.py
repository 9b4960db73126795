"""Registered architectures, found by the checkpoint config's `model_type`.

Adding one: write `<name>.py` with a `SPEC`, list it in `_MODULES`, add its test entry
(see docs/ADDING_AN_ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib

from mobilemoe.errors import ExportError

from .base import ArchitectureSpec, Role, RouterSpec, TensorRef, claim_tensors

_MODULES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "gpt_oss",
            "deepseek_v2", "deepseek_v3")


def registry() -> dict[str, ArchitectureSpec]:
    specs = {}
    for module in _MODULES:
        spec = importlib.import_module(f"{__name__}.{module}").SPEC
        specs[spec.model_type] = spec
    return specs


def find_spec(config: dict) -> ArchitectureSpec:
    model_type = config.get("model_type")
    specs = registry()
    if model_type not in specs:
        arch = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise ExportError(
            f"unsupported architecture: model_type {model_type!r} ({arch}); "
            f"supported: {', '.join(sorted(specs))}"
        )
    return specs[model_type]


__all__ = [
    "ArchitectureSpec", "Role", "RouterSpec", "TensorRef", "claim_tensors", "find_spec", "registry"
]
