"""Run a mobile bundle (`mobilemoe mobile`) with the desktop runtime: the same ORT-format
graphs and expert store an app loads, through ONNX Runtime's Python API.

A bundle's `manifest.json` is a package manifest whose graphs are `.ort` files, so `MoEModel`
reads it unchanged — except for one call: an ORT-format expert template must be given its
weights with `add_initializer` (ONNX Runtime refuses `add_external_initializers` for
ORT-format models: "Trying to replace non-external initializer with external data").
`BundleModel` overrides only that call; docs/MOBILE.md has the evidence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mobilemoe.errors import PackageError
from mobilemoe.expert_cache import EvictionPolicy
from mobilemoe.model import MoEModel
from mobilemoe.ort_sessions import create_session, create_session_with_weights, session_options

BUNDLE_MANIFEST = "mobile.json"
BUNDLE_FORMAT = "mobilemoe-mobile"
BUNDLE_VERSION = 1
ORT_MAGIC = b"ORTM"  # flatbuffer file identifier at bytes 4..8 of an ORT-format model


def is_ort_format(model: bytes) -> bool:
    return model[4:8] == ORT_MAGIC


def create_session_with_initializers(template: bytes, arrays: dict[str, np.ndarray]
                                     ) -> ort.InferenceSession:
    """A session of an ORT-format `template` whose placeholder initializers are `arrays`.

    ONNX Runtime prepacks them like any constant weight (the fast MatMulNBits path). It does
    not copy them: they must outlive the session, so the session keeps a reference.
    """
    so = session_options()
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
    for name, value in zip(arrays, values, strict=True):
        so.add_initializer(name, value)
    session = create_session(template, so)
    session._mobilemoe_weights = (arrays, values)  # keep alive for the session's life
    return session


def expert_session(template: bytes, arrays: dict[str, np.ndarray]) -> ort.InferenceSession:
    """An expert session from either template form: ORT format (bundles) or ONNX with
    external-data initializers (packages)."""
    if is_ort_format(template):
        return create_session_with_initializers(template, arrays)
    return create_session_with_weights(template, list(arrays), list(arrays.values()))


class BundleModel(MoEModel):
    """MoEModel over a mobile bundle (or a package: both template forms work)."""

    def __init__(self, bundle: Path, *args: Any, **kwargs: Any):
        self.mobile = read_mobile_manifest(bundle)
        super().__init__(bundle, *args, **kwargs)

    def _expert_session(self, layer: int, expert: int):
        arrays = self._store.read(layer, expert)
        return expert_session(self._templates[self._template_of(layer, expert)], arrays)


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
