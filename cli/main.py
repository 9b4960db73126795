"""The `mobilemoe` command: export, run, chat, inspect, demo.

Each command parses its options, calls the library with the same keyword arguments, and
prints. `main()` is the console-script entry point.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

import mobilemoe
from mobilemoe.cache_policies import (
    DEFAULT_POLICY,
    POLICY_NAMES,
    check_policy_name,
    policy_for_package,
)
from mobilemoe.errors import MobileMoEError
from mobilemoe.manifest import DEFAULT_BLOCK_SIZE

from .bench import ExpertKernel
from .bench import bench as _bench
from .format import (
    fail,
    folder_bytes,
    format_bytes,
    one_line,
    print_stats,
    stream,
    user_errors,
)
from .inspection import inspect_model, print_inspection
from .mobile import mobile as _mobile
from .mobile import plan as _plan

app = typer.Typer(
    name="mobilemoe",
    help="Run quantized Mixture-of-Experts models under a hard memory budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Options shared by every command that loads a package.
MemoryBudget = Annotated[str | None, typer.Option(
    "--memory-budget", "-m", metavar="SIZE",
    help="Most memory the model may use, e.g. 512MB or 2GiB (default: no limit).")]
Threads = Annotated[int | None, typer.Option(
    min=1, help="Compute threads (default: physical cores).")]
ContextLength = Annotated[int | None, typer.Option(
    "--context-length", "-c", min=1,
    help="Tokens the KV cache holds (default: the model's, at most 4096).")]
Package = Annotated[str, typer.Argument(help="A mobilemoe package folder.", metavar="PACKAGE",
                                         show_default=False)]
# Sampling settings: None = the package's generation_config (greedy unless it samples).
Temperature = Annotated[float | None, typer.Option(
    "--temperature", "-t", min=0.0,
    help="0 = greedy. Default: the model's generation_config (greedy if it does not sample).",
    show_default=False)]
TopK = Annotated[int | None, typer.Option(
    min=0, help="Sample from the k likeliest (0 = all).", show_default=False)]
TopP = Annotated[float | None, typer.Option(
    min=0.0, max=1.0, help="Nucleus sampling mass.", show_default=False)]
Seed = Annotated[int | None, typer.Option(help="Random seed for sampling.")]
OptionalPackage = Annotated[str | None, typer.Argument(
    help="A mobilemoe package folder (default: the shipped demo model, exported once to "
         "~/.cache/mobilemoe or $MOBILEMOE_CACHE).", metavar="[PACKAGE]", show_default=False)]
ShowExperts = Annotated[bool, typer.Option(
    "--show-experts", help="After each token, the experts each layer routed it to.")]
# The expert cache's eviction policy (mobilemoe.cache_policies, docs/CACHE_POLICIES.md).
Policy = Annotated[str, typer.Option(
    "--policy", metavar="NAME",
    help=f"Expert cache eviction policy: {', '.join(POLICY_NAMES)} (docs/CACHE_POLICIES.md).")]
RoutingProfile = Annotated[Path | None, typer.Option(
    "--routing-profile", metavar="FILE",
    help="With --policy pinned: the routing profile whose hottest experts stay cached "
         "(default: the package's routing_profile.json).", show_default=False)]

FusedExperts = Annotated[bool, typer.Option(
    "--fused-experts",
    help="Run each layer's experts in one QMoE kernel, all resident: faster decode; lossy "
         "(float32 rounding differs from the default path).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mobilemoe {mobilemoe.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Run quantized Mixture-of-Experts models under a hard memory budget."""


def _load(package: str, memory_budget: str | None, threads: int | None,
          context_length: int | None, policy: str = DEFAULT_POLICY,
          routing_profile: Path | None = None, fused_experts: bool = False,
          expert_kernel: str = "auto") -> mobilemoe.MoEModel:
    return mobilemoe.load(package, memory_budget=memory_budget, threads=threads,
                          context_length=context_length,
                          policy=policy_for_package(policy, package, routing_profile),
                          fused_experts=fused_experts, expert_kernel=expert_kernel)


