"""Buffers for expert blocks: huge pages inside, resident size unchanged."""

import re
from pathlib import Path

import numpy as np
import pytest

from mobilemoe.memory import HUGE_PAGE, huge_page_buffer, rss

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span.group(1), 16) <= address < int(span.group(2), 16)
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


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
