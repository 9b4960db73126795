"""Routing views: `--show-experts` on run/chat, and `inspect --routing`.

Colours come from rich, which writes plain text when the output is not a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from rich.text import Text

from mobilemoe import MoEModel
from mobilemoe.errors import MobileMoEError
from mobilemoe.model import Generated
from mobilemoe.routing_usage import domain_usage

from .format import console

# one colour per expert id (cycled past 16)
COLOURS = ["red", "green", "yellow", "blue", "magenta", "cyan", "bright_red", "bright_green",
           "bright_yellow", "bright_blue", "bright_magenta", "bright_cyan", "orange3",
           "purple", "turquoise2", "gold3"]


def _token_line(label: str, step: dict, width: int) -> Text:
    """'label' L0 3 5 | L1 0 7 ... for the last token of one traced forward chunk."""
    line = Text(f"{label!r:<{width}} ")
    for i, layer in enumerate(sorted(step)):
        line.append(("" if i == 0 else " | ") + f"L{layer} ", style="dim")
        for j, expert in enumerate(step[layer][-1]):
            e = int(expert)
            line.append(("" if j == 0 else " ") + f"{e}", style=f"bold {COLOURS[e % len(COLOURS)]}")
    return line


def stream_experts(model: MoEModel, prompt_tail: str,
                   tokens: Iterable[Generated]) -> tuple[str, int, bool]:
    """Like `format.stream`, one line per token with the experts each MoE layer routed it to.

    A token is routed when it is fed back in to predict the next one, so each line comes one
    token late; the first is the prompt's last token. Returns (text, tokens, interrupted).
    """
    out = console()
    pieces: list[str] = []
    label, count = prompt_tail, 0
    with model.trace_routing() as trace:
        try:
            for token in tokens:
                count += 1
                if trace:
                    out.print(_token_line(label, trace[-1], 12), soft_wrap=True)
                trace.clear()  # keep only the step in progress: memory stays flat
                pieces.append(token.text)
                label = token.text
        except KeyboardInterrupt:
            return "".join(pieces), count, True
        if trace:  # the generator fed its last token in before it stopped
            out.print(_token_line(label, trace[-1], 12), soft_wrap=True)
    out.print(Text(f"text: {''.join(pieces)}"), soft_wrap=True)
    return "".join(pieces), count, False


def parse_routing_files(specs: list[str]) -> dict[str, str]:
    """['prose=a.txt', 'b.txt'] -> {'prose': text of a.txt, 'b': text of b.txt}."""
    texts = {}
    for spec in specs:
        domain, sep, file = spec.partition("=")
        if not sep:
            domain, file = Path(spec).stem, spec
        try:
            texts[domain] = Path(file).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise MobileMoEError(f"--routing {spec}: cannot read {file} ({e.strerror})") from e
    return texts


def print_routing(result: dict, top1: bool) -> None:
    """Usage per layer per domain as percentages, then the specialisation per layer."""
    out = console()
    what = "first choices (top-1)" if top1 else "routing slots (top-k)"
    tokens = ", ".join(f"{d} {n}" for d, n in result["tokens"].items())
    out.print(f"expert usage: share of {what}; tokens: {tokens}", soft_wrap=True)
    domains = list(result["usage"])
    num_experts = next(iter(result["usage"].values())).shape[1]
    width = max(len(d) for d in domains) + 2
    for i, layer in enumerate(result["layers"]):
        out.print()
        header = Text(f"layer {layer}".ljust(width))
        for e in range(num_experts):
            header.append(f"{e:>5}", style=f"bold {COLOURS[e % len(COLOURS)]}")
        out.print(header)
        for d in domains:
            row = "".join(f"{100 * s:>4.0f}%" for s in result["usage"][d][i])
            out.print(Text(d.ljust(width) + row))
    if result["tv"]:
        out.print()
        out.print("specialisation: total-variation distance between domains "
                  "(0 = same experts, 1 = disjoint)", soft_wrap=True)
        for pair, tv in result["tv"].items():
            per_layer = "  ".join(f"L{layer} {v:.2f}" for layer, v in zip(result["layers"], tv,
                                                                            strict=True))
            out.print(f"  {pair}: {per_layer}", soft_wrap=True)


def routing_report(model: MoEModel, specs: list[str], top1: bool = False,
                   max_tokens: int | None = None) -> dict:
    return domain_usage(model, parse_routing_files(specs), top1=top1, max_tokens=max_tokens)


def stderr_say(text: str) -> None:
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()
