"""Fused experts (one QMoE kernel per layer, everything resident): the same experts, weights and
routes as the per-expert path; only float32 sums may round differently."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from architectures import ARCHITECTURES
from checkpoints import build_checkpoint, build_mixtral
from mobilemoe.cli.main import app
from mobilemoe.export import export_model
from typer.testing import CliRunner

import mobilemoe
from mobilemoe.errors import MobileMoEError
from mobilemoe.fused_experts import FusedLayerExperts, qmoe_model, stacked_bytes

NAMES = sorted(ARCHITECTURES)
PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 300, 12, 8, 77, 91, 160, 3]
# QMoE needs hidden and intermediate sizes that are multiples of the block size (32 here).
DIMS = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def package(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"fused{request.param}")
    build_mixtral(root / "ckpt", **DIMS)
    return export_model(root / "ckpt", root / "pkg", bits=request.param, block_size=32,
                        progress=False)


def test_the_hand_serialized_graph_is_valid_onnx():
    model = onnx.load_from_string(qmoe_model(
        64, 8, 2, 4, 32, 4, {"fc1": (8, 192, 32), "fc1_scales": (8, 192, 2),
                             "fc2": (8, 64, 48), "fc2_scales": (8, 64, 3)}))
    (node,) = model.graph.node
    assert (node.op_type, node.domain) == ("QMoE", "com.microsoft")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["k"] == 2 and attrs["block_size"] == 32 and attrs["activation_type"] == b"swiglu"
    assert attrs["activation_alpha"] == 1.0 and attrs["normalize_routing_weights"] == 0
    assert list(node.input)[:7] == ["x", "probs", "fc1", "fc1_scales", "", "fc2", "fc2_scales"]
    assert node.input[14] == "weights"
    assert [list(t.dims) for t in model.graph.initializer] == [
        [8, 192, 32], [8, 192, 2], [8, 64, 48], [8, 64, 3]]
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in model.graph.input]
    assert dims == [["N", 64], ["N", 8], ["N", 8]]


def test_each_expert_inside_qmoe_matches_its_own_session(package):
    model = mobilemoe.load(package)
    d = model.dims
    fused = FusedLayerExperts(model._store, 1, d.num_experts, d.top_k, d.hidden_size,
                              d.intermediate_size, model.manifest.quantization.expert_bits,
                              32, model.manifest.quantization.accuracy_level)
    q = model.manifest.quantization
    weights, scales = stacked_bytes(d.hidden_size, d.intermediate_size, d.num_experts,
                                    q.expert_bits, 32)
    store_bytes = sum(e.length for e in model.manifest.experts if e.layer == 1)
    assert weights + scales == store_bytes  # what the store holds for a layer, restacked
    x = np.random.default_rng(0).standard_normal((3, d.hidden_size), dtype=np.float32)
    for expert in range(d.num_experts):
        other = (expert + 1) % d.num_experts  # QMoE takes exactly k: the second weighs 0
        chosen = np.array([[expert, other]] * 3)
        weights = np.array([[1.0, 0.0]] * 3, np.float32)
        alone = model._expert_session(1, expert)({"x": x})[0]
        # same GEMM kernels; QMoE's own sigmoid rounds differently in the last bits
        assert np.abs(fused(x, chosen, weights) - alone).max() <= 1e-5 * np.abs(alone).max()
    model.close()


def test_fused_model_matches_the_per_expert_path(package):
    reference = mobilemoe.load(package)
    fused = mobilemoe.load(package, fused_experts=True)
    assert fused.fused_experts and not reference.fused_experts and fused.expert_kernel == "qmoe"
    expected, got = reference.logits(PROMPT), fused.logits(PROMPT)
    # A last-bit difference can move a later layer's int8 activation quantization by a step:
    # the logits differ by ~2e-4 of their range here, not by float32 epsilon.
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))
    a = [t.token_id for t in reference.generate(PROMPT[:6], max_new_tokens=12)]
    b = [t.token_id for t in fused.generate(PROMPT[:6], max_new_tokens=12)]
    assert a == b
    assert fused.stats.misses == 0  # the expert cache is not used
    with fused.trace_routing() as trace:  # routing is the runtime's, traced as before
        fused.reset()
        fused.logits(PROMPT[:4])
    assert sorted(trace[0]) == [0, 1] and trace[0][0].shape == (4, 2)


def test_layers_built_two_at_a_time_equal_one_at_a_time(package, monkeypatch):
    """Loading builds two layers' QMoE sessions at once when the budget holds both layers'
    stacked weights; the sessions, so the logits, are the same bit for bit."""
    two = mobilemoe.load(package, fused_experts=True)
    d, q = two.dims, two.manifest.quantization
    weights, _ = stacked_bytes(d.hidden_size, d.intermediate_size, d.num_experts,
                               q.expert_bits, q.block_size)
    assert two.fused_experts_bytes(2) - two.fused_experts_bytes(1) == weights
    monkeypatch.setattr(mobilemoe.model, "LAYERS_BUILT_AT_ONCE", 1)
    one = mobilemoe.load(package, fused_experts=True)
    assert np.array_equal(one.logits(PROMPT), two.logits(PROMPT))


def test_fused_experts_refuse_a_budget_that_cannot_hold_every_expert(package):
    tightest = mobilemoe.load(package).plan.tightest_budget
    with pytest.raises(MobileMoEError, match="fused experts need every expert resident"):
        mobilemoe.load(package, memory_budget=tightest, fused_experts=True)


def test_fused_experts_under_a_budget_leave_the_cache_capacity_alone(package):
    # Every expert lives in the QMoE sessions, outside the (unused) expert cache: the memory
    # they hold is planned, not "unplanned memory" to take off the cache at each step. A new
    # process, so that RSS holds only this model.
    probe = textwrap.dedent(f"""
        import json, mobilemoe
        model = mobilemoe.load({str(package)!r}, memory_budget="1GB", fused_experts=True)
        before = model.stats.expert_cache_capacity
        model.logits({PROMPT!r})
        print(json.dumps([before, model.stats.expert_cache_capacity]))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    before, after = json.loads(out.stdout)
    assert after == before


