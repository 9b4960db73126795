"""ONNX -> ORT format, the operator config for a reduced ONNX Runtime build, and ONNX Runtime's
mobile usability check: the ONNX Runtime tooling a mobile bundle is made with.

Conversion follows `python -m onnxruntime.tools.convert_onnx_models_to_ort` (optimization
level "all", fixed style; NchwcTransformer off for ARM targets, `session.qdqisint8allowed` on)
but runs in-process, because an expert template cannot go through the tool: its weights are
declared external ("supplied at session creation") and ONNX Runtime must be handed arrays to
build the graph at all. The template is converted with zeros in their place; apps replace them
with `addInitializer` (docs/MOBILE.md says why not `addExternalInitializers`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mobilemoe.ort_sessions import session_options

# Android ABI -> the converter's target platform
ABIS = {"arm64-v8a": "arm", "armeabi-v7a": "arm", "x86_64": "amd64", "x86": "amd64"}


def supplied_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Zeros for every initializer whose data is external (supplied at session creation)."""
    out = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            out[t.name] = np.zeros(tuple(t.dims), dtype=dtype)
    return out


def weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The template with its supplied weights turned into graph inputs: the slow path
    (no prepacking) that the measurements compare the supplied-weights path against."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    supplied = [t for t in out.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    for t in supplied:
        out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    kept = [t for t in out.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def convert_to_ort(model_bytes: bytes, target: Path, platform: str = "arm") -> list[str]:
    """Write `model_bytes` (ONNX) to `target` in ORT format, optimized like the official tool.

    Returns the names of the initializers the graph expects to be supplied (each saved as
    zeros of its shape: ORT format has no external-data initializers).
    """
    model = onnx.load_model_from_string(model_bytes)
    supplied = supplied_initializers(model)
    so = session_options()  # the runtime's: honours its global thread pool if one is set
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(target)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "1" if platform == "arm" else "0")
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in supplied.values()]
    if supplied:  # the arrays and OrtValues must stay alive until the session is built
        so.add_external_initializers(list(supplied), values)
    disabled = ["NchwcTransformer"] if platform != "amd64" else None  # x86-only layout
    ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled)
    del values
    return list(supplied)


def write_operator_config(ort_models: list[Path], out: Path, root: Path) -> str:
    """`required_operators_and_types.config` for `build.sh --include_ops_by_config
    --enable_reduced_operator_type_support`, from the ORT-format models (paths in its
    comments are relative to `root`). Returns the config's text."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    tool_log = logging.getLogger("ort_format_model.utils")  # logs "Created config" at INFO
    level = tool_log.level
    tool_log.setLevel(logging.WARNING)
    try:
        create_config_from_models([p.resolve() for p in ort_models], out, enable_type_reduction=True)
    finally:
        tool_log.setLevel(level)
    prefix = str(root.resolve()) + "/"
    text = "".join(line.replace(prefix, "") if line.startswith("#") else line
                   for line in out.read_text().splitlines(keepends=True))
    out.write_text(text)
    return text


def config_operators(text: str) -> dict[str, set[str]]:
    """domain -> operator names listed in an operator config."""
    ops: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        domain, _opset, entries = line.split(";", 2)
        # entries: Op{"inputs": ...},Op2 — split on commas outside braces
        names = re.findall(r"(?:^|,)\s*([A-Za-z0-9_]+)(?=\{|,|$)", re.sub(r"\{[^{}]*\}", "", entries))
        ops.setdefault(domain, set()).update(names)
    return ops


_SUITABILITY = re.compile(r"Model should perform well with (.+?) as is: (\w+)")


def usability_report(model_bytes: bytes, name: str) -> tuple[str, dict[str, str]]:
    """ONNX Runtime's mobile usability checker on one graph: its log text, and per execution
    provider (NNAPI, CoreML) whether the model "should perform well as is" (YES/MAYBE/NO).

    The checker's own preparation (ONNX Runtime basic optimization, then ONNX shape inference)
    is done here with ONNX Runtime's symbolic shape inference instead, which knows contrib ops
    such as MatMulNBits: with ONNX's, a graph that starts with one (an expert template) gets
    no shapes and the checker gives up. External-data initializers are inlined as zeros.
    """
    from onnxruntime.tools.mobile_helpers import usability_checker
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load_model_from_string(model_bytes)
    supplied = supplied_initializers(model)
    if supplied:
        kept = [t for t in model.graph.initializer if t.name not in supplied]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept + [numpy_helper.from_array(a, n)
                                               for n, a in supplied.items()])
    buffer = io.StringIO()
    logger = logging.getLogger(f"mobilemoe.usability.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source, optimized = Path(tmp) / "source.onnx", Path(tmp) / name
            onnx.save_model(model, source)
            _optimize_basic(source, optimized)
            try:
                # On an op it cannot infer, the tool saves its partial model to the working
                # directory (sym_shape_infer_temp.onnx, external data beside it) and raises a
                # bare Exception: run it from `tmp`, and report the graph as not checked.
                with _working_directory(tmp):
                    shaped = SymbolicShapeInference.infer_shapes(onnx.load(optimized),
                                                                 auto_merge=True)
            except Exception as e:  # the tool raises nothing more specific
                return (f"not checked: ONNX Runtime's symbolic shape inference failed on {name} "
                        f"({e})", {})
            onnx.save_model(shaped, optimized)
            usability_checker.analyze_model(optimized, skip_optimize=True, logger=logger)
    finally:
        logger.removeHandler(handler)
    text = buffer.getvalue().replace(str(optimized), name)
    return text, dict(_SUITABILITY.findall(text))


@contextmanager
def _working_directory(path: str | Path) -> Iterator[None]:
    """contextlib.chdir, which needs Python 3.11. Process-wide: the exporter is one thread."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _optimize_basic(source: Path, target: Path) -> None:
    """onnxruntime.tools.onnx_model_utils.optimize_model (basic level, as the usability
    checker does), with the runtime's session options: its own would be refused in a process
    whose runtime has set a global thread pool."""
    so = session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(target)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                "external_data.pb")  # as the checker: graphs over 2 GB
    ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])


def graph_signature(model_bytes: bytes) -> tuple:
    """The graph's operators and input names: graphs with the same signature (the layers of a
    model) get the same usability verdict, so only one of them is checked."""
    model = onnx.load_model_from_string(model_bytes)
    ops = sorted({(n.domain or "ai.onnx", n.op_type) for n in model.graph.node})
    return tuple(ops), tuple(i.name for i in model.graph.input)
