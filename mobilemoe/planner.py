"""What a device will do with a package: the memory budget to give it, the expert hit rate,
and decode tokens/s, predicted from the package's sizes and the device's figures.

Runtime dependencies only (numpy and the manifest): an app or a laptop can plan without the
exporter. The model, per decoded token:

    compute  = bytes touched / min(bandwidth, threads * kernel rate) + calls * call overhead
               bytes touched = dense layer graphs + head + KV cache read + L * k resident experts
    paging   = misses * (block / storage read + block * page-in cost)
               misses = (1 - hit rate) * L * k
    tokens/s = 1 / (compute + paging)          the runtime pages synchronously (today)
               1 / max(compute, paging)        if paging were fully overlapped (prefetch)

The hit rate depends on the cache's policy (`hit_rate`). With the frequency policies (the
default decayed LFU, LFU, LRFU, pinned) the most used experts stay: the cache holds the
n - k likeliest (layer, expert) pairs, and k slots turn over for each layer's misses
(`frequency_hit_rate`). With LRU it follows from how long a key survives: layers are asked in
turn, so between two uses of a layer the other layers bring in their experts
(`lru_hit_rate`). Per-token probabilities of each (layer, expert) come from a routing profile
(`routing_profile.json` in the package) or are uniform (k / E). For uniform routing over many
layers the rate is about n / (L * E), the capacity per layer over the experts per layer; a
cache smaller than the other layers' (L - 1) * k experts never hits.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mobilemoe.errors import MobileMoEError, PackageError
from mobilemoe.expert_cache import LRUPolicy
from mobilemoe.manifest import Manifest
from mobilemoe.memory_plan import activation_bytes, kv_cache_bytes, staging_bytes, with_margin
from mobilemoe.units import parse_bytes

ROUTING_PROFILE = "routing_profile.json"
PROFILE_FORMAT = "mobilemoe-routing-profile"

# The budget rule: leave the OS, other apps and the process's own baseline (interpreter or
# ART, ONNX Runtime) 1 GB plus 40% of RAM. 8 GB -> 3.8 GB, 12 GB -> 6.2 GB, 16 GB -> 8.6 GB.
RESERVE_FIXED = 1_000_000_000
RESERVE_FRACTION = 0.40
BUDGET_RULE = "budget = 60% of RAM - 1 GB (the rest is left to the OS, other apps and the process baseline)"

# What ONNX Runtime holds per expert session relative to the block on disk (prepacked
# MatMulNBits layout, measured at load by the runtime; docs/DESIGN_NOTES.md), plus a fixed
# per-session overhead.
HELD_RATIO = {4: 1.2, 8: 1.2}  # int4 measured at block 64 (1.4 at block 32)
SESSION_OVERHEAD = 80_000  # expert sessions skip the graph optimizers (ort_sessions)
# The dense graphs as the runtime holds them, measured here: ONNX Runtime's sessions made from
# the files (~1.13x the file bytes, prepacked), plus ~0.8 MB per session. (Made from bytes,
# onnxruntime's Python binding would keep the bytes too: 2.1x.)
DENSE_HELD_RATIO = 1.13
DENSE_SESSION_OVERHEAD = 800_000
PREFILL_CHUNK = 256  # as in mobilemoe.model
DEFAULT_CONTEXT = 4096

# Measured on the reference machine (2-core x86-64 VM, ONNX Runtime 1.32, one thread;
# mobilemoe.probe, docs/MOBILE.md), used when a device's own figures are unknown: measure
# them on the device for real predictions.
PAGE_IN_MS_PER_MB = 3.5  # a miss in a full cache: evict, build the session (prepack), per MB
KERNEL_RATE_PER_THREAD = 5e9  # bytes of int4 expert block one thread runs through per second, M=1
CALL_OVERHEAD_S = 75e-6  # per session run in the Python decode loop, numpy routing included


@dataclass(frozen=True)
class Device:
    """A device's figures. Rates are bytes per second."""

    ram: int
    storage_read: float = 2e9  # sequential reads of expert blocks (UFS 3.1/4.0 phone)
    bandwidth: float = 50e9  # memory bandwidth (LPDDR5)
    threads: int = 4  # compute threads (a phone's performance cores)
    page_in_ms_per_mb: float = PAGE_IN_MS_PER_MB
    kernel_rate_per_thread: float = KERNEL_RATE_PER_THREAD
    call_overhead_s: float = CALL_OVERHEAD_S


