"""`mobilemoe bench`: tokens/s, paging and the time split per token of a package.

A thin layer over `mobilemoe.bench.run_bench`: parse, call it with the same keyword
arguments, print a table (or the result as JSON).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mobilemoe.bench import BenchResult, PhaseResult, run_bench
from mobilemoe.cache_policies import DEFAULT_POLICY, POLICY_NAMES, policy_for_package

from .format import fail, format_bytes, print_rows, user_errors

# Shared with `run` and `chat` (cli/main.py).
ExpertKernel = Annotated[str, typer.Option(
    "--expert-kernel", metavar="KERNEL",
    help="What computes the experts: auto (native where this CPU and the package allow it), "
         "native (mobilemoe's int4 kernel on the bytes as read) or onnxruntime (a session per "
         "expert).")]


def bench(
    package: Annotated[str, typer.Argument(help="A mobilemoe package folder.", metavar="PACKAGE",
                                           show_default=False)],
    memory_budget: Annotated[str | None, typer.Option(
        "--memory-budget", "-m", metavar="SIZE",
        help="Most memory the model may use, e.g. 2GB (default: no limit).")] = None,
    expert_fraction: Annotated[float | None, typer.Option(
        "--expert-fraction", min=0.0, max=1.0,
        help="Instead of a budget: the budget whose expert cache holds this fraction of all "
             "experts (1.0 = all resident).", show_default=False)] = None,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Random prompt length.")] = 128,
    new_tokens: Annotated[int, typer.Option(min=0, help="Tokens decoded per repeat.")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="Recorded repeats (median).")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Unrecorded repeats first.")] = 1,
    threads: Annotated[int | None, typer.Option(
        min=1, help="Compute threads (default: physical cores).")] = None,
    context_length: Annotated[int | None, typer.Option(
        "--context-length", "-c", min=1,
        help="KV cache tokens (default: prompt + new tokens + 1).")] = None,
    preload: Annotated[bool | None, typer.Option(
        "--preload/--no-preload",
        help="Page experts in before timing (default: when all of them fit).",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random prompts and sampling.")] = 0,
    temperature: Annotated[float, typer.Option(
        "--temperature", "-t", min=0.0,
        help="0 = greedy. A random-weight model decoded greedily repeats its routes; 1 keeps "
             "them changing.")] = 0.0,
    policy: Annotated[str, typer.Option(
        "--policy", metavar="NAME",
        help=f"Expert cache eviction policy: {', '.join(POLICY_NAMES)}.")] = DEFAULT_POLICY,
    routing_profile: Annotated[Path | None, typer.Option(
        "--routing-profile", metavar="FILE",
        help="With --policy pinned: the routing profile (default: the package's).",
        show_default=False)] = None,
    fused_experts: Annotated[bool, typer.Option(
        "--fused-experts",
        help="Each layer's experts in one QMoE kernel, all resident (lossy: float32 "
             "rounding differs from the default path).")] = False,
    expert_kernel: ExpertKernel = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Measure prefill and decode speed, expert paging and peak memory of a package."""
    if memory_budget is not None and expert_fraction is not None:
        fail("give --memory-budget or --expert-fraction, not both")
    with user_errors():
        result = run_bench(package, memory_budget=memory_budget, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, repeats=repeats, threads=threads,
                           warmup=warmup, expert_fraction=expert_fraction,
                           context_length=context_length, preload=preload, seed=seed,
                           temperature=temperature,
                           policy=policy_for_package(policy, package, routing_profile),
                           fused_experts=fused_experts, expert_kernel=expert_kernel)
    if as_json:
        typer.echo(result.to_json())
    else:
        print_result(result)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _phase_rows(name: str, p: PhaseResult) -> list[tuple[str, str]]:
    s = p.split_ms_per_token
    read = "" if s.get("paging_read") is None else f" (read {_ms(s['paging_read'])})"
    return [
        (name, f"{p.tokens_per_s:.2f} tokens/s (median of {len(p.seconds)}, {p.tokens} tokens)"),
        ("  ms per token", f"dense {_ms(s['dense'])} | experts {_ms(s['experts'])} | "
                           f"paging {_ms(s['paging'])}{read} | other {_ms(s['other'])} | "
                           f"total {_ms(s['total'])}"),
        ("  experts", f"hit rate {p.hit_rate:.1%} ({p.hits} hits, {p.misses} misses, "
                      f"{p.evictions} evictions), {p.mb_paged_per_token:.2f} MB paged in per token"),
    ]


def print_result(r: BenchResult) -> None:
    m = r.model
    budget = "none" if r.memory_budget is None else format_bytes(r.memory_budget)
    if r.expert_fraction is not None:
        budget += f" ({r.expert_fraction:.0%} of the experts)"
    rows = [
        ("package", f"{r.package}: {m['layers']} layers, {m['experts']} experts top-{m['top_k']}, "
                    f"int{m['expert_bits']} experts / int{m['dense_bits']} dense, "
                    f"block {m['block_size']}"),
        ("run", f"{r.threads} threads, prompt {r.prompt_tokens}, {r.new_tokens} new tokens "
                f"(temperature {r.temperature:g}), "
                f"{r.repeats} repeats after {r.warmup} warm-up"),
        ("budget", f"{budget}; expert cache "
                   f"{'unlimited' if r.memory_budget is None else format_bytes(r.expert_cache_capacity)}"
                   f" (all experts: {format_bytes(r.all_experts_bytes)}), "
                   + ("experts fused (QMoE)" if r.fused_experts else f"policy {r.policy}")),
        ("load", f"{r.load_seconds:.2f} s; preloaded {r.preloaded_experts} experts in "
                 f"{r.preload_seconds:.2f} s; dense weights in huge pages: "
                 f"{format_bytes(m['dense_huge_page_bytes'])}"),
        *_phase_rows("prefill", r.prefill),
    ]
    if r.decode is not None:
        rows += _phase_rows("decode", r.decode)
    if r.paging_ms_per_mb is not None:
        rows.append(("paging", f"{r.paging_ms_per_mb:.2f} ms per MB paged in "
                               f"(reading: {_ms(r.read_ms_per_mb)} ms per MB)"))
    rows += [
        ("weights per token", f"{format_bytes(r.weight_bytes_per_token)} read per decode step"),
        ("RSS", f"baseline {format_bytes(r.baseline_rss)}, peak {format_bytes(r.peak_rss)} "
                f"(peak - baseline {format_bytes(r.peak_rss - r.baseline_rss)})"),
    ]
    rows.append(("load average", f"{r.load_average[0]:.1f} before, {r.load_average[1]:.1f} after "
                                 f"({r.threads} threads asked)"))
    rows += [("note", n) for n in r.notes]
    print_rows(rows, title="mobilemoe bench")
