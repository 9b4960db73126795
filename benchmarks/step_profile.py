"""Where a decode token's time goes, finer than `mobilemoe bench`'s split; and what a page-in
is made of. Timers wrapped around the runtime's own functions (no change to the runtime).

    .venv/bin/python benchmarks/step_profile.py decode PKG              # all experts cached
    .venv/bin/python benchmarks/step_profile.py paging PKG --fraction 0.25
    .venv/bin/python benchmarks/step_profile.py load PKG [--fused-experts]

decode: loads PKG without a budget, decodes 12 tokens to page the experts a prompt needs, then
times 33 more (temperature 1, so some steps still page in: `expert cache` includes that).
paging: loads PKG with a budget holding `--fraction` of the experts (measured as `compare.py`
does), decodes 4 tokens, then splits the page-ins of 12 more into reading the block, its
crc32 (on a second thread, overlapped with the build), building the session, evicting and
malloc_trim (of the page-ins and at each step's end).
load: times `mobilemoe.load` and its parts, summed over the threads that run them (dense
sessions, with their checksums; with --fused-experts the experts' reads, stacking and QMoE
session builds), so parts that overlap add up to more than the wall time.
Run under `chrt -r 1` on a shared machine (docs/PERFORMANCE.md says why).
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable

import numpy as np

import mobilemoe
import mobilemoe.model as model_module
from mobilemoe import native_experts
from mobilemoe.bench import budget_for_fraction, plan_in_subprocess
from mobilemoe.native_experts import NativeExpert
from mobilemoe.ort_sessions import SessionRunner


def timed(owner: object, name: str, label: str, seconds: dict, calls: collections.Counter) -> None:
    """Replace owner.name by a version that adds its wall time to seconds[label]."""
    original: Callable = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - start
            calls[label] += 1

    setattr(owner, name, wrapper)


def prompt(seed: int = 0, length: int = 64) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 50_000, length)]


def decode(package: str, threads: int, expert_kernel: str = "auto") -> None:
    seconds, calls = collections.defaultdict(float), collections.Counter()
    model = mobilemoe.load(package, threads=threads, context_length=1024, expert_kernel=expert_kernel)
    for runner in model._layers:
        timed(runner, "run", "layer graphs (with binding)", seconds, calls)
        timed(runner.session, "run_with_iobinding", "layer graphs (ONNX Runtime)", seconds, calls)
    timed(model._head, "run", "head graph", seconds, calls)
    timed(model._embed, "run", "embed graph", seconds, calls)
    timed(model_module, "route", "routing", seconds, calls)
    timed(native_experts, "route", "routing (native, waking the kernel's workers)", seconds, calls)
    timed(model_module, "tokens_by_expert", "grouping", seconds, calls)
    timed(model._cache, "get", "expert cache", seconds, calls)
    list(model.generate(prompt(), max_new_tokens=12, temperature=1.0, seed=1))
    timed(SessionRunner, "__call__", "expert sessions", seconds, calls)
    timed(NativeExpert, "__call__", "expert sessions", seconds, calls)
    timed(native_experts, "weighted_sum", "a layer's resident experts (native)", seconds, calls)
    seconds.clear()
    calls.clear()
    start = time.perf_counter()
    tokens = sum(1 for _ in model.generate(prompt(), max_new_tokens=33, temperature=1.0, seed=2))
    wall = time.perf_counter() - start
    print(f"{package}: {wall / tokens * 1e3:.1f} ms per token ({tokens} tokens)")
    for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {label:38s} {s / tokens * 1e3:7.2f} ms/token  {calls[label] / tokens:6.1f} calls"
              f"  {s / calls[label] * 1e6:8.0f} us/call")


def paging(package: str, threads: int, fraction: float, expert_kernel: str = "auto") -> None:
    budget = budget_for_fraction(plan_in_subprocess(package, threads, 1024, expert_kernel), fraction)
    seconds, calls = collections.defaultdict(float), collections.Counter()
    timed(model_module, "create_session_with_weights", "build the session", seconds, calls)
    model = mobilemoe.load(package, threads=threads, context_length=1024, memory_budget=budget,
                           expert_kernel=expert_kernel)
    timed(model._store, "read_unchecked", "read the block", seconds, calls)
    timed(model._store, "check", "crc32 (second thread)", seconds, calls)
    timed(model._cache, "_remove", "evict (free a session)", seconds, calls)
    timed(model_module, "release_freed_memory", "malloc_trim", seconds, calls)
    list(model.generate(prompt(length=32), max_new_tokens=4, temperature=1.0, seed=1))
    seconds.clear()
    calls.clear()
    before = model.stats
    list(model.generate(prompt(length=32), max_new_tokens=12, temperature=1.0, seed=2))
    after = model.stats
    mb = (after.bytes_paged_in - before.bytes_paged_in) / 1e6
    paging_s = after.paging_seconds - before.paging_seconds
    hits, misses = after.hits - before.hits, after.misses - before.misses
    print(f"{package} at {fraction:.0%} of the experts ({budget / 1e9:.2f} GB): hit rate "
          f"{hits / max(1, hits + misses):.0%}, {mb:.0f} MB paged in, "
          f"{paging_s * 1e3 / max(mb, 1e-9):.2f} ms/MB (the cache's clock)")
    for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {label:24s} {s * 1e3 / max(mb, 1e-9):6.2f} ms/MB  ({calls[label]} calls, "
              f"{s / calls[label] * 1e3:.2f} ms each)")


def load(package: str, threads: int, fused_experts: bool) -> None:
    import mobilemoe.fused_experts as fused_module
    from mobilemoe.expert_store import ExpertStore

    seconds, calls = collections.defaultdict(float), collections.Counter()
    timed(model_module.MoEModel, "_dense_session", "dense sessions", seconds, calls)
    timed(ExpertStore, "read", "expert reads (with crc32)", seconds, calls)
    timed(fused_module, "_interleave", "stacking (gate/up interleave)", seconds, calls)
    timed(fused_module, "create_session_with_weights", "QMoE session builds", seconds, calls)
    start = time.perf_counter()
    mobilemoe.load(package, threads=threads, fused_experts=fused_experts).close()
    print(f"{package}: loaded in {time.perf_counter() - start:.2f} s"
          f"{' with fused experts' if fused_experts else ''}")
    for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {label:32s} {s:6.2f} s  ({calls[label]} calls)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("decode", "paging", "load"))
    p.add_argument("package")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.25, help="paging: share of experts cached")
    p.add_argument("--fused-experts", action="store_true", help="load: with fused experts")
    p.add_argument("--expert-kernel", default="auto", help="auto, native or onnxruntime")
    a = p.parse_args(argv)
    if a.what == "decode":
        decode(a.package, a.threads, a.expert_kernel)
    elif a.what == "paging":
        paging(a.package, a.threads, a.fraction, a.expert_kernel)
    else:
        load(a.package, a.threads, a.fused_experts)


if __name__ == "__main__":
    main()
