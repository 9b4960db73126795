"""`mobilemoe mobile`: an app-ready bundle runs in ONNX Runtime with logits bit-identical to the
desktop package, from its ORT-format graphs; how expert weights reach an ORT-format template;
the bundle's files; and every way writing one can fail."""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from checkpoints import build_mixtral
from mobilemoe.cli.main import app
from mobilemoe.export import export_model
from mobilemoe.export import mobile as mobile_module
from mobilemoe.export.mobile import BUNDLE_ALIGNMENT, export_mobile
from mobilemoe.export.ort_format import usability_report
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.tools.reduced_build_config_parser import parse_config
from typer.testing import CliRunner

import mobilemoe
from mobilemoe.bundle import load_bundle
from mobilemoe.errors import ExportError, MobileMoEError, PackageError
from mobilemoe.expert_store import ExpertStore
from mobilemoe.manifest import Manifest
from mobilemoe.ort_sessions import (
    create_session,
    create_session_with_weights,
    is_ort_format,
    session_options,
)
from mobilemoe.planner import recommended_budget, write_routing_profile

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 300, 12, 8, 77, 91, 160, 3]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mobile")
    build_mixtral(root / "ckpt", num_local_experts=8, num_hidden_layers=2)
    return export_model(root / "ckpt", root / "tiny.mmoe", progress=False)


@pytest.fixture(scope="module")
def bundle(package, tmp_path_factory) -> Path:
    return export_mobile(package, tmp_path_factory.mktemp("bundle") / "tiny.bundle", ram="8GB")


@pytest.fixture(scope="module")
def app_manifest(bundle) -> dict:
    return json.loads((bundle / "mobile.json").read_text())


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


# -- the bundle runs, bit-identical -----------------------------------------------------------


def test_bundle_logits_are_bit_identical_to_the_package_under_eviction(package, bundle):
    expected = mobilemoe.load(package).logits(PROMPT)
    resident = load_bundle(bundle)
    assert np.array_equal(resident.logits(PROMPT), expected)
    assert all(is_ort_format(t) for t in resident._templates.values())
    tight = load_bundle(bundle, memory_budget=resident.plan.tightest_budget)
    assert np.array_equal(tight.logits(PROMPT), expected)
    assert tight.stats.evictions > 0


def test_bundle_generates_the_same_text(package, bundle):
    a = [t.token_id for t in mobilemoe.load(package).generate("The quick brown", max_new_tokens=10)]
    b = [t.token_id for t in load_bundle(bundle).generate("The quick brown", max_new_tokens=10)]
    assert a == b


def test_every_graph_in_the_bundle_is_ort_format(bundle):
    m = Manifest.load(bundle)
    refs = [m.embed_graph, *m.layer_graphs, m.head_graph, *(t.graph for t in m.templates.values())]
    assert all(r.path.endswith(".ort") and is_ort_format((bundle / r.path).read_bytes())
               for r in refs)
    assert not list(bundle.rglob("*.onnx"))


# -- how expert weights reach an ORT-format template (docs/MOBILE.md) -------------------------


