"""What ONNX Runtime's Python `session.run` adds per call, against `ort_sessions.SessionRunner`.

    chrt -r 1 .venv/bin/python benchmarks/run_overhead.py            # OLMoE-1B-7B's expert
    chrt -r 1 .venv/bin/python benchmarks/run_overhead.py 4096 14336  # Mixtral-8x7B's

One int4 expert (block 64, accuracy level 4, random weights) run at one token (M=1), the two
ways alternating call by call; medians of the times and of the per-pair differences.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from mobilemoe.export.model_graphs import expert_template_graph, expert_tensor_shapes

from mobilemoe.ort_sessions import SessionRunner, create_session_with_weights, use_threads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hidden", type=int, nargs="?", default=2048)
    parser.add_argument("intermediate", type=int, nargs="?", default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    template = expert_template_graph(args.hidden, args.intermediate, 4, 64, 4).SerializeToString()
    rng = np.random.default_rng(0)
    weights = {n: rng.integers(0, 256, s, dtype=np.uint8) if d == np.uint8 else
               rng.random(s, dtype=np.float32) * 0.01
               for n, (d, s) in expert_tensor_shapes(args.hidden, args.intermediate, 4, 64).items()}
    session = create_session_with_weights(template, list(weights), list(weights.values()))
    runner = SessionRunner(session)
    feeds = {"x": rng.standard_normal((1, args.hidden)).astype(np.float32)}
    wrapped, direct = [], []
    for _ in range(args.calls):
        start = time.perf_counter()
        session.run(None, feeds)
        wrapped.append(time.perf_counter() - start)
        start = time.perf_counter()
        runner(feeds)
        direct.append(time.perf_counter() - start)
    saved = statistics.median(w - d for w, d in zip(wrapped, direct, strict=True))
    print(f"expert {args.hidden}x{args.intermediate}, {args.threads} threads: session.run "
          f"{statistics.median(wrapped) * 1e6:.1f} us, SessionRunner "
          f"{statistics.median(direct) * 1e6:.1f} us, {saved * 1e6:.1f} us saved per call")


if __name__ == "__main__":
    main()
