"""`mobilemoe plan`: the budget rule, the LRU hit-rate model (checked against a simulated LRU
with the runtime's access pattern), the time model, routing profiles, the command line, and
that the planner needs only the runtime's dependencies."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from architectures import ARCHITECTURES
from checkpoints import build_checkpoint, build_mixtral
from mobilemoe.cli.main import app
from mobilemoe.export import export_model
from typer.testing import CliRunner

import mobilemoe
from mobilemoe.bench import plan_in_subprocess
from mobilemoe.cache_policies import policy_by_name, policy_for_package
from mobilemoe.errors import MobileMoEError, PackageError
from mobilemoe.manifest import Manifest
from mobilemoe.planner import (
    Device,
    ProfilingLRU,
    hit_rate,
    lru_hit_rate,
    parse_rate,
    plan,
    ram_for_budget,
    read_routing_profile,
    recommended_budget,
    request_probabilities,
    write_routing_profile,
)
from mobilemoe.probe import kernel_rate, memory_bandwidth, paging_cost, storage_read

GB = 1_000_000_000


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    build_mixtral(root / "ckpt", num_local_experts=8, num_hidden_layers=3)
    return export_model(root / "ckpt", root / "tiny.mmoe", progress=False)


# -- inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, rate", [
    ("2GB/s", 2e9), ("500 MB/s", 5e8), ("1GiB/s", 2**30), ("50GBps", 5e10), ("3000000", 3e6),
    (1.5e9, 1.5e9),
])
def test_parse_rate(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("bad", ["fast", "2GB/h", "-1GB/s", "0", 0, "", "GB/s"])
def test_bad_rates_are_refused(bad):
    with pytest.raises(MobileMoEError, match="rate|byte size|positive"):
        parse_rate(bad)


def test_budget_rule():
    assert recommended_budget(8 * GB) == int(3.8 * GB)
    assert recommended_budget(16 * GB) == int(8.6 * GB)
    for budget in (GB, int(3.8 * GB), 10 * GB):
        ram = ram_for_budget(budget)
        assert recommended_budget(ram) >= budget > recommended_budget(ram - 1000)


# -- the hit-rate model -----------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75, 0.9])
def test_uniform_hit_rate_is_about_capacity_over_experts(fraction):
    layers, experts, k = 16, 64, 8
    p = request_probabilities(k, [[1.0] * experts] * layers)
    capacity = int(fraction * layers * experts)
    assert lru_hit_rate(capacity, p) == pytest.approx(fraction, abs=0.03)


def test_a_cache_smaller_than_the_other_layers_picks_never_hits():
    layers, experts, k = 8, 8, 2
    p = request_probabilities(k, [[1.0] * experts] * layers)
    assert lru_hit_rate((layers - 1) * k - 2, p) < 0.01
    assert simulate_policy(policy_by_name("lru"), (layers - 1) * k, [[1.0] * experts] * layers, k,
                           tokens=500)[0] == 0.0


def test_hit_rate_edges():
    p = request_probabilities(2, [[1.0] * 8] * 2)
    assert lru_hit_rate(0, p) == pytest.approx(0.0, abs=1e-3)
    assert lru_hit_rate(16, p) == 1.0 and lru_hit_rate(99, p) == 1.0
    assert request_probabilities(2, [[10.0, 0.0, 0.0, 1.0]]) == [[1.0, 0.0, 0.0, pytest.approx(2 / 11)]]


def simulate_policy(policy, capacity: int, weights: list[list[float]], k: int, tokens: int,
                    seed: int = 0) -> tuple[float, list[list[float]]]:
    """The runtime's decode access pattern through one of its policy objects: per token, per
    layer in order, k distinct experts drawn by `weights`, the cached ones asked first (so no
    `keep`, as the runtime). Returns the hit rate after warm-up and the observed per-layer
    frequencies (what a routing profile records)."""
    rng = np.random.default_rng(seed)
    cache: set = set()
    hits = requests = 0
    counts = [[0] * len(row) for row in weights]
    for t in range(tokens):
        for layer, row in enumerate(weights):
            p = np.asarray(row) / sum(row)
            keys = sorted((layer, int(e)) for e in rng.choice(len(row), size=k, replace=False, p=p))
            for key in sorted(keys, key=lambda key: key not in cache):  # cached ones first
                counts[layer][key[1]] += 1
                if t >= tokens // 5:
                    requests += 1
                    hits += key in cache
                if key in cache:
                    policy.touched(key)
                    continue
                while len(cache) >= capacity:
                    victim = policy.victim(set())
                    cache.discard(victim)
                    policy.removed(victim)
                cache.add(key)
                policy.inserted(key)
    return hits / requests, counts


@pytest.mark.parametrize("policy", ["lru", "dlfu"])
@pytest.mark.parametrize("skew", [0.0, 1.0])
@pytest.mark.parametrize("capacity", [6, 16, 28])
def test_hit_rate_model_matches_the_simulated_policy(policy, skew, capacity):
    layers, experts, k = 4, 12, 2
    rows = [[1.0 / (e + 1) ** skew for e in random.Random(layer).sample(range(experts), experts)]
            for layer in range(layers)]
    simulated, counts = simulate_policy(policy_by_name(policy), capacity, rows, k, tokens=3000)
    predicted = hit_rate(policy, capacity, k, request_probabilities(k, counts))
    assert predicted == pytest.approx(simulated, abs=0.06)


def test_plans_predict_the_policy_they_are_asked_for(package):
    # below one step's working set LRU never hits; the frequency policies keep a share
    device = Device(ram=16 * GB)
    small = plan(package, Device(ram=GB))
    fixed = sum(v for k, v in small.memory.items() if k != "expert_cache")
    budget = fixed + 4 * small.expert_session_bytes  # 4 experts: a step needs 3 layers x 2
    default, lru = plan(package, device, budget=budget), plan(package, device, budget=budget,
                                                              policy="lru")
    assert default.policy == "dlfu" and lru.policy == "lru"
    assert lru.hit_rate < 0.01 < default.hit_rate
    assert default.tokens_per_second > lru.tokens_per_second


# -- plans of a real package ------------------------------------------------------------------


def test_plan_holds_everything_with_enough_ram(package):
    p = plan(package, Device(ram=16 * GB))
    assert p.fits and p.hit_rate == 1.0 and p.expert_capacity == p.experts_total == 3 * 8
    assert p.budget == p.all_resident_budget < recommended_budget(16 * GB)
    assert p.miss_bytes_per_token == 0 and p.read_ms == p.page_in_ms == 0
    assert p.tokens_per_second == pytest.approx(1000 / p.compute_ms)


def test_plan_at_the_minimum_budget_pages(package):
    p = plan(package, Device(ram=16 * GB), budget=plan(package, Device(ram=GB)).minimum_budget)
    m = Manifest.load(package)
    assert p.fits and m.routing.top_k <= p.expert_capacity < p.experts_total
    assert 0 <= p.hit_rate < 1 and p.miss_bytes_per_token > 0
    assert p.tokens_per_second < p.tokens_per_second_overlapped
    block = max(t.block_bytes for t in m.templates.values())
    misses = (1 - p.hit_rate) * m.dims.num_layers * m.routing.top_k
    assert p.miss_bytes_per_token == pytest.approx(misses * block, abs=1)
    assert p.page_in_ms == pytest.approx(p.miss_bytes_per_token / 1e6 * Device(ram=1).page_in_ms_per_mb,
                                         rel=1e-3)
    assert p.read_ms == pytest.approx(p.miss_bytes_per_token / 2e9 * 1e3, rel=1e-3)
    assert p.tokens_per_second == pytest.approx(1000 / (p.compute_ms + p.read_ms + p.page_in_ms))


def test_plan_says_when_the_ram_is_too_small(package):
    small = plan(package, Device(ram=GB))
    assert not small.fits and small.tokens_per_second == 0 and small.budget == 0
    assert small.minimum_ram > GB
    assert plan(package, Device(ram=small.minimum_ram)).fits


def test_more_threads_bandwidth_and_storage_help(package):
    base = Device(ram=16 * GB, bandwidth=50e9, storage_read=1e9, threads=2)
    budget = plan(package, base).minimum_budget
    slow = plan(package, base, budget=budget)
    for faster in (replace(base, threads=8), replace(base, storage_read=4e9),
                   replace(base, page_in_ms_per_mb=1.0)):
        assert plan(package, faster, budget=budget).tokens_per_second > slow.tokens_per_second


def test_plan_agrees_with_what_the_runtime_measures(package):
    """The memory estimate from file sizes vs what a load measures (same context length)."""
    model = mobilemoe.load(package, context_length=256)
    p = plan(package, Device(ram=16 * GB), context_length=256)
    assert p.memory["kv_cache"] == model.plan.kv_bytes
    # RSS-measured parts depend on what the process did before (a heap with free space grows
    # less): measure them in a fresh process, as an app starts. The planner is for phones,
    # whose experts run on ONNX Runtime sessions.
    fresh = plan_in_subprocess(package, threads=1, context_length=256, expert_kernel="onnxruntime")
    assert p.expert_session_bytes == pytest.approx(fresh["session"], rel=0.35)
    assert 0.6 < p.minimum_budget / fresh["minimum"] < 1.6


# -- routing profiles -------------------------------------------------------------------------


def test_profile_recorded_from_a_run_is_used(package, tmp_path):
    copy = shutil.copytree(package, tmp_path / "p.mmoe")
    d = Manifest.load(copy).dims
    policy = ProfilingLRU()
    model = mobilemoe.load(copy, policy=policy)
    list(model.generate([1, 5, 9, 33], max_new_tokens=12, temperature=0))
    counts = policy.counts(d.num_layers, d.num_experts)
    assert sum(map(sum, counts)) == model.stats.hits + model.stats.misses
    write_routing_profile(copy / "routing_profile.json", counts, tokens=12, source="test")
    assert read_routing_profile(copy / "routing_profile.json", d.num_layers, d.num_experts)
    budget = plan(copy, Device(ram=GB)).minimum_budget
    profiled = plan(copy, Device(ram=GB), budget=budget)
    assert profiled.routing.endswith("routing_profile.json")
    assert plan(package, Device(ram=GB), budget=budget).routing == "uniform"


def test_profile_of_a_model_with_dense_layers(tmp_path):
    """Qwen2-MoE's mlp_only_layers (and DeepSeek's first layers) have no experts: the
    recorded profile's row for them is all zero, which reading, planning and pinning accept,
    and the plan counts only the MoE layers' experts."""
    build_checkpoint(tmp_path / "ckpt", ARCHITECTURES["qwen2_moe"].config("tiny"), seed=1)
    pkg = export_model(tmp_path / "ckpt", tmp_path / "q.mmoe", progress=False)
    manifest = Manifest.load(pkg)
    d = manifest.dims
    assert manifest.moe_layers == [0, 2] and manifest.experts_total == len(manifest.experts)
    policy = ProfilingLRU()
    with mobilemoe.load(pkg, policy=policy) as model:
        list(model.generate([1, 5, 9, 33], max_new_tokens=6, temperature=0))
    counts = policy.counts(d.num_layers, d.num_experts)
    assert sum(counts[1]) == 0 and sum(counts[0]) > 0
    path = write_routing_profile(pkg / "routing_profile.json", counts)
    assert read_routing_profile(path, d.num_layers, d.num_experts, manifest.moe_layers) == counts
    with pytest.raises(PackageError, match="layer 1 must list"):
        read_routing_profile(path, d.num_layers, d.num_experts)  # as if every layer had experts
    bad = write_routing_profile(tmp_path / "bad.json", [[1, 1, 1, 1]] * d.num_layers)
    with pytest.raises(PackageError, match="layer 1 is dense"):
        read_routing_profile(bad, d.num_layers, d.num_experts, manifest.moe_layers)
    p = plan(pkg, Device(ram=16 * GB))
    assert p.routing.endswith("routing_profile.json")
    assert p.experts_total == 2 * d.num_experts
    pinned = policy_for_package("pinned", pkg)
    assert all(layer != 1 for layer, _ in pinned.hot)


