"""A loaded mobilemoe package: forward pass, generation and statistics.

One forward step over T tokens (prefill: the whole prompt, in chunks; decode: one token):

    embed ─> for each layer: dense graph (attention + KV cache + router logits)
                             ─> route ─> experts from the cache (tokens grouped by expert;
                                         mobilemoe's int4 kernel or ONNX Runtime sessions),
                                         or all of a layer's experts in one QMoE kernel
                                         (`fused_experts`, everything resident)
                             ─> residual + weighted expert outputs
          ─> head graph ─> logits
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mobilemoe import native_experts
from mobilemoe.cache_policies import DEFAULT_POLICY, policy_by_name
from mobilemoe.errors import MobileMoEError, PackageError
from mobilemoe.expert_cache import EvictionPolicy, ExpertCache, Loaded
from mobilemoe.expert_store import ExpertStore
from mobilemoe.fused_experts import (
    LAYERS_BUILT_AT_ONCE,
    FusedLayerExperts,
    fusable,
    stacked_bytes,
)
from mobilemoe.layers import KVCache, LayerRunner
from mobilemoe.manifest import FileRef, LayerInfo, Manifest, resolve_inside
from mobilemoe.memory import (
    anonymous_mappings,
    collapse_into_huge_pages,
    limit_heap_retention,
    max_rss,
    release_freed_memory,
    rss,
)
from mobilemoe.memory_plan import (
    MemoryPlan,
    activation_bytes,
    expert_buffer_bytes,
    kv_cache_bytes,
    page_in_threads,
    staging_bytes,
)
from mobilemoe.native_experts import NativeExpert
from mobilemoe.ort_sessions import (
    SessionRunner,
    create_session,
    create_session_with_weights,
    default_threads,
    use_threads,
    warm_up,
)
from mobilemoe.routing import route, tokens_by_expert
from mobilemoe.sampling import sample
from mobilemoe.text import StreamDecoder, TextCodec
from mobilemoe.units import format_bytes, parse_bytes

DEFAULT_CONTEXT = 4096
PREFILL_CHUNK = 256
CALIBRATION_BYTES = 8 << 20  # build enough expert sessions to measure at least this much


@dataclass(frozen=True)
class Generated:
    """One generated token and the text it completes (may be empty mid-character)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class Stats:
    hits: int
    misses: int
    evictions: int
    hit_rate: float
    bytes_paged_in: int
    paging_seconds: float
    expert_cache_bytes: int  # what the cached expert sessions hold now
    expert_cache_capacity: int
    dense_bytes: int
    dense_huge_page_bytes: int  # of the dense weights, in transparent huge pages since load
    kv_cache_bytes: int
    memory_budget: int | None
    baseline_rss: int  # the process before the model was loaded (interpreter, numpy, ORT)
    peak_rss: int  # highest RSS sampled since load (after every page-in and forward)
    max_rss: int  # the OS's lifetime peak for this process

    def as_dict(self) -> dict:
        return asdict(self)


# Sizes measured from RSS, per graph checksum, kept for the life of the process: a later load
# of the same package then plans with the same numbers (the first measurement is the
# largest, as it also pays for ONNX Runtime's lazy initialisation).
_MEASURED: dict[str, int] = {}


def _remember(key: str, measured: int) -> int:
    return _MEASURED.setdefault(key, measured)


