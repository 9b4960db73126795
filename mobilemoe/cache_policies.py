"""Eviction policies for the expert cache, all behind `expert_cache.EvictionPolicy`.

    lru     the least recently used goes (`expert_cache.LRUPolicy`)
    lfu     the least frequently used over the whole run goes; ties: the least recent
    lrfu    the lowest decayed frequency goes (LRFU): each use adds 1, halving every 32 steps
    dlfu    the fewest uses in 32-step windows (halved per window) go; ties: the most recent
            first, which keeps a stable set under near-uniform routes (DecayedLFUPolicy; the
            default: DEFAULT_POLICY)
    pinned  a routing profile's hottest experts never go; dlfu chooses among the others

Why not LRU alone: a forward step asks every layer in turn for its experts, so when the cache
holds fewer than one step's L * k experts, LRU evicts exactly what the next step asks for
first (a cyclic scan) and never hits: 0% at a 10% budget on a 16 x 64 top-8 model. The other
policies keep experts that have been used often and make a newcomer the next victim instead,
so they keep the hot experts resident however small the cache. `benchmarks/policy_sim.py`
replays routing traces through these classes; docs/CACHE_POLICIES.md has its numbers.

Keys are the runtime's (layer, expert) pairs; only `LRFUPolicy`'s step clock and
`PinnedPolicy.from_profile` look inside them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mobilemoe.errors import MobileMoEError
from mobilemoe.expert_cache import EvictionPolicy, Key, LRUPolicy
from mobilemoe.manifest import Manifest
from mobilemoe.planner import ROUTING_PROFILE, read_routing_profile

__all__ = ["DecayedLFUPolicy", "LFUPolicy", "LRFUPolicy", "LRUPolicy", "POLICY_NAMES",
           "PinnedPolicy", "ScoredPolicy", "check_policy_name", "policy_by_name",
           "policy_for_package"]

POLICY_NAMES = ("lru", "lfu", "lrfu", "dlfu", "pinned")
# The default since it was confirmed end to end (docs/CACHE_POLICIES.md): on the OLMoE shape at
# 50 / 25 / 10% of the experts, decode hit rates 96 / 81 / 64% (LRFU 94 / 81 / 64%, LRU 89 / 72
# / 0%); on the Mixtral shape at an 8 GB budget 59% (LRFU and LRU 0%).
DEFAULT_POLICY = "dlfu"
# Forward steps (tokens when decoding). Of 2, 8, 32, 128 and infinity (= LFU), 32 did best on
# the recorded demo traces, and on stationary synthetic ones it is within a point of LFU.
DEFAULT_HALF_LIFE = 32.0


class ScoredPolicy:
    """Evict the resident key with the lowest score; a subclass says what a use does to a
    key's score (`_used`). Equal scores go oldest entry first.

    A heap with lazy deletion (a use pushes a new entry, stale ones are skipped when they
    surface): O(log n) per use and per eviction, where scanning every resident key would
    cost O(n) per miss, and a 16 x 64 model's cache holds up to 1024 keys.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[Any, int, Key]] = []  # (score, entry number, key)
        self._live: dict[Key, int] = {}  # resident key -> the number of its current entry
        self._entries = itertools.count()

    def _used(self, key: Key) -> Any:
        """Record one use of `key`; its new score (anything comparable)."""
        raise NotImplementedError

    def _push(self, key: Key) -> None:
        entry = next(self._entries)
        self._live[key] = entry
        heapq.heappush(self._heap, (self._used(key), entry, key))
        if len(self._heap) > 2 * len(self._live) + 64:  # mostly stale: rebuild, O(n)
            self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def inserted(self, key: Key) -> None:
        self._push(key)

    def touched(self, key: Key) -> None:
        self._push(key)

    def removed(self, key: Key) -> None:
        del self._live[key]

    def victim(self, keep: set) -> Key | None:
        heap, live, held = self._heap, self._live, []
        try:
            while heap:
                _, entry, key = heap[0]
                if live.get(key) != entry:
                    heapq.heappop(heap)  # evicted, or used again since
                elif key in keep:
                    held.append(heapq.heappop(heap))
                else:
                    return key
            return None
        finally:
            for e in held:
                heapq.heappush(heap, e)