def test_skewed_routing_raises_the_hit_rate(package, tmp_path):
    d = Manifest.load(package).dims
    skewed = [[100.0, 100.0] + [1.0] * (d.num_experts - 2)] * d.num_layers
    path = write_routing_profile(tmp_path / "skew.json", skewed)
    full = plan(package, Device(ram=16 * GB))
    budget = (full.minimum_budget + full.all_resident_budget) // 2  # about half the experts
    uniform = plan(package, Device(ram=GB), budget=budget)
    profiled = plan(package, Device(ram=GB), budget=budget, profile=path)
    assert profiled.hit_rate > uniform.hit_rate + 0.2
    assert profiled.tokens_per_second > uniform.tokens_per_second


@pytest.mark.parametrize("content, error", [
    ("not json", "not valid JSON"),
    (json.dumps({"format": "other"}), "not a routing profile"),
    (json.dumps({"format": "mobilemoe-routing-profile", "layers": [[1.0] * 8]}), "3 layers"),
    (json.dumps({"format": "mobilemoe-routing-profile", "layers": [[1.0] * 8, [1.0] * 8,
                                                                   [-1.0] + [1.0] * 7]}),
     "layer 2"),
    (json.dumps({"format": "mobilemoe-routing-profile", "layers": [[0.0] * 8] * 3}), "layer 0"),
])
def test_bad_profiles_are_refused(package, tmp_path, content, error):
    path = tmp_path / "profile.json"
    path.write_text(content)
    with pytest.raises(PackageError, match=error):
        plan(package, Device(ram=GB), profile=path)


