"""Two checkouts of mobilemoe decoding the same package, in alternating pairs: the median of
the per-pair decode ratios, and each side's median time split per token.

    git worktree add /tmp/before <commit>
    (cd /tmp/before && "$OLDPWD/.venv/bin/python" setup.py build_ext --inplace)  # its kernel
    chrt -r 1 .venv/bin/python benchmarks/ab_checkouts.py /tmp/before . PKG --pairs 8

Each run is `mobilemoe.bench.run_bench` in a fresh process with that checkout first on the
path: all experts resident (the budget of `--expert-fraction 1`), a prompt of 256 random ids,
32 greedy tokens, the median of 3 repeats after 1 warm-up. The order alternates pair by pair,
as a shared machine drifts; a ratio above 1 means the second checkout decodes faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RUN = """
import json, sys
from mobilemoe.bench import budget_for_fraction, plan_in_subprocess, run_bench
package, prompt, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
budget = budget_for_fraction(plan_in_subprocess(package, 2, prompt + new + 1), 1.0)
result = run_bench(package, memory_budget=budget, prompt_tokens=prompt, new_tokens=new,
                   repeats=3, warmup=1, threads=2)
print(json.dumps(result.as_dict()))
"""


def decode(checkout: Path, package: str, prompt: int, new: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", RUN, package, str(prompt), str(new)],
                          cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)["decode"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path, help="checkout A (its native kernel built in place)")
    p.add_argument("second", type=Path, help="checkout B")
    p.add_argument("package")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    sides = {"A": a.first.resolve(), "B": a.second.resolve()}
    splits: dict[str, list[dict]] = {"A": [], "B": []}
    ratios = []
    for pair in range(a.pairs):
        speed = {}
        for side in ("A", "B") if pair % 2 == 0 else ("B", "A"):
            result = decode(sides[side], a.package, a.prompt_tokens, a.new_tokens)
            speed[side] = result["tokens_per_s"]
            splits[side].append(result["split_ms_per_token"])
        ratios.append(speed["B"] / speed["A"])
        print(f"pair {pair + 1}: A {speed['A']:.2f}, B {speed['B']:.2f} tok/s, B/A {ratios[-1]:.3f}",
              flush=True)
    print(f"B/A decode: median {statistics.median(ratios):.3f} (range {min(ratios):.3f}-"
          f"{max(ratios):.3f}, {a.pairs} pairs)")
    for side, rows in splits.items():
        median = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
        print(f"{side} ({sides[side]}) ms per token, medians: {median}")


if __name__ == "__main__":
    main()
