"""The paged expert store: one contiguous, aligned block per (layer, expert).

A block holds the expert template's tensors at fixed offsets (each 64-byte aligned), so a
page-in is one sequential read of `block_bytes` at an `alignment`-aligned file offset, and
the arrays are views into that one buffer.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from mobilemoe.checksum import crc32
from mobilemoe.manifest import ExpertEntry, TensorSlot

TENSOR_ALIGNMENT = 64  # SIMD-friendly start for every tensor inside a block
STORE_ALIGNMENT = 4096  # page size: blocks can be memory-mapped or read with O_DIRECT


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def block_slots(shapes: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> tuple[list[TensorSlot], int]:
    slots, offset = [], 0
    for name, (dtype, shape) in shapes.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        slots.append(TensorSlot(name=name, dtype=np.dtype(dtype).name, shape=list(shape),
                                offset=offset, nbytes=nbytes))
        offset = _align(offset + nbytes, TENSOR_ALIGNMENT)
    return slots, offset


class ExpertStoreWriter:
    def __init__(self, f: BinaryIO):
        self._f = f
        self.entries: list[ExpertEntry] = []

    def append(self, layer: int, expert: int, template: str, slots: list[TensorSlot],
               block_bytes: int, arrays: dict[str, np.ndarray]) -> None:
        block = bytearray(block_bytes)
        for slot in slots:
            data = np.ascontiguousarray(arrays[slot.name]).tobytes()
            assert len(data) == slot.nbytes, (slot.name, len(data), slot.nbytes)
            block[slot.offset:slot.offset + slot.nbytes] = data
        offset = _align(self._f.tell(), STORE_ALIGNMENT)
        self._f.write(b"\0" * (offset - self._f.tell()))
        self._f.write(block)
        self.entries.append(ExpertEntry(layer=layer, expert=expert, template=template,
                                        offset=offset, length=block_bytes,
                                        crc32=crc32(block)))
