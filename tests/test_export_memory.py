"""The exporter's memory follows the largest tensor, not the model.

A checkpoint whose weights total ~100 MB but whose largest tensor is 2 MB (as float32) is
exported in a fresh subprocess, so nothing the test process holds (torch, transformers, the
model it just built) blurs the numbers. The child measures, from just before the export to its
end:
- peak RSS growth: the kernel's high-water mark (VmHWM / ru_maxrss) minus the RSS before.
  This is what `top` and the OOM killer see, and it includes pages of the checkpoint files
  the exporter has memory-mapped and touched;
- peak heap growth: numpy's and Python's own allocations, traced exactly by tracemalloc.

Both must stay within a small multiple of the largest tensor plus a fixed allowance, and
well below the checkpoint's size.

This file is also the child: `python test_export_memory.py SMALL BIG WORK` prints the numbers
as JSON. It imports nothing heavy at the top for that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

MB = 1 << 20
# What a checkpoint tensor becomes inside the exporter: float32, whatever it was stored as.
FLOAT32 = 4
# One expert matrix, the largest tensor: 256 x 2048 = 2 MB as float32.
SHAPE = dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)
MULTIPLE = 16  # of the largest tensor: the exporter may hold a handful of copies of one tensor
ALLOWANCE = 16 * MB  # graphs being built, buffers of the writers, allocator slack


# -- the child ------------------------------------------------------------------------------


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark to the current RSS (Linux >= 4.0); True if done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _child(small: Path, big: Path, work: Path) -> dict:
    import ctypes
    import gc
    import resource
    import tempfile
    import tracemalloc

    from mobilemoe.export import export_model

    work = Path(tempfile.mkdtemp(dir=work))
    # Warm up: every lazy import, first-use allocation and cache of the export path.
    export_model(small, work / "warm.mmoe", progress=False)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)

    rss_before = _rss_now()
    hwm_reset = _reset_peak_rss()
    tracemalloc.start()
    heap_before = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    export_model(big, work / "big.mmoe", progress=False)
    seconds = time.perf_counter() - start
    heap_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # Without the reset, the lifetime peak may predate the export: then it overstates.
    peak = _peak_rss() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "rss_before": rss_before,
        "peak_rss_growth": peak - rss_before,
        "peak_heap_growth": heap_peak - heap_before,
        "hwm_reset": hwm_reset,
        "seconds": seconds,
    }


# -- the test -------------------------------------------------------------------------------


def _safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _largest_tensor_elements(folder: Path) -> int:
    """From the safetensors headers: what the checkpoint stores, as the exporter reads it
    (transformers 5 keeps experts fused in memory but saves them one tensor per expert)."""
    largest = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        for entry in header.values():
            count = 1
            for dim in entry["shape"]:
                count *= dim
            largest = max(largest, count)
    return largest


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def measured(request, tmp_path_factory) -> dict:
    import torch
    from checkpoints import build_mixtral

    dtype = getattr(torch, request.param)
    root = tmp_path_factory.mktemp(f"export_memory_{request.param}")
    build_mixtral(root / "small", seed=1)
    # ~96 MB of weights either way: bfloat16 takes twice the experts for the same bytes.
    experts = 4 if dtype == torch.float32 else 8
    build_mixtral(root / "big", seed=1, dtype=dtype, num_local_experts=experts, **SHAPE)
    largest = _largest_tensor_elements(root / "big") * FLOAT32
    total = _safetensors_bytes(root / "big")

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, __file__, str(root / "small"), str(root / "big"), str(root)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    numbers.update(dtype=request.param, largest_tensor=largest, checkpoint_bytes=total)
    return numbers


def _report(m: dict) -> str:
    return (f"{m['dtype']} checkpoint of {m['checkpoint_bytes'] / MB:.0f} MiB, largest tensor "
            f"{m['largest_tensor'] / MB:.1f} MiB as float32: peak RSS +{m['peak_rss_growth'] / MB:.1f}"
            f" MiB, peak heap +{m['peak_heap_growth'] / MB:.1f} MiB, export {m['seconds']:.2f} s")


def test_the_checkpoint_is_much_larger_than_its_largest_tensor(measured):
    assert measured["checkpoint_bytes"] > 80 * MB
    assert measured["largest_tensor"] == 2 * MB
    assert measured["checkpoint_bytes"] > 3 * (MULTIPLE * measured["largest_tensor"] + ALLOWANCE) / 2


def test_exporter_heap_stays_near_the_largest_tensor(measured):
    """What the exporter allocates itself (numpy arrays, bytes, graphs)."""
    limit = MULTIPLE * measured["largest_tensor"] + ALLOWANCE
    assert measured["peak_heap_growth"] < limit, _report(measured)
    assert measured["peak_heap_growth"] < measured["checkpoint_bytes"] / 2, _report(measured)


def test_exporter_peak_rss_stays_near_the_largest_tensor(measured):
    """The whole resident set, memory-mapped checkpoint pages included: what users see."""
    limit = MULTIPLE * measured["largest_tensor"] + ALLOWANCE
    assert measured["peak_rss_growth"] < limit, _report(measured)
    assert measured["peak_rss_growth"] < measured["checkpoint_bytes"] / 2, _report(measured)


if __name__ == "__main__":
    print(json.dumps(_child(*map(Path, sys.argv[1:4]))))
