"""Eviction policies (mobilemoe.cache_policies) and the trace-replay simulator
(benchmarks/policy_sim.py): hand-made eviction orders, `keep`, pinning, and the simulator
checked against the real ExpertCache. No model is loaded: every test is pure Python."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mobilemoe import expert_cache
from mobilemoe.cache_policies import (
    POLICY_NAMES,
    DecayedLFUPolicy,
    LFUPolicy,
    LRFUPolicy,
    LRUPolicy,
    PinnedPolicy,
    policy_by_name,
)
from mobilemoe.errors import MobileMoEError
from mobilemoe.expert_cache import ExpertCache, Loaded

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from policy_sim import (  # noqa: E402
    TRACES,
    BeladyPolicy,
    layer_requests,
    load_trace,
    recorded_profile,
    replay,
    simulate,
    synthetic_trace,
)

PROFILE = [[5, 1, 0, 9], [0, 7, 2, 1]]  # counts[layer][expert]: hottest (0, 3), (1, 1), (0, 0)


def use(policy, *keys, resident: set | None = None) -> None:
    """Ask for `keys` in turn as the cache does: touched if resident, else inserted."""
    resident = set() if resident is None else resident
    for key in keys:
        if key in resident:
            policy.touched(key)
        else:
            resident.add(key)
            policy.inserted(key)


def evict(policy, keep=frozenset()):
    victim = policy.victim(set(keep))
    if victim is not None:
        policy.removed(victim)
    return victim


# -- eviction orders ------------------------------------------------------------------------


def test_lfu_evicts_the_least_frequent_where_lru_evicts_the_oldest():
    lru, lfu = LRUPolicy(), LFUPolicy()
    for policy in (lru, lfu):
        use(policy, "a", "a", "a", "b", "c")  # a: 3 uses, oldest last use
    assert lru.victim(set()) == "a"
    assert [evict(lfu), evict(lfu), evict(lfu), evict(lfu)] == ["b", "c", "a", None]


def test_lfu_breaks_ties_by_recency_and_remembers_evicted_keys():
    lfu = LFUPolicy()
    resident: set = set()
    use(lfu, "a", "b", "a", "b", "c", resident=resident)  # a, b: 2 uses each, a older
    assert lfu.victim(set()) == "c"
    assert evict(lfu, keep={"c"}) == "a"
    resident.discard("a")
    use(lfu, "d", "d", "a", resident=resident)  # a comes back with its history: 3 uses
    assert [evict(lfu), evict(lfu), evict(lfu)] == ["c", "b", "d"]


def test_lrfu_prefers_frequency_over_one_recent_use_but_forgets_old_use():
    lrfu = LRFUPolicy(half_life=4)
    use(lrfu, "hot", "hot", "hot", "new")  # keys that are not tuples: one step per use
    assert lrfu.victim(set()) == "new"  # LRU would evict "hot"
    old = LRFUPolicy(half_life=4)
    resident: set = set()
    use(old, *["old"] * 5, resident=resident)
    use(old, *[f"x{i}" for i in range(40)], resident=resident)  # 40 steps later
    use(old, "recent", "recent", resident=resident)
    keep = {f"x{i}" for i in range(40)}
    assert old.victim(keep) == "old"  # 5 uses 40 steps ago < 2 uses now


def test_lrfu_spans_lru_and_lfu():
    short, long = LRFUPolicy(half_life=0.01), LRFUPolicy(half_life=1e9)
    for policy in (short, long):
        use(policy, "a", "a", "a", "b", "c")
    assert short.victim(set()) == "a"  # as LRU
    assert long.victim(set()) == "b"  # as LFU


def test_lrfu_counts_steps_not_accesses():
    lrfu = LRFUPolicy()
    # two decode steps of a 2-layer top-2 model: layer 0, layer 1, then layer 0 again
    for key in [(0, 1), (0, 2), (1, 3), (1, 0), (0, 1), (0, 5), (1, 3), (1, 0)]:
        use(lrfu, key, resident=set(lrfu._live))
    assert lrfu._clock.step == 1
    lrfu.touched((1, 0))  # asked twice in one step: the next step (one MoE layer models)
    assert lrfu._clock.step == 2


def test_dlfu_evicts_the_fewest_uses_and_among_equals_the_most_recent():
    dlfu = DecayedLFUPolicy()
    use(dlfu, "a", "a", "b", "c", "d")  # one step per use, all in the first window
    assert [evict(dlfu), evict(dlfu), evict(dlfu), evict(dlfu)] == ["d", "c", "b", "a"]


def test_dlfu_halves_counts_each_window():
    dlfu = DecayedLFUPolicy(window=4)
    resident: set = set()
    use(dlfu, "old", "old", "old", resident=resident)  # steps 0-2: 3 uses in window 0
    use(dlfu, *[f"x{i}" for i in range(9)], resident=resident)  # steps 3-11
    use(dlfu, "new", "new", resident=resident)  # window 3: counts 2 there, "old" 3/8
    keep = {f"x{i}" for i in range(9)}
    assert dlfu.victim(keep) == "old"
    with pytest.raises(MobileMoEError, match="window"):
        DecayedLFUPolicy(window=0)


def test_dlfu_keeps_a_stable_set_where_lru_and_lrfu_thrash():
    """Near-uniform routes, a cache of fewer experts than a step asks for: every step asks
    2 experts in each of 8 layers (16 keys) of a cache of 6. LRU evicts each key just before
    the next step asks for it; decayed LFU turns over the newcomers and keeps the rest."""
    steps = [[(layer, (step + layer) % 2) for layer in range(8)] for step in range(6)]
    hits = {}
    for name in ("lru", "lrfu", "dlfu"):
        policy, cache, count = policy_by_name(name), set(), 0
        for step in steps:
            for layer in range(8):
                for key in ((layer, 2), step[layer]):  # expert 2 every step, one other
                    if key in cache:
                        policy.touched(key)
                        count += 1
                        continue
                    while len(cache) >= 6:
                        victim = policy.victim(set())
                        cache.discard(victim)
                        policy.removed(victim)
                    cache.add(key)
                    policy.inserted(key)
        hits[name] = count
    assert hits["lru"] == 0 and hits["dlfu"] > hits["lrfu"]


@pytest.mark.parametrize("name", ["lru", "lfu", "lrfu", "dlfu"])
def test_keep_is_respected(name):
    policy = policy_by_name(name)
    use(policy, "a", "b", "c")
    first = policy.victim(set())
    second = policy.victim({first})
    assert second not in (None, first)
    assert policy.victim({"a", "b", "c"}) is None
    assert policy.victim(set()) == first  # keep did not change the order


def test_a_page_in_evicts_until_the_process_memory_fits_too():
    # `fits` stands for the runtime's RSS check: the count alone would keep all three.
    held = {"a": 1, "b": 1, "c": 1, "d": 1}
    resident: list[str] = []
    cache = ExpertCache(lambda key: Loaded(key, 1, 1), held.__getitem__, capacity_bytes=10,
                        policy=LRUPolicy(), fits=lambda needed: len(cache._entries) + needed <= 2)
    for key in "abc":
        cache.get(key)
        resident.append(sorted(cache._entries))
    assert resident == [["a"], ["a", "b"], ["b", "c"]]  # "a" went for "c", by memory not count
    assert cache.stats.evictions == 1
    assert cache.get_all(["c", "d"], None) == ["c", "d"]  # never evicts what the step asks for
    assert sorted(cache._entries) == ["c", "d"]


def test_get_cached_counts_and_touches_as_get_does_or_nothing_on_a_miss():
    cache = ExpertCache(lambda key: Loaded(key.upper(), 1, 1), lambda key: 1, capacity_bytes=3,
                        policy=LRUPolicy())
    for key in "abc":
        cache.get(key)
    assert cache.get_cached(["c", "a"]) == ["C", "A"]  # "b" is now the least recently used
    assert (cache.stats.hits, cache.stats.misses) == (2, 3)
    assert cache.get_cached(["a", "d"]) is None  # a miss: the caller pages in the usual way
    assert (cache.stats.hits, cache.stats.misses) == (2, 3)
    cache.get("d")  # the hits reach the policy before it picks a victim
    assert sorted(cache._entries) == ["a", "c", "d"]


def test_hits_reach_the_policy_in_order_when_the_cache_settles():
    cache = ExpertCache(lambda key: Loaded(key, 1, 1), lambda key: 1, capacity_bytes=3,
                        policy=LRUPolicy())
    for key in "abc":
        cache.get(key)
    cache.get("a")
    cache.get_cached(["b"])
    assert cache.policy.victim(set()) == "a"  # not told yet
    cache.settle()
    assert cache.policy.victim(set()) == "c"


# -- pinned ---------------------------------------------------------------------------------


def test_pinned_ranks_the_profile_and_bounds_what_it_pins():
    pinned = PinnedPolicy.from_profile(PROFILE, top_k=2, capacity=4)
    assert pinned.hot[:3] == [(0, 3), (1, 1), (0, 0)]
    assert (0, 2) not in pinned.hot and (1, 0) not in pinned.hot  # never asked: never pinned
    assert pinned.pinned == {(0, 3), (1, 1)}  # capacity 4 - reserve 2


def test_pinned_experts_are_never_evicted():
    pinned = PinnedPolicy.from_profile(PROFILE, top_k=1, rest=LRUPolicy(), capacity=3)
    resident: set = set()
    use(pinned, (0, 3), (1, 1), (0, 1), resident=resident)  # pinned, pinned, other
    assert pinned.victim(set()) == (0, 1)
    for key in [(0, 1), (1, 2), (1, 3), (0, 0), (1, 2)] * 3:
        if key not in resident:
            victim = evict(pinned, keep={key})
            assert victim not in {(0, 3), (1, 1)}
            resident.discard(victim)
        use(pinned, key, resident=resident)
    assert pinned.victim(set()) not in {(0, 3), (1, 1), None}


def test_pinned_learns_the_capacity_at_the_first_eviction():
    cache = ExpertCache(lambda key: Loaded(key, 1, 1), lambda key: 1, capacity_bytes=3,
                        policy=PinnedPolicy.from_profile(PROFILE, top_k=2))
    for key in [(0, 3), (1, 1), (0, 0), (1, 3), (0, 3), (1, 1)]:
        cache.get(key)
    assert cache.policy.pinned == {(0, 3)}  # 3 resident at the first eviction - reserve 2
    assert (0, 3) in cache and cache.stats.resident_bytes <= 3


# -- the simulator --------------------------------------------------------------------------


def drive_expert_cache(requests, policy, capacity: int) -> tuple[int, int]:
    """The real ExpertCache asked as MoEModel._moe asks it: the cached experts first."""
    cache = ExpertCache(lambda key: Loaded(object(), 1, 1), lambda key: 1, capacity, policy)
    for keys in requests:
        for key in sorted(keys, key=lambda k: k not in cache):
            cache.get(key)
    assert cache.stats.resident_bytes <= capacity
    return cache.stats.hits, cache.stats.misses


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_the_simulator_counts_what_expert_cache_counts(name, monkeypatch):
    monkeypatch.setattr(expert_cache, "release_freed_memory", lambda: None)  # no malloc_trim
    trace = load_trace(TRACES[0])
    requests = layer_requests(trace)[:4 * 150]  # 150 tokens
    profile = recorded_profile(trace, requests[:200])
    for capacity in (3, 8, 20):
        make = lambda: policy_by_name(name, profile, trace.top_k)  # noqa: E731
        assert replay(requests, make(), capacity) == drive_expert_cache(requests, make(), capacity)


def test_the_synthetic_trace_has_its_shape_skew_and_locality():
    flat = synthetic_trace(300, layers=3, experts=16, top_k=4, skew=0, locality=0, seed=1)
    skewed = synthetic_trace(300, layers=3, experts=16, top_k=4, skew=1.5, locality=0.5, seed=1)
    assert flat.experts.shape == (300, 3, 4)
    assert all(len(set(row)) == 4 for step in skewed.experts for row in step)  # distinct
    hits = {t.name: replay(layer_requests(t), LRUPolicy(), capacity=24)[0] for t in (flat, skewed)}
    assert hits[skewed.name] > hits[flat.name]


def test_belady_bounds_every_policy_on_the_recorded_traces():
    for path in TRACES:
        trace = load_trace(path)
        trace = type(trace)(trace.name, trace.layers, trace.num_experts, trace.top_k,
                            trace.experts[:400])
        rows = simulate(trace, shares=(0.1, 0.25, 0.5, 0.75), calibration=100)
        for share in (0.1, 0.25, 0.5, 0.75):
            rates = {r["policy"]: r["hit_rate"] for r in rows if r["share"] == share}
            assert set(rates) == {*POLICY_NAMES, "belady"}
            assert all(rates["belady"] >= rate for rate in rates.values()), (share, rates)
            if share == 0.1:  # the layer-cyclic scan: LRU never hits, frequency does
                assert rates["lru"] == 0 and rates["lfu"] > 0 and rates["lrfu"] > 0


def test_belady_evicts_the_key_used_furthest_ahead():
    requests = [("a",), ("b",), ("c",), ("b",), ("a",)]
    policy = BeladyPolicy(requests)
    use(policy, "a", "b")
    assert policy.victim(set()) == "a"  # b comes back first


# -- the factory ----------------------------------------------------------------------------


def test_the_factory_makes_each_policy_and_rejects_unknown_names():
    assert POLICY_NAMES == ("lru", "lfu", "lrfu", "dlfu", "pinned")
    made = {name: type(policy_by_name(name, PROFILE, top_k=2)) for name in POLICY_NAMES}
    assert made == {"lru": LRUPolicy, "lfu": LFUPolicy, "lrfu": LRFUPolicy,
                    "dlfu": DecayedLFUPolicy, "pinned": PinnedPolicy}
    with pytest.raises(MobileMoEError, match=r"unknown cache policy 'fifo': choose one of lru, lfu"):
        policy_by_name("fifo")
    with pytest.raises(MobileMoEError, match="needs a routing profile"):
        policy_by_name("pinned")