def test_fused_experts_refuse_widths_off_the_block(tmp_path):
    build_mixtral(tmp_path / "ckpt")  # hidden 72, intermediate 88: not multiples of 32
    package = export_model(tmp_path / "ckpt", tmp_path / "pkg", block_size=32, progress=False)
    with pytest.raises(MobileMoEError, match="multiples of the block size"):
        mobilemoe.load(package, fused_experts=True)


def test_bench_and_run_commands_take_fused_experts(package):
    runner = CliRunner()
    bench = ["bench", str(package), "--fused-experts", "--prompt-tokens", "6", "--new-tokens",
             "3", "--repeats", "1", "--warmup", "0", "--threads", "2", "--json"]
    result = runner.invoke(app, [*bench, "--expert-fraction", "1"])  # the budget fused needs
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["fused_experts"] and data["preloaded_experts"] == 0
    assert data["decode"]["tokens"] == 3 and data["decode"]["misses"] == 0
    assert data["decode"]["split_ms_per_token"]["experts"] > 0  # QMoE runs are timed
    assert data["peak_rss"] - data["baseline_rss"] <= data["memory_budget"]
    assert not any("--fused-experts" in note for note in data["notes"])
    unfused = [arg for arg in bench if arg != "--fused-experts"]
    result = runner.invoke(app, [*unfused, "--expert-fraction", "1"])  # all resident: a hint
    assert result.exit_code == 0, result.output
    assert any("--fused-experts" in note for note in json.loads(result.output)["notes"])
    result = runner.invoke(app, [*bench, "--expert-fraction", "0.5"])
    assert result.exit_code != 0 and "every expert resident" in result.output
    result = runner.invoke(app, ["run", str(package), "--fused-experts", "hello", "-n", "3"])
    assert result.exit_code == 0, result.output


# Every family at widths QMoE takes (multiples of the block): the fused path must follow each
# one's routing, shared experts, dense layers and output scaling exactly as the default does.
FUSABLE_WIDTHS = dict(hidden_size=96, intermediate_size=64, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64)


@pytest.mark.parametrize("name", NAMES)
def test_fused_experts_match_the_default_path_in_every_family(tmp_path, name):
    entry = ARCHITECTURES[name]
    widths = {k: v for k, v in FUSABLE_WIDTHS.items() if k == "hidden_size" or k in entry.tiny}
    build_checkpoint(tmp_path / "ckpt", entry.config("tiny", **widths), seed=2)
    package = export_model(tmp_path / "ckpt", tmp_path / "pkg", block_size=32, progress=False)
    reference = mobilemoe.load(package)
    if name == "gpt_oss":  # biased, clamped experts: not what QMoE computes
        with pytest.raises(MobileMoEError, match="unbiased SiLU experts"):
            mobilemoe.load(package, fused_experts=True)
        return
    fused = mobilemoe.load(package, fused_experts=True)
    expected, got = reference.logits(PROMPT), fused.logits(PROMPT)
    # QMoE's own sigmoid and summation order change float32 rounding; with int8 activations
    # (accuracy level 4) a rounding can cross a quantization step, so a token's logits can move
    # by up to ~1% of their range at these tiny widths (benchmarks/quality.py on the trained
    # demo model: same perplexity, top-1 and KL as the default path).
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.999
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