class MoEModel:
    def __init__(self, package: Path, memory_budget: int | str | None = None,
                 threads: int | None = None, context_length: int | None = None,
                 policy: EvictionPolicy | None = None, fused_experts: bool = False,
                 expert_kernel: str = "auto"):
        self.package = Path(package)
        self.manifest = m = Manifest.load(self.package)
        self.dims = d = m.dims
        self.memory_budget = None if memory_budget is None else parse_bytes(memory_budget)
        self.context_length = context_length or min(d.max_position_embeddings, DEFAULT_CONTEXT)
        if self.context_length <= 0:
            raise MobileMoEError(f"context length must be positive, got {self.context_length}")
        threads = threads or default_threads()
        self._native_templates = self._native_kernel_templates(expert_kernel, fused_experts)
        use_threads(threads, spin_after_runs=not self._native_templates)
        if self._native_templates:
            native_experts.use_threads(threads)
        # With the native kernel, routing it supports runs in C too (for every step, so a
        # token's route does not depend on its step's length or on the budget).
        self._native_routing = (bool(self._native_templates)
                                and native_experts.routes(m.routing, d.num_experts))
        warm_up()
        # numpy maps in code and tables the first time the routing code runs (~2 MB): that
        # belongs to the process baseline, not to this model.
        tokens_by_expert(*route(np.zeros((2, d.num_experts), np.float32), m.routing))
        limit_heap_retention()

        release_freed_memory()
        self._baseline_rss = rss()
        self._peak_rss = self._baseline_rss
        kv_bytes = kv_cache_bytes(d, self.context_length)
        buffers = activation_bytes(d, PREFILL_CHUNK, self.context_length)
        largest_block = max(t.block_bytes for t in m.templates.values())

        self._kv = KVCache(d, self.context_length)
        self._layer_info = m.layers or [LayerInfo() for _ in range(d.num_layers)]
        self._tokens: list[int] = []  # what the KV cache holds, for prompt-prefix reuse
        self._unplanned_bytes = 0  # taken off the expert cache (_hold_back_unplanned_memory)
        self._expert_buffer_bytes = 0  # the running step's layer's (see _fits_budget)
        # Off (None) unless asked for: one {layer: experts [T, k]} per forward chunk.
        self.routing_trace: list[dict[int, np.ndarray]] | None = None
        inv_freq = np.asarray(m.rope.inv_freq, dtype=np.float32)
        angles = np.arange(self.context_length, dtype=np.float32)[:, None] * inv_freq  # [C, D/2]
        self._cos = np.cos(angles) * np.float32(m.rope.attention_scaling)
        self._sin = np.sin(angles) * np.float32(m.rope.attention_scaling)
        self.codec = None
        if m.tokenizer_file:
            self.codec = TextCodec(resolve_inside(self.package, m.tokenizer_file),
                                   m.chat_template, m.bos_token_id, m.eos_token_ids)
        # The budget is checked against measured sizes (the only honest minimum), right
        # after the dense sessions and one expert template are built, before anything runs.
        # Two at a time, on as many threads as compute may use: checksumming a graph and
        # building its session (prepacking its weights) are largely single-threaded, and both
        # release the GIL (OLMoE shape: 5.9 s for the 18 graphs one after the other).
        before_dense = anonymous_mappings()
        with ThreadPoolExecutor(min(2, threads), thread_name_prefix="mobilemoe-load") as pool:
            self._embed, *layer_sessions, self._head = pool.map(
                self._dense_session, [m.embed_graph, *m.layer_graphs, m.head_graph])
        self._check_layer_graphs(layer_sessions)
        self._warm_up_dense(layer_sessions)
        self._layers = [LayerRunner(s, self._kv.keys[i], self._kv.values[i], self._cos, self._sin)
                        for i, s in enumerate(layer_sessions)]
        release_freed_memory()
        # the dense weights as ONNX Runtime holds them (memory.collapse_into_huge_pages)
        self._dense_huge_page_bytes = collapse_into_huge_pages(before_dense, min(2, threads))
        dense_key = "dense:" + "".join(g.sha256 or "" for g in
                                       [m.embed_graph, *m.layer_graphs, m.head_graph])
        dense_bytes = _remember(dense_key, max(rss() - self._baseline_rss, m.dense_bytes()))

        self._store = ExpertStore(self.package, m)
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="mobilemoe-crc32")
        try:
            self._templates = {tid: self._read_graph(t.graph) for tid, t in m.templates.items()}
            self._held = {tid: self._calibrate(tid) for tid in m.templates}
        except BaseException:
            self._checker.shutdown()
            self._store.close()
            raise
        self.plan = MemoryPlan(dense_bytes, kv_bytes, buffers, staging_bytes(largest_block),
                               max(self._held.values()), d.top_k, self.context_length)
        capacity = self.plan.expert_capacity(self.memory_budget)
        self._cache = ExpertCache(self._load_expert, self._held_bytes, capacity,
                                  policy or policy_by_name(DEFAULT_POLICY), self._fits_budget)
        # Misses are paged in this many at a time, concurrently; never more than the cache holds.
        self._page_in_batch = max(1, min(page_in_threads(largest_block),
                                         capacity // max(self._held.values())))
        self._pager = (ThreadPoolExecutor(self._page_in_batch, thread_name_prefix="mobilemoe-page-in")
                       if self._page_in_batch > 1 else None)
        self._fused: dict[int, FusedLayerExperts] = {}
        if fused_experts:
            try:
                self._fused = self._fuse_experts(capacity)
            except BaseException:
                self.close()
                raise

        self._sample_rss()

    @property
    def fused_experts(self) -> bool:
        return bool(self._fused)

    @property
    def expert_kernel(self) -> str:
        """What computes the experts: "native" (mobilemoe's int4 kernel), "onnxruntime"
        (a session per expert) or "qmoe" (`fused_experts`)."""
        if self._fused:
            return "qmoe"
        return "native" if self._native_templates else "onnxruntime"

    def _native_kernel_templates(self, kernel: str, fused_experts: bool) -> set[str]:
        """The expert templates mobilemoe's own kernel computes (mobilemoe.native_experts):
        every one or none. "auto": every one when it can run here and supports them all (not
        with fused experts, which run on QMoE); "native": every one, or a clear error."""
        if kernel not in native_experts.KERNELS:
            raise MobileMoEError(f"expert kernel must be one of {', '.join(native_experts.KERNELS)}, "
                                 f"got {kernel!r}")
        if kernel == "onnxruntime" or (kernel == "auto" and fused_experts):
            return set()
        m = self.manifest
        reason = native_experts.unavailable_reason()
        if reason is None and not all(native_experts.supports(t, m.dims, m.quantization)
                                      for t in m.templates.values()):
            q = m.quantization
            reason = (f"it computes int4 SiLU experts at block 64 and accuracy level 4; this "
                      f"{m.model_type} package has {q.expert_bits}-bit experts at block "
                      f"{q.block_size}, accuracy level {q.accuracy_level}")
        if reason and kernel == "auto":
            return set()
        if reason:
            raise MobileMoEError(f"the native expert kernel cannot run this package: {reason}; "
                                 "use --expert-kernel onnxruntime")
        return set(m.templates)

    # -- loading ----------------------------------------------------------------------------

    def _read_graph(self, ref: FileRef) -> bytes:
        data = resolve_inside(self.package, ref.path).read_bytes()
        self._check_digest(ref, hashlib.sha256(data))
        return data

    def _dense_session(self, ref: FileRef) -> ort.InferenceSession:
        """A session made from the graph's path, not its bytes: onnxruntime's Python binding
        keeps the bytes a session was made from for the session's life, which doubled the
        dense part's memory (2.1x the file size held, against 1.1x from a path)."""
        path = resolve_inside(self.package, ref.path)
        with open(path, "rb") as f:
            self._check_digest(ref, hashlib.file_digest(f, "sha256"))
        return create_session(str(path))

    def _check_digest(self, ref: FileRef, digest) -> None:
        if ref.sha256 is not None and digest.hexdigest() != ref.sha256:
            raise PackageError(f"{self.package}: {ref.path} does not match its checksum "
                               "(corrupt or modified; re-export the package)")

    def _check_layer_graphs(self, sessions: list[ort.InferenceSession]) -> None:
        """A layer graph must take and give what the forward pass binds (a graph from another
        exporter version would otherwise fail at the first token)."""
        for layer, session in enumerate(sessions):
            names = {o.name for o in session.get_outputs()} | {i.name for i in session.get_inputs()}
            need = {"hidden", "cos_cache", "sin_cache", "seqlens_k", "total_sequence_length", "residual",
                    *LayerRunner.CACHE, *LayerRunner.CACHE.values()}
            if self._layer_info[layer].moe:
                need |= {"moe_input", "router_logits"}
            if need - names:
                raise PackageError(
                    f"{self.package}: layer {layer}'s graph lacks inputs or outputs "
                    f"{sorted(need - names)}; re-export the package with this version")

    def _warm_up_dense(self, layer_sessions: list[ort.InferenceSession]) -> None:
        """One token through every dense graph (no experts): a session's first run allocates
        what later runs reuse, and that belongs to the measured dense part.

        The layers run on a one-position scratch cache, not the real one: ONNX Runtime's
        attention writes the whole bound cache when a sequence starts at position 0 (0.97 of
        its pages), which would count the KV cache in the dense part as well as in its own
        share of the plan."""
        scratch = KVCache(self.dims, 1)
        hidden = self._embed.run(None, {"input_ids": np.zeros(1, np.int64)})[0]
        for layer, session in enumerate(layer_sessions):
            runner = LayerRunner(session, scratch.keys[layer], scratch.values[layer],
                                 self._cos[:1], self._sin[:1])
            hidden = runner.run(hidden, 0)["residual"]
        self._head.run(None, {"hidden": hidden})

    def _expert_session(self, layer: int, expert: int) -> SessionRunner | NativeExpert:
        """Read, check and build one expert. The native kernel computes from the block as
        read. For an ONNX Runtime session, the crc32 runs on another thread while the session
        is built (both release the GIL): a page-in costs the longer of the two, not their
        sum. A block that fails its check is dropped before anything runs."""
        block = self._store.read_unchecked(layer, expert)
        arrays = self._store.views(layer, expert, block)
        if self._template_of(layer, expert) in self._native_templates:
            self._store.check(layer, expert, block)
            return NativeExpert(arrays)
        check = self._checker.submit(self._store.check, layer, expert, block)
        try:
            session = create_session_with_weights(self._templates[self._template_of(layer, expert)],
                                                  list(arrays), list(arrays.values()))
        finally:
            check.result()  # raises PackageError on a corrupt block
        return SessionRunner(session)

    def _fuse_experts(self, capacity: int) -> dict[int, FusedLayerExperts]:
        """Every MoE layer's experts as one QMoE session each (mobilemoe.fused_experts)."""
        m, d, q = self.manifest, self.dims, self.manifest.quantization
        layers = m.moe_layers
        if not self.can_fuse_experts():
            raise MobileMoEError(f"fused experts need unbiased SiLU experts whose widths are "
                                 f"multiples of the block size; {m.model_type} at block "
                                 f"{q.block_size} has not: drop --fused-experts")
        needed = self.fused_experts_bytes()
        if needed > capacity:
            raise MobileMoEError(
                f"fused experts need every expert resident: {format_bytes(needed)} of experts, "
                f"but the budget leaves {format_bytes(capacity)}; raise --memory-budget or "
                "drop --fused-experts")
        at_once = LAYERS_BUILT_AT_ONCE if self.fused_experts_bytes(LAYERS_BUILT_AT_ONCE) <= capacity else 1

        def build(layer: int) -> FusedLayerExperts:
            return FusedLayerExperts(
                self._store, layer, d.num_experts, d.top_k, d.hidden_size, d.intermediate_size,
                q.expert_bits, q.block_size, q.accuracy_level)

        fused = {}
        with ThreadPoolExecutor(at_once, thread_name_prefix="mobilemoe-fuse") as pool:
            for layer, experts in zip(layers, pool.map(build, layers), strict=True):
                fused[layer] = experts
                release_freed_memory()  # the stacked weights, now repacked by ONNX Runtime
                self._sample_rss()
        return fused

    def can_fuse_experts(self) -> bool:
        """Whether this package's experts can run fused (`fused_experts`), budget aside."""
        d, q = self.dims, self.manifest.quantization
        return (all(fusable(t) for t in self.manifest.templates.values())
                and not d.hidden_size % q.block_size and not d.intermediate_size % q.block_size)

    def fused_experts_bytes(self, layers_built_at_once: int = 1) -> int:
        """Memory for the experts when fused (`fused_experts`), on top of the fixed part.

        Per layer: the experts as their sessions would hold them (the same prepacked kernel
        layout) plus the float32 scales QMoE keeps; while layers are built, their stacked
        weights on top."""
        d, q = self.dims, self.manifest.quantization
        moe_layers = len(self.manifest.moe_layers)
        weights, scales = stacked_bytes(d.hidden_size, d.intermediate_size, d.num_experts,
                                        q.expert_bits, q.block_size)
        return (moe_layers * (d.num_experts * max(self._held.values()) + scales)
                + min(layers_built_at_once, moe_layers) * weights)

    def _template_of(self, layer: int, expert: int) -> str:
        return self._store.entry(layer, expert).template

    def _calibrate(self, template: str) -> int:
        """Bytes one expert of `template` holds, measured: ONNX Runtime prepacks the weights
        into its own layout, which for int4 is larger than the bytes on disk; the native
        kernel holds the block as read."""
        kernel = "native" if template in self._native_templates else "onnxruntime"
        key = f"template:{kernel}:{self.manifest.templates[template].graph.sha256}"
        if key in _MEASURED:
            return _MEASURED[key]
        block = self.manifest.templates[template].block_bytes
        keys = [(e.layer, e.expert) for e in self.manifest.experts if e.template == template]
        keys = keys[: max(1, min(16, CALIBRATION_BYTES // block))]
        release_freed_memory()
        before = rss()
        sessions = [self._expert_session(*key) for key in keys]
        release_freed_memory()
        measured = (rss() - before) // len(sessions)
        del sessions
        release_freed_memory()
        return _remember(key, max(measured, block))

    def _held_bytes(self, key: tuple[int, int]) -> int:
        return self._held[self._template_of(*key)]

    def _load_expert(self, key: tuple[int, int]) -> Loaded:
        session = self._expert_session(*key)
        self._sample_rss()
        return Loaded(session, self._held_bytes(key), self._store.entry(*key).length)

    def _fits_budget(self, coming: int) -> bool:
        """Whether page-ins holding `coming` bytes fit the budget by RSS now, with their
        staging and the running layer's expert buffers still to come; the expert cache evicts
        more until they do. The plan's count alone let long prefills cross the budget (see
        _hold_back_unplanned_memory); with both, VmHWM stayed 9-40 MB under on the OLMoE
        shape. Only an RSS that would cross the budget is trimmed (malloc_trim: 1-2 ms with
        a large heap)."""
        if self.memory_budget is None:
            return True
        room = self.memory_budget - coming - self.plan.staging_bytes - self._expert_buffer_bytes

        def fits() -> bool:
            return rss() - self._baseline_rss <= room

        if fits():
            return True
        release_freed_memory()
        return fits()

    def _hold_back_unplanned_memory(self) -> None:
        """Take what RSS holds beyond the plan off the expert cache, measured at a step's end
        (trimmed; the step's buffers freed). On the OLMoE shape at 10% of the experts: 8 MB
        after 16-token prompts, 42 MB after 256-token ones, so mostly memory that outlives
        the longest step (workspaces sized by it; not malloc's arenas: MALLOC_ARENA_MAX=1 or 2
        held back the same). Uncounted, a 256-token prefill's buffers took the process 11-18
        MB over the budget. Where the next long step reuses it, this is conservative.
        Given back as it shrinks; never below one layer's top-k experts. Adjusts the
        capacity by the change, so a cap set from outside (`mobilemoe bench
        --expert-fraction`) stays."""
        cache, plan = self._cache, self.plan
        resident = plan.dense_bytes + plan.kv_bytes + cache.stats.resident_bytes
        unplanned = max(0, rss() - self._baseline_rss - resident)
        floor = plan.top_k * plan.expert_session_bytes
        change = min(unplanned - self._unplanned_bytes, max(0, cache.capacity_bytes - floor))
        cache.capacity_bytes -= change
        self._unplanned_bytes += change

    def _sample_rss(self) -> None:
        self._peak_rss = max(self._peak_rss, rss())

    # -- forward ----------------------------------------------------------------------------

    def _moe(self, layer: int, x: np.ndarray, router_logits: np.ndarray,
             selection: np.ndarray | None) -> np.ndarray:
        """x [T, H] -> sum over each token's chosen experts of weight * expert(x)."""
        if self._native_routing and selection is None:  # [T, k] each; wakes the workers
            experts, weights = native_experts.route(router_logits, self.manifest.routing)
        else:
            if self._native_templates:
                native_experts.wake()  # while we route
            experts, weights = route(router_logits, self.manifest.routing, selection)
        if self.routing_trace is not None:
            self.routing_trace[-1][layer] = experts
        if self._fused:
            return self._fused[layer](x, experts, weights)
        one = len(x) == 1  # one token: every expert takes all of x, no gather or scatter
        if one and self._native_templates:  # a decode step: all resident, usually
            chosen = sorted(zip(experts[0].tolist(), weights[0].tolist(), strict=True))  # expert order
            runners = self._cache.get_cached([(layer, e) for e, _ in chosen])
            if runners is not None:  # = the sum below, bit for bit; parks the workers
                return native_experts.weighted_sum(runners, np.array([w for _, w in chosen],
                                                                     np.float32), x)
        groups = tokens_by_expert(experts, weights)
        misses = [e for e in groups if (layer, e) not in self._cache]  # in expert order
        for expert in misses:  # start reading every miss now: the kernel reads ahead of us
            self._store.prefetch(layer, expert)
        outputs = {}

        def run(expert: int, session: SessionRunner | NativeExpert) -> None:
            rows = groups[expert][0]
            outputs[expert] = session({"x": x if one else x[rows]})[0]  # [n, H]

        # The cached experts first (a miss may evict one this layer still needs), then the
        # misses, paged in a few at a time concurrently; the outputs are added up in expert
        # order: the sum must not depend on the cache.
        for expert in groups:
            if expert not in misses:
                run(expert, self._cache.get((layer, expert)))
        for start in range(0, len(misses), self._page_in_batch):
            batch = misses[start:start + self._page_in_batch]
            self._park_native_workers()  # a page-in reads and checks: leave the cores to it
            sessions = self._cache.get_all([(layer, e) for e in batch], self._pager)
            for expert, session in zip(batch, sessions, strict=True):
                run(expert, session)
        self._park_native_workers()  # the dense graph's threads come next
        out = np.zeros_like(x)
        for expert, (rows, weight) in groups.items():
            if one:
                out += weight * outputs[expert]
            else:
                out[rows] += weight[:, None] * outputs[expert]
        return out

    def _park_native_workers(self) -> None:
        """The native kernel's workers spin between experts; they sleep when no expert is
        about to run (mobilemoe.native_experts.park)."""
        if self._native_templates:
            native_experts.park()

    def _forward(self, ids: list[int], want: str) -> np.ndarray:
        """Run `ids` after what the KV cache holds; logits of the last token ("last") or all."""
        start, count = self._kv.length, len(ids)
        if start + count > self._kv.capacity:
            raise MobileMoEError(f"context length {self.context_length} exceeded "
                                 f"({start + count} tokens); load with a larger context_length")
        misses = self._cache.stats.misses
        outputs = []
        for begin in range(0, count, PREFILL_CHUNK):
            chunk = ids[begin:begin + PREFILL_CHUNK]
            hidden = self._forward_chunk(np.asarray(chunk, dtype=np.int64))
            if want == "all" or begin + PREFILL_CHUNK >= count:
                outputs.append(hidden if want == "all" else hidden[-1:])
        self._tokens.extend(ids)
        logits = self._head.run(None, {"hidden": np.concatenate(outputs)})[0]
        self._cache.settle()  # the step's hits, told to the cache's policy from warm caches
        # This step's buffers and evicted experts go back to the OS before the next step
        # allocates. A one-token step without page-ins freed nothing worth it: its buffers
        # are small (or mmapped: memory.limit_heap_retention), and malloc_trim walks the
        # whole heap (~70 us a token from cold caches).
        if count > 1 or self._cache.stats.misses != misses:
            release_freed_memory()
        if self.memory_budget is not None and not self._fused:  # fused: no cache to adjust
            self._hold_back_unplanned_memory()
        self._sample_rss()
        return logits

    def _forward_chunk(self, ids: np.ndarray) -> np.ndarray:
        start = self._kv.length
        end = start + len(ids)
        self._expert_buffer_bytes = expert_buffer_bytes(self.dims, len(ids))
        hidden = self._embed.run(None, {"input_ids": ids})[0]
        if self.routing_trace is not None:
            self.routing_trace.append({})
        scale = np.float32(self.manifest.moe_output_scale)
        for layer, runner in enumerate(self._layers):
            out = runner.run(hidden, start)
            hidden = out["residual"]
            if self._layer_info[layer].moe:
                routed = self._moe(layer, out["moe_input"], out["router_logits"],
                                   out.get("router_selection"))
                hidden = hidden + (routed if scale == 1 else scale * routed)
        self._kv.length = end
        return hidden

    # -- public API -------------------------------------------------------------------------

    @contextmanager
    def trace_routing(self) -> Iterator[list[dict[int, np.ndarray]]]:
        """Record routing while inside: a list with one {layer: experts [T, k]} per forward
        chunk (a prefill chunk of T tokens, or one decoded token), in order.

            with model.trace_routing() as trace:
                model.logits(ids)
        """
        previous, self.routing_trace = self.routing_trace, []
        try:
            yield self.routing_trace
        finally:
            self.routing_trace = previous

    def reset(self) -> None:
        """Forget the conversation (the KV cache); experts stay cached."""
        self._kv.length = 0
        self._tokens = []

    def logits(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """A fresh forward pass over `token_ids`: logits [T, vocab]. Resets the KV cache."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise MobileMoEError("logits() needs at least one token")
        self._check_ids(ids)
        self.reset()
        return self._forward(ids, "all")

    def encode(self, text: str) -> list[int]:
        return self._require_codec().encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        codec = self._require_codec()
        return codec.encode(codec.render_chat(messages), add_special_tokens=False)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 256,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 stop: list[str] | tuple[str, ...] = ()) -> Iterator[Generated]:
        """Yield tokens as they are produced (greedy at temperature 0).

        Sampling settings left as None take the package's defaults (its
        generation_config.json: greedy unless it sets do_sample).

        Generation stops at an end-of-sequence token, after `max_new_tokens`, or when the
        text contains one of `stop` (that token's text is cut before the stop string). If the
        prompt starts with what the KV cache already holds (a chat going on), only the new
        tokens are prefilled.
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise MobileMoEError("the prompt is empty")
        self._check_ids(ids)
        temperature, top_k, top_p = self._sampling_defaults(temperature, top_k, top_p)
        rng = np.random.default_rng(seed)
        logits = self._prefill_reusing_cache(ids)
        decoder = StreamDecoder(self.codec) if self.codec else None
        eos = set(self.manifest.eos_token_ids)
        for _ in range(max_new_tokens):
            token = sample(logits[-1], rng, temperature, top_k, top_p)
            if token in eos:
                return
            text = decoder.add(token) if decoder else ""
            if stop and decoder:
                hit = min((decoder.text.find(s) for s in stop if s in decoder.text), default=-1)
                if hit >= 0:
                    cut = len(decoder.text) - len(text)
                    yield Generated(token, decoder.text[cut:hit] if hit > cut else "")
                    return
            yield Generated(token, text)
            logits = self._forward([token], "last")

    def _sampling_defaults(self, temperature: float | None, top_k: int | None,
                           top_p: float | None) -> tuple[float, int, float]:
        gen = self.manifest.generation
        sampling = bool(gen.get("do_sample"))
        if temperature is None:
            temperature = float(gen.get("temperature", 1.0)) if sampling else 0.0
        if top_k is None:
            top_k = int(gen.get("top_k", 0)) if sampling else 0
        if top_p is None:
            top_p = float(gen.get("top_p", 1.0)) if sampling else 1.0
        return temperature, top_k, top_p

    def _prefill_reusing_cache(self, ids: list[int]) -> np.ndarray:
        common = 0
        for a, b in zip(self._tokens, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # re-run at least the last token for its logits
        self._kv.length = common
        self._tokens = self._tokens[:common]
        return self._forward(ids[common:], "last")

    def _check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.dims.vocab_size]
        if bad:
            raise MobileMoEError(f"token id {bad[0]} out of range (vocab size {self.dims.vocab_size})")

    def _require_codec(self) -> TextCodec:
        if self.codec is None:
            raise MobileMoEError(f"{self.package} has no tokenizer; pass token ids instead of text")
        return self.codec

    @property
    def stats(self) -> Stats:
        self._sample_rss()
        c = self._cache.stats
        return Stats(
            hits=c.hits, misses=c.misses, evictions=c.evictions, hit_rate=c.hit_rate,
            bytes_paged_in=c.bytes_paged_in, paging_seconds=c.paging_seconds,
            expert_cache_bytes=c.resident_bytes, expert_cache_capacity=self._cache.capacity_bytes,
            dense_bytes=self.plan.dense_bytes, dense_huge_page_bytes=self._dense_huge_page_bytes,
            kv_cache_bytes=self.plan.kv_bytes,
            memory_budget=self.memory_budget, baseline_rss=self._baseline_rss,
            peak_rss=self._peak_rss, max_rss=max_rss(),
        )

    def close(self) -> None:
        self._fused = {}
        self._cache.clear()
        if self._pager is not None:
            self._pager.shutdown()
        self._checker.shutdown()
        self._store.close()

    def __enter__(self) -> MoEModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, memory_budget: int | str | None = None, threads: int | None = None,
         context_length: int | None = None, policy: EvictionPolicy | None = None,
         fused_experts: bool = False, expert_kernel: str = "auto") -> MoEModel:
    """Load a mobilemoe package to run within `memory_budget` ("4GB", "512MiB", bytes; None
    for no limit) with `threads` compute threads (default: physical cores).

    fused_experts: run each layer's experts in one QMoE kernel, all resident (faster decode;
    lossy: float32 sums in another order, see mobilemoe.fused_experts).
    expert_kernel: "native" (mobilemoe's int4 kernel on the block as read: page-ins without a
    session build, see mobilemoe.native_experts), "onnxruntime" (a session per expert), or
    "auto": native wherever it can run and supports the experts."""
    return MoEModel(Path(path).expanduser(), memory_budget, threads, context_length, policy,
                    fused_experts, expert_kernel)
