"""Trace-replay simulator: the expert cache's hit rate per eviction policy and cache size.

    .venv/bin/python benchmarks/policy_sim.py                        # markdown tables
    .venv/bin/python benchmarks/policy_sim.py --json > policies.json  # the raw numbers
    .venv/bin/python benchmarks/policy_sim.py --plot docs/perf_policies.png

Replays what the runtime asks of its cache (MoEModel._moe in mobilemoe/model.py): per forward
step (one decoded token), per MoE layer in order, that layer's unique experts of the step,
the cached ones first, each an `ExpertCache.get(key)` with no `keep` (the runtime passes none:
as it asks the cached experts first, a miss can only evict an expert this layer has already
run). A miss evicts until one more expert fits, as `ExpertCache._make_room` does. All experts
have one size, so a cache size is a number of experts: a share of all L * E, at least top-k
(the runtime's minimum budget).

The policies are `mobilemoe.cache_policies`' own classes; Belady's optimal (evict the key whose
next use is furthest away) is the upper bound. The first --calibration steps warm the cache
and record the routing profile the pinned policy uses (with `planner.ProfilingLRU`, as a user
would); only the steps after them are scored, so pinned is not scored on what it was fit to.

Traces: the recorded ones (benchmarks/routing_traces.py writes them and gives the format),
replayed as decode steps, one token each, and a synthetic OLMoE-shaped one (`synthetic_trace`)
since the recorded ones come from the 4-layer, 8-expert, top-2 demo model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobilemoe.cache_policies import POLICY_NAMES, ScoredPolicy, policy_by_name
from mobilemoe.expert_cache import EvictionPolicy, Key
from mobilemoe.planner import ProfilingLRU

ROOT = Path(__file__).resolve().parents[1]
TRACES = sorted((ROOT / "benchmarks/traces").glob("*.json"))
SHARES = (0.10, 0.25, 0.50, 0.75)
SIMULATED = (*POLICY_NAMES, "belady")


@dataclass(frozen=True)
class Trace:
    name: str
    layers: list[int]  # the MoE layers' indices in the model
    num_experts: int
    top_k: int
    experts: np.ndarray  # [tokens, len(layers), top_k]: each token's experts per MoE layer

    @property
    def experts_total(self) -> int:
        return len(self.layers) * self.num_experts


def load_trace(path: Path) -> Trace:
    data = json.loads(Path(path).read_text())
    experts = np.asarray(data["experts"], dtype=np.int64)  # [N, L, k]
    return Trace(Path(path).stem, list(data["layers"]), data["num_experts"], data["top_k"], experts)


def synthetic_trace(tokens: int = 2048, layers: int = 16, experts: int = 64, top_k: int = 8,
                    skew: float = 0.8, locality: float = 0.2, seed: int = 0) -> Trace:
    """An OLMoE-shaped trace (16 layers, 64 experts, top-8 by default).

    Popularity per layer is Zipf: the expert of rank r is picked in proportion to r^-skew, the
    ranks shuffled per layer (skew 0 = uniform, the routing of a random-weight model).
    Temporal locality: each of a layer's experts for the previous token is kept with
    probability `locality`; the rest are drawn by popularity without replacement.
    """
    rng = np.random.default_rng(seed)
    rank = np.argsort(rng.random((layers, experts)), axis=1) + 1  # [L, E], a permutation per layer
    log_p = -skew * np.log(rank)  # unnormalised log popularity
    out = np.empty((tokens, layers, top_k), dtype=np.int64)
    previous = np.zeros((layers, experts), dtype=bool)
    for t in range(tokens):
        # Gumbel top-k: the k largest of log p + Gumbel noise are a draw without replacement
        score = log_p + rng.gumbel(size=(layers, experts))
        score[previous & (rng.random((layers, experts)) < locality)] = np.inf  # kept
        chosen = np.argsort(-score, axis=1)[:, :top_k]  # [L, k], kept ones first
        out[t] = chosen
        previous[:] = False
        np.put_along_axis(previous, chosen, True, axis=1)
    name = f"synthetic-olmoe-skew{skew:g}-loc{locality:g}"
    return Trace(name, list(range(layers)), experts, top_k, out)


def layer_requests(trace: Trace) -> list[tuple[Key, ...]]:
    """What the runtime asks per step and layer, in order: the unique (layer, expert) keys."""
    return [tuple((layer, int(e)) for e in np.unique(step[i]))
            for step in trace.experts for i, layer in enumerate(trace.layers)]


def replay(requests: Sequence[tuple[Key, ...]], policy: EvictionPolicy, capacity: int,
           score_from: int = 0) -> tuple[int, int]:
    """(hits, misses) of a cache of `capacity` experts over requests[score_from:], having
    replayed all of them: MoEModel._moe's order into ExpertCache.get's logic."""
    cached: set[Key] = set()
    hits = misses = 0
    keep: frozenset = frozenset()  # the runtime passes no keep (see the module docstring)
    for i, keys in enumerate(requests):
        scored = i >= score_from
        for key in sorted(keys, key=lambda k: k not in cached):  # cached first, as _moe
            if key in cached:
                hits += scored
                policy.touched(key)
                continue
            misses += scored
            while len(cached) + 1 > capacity:
                victim = policy.victim(keep)
                if victim is None:
                    break
                policy.removed(victim)
                cached.remove(victim)
            cached.add(key)
            policy.inserted(key)
    return hits, misses


class BeladyPolicy(ScoredPolicy):
    """Belady's MIN (1966): evict the key whose next use is furthest away (never: first).
    Knows the future, so only a simulator can run it; the upper bound for every policy.
    Positions count (step, layer) requests: within one, the order of keys does not matter."""

    def __init__(self, requests: Sequence[tuple[Key, ...]]) -> None:
        super().__init__()
        self._uses: dict[Key, deque[int]] = {}
        for position, keys in enumerate(requests):
            for key in keys:
                self._uses.setdefault(key, deque()).append(position)

    def _used(self, key: Key) -> float:
        uses = self._uses[key]
        uses.popleft()  # this use: each touched/inserted is one request, in order
        return -(uses[0] if uses else math.inf)  # the lowest score goes: furthest first


def recorded_profile(trace: Trace, requests: Sequence[tuple[Key, ...]]) -> list[list[int]]:
    """The routing profile of `requests` as a user records one: `ProfilingLRU` counts
    (rows for every layer up to the last MoE layer, as its `counts` makes them)."""
    profiler = ProfilingLRU()
    replay(requests, profiler, capacity=trace.experts_total)
    return profiler.counts(max(trace.layers) + 1, trace.num_experts)


def make_policy(name: str, trace: Trace, requests: Sequence[tuple[Key, ...]],
                profile: list[list[int]]) -> EvictionPolicy:
    if name == "belady":
        return BeladyPolicy(requests)
    return policy_by_name(name, profile if name == "pinned" else None, trace.top_k)


def capacity_for(trace: Trace, share: float) -> int:
    return max(trace.top_k, round(share * trace.experts_total))


def simulate(trace: Trace, shares: Sequence[float] = SHARES, calibration: int = 256,
             policies: Sequence[str] = SIMULATED, profile: list[list[int]] | None = None
             ) -> list[dict]:
    """One row per (share, policy): hit rate over the steps after the first `calibration`.
    profile: the pinned policy's (default: recorded over the calibration steps)."""
    if not 0 < calibration < len(trace.experts):
        raise ValueError(f"calibration must be in (0, {len(trace.experts)}): {calibration}")
    requests = layer_requests(trace)
    split = calibration * len(trace.layers)
    if profile is None:
        profile = recorded_profile(trace, requests[:split])
    elif (len(profile), len(profile[0])) != (max(trace.layers) + 1, trace.num_experts):
        raise ValueError(f"{trace.name}: the profile's shape does not match the trace's")
    rows = []
    for share in shares:
        capacity = capacity_for(trace, share)
        for name in policies:
            hits, misses = replay(requests, make_policy(name, trace, requests, profile),
                                  capacity, split)
            rows.append({"trace": trace.name, "policy": name, "share": share,
                         "capacity": capacity, "hits": hits, "misses": misses,
                         "hit_rate": hits / max(hits + misses, 1)})
    return rows