@dataclass(frozen=True)
class PackageFigures:
    """The sizes a plan needs, read from a package's manifest."""

    num_layers: int
    moe_layers: tuple[int, ...]  # the layers with experts (others are dense)
    num_experts: int
    top_k: int
    expert_block_bytes: int  # one expert on disk (the largest template's block)
    expert_bits: int
    dense_graph_bytes: int  # embed + layers + head on disk
    layer_graph_bytes: int  # all layer graphs (read once per token)
    head_graph_bytes: int
    kv_bytes_per_token: int  # K and V of one position, all layers, float32
    kv_bytes: int  # the preallocated KV cache
    activation_bytes: int
    context_length: int

    @property
    def experts_total(self) -> int:
        return len(self.moe_layers) * self.num_experts


@dataclass(frozen=True)
class Plan:
    ram: int | None
    budget: int
    budget_rule: str
    fits: bool  # the budget holds the resident part plus one layer's top-k experts
    minimum_budget: int
    minimum_ram: int  # the smallest RAM whose rule-budget is the minimum budget
    all_resident_budget: int  # no paging at all from this budget up
    memory: dict[str, int]  # where the budget goes (estimated from file sizes)
    expert_session_bytes: int
    expert_capacity: int  # experts the cache holds
    experts_total: int
    hit_rate: float
    routing: str  # "uniform" or the profile it came from
    bytes_per_token: int  # weights and KV cache streamed per decoded token
    miss_bytes_per_token: int
    compute_ms: float
    read_ms: float  # reading missed experts
    page_in_ms: float  # building their sessions (prepacking)
    tokens_per_second: float  # paging and compute in sequence (the runtime today)
    tokens_per_second_overlapped: float  # if paging were hidden behind compute
    policy: str  # the expert cache policy the hit rate was predicted for
    device: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- inputs -----------------------------------------------------------------------------------

_RATE = re.compile(r"^\s*(.+?)\s*(/\s*s|ps)?\s*$", re.IGNORECASE)


def parse_rate(value: float | int | str) -> float:
    """A rate in bytes per second: "2GB/s", "500 MB/s", "1.6GiB/s", or a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise MobileMoEError(f"a rate must be positive, got {value}")
        return float(value)
    match = _RATE.match(str(value))
    try:
        return float(parse_bytes(match.group(1))) if match else parse_bytes(str(value))
    except MobileMoEError:
        raise MobileMoEError(f"not a rate: {value!r} (write e.g. 2GB/s or 500MB/s)") from None


def recommended_budget(ram: int) -> int:
    """The budget rule (BUDGET_RULE): what a device of `ram` bytes can give the model."""
    return int(ram * (1 - RESERVE_FRACTION) - RESERVE_FIXED)


def ram_for_budget(budget: int) -> int:
    """The smallest RAM whose rule-budget is at least `budget`."""
    return math.ceil((budget + RESERVE_FIXED) / (1 - RESERVE_FRACTION))


def package_figures(manifest: Manifest, context_length: int | None = None) -> PackageFigures:
    d = manifest.dims
    context = context_length or min(d.max_position_embeddings, DEFAULT_CONTEXT)
    block = max(t.block_bytes for t in manifest.templates.values())
    bits = max(t.bits for t in manifest.templates.values())
    return PackageFigures(
        num_layers=d.num_layers, moe_layers=tuple(manifest.moe_layers), num_experts=d.num_experts,
        top_k=manifest.routing.top_k,
        expert_block_bytes=block, expert_bits=bits, dense_graph_bytes=manifest.dense_bytes(),
        layer_graph_bytes=sum(g.size for g in manifest.layer_graphs),
        head_graph_bytes=manifest.head_graph.size,
        kv_bytes_per_token=kv_cache_bytes(d, 1), kv_bytes=kv_cache_bytes(d, context),
        activation_bytes=activation_bytes(d, PREFILL_CHUNK, context), context_length=context,
    )


# -- routing profiles -------------------------------------------------------------------------


def read_routing_profile(path: Path, num_layers: int, num_experts: int,
                         moe_layers: Collection[int] | None = None) -> list[list[float]]:
    """Per-layer expert frequencies from a routing profile (docs/MOBILE.md):

        {"format": "mobilemoe-routing-profile", "format_version": 1,
         "tokens": 4096, "source": "...",            (optional)
         "layers": [[count or frequency per expert] per layer]}

    Every layer has a row; a dense layer's (not in `moe_layers`, default: all layers have
    experts) is all zero, as `ProfilingLRU` records it, and a MoE layer's is not.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MobileMoEError(f"{path}: no such routing profile") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{path}: routing profile is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise PackageError(f"{path}: not a routing profile (field format != {PROFILE_FORMAT!r})")
    layers = data.get("layers")
    if not isinstance(layers, list) or len(layers) != num_layers:
        raise PackageError(f"{path}: 'layers' must list {num_layers} layers")
    moe = set(range(num_layers) if moe_layers is None else moe_layers)
    for i, row in enumerate(layers):
        ok = isinstance(row, list) and len(row) == num_experts and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in row)
        if not ok or (i in moe and sum(row) <= 0):
            raise PackageError(f"{path}: layer {i} must list {num_experts} non-negative "
                               "frequencies, not all zero")
        if i not in moe and sum(row) > 0:
            raise PackageError(f"{path}: layer {i} is dense (no experts) but its row is not "
                               "all zero")
    return [[float(v) for v in row] for row in layers]


