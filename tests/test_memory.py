"""Huge pages for the weights the kernels stream, the resident size unchanged."""

import mmap
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from mobilemoe.memory import (
    HUGE_PAGE,
    anonymous_mappings,
    collapse_into_huge_pages,
    huge_page_buffer,
    rss,
)

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from shapes import Shape  # noqa: E402
from synthetic_package import write_synthetic_package  # noqa: E402

import mobilemoe  # noqa: E402


def _collapse_works() -> bool:
    """Whether this kernel moves a wholly resident private mapping into huge pages."""
    before = anonymous_mappings()
    scratch = mmap.mmap(-1, 3 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(scratch, np.uint8)
    view[:] = 1
    moved = collapse_into_huge_pages(before)
    del view
    scratch.close()
    return moved > 0


def _smaps_field(address: int, field: str) -> list[str]:
    """The values of `field` (e.g. "VmFlags") for the mapping that holds `address`, from
    /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith(f"{field}:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _vm_flags(address: int) -> list[str]:
    return _smaps_field(address, "VmFlags")


def test_small_blocks_are_plain_buffers():
    block = huge_page_buffer(HUGE_PAGE - 1)
    assert block.shape == (HUGE_PAGE - 1,) and block.dtype == np.uint8


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="no transparent huge pages here")
def test_whole_huge_pages_are_asked_for_and_the_tail_costs_no_more_than_its_length():
    length = 3 * HUGE_PAGE // 2 + 12345  # one whole huge page and a tail, like an OLMoE expert
    before = rss()
    blocks = [huge_page_buffer(length) for _ in range(8)]
    for block in blocks:
        block[:] = 7
    grown = rss() - before
    assert all(b.shape == (length,) and b.ctypes.data % HUGE_PAGE == 0 for b in blocks)
    assert "hg" in _vm_flags(blocks[0].ctypes.data)  # the whole huge page: advised
    assert "hg" not in _vm_flags(blocks[0].ctypes.data + HUGE_PAGE)  # the tail: not
    assert grown < 8 * (length + 64 * 1024)  # a huge page over each tail would add 8 x 0.5 MiB
    del blocks, block
    assert rss() - before < grown / 4  # unmapped with its last view


def _anon_huge_bytes(address: int) -> int:
    return int(_smaps_field(address, "AnonHugePages")[0]) * 1024  # reported in kB


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="no transparent huge pages here")
def test_new_wholly_resident_mappings_move_to_huge_pages_and_nothing_grows():
    size = 3 * HUGE_PAGE
    before = anonymous_mappings()
    full = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # read-only between them, so that the kernel does not merge the two into one mapping
    guard = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
    partial = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    full_view, partial_view = np.frombuffer(full, np.uint8), np.frombuffer(partial, np.uint8)
    full_view[:] = 3  # like weights ONNX Runtime has written
    partial_view[:HUGE_PAGE // 2] = 3  # like a buffer touched in part
    resident = rss()
    moved = collapse_into_huge_pages(before, threads=2)
    if moved == 0:
        pytest.skip("this kernel cannot collapse pages (MADV_COLLAPSE is Linux 6.1+)")
    assert _anon_huge_bytes(full_view.ctypes.data) >= 2 * HUGE_PAGE  # its whole 2 MiB stretches
    assert _anon_huge_bytes(partial_view.ctypes.data) == 0
    assert abs(rss() - resident) < HUGE_PAGE  # nothing filled in
    assert np.all(full_view == 3) and np.all(partial_view[:HUGE_PAGE // 2] == 3)
    guard.close()


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text() or not _collapse_works(),
                    reason="this kernel cannot move memory into huge pages (MADV_COLLAPSE)")
def test_a_model_holds_its_dense_weights_in_huge_pages(tmp_path):
    # an LM head and embedding of 8 MB each: whole huge pages in ONNX Runtime's copies
    shape = Shape("wide-vocab", "none (test shape)", layers=1, hidden=1024, intermediate=256,
                  experts=4, top_k=2, heads=8, kv_heads=8, head_dim=128, vocab=8192)
    package = write_synthetic_package(shape, tmp_path / "wide.mmoe")
    with mobilemoe.load(package, threads=2, context_length=16) as model:
        stats = model.stats
        assert stats.dense_huge_page_bytes >= 4 * HUGE_PAGE
        assert stats.dense_huge_page_bytes <= stats.dense_bytes + HUGE_PAGE
        assert np.isfinite(model.logits([1, 2, 3])).all()
