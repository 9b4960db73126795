"""Does an ORT-format expert template keep ONNX Runtime's prepacked fast path? (docs/MOBILE.md)

    .venv/bin/python benchmarks/ort_template_timing.py 2048 1024     # OLMoE-1B-7B's expert
    .venv/bin/python benchmarks/ort_template_timing.py 4096 14336    # Mixtral-8x7B's expert

One int4 SwiGLU expert (block 32, accuracy level 4) with random weights, four experts cycled:
session build and one run at one token (M=1), medians, for
- the package's template (ONNX, weights external) + add_external_initializers (desktop runtime)
- the bundle's template (ORT format, zero placeholders) + add_initializer (mobile bundles)
- the same, with the template bytes used in place (session.use_ort_model_bytes_directly and
  session.use_ort_model_bytes_for_initializers, what an app sets on a mapped .ort)
- the weights fed as graph inputs (nothing prepacked)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mobilemoe.export.model_graphs import expert_template_graph, expert_tensor_shapes
from mobilemoe.export.ort_format import convert_to_ort, weights_as_inputs

from mobilemoe.ort_sessions import (
    create_session,
    create_session_with_weights,
    session_options,
    use_threads,
)

IN_PLACE = {"session.use_ort_model_bytes_directly": "1",
            "session.use_ort_model_bytes_for_initializers": "1"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hidden", type=int)
    parser.add_argument("intermediate", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    model = expert_template_graph(args.hidden, args.intermediate, 4, 32, 4)
    shapes = expert_tensor_shapes(args.hidden, args.intermediate, 4, 32)
    rng = np.random.default_rng(0)
    experts = [{n: rng.integers(0, 256, s, dtype=np.uint8) if d == np.uint8 else
                rng.random(s, dtype=np.float32) * 0.01 for n, (d, s) in shapes.items()}
               for _ in range(4)]
    onnx_template = model.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        convert_to_ort(onnx_template, Path(tmp) / "t.ort")
        ort_template = (Path(tmp) / "t.ort").read_bytes()
    as_inputs = weights_as_inputs(model)
    x = rng.standard_normal((1, args.hidden)).astype(np.float32)

    def in_place(w):
        so = session_options()
        values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in w.items()}
        for n, v in values.items():
            so.add_initializer(n, v)
        for k, v in IN_PLACE.items():
            so.add_session_config_entry(k, v)
        session = create_session(ort_template, so)
        session._keep = (w, values)
        return session

    ways = {
        "ONNX template + add_external_initializers":
            lambda w: create_session_with_weights(onnx_template, list(w), list(w.values())),
        "ORT template + add_initializer":
            lambda w: create_session_with_weights(ort_template, list(w), list(w.values())),
        "ORT template + add_initializer, bytes in place": in_place,
        "weights fed as graph inputs": lambda w: create_session(as_inputs.SerializeToString()),
    }
    mb = sum(a.nbytes for a in experts[0].values()) / 1e6
    print(f"expert {args.hidden}x{args.intermediate} int4: {mb:.1f} MB, "
          f".ort template {len(ort_template) / 1e6:.1f} MB, {args.threads} threads")
    for name, build in ways.items():
        builds, sessions = [], []
        for w in experts:
            start = time.perf_counter()
            sessions.append(build(w))
            builds.append(time.perf_counter() - start)
        inputs = name.startswith("weights fed")
        feeds = [{"x": x, **w} if inputs else {"x": x} for w in experts]
        for s, f in zip(sessions, feeds, strict=True):
            s.run(None, f)
        runs = []
        for _ in range(2 if inputs else args.runs):
            for s, f in zip(sessions, feeds, strict=True):
                start = time.perf_counter()
                s.run(None, f)
                runs.append(time.perf_counter() - start)
        print(f"  {name}: build {statistics.median(builds) * 1e3:.1f} ms, "
              f"run {statistics.median(runs) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
