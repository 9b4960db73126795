"""Benchmark a package: prefill and decode tokens/s, expert paging, time per token, memory.

    from mobilemoe.bench import run_bench
    result = run_bench("olmoe.mmoe", memory_budget="2GB", prompt_tokens=256, new_tokens=64)
    print(result.decode.tokens_per_s, result.decode.split_ms_per_token)

One repeat = reset the KV cache, prefill a fresh random prompt (token ids from a seeded
generator: no tokenizer needed), then decode `new_tokens` tokens greedily. Tokens/s are the
median over the recorded repeats; `warmup` repeats run first and are not recorded (the expert
cache starts empty, so the first repeat pages in far more than a steady state does).

Where the time goes is measured from outside the runtime, by a small instrumentation layer
(`_Probe`) installed on the loaded model and removed afterwards. It times
- `run` of the embed, layer and head sessions              -> "dense"
- `run` of every other session (the experts' sessions)     -> "experts"
- the expert store's `read_unchecked` (read one block)      -> part of "paging"
and takes paging time from the cache's own statistics (evict + read + build the session).
"other" is the rest of the wall time: Python and numpy between the sessions (routing,
combining expert outputs, binding inputs, sampling). The wrappers cost two
`perf_counter` calls per session run, about 0.2 µs against ~13 µs for the run itself.
It reads private attributes of `MoEModel` (`_embed`, `_layers`, `_head`, `_store`, and
`_cache` to preload); a part whose attribute is missing is reported as None, not an error.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mobilemoe import native_experts
from mobilemoe.errors import MobileMoEError
from mobilemoe.expert_cache import EvictionPolicy
from mobilemoe.model import MoEModel, load
from mobilemoe.native_experts import NativeExpert
from mobilemoe.ort_sessions import SessionRunner, default_threads
from mobilemoe.units import parse_bytes

SPLIT_PARTS = ("dense", "experts", "paging", "other")


@dataclass
class PhaseResult:
    """Prefill or decode, over the recorded repeats."""

    tokens: int  # per repeat
    seconds: list[float]  # wall time of each recorded repeat
    tokens_per_s: float  # median over repeats
    # mean milliseconds per token: dense, experts, paging (of which read), other
    split_ms_per_token: dict[str, float | None]
    hits: int
    misses: int
    hit_rate: float
    evictions: int
    bytes_paged_in: int
    mb_paged_per_token: float


@dataclass
class BenchResult:
    package: str
    model: dict[str, Any]  # dimensions and quantization of the package
    threads: int
    memory_budget: int | None
    expert_fraction: float | None  # the budget as a fraction of all experts, if asked so
    expert_cache_capacity: int
    all_experts_bytes: int  # what every expert held at once would take (after prepacking)
    context_length: int
    prompt_tokens: int
    new_tokens: int
    temperature: float
    repeats: int
    warmup: int
    load_seconds: float
    preloaded_experts: int
    preload_seconds: float
    prefill: PhaseResult
    decode: PhaseResult | None  # None when new_tokens is 0
    paging_ms_per_mb: float | None  # evict + read + build sessions, per MB read
    read_ms_per_mb: float | None  # of which reading and checking the bytes
    weight_bytes_per_token: int  # package bytes a decode step reads (dense + top-k experts)
    baseline_rss: int
    peak_rss: int
    max_rss: int
    # 1-minute load average of the machine before and after the run: other processes on the
    # same cores slow a benchmark down (ONNX Runtime's spinning thread pool especially)
    load_average: tuple[float, float] = (0.0, 0.0)
    notes: list[str] = field(default_factory=list)
    policy: str = "DecayedLFUPolicy"  # the expert cache's eviction policy (its class)
    fused_experts: bool = False  # each layer's experts ran as one QMoE kernel
    expert_kernel: str = "onnxruntime"  # what computed the experts (MoEModel.expert_kernel)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


class _Probe:
    """Per-part timers around a loaded model's session runs (see the module docstring).

    `run` is wrapped once on the session class, not on each session: a wrapper stored on a
    session would make a reference cycle (session -> wrapper -> session) and keep every
    evicted expert alive until the garbage collector ran, far over the memory budget. The
    wrapper counts a run as "dense" if it is one of the model's dense sessions, else as
    "experts"; while the probe is installed, every session in the process is timed. Expert
    and fused-layer sessions run through `SessionRunner`, whose call is timed as "experts".
    """

    def __init__(self, model: MoEModel):
        self.model = model
        self.seconds = {"dense": 0.0, "experts": 0.0, "read": 0.0}
        self.available = {"dense": False, "experts": False, "read": False}
        self._undo: list[tuple[object, str, bool, Any]] = []
        layers = [getattr(r, "session", r) for r in getattr(model, "_layers", [])]  # runners
        dense = [getattr(model, "_embed", None), *layers, getattr(model, "_head", None)]
        if all(s is not None and hasattr(s, "run") for s in dense):
            dense_ids = frozenset(id(s) for s in dense)  # alive as long as the model
            session_class = type(dense[0])
            for method in ("run", "run_with_iobinding"):  # layer graphs run with an IO binding
                self._patch(session_class, method, self._timed_session(getattr(session_class, method),
                                                                      dense_ids))
            for runner in (SessionRunner, NativeExpert):
                self._patch(runner, "__call__", self._timed(runner.__call__, "experts"))
            # a decode step's resident layer on the native kernel: one call for its experts
            self._patch(native_experts, "weighted_sum",
                        self._timed(native_experts.weighted_sum, "experts"))
            self.available["dense"] = self.available["experts"] = True
        store = getattr(model, "_store", None)
        # A page-in reads with `read_unchecked` (the crc32 runs on another thread, overlapped
        # with the session build); older runtimes read and checked in `read`.
        reader = "read_unchecked" if hasattr(store, "read_unchecked") else "read"
        if store is not None and callable(getattr(store, reader, None)):
            self._patch(store, reader, self._timed(getattr(store, reader), "read"))
            self.available["read"] = True

    def _timed_session(self, original, dense_ids: frozenset[int]):
        seconds, clock = self.seconds, time.perf_counter

        def run(session, *args, **kwargs):
            start = clock()
            try:
                return original(session, *args, **kwargs)
            finally:
                seconds["dense" if id(session) in dense_ids else "experts"] += clock() - start
        return run

    def _patch(self, obj: object, name: str, value: Any) -> None:
        self._undo.append((obj, name, name in vars(obj), getattr(obj, name)))
        setattr(obj, name, value)

    def _timed(self, fn, part: str):
        seconds, clock = self.seconds, time.perf_counter

        def timed(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[part] += clock() - start
        return timed

    def snapshot(self) -> dict[str, float]:
        s = self.model.stats
        return {**self.seconds, "paging": s.paging_seconds, "hits": s.hits, "misses": s.misses,
                "evictions": s.evictions, "paged": s.bytes_paged_in}

    def close(self) -> None:
        for obj, name, own, original in reversed(self._undo):
            if own:
                setattr(obj, name, original)
            else:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
        self._undo.clear()


def _delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def _phase(runs: list[tuple[int, dict, float]], probe: _Probe) -> PhaseResult:
    """runs: (tokens, counter deltas, wall seconds) of each recorded repeat."""
    total = {k: sum(r[1][k] for r in runs) for k in runs[0][1]}
    count = sum(r[0] for r in runs)
    ms = 1000.0 / max(count, 1)
    split: dict[str, float | None] = {
        "dense": total["dense"] * ms if probe.available["dense"] else None,
        "experts": total["experts"] * ms if probe.available["experts"] else None,
        "paging": total["paging"] * ms,
        "paging_read": total["read"] * ms if probe.available["read"] else None,
    }
    wall_ms = sum(r[2] for r in runs) * ms
    timed = [split[k] for k in ("dense", "experts", "paging")]
    split["other"] = wall_ms - sum(timed) if None not in timed else None
    split["total"] = wall_ms
    lookups = total["hits"] + total["misses"]
    return PhaseResult(
        tokens=max(r[0] for r in runs), seconds=[r[2] for r in runs],
        tokens_per_s=statistics.median(r[0] / r[2] for r in runs),
        split_ms_per_token=split, hits=int(total["hits"]), misses=int(total["misses"]),
        hit_rate=total["hits"] / lookups if lookups else 1.0, evictions=int(total["evictions"]),
        bytes_paged_in=int(total["paged"]), mb_paged_per_token=total["paged"] / 1e6 / max(count, 1))


def weight_bytes_per_token(model: MoEModel) -> int:
    """Package bytes one decode step reads: every layer graph and the head, top-k experts
    per layer, one embedding row. The numerator of the decode roofline."""
    m = model.manifest
    d = m.dims
    experts = {}
    for e in m.experts:
        experts.setdefault(e.layer, []).append(e.length)
    routed = sum(sum(sorted(lengths)[-d.top_k:]) for lengths in experts.values())
    row = m.embed_graph.size // max(d.vocab_size, 1)
    return sum(g.size for g in m.layer_graphs) + m.head_graph.size + routed + row


def plan_in_subprocess(path: str | Path, threads: int, context_length: int,
                       expert_kernel: str = "auto") -> dict[str, int]:
    """The memory plan of a package, measured by loading it in a fresh process (so that this
    process's baseline is not raised by a load it only did to plan)."""
    code = (
        "import json, sys, mobilemoe\n"
        "from mobilemoe.fused_experts import LAYERS_BUILT_AT_ONCE\n"
        "m = mobilemoe.load(sys.argv[1], threads=int(sys.argv[2]), context_length=int(sys.argv[3]),\n"
        "                   expert_kernel=sys.argv[4])\n"
        "p = m.plan\n"
        "print(json.dumps({'fixed': p.fixed_bytes, 'session': p.expert_session_bytes,\n"
        "                  'minimum': p.minimum_budget, 'experts': len(m.manifest.experts),\n"
        "                  'fused': m.fused_experts_bytes(LAYERS_BUILT_AT_ONCE)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path), str(threads), str(context_length),
                           expert_kernel],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise MobileMoEError(f"planning the budget failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def budget_for_fraction(plan: dict[str, int], fraction: float, fused: bool = False) -> int:
    """A budget whose expert cache holds `fraction` of all experts (at least the minimum);
    `fused`: the budget that holds them fused (fraction 1 only)."""
    if not 0 < fraction <= 1:
        raise MobileMoEError(f"expert fraction must be in (0, 1], got {fraction}")
    if fused and fraction != 1:
        raise MobileMoEError("fused experts need every expert resident: expert fraction 1")
    # Fused, the load itself checks that every expert fits, by its own measurement of an
    # expert's size: 2% on top, as another process can measure a little more.
    experts = plan["fused"] * 1.02 if fused else fraction * plan["experts"] * plan["session"]
    # 2% of the fixed part on top: it is measured from RSS, and a load in another process
    # can measure a little more (fraction 1.0 must still hold every expert).
    wanted = math.ceil(plan["fixed"] * 1.02 + experts)
    return max(wanted, plan["minimum"])


def _preload(model: MoEModel) -> int:
    """Page experts in, layer by layer, while they fit in the cache (fully resident runs)."""
    cache, held = model._cache, model.plan.expert_session_bytes
    count = 0
    for e in model.manifest.experts:
        if cache.stats.resident_bytes + held > cache.capacity_bytes:
            break
        cache.get((e.layer, e.expert))
        count += 1
    return count


def run_bench(path: str | Path, memory_budget: int | str | None = None, prompt_tokens: int = 128,
              new_tokens: int = 32, repeats: int = 3, threads: int | None = None,
              warmup: int = 1, expert_fraction: float | None = None,
              context_length: int | None = None, preload: bool | None = None,
              seed: int = 0, temperature: float = 0.0,
              policy: EvictionPolicy | None = None, fused_experts: bool = False,
              expert_kernel: str = "auto") -> BenchResult:
    """Benchmark the package at `path` (see the module docstring).

    memory_budget: as for `mobilemoe.load`; or expert_fraction: the budget whose expert cache
    holds that fraction of all experts (1.0 = everything resident), planned by a load in a
    fresh process, with the cache then capped at exactly that fraction. preload: page experts in
    before timing (default: when all of them fit). context_length: default just enough.
    temperature: 0 decodes greedily. A model with random weights decoded greedily soon
    repeats itself, and so do its routes, which flatters the expert cache; temperature 1
    samples nearly uniform tokens from such a model, so routes keep changing.
    policy: the expert cache's eviction policy, as for `mobilemoe.load` (default decayed LFU).
    fused_experts: as for `mobilemoe.load` (every expert resident, one QMoE kernel per layer).
    expert_kernel: as for `mobilemoe.load` ("auto", "native" or "onnxruntime").
    """
    if prompt_tokens < 1 or new_tokens < 0 or repeats < 1 or warmup < 0:
        raise MobileMoEError("need prompt_tokens >= 1, new_tokens >= 0, repeats >= 1, warmup >= 0")
    if memory_budget is not None and expert_fraction is not None:
        raise MobileMoEError("give a memory budget or an expert fraction, not both")
    threads = threads or default_threads()
    context_length = context_length or prompt_tokens + new_tokens + 1
    notes = []
    if expert_fraction is not None:
        memory_budget = budget_for_fraction(
            plan_in_subprocess(path, threads, context_length, expert_kernel), expert_fraction,
            fused_experts)
    budget = None if memory_budget is None else parse_bytes(memory_budget)

    load_before = _load_average()
    start = time.perf_counter()
    model = load(path, memory_budget=budget, threads=threads, context_length=context_length,
                 policy=policy, fused_experts=fused_experts, expert_kernel=expert_kernel)
    load_seconds = time.perf_counter() - start
    probe = _Probe(model)
    try:
        all_experts = len(model.manifest.experts) * model.plan.expert_session_bytes
        if expert_fraction is not None:
            # The budget came from another process's measurement of the resident part, which
            # can differ from this one's; the cache holds exactly the fraction asked for.
            model._cache.capacity_bytes = min(model._cache.capacity_bytes,
                                              math.ceil(expert_fraction * all_experts))
        capacity = model._cache.capacity_bytes
        if preload is None:  # fused experts were all loaded with the model
            preload = capacity >= all_experts and not model.fused_experts
        start = time.perf_counter()
        preloaded = _preload(model) if preload else 0
        preload_seconds = time.perf_counter() - start
        rng = np.random.default_rng(seed)
        prefill, decode = [], []
        for repeat in range(warmup + repeats):
            ids = rng.integers(0, model.dims.vocab_size, prompt_tokens).tolist()
            p, d = _one_repeat(model, probe, ids, new_tokens, temperature, seed + repeat)
            if repeat >= warmup:
                prefill.append(p)
                decode.append(d)
        if any(d[0] < new_tokens for d in decode):
            notes.append("generation stopped early (end-of-sequence token) in some repeats")
        if preloaded == len(model.manifest.experts) and model.can_fuse_experts():
            notes.append("every expert was resident: --fused-experts runs each layer's experts "
                         "as one kernel (faster; lossy in float32 rounding)")
        pre = _phase(prefill, probe)
        dec = _phase(decode, probe) if new_tokens else None
        totals = probe.snapshot()
        stats = model.stats
        mb = stats.bytes_paged_in / 1e6
        d, q = model.dims, model.manifest.quantization
        return BenchResult(
            package=str(path), threads=threads,
            model={"layers": d.num_layers, "hidden": d.hidden_size,
                   "intermediate": d.intermediate_size, "experts": d.num_experts,
                   "top_k": d.top_k, "heads": d.num_heads, "kv_heads": d.num_kv_heads,
                   "head_dim": d.head_dim, "vocab": d.vocab_size, "expert_bits": q.expert_bits,
                   "dense_bits": q.dense_bits, "block_size": q.block_size,
                   "accuracy_level": q.accuracy_level,
                   "expert_store_bytes": model.manifest.expert_bytes(),
                   "dense_bytes": model.manifest.dense_bytes(),
                   "expert_session_bytes": model.plan.expert_session_bytes,
                   "dense_resident_bytes": model.plan.dense_bytes,
                   "dense_huge_page_bytes": stats.dense_huge_page_bytes},
            memory_budget=budget, expert_fraction=expert_fraction,
            expert_cache_capacity=capacity, all_experts_bytes=all_experts,
            context_length=context_length, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
            temperature=temperature,
            repeats=repeats, warmup=warmup, load_seconds=load_seconds,
            preloaded_experts=preloaded, preload_seconds=preload_seconds,
            prefill=pre, decode=dec,
            paging_ms_per_mb=stats.paging_seconds * 1000 / mb if mb else None,
            read_ms_per_mb=(totals["read"] * 1000 / mb if mb and probe.available["read"]
                            else None),
            weight_bytes_per_token=weight_bytes_per_token(model),
            baseline_rss=stats.baseline_rss, peak_rss=stats.peak_rss, max_rss=stats.max_rss,
            load_average=(load_before, _load_average()), notes=notes,
            policy=type(model._cache.policy).__name__, fused_experts=model.fused_experts,
            expert_kernel=model.expert_kernel)
    finally:
        probe.close()
        model.close()


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on every platform
        return 0.0


def _one_repeat(model: MoEModel, probe: _Probe, ids: list[int], new_tokens: int,
                temperature: float, seed: int):
    """(prefill: tokens, counters, seconds), (decode: tokens, counters, seconds)."""
    model.reset()
    s0 = probe.snapshot()
    t0 = time.perf_counter()
    # new_tokens + 1: the first token comes from the prefill; each later one is a decode step.
    tokens = model.generate(ids, max_new_tokens=new_tokens + 1, temperature=temperature,
                            top_k=0, top_p=1.0, seed=seed)
    decoded = 0
    try:
        next(tokens)
        t1 = time.perf_counter()
        s1 = probe.snapshot()
        for _ in range(new_tokens):
            try:
                next(tokens)
            except StopIteration:  # an end-of-sequence token (real models only)
                break
            decoded += 1
    finally:
        tokens.close()
    t2 = time.perf_counter()
    s2 = probe.snapshot()
    return (len(ids), _delta(s0, s1), t1 - t0), (decoded, _delta(s1, s2), max(t2 - t1, 1e-9))
