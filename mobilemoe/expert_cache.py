"""The expert cache: ONNX Runtime sessions of paged-in experts, held within a byte budget.

The cache counts what a session really holds (measured per expert template at load, after
ONNX Runtime's prepacking), evicts by a policy object, and keeps its statistics.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

from mobilemoe.memory import release_freed_memory

Key = Hashable


class EvictionPolicy(Protocol):
    def inserted(self, key: Key) -> None: ...
    def touched(self, key: Key) -> None: ...
    def removed(self, key: Key) -> None: ...
    def victim(self, keep: set) -> Key | None:
        """The entry to evict next, never one in `keep`; None if there is none."""


class LRUPolicy:
    """Evict the least recently used expert."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def inserted(self, key: Key) -> None:
        self._order[key] = None

    def touched(self, key: Key) -> None:
        self._order.move_to_end(key)

    def removed(self, key: Key) -> None:
        del self._order[key]

    def victim(self, keep: set) -> Key | None:
        return next((k for k in self._order if k not in keep), None)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_paged_in: int = 0  # bytes read from the expert store
    paging_seconds: float = 0.0  # reading + checking + building sessions
    resident_bytes: int = 0  # what the cached sessions hold now
    peak_resident_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class Loaded:
    session: Any
    held_bytes: int  # memory the session holds, counted against the budget
    read_bytes: int  # bytes read from disk to build it


class ExpertCache:
    def __init__(self, load: Callable[[Key], Loaded], held_bytes: Callable[[Key], int],
                 capacity_bytes: int, policy: EvictionPolicy | None = None,
                 fits: Callable[[int], bool] | None = None):
        """fits(bytes): whether that many more bytes fit the process's memory as measured
        now; page-ins evict until it says so too, not only until the count fits."""
        self._load = load
        self._held_bytes = held_bytes
        self._fits = fits or (lambda needed: True)
        self.capacity_bytes = capacity_bytes
        self.policy = policy or LRUPolicy()
        self._entries: dict[Key, Loaded] = {}
        # Hits not yet told to the policy, in order (see `settle`)
        self._unsettled: list[Key] = []
        self.stats = CacheStats()

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def get(self, key: Key, keep: set = frozenset()) -> Any:
        """The session for `key`, paging it in if needed; never evicts an entry in `keep`."""
        entry = self._entries.get(key)
        if entry is not None:
            self.stats.hits += 1
            self._unsettled.append(key)
            return entry.session
        return self._page_in([key], keep, None)[0]

    def get_cached(self, keys: Sequence[Key]) -> list[Any] | None:
        """The sessions for `keys` if every one is cached, counted as `get` would; else None,
        and nothing counted (a decode step's usual case in one call)."""
        entries = self._entries
        if not all(key in entries for key in keys):
            return None
        self.stats.hits += len(keys)
        self._unsettled.extend(keys)
        return [entries[key].session for key in keys]

    def settle(self) -> None:
        """Tell the policy about the hits since the last call, in the order they came.

        Hits are queued rather than told one by one: the policy's bookkeeping is ~12 us a
        decode layer's worth with warm caches but ~56 us right after a layer graph has
        streamed its weights through them. The queue is settled before every page-in (so
        the policy chooses victims knowing every hit before it: the same choices) and by
        the runtime at the end of each forward step, so between steps the policy is current."""
        if self._unsettled:
            touched = self.policy.touched
            for key in self._unsettled:
                touched(key)
            self._unsettled.clear()

    def get_all(self, keys: Sequence[Key], pool: Executor | None) -> list[Any]:
        """Sessions for `keys` (not cached ones, typically), the missing ones paged in
        concurrently on `pool` after room is made for all of them at once; none of `keys` is
        evicted for another."""
        sessions = {key: self.get(key) for key in keys if key in self._entries}
        missing = [key for key in keys if key not in sessions]
        if missing:
            sessions.update(zip(missing, self._page_in(missing, set(keys), pool), strict=True))
        return [sessions[key] for key in keys]

    def _page_in(self, keys: list[Key], keep: set, pool: Executor | None) -> list[Any]:
        self.settle()
        self.stats.misses += len(keys)
        start = time.perf_counter()
        # Evict first, so a new session never coexists with what it replaces.
        self._make_room(sum(self._held_bytes(k) for k in keys), keep)
        loaded = list(pool.map(self._load, keys)) if pool and len(keys) > 1 else \
            [self._load(key) for key in keys]
        for key, entry in zip(keys, loaded, strict=True):
            self._insert(key, entry)
        self.stats.paging_seconds += time.perf_counter() - start
        return [entry.session for entry in loaded]

    def _insert(self, key: Key, entry: Loaded) -> None:
        self._entries[key] = entry
        self.policy.inserted(key)
        self.stats.bytes_paged_in += entry.read_bytes
        self.stats.resident_bytes += entry.held_bytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes,
                                             self.stats.resident_bytes)

    def _make_room(self, needed: int, keep: set) -> None:
        # No malloc_trim here (~1 ms with a large heap, a quarter of a page-in): an evicted
        # session's large buffers are mmapped (memory.limit_heap_retention) and go back to
        # the OS when freed; its small ones are reused by the session built next. The
        # runtime trims once per forward step, and when a page-in would cross the budget
        # (`fits`, MoEModel._fits_budget).
        while self.stats.resident_bytes + needed > self.capacity_bytes or not self._fits(needed):
            victim = self.policy.victim(keep)
            if victim is None:
                break  # only experts the current step needs are left: the plan allows them
            self._remove(victim)

    def _remove(self, key: Key) -> None:
        self.policy.removed(key)  # policy first: an interrupt between the two stays consistent
        entry = self._entries.pop(key)
        self.stats.resident_bytes -= entry.held_bytes
        self.stats.evictions += 1

    def clear(self) -> None:
        self.settle()
        for key in list(self._entries):
            self._remove(key)
        release_freed_memory()
