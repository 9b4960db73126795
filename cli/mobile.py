"""`mobilemoe mobile` (an app-ready bundle for ONNX Runtime Mobile) and `mobilemoe plan` (what a
device will do with a package). Thin layers over `mobilemoe.export.mobile.export_mobile` and
`mobilemoe.planner.plan`: parse, call with the same keyword arguments, print.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from mobilemoe.planner import Device, Plan, parse_rate
from mobilemoe.planner import plan as make_plan
from mobilemoe.units import parse_bytes

from .format import fail, folder_bytes, format_bytes, print_rows, user_errors

Package = Annotated[str, typer.Argument(help="A mobilemoe package folder.", metavar="PACKAGE",
                                         show_default=False)]
Ram = Annotated[str, typer.Option("--ram", metavar="SIZE",
                                  help="The device's RAM, e.g. 8GB.")]
Threads = Annotated[int, typer.Option(min=1, help="Compute threads on the device.")]


def mobile(
    package: Package,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="BUNDLE",
                                      help="Bundle folder to write.", show_default=False)],
    ram: Ram = "8GB",
    abi: Annotated[str, typer.Option(help="Android ABI: arm64-v8a, armeabi-v7a, x86_64, x86.")
                   ] = "arm64-v8a",
    threads: Threads = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="Steps on stderr (default: when stderr is a terminal).",
        show_default=False)] = None,
) -> None:
    """Write an app-ready bundle for ONNX Runtime Mobile (ORT-format graphs, mmap-able experts)."""
    try:
        from mobilemoe.export.mobile import export_mobile
    except ImportError as e:
        fail(f"bundling needs the exporter's dependencies ({e.name or e} is missing): "
             "pip install 'mobilemoe[export]'")
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    with user_errors():
        path = export_mobile(package, out, ram=ram, abi=abi, threads=threads, overwrite=overwrite,
                             log=(lambda m: typer.echo(m, err=True)) if show else None)
    app = json.loads((path / "mobile.json").read_text())
    memory, runtime = app["memory"], app["onnxruntime"]
    typer.echo(f"bundled {package} -> {path} ({format_bytes(folder_bytes(path))}, "
               f"{time.perf_counter() - start:.1f} s)")
    print_rows([
        ("ONNX Runtime", f"{runtime['package']} >= {runtime['min_version']} "
                         f"({runtime['model_format']}); or a reduced build from "
                         f"{runtime['reduced_build']['config']}"),
        ("budget", f"{format_bytes(memory['budget'])} for {format_bytes(memory['ram'])} RAM"
                   + ("" if memory["fits"] else
                      f" - too small: needs {format_bytes(memory['minimum_ram'], round_up=True)} "
                      "RAM")),
        ("usability", app["usability"]["recommendation"]),
    ])


def plan(
    package: Package,
    ram: Ram = "8GB",
    storage_read: Annotated[str, typer.Option(
        "--storage-read", metavar="RATE", help="Storage read speed, e.g. 2GB/s.")] = "2GB/s",
    bandwidth: Annotated[str, typer.Option(
        metavar="RATE", help="Memory bandwidth, e.g. 50GB/s.")] = "50GB/s",
    threads: Threads = 4,
    budget: Annotated[str | None, typer.Option(
        "--budget", metavar="SIZE",
        help="Plan at this budget instead of the RAM rule's.", show_default=False)] = None,
    page_in: Annotated[float | None, typer.Option(
        "--page-in-ms-per-mb", min=0.0, help="Building an expert session, ms per MB "
        "(default: measured on the reference machine).", show_default=False)] = None,
    kernel_rate: Annotated[str | None, typer.Option(
        "--kernel-rate", metavar="RATE", help="Expert weights one thread streams at one token, "
        "e.g. 5GB/s (default: measured on the reference machine).", show_default=False)] = None,
    context_length: Annotated[int | None, typer.Option(
        "--context-length", "-c", min=1, help="KV cache tokens (default: the model's, at most 4096).")
    ] = None,
    profile: Annotated[Path | None, typer.Option(
        help="Routing profile JSON (default: the package's routing_profile.json, else uniform).",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Recommend a memory budget for a device and predict decode tokens/s and expert hit rate."""
    with user_errors():
        device = Device(ram=parse_bytes(ram), storage_read=parse_rate(storage_read),
                        bandwidth=parse_rate(bandwidth), threads=threads)
        if page_in is not None:
            device = replace(device, page_in_ms_per_mb=page_in)
        if kernel_rate is not None:
            device = replace(device, kernel_rate_per_thread=parse_rate(kernel_rate))
        result = make_plan(package, device, budget=budget, context_length=context_length,
                           profile=profile)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        print_plan(result)


def print_plan(p: Plan) -> None:
    m = p.memory
    rows = [
        ("RAM", format_bytes(p.ram) if p.ram else "n/a"),
        ("budget", f"{format_bytes(p.budget)} ({p.budget} bytes)"),
        ("  rule", p.budget_rule),
        ("  dense / KV / buffers", f"{format_bytes(m['dense'])} / {format_bytes(m['kv_cache'])} / "
                                   f"{format_bytes(m['activations'] + m['staging'])}"),
        ("  expert cache", f"{format_bytes(m['expert_cache'])}: {p.expert_capacity} of "
                           f"{p.experts_total} experts ({format_bytes(p.expert_session_bytes)} each)"),
        ("minimum budget", f"{format_bytes(p.minimum_budget, round_up=True)} "
                           f"(RAM {format_bytes(p.minimum_ram, round_up=True)} or more)"),
        ("no paging from", format_bytes(p.all_resident_budget, round_up=True)),
    ]
    if not p.fits:
        rows.append(("verdict", "does not fit: the budget is below the minimum"))
        print_rows(rows, title="plan")
        return
    rows += [
        ("hit rate", f"{p.hit_rate:.1%} ({p.routing} routing, policy {p.policy})"),
        ("per token", f"compute {p.compute_ms:.1f} ms, read {p.read_ms:.1f} ms, "
                      f"page-in {p.page_in_ms:.1f} ms "
                      f"({format_bytes(p.miss_bytes_per_token)} missed)"),
        ("decode", f"{p.tokens_per_second:.2f} tokens/s "
                   f"({p.tokens_per_second_overlapped:.2f} if paging overlapped compute)"),
    ]
    print_rows(rows, title="plan")
