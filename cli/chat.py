"""`mobilemoe chat`: a read-eval-print loop over one conversation.

Each turn renders the whole conversation with the package's chat template
(`model.chat_prompt`) and generates from it; the model notices that the new prompt extends
what its KV cache holds and prefills only the new tokens. Works the same with a terminal or
a pipe on stdin (then the `> ` prompt is still printed, but nothing is echoed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from mobilemoe import MobileMoEError, MoEModel

from .format import one_line, print_stats, stream

PROMPT = "> "
HELP = "commands: /stats (cache statistics), /reset (new conversation), /exit (or Ctrl-D)"


def _enable_line_editing() -> None:
    """Arrow keys and history in `input()` on a terminal (readline is optional)."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401
        except ImportError:
            pass


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def chat_loop(model: MoEModel, generate_options: dict[str, Any],
              read: Callable[[str], str] = input, show_experts: bool = False) -> None:
    """Run the conversation until /exit, end of input, or Ctrl-C at the prompt."""
    _enable_line_editing()
    messages: list[dict[str, str]] = []
    _say(HELP)
    while True:
        try:
            line = read(PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / end of the pipe / Ctrl-C: quit
            _say()
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/stats":
            print_stats(model.stats)
            continue
        if command == "/reset":
            messages.clear()
            model.reset()
            _say("(conversation cleared)")
            continue
        if command.startswith("/"):
            _say(f"unknown command {command.split()[0]}; {HELP}")
            continue
        messages.append({"role": "user", "content": line})
        reply = _reply(model, messages, generate_options, show_experts)
        if reply is None:
            messages.pop()  # the turn failed: forget the question, keep the conversation
        else:
            messages.append({"role": "assistant", "content": reply})


def _reply(model: MoEModel, messages: list[dict[str, str]],
           generate_options: dict[str, Any], show_experts: bool = False) -> str | None:
    """Stream one reply; returns its text (partial if interrupted), or None on an error."""
    try:
        ids = model.chat_prompt(messages)
        tokens = model.generate(ids, **generate_options)
        if show_experts:
            from .experts import stream_experts

            text, _, interrupted = stream_experts(model, "(prompt)", tokens)
        else:
            text, _, interrupted = stream(tokens)
    except MobileMoEError as e:  # e.g. the context is full: the user can /reset and go on
        _say()
        sys.stderr.write(f"error: {one_line(str(e))} (/reset starts a new conversation)\n")
        sys.stderr.flush()
        return None
    _say(" [interrupted]" if interrupted else "")
    return text