class LFUPolicy(ScoredPolicy):
    """Evict the key used least often since the policy was made, the least recently used of
    those first. Counts survive eviction ("perfect" LFU): an expert evicted and asked for
    again comes back with its history, so a popular expert is not judged a newcomer."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[Key, int] = {}
        self._clock = itertools.count()

    def _used(self, key: Key) -> tuple[int, int]:
        count = self.counts[key] = self.counts.get(key, 0) + 1
        return count, next(self._clock)


class _StepClock:
    """Counts forward steps from the keys asked for. The runtime asks layer 0's experts,
    then layer 1's, ..., and never one key twice in a step, so a lower layer than the last
    one, or a key already asked in this step, starts the next. Keys that are not
    (layer, ...) tuples count a step each."""

    def __init__(self) -> None:
        self.step = 0
        self._layer: Any = None
        self._seen: set[Key] = set()

    def tick(self, key: Key) -> int:
        layer = key[0] if isinstance(key, tuple) and key else None
        if layer is None or key in self._seen or (self._layer is not None and layer < self._layer):
            self.step += 1
            self._seen.clear()
        self._layer = layer
        self._seen.add(key)
        return self.step


class LRFUPolicy(ScoredPolicy):
    """LRFU (Lee et al., IEEE Trans. Computers 2001): each key has a combined recency and
    frequency value, CRF = sum over its past uses of 2^(-age / half_life); the lowest goes.

    Chosen over LRU-2 because LRU-2 still orders keys by (second-to-last) recency, so under
    the layer-cyclic scan it evicts hot experts in the order they come back, just one use
    later; and because LRFU's single knob spans LRU (half-life -> 0) to LFU (-> infinity),
    so it follows a change of topic where whole-run LFU stays loyal to the old experts.
    Age counts forward steps, not accesses: a token asks L * k keys, which differs 16-fold
    between models, so a half-life in steps means the same on every model. The CRF of every
    key decays at the same rate, so the order is that of log2(CRF at last use) + last use /
    half_life, a number fixed between uses: a heap keeps it (`ScoredPolicy`).
    """

    def __init__(self, half_life: float = DEFAULT_HALF_LIFE) -> None:
        if not half_life > 0:
            raise MobileMoEError(f"LRFU half-life must be positive, got {half_life}")
        super().__init__()
        self.half_life = float(half_life)
        self._crf: dict[Key, tuple[float, int]] = {}  # key -> (CRF at its last use, that step)
        self._clock = _StepClock()

    def _used(self, key: Key) -> float:
        now = self._clock.tick(key)
        crf, last = self._crf.get(key, (0.0, now))
        crf = 1.0 + crf * 2.0 ** (-(now - last) / self.half_life)
        self._crf[key] = (crf, now)
        return math.log2(crf) + now / self.half_life


class DecayedLFUPolicy(ScoredPolicy):
    """Fewest recent uses goes; among equals, the most recently used goes first.

    A use counts 1 in the current window of `window` forward steps, and every count halves
    at each window's end (a use w windows ago counts 2^-w), so the order follows a change of
    topic as LRFU's does. Unlike LRFU's continuous decay, uses within a window weigh the same,
    so experts with the same history tie, and ties go most recent first. That is what a
    forward step wants when the cache holds fewer than one step's experts and the routes are
    near uniform (a random-weight model, or Mixtral's 8 experts): the step asks layer 0, 1,
    ... in turn, so the expert just used is the one asked for last. LRU, and LRFU between
    experts used once, evict the other way round and never hit (0% on the Mixtral shape at an
    8 GB budget); this keeps a stable set resident and turns the newcomers over.
    """

    def __init__(self, window: int = int(DEFAULT_HALF_LIFE)) -> None:
        if window < 1:
            raise MobileMoEError(f"the decayed LFU window must be at least 1 step, got {window}")
        super().__init__()
        self.window = window
        self._count: dict[Key, float] = {}  # log2 of the count in units of the current window
        self._clock = _StepClock()
        self._recency = itertools.count()

    def _used(self, key: Key) -> tuple[float, int]:
        # Counts are kept as log2(sum of 2^(window index of each use)), growing with time
        # instead of halving: the same order as halving them all, with no pass over the keys.
        weight = float(self._clock.tick(key) // self.window)
        old = self._count.get(key)
        new = weight if old is None else max(old, weight) + math.log2(1 + 2.0 ** -abs(old - weight))
        self._count[key] = new
        return new, -next(self._recency)  # ties: the most recent use has the lowest entry


class PinnedPolicy:
    """Never evict the `hot` keys (a routing profile's most used experts); `rest` chooses
    among the others.

    At most capacity - reserve keys are pinned, the hottest first, so the unpinned part always
    holds one decode step's experts of a layer (reserve = top-k). The capacity is the cache's,
    in experts: given, or taken at the first eviction, when the cache is full and what it holds
    is its capacity (a policy is made before the model has measured its experts' size).
    """

    def __init__(self, hot: Sequence[Key], reserve: int, rest: EvictionPolicy | None = None,
                 capacity: int | None = None) -> None:
        if reserve < 1:
            raise MobileMoEError(f"the pinned policy's reserve must be at least 1, got {reserve}")
        self.hot = list(hot)  # hottest first
        self.reserve = reserve
        self.rest = rest if rest is not None else DecayedLFUPolicy()
        self.pinned: frozenset | None = None if capacity is None else self._pin(capacity)
        self._resident: set[Key] = set()

    @classmethod
    def from_profile(cls, counts: Sequence[Sequence[float]], top_k: int,
                     rest: EvictionPolicy | None = None, capacity: int | None = None
                     ) -> PinnedPolicy:
        """counts[layer][expert], as `planner.ProfilingLRU.counts` records and
        `planner.read_routing_profile` reads them. Experts never asked for are never pinned."""
        ranked = sorted((-float(c), layer, expert) for layer, row in enumerate(counts)
                        for expert, c in enumerate(row) if c > 0)
        return cls([(layer, expert) for _, layer, expert in ranked], top_k, rest, capacity)

    def _pin(self, capacity: int) -> frozenset:
        return frozenset(self.hot[:max(0, capacity - self.reserve)])

    def _is_pinned(self, key: Key) -> bool:
        return self.pinned is not None and key in self.pinned

    def inserted(self, key: Key) -> None:
        self._resident.add(key)
        if not self._is_pinned(key):
            self.rest.inserted(key)

    def touched(self, key: Key) -> None:
        if not self._is_pinned(key):
            self.rest.touched(key)

    def removed(self, key: Key) -> None:  # a pinned key only leaves by ExpertCache.clear()
        self._resident.discard(key)
        if not self._is_pinned(key):
            self.rest.removed(key)

    def victim(self, keep: set) -> Key | None:
        if self.pinned is None:
            self.pinned = self._pin(len(self._resident))
            for key in self.pinned & self._resident:
                self.rest.removed(key)  # the rest never chooses among pinned keys
        return self.rest.victim(keep)


def check_policy_name(name: str) -> None:
    """Raise the error a user sees for an unknown policy name (before anything is loaded)."""
    if name not in POLICY_NAMES:
        raise MobileMoEError(f"unknown cache policy {name!r}: choose one of {', '.join(POLICY_NAMES)}")


def policy_by_name(name: str, profile: Sequence[Sequence[float]] | None = None,
                   top_k: int | None = None) -> EvictionPolicy:
    """A fresh policy by its name in POLICY_NAMES. "pinned" needs `profile` (counts per layer
    and expert, e.g. from `planner.read_routing_profile`) and the model's `top_k`."""
    check_policy_name(name)
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "lrfu":
        return LRFUPolicy()
    if name == "dlfu":
        return DecayedLFUPolicy()
    if profile is None or top_k is None:
        raise MobileMoEError("the pinned cache policy needs a routing profile "
                             "(--routing-profile FILE) and the model's top-k")
    return PinnedPolicy.from_profile(profile, top_k)


def policy_for_package(name: str, package: str | Path,
                       routing_profile: str | Path | None = None) -> EvictionPolicy:
    """The policy `name` for the package at `package`, as `mobilemoe run --policy` makes it.
    "pinned" reads `routing_profile` (default: the package's routing_profile.json), checked
    against the package's layers and experts."""
    check_policy_name(name)
    if name != "pinned":
        if routing_profile is not None:
            raise MobileMoEError(f"a routing profile is only used by the pinned cache policy, "
                                 f"not {name!r}")
        return policy_by_name(name)
    manifest = Manifest.load(Path(package).expanduser())
    if routing_profile is None:
        routing_profile = Path(package).expanduser() / ROUTING_PROFILE
        if not routing_profile.is_file():
            raise MobileMoEError("the pinned cache policy needs a routing profile: give "
                                 "--routing-profile FILE (the package has no routing_profile.json)")
    d = manifest.dims
    counts = read_routing_profile(Path(routing_profile).expanduser(), d.num_layers, d.num_experts,
                                  manifest.moe_layers)
    return policy_by_name("pinned", counts, manifest.routing.top_k)
