"""Routing traces of the shipped demo model on held-out text, for the cache-policy simulator.

    python benchmarks/routing_traces.py [--tokens 1024] [--out benchmarks/traces]

writes demo-heldout-prose.json and demo-heldout-code.json:

    {"model": ..., "source": "tools/heldout/prose.txt", "window": 256, "num_layers": 4,
     "num_experts": 8, "top_k": 2, "layers": [0, 1, 2, 3], "token_ids": [N],
     "experts": [N][L][k]}       # experts[t][l]: token t's experts in MoE layer l, first choice first

The text is run in fresh windows of `window` tokens (the model's training context), the way
`model.logits` runs a prompt: one prefill per window. The package is the int4 demo export
(`mobilemoe run` with no model), so these are the routes the runtime really takes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mobilemoe.cli.demo import demo_context, demo_package

import mobilemoe
from mobilemoe.manifest import Manifest
from mobilemoe.routing_usage import routed_experts

ROOT = Path(__file__).parents[1]
DOMAINS = {"prose": ROOT / "tools/heldout/prose.txt", "code": ROOT / "tools/heldout/code.txt"}


def trace_file(model: mobilemoe.MoEModel, source: Path, tokens: int) -> dict:
    ids = model.encode(source.read_text(encoding="utf-8"))[:tokens]
    layers, experts = routed_experts(model, ids)  # [N, L, k]
    d = model.dims
    return {"model": "mobilemoe/demo_model (int4 experts, int8 dense, block 32)",
            "source": str(source.relative_to(ROOT)), "window": model.context_length,
            "num_layers": d.num_layers, "num_experts": d.num_experts, "top_k": d.top_k,
            "layers": layers, "token_ids": ids, "experts": experts.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per domain")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/traces")
    args = parser.parse_args()
    package = demo_package(say=lambda text: None)
    context = demo_context(Manifest.load(package).dims.max_position_embeddings)
    args.out.mkdir(parents=True, exist_ok=True)
    with mobilemoe.load(package, context_length=context) as model:
        for domain, source in DOMAINS.items():
            path = args.out / f"demo-heldout-{domain}.json"
            trace = trace_file(model, source, args.tokens)
            # one token per line: readable in a diff, still small
            body = ",\n".join(json.dumps(e, separators=(",", ":")) for e in trace.pop("experts"))
            head = json.dumps(trace, separators=(",", ":"))[:-1]
            path.write_text(f'{head},"experts":[\n{body}\n]}}\n')
            json.loads(path.read_text())  # well-formed
            print(f"{path}: {len(trace['token_ids'])} tokens, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
