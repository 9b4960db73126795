"""Paging is lossless, and the process stays within its memory budget."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from checkpoints import build_mixtral
from mobilemoe.export import export_model

import mobilemoe
from mobilemoe import memory_plan
from mobilemoe.cache_policies import DecayedLFUPolicy
from mobilemoe.memory import rss

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 300, 12, 8, 77, 91, 160, 3]


class RecordingLRU(mobilemoe.LRUPolicy):
    """LRU that remembers what it evicted (the policy interface at work)."""

    def __init__(self):
        super().__init__()
        self.evicted = []

    def removed(self, key):
        super().removed(key)
        self.evicted.append(key)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    build_mixtral(root / "ckpt", num_local_experts=8, num_hidden_layers=3)
    return export_model(root / "ckpt", root / "pkg", progress=False)


def test_evictions_in_every_layer_give_bit_identical_logits(package):
    resident = mobilemoe.load(package)
    expected = resident.logits(PROMPT)
    assert resident.stats.evictions == 0

    policy = RecordingLRU()
    # The minimum holds exactly one layer's top-k experts: every layer must evict.
    tight = mobilemoe.load(package, memory_budget=resident.plan.tightest_budget, policy=policy)
    assert np.array_equal(tight.logits(PROMPT), expected)
    assert np.array_equal(tight.logits(PROMPT), expected)  # again, from a cache left by the last run
    stats = tight.stats
    assert stats.evictions > 0 and stats.misses >= resident.stats.misses
    assert {layer for layer, _ in policy.evicted} == set(range(tight.dims.num_layers))
    assert stats.expert_cache_bytes <= stats.expert_cache_capacity


def test_generation_under_a_tight_budget_is_identical(package):
    resident = mobilemoe.load(package)
    tight = mobilemoe.load(package, memory_budget=resident.plan.tightest_budget)
    a = [t.token_id for t in resident.generate(PROMPT[:6], max_new_tokens=12)]
    b = [t.token_id for t in tight.generate(PROMPT[:6], max_new_tokens=12)]
    assert a == b
    assert tight.stats.evictions > 0
    assert tight.stats.hits + tight.stats.misses > 0


def test_memory_outside_the_plan_comes_off_the_expert_cache(package):
    # Ballast stands for what the plan does not know of (heap fragments, sessions holding
    # more than their calibration): page-ins must evict by RSS, and the step's end must take
    # it off the cache's capacity, and give it back once it is gone.
    resident = mobilemoe.load(package)
    expected = resident.logits(PROMPT)
    held = resident.plan.expert_session_bytes
    model = mobilemoe.load(package, memory_budget=resident.plan.tightest_budget + 12 * held)
    model.logits(PROMPT)
    full = model.stats.expert_cache_capacity
    assert model.stats.expert_cache_bytes > 6 * held  # most of the 14 that fit are resident
    floor = model.plan.top_k * held
    ballast = np.ones(2 * model.memory_budget, np.uint8)  # twice the budget, touched
    assert np.array_equal(model.logits(PROMPT), expected)  # lossless, whatever was evicted
    assert model.stats.expert_cache_bytes <= 2 * floor
    assert model.stats.expert_cache_capacity == floor  # the least a step needs
    del ballast
    assert np.array_equal(model.logits(PROMPT), expected)
    # given back (RSS beyond the plan before the ballast, if any, stays held back)
    assert model.stats.expert_cache_capacity > floor + (full - floor) // 2


def test_budget_strings_are_accepted(package):
    minimum = mobilemoe.load(package).plan.minimum_budget
    model = mobilemoe.load(package, memory_budget=f"{minimum / 1e6 + 1:.3f}MB")
    assert model.memory_budget >= minimum
    assert model.stats.memory_budget == model.memory_budget


def test_rss_follows_what_the_process_touches():
    # rss() reads /proc/self/statm itself (psutil's Python cost ~0.2 ms a call between the
    # matmuls of a page-in); it must agree with psutil, and see 64 MB arrive and go.
    import psutil

    process = psutil.Process()
    assert abs(rss() - process.memory_info().rss) < (1 << 20)
    before = rss()
    block = np.ones(64 << 20, np.uint8)
    assert rss() - before > 60 << 20
    del block
    assert rss() - before < 4 << 20


RSS_PROBE = textwrap.dedent("""
    import json, sys
    import mobilemoe
    from mobilemoe.memory import max_rss
    model = mobilemoe.load(sys.argv[1], memory_budget=int(sys.argv[2]), threads=2)
    ids = list(range(3, 3 + 96))
    model.logits(ids)
    list(model.generate(ids[:8], max_new_tokens=24))
    s = model.stats
    print(json.dumps({"baseline": s.baseline_rss, "max_rss": max_rss(), "evictions": s.evictions,
                      "peak_sampled": s.peak_rss, "expert_bytes": model.manifest.expert_bytes(),
                      "minimum": model.plan.minimum_budget}))
