"""mobilemoe's own int4 expert kernel (`expert_kernel="native"`): MatMulNBits' arithmetic on the
block as read, bit-identical across budgets and between one token and many."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from checkpoints import build_mixtral
from mobilemoe.cli.main import app
from mobilemoe.export import export_model
from typer.testing import CliRunner

import mobilemoe
from mobilemoe import native_experts
from mobilemoe.errors import MobileMoEError
from mobilemoe.manifest import Routing
from mobilemoe.native_experts import NativeExpert
from mobilemoe.routing import route

pytestmark = pytest.mark.skipif(native_experts.unavailable_reason() is not None,
                                reason=f"native kernel: {native_experts.unavailable_reason()}")

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 300, 12, 8, 77, 91, 160, 3]
# Widths that are not multiples of the block (64: the kernel pads the activations) and row
# counts that are not multiples of the kernel's four-row groups (2 x 89 and 70 rows).
DIMS = dict(hidden_size=70, intermediate_size=89, num_attention_heads=1, num_key_value_heads=1,
            num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    build_mixtral(root / "ckpt", **DIMS)
    return export_model(root / "ckpt", root / "pkg", progress=False)


def _expert_pair(model_native, model_ort, layer: int, expert: int):
    return (model_native._expert_session(layer, expert), model_ort._expert_session(layer, expert))


def test_an_expert_computes_what_its_onnx_runtime_session_computes(package):
    native = mobilemoe.load(package, expert_kernel="native")
    ort = mobilemoe.load(package)
    x = np.random.default_rng(0).standard_normal((5, native.dims.hidden_size)).astype(np.float32)
    for layer, expert in [(0, 0), (1, 7)]:
        mine, theirs = _expert_pair(native, ort, layer, expert)
        assert isinstance(mine, NativeExpert)
        for rows in (x[:1], x):
            a, b = mine({"x": rows})[0], theirs({"x": rows})[0]
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_a_token_gives_the_same_bits_alone_or_in_a_prompt(package):
    native = mobilemoe.load(package, expert_kernel="native")
    expert = native._expert_session(0, 3)
    x = np.random.default_rng(1).standard_normal((11, native.dims.hidden_size)).astype(np.float32)
    together = expert({"x": x})[0]
    alone = np.concatenate([expert({"x": x[t:t + 1]})[0] for t in range(len(x))])
    assert np.array_equal(together, alone)


def test_paging_with_the_native_kernel_is_lossless_and_holds_only_the_block(package):
    resident = mobilemoe.load(package, expert_kernel="native")
    expected = resident.logits(PROMPT)
    tight = mobilemoe.load(package, memory_budget=resident.plan.tightest_budget,
                           expert_kernel="native")
    assert np.array_equal(tight.logits(PROMPT), expected)
    a = [t.token_id for t in resident.generate(PROMPT[:6], max_new_tokens=8)]
    b = [t.token_id for t in tight.generate(PROMPT[:6], max_new_tokens=8)]
    assert a == b and tight.stats.evictions > 0
    # No session: a page-in keeps the block read from the store (on the OLMoE shape 3.54 MB an
    # expert against 4.4 MB for its session, docs/PERFORMANCE.md; too small to tell here)
    assert all(isinstance(tight._cache.get((0, e)), NativeExpert) for e in range(2))
    assert resident.expert_kernel == "native"


def test_the_whole_model_agrees_with_the_onnx_runtime_kernel(package):
    native = mobilemoe.load(package, expert_kernel="native").logits(PROMPT)
    ort = mobilemoe.load(package).logits(PROMPT)
    # float32 rounding differs (sums in another order); int8 activations can turn such a
    # difference into one quantization step
    assert np.abs(native - ort).max() <= 0.01 * np.abs(ort).max()


def test_auto_is_native_where_it_can_run_and_sessions_elsewhere(package, tmp_path):
    assert mobilemoe.load(package).expert_kernel == "native"
    assert mobilemoe.load(package, expert_kernel="onnxruntime").expert_kernel == "onnxruntime"
    build_mixtral(tmp_path / "ckpt", **DIMS)
    int8 = export_model(tmp_path / "ckpt", tmp_path / "pkg", bits=8, progress=False)
    assert mobilemoe.load(int8).expert_kernel == "onnxruntime"


def test_unknown_or_unsupported_kernels_are_refused(package, tmp_path):
    with pytest.raises(MobileMoEError, match="expert kernel must be one of"):
        mobilemoe.load(package, expert_kernel="cuda")
    build_mixtral(tmp_path / "ckpt", **DIMS)
    int8 = export_model(tmp_path / "ckpt", tmp_path / "pkg", bits=8, progress=False)
    with pytest.raises(MobileMoEError, match="8-bit experts"):
        mobilemoe.load(int8, expert_kernel="native")


def test_bench_reports_the_native_kernel(package):
    result = CliRunner().invoke(app, ["bench", str(package), "--expert-kernel", "native", "--json",
                                      "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1",
                                      "--warmup", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["expert_kernel"] == "native"


def test_a_native_process_stops_onnx_runtime_spinning_and_computes_the_same(package):
    """A process whose first model runs the native kernel gives ONNX Runtime per-session pools
    that stop spinning at the end of each run (the kernel's worker needs the other core), and
    the logits are the ones this process computes next to a spinning process-wide pool."""
    expected = mobilemoe.load(package, expert_kernel="native").logits(PROMPT)
    code = textwrap.dedent("""
        import sys, numpy as np, mobilemoe
        from mobilemoe import native_experts, ort_sessions
        native_experts.use_threads(2)
        native_experts.wake()  # before any expert ran: nothing to claim
        native_experts.park()
        model = mobilemoe.load(sys.argv[1], expert_kernel="native", threads=2)
        assert ort_sessions._global_threads == -2 and not ort_sessions._spin_after_runs
        options = ort_sessions.session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert ort_sessions.expert_session_options().intra_op_num_threads == 1  # no pool each
        np.save(sys.argv[2], model.logits([int(t) for t in sys.argv[3].split(",")]))
    """)
    out = package.parent / "logits.npy"
    done = subprocess.run([sys.executable, "-c", code, str(package), str(out),
                           ",".join(map(str, PROMPT))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(out), expected)


def test_a_layers_experts_in_one_call_sum_as_numpy_does(package):
    native = mobilemoe.load(package, expert_kernel="native")
    experts = [native._expert_session(1, e) for e in (0, 2, 5, 7)]
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    x = np.random.default_rng(2).standard_normal((1, native.dims.hidden_size)).astype(np.float32)
    expected = np.zeros_like(x)
    for expert, weight in zip(experts, weights, strict=True):
        expected += weight * expert({"x": x})[0]
    assert np.array_equal(native_experts.weighted_sum(experts, weights, x), expected)


@pytest.mark.parametrize("routing", [
    Routing("softmax", 8, normalize_top_k=False),  # Qwen-MoE, OLMoE
    Routing("softmax", 2, normalize_top_k=True),  # Mixtral
    Routing("softmax", 4, normalize_top_k=False, top_k_before_softmax=True),  # Granite
    Routing("softmax", 6, normalize_top_k=True, scaling=2.5),
], ids=["olmoe", "mixtral", "top-k-first", "scaled"])
def test_native_routing_chooses_and_weighs_as_numpy_routing_does(routing):
    native_experts.use_threads(2)
    rng = np.random.default_rng(3)
    for experts in (8, 64, 160):
        logits = (rng.standard_normal((40, experts)) * 3).astype(np.float32)
        logits[0] = 0  # ties go to the lower index
        logits[1, ::2] = logits[1, 1::2]
        chosen, weights = native_experts.route(logits, routing)
        expected_chosen, expected_weights = route(logits, routing)
        assert chosen.dtype == np.int64 and weights.dtype == np.float32
        assert np.array_equal(chosen, expected_chosen)
        assert np.allclose(weights, expected_weights, rtol=2e-6, atol=0)


def test_native_routing_refuses_what_it_cannot_compute():
    native_experts.use_threads(2)
    assert native_experts.routes(Routing("softmax", 2, True), 8)
    assert not native_experts.routes(Routing("softmax", 2, True), 2048)  # beyond its buffers
    assert not native_experts.routes(Routing("sigmoid", 8, True, n_group=8, topk_group=4), 256)
    assert not native_experts.routes(Routing("sparsemixer", 2, False), 16)
    with pytest.raises(MobileMoEError, match="top 9 of 8 experts"):
        native_experts.route(np.zeros((1, 8), np.float32), Routing("softmax", 9, True))


def test_a_native_model_routes_in_c_and_a_prompt_routes_as_its_tokens_do(package):
    native = mobilemoe.load(package, expert_kernel="native")
    assert native._native_routing
    with native.trace_routing() as at_once:
        native.logits(PROMPT[:6])
    native.reset()
    with native.trace_routing() as one_by_one:
        for token in PROMPT[:6]:
            native._forward([token], "last")
    for layer in at_once[0]:
        assert np.array_equal(at_once[0][layer], np.concatenate([s[layer] for s in one_by_one]))
