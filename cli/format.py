"""Output helpers shared by the commands: errors, streamed text, statistics tables.

Model text is written with plain `sys.stdout.write` (never through rich, whose markup would
eat `[brackets]` in generated text); tables go through rich, which falls back to plain text
when the output is not a terminal.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Generated, Stats
from mobilemoe.units import format_bytes

# C0/C1 control characters except tab and newline: a random or hostile model can emit ESC
# sequences that would drive the user's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def console(stderr: bool = False) -> Console:
    # Made per call: tests swap sys.stdout/sys.stderr, and rich binds its file at creation.
    # markup off: values such as a model's name are printed as they are.
    return Console(file=sys.stderr if stderr else sys.stdout, highlight=False, markup=False)


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(message: str) -> NoReturn:
    """`error: <message>` on stderr, exit code 1."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()
    raise typer.Exit(1)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a MobileMoEError (bad input, package or budget) into one `error:` line."""
    try:
        yield
    except MobileMoEError as e:
        fail(str(e))


def terminal_safe(text: str, tty: bool) -> str:
    """Control characters shown as escapes on a terminal; untouched when piped."""
    if not tty:
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def stream(tokens: Iterable[Generated]) -> tuple[str, int, bool]:
    """Write each token's text to stdout as it comes; returns (text, tokens, interrupted).

    Ctrl-C stops the stream and keeps what was generated so far.
    """
    out = sys.stdout
    tty = out.isatty()
    pieces: list[str] = []
    count = 0
    try:
        for token in tokens:
            count += 1
            pieces.append(token.text)
            out.write(terminal_safe(token.text, tty))
            out.flush()
    except KeyboardInterrupt:
        return "".join(pieces), count, True
    return "".join(pieces), count, False


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def megabytes(size: int | float) -> str:
    return f"{size / 1e6:.2f} MB"


def stats_rows(stats: Stats) -> list[tuple[str, str]]:
    """The cache statistics as (label, value) pairs, in reading order."""
    rows = [
        ("hits", str(stats.hits)),
        ("misses", str(stats.misses)),
        ("evictions", str(stats.evictions)),
        ("hit rate", f"{stats.hit_rate:.1%}"),
        ("paged in", megabytes(stats.bytes_paged_in)),
        ("paging time", f"{stats.paging_seconds:.3f} s"),
        ("expert cache", f"{megabytes(stats.expert_cache_bytes)} held"
         + ("" if stats.memory_budget is None
            else f" of {megabytes(stats.expert_cache_capacity)}")),
        ("dense part", megabytes(stats.dense_bytes)),
        ("KV cache", megabytes(stats.kv_cache_bytes)),
    ]
    used = stats.peak_rss - stats.baseline_rss
    if stats.memory_budget is None:
        rows.append(("peak RSS - baseline", f"{megabytes(used)} (no budget)"))
    else:
        verdict = "within budget" if used <= stats.memory_budget else "OVER BUDGET"
        rows.append(("peak RSS - baseline",
                     f"{megabytes(used)} of {megabytes(stats.memory_budget)} budget "
                     f"({used / stats.memory_budget:.0%}, {verdict})"))
    rows.append(("baseline RSS", f"{megabytes(stats.baseline_rss)} (interpreter, numpy, ORT)"))
    return rows


def print_rows(rows: list[tuple[str, str]], title: str | None = None,
               stderr: bool = False) -> None:
    table = Table(title=title, show_header=False, title_justify="left", box=None,
                  padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    console(stderr).print(table)


def print_stats(stats: Stats, stderr: bool = False, title: str = "expert cache") -> None:
    print_rows(stats_rows(stats), title=title, stderr=stderr)


__all__ = [
    "console", "fail", "folder_bytes", "format_bytes", "megabytes", "one_line", "print_rows",
    "print_stats", "stats_rows", "stream", "terminal_safe", "user_errors",
]