def _load_or_demo(package: str | None, memory_budget: str | None, threads: int | None,
                  context_length: int | None, policy: str = DEFAULT_POLICY,
                  routing_profile: Path | None = None,
                  fused_experts: bool = False, expert_kernel: str = "auto") -> mobilemoe.MoEModel:
    """The package, or with none the shipped demo model (exported once, cached)."""
    check_policy_name(policy)  # before the demo model is exported or named
    if package is not None:
        return _load(package, memory_budget, threads, context_length, policy, routing_profile,
                     fused_experts, expert_kernel)
    from mobilemoe.manifest import Manifest

    from .demo import demo_context, demo_package
    from .experts import stderr_say

    _exporter()
    path = demo_package(say=lambda text: None)
    if context_length is None:
        context_length = demo_context(Manifest.load(path).dims.max_position_embeddings)
    stderr_say(f"(no package given: the demo model, {path}; a text-continuation model, "
               "it does not follow instructions)")
    return _load(str(path), memory_budget, threads, context_length, policy, routing_profile,
                 fused_experts, expert_kernel)


def _exporter():
    """`mobilemoe.export.export_model`, or a clear error if the `[export]` extra is missing."""
    try:
        from mobilemoe.export import export_model
    except ImportError as e:
        fail(f"exporting needs the exporter's dependencies ({e.name or e} is missing): "
             "pip install 'mobilemoe[export]'")
    return export_model


@app.command()
def export(
    src: Annotated[str, typer.Argument(help="Checkpoint folder or Hugging Face hub id.",
                                       metavar="SRC", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="OUT", help="Package folder to write.",
                                      show_default=False)],
    bits: Annotated[int, typer.Option(help="Expert weight bits: 4 or 8.")] = 4,
    dense_bits: Annotated[int, typer.Option(help="Attention / LM head bits: 8 or 4.")] = 8,
    block_size: Annotated[int, typer.Option(help="Quantization block size.")] = DEFAULT_BLOCK_SIZE,
    accuracy_level: Annotated[int, typer.Option(
        help="MatMulNBits compute: 4 = int8 activations (fastest), 1 = float32.")] = 4,
    mla_cache: Annotated[str, typer.Option(
        help="DeepSeek's KV cache: expanded (per-head keys and values) or latent (~10x smaller, "
             "slower attention).")] = "expanded",
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag, commit).")
                        ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing package.")] = False,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Progress bar (default: when stderr is a terminal).",
        show_default=False)] = None,
) -> None:
    """Export a Hugging Face MoE checkpoint to a mobilemoe package."""
    export_model = _exporter()
    start = time.perf_counter()
    with user_errors():
        path = export_model(src, out, bits=bits, dense_bits=dense_bits, block_size=block_size,
                            accuracy_level=accuracy_level, mla_cache=mla_cache,
                            revision=revision, overwrite=overwrite,
                            progress=sys.stderr.isatty() if progress is None else progress)
    typer.echo(f"exported {src} -> {path} ({format_bytes(folder_bytes(path))}, "
               f"{time.perf_counter() - start:.1f} s)")


@app.command()
def run(
    package: OptionalPackage = None,
    prompt: Annotated[str | None, typer.Argument(
        help="Prompt text ('-' reads stdin). Given alone, runs the demo model.",
        metavar="PROMPT", show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=0,
                                            help="Most tokens to generate.")] = 256,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    stop: Annotated[list[str] | None, typer.Option(
        help="Stop when the text contains this (repeatable).")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Cache statistics on stderr at the end.")
                     ] = False,
    show_experts: ShowExperts = False,
    memory_budget: MemoryBudget = None,
    threads: Threads = None,
    context_length: ContextLength = None,
    policy: Policy = DEFAULT_POLICY,
    routing_profile: RoutingProfile = None,
    fused_experts: FusedExperts = False,
    expert_kernel: ExpertKernel = "auto",
) -> None:
    """Generate text from a prompt, streaming it to stdout."""
    if prompt is None:  # one argument: the prompt, for the default (demo) model
        if package is not None and Path(package).expanduser().is_dir():
            fail(f"give a prompt: mobilemoe run {package} PROMPT")
        package, prompt = None, package
    if prompt is None:
        fail("give a prompt: mobilemoe run [PACKAGE] PROMPT")
    if prompt == "-":
        prompt = sys.stdin.read()
    with user_errors():
        model = _load_or_demo(package, memory_budget, threads, context_length, policy,
                              routing_profile, fused_experts, expert_kernel)
        tokens = model.generate(
            prompt, max_new_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=tuple(stop or ()))
        if show_experts:
            from .experts import stream_experts

            text, _, interrupted = stream_experts(model, prompt[-12:], tokens)
        else:
            text, _, interrupted = stream(tokens)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        print_stats(model.stats, stderr=True)
    if interrupted:
        raise typer.Exit(130)