def test_ort_template_takes_weights_through_add_initializer_only(package, bundle):
    pm, bm = Manifest.load(package), Manifest.load(bundle)
    (tid, t), = pm.templates.items()
    onnx_template = (package / t.graph.path).read_bytes()
    ort_template = (bundle / bm.templates[tid].graph.path).read_bytes()
    store = ExpertStore(package, pm)
    x = np.random.default_rng(0).standard_normal((3, pm.dims.hidden_size)).astype(np.float32)
    try:
        for key in [(0, 0), (1, 5)]:
            arrays = store.read(*key)
            expected = create_session_with_weights(onnx_template, list(arrays),
                                                   list(arrays.values())).run(None, {"x": x})[0]
            session = create_session_with_weights(ort_template, list(arrays), list(arrays.values()))
            assert np.array_equal(session.run(None, {"x": x})[0], expected)
            # ONNX Runtime prepacked its own copy: the arrays are not read after creation.
            for a in arrays.values():
                a[...] = 0
            assert np.array_equal(session.run(None, {"x": x})[0], expected)
            # Why an ORT-format template takes add_initializer: ONNX Runtime refuses the other.
            options = session_options()
            options.add_external_initializers(
                list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
            with pytest.raises(Exception, match="non-external initializer"):
                create_session(ort_template, options)
    finally:
        store.close()
    # Without weights the template runs on its zero placeholders.
    plain = create_session(ort_template)
    assert not plain.run(None, {"x": x})[0].any()


@pytest.mark.slow
def test_ort_template_with_add_initializer_keeps_the_prepacked_fast_path():
    """Run time of one expert (OLMoE-sized, ~4 MB at int4), M=1: ORT template + add_initializer
    vs ONNX template + add_external_initializers vs the weights fed as graph inputs."""
    import tempfile

    from mobilemoe.export.model_graphs import expert_template_graph, expert_tensor_shapes
    from mobilemoe.export.ort_format import convert_to_ort, weights_as_inputs

    hidden, inter = 2048, 1024
    model = expert_template_graph(hidden, inter, 4, 32, 4)
    shapes = expert_tensor_shapes(hidden, inter, 4, 32)
    rng = np.random.default_rng(0)
    weights = {n: rng.integers(0, 256, s, dtype=np.uint8) if d == np.uint8 else
               (rng.random(s, dtype=np.float32) * 0.01) for n, (d, s) in shapes.items()}
    tmp = Path(tempfile.mkdtemp())
    convert_to_ort(model.SerializeToString(), tmp / "t.ort")
    as_inputs = weights_as_inputs(model)
    x = rng.standard_normal((1, hidden)).astype(np.float32)

    def per_run(session, feeds, n=20):
        session.run(None, feeds)
        start = time.perf_counter()
        for _ in range(n):
            session.run(None, feeds)
        return (time.perf_counter() - start) / n

    external = per_run(create_session_with_weights(model.SerializeToString(), list(weights),
                                                   list(weights.values())), {"x": x})
    initializer = per_run(create_session_with_weights((tmp / "t.ort").read_bytes(), list(weights),
                                                      list(weights.values())), {"x": x})
    inputs = per_run(create_session(as_inputs.SerializeToString()), {"x": x, **weights}, n=3)
    shutil.rmtree(tmp)
    assert initializer < 3 * external
    assert inputs > 10 * initializer


# -- what the bundle holds --------------------------------------------------------------------


def test_app_manifest_lists_every_file_with_sizes_and_checksums(bundle, app_manifest):
    assert app_manifest["format"] == "mobilemoe-mobile" and app_manifest["format_version"] == 1
    listed = {f["path"]: f for f in app_manifest["files"]}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"mobile.json"}
    for path, f in listed.items():
        assert (bundle / path).stat().st_size == f["size"]
    assert "sha256" not in listed["experts.bin"]  # each block has its crc32 instead
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(app_manifest["copied"])
    assert app_manifest["tokenizer"] == "tokenizer.json"


def test_expert_store_is_page_aligned_and_intact(package, bundle, app_manifest):
    m = Manifest.load(bundle)
    assert m.store_alignment == BUNDLE_ALIGNMENT == app_manifest["expert_store"]["alignment"]
    assert all(e.offset % BUNDLE_ALIGNMENT == 0 for e in m.experts)
    data = (bundle / m.expert_store.path).read_bytes()
    original = {(e.layer, e.expert): e for e in Manifest.load(package).experts}
    for e in m.experts:
        block = data[e.offset:e.offset + e.length]
        assert zlib.crc32(block) == e.crc32 == original[(e.layer, e.expert)].crc32


def test_runtime_package_and_reduced_build_config(bundle, app_manifest):
    runtime = app_manifest["onnxruntime"]
    assert runtime["package"] == "com.microsoft.onnxruntime:onnxruntime-android"
    assert runtime["min_version"] == ort.__version__
    assert runtime["model_format"].startswith("ORT format v")
    assert "addInitializer" in runtime["expert_weights"]
    config = bundle / runtime["reduced_build"]["config"]
    text = config.read_text()
    assert ".partial-" not in text and str(bundle.parent) not in text  # relative paths only
    required_ops, _ = parse_config(str(config))  # ONNX Runtime's own build-config parser
    assert {"MatMulNBits", "GroupQueryAttention"} <= required_ops["com.microsoft"][1]
    assert {"Gather", "Reshape"} <= set().union(*required_ops["ai.onnx"].values())
    assert "MatMulNBits" in runtime["reduced_build"]["operators"]["com.microsoft"]


def test_usability_report_covers_each_kind_of_graph(bundle, app_manifest):
    usability = app_manifest["usability"]
    checked = usability["checked"]
    assert set(checked) == {"graphs/embed.onnx", "graphs/layer_000.onnx", "graphs/head.onnx",
                            *(f"graphs/{t}.onnx" for t in app_manifest["expert_templates"])}
    assert all(v["NNAPI"] in ("YES", "MAYBE", "NO") for v in checked.values())
    report = (bundle / usability["report"]).read_text()
    assert "com.microsoft:MatMulNBits" in report and "CoreML MLProgram" in report
    assert "CPU" in usability["recommendation"]


