"""Reads one expert's block from the package's expert store, checked against its crc32."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mobilemoe.checksum import crc32
from mobilemoe.errors import PackageError
from mobilemoe.manifest import ExpertEntry, ExpertTemplate, Manifest, resolve_inside
from mobilemoe.memory import huge_page_buffer


class ExpertStore:
    def __init__(self, package: Path, manifest: Manifest):
        self._path = resolve_inside(package, manifest.expert_store.path)
        self._fd = os.open(self._path, os.O_RDONLY)
        self.templates = manifest.templates
        self._entries = {(e.layer, e.expert): e for e in manifest.experts}

    def entry(self, layer: int, expert: int) -> ExpertEntry:
        return self._entries[(layer, expert)]

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """The expert's initializers as views into one freshly read, checked buffer."""
        block = self.read_unchecked(layer, expert)
        self.check(layer, expert, block)
        return self.views(layer, expert, block)

    def read_unchecked(self, layer: int, expert: int) -> np.ndarray:
        """The expert's block as read; `check` it before computing with it."""
        entry = self._entries[(layer, expert)]
        block = huge_page_buffer(entry.length)
        got = os.preadv(self._fd, [block], entry.offset)
        if got != entry.length:
            raise PackageError(f"{self._path.name}: truncated at expert {layer}/{expert} "
                               "(re-export the package)")
        return block

    def check(self, layer: int, expert: int, block: np.ndarray) -> None:
        """Raise if the block does not match its crc32 (which releases the GIL while it
        computes, so this can run on another thread)."""
        if crc32(block) != self._entries[(layer, expert)].crc32:
            raise PackageError(f"{self._path.name}: checksum mismatch at expert {layer}/{expert}; "
                               "the file is corrupt (re-export the package)")

    def views(self, layer: int, expert: int, block: np.ndarray) -> dict[str, np.ndarray]:
        return _views(block, self.templates[self._entries[(layer, expert)].template])

    def prefetch(self, layer: int, expert: int) -> None:
        """Ask the kernel to start reading the block (a hint: returns at once, no memory of
        ours), so that a page-in soon after finds it in the page cache."""
        if hasattr(os, "posix_fadvise"):
            entry = self._entries[(layer, expert)]
            os.posix_fadvise(self._fd, entry.offset, entry.length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _views(block: np.ndarray, template: ExpertTemplate) -> dict[str, np.ndarray]:
    return {
        s.name: block[s.offset:s.offset + s.nbytes].view(s.dtype).reshape(s.shape)
        for s in template.tensors
    }