""")


def test_peak_rss_minus_baseline_stays_under_the_budget(tmp_path):
    # Tens of MB of experts: 4 layers x 8 experts x (3 x 512 x 1408) weights at int4.
    build_mixtral(tmp_path / "ckpt", hidden_size=512, intermediate_size=1408,
                  num_hidden_layers=4, num_local_experts=8, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=512)
    package = export_model(tmp_path / "ckpt", tmp_path / "pkg", progress=False)
    expert_bytes = sum(e.length for e in mobilemoe.manifest.Manifest.load(package).experts)
    assert expert_bytes > 30e6
    probe = tmp_path / "probe.py"
    probe.write_text(RSS_PROBE)
    # First run: learn the minimum; then run with a budget holding ~1/3 of the experts.
    first = json.loads(subprocess.run([sys.executable, str(probe), str(package), str(1 << 40)],
                                      capture_output=True, text=True, check=True).stdout)
    budget = first["minimum"] + expert_bytes // 3
    out = subprocess.run([sys.executable, str(probe), str(package), str(budget)],
                         capture_output=True, text=True, check=True).stdout
    run = json.loads(out)
    assert run["evictions"] > 0
    assert run["max_rss"] - run["baseline"] <= budget, run


def test_the_default_policy_is_decayed_lfu_and_stays_lossless(package):
    """Decayed LFU is the default (docs/CACHE_POLICIES.md); under a budget that evicts it
    gives the resident logits bit for bit, as every policy must."""
    resident = mobilemoe.load(package)
    expected = resident.logits(PROMPT)
    tight = mobilemoe.load(package, memory_budget=resident.plan.tightest_budget)
    assert isinstance(tight._cache.policy, DecayedLFUPolicy)
    assert np.array_equal(tight.logits(PROMPT), expected)
    assert tight.stats.evictions > 0


def test_concurrent_page_ins_are_lossless_and_counted(package, monkeypatch):
    """Large experts are paged in two at a time on threads; force it on these small ones."""
    monkeypatch.setattr(memory_plan, "CONCURRENT_PAGE_IN_BLOCK", 0)
    resident = mobilemoe.load(package)
    expected = resident.logits(PROMPT)
    budget = resident.plan.tightest_budget + resident.plan.expert_session_bytes
    with mobilemoe.load(package, memory_budget=budget) as paged:
        assert paged._page_in_batch == 2
        assert np.array_equal(paged.logits(PROMPT), expected)
        generated = [t.token_id for t in paged.generate(PROMPT, max_new_tokens=6)]
        s = paged.stats
    assert generated == [t.token_id for t in resident.generate(PROMPT, max_new_tokens=6)]
    assert s.evictions > 0 and s.misses > 0
    assert s.expert_cache_bytes <= s.expert_cache_capacity
    assert s.bytes_paged_in == s.misses * resident._store.entry(0, 0).length


DENSE_PROBE = textwrap.dedent("""
    import json, sys
    import mobilemoe
    model = mobilemoe.load(sys.argv[1], context_length=int(sys.argv[2]), threads=2)
    print(json.dumps({"dense": model.plan.dense_bytes, "kv": model.plan.kv_bytes}))
""")


def test_the_kv_cache_is_counted_once(tmp_path):
    """ONNX Runtime's attention writes the whole bound KV cache when a sequence starts at
    position 0. Loading warms the layer graphs up on a scratch cache: on the real one, the
    measured dense part would include the KV cache, which the plan counts on its own too."""
    build_mixtral(tmp_path / "ckpt", hidden_size=256, intermediate_size=256,
                  num_hidden_layers=2, num_local_experts=4, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=32768)
    package = export_model(tmp_path / "ckpt", tmp_path / "pkg", progress=False)
    probe = tmp_path / "probe.py"
    probe.write_text(DENSE_PROBE)
    short, long = (json.loads(subprocess.run(
        [sys.executable, str(probe), str(package), str(context)], capture_output=True,
        text=True, check=True).stdout) for context in (64, 32768))  # fresh processes
    assert long["kv"] == 2 * 2 * 8 * 32768 * 32 * 4  # layers, keys + values, heads, C, D, float
    assert long["dense"] - short["dense"] < 0.1 * long["kv"], (short, long)
