"""A loaded mobilemoe package: forward pass, generation and statistics.

One forward step over T tokens (prefill: the whole prompt, in chunks; decode: one token):

    embed ─> for each layer: dense graph (attention + KV cache + router logits)
                             ─> route ─> experts from the cache (tokens grouped by expert)
                             ─> residual + weighted expert outputs
          ─> head graph ─> logits
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mobilemoe.errors import MobileMoEError, PackageError
from mobilemoe.expert_cache import EvictionPolicy, ExpertCache, Loaded
from mobilemoe.expert_store import ExpertStore
from mobilemoe.manifest import FileRef, LayerInfo, Manifest, ModelDims, resolve_inside
from mobilemoe.memory import limit_heap_retention, max_rss, release_freed_memory, rss
from mobilemoe.memory_plan import MemoryPlan, activation_bytes, kv_cache_bytes
from mobilemoe.ort_sessions import (
    create_session,
    create_session_with_weights,
    default_threads,
    use_threads,
    warm_up,
)
from mobilemoe.routing import route
from mobilemoe.sampling import sample
from mobilemoe.text import StreamDecoder, TextCodec
from mobilemoe.units import parse_bytes

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
    kv_cache_bytes: int
    memory_budget: int | None
    baseline_rss: int  # the process before the model was loaded (interpreter, numpy, ORT)
    peak_rss: int  # highest RSS sampled since load (after every page-in and forward)
    max_rss: int  # the OS's lifetime peak for this process

    def as_dict(self) -> dict:
        return asdict(self)


def causal_mask(start: int, end: int, window: int = 0) -> np.ndarray:
    """[T, S] additive mask for queries at positions start..end-1 over keys 0..end-1:
    0 where key <= query (and, with a window, key > query - window), -inf elsewhere."""
    query = np.arange(start, end)[:, None]
    key = np.arange(end)[None, :]
    visible = key <= query
    if window:
        visible &= key > query - window
    return np.where(visible, 0.0, -np.inf).astype(np.float32)


# Sizes measured from RSS, per graph checksum, kept for the life of the process: a later load
# of the same package then plans with the same numbers (the first measurement is the
# largest, as it also pays for ONNX Runtime's lazy initialisation).
_MEASURED: dict[str, int] = {}


def _remember(key: str, measured: int) -> int:
    return _MEASURED.setdefault(key, measured)


class KVCache:
    """Keys and values of every layer, preallocated: [layers, context, kv_heads, head_dim]
    (values have their own head_dim). np.zeros maps pages lazily: RSS grows with use."""

    def __init__(self, dims: ModelDims, context: int):
        shape = (dims.num_layers, context, dims.num_kv_heads)
        self.keys = np.zeros((*shape, dims.head_dim), dtype=np.float32)
        self.values = np.zeros((*shape, dims.value_head_dim), dtype=np.float32)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]


class MoEModel:
    def __init__(self, package: Path, memory_budget: int | str | None = None,
                 threads: int | None = None, context_length: int | None = None,
                 policy: EvictionPolicy | None = None):
        self.package = Path(package)
        self.manifest = m = Manifest.load(self.package)
        self.dims = d = m.dims
        self.memory_budget = None if memory_budget is None else parse_bytes(memory_budget)
        self.context_length = context_length or min(d.max_position_embeddings, DEFAULT_CONTEXT)
        if self.context_length <= 0:
            raise MobileMoEError(f"context length must be positive, got {self.context_length}")
        use_threads(threads or default_threads())
        warm_up()
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
        self._embed = create_session(self._read_graph(m.embed_graph))
        self._layers = [create_session(self._read_graph(g)) for g in m.layer_graphs]
        self._layer_outputs = [[o.name for o in s.get_outputs()] for s in self._layers]
        self._check_layer_outputs()
        self._head = create_session(self._read_graph(m.head_graph))
        self._warm_up_dense()
        release_freed_memory()
        dense_key = "dense:" + "".join(g.sha256 or "" for g in
                                       [m.embed_graph, *m.layer_graphs, m.head_graph])
        dense_bytes = _remember(dense_key, max(rss() - self._baseline_rss, m.dense_bytes()))

        self._store = ExpertStore(self.package, m)
        try:
            self._templates = {tid: self._read_graph(t.graph) for tid, t in m.templates.items()}
            self._held = {tid: self._calibrate(tid) for tid in m.templates}
        except BaseException:
            self._store.close()
            raise
        self.plan = MemoryPlan(dense_bytes, kv_bytes, buffers, 2 * largest_block,
                               max(self._held.values()), d.top_k, self.context_length)
        capacity = self.plan.expert_capacity(self.memory_budget)
        self._cache = ExpertCache(self._load_expert, self._held_bytes, capacity, policy)

        self._sample_rss()

    # -- loading ----------------------------------------------------------------------------

    def _read_graph(self, ref: FileRef) -> bytes:
        data = resolve_inside(self.package, ref.path).read_bytes()
        if ref.sha256 is not None and hashlib.sha256(data).hexdigest() != ref.sha256:
            raise PackageError(f"{self.package}: {ref.path} does not match its checksum "
                               "(corrupt or modified; re-export the package)")
        return data

    def _check_layer_outputs(self) -> None:
        """A layer graph must give what the forward pass reads (a graph from another exporter
        version would otherwise fail at the first token with a KeyError)."""
        for layer, names in enumerate(self._layer_outputs):
            need = {"residual", "key", "value"}
            if self._layer_info[layer].moe:
                need |= {"moe_input", "router_logits"}
            if need - set(names):
                raise PackageError(
                    f"{self.package}: layer {layer}'s graph lacks outputs "
                    f"{sorted(need - set(names))}; re-export the package with this version")

    def _warm_up_dense(self) -> None:
        """One token through every dense graph (no experts, KV cache untouched): a session's
        first run allocates what later runs reuse, and that belongs to the measured dense part."""
        d = self.dims
        hidden = self._embed.run(None, {"input_ids": np.zeros(1, np.int64)})[0]
        feeds = {"cos": self._cos[:1], "sin": self._sin[:1], "mask": np.zeros((1, 1), np.float32),
                 "past_key": np.zeros((0, d.num_kv_heads, d.head_dim), np.float32),
                 "past_value": np.zeros((0, d.num_kv_heads, d.value_head_dim), np.float32)}
        for session in self._layers:
            hidden = session.run(None, {**feeds, "hidden": hidden})[0]
        self._head.run(None, {"hidden": hidden})

    def _expert_session(self, layer: int, expert: int):
        arrays = self._store.read(layer, expert)
        return create_session_with_weights(self._templates[self._template_of(layer, expert)],
                                           list(arrays), list(arrays.values()))

    def _template_of(self, layer: int, expert: int) -> str:
        return self._store.entry(layer, expert).template

    def _calibrate(self, template: str) -> int:
        """Bytes one expert session of `template` holds, measured: ONNX Runtime prepacks the
        weights into its own layout, which for int4 is larger than the bytes on disk."""
        key = f"template:{self.manifest.templates[template].graph.sha256}"
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

    def _sample_rss(self) -> None:
        self._peak_rss = max(self._peak_rss, rss())

    # -- forward ----------------------------------------------------------------------------

    def _moe(self, layer: int, x: np.ndarray, router_logits: np.ndarray,
             selection: np.ndarray | None) -> np.ndarray:
        """x [T, H] -> sum over each token's chosen experts of weight * expert(x)."""
        experts, weights = route(router_logits, self.manifest.routing, selection)  # [T, k] each
        if self.routing_trace is not None:
            self.routing_trace[-1][layer] = experts
        needed = [int(e) for e in np.unique(experts)]
        # Run the cached experts first (a miss may evict one this layer still needs), but
        # add the outputs up in expert order: the sum must not depend on the cache.
        cached_first = sorted(needed, key=lambda e: (layer, e) not in self._cache)
        outputs = {}
        for expert in cached_first:
            rows = np.nonzero((experts == expert).any(axis=1))[0]  # tokens routed here
            session = self._cache.get((layer, expert))
            outputs[expert] = rows, session.run(None, {"x": x[rows]})[0]  # [n, H]
        out = np.zeros_like(x)
        for expert in needed:
            rows, y = outputs[expert]
            weight = (weights[rows] * (experts[rows] == expert)).sum(axis=1)  # [n]
            out[rows] += weight[:, None] * y
        return out

    def _forward(self, ids: list[int], want: str) -> np.ndarray:
        """Run `ids` after what the KV cache holds; logits of the last token ("last") or all."""
        start, count = self._kv.length, len(ids)
        if start + count > self._kv.capacity:
            raise MobileMoEError(f"context length {self.context_length} exceeded "
                                 f"({start + count} tokens); load with a larger context_length")
        outputs = []
        for begin in range(0, count, PREFILL_CHUNK):
            chunk = ids[begin:begin + PREFILL_CHUNK]
            hidden = self._forward_chunk(np.asarray(chunk, dtype=np.int64))
            if want == "all" or begin + PREFILL_CHUNK >= count:
                outputs.append(hidden if want == "all" else hidden[-1:])
        self._tokens.extend(ids)
        logits = self._head.run(None, {"hidden": np.concatenate(outputs)})[0]
        release_freed_memory()  # this step's buffers, before the next one allocates (µs)
        self._sample_rss()
        return logits

    def _forward_chunk(self, ids: np.ndarray) -> np.ndarray:
        kv, start = self._kv, self._kv.length
        end = start + len(ids)
        masks = {}  # sliding window (0 = none) -> [T, S] mask
        feeds = {"cos": self._cos[start:end], "sin": self._sin[start:end]}
        hidden = self._embed.run(None, {"input_ids": ids})[0]
        if self.routing_trace is not None:
            self.routing_trace.append({})
        scale = np.float32(self.manifest.moe_output_scale)
        for layer, session in enumerate(self._layers):
            window = self._layer_info[layer].sliding_window
            if window not in masks:
                masks[window] = causal_mask(start, end, window)
            feeds["mask"] = masks[window]
            feeds["hidden"] = hidden
            feeds["past_key"] = kv.keys[layer, :start]
            feeds["past_value"] = kv.values[layer, :start]
            out = dict(zip(self._layer_outputs[layer], session.run(None, feeds), strict=True))
            kv.keys[layer, start:end] = out["key"]
            kv.values[layer, start:end] = out["value"]
            hidden = out["residual"]
            if self._layer_info[layer].moe:
                routed = self._moe(layer, out["moe_input"], out["router_logits"],
                                   out.get("router_selection"))
                hidden = hidden + (routed if scale == 1 else scale * routed)
        kv.length = end
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
            dense_bytes=self.plan.dense_bytes, kv_cache_bytes=self.plan.kv_bytes,
            memory_budget=self.memory_budget, baseline_rss=self._baseline_rss,
            peak_rss=self._peak_rss, max_rss=max_rss(),
        )

    def close(self) -> None:
        self._cache.clear()
        self._store.close()

    def __enter__(self) -> MoEModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, memory_budget: int | str | None = None, threads: int | None = None,
         context_length: int | None = None, policy: EvictionPolicy | None = None) -> MoEModel:
    """Load a mobilemoe package to run within `memory_budget` ("4GB", "512MiB", bytes; None
    for no limit) with `threads` compute threads (default: physical cores)."""
    return MoEModel(Path(path).expanduser(), memory_budget, threads, context_length, policy)
