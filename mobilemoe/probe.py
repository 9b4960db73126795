"""Measure this machine's figures for the planner: memory bandwidth, the expert store's read
speed, the cost per MB of a cache miss (read, evict, build the session), and the expert
kernel's throughput.

Runtime dependencies only (numpy, onnxruntime). Each figure is measured the way the runtime
meets it: expert blocks read one at a time, sessions built like the runtime builds them.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mobilemoe.expert_cache import ExpertCache, Loaded
from mobilemoe.expert_store import ExpertStore
from mobilemoe.manifest import Manifest, resolve_inside
from mobilemoe.ort_sessions import create_session_with_weights, use_threads, warm_up


@dataclass(frozen=True)
class MachineFigures:
    bandwidth: float  # bytes/s, numpy copy (read + write counted, as STREAM does)
    storage_read_cold: float  # bytes/s, expert blocks in random order, not in the page cache
    storage_read_warm: float  # bytes/s, the same from the page cache
    paging_read_ms_per_mb: float  # read + crc32 of a missed block, in the runtime's cache
    page_in_ms_per_mb: float  # evict + build the session (prepack), per MB of block
    kernel_rate: float  # bytes/s of expert block one M=1 expert run streams, at `threads`
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def memory_bandwidth(size: int = 512 << 20, repeats: int = 5) -> float:
    """Best of `repeats` copies of a `size`-byte array: 2 * size / time."""
    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def storage_read(package: Path, cold: bool = True, limit: int = 1 << 30, seed: int = 0) -> float:
    """Read speed of the package's expert store, one expert block at a time in random order
    (as misses arrive), up to `limit` bytes. cold: first drop the file from the page cache
    (posix_fadvise DONTNEED; no privileges needed for clean pages)."""
    m = Manifest.load(package)
    path = resolve_inside(package, m.expert_store.path)
    entries = list(m.experts)
    random.Random(seed).shuffle(entries)
    if cold:
        _drop_from_page_cache(path)
    fd = os.open(path, os.O_RDONLY)
    total, start = 0, time.perf_counter()
    try:
        for e in entries:
            block = np.empty(e.length, dtype=np.uint8)
            total += os.preadv(fd, [block], e.offset)
            if total >= limit:
                break
    finally:
        os.close(fd)
    return total / (time.perf_counter() - start)


def paging_cost(package: Path, threads: int, misses: int = 24, cached: int = 4
                ) -> tuple[float, float]:
    """(read ms per MB, page-in ms per MB) of a miss in steady state, as the runtime pays it:
    an ExpertCache holding `cached` experts, asked for experts in a cycle so that every request
    misses and evicts (evicting returns memory to the OS, and the new session faults fresh
    pages in). Read = read + crc32 of the block; page-in = the rest (evict, build, prepack)."""
    use_threads(threads)
    warm_up()
    m = Manifest.load(package)
    store = ExpertStore(package, m)
    templates = {tid: resolve_inside(package, t.graph.path).read_bytes()
                 for tid, t in m.templates.items()}
    entries = {(e.layer, e.expert): e for e in m.experts}
    keys = list(entries)[: max(cached + 1, min(len(entries), 2 * cached))]
    held = int(1.5 * max(e.length for e in entries.values()))
    read = [0.0]

    def load(key) -> Loaded:
        start = time.perf_counter()
        arrays = store.read(*key)
        read[0] += time.perf_counter() - start
        entry = entries[key]
        session = create_session_with_weights(templates[entry.template], list(arrays),
                                              list(arrays.values()))
        return Loaded(session, held, entry.length)

    cache = ExpertCache(load, lambda key: held, cached * held)
    try:
        for key in keys[:cached]:  # fill the cache first: steady state evicts on every miss
            cache.get(key)
        before = (cache.stats.paging_seconds, cache.stats.bytes_paged_in, read[0])
        for i in range(misses):
            cache.get(keys[(cached + i) % len(keys)])
        seconds = cache.stats.paging_seconds - before[0]
        mb = (cache.stats.bytes_paged_in - before[1]) / 1e6
        read_seconds = read[0] - before[2]
    finally:
        cache.clear()
        store.close()
    return read_seconds * 1e3 / mb, (seconds - read_seconds) * 1e3 / mb


def kernel_rate(package: Path, threads: int, working_set: int = 512 << 20, runs: int = 3) -> float:
    """Bytes of expert block per second an expert run streams at one token (M=1), cycling
    through sessions of up to `working_set` bytes of experts (or all of them): a working set
    far larger than the CPU caches, as a decode step's is."""
    use_threads(threads)
    warm_up()
    m = Manifest.load(package)
    store = ExpertStore(package, m)
    try:
        templates = {tid: resolve_inside(package, t.graph.path).read_bytes()
                     for tid, t in m.templates.items()}
        sessions, block_bytes = [], 0
        for e in m.experts:
            if block_bytes >= working_set:
                break
            arrays = store.read(e.layer, e.expert)
            sessions.append(create_session_with_weights(templates[e.template], list(arrays),
                                                        list(arrays.values())))
            block_bytes += e.length
    finally:
        store.close()
    x = np.random.default_rng(0).standard_normal((1, m.dims.hidden_size)).astype(np.float32)
    for s in sessions:
        s.run(None, {"x": x})
    start = time.perf_counter()
    for _ in range(runs):
        for s in sessions:
            s.run(None, {"x": x})
    return block_bytes * runs / (time.perf_counter() - start)


def measure(package: str | Path, threads: int) -> MachineFigures:
    package = Path(package).expanduser()
    read_ms, page_in = paging_cost(package, threads)
    return MachineFigures(
        bandwidth=memory_bandwidth(),
        storage_read_cold=storage_read(package, cold=True),
        storage_read_warm=storage_read(package, cold=False),
        paging_read_ms_per_mb=read_ms, page_in_ms_per_mb=page_in,
        kernel_rate=kernel_rate(package, threads), threads=threads,
    )
