"""`mobilemoe demo`: the whole pipeline on a small Mixtral, with experts paged under a budget.

1. checkpoint: the trained demo model shipped in `mobilemoe/demo_model/` if installed, else
   a random Mixtral written by `mobilemoe.export.synthetic` (numpy only)
2. export to int4 (cached: skipped when the package is there and made from the same source)
3. budget: unless given, the measured minimum plus a third of all experts, so the expert
   cache cannot hold every expert and must evict
4. generate, streaming
5. cache statistics and peak memory against the budget

Only the runtime and the `[export]` extra are used: no torch, no transformers.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.resources
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path

from rich.console import Group
from rich.live import Live
from rich.text import Text

import mobilemoe
from mobilemoe.errors import MobileMoEError, PackageError
from mobilemoe.manifest import DEFAULT_BLOCK_SIZE, Manifest
from mobilemoe.units import parse_bytes

from .format import (
    folder_bytes,
    format_bytes,
    megabytes,
    print_rows,
    stats_rows,
    stream,
    terminal_safe,
)

DEMO_CONTEXT = 512  # plenty for a 60-token demo; keeps the KV cache and buffers small
EXPORT_SETTINGS = dict(bits=4, dense_bits=8, block_size=DEFAULT_BLOCK_SIZE, accuracy_level=4)
GENERATION = dict(temperature=0.8, top_p=0.95, seed=0)  # varied text, same every run


def _step(number: int, text: str) -> None:
    sys.stdout.write(f"\n[{number}/5] {text}\n")
    sys.stdout.flush()


def _say(text: str) -> None:
    sys.stdout.write(f"      {text}\n")
    sys.stdout.flush()


def _fingerprint(checkpoint: Path) -> str:
    """What the package was made from: config, weight file names and sizes, export settings,
    and the exporter's own code (a package from another exporter may lack what this runtime
    asks of its graphs, with the same format version)."""
    h = hashlib.sha256(repr(sorted(EXPORT_SETTINGS.items())).encode())
    exporter = importlib.util.find_spec("mobilemoe.export")
    for folder in (exporter.submodule_search_locations or []) if exporter else []:
        for path in sorted(Path(folder).rglob("*.py")):
            h.update(path.read_bytes())
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".json" or path.name.startswith("tokenizer"):
            h.update(path.name.encode() + path.read_bytes())
        elif path.suffix == ".safetensors":
            h.update(f"{path.name}:{path.stat().st_size}".encode())
    return h.hexdigest()


def _get_checkpoint(out: Path, stack: ExitStack, say: Callable[[str], None] = _say
                    ) -> tuple[Path, str, bool]:
    """(checkpoint folder, package name, trained?)"""
    shipped = importlib.resources.files("mobilemoe") / "demo_model"
    if shipped.joinpath("config.json").is_file():
        folder = stack.enter_context(importlib.resources.as_file(shipped))
        say(f"trained demo model: {folder}")
        return folder, "demo-model.mmoe", True
    folder = out / "random-mixtral"
    if (folder / "config.json").is_file():
        say(f"random Mixtral (cached): {folder}")
    else:
        from mobilemoe.export.synthetic import write_random_mixtral

        start = time.perf_counter()
        write_random_mixtral(folder)
        say(f"no trained demo model installed; wrote a random Mixtral to {folder} "
            f"({format_bytes(folder_bytes(folder))}, {time.perf_counter() - start:.1f} s)")
    say("random weights: the text will be gibberish, the paging is real")
    return folder, "random-mixtral.mmoe", False


def _get_package(checkpoint: Path, package: Path,
                 say: Callable[[str], None] = _say) -> None:
    marker = package.parent / f".{package.name}.source"
    fingerprint = _fingerprint(checkpoint)
    try:
        Manifest.load(package)
        cached = marker.is_file() and marker.read_text().strip() == fingerprint
    except PackageError:
        cached = False
    if cached:
        say(f"cached: {package} ({format_bytes(folder_bytes(package))})")
        return
    from mobilemoe.export import export_model

    start = time.perf_counter()
    export_model(checkpoint, package, overwrite=True, progress=sys.stderr.isatty(),
                 **EXPORT_SETTINGS)
    marker.write_text(fingerprint + "\n")
    say(f"exported to {package} ({format_bytes(folder_bytes(package))}, "
         f"{time.perf_counter() - start:.1f} s)")


def demo_cache_dir() -> Path:
    """Where the default model's package is cached: $MOBILEMOE_CACHE, else ~/.cache/mobilemoe."""
    root = os.environ.get("MOBILEMOE_CACHE") or Path.home() / ".cache" / "mobilemoe"
    return Path(root).expanduser() / "demo"


def demo_context(max_position_embeddings: int) -> int:
    """The demo's KV cache: short, and never past what the model was trained on."""
    return min(DEMO_CONTEXT, max_position_embeddings)


