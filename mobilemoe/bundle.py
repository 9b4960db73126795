"""Run a mobile bundle (`mobilemoe mobile`) with the desktop runtime: the same ORT-format
graphs and expert store an app loads, through ONNX Runtime's Python API.

A bundle's `manifest.json` is a package manifest whose graphs are `.ort` files, so `MoEModel`
reads it unchanged: `ort_sessions.create_session_with_weights` gives an ORT-format expert
template its weights with `add_initializer` (ONNX Runtime refuses `add_external_initializers`
for ORT-format models; docs/MOBILE.md has the evidence). `BundleModel` adds the bundle's
`mobile.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mobilemoe.errors import PackageError
from mobilemoe.expert_cache import EvictionPolicy
from mobilemoe.model import MoEModel

BUNDLE_MANIFEST = "mobile.json"
BUNDLE_FORMAT = "mobilemoe-mobile"
BUNDLE_VERSION = 1


class BundleModel(MoEModel):
    """MoEModel over a mobile bundle (or a package: both template forms work)."""

    def __init__(self, bundle: Path, *args: Any, **kwargs: Any):
        self.mobile = read_mobile_manifest(bundle)
        super().__init__(bundle, *args, **kwargs)


def read_mobile_manifest(bundle: Path) -> dict[str, Any]:
    path = Path(bundle) / BUNDLE_MANIFEST
    if not path.is_file():
        raise PackageError(f"{bundle}: no {BUNDLE_MANIFEST}; not a mobile bundle "
                           "(create one with `mobilemoe mobile PACKAGE -o BUNDLE`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise PackageError(f"{path}: not a mobilemoe bundle (format != {BUNDLE_FORMAT!r})")
    if data.get("format_version") != BUNDLE_VERSION:
        raise PackageError(f"{path}: bundle format {data.get('format_version')}, this runtime "
                           f"reads {BUNDLE_VERSION}: re-create it with `mobilemoe mobile`")
    return data


def load_bundle(path: str | Path, memory_budget: int | str | None = None,
                threads: int | None = None, context_length: int | None = None,
                policy: EvictionPolicy | None = None) -> BundleModel:
    """Load a mobile bundle like `mobilemoe.load` loads a package."""
    return BundleModel(Path(path).expanduser(), memory_budget, threads, context_length, policy)