def write_routing_profile(path: Path, counts: Sequence[Sequence[float]], tokens: int | None = None,
                          source: str = "") -> Path:
    data = {"format": PROFILE_FORMAT, "format_version": 1, "tokens": tokens, "source": source,
            "layers": [[float(v) for v in row] for row in counts]}
    Path(path).write_text(json.dumps(data, indent=1))
    return Path(path)


class ProfilingLRU(LRUPolicy):
    """LRU that also counts how often each (layer, expert) is asked for: load a model with
    `policy=ProfilingLRU()`, generate, then `write_routing_profile(path, policy.counts(L, E))`.
    Prefill asks once per expert per chunk, decoding once per token."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: dict[tuple[int, int], int] = {}

    def _count(self, key) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1

    def inserted(self, key) -> None:
        super().inserted(key)
        self._count(key)

    def touched(self, key) -> None:
        super().touched(key)
        self._count(key)

    def counts(self, num_layers: int, num_experts: int) -> list[list[int]]:
        return [[self.requests.get((layer, e), 0) for e in range(num_experts)]
                for layer in range(num_layers)]


def request_probabilities(top_k: int, frequencies: list[list[float]]) -> list[list[float]]:
    """Per-token probability that each layer picks each expert: each layer's frequencies
    scaled to sum to top_k (k experts per token), capped at 1."""
    return [[min(1.0, top_k * v / sum(row)) for v in row] for row in frequencies]


def hit_rate(policy: str, capacity: int, top_k: int,
             probabilities: Sequence[Sequence[float]]) -> float:
    """The hit rate of an expert cache of `capacity` experts under `policy` (a name in
    `cache_policies.POLICY_NAMES`)."""
    if policy == "lru":
        return lru_hit_rate(capacity, probabilities)
    return frequency_hit_rate(capacity, top_k, probabilities)


def frequency_hit_rate(capacity: int, top_k: int,
                       probabilities: Sequence[Sequence[float]]) -> float:
    """Hit rate of a cache that keeps the most used experts (decayed LFU, LFU, LRFU) under
    independent tokens: the capacity - top_k likeliest (layer, expert) pairs stay, and top_k
    slots take each layer's misses in turn (they are the next victims, so they rarely hit).

    Against the trace simulator's decayed LFU (docs/CACHE_POLICIES.md) at 10 / 25 / 50 / 75%
    of the experts: 32 / 55 / 76 / 90% vs 33 / 54 / 75 / 89% on the skewed synthetic trace,
    10 / 26 / 52 / 76% vs 9 / 24 / 48 / 74% with uniform routes, and 3–7 points low on the
    demo model's traces, whose consecutive tokens share experts (locality is not modelled).
    """
    p = np.sort(np.asarray(probabilities, dtype=np.float64).ravel())[::-1]
    if capacity >= np.count_nonzero(p):
        return 1.0
    return float(p[:max(0, capacity - top_k)].sum() / p.sum())


def lru_hit_rate(capacity: int, probabilities: Sequence[Sequence[float]]) -> float:
    """Hit rate of one LRU cache of `capacity` experts under the runtime's access pattern:
    every token asks each layer in turn for its experts; probabilities[l][e] is the chance
    per token that layer l picks expert e.

    A key of layer l last used j tokens ago has since been followed by W_l(j) distinct keys:
    those the other layers picked in j tokens and its own layer in j - 1. It is still cached
    iff W_l(j) < capacity. W_l(j) is a sum of independent picks, taken as normal (mean and
    variance from the probabilities), so a key of layer l hits with probability
    sum_j p (1 - p)^(j-1) P(W_l(j) < capacity). Since W_l(1) is the other layers' (L - 1) k
    experts, a smaller cache never hits (LRU's cyclic worst case); for uniform routing over
    many layers the rate tends to capacity / (L * E).
    """
    p = np.asarray(probabilities, dtype=np.float64)  # [L, E]
    if capacity >= np.count_nonzero(p):
        return 1.0
    tokens = 64
    while True:
        mean_m, var_m = _picked_moments(p, tokens)  # [L, J+1] for j = 0..tokens
        # layer l's window at j = 1..tokens: every other layer over j, its own over j - 1
        mean = mean_m[:, 1:].sum(axis=0) - mean_m[:, 1:] + mean_m[:, :-1]  # [L, J]
        var = var_m[:, 1:].sum(axis=0) - var_m[:, 1:] + var_m[:, :-1]
        z = (capacity - 0.5 - mean) / np.sqrt(np.maximum(var, 1e-12))  # continuity-corrected
        cached = _normal_cdf(z)  # [L, J]: P(W_l(j) < capacity)
        if cached[:, -1].max() < 1e-6 or tokens >= 1 << 14:
            break
        tokens *= 2
    hit = (1 - p) ** tokens * cached[:, -1:]  # [L, E]: last used beyond the window
    for start in range(0, tokens, _CHUNK):
        j = np.arange(start + 1, min(tokens, start + _CHUNK) + 1, dtype=np.float64)
        last_use = p[:, :, None] * (1 - p[:, :, None]) ** (j - 1)  # [L, E, chunk]
        hit += (last_use * cached[:, None, start:start + len(j)]).sum(axis=2)
    return float((p * hit).sum() / p.sum())


_CHUNK = 256  # tokens per step: bounds the [layers, experts, tokens] temporaries


def _picked_moments(p: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of how many distinct experts each layer picks in j = 0..tokens
    tokens. [L, tokens + 1] each.

    Mean: the sum of q = 1 - (1 - p)^j over its experts. Variance: the sum of q (1 - q), as if
    experts were picked independently, scaled by what picking exactly k per token does to it
    for uniform routing (exact there: none at j = 1, where exactly k are picked)."""
    mean = np.empty((len(p), tokens + 1))
    var = np.empty_like(mean)
    n = np.count_nonzero(p, axis=1).astype(np.float64)[:, None]  # experts per layer [L, 1]
    k = p.sum(axis=1)[:, None]  # picks per token
    for start in range(0, tokens + 1, _CHUNK):
        j = np.arange(start, min(tokens + 1, start + _CHUNK), dtype=np.float64)
        q = 1 - (1 - p[:, :, None]) ** j  # [L, E, chunk]
        mean[:, start:start + len(j)] = q.sum(axis=1)
        # uniform: Var = n qu (1 - qu) + n (n - 1) (P(two experts both unpicked) - (1 - qu)^2)
        miss = (1 - k / n) ** j  # [L, chunk]
        both = (np.clip((n - k) * (n - k - 1), 0, None) / (n * np.maximum(n - 1, 1))) ** j
        exact = n * (1 - miss) * miss + n * (n - 1) * (both - miss ** 2)
        ratio = np.clip(exact / np.maximum(n * (1 - miss) * miss, 1e-300), 0, 1)
        var[:, start:start + len(j)] = (q * (1 - q)).sum(axis=1) * ratio
    return mean, var


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF (Abramowitz & Stegun 7.1.26 erf, |error| < 1.5e-7): numpy has no
    erf and scipy is not a runtime dependency."""
    x = np.abs(z) / math.sqrt(2)
    t = 1 / (1 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    erf = 1 - poly * np.exp(-x * x)
    return 0.5 * (1 + np.sign(z) * erf)


# -- the plan ---------------------------------------------------------------------------------


def expert_session_bytes(figures: PackageFigures) -> int:
    ratio = HELD_RATIO.get(figures.expert_bits, 1.4)
    return int(figures.expert_block_bytes * ratio) + SESSION_OVERHEAD


def plan(package: str | Path | Manifest, device: Device, budget: int | str | None = None,
         context_length: int | None = None, profile: str | Path | None = None,
         context_tokens: int = 512, policy: str | None = None) -> Plan:
    """Plan `package` on `device`: at `budget` if given, else at the rule's budget for its RAM.

    profile: a routing profile (default: the package's `routing_profile.json` if present,
    else uniform routing). context_tokens: the position decoding is at (KV cache read).
    policy: the expert cache's policy the hit rate is predicted for (default: the runtime's).
    """
    from mobilemoe.cache_policies import DEFAULT_POLICY  # it imports this module

    policy = policy or DEFAULT_POLICY
    if isinstance(package, Manifest):
        manifest, folder = package, None
    else:
        folder = Path(package).expanduser()
        manifest = Manifest.load(folder)
    f = package_figures(manifest, context_length)
    if profile is None and folder is not None and (folder / ROUTING_PROFILE).is_file():
        profile = folder / ROUTING_PROFILE
    if profile is not None:
        per_layer = read_routing_profile(Path(profile), f.num_layers, f.num_experts,
                                         f.moe_layers)
        frequencies = [per_layer[i] for i in f.moe_layers]
        routing = str(profile)
    else:
        frequencies = [[1.0] * f.num_experts for _ in f.moe_layers]
        routing = "uniform"

    session = expert_session_bytes(f)
    dense = int(f.dense_graph_bytes * DENSE_HELD_RATIO + (f.num_layers + 2) * DENSE_SESSION_OVERHEAD)
    staging = staging_bytes(f.expert_block_bytes)
    fixed = dense + f.kv_bytes + f.activation_bytes + staging
    need = fixed + f.top_k * session
    minimum = with_margin(need)  # what we name has the runtime's margin; it loads from `need`
    all_resident = with_margin(fixed + f.experts_total * session)
    budget = max(0, recommended_budget(device.ram)) if budget is None else parse_bytes(budget)
    fits = budget >= need
    budget = min(budget, all_resident) if fits else budget
    capacity = max(0, min(f.experts_total, (budget - fixed) // session)) if fits else 0
    probabilities = request_probabilities(f.top_k, frequencies)
    hit = hit_rate(policy, capacity, f.top_k, probabilities) if fits else 0.0

    active = len(f.moe_layers) * f.top_k  # expert runs per token
    touched = (f.layer_graph_bytes + f.head_graph_bytes + context_tokens * f.kv_bytes_per_token
               + active * f.expert_block_bytes)
    rate = min(device.bandwidth, device.threads * device.kernel_rate_per_thread)
    calls = 2 + f.num_layers + active
    compute = touched / rate + calls * device.call_overhead_s
    misses = (1 - hit) * active
    miss_bytes = misses * f.expert_block_bytes
    read = miss_bytes / device.storage_read
    page_in = miss_bytes / 1e6 * device.page_in_ms_per_mb / 1e3
    return Plan(
        ram=device.ram, budget=budget, budget_rule=BUDGET_RULE, fits=fits,
        minimum_budget=minimum, minimum_ram=ram_for_budget(minimum),
        all_resident_budget=all_resident,
        memory={"dense": dense, "kv_cache": f.kv_bytes, "activations": f.activation_bytes,
                "staging": staging, "expert_cache": max(0, budget - fixed)},
        expert_session_bytes=session, expert_capacity=int(capacity),
        experts_total=f.experts_total, hit_rate=hit, routing=routing, policy=policy,
        bytes_per_token=int(touched), miss_bytes_per_token=int(miss_bytes),
        compute_ms=compute * 1e3, read_ms=read * 1e3, page_in_ms=page_in * 1e3,
        tokens_per_second=1 / (compute + read + page_in) if fits else 0.0,
        tokens_per_second_overlapped=1 / max(compute, read + page_in) if fits else 0.0,
        device=asdict(device),
    )


def plan_table(package: str | Path, device: Device,
               rams: Sequence[int] = (4, 6, 8, 12, 16, 24)) -> list[dict[str, Any]]:
    """The rule's budget and predictions for several RAM sizes (GB), e.g. for an app manifest."""
    rows = []
    for gb in rams:
        p = plan(package, replace(device, ram=gb * 1_000_000_000))
        rows.append({"ram": p.ram, "budget": p.budget, "fits": p.fits,
                     "expert_capacity": p.expert_capacity, "hit_rate": round(p.hit_rate, 4),
                     "tokens_per_second": round(p.tokens_per_second, 3)})
    return rows