def test_missing_profile(package, tmp_path):
    with pytest.raises(MobileMoEError, match="no such routing profile"):
        plan(package, Device(ram=GB), profile=tmp_path / "none.json")


# -- measuring a machine ----------------------------------------------------------------------


def test_probe_measures_plausible_figures(package):
    assert 1e8 < memory_bandwidth(size=64 << 20, repeats=2) < 1e13
    assert 1e6 < storage_read(package, cold=True) < 1e12
    read, page_in = paging_cost(package, threads=2, misses=6, cached=2)
    assert 0 < read < 1000 and 0 < page_in < 1000
    assert kernel_rate(package, threads=2, working_set=1 << 20, runs=2) > 1e6


# -- the command line and dependencies --------------------------------------------------------


def test_cli_plan_json(package):
    result = CliRunner().invoke(app, ["plan", str(package), "--ram", "8GB", "--storage-read",
                                      "1GB/s", "--bandwidth", "20GB/s", "--threads", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    assert p["ram"] == 8 * GB and p["device"]["storage_read"] == 1e9 and p["device"]["threads"] == 2
    assert p["fits"] and 0 < p["hit_rate"] <= 1 and p["tokens_per_second"] > 0


def test_cli_plan_table(package):
    result = CliRunner().invoke(app, ["plan", str(package), "--ram", "8GB", "--budget", "1GB"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "hit rate" in result.output


@pytest.mark.parametrize("args, fragment", [
    (["--ram", "lots"], "not a byte size"),
    (["--storage-read", "fast"], "not a rate"),
    (["--bandwidth", "-3GB/s"], "not a rate"),
])
def test_cli_plan_errors_are_one_line(package, args, fragment):
    result = CliRunner().invoke(app, ["plan", str(package), *args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def test_cli_plan_missing_package(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "none.mmoe"), "--ram", "8GB"])
    assert result.exit_code == 1 and "not a folder" in result.output


def test_planner_imports_only_the_runtime():
    code = ("import sys, mobilemoe.planner, mobilemoe.probe, mobilemoe.bundle\n"
            "heavy = [m for m in ('onnx', 'mobilemoe.export', 'huggingface_hub', 'safetensors',"
            " 'torch', 'transformers', 'typer') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
