"""Process memory as the budget promise is checked against: resident set size (RSS)."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

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


def rss() -> int:
    """Current resident set size of this process, in bytes."""
    return _PROCESS.memory_info().rss


def max_rss() -> int:
    """The highest RSS this process has had since it started, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def release_freed_memory() -> None:
    """Hand memory freed by evicted experts back to the OS.

    glibc keeps freed heap memory for reuse, so without this an evicted expert would still
    count in RSS and the process would drift above its budget.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