def demo_package(out: Path | None = None, say: Callable[[str], None] = _say) -> Path:
    """The shipped demo model exported to int4, once: later calls return the cached package.

    The exporter writes to a temporary folder and renames it into place, so a concurrent or
    interrupted export never leaves a half-written package behind.
    """
    out = Path(out).expanduser() if out is not None else demo_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        checkpoint, name, _ = _get_checkpoint(out, stack, say)
        package = out / name
        _get_package(checkpoint, package, say)
    return package


def _paging_budget(package: Path, threads: int | None, context_length: int) -> int:
    """The measured minimum budget plus a third of all experts.

    Measured with no budget after a warm-up load: the first load in a process also pays
    ONNX Runtime's one-time set-up (a few MB), which stays in the process, so the numbers
    the budgeted load will see are those of a warm process. The cache then holds the top-k
    experts the minimum needs plus about a third of the others: far from all of them.
    """
    for _ in range(2):
        with mobilemoe.load(package, threads=threads, context_length=context_length) as model:
            plan, experts_total = model.plan, model.manifest.experts_total
        del model
        gc.collect()
    others = experts_total - plan.top_k
    return plan.minimum_budget + others * plan.expert_session_bytes // 3


def _stream_with_live_stats(model: mobilemoe.MoEModel, prompt: str,
                            tokens: Iterable[mobilemoe.Generated]) -> tuple[int, bool]:
    """On a terminal: the text as it grows, with the cache statistics updating under it."""
    text, count = Text(terminal_safe(prompt, True)), 0

    def view() -> Group:
        s = model.stats
        line = (f"hits {s.hits}  misses {s.misses}  evictions {s.evictions}  hit rate "
                f"{s.hit_rate:.0%}  paged in {megabytes(s.bytes_paged_in)}  expert cache "
                f"{megabytes(s.expert_cache_bytes)} of {megabytes(s.expert_cache_capacity)}")
        return Group(text, Text(line, style="dim"))

    with Live(view(), refresh_per_second=8, transient=False) as live:
        try:
            for token in tokens:
                count += 1
                text.append(terminal_safe(token.text, True))
                live.update(view())
        except KeyboardInterrupt:
            return count, True
    return count, False


def run_demo(out: Path, memory_budget: str | None = None, prompt: str = "Once upon a time",
             max_tokens: int = 60, threads: int | None = None,
             context_length: int | None = None) -> None:
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        _step(1, "checkpoint")
        checkpoint, name, _ = _get_checkpoint(out, stack)
        _step(2, "export to int4")
        package = out / name
        _get_package(checkpoint, package)

    _step(3, "memory budget")
    manifest = Manifest.load(package)
    d = manifest.dims
    context = context_length or demo_context(d.max_position_embeddings)
    if memory_budget is None:
        budget = _paging_budget(package, threads, context)
        how = "measured minimum + 1/3 of the experts"
    else:
        budget, how = parse_bytes(memory_budget), "--memory-budget"
    model = mobilemoe.load(package, memory_budget=budget, threads=threads,
                           context_length=context)
    plan, total = model.plan, model.manifest.experts_total
    fits = min(total, model.stats.expert_cache_capacity // plan.expert_session_bytes)
    _say(f"budget {megabytes(budget)} ({how}); minimum {megabytes(plan.minimum_budget)}")
    _say(f"expert cache: {megabytes(model.stats.expert_cache_capacity)} = {fits} of {total} "
         f"experts ({len(manifest.moe_layers)} MoE layers x {d.num_experts}, top-{d.top_k}, "
         f"{megabytes(plan.expert_session_bytes)} each in memory)")

    _step(4, f"generate {max_tokens} tokens")
    start = time.perf_counter()
    tokens = model.generate(prompt, max_new_tokens=max_tokens, **GENERATION)
    if sys.stdout.isatty():
        count, interrupted = _stream_with_live_stats(model, prompt, tokens)
    else:
        sys.stdout.write(prompt)
        _, count, interrupted = stream(tokens)
    seconds = time.perf_counter() - start
    sys.stdout.write(" [interrupted]\n" if interrupted else "\n")

    _step(5, "statistics")
    stats = model.stats
    rows = [("tokens", f"{count} in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} tokens/s, "
                       "prompt included)")]
    rows += stats_rows(stats)
    print_rows(rows)
    model.close()
    if stats.evictions == 0:
        _say("no evictions: the budget held every expert the text needed "
             "(try a smaller --memory-budget)")
    else:
        _say(f"{stats.misses} page-ins and {stats.evictions} evictions kept the experts within "
             f"{megabytes(stats.expert_cache_capacity)}")
    if stats.peak_rss - stats.baseline_rss > budget:
        raise MobileMoEError(
            f"peak memory {megabytes(stats.peak_rss - stats.baseline_rss)} exceeded the budget "
            f"{megabytes(budget)}")