def runtime_check(path: Path, tokens: int, calibration: int, shares: Sequence[float] = SHARES,
                  policies: Sequence[str] = POLICY_NAMES) -> list[dict]:
    """The simulator against the runtime: decode a recorded trace's text with the demo
    package (teacher-forced, one token per step, a fresh KV cache per window as the trace was
    recorded) under each policy and cache size, then replay the routes the runtime took.
    Equal hits and misses mean the simulator asks the cache what MoEModel asks it. Uses
    private parts of MoEModel (`_forward`, `_cache`), as mobilemoe.bench does."""
    from mobilemoe.cli.demo import demo_package  # the runtime and the CLI: only here

    import mobilemoe

    data = json.loads(Path(path).read_text())
    ids, window = data["token_ids"][:tokens], data["window"]
    recorded = load_trace(path)
    requests = layer_requests(recorded)
    split = calibration * len(recorded.layers)
    profile = recorded_profile(recorded, requests[:split])
    package = demo_package(say=lambda text: None)
    rows = []
    for share in shares:
        capacity = capacity_for(recorded, share)
        for name in policies:
            policy = make_policy(name, recorded, requests, profile)
            with mobilemoe.load(package, context_length=window, threads=1, policy=policy) as model:
                model._cache.capacity_bytes = capacity * model.plan.expert_session_bytes
                with model.trace_routing() as steps:
                    for i, token in enumerate(ids):
                        if i % window == 0:
                            model.reset()
                        if i == calibration:
                            before = model.stats.hits, model.stats.misses
                        model._forward([token], "last")  # one decode step
                hits, misses = model.stats.hits - before[0], model.stats.misses - before[1]
            layers = sorted(steps[0])
            routes = np.stack([np.stack([step[layer][0] for layer in layers]) for step in steps])
            replayed = Trace(recorded.name, layers, recorded.num_experts, recorded.top_k, routes)
            simulated = replay(layer_requests(replayed), make_policy(name, recorded, requests, profile),
                               capacity, split)
            same = (np.sort(routes, -1) == np.sort(recorded.experts[:len(ids)], -1)).all(axis=(1, 2))
            rows.append({"trace": recorded.name, "policy": name, "share": share,
                         "capacity": capacity, "runtime": [hits, misses],
                         "simulator": [int(x) for x in simulated],
                         "routes_as_recorded": float(same.mean())})
    return rows


