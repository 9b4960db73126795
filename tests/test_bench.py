"""The benchmark tooling: synthetic shaped packages, `run_bench` and `mobilemoe bench`.

Smoke runs only (a 2-layer scaled-down shape, a few tokens): benchmarks themselves are not
tests. The budget forces paging, so every part of the time split is exercised.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from mobilemoe.cli.main import app
from typer.testing import CliRunner

import mobilemoe
from mobilemoe import native_experts
from mobilemoe.bench import _Probe, run_bench

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from shapes import SHAPES, get_shape  # noqa: E402
from synthetic_package import write_synthetic_package  # noqa: E402

FRACTION = 0.3  # of all experts: forces evictions every token


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return write_synthetic_package(get_shape("tiny"), tmp_path_factory.mktemp("bench") / "t.mmoe")


def test_shapes_have_the_real_models_dims():
    olmoe, qwen = SHAPES["olmoe-1b-7b"], SHAPES["qwen3-30b-a3b"]
    assert (olmoe.layers, olmoe.hidden, olmoe.intermediate, olmoe.experts, olmoe.top_k) == (
        16, 2048, 1024, 64, 8)
    assert (qwen.heads * qwen.head_dim, qwen.kv_heads, qwen.vocab) == (4096, 4, 151936)
    assert get_shape("mixtral-8x7b", layers=2).layers == 2
    with pytest.raises(ValueError):
        get_shape("mixtral-8x7b", layers=33)


def test_synthetic_package_loads_and_runs(package, tmp_path):
    shape = get_shape("tiny")
    with mobilemoe.load(package, threads=2, context_length=64) as model:
        d = model.dims
        assert (d.num_layers, d.hidden_size, d.intermediate_size, d.num_experts, d.top_k) == (
            shape.layers, shape.hidden, shape.intermediate, shape.experts, shape.top_k)
        logits = model.logits([1, 2, 3])
        assert logits.shape == (3, shape.vocab) and np.isfinite(logits).all()
        # random weights that keep their scale: neither constant nor exploding logits
        assert 0.1 < float(logits.std()) < 100
        tokens = list(model.generate([5, 6, 7], max_new_tokens=6, temperature=0))
        assert len(tokens) == 6  # no end-of-sequence token: generates what it is asked
    # same shape and seed: same bytes
    again = write_synthetic_package(shape, tmp_path / "again.mmoe")
    assert (again / "experts.bin").read_bytes() == (package / "experts.bin").read_bytes()


def test_run_bench_under_a_budget_that_pages(package):
    r = run_bench(package, expert_fraction=FRACTION, prompt_tokens=12, new_tokens=4, repeats=2,
                  warmup=1, threads=2)
    assert r.memory_budget is not None and r.expert_cache_capacity < r.all_experts_bytes
    assert r.preloaded_experts == 0
    for phase in (r.prefill, r.decode):
        assert phase.tokens_per_s > 0 and len(phase.seconds) == 2
        assert phase.misses > 0 and 0 <= phase.hit_rate < 1
        split = phase.split_ms_per_token
        assert all(split[k] is not None and split[k] >= 0
                   for k in ("dense", "experts", "paging", "paging_read"))
        assert split["paging_read"] <= split["paging"]
        assert split["dense"] > 0 and split["experts"] > 0  # every token runs both
        timed = split["dense"] + split["experts"] + split["paging"]
        assert split["other"] == pytest.approx(split["total"] - timed)
    assert r.decode.evictions > 0 and r.decode.mb_paged_per_token > 0
    assert r.paging_ms_per_mb > 0 and r.read_ms_per_mb is not None
    assert r.peak_rss >= r.baseline_rss > 0
    assert r.weight_bytes_per_token > 0


def test_probe_keeps_no_evicted_expert_alive(package):
    """The timers must not hold on to evicted sessions (a reference cycle through a wrapper
    stored on each session once kept every expert alive, far over the budget)."""
    with mobilemoe.load(package, threads=2, context_length=32) as model:
        experts = len(model.manifest.experts) * model.plan.expert_session_bytes
        model._cache.capacity_bytes = int(FRACTION * experts)  # forces evictions
        probe = _Probe(model)
        gc.collect()
        before = {id(o) for o in gc.get_objects() if type(o) is ort.InferenceSession}
        gc.disable()  # cyclic garbage stays visible
        try:
            list(model.generate([1, 2, 3, 4], max_new_tokens=8, temperature=0))
            new = [o for o in gc.get_objects()
                   if type(o) is ort.InferenceSession and id(o) not in before]
        finally:
            gc.enable()
            probe.close()
        assert model.stats.evictions > 0
        assert len(new) <= len(model._cache._entries)  # only the experts still cached


def test_run_bench_fully_resident_preloads_everything(package):
    r = run_bench(package, expert_fraction=1.0, prompt_tokens=8, new_tokens=3, repeats=1,
                  warmup=0, threads=2)
    shape = get_shape("tiny")
    assert r.preloaded_experts == shape.layers * shape.experts
    assert r.prefill.misses == r.decode.misses == 0 and r.decode.hit_rate == 1.0
    assert r.decode.split_ms_per_token["experts"] > 0  # however the kernel runs them


def test_bench_command_json(package):
    result = CliRunner().invoke(app, [
        "bench", str(package), "--expert-fraction", str(FRACTION), "--prompt-tokens", "8",
        "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--threads", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["prompt_tokens"] == 8 and data["decode"]["tokens"] == 3
    assert data["decode"]["misses"] > 0
    assert set(data["decode"]["split_ms_per_token"]) >= {"dense", "experts", "paging", "other"}
    assert data["model"]["dense_huge_page_bytes"] >= 0  # test_memory checks the huge pages


def test_bench_command_with_a_cache_policy(package):
    result = CliRunner().invoke(app, [
        "bench", str(package), "--expert-fraction", str(FRACTION), "--prompt-tokens", "8",
        "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--threads", "2", "--json",
        "--policy", "lrfu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["policy"] == "LRFUPolicy" and data["decode"]["misses"] > 0


def test_bench_command_table_and_errors(package):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", str(package), "--prompt-tokens", "4", "--new-tokens",
                                 "2", "--repeats", "1", "--warmup", "0", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert "decode" in result.output and "tokens/s" in result.output
    both = runner.invoke(app, ["bench", str(package), "-m", "1GB", "--expert-fraction", "0.5"])
    assert both.exit_code == 1 and "not both" in both.output
    tiny = runner.invoke(app, ["bench", str(package), "-m", "1MB", "--threads", "2"])
    assert tiny.exit_code == 1 and "too small" in tiny.output


def test_gguf_writer_shapes(tmp_path):
    gguf = pytest.importorskip("gguf")  # only in the bench environment (.venv-bench)
    from gguf_writer import write_gguf

    path = write_gguf(get_shape("tiny"), tmp_path / "t.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    exps = tensors["blk.0.ffn_gate_exps.weight"]
    assert exps.tensor_type.name == "Q4_0" and [int(n) for n in exps.shape] == [256, 128, 8]
    assert tensors["output.weight"].tensor_type.name == "Q8_0"


def test_prefetch_accuracy_guesses_the_next_layer_from_the_trained_demo_model():
    import importlib.resources

    import torch
    from prefetch_accuracy import recalls
    from quality import windows
    from transformers import AutoModelForCausalLM

    with importlib.resources.as_file(importlib.resources.files("mobilemoe") / "demo_model") as ckpt:
        ids = windows(ckpt, 1)["prose"][0][:96]
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    r = recalls(model, ids)
    layers = model.config.num_hidden_layers
    assert set(r) == {"late", "early"} and r["late"].shape == (layers - 1, 96, 2)
    assert ((r["late"] >= 0) & (r["late"] <= 1)).all()
    # far better than guessing (k / E = 25%), and top-2k finds more than top-k
    assert r["late"][..., 0].mean() > 0.5 and (r["late"][..., 1] >= r["late"][..., 0]).all()


def test_ab_checkouts_compares_two_checkouts(package, capsys):
    import ab_checkouts

    checkout = Path(__file__).resolve().parent.parent
    ab_checkouts.main([str(checkout), str(checkout), str(package), "--pairs", "1",
                       "--prompt-tokens", "8", "--new-tokens", "2"])
    out = capsys.readouterr().out
    assert "pair 1: A " in out and "B/A decode: median" in out and "'dense'" in out


@pytest.mark.skipif(native_experts.unavailable_reason() is not None, reason="no native kernel here")
def test_kernel_layer_times_a_layers_experts(capsys):
    import kernel_layer

    kernel_layer.main(["--experts", "16", "--hidden", "128", "--intermediate", "64", "--huge-pages"])
    out = capsys.readouterr().out
    assert "16 experts, huge pages" in out and "us a layer" in out
