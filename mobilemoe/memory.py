"""Process memory as the budget promise is checked against: resident set size (RSS)."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import mmap
import os
import resource
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil

_PROCESS = psutil.Process()


def _load_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None


_MALLOC_TRIM = _load_malloc_trim()
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter numbers (malloc.h)


def limit_heap_retention(threshold: int = 256 << 10) -> None:
    """Serve allocations of `threshold` bytes and more with their own mmap, process-wide.

    glibc raises its mmap threshold each time a large mmapped block is freed, after which
    blocks of that size come from the heap and stay resident after free: expert weights and
    activation buffers freed by the runtime would keep counting in RSS. A fixed threshold
    returns every large block to the OS the moment it is freed. 256 KiB rather than 1 MiB: a
    prefill's per-expert buffers (tens of rows x hidden floats) fall in between, and from the
    heap they raised the peak of a 256-token prefill on the OLMoE shape by ~60 MB (VmHWM).
    One-token steps allocate far below either threshold.
    """
    if _MALLOC_TRIM is None:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


def huge_page_buffer(length: int) -> np.ndarray:
    """An uninitialized uint8 buffer of `length` bytes whose whole 2 MiB stretches the kernel
    backs with transparent huge pages where it can (Linux with THP set to `madvise` or
    `always`); elsewhere, or below 2 MiB, a plain buffer.

    For expert blocks that the native kernel streams: with 4 KiB pages the TLB misses cost a
    layer's 8 experts on the OLMoE shape 9-14% of their time (1447 against 1247-1320 us a
    layer from DRAM). Only whole huge pages inside the block are asked for, so it stays
    resident at its length (a huge page over its tail would add up to 2 MiB: numpy asks for
    huge pages over whole arrays from 4 MiB, so this is its own mapping, not numpy's); the
    extra 2 MiB of address space that aligns it is never touched, so never resident. The
    mapping goes when the last view of the buffer does."""
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if length < HUGE_PAGE or advise is None:
        return np.empty(length, np.uint8)
    mapping = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(mapping, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    mapping.madvise(advise, start, length - length % HUGE_PAGE)
    return raw[start:start + length]


_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25  # linux/mman.h; MADV_COLLAPSE since Linux 6.1


def _load_libc_calls():
    if not sys.platform.startswith("linux"):
        return None, None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        madvise, mincore = libc.madvise, libc.mincore
    except (OSError, AttributeError):
        return None, None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return madvise, mincore


_MADVISE, _MINCORE = _load_libc_calls()


def anonymous_mappings() -> list[tuple[int, int]]:
    """This process's private anonymous mappings as (start, end), from /proc/self/maps
    (Linux; elsewhere none)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split()
        if len(fields) == 5 and fields[4] == "0" and fields[1].endswith("p"):  # no file behind
            lo, hi = fields[0].split("-")
            spans.append((int(lo, 16), int(hi, 16)))
    return spans


def _wholly_resident(start: int, length: int) -> bool:
    pages = np.zeros(length // _PAGE_SIZE, np.uint8)
    return _MINCORE(start, length, pages.ctypes.data) == 0 and bool(np.all(pages & 1))


def collapse_into_huge_pages(before: list[tuple[int, int]], threads: int = 1) -> int:
    """Move into transparent huge pages, now, every 2 MiB stretch of anonymous memory that is
    wholly resident and was not mapped in `before` (an `anonymous_mappings()`); returns the
    bytes moved. The kernel copies them (MADV_COLLAPSE, ~0.4 GB/s a thread here), on
    `threads` threads. A hint: where the kernel cannot, nothing happens.

    For ONNX Runtime's copies of the dense weights (it allocates them itself, in 4 KiB
    pages): decoding the 2-layer OLMoE shape, the dense graphs took 6.9 instead of 8.5 ms a
    token (median of 8 alternating pairs), the TLB misses gone. Only wholly resident
    stretches: collapsing fills a huge page entirely, so a partly touched one (a lazily
    zeroed buffer) would grow the resident set. Stretches, not mappings: the kernel merges
    neighbouring mappings, old and new, touched and not."""
    if _MADVISE is None or _MINCORE is None:
        return 0
    old = sorted(before)
    old_starts = [lo for lo, _ in old]

    def is_old(lo: int, hi: int) -> bool:  # overlaps a mapping of `before`
        i = bisect.bisect_right(old_starts, hi - 1) - 1
        return i >= 0 and old[i][1] > lo

    runs: list[list[int]] = []  # [start, length] of consecutive stretches
    for start, end in anonymous_mappings():
        for lo in range(-(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE, HUGE_PAGE):
            if is_old(lo, lo + HUGE_PAGE) or not _wholly_resident(lo, HUGE_PAGE):
                continue
            if runs and runs[-1][0] + runs[-1][1] == lo and runs[-1][1] < 16 * HUGE_PAGE:
                runs[-1][1] += HUGE_PAGE  # in runs of up to 32 MiB: a share for every thread
            else:
                runs.append([lo, HUGE_PAGE])

    def collapse(run: list[int]) -> int:  # ctypes lets go of the GIL meanwhile
        lo, length = run
        advised = _MADVISE(lo, length, _MADV_HUGEPAGE) == 0
        return length if advised and _MADVISE(lo, length, _MADV_COLLAPSE) == 0 else 0

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="mobilemoe-thp") as pool:
        return sum(pool.map(collapse, runs))


def _open_statm() -> int | None:
    try:
        return os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:  # not Linux: psutil knows how
        return None


_STATM = _open_statm()
_PAGE_SIZE = resource.getpagesize()


def rss() -> int:
    """Current resident set size of this process, in bytes.

    Read at every page-in and step: on Linux one read of /proc/self/statm (its second field
    is the resident pages, as psutil reads it) from a descriptor kept open."""
    if _STATM is not None:
        return int(os.pread(_STATM, 128, 0).split()[1]) * _PAGE_SIZE
    return _PROCESS.memory_info().rss


def max_rss() -> int:
    """The highest RSS this process has had since it started, in bytes.

    On Linux this is VmHWM, not getrusage's ru_maxrss: ru_maxrss survives fork + exec, so a
    process started from a large parent (a test runner holding torch) would report the
    parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def release_freed_memory() -> None:
    """Hand memory freed by evicted experts back to the OS.

    glibc keeps freed heap memory for reuse, so without this an evicted expert would still
    count in RSS and the process would drift above its budget.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
