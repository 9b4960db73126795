"""Registered architectures, found by the checkpoint config's `model_type`.

Adding one: write `<name>.py` with a `SPEC` in this folder (every module that has one is
registered) and add its test entry (see docs/ADDING_AN_ARCHITECTURE.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from mobilemoe.errors import ExportError

from .base import ArchitectureSpec, Role, RouterSpec, TensorRef, claim_tensors


@cache
def registry() -> dict[str, ArchitectureSpec]:
    specs = {}
    for info in pkgutil.iter_modules(__path__):
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
        if spec is not None:
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
