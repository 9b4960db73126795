"""A decode layer's experts on the native kernel, from DRAM: one or more builds of the kernel
side by side, with the expert blocks in 4 KiB pages or in huge pages.

    chrt -r 1 .venv/bin/python benchmarks/kernel_layer.py                      # the built kernel
    chrt -r 1 .venv/bin/python benchmarks/kernel_layer.py --huge-pages a.so b.so

320 random OLMoE-shaped int4 experts (1.1 GB, more than the last-level cache holds), eight at a
time through `mm_q4_silu_experts_sum` as a one-token decode step calls it, every expert once
per pass; the median over 6 passes of the time per layer, the builds alternating pass by pass.
Build a variant with the flags setup.py uses, e.g.
`gcc -O3 -std=gnu11 -ffp-contract=off -shared -fPIC -o b.so q4_experts.c -lm -lpthread`.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import time

import numpy as np

from mobilemoe import native_experts
from mobilemoe.memory import HUGE_PAGE


def expert_shapes(hidden: int, inter: int) -> list[tuple[tuple[int, ...], type]]:
    """gate_up [2I, H/64, 32 bytes], its scales, down [H, I/64, 32 bytes], its scales."""
    return [((2 * inter, hidden // 64, 32), np.uint8), ((2 * inter, hidden // 64), np.float32),
            ((hidden, inter // 64, 32), np.uint8), ((hidden, inter // 64), np.float32)]


def expert_arrays(buffer: np.ndarray, hidden: int, inter: int, rng: np.random.Generator
                  ) -> list[np.ndarray]:
    """An expert's four arrays, random, carved one after the other from buffer."""
    arrays, offset = [], 0
    for shape, dtype in expert_shapes(hidden, inter):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        array = buffer[offset:offset + size].view(dtype).reshape(shape)
        array[...] = (rng.integers(0, 256, shape, dtype=np.uint8) if dtype == np.uint8
                      else rng.random(shape, dtype=np.float32) * 0.02)
        arrays.append(array)
        offset += size
    return arrays


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("libraries", nargs="*", help="kernel builds (default: the installed one)")
    p.add_argument("--huge-pages", action="store_true", help="expert blocks in 2 MiB pages")
    p.add_argument("--experts", type=int, default=320)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=1024)
    a = p.parse_args(argv)
    native_experts.use_threads(2)
    paths = a.libraries or [native_experts._library._name]
    rng = np.random.default_rng(0)
    block = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                for shape, dtype in expert_shapes(a.hidden, a.intermediate))
    stride = -(-block // 4096) * 4096
    mapping = mmap.mmap(-1, stride * a.experts + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if a.huge_pages:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    memory = np.frombuffer(mapping, np.uint8)
    start = -memory.ctypes.data % HUGE_PAGE
    experts = [expert_arrays(memory[start + i * stride:], a.hidden, a.intermediate, rng)
               for i in range(a.experts)]
    pointers = np.array([[t.ctypes.data for t in e] for e in experts], np.uint64)  # [experts, 4]
    x = rng.standard_normal((1, a.hidden)).astype(np.float32)
    out, weights = np.empty_like(x), np.full(8, 1 / 8, np.float32)
    kernels = []
    for path in paths:
        library = ctypes.CDLL(path)
        library.mm_set_threads(2)
        call = library.mm_q4_silu_experts_sum
        call.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                         ctypes.c_void_p, ctypes.c_void_p]
        kernels.append(call)
    layers = a.experts // 8
    seconds: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(6):
        for path, call in zip(paths, kernels, strict=True):
            begin = time.perf_counter()
            for layer in range(layers):
                call(pointers[8 * layer:].ctypes.data, weights.ctypes.data, 8, a.hidden,
                     a.intermediate, x.ctypes.data, out.ctypes.data)
            seconds[path].append((time.perf_counter() - begin) / layers)
    layer_mb = 8 * sum(t.nbytes for t in experts[0]) / 1e6
    print(f"{a.experts} experts, {'huge' if a.huge_pages else '4 KiB'} pages, a layer = 8 experts "
          f"= {layer_mb:.1f} MB")
    for path, times in seconds.items():
        median = statistics.median(times)
        print(f"  {path}: {median * 1e6:7.1f} us a layer ({layer_mb / median / 1e3:.1f} GB/s)")


if __name__ == "__main__":
    main()
