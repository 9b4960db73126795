"""mobilemoe package -> app-ready bundle for ONNX Runtime Mobile (Android, iOS).

    BUNDLE/
      mobile.json                 the app manifest: files, graphs, ONNX Runtime package, budget,
                                  threads, usability verdicts (written last: no mobile.json, no bundle)
      manifest.json               the package manifest, rewritten: graphs -> .ort, store re-laid;
                                  its experts[] and templates{} are the expert index
      graphs/*.ort                every graph in ORT format (expert templates carry zeros where
                                  the weights go; apps replace them with addInitializer)
      experts.bin                 expert blocks at 16 KiB-aligned offsets (mmap-able on 4 KiB and
                                  16 KiB page devices), crc32 per block in manifest.json
      tokenizer.json ...          copied as they are
      required_operators_and_types.config    for a reduced ONNX Runtime build
      reports/mobile_usability.txt           ONNX Runtime's mobile usability checker, per graph

Written into a hidden `.NAME.partial-PID` folder and renamed into place when complete, like
the exporter: a failed or interrupted run leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

from mobilemoe import __version__
from mobilemoe.bundle import BUNDLE_FORMAT, BUNDLE_MANIFEST, BUNDLE_VERSION
from mobilemoe.cache_policies import DEFAULT_POLICY
from mobilemoe.checksum import crc32
from mobilemoe.errors import ExportError, PackageError
from mobilemoe.manifest import MANIFEST_FILE, Manifest, resolve_inside
from mobilemoe.planner import BUDGET_RULE, Device, plan, plan_table
from mobilemoe.units import parse_bytes

from .atomic import atomic_folder
from .ort_format import (
    ABIS,
    config_operators,
    convert_to_ort,
    graph_signature,
    usability_report,
    write_operator_config,
)

# 16 KiB: the page size of iOS and of Android 15+ 16 KB-page devices, a multiple of 4 KiB.
BUNDLE_ALIGNMENT = 16384
OPERATOR_CONFIG = "required_operators_and_types.config"
USABILITY_REPORT = "reports/mobile_usability.txt"
ANDROID_PACKAGE = "com.microsoft.onnxruntime:onnxruntime-android"
# Set on expert-template sessions: the template bytes (a memory-mapped .ort) are used in place,
# and its placeholder initializers are never copied.
TEMPLATE_SESSION_CONFIG = {"session.use_ort_model_bytes_directly": "1",
                           "session.use_ort_model_bytes_for_initializers": "1"}


def export_mobile(package: str | Path, out: str | Path, ram: int | str = "8GB",
                  abi: str = "arm64-v8a", threads: int = 4, overwrite: bool = False,
                  log: Callable[[str], None] | None = None) -> Path:
    """Write an app-ready bundle of `package` to `out`; returns the bundle folder.

    ram: the target device's RAM (the budget recommendation follows the planner's rule);
    abi: the Android ABI the graphs are optimized for; threads: intra-op threads to recommend.
    """
    if abi not in ABIS:
        raise ExportError(f"unknown ABI {abi!r}; choose one of {', '.join(ABIS)}")
    ram = parse_bytes(ram)
    if threads < 1:
        raise ExportError(f"threads must be at least 1, got {threads}")
    package, out = Path(package).expanduser(), Path(out).expanduser()
    manifest = Manifest.load(package)  # PackageError if missing or invalid
    if out.resolve() == package.resolve() or package.resolve() in out.resolve().parents:
        raise ExportError(f"{out}: the bundle cannot be written into the package itself")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (choose another -o, or pass --overwrite)")
    say = log or (lambda message: None)

    with atomic_folder(out) as tmp:
        _write_bundle(package, manifest, tmp, ram, abi, threads, say)
    return out


def _write_bundle(package: Path, manifest: Manifest, tmp: Path, ram: int, abi: str,
                  threads: int, say: Callable[[str], None]) -> None:
    raw = json.loads((package / MANIFEST_FILE).read_text())
    graphs = _convert_graphs(package, raw, tmp, ABIS[abi], say)
    say("laying out the expert store")
    store = _relayout_store(package, manifest, raw, tmp)
    copied = _copy_other_files(package, manifest, tmp)
    (tmp / MANIFEST_FILE).write_text(json.dumps(raw, indent=1))
    bundled = Manifest.load(tmp)  # the rewritten manifest must pass the runtime's checks

    say("writing the reduced-build operator config")
    config = write_operator_config([tmp / g["path"] for g in graphs], tmp / OPERATOR_CONFIG, tmp)
    say("running ONNX Runtime's mobile usability checker")
    usability = _usability(package, graphs, tmp)
    the_plan = plan(tmp, Device(ram=ram, threads=threads))
    app = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "created_by": f"mobilemoe {__version__}",
        "abi": abi,
        "model": _model_info(bundled),
        "package_manifest": MANIFEST_FILE,
        "graphs": {"embed": bundled.embed_graph.path,
                   "layers": [g.path for g in bundled.layer_graphs],
                   "head": bundled.head_graph.path},
        "expert_templates": {
            tid: {"graph": t.graph.path, "weights_call": "addInitializer",
                  "initializers": [s.name for s in t.tensors],
                  "session_config": TEMPLATE_SESSION_CONFIG,
                  "graph_optimization": "disable_all"}  # final graphs: saves ~0.5 ms a page-in
            for tid, t in bundled.templates.items()},
        "expert_store": {"path": store["path"], "size": store["size"],
                         "alignment": BUNDLE_ALIGNMENT, "index": f"{MANIFEST_FILE}: experts[]",
                         "tensors": f"{MANIFEST_FILE}: templates.*.tensors[]",
                         "checksum": "crc32 (zlib) of each block, in experts[]"},
        "tokenizer": bundled.tokenizer_file,
        "onnxruntime": _runtime_info(tmp / graphs[0]["path"], config),
        "session": {"intra_op_threads": threads, "global_thread_pool": True,
                    "memory_arena": False, "memory_pattern": False, "execution_provider": "CPU"},
        "cache_policy": DEFAULT_POLICY,  # mobilemoe.cache_policies, docs/CACHE_POLICIES.md
        "memory": {
            "ram": ram, "budget": the_plan.budget, "rule": BUDGET_RULE, "fits": the_plan.fits,
            "minimum_budget": the_plan.minimum_budget, "minimum_ram": the_plan.minimum_ram,
            "all_resident_budget": the_plan.all_resident_budget,
            "expert_capacity": the_plan.expert_capacity, "experts_total": the_plan.experts_total,
            "expert_session_bytes": the_plan.expert_session_bytes,
            "predicted": {"hit_rate": round(the_plan.hit_rate, 4), "routing": "uniform"
                          if the_plan.routing == "uniform" else "routing_profile.json",
                          "tokens_per_second": round(the_plan.tokens_per_second, 3),
                          "tokens_per_second_overlapped":
                              round(the_plan.tokens_per_second_overlapped, 3)},
            "device_assumed": the_plan.device,
            "by_ram": plan_table(tmp, Device(ram=ram, threads=threads)),
        },
        "usability": usability,
        "operator_config": OPERATOR_CONFIG,
        "files": _file_list(tmp, {store["path"]}),
        "copied": copied,
    }
    # mobile.json last: a folder without one is never mistaken for a bundle.
    (tmp / BUNDLE_MANIFEST).write_text(json.dumps(app, indent=1))


# -- graphs -----------------------------------------------------------------------------------


def _graph_refs(node: Any, found: list[dict]) -> list[dict]:
    """Every file reference to an ONNX graph in the raw manifest (whatever field holds it)."""
    if isinstance(node, dict):
        if isinstance(node.get("path"), str) and node["path"].endswith(".onnx") and "size" in node:
            found.append(node)
        else:
            for value in node.values():
                _graph_refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _graph_refs(value, found)
    return found


def _convert_graphs(package: Path, raw: dict, tmp: Path, platform: str,
                    say: Callable[[str], None]) -> list[dict]:
    """Convert every graph to ORT format, rewriting its reference in `raw` in place."""
    converted = []
    for ref in _graph_refs(raw, []):
        source = ref["path"]
        data = resolve_inside(package, source).read_bytes()
        if ref.get("sha256") and hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise PackageError(f"{package}: {source} does not match its checksum "
                               "(corrupt or modified; re-export the package)")
        target = source[: -len(".onnx")] + ".ort"
        (tmp / target).parent.mkdir(parents=True, exist_ok=True)
        say(f"converting {source} -> {target}")
        supplied = convert_to_ort(data, tmp / target, platform)
        out = (tmp / target).read_bytes()
        ref.update(path=target, size=len(out), sha256=hashlib.sha256(out).hexdigest())
        converted.append({"path": target, "source": source, "supplied": supplied})
    return converted


def _usability(package: Path, graphs: list[dict], tmp: Path) -> dict[str, Any]:
    """Check one graph of each kind (layers share their operators) with ONNX Runtime's
    mobile usability checker; the full log goes to reports/mobile_usability.txt."""
    seen, verdicts, texts = set(), {}, []
    for g in graphs:
        data = resolve_inside(package, g["source"]).read_bytes()
        signature = graph_signature(data)
        if signature in seen:
            continue
        seen.add(signature)
        text, verdict = usability_report(data, Path(g["source"]).name)
        verdicts[g["source"]] = verdict
        texts.append(f"===== {g['source']} =====\n{text}\n")
    report = tmp / USABILITY_REPORT
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("".join(texts))
    any_ep = any(v != "NO" for verdict in verdicts.values() for v in verdict.values())
    return {"report": USABILITY_REPORT, "checked": verdicts,
            "recommendation": "try NNAPI / CoreML against the CPU EP" if any_ep else
            "CPU execution provider (NNAPI and CoreML cannot run MatMulNBits)"}


def _runtime_info(any_ort_graph: Path, config: str) -> dict[str, Any]:
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    session = InferenceSession.InferenceSession.GetRootAs(any_ort_graph.read_bytes(), 0)
    ops = config_operators(config)
    return {
        "package": ANDROID_PACKAGE,
        "min_version": ort.__version__,
        "why": "ORT-format models load in the ONNX Runtime that converted them or newer "
               "(no forward compatibility); the full AAR has every operator",
        "model_format": f"ORT format v{session.OrtVersion().decode()}",
        "converted_with": ort.__version__,
        "expert_weights": "SessionOptions.addInitializer (addExternalInitializers is refused "
                          "for ORT-format models and absent from minimal builds)",
        "reduced_build": {
            "supported": True,
            "config": OPERATOR_CONFIG,
            "build_flags": f"--minimal_build --include_ops_by_config {OPERATOR_CONFIG} "
                           "--enable_reduced_operator_type_support",
            "operators": {domain: sorted(names) for domain, names in sorted(ops.items())},
        },
    }


# -- expert store and other files -------------------------------------------------------------


def _relayout_store(package: Path, manifest: Manifest, raw: dict, tmp: Path) -> dict[str, Any]:
    """Copy every expert block to a BUNDLE_ALIGNMENT-aligned offset, checking its crc32, and
    rewrite the offsets in `raw` (entries keep their order in the manifest)."""
    source = resolve_inside(package, manifest.expert_store.path)
    target = tmp / manifest.expert_store.path
    target.parent.mkdir(parents=True, exist_ok=True)
    entries = raw["experts"]
    with open(source, "rb") as fin, open(target, "wb") as fout:
        for e in sorted(entries, key=lambda e: e["offset"]):
            block = os.pread(fin.fileno(), e["length"], e["offset"])
            if len(block) != e["length"] or crc32(block) != e["crc32"]:
                raise PackageError(f"{source.name}: expert {e['layer']}/{e['expert']} is "
                                   "truncated or corrupt (re-export the package)")
            offset = -(-fout.tell() // BUNDLE_ALIGNMENT) * BUNDLE_ALIGNMENT
            fout.write(b"\0" * (offset - fout.tell()))
            fout.write(block)
            e["offset"] = offset
        size = fout.tell()
    raw["store_alignment"] = BUNDLE_ALIGNMENT
    raw["expert_store"]["size"] = size
    return {"path": manifest.expert_store.path, "size": size}


def _copy_other_files(package: Path, manifest: Manifest, tmp: Path) -> list[str]:
    """Tokenizer files, a routing profile, ...: every regular file the manifest does not
    describe, copied as is (symlinks and anything outside the package are skipped)."""
    handled = {MANIFEST_FILE, manifest.expert_store.path}
    handled |= {ref["path"] for ref in _graph_refs(json.loads(
        (package / MANIFEST_FILE).read_text()), [])}
    copied = []
    for path in sorted(package.rglob("*")):
        relative = path.relative_to(package).as_posix()
        if relative in handled or path.is_symlink() or not path.is_file():
            continue
        if any(part.startswith(".") for part in path.relative_to(package).parts):
            continue
        resolve_inside(package, relative)
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, tmp / relative)
        copied.append(relative)
    return copied


def _file_list(root: Path, unhashed: set[str]) -> list[dict[str, Any]]:
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        entry: dict[str, Any] = {"path": relative, "size": path.stat().st_size}
        if relative not in unhashed:
            entry["sha256"] = _sha256(path)
        files.append(entry)
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_info(m: Manifest) -> dict[str, Any]:
    d, q = m.dims, m.quantization
    return {"model_type": m.model_type, "architecture": m.hf_architecture,
            "layers": d.num_layers, "experts": d.num_experts, "top_k": m.routing.top_k,
            "hidden_size": d.hidden_size, "vocab_size": d.vocab_size,
            "max_position_embeddings": d.max_position_embeddings,
            "expert_bits": q.expert_bits, "dense_bits": q.dense_bits, "block_size": q.block_size,
            "bos_token_id": m.bos_token_id, "eos_token_ids": m.eos_token_ids}