@app.command()
def chat(
    package: OptionalPackage = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1,
                                            help="Most tokens per reply.")] = 256,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    show_experts: ShowExperts = False,
    memory_budget: MemoryBudget = None,
    threads: Threads = None,
    context_length: ContextLength = None,
    policy: Policy = DEFAULT_POLICY,
    routing_profile: RoutingProfile = None,
    fused_experts: FusedExperts = False,
    expert_kernel: ExpertKernel = "auto",
) -> None:
    """Chat with a model: /stats, /reset, /exit (Ctrl-C stops a reply)."""
    from .chat import chat_loop

    with user_errors():
        model = _load_or_demo(package, memory_budget, threads, context_length, policy,
                              routing_profile, fused_experts, expert_kernel)
    chat_loop(model, dict(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed), show_experts=show_experts)


@app.command()
def inspect(
    package: Package,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    routing: Annotated[list[str] | None, typer.Option(
        "--routing", metavar="[DOMAIN=]FILE",
        help="Run a text file through the model and print expert usage per layer; repeat "
             "with DOMAIN=FILE to compare domains (e.g. prose=a.txt --routing code=b.py).")
    ] = None,
    top1: Annotated[bool, typer.Option(
        "--top1", help="With --routing: count first choices only, not all top-k.")] = False,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", "-n", min=1, help="With --routing: at most this many tokens per file.")
    ] = None,
    memory_budget: MemoryBudget = None,
    threads: Threads = None,
    context_length: ContextLength = None,
) -> None:
    """Architecture, quantization, sizes and the smallest memory budget that works."""
    if routing:
        from .experts import print_routing, routing_report

        with user_errors():
            with _load(package, memory_budget, threads, context_length) as model:
                result = routing_report(model, routing, top1=top1, max_tokens=max_tokens)
        if as_json:
            typer.echo(json.dumps({k: ({d: v.tolist() for d, v in result[k].items()}
                                       if k in ("usage", "tv") else result[k])
                                   for k in result}, indent=2))
        else:
            print_routing(result, top1)
        return
    with user_errors():
        info = inspect_model(package, memory_budget, threads, context_length)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        print_inspection(info)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the checkpoint and package go.")
                   ] = Path("demo-out"),
    memory_budget: Annotated[str | None, typer.Option(
        "--memory-budget", "-m", metavar="SIZE",
        help="Budget (default: the minimum plus a third of the experts, so experts are paged).")
    ] = None,
    prompt: Annotated[str, typer.Option(help="Prompt to continue.")] = "Once upon a time",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1,
                                            help="Tokens to generate.")] = 60,
    threads: Threads = None,
    context_length: Annotated[int | None, typer.Option(
        "--context-length", "-c", min=1, help="KV cache tokens (default: 512).")] = None,
) -> None:
    """End to end: get a small Mixtral, export it to int4, run it with experts paged."""
    from .demo import run_demo

    _exporter()  # fail early and clearly without the [export] extra
    with user_errors():
        run_demo(out, memory_budget=memory_budget, prompt=prompt, max_tokens=max_tokens,
                 threads=threads, context_length=context_length)


app.command(name="bench")(_bench)
app.command(name="mobile")(_mobile)
app.command(name="plan")(_plan)


def main() -> None:
    """Console-script entry point: user errors are one line, never a traceback."""
    try:
        app()
    except MobileMoEError as e:  # the commands catch these; this is the safety net
        sys.stderr.write(f"error: {one_line(str(e))}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
