"""Plots for docs/PERFORMANCE.md from `compare.py --json-out` results.

    .venv-bench/bin/python benchmarks/plot.py --sweep /work/bench-data/B-olmoe-sweep.json \
        --head-to-head /work/bench-data/A-olmoe-2t.json --out docs

Writes `perf_budget.png` (decode and prefill tokens/s and the decode hit rate against the
share of experts the budget holds) and `perf_split.png` (where a decode token's time goes at
each budget, with llama.cpp's total for reference). Needs matplotlib (in .venv-bench).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PARTS = (("dense", "dense graphs"), ("experts", "expert compute"), ("paging", "paging"),
         ("other", "Python between sessions"))


def _runs(result: dict) -> list[dict]:
    return sorted((x for x in result["mobilemoe"] if "error" not in x),
                  key=lambda x: -x["expert_fraction"])


def plot_budget(sweep: dict, out: Path, prefix: str = "perf_") -> Path:
    runs = _runs(sweep)
    pct = [100 * x["expert_fraction"] for x in runs]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(pct, [x["decode"]["tokens_per_s"] for x in runs], "o-", label="decode tok/s")
    left.plot(pct, [x["prefill"]["tokens_per_s"] for x in runs], "s-",
              label=f"prefill tok/s ({runs[0]['prompt_tokens']} tokens)")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xticks(pct, [f"{p:g}%" for p in pct])
    left.set_xlabel("experts the budget holds (share of all experts, after prepacking)")
    left.set_ylabel("tokens/s (median)")
    right = left.twinx()
    right.plot(pct, [100 * x["decode"]["hit_rate"] for x in runs], "^--", color="grey",
               label="decode hit rate")
    right.set_ylabel("decode hit rate (%)")
    right.set_ylim(-5, 105)
    lines = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    left.set_title(f"mobilemoe, {sweep['shape']} shape, int{sweep['bits']}, "
                   f"{sweep['threads']} threads")
    fig.tight_layout()
    path = out / f"{prefix}budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_split(sweep: dict, head_to_head: dict | None, out: Path, prefix: str = "perf_"
               ) -> Path:
    """Share of a decode token's time per part at each budget, the total above each bar."""
    runs = _runs(sweep)
    labels = [f"{100 * x['expert_fraction']:g}%" for x in runs]
    totals = [x["decode"]["split_ms_per_token"]["total"] for x in runs]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    bottom = [0.0] * len(runs)
    for key, name in PARTS:
        shares = [100 * (x["decode"]["split_ms_per_token"][key] or 0.0) / t
                  for x, t in zip(runs, totals, strict=True)]
        ax.bar(labels, shares, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, shares, strict=True)]
    for i, total in enumerate(totals):
        ax.text(i, 101, f"{total:.0f} ms", ha="center", va="bottom", fontsize=9)
    title = "Where a decode token's time goes (mobilemoe)"
    llama = (head_to_head or {}).get("llama", {})
    if llama.get("decode_tokens_per_s"):
        title += f"; llama.cpp all resident: {1000 / llama['decode_tokens_per_s']:.0f} ms"
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 112)
    ax.set_ylabel("share of the token's time (%)")
    ax.set_xlabel("experts the budget holds")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = out / f"{prefix}split.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", type=Path, required=True, help="compare.py JSON with fractions")
    p.add_argument("--head-to-head", type=Path, help="compare.py JSON with a llama.cpp run")
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--prefix", default="perf_", help="file names: PREFIXbudget.png, PREFIXsplit.png")
    a = p.parse_args(argv)
    sweep = json.loads(a.sweep.read_text())
    head = json.loads(a.head_to_head.read_text()) if a.head_to_head else None
    for path in (plot_budget(sweep, a.out, a.prefix), plot_split(sweep, head, a.out, a.prefix)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