def trace_summary(trace: Trace) -> dict:
    """Shape, skew and temporal locality of a trace, to compare recorded and synthetic ones."""
    n, layers, k = trace.experts.shape
    usage = np.stack([np.bincount(trace.experts[:, i].ravel(), minlength=trace.num_experts)
                      for i in range(layers)]) / (n * k)  # [L, E], rows sum to 1
    top = np.sort(usage, axis=1)[:, ::-1][:, :max(1, trace.num_experts // 8)].sum(axis=1)
    chosen = np.zeros((n, layers, trace.num_experts), dtype=bool)
    np.put_along_axis(chosen, trace.experts, True, axis=2)
    overlap = (chosen[1:] & chosen[:-1]).sum(axis=2).mean() / k  # share of experts reused
    return {"trace": trace.name, "tokens": n, "layers": layers, "experts": trace.num_experts,
            "top_k": k, "top_eighth_share": float(top.mean()), "next_token_overlap": float(overlap),
            "overlap_if_random": k / trace.num_experts}


def markdown(rows: list[dict], summaries: dict[str, dict], calibration: int) -> str:
    out = []
    for trace in dict.fromkeys(r["trace"] for r in rows):
        mine = [r for r in rows if r["trace"] == trace]
        s = summaries[trace]
        shares = list(dict.fromkeys(r["share"] for r in mine))
        caps = {r["share"]: r["capacity"] for r in mine}
        out.append(f"**{trace}**: {s['layers']} layers x {s['experts']} experts, top-{s['top_k']}, "
                   f"{s['tokens']} tokens ({calibration} calibration, {s['tokens'] - calibration} "
                   f"scored); top 1/8 of experts take {s['top_eighth_share']:.0%} of routes; "
                   f"next token reuses {s['next_token_overlap']:.0%} of experts "
                   f"({s['overlap_if_random']:.0%} if random)\n")
        out.append("| policy | " + " | ".join(f"{x:.0%} ({caps[x]})" for x in shares) + " |")
        out.append("|---" * (len(shares) + 1) + "|")
        for policy in dict.fromkeys(r["policy"] for r in mine):
            rates = {r["share"]: r["hit_rate"] for r in mine if r["policy"] == policy}
            out.append(f"| {policy} | " + " | ".join(f"{rates[x]:.1%}" for x in shares) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Hit rate against cache size, one panel per trace; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r["trace"] for r in rows))
    fig, axes = plt.subplots(1, len(traces), figsize=(4.2 * len(traces), 3.6), squeeze=False)
    for ax, trace in zip(axes[0], traces, strict=True):
        mine = [r for r in rows if r["trace"] == trace]
        for policy in dict.fromkeys(r["policy"] for r in mine):
            pts = [(100 * r["share"], 100 * r["hit_rate"]) for r in mine if r["policy"] == policy]
            ax.plot(*zip(*pts, strict=True), "k--" if policy == "belady" else "o-", label=policy)
        ax.set_title(trace, fontsize=9)
        ax.set_xlabel("cache size (% of all experts)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("hit rate (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", nargs="*", type=Path, default=TRACES,
                        help="recorded routing traces (default: benchmarks/traces/*.json)")
    parser.add_argument("--synthetic", nargs="*", default=["0.8:0.2"], metavar="SKEW:LOCALITY",
                        help="OLMoE-shaped synthetic traces: Zipf exponent of expert popularity "
                             "(0 = uniform) and chance of keeping each previous-token expert "
                             "(default 0.8:0.2; none: no synthetic trace)")
    parser.add_argument("--tokens", type=int, default=2048, help="synthetic trace length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=256,
                        help="first steps: warm-up and the pinned policy's profile, not scored")
    parser.add_argument("--profile-from", type=Path, metavar="TRACE",
                        help="record the pinned policy's profile over all of this trace instead "
                             "(e.g. another domain's, as a profile shipped in a package would be)")
    parser.add_argument("--shares", type=float, nargs="+", default=list(SHARES),
                        help="cache sizes as shares of all experts")
    parser.add_argument("--runtime", type=int, metavar="TOKENS",
                        help="instead: decode the first TOKENS tokens of each recorded trace with "
                             "the real runtime (demo package) and compare with the simulator")
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also plot to this file")
    args = parser.parse_args(argv)

    if args.runtime:
        for path in args.traces:
            for row in runtime_check(path, args.runtime, args.calibration, args.shares):
                print(json.dumps(row) if args.json else
                      f"{row['trace']} {row['policy']:>6} {row['share']:.0%} ({row['capacity']}): "
                      f"runtime hits/misses {row['runtime']}, simulator {row['simulator']}, "
                      f"routes as recorded {row['routes_as_recorded']:.1%}", flush=True)
        return
    traces = [load_trace(p) for p in args.traces]
    for spec in args.synthetic:
        skew, _, locality = spec.partition(":")
        traces.append(synthetic_trace(args.tokens, skew=float(skew), locality=float(locality or 0),
                                      seed=args.seed))
    profile = None
    if args.profile_from:
        source = load_trace(args.profile_from)
        profile = recorded_profile(source, layer_requests(source))
    rows = [row for t in traces for row in simulate(t, args.shares, args.calibration,
                                                    profile=profile)]
    summaries = {t.name: trace_summary(t) for t in traces}
    if args.json:
        print(json.dumps({"calibration": args.calibration, "traces": list(summaries.values()),
                          "results": rows}, indent=1))
    else:
        print(markdown(rows, summaries, args.calibration))
    if args.plot:
        done = plot(rows, args.plot)
        print(f"plot: {done}" if done else "plot skipped: matplotlib is not installed",
              file=sys.stderr)


if __name__ == "__main__":
    main()