def test_a_graph_shape_inference_cannot_handle_is_reported_unchecked(tmp_path, monkeypatch):
    # FusedMatMul (com.microsoft) runs in ONNX Runtime, but its symbolic shape inference does
    # not know it: it used to raise and leave its partial model in the working directory.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", alpha=2.0)
    w = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    graph = helper.make_graph([node], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    create_session(model.SerializeToString())  # a valid graph
    monkeypatch.chdir(tmp_path)
    text, verdict = usability_report(model.SerializeToString(), "fused.onnx")
    assert verdict == {} and text.startswith("not checked:") and "fused.onnx" in text
    assert list(tmp_path.iterdir()) == []


def test_budget_recommendation_follows_the_planner_rule(app_manifest):
    memory = app_manifest["memory"]
    assert memory["ram"] == 8_000_000_000 and memory["fits"]
    assert memory["budget"] == min(recommended_budget(8_000_000_000), memory["all_resident_budget"])
    assert [row["ram"] for row in memory["by_ram"]][:3] == [4e9, 6e9, 8e9]
    assert app_manifest["session"]["intra_op_threads"] == 4
    assert app_manifest["expert_templates"] and all(
        t["weights_call"] == "addInitializer" for t in app_manifest["expert_templates"].values())


def test_a_routing_profile_travels_with_the_bundle(package, tmp_path):
    profiled = shutil.copytree(package, tmp_path / "profiled.mmoe")
    d = Manifest.load(profiled).dims
    write_routing_profile(profiled / "routing_profile.json",
                          [[8.0, 8.0] + [1.0] * (d.num_experts - 2)] * d.num_layers)
    out = export_mobile(profiled, tmp_path / "b", ram="8GB")
    app_manifest = json.loads((out / "mobile.json").read_text())
    assert "routing_profile.json" in app_manifest["copied"]
    assert app_manifest["memory"]["predicted"]["routing"] == "routing_profile.json"


# -- failures: clear errors, nothing half-written ---------------------------------------------


def test_missing_package(tmp_path):
    with pytest.raises(PackageError, match="not a folder"):
        export_mobile(tmp_path / "nope.mmoe", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_left_alone(package, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_mobile(package, out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs, error", [
    ({"ram": "8 gigs"}, "not a byte size"),
    ({"ram": "-1GB"}, "not a byte size"),
    ({"abi": "mips"}, "unknown ABI"),
    ({"threads": 0}, "threads"),
])
def test_bad_arguments(package, tmp_path, kwargs, error):
    with pytest.raises(MobileMoEError, match=error):
        export_mobile(package, tmp_path / "out", **kwargs)
    assert _siblings(tmp_path / "out") == []


def test_bundle_inside_the_package_is_refused(package):
    with pytest.raises(ExportError, match="into the package"):
        export_mobile(package, package / "bundle")


def test_corrupt_expert_store_fails_and_leaves_nothing(package, tmp_path):
    broken = shutil.copytree(package, tmp_path / "broken.mmoe")
    m = Manifest.load(broken)
    e = m.experts[-1]
    with open(broken / m.expert_store.path, "r+b") as f:
        f.seek(e.offset + 10)
        byte = f.read(1)
        f.seek(e.offset + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PackageError, match="corrupt"):
        export_mobile(broken, tmp_path / "out")
    assert _siblings(tmp_path / "out") == ["broken.mmoe"]


def test_interrupted_overwrite_keeps_the_old_bundle(package, bundle, tmp_path, monkeypatch):
    old = shutil.copytree(bundle, tmp_path / "b")
    before = (old / "mobile.json").read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mobile_module, "write_operator_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_mobile(package, old, overwrite=True)
    assert (old / "mobile.json").read_text() == before
    assert _siblings(old) == ["b"]


def test_overwrite_replaces_a_finished_bundle(package, bundle, tmp_path):
    old = shutil.copytree(bundle, tmp_path / "b")
    (old / "stale.txt").write_text("old")
    export_mobile(package, old, ram="6GB", overwrite=True)
    assert not (old / "stale.txt").exists()
    assert json.loads((old / "mobile.json").read_text())["memory"]["ram"] == 6_000_000_000


def test_load_bundle_refuses_a_plain_package(package):
    with pytest.raises(PackageError, match="not a mobile bundle"):
        load_bundle(package)


# -- the command line -------------------------------------------------------------------------


def test_cli_mobile(package, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.bundle"
    result = runner.invoke(app, ["mobile", str(package), "-o", str(out), "--ram", "6GB",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime-android" in result.output and (out / "mobile.json").is_file()
    again = runner.invoke(app, ["mobile", str(package), "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


@pytest.mark.parametrize("args, fragment", [
    (["--ram", "lots"], "not a byte size"),
    (["--abi", "sparc"], "unknown ABI"),
])
def test_cli_mobile_errors_are_one_line(package, tmp_path, args, fragment):
    result = CliRunner().invoke(app, ["mobile", str(package), "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.output


def test_cli_mobile_missing_package(tmp_path):
    result = CliRunner().invoke(app, ["mobile", str(tmp_path / "none"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "not a folder" in result.output


def test_app_manifest_carries_the_runtime_session_choices(app_manifest):
    """What an app must set to behave like the desktop runtime."""
    assert app_manifest["session"]["memory_pattern"] is False
    assert app_manifest["cache_policy"] == "dlfu"
    assert all(t["graph_optimization"] == "disable_all"
               for t in app_manifest["expert_templates"].values())
