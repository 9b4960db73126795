"""KV cache memory and decode speed of DeepSeek's multi-head latent attention, on a checkpoint
with DeepSeek-V2-Lite's attention dimensions (hidden 2048, 16 heads, kv_lora_rank 512, rope 64
/ nope 128 / v 128, YaRN x40) and 2 layers of 8 small experts (the experts do not matter here).

    chrt -r 1 .venv/bin/python benchmarks/mla_cache.py --work /tmp/mla --rounds 2

Builds the checkpoint with transformers (random weights, float32, ~0.7 GB), exports it twice
(`--mla-cache latent` and `expanded`), then in alternating rounds, each form in a fresh
process: per context length, prefills that many tokens and times greedy decode steps.
Reports decode tokens/s (median step), the planner's KV cache bytes and dense bytes, and the
peak RSS above the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mobilemoe.export import export_model
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

import mobilemoe

V2_LITE_ATTENTION = dict(
    hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    max_position_embeddings=163840, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
)


def build(folder: Path) -> None:
    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    config = DeepseekV2Config(**V2_LITE_ATTENTION, num_hidden_layers=2, vocab_size=4096,
                              intermediate_size=2816, moe_intermediate_size=704,
                              n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                              first_k_dense_replace=0, topk_method="greedy", n_group=1,
                              topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    DeepseekV2ForCausalLM(config).save_pretrained(folder)


def measure(package: Path, args: argparse.Namespace) -> dict:
    model = mobilemoe.load(package, threads=args.threads, context_length=args.context_length)
    rng = np.random.default_rng(0)
    result = {"kv_cache_bytes": model.stats.kv_cache_bytes, "dense_bytes": model.stats.dense_bytes,
              "context_length": args.context_length, "decode": {}}
    for context in (int(c) for c in args.contexts.split(",")):
        model.logits(rng.integers(0, 4096, context).tolist())  # prefill (resets the cache)
        steps = []
        token = 1
        for _ in range(args.new_tokens):
            start = time.perf_counter()
            token = int(np.argmax(model._forward([token], "last")[-1]))
            steps.append(time.perf_counter() - start)
        result["decode"][context] = 1 / statistics.median(steps)
    stats = model.stats
    result["peak_rss_above_baseline"] = stats.peak_rss - stats.baseline_rss
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="checkpoint and packages here")
    parser.add_argument("--contexts", default="64,2048")
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    build(args.work / "checkpoint")
    forms = ("latent", "expanded")
    for form in forms:
        export_model(args.work / "checkpoint", args.work / f"{form}.mmoe", mla_cache=form,
                     overwrite=True, progress=False)
    child = [sys.executable, __file__, "--work", str(args.work), "--contexts", args.contexts,
             "--context-length", str(args.context_length), "--new-tokens", str(args.new_tokens),
             "--threads", str(args.threads)]
    print("round form      KV cache MB  dense MB  peak-baseline MB  "
          + "  ".join(f"decode@{c}" for c in args.contexts.split(",")))
    for round_ in range(args.rounds):
        for form in forms if round_ % 2 == 0 else forms[::-1]:
            out = subprocess.run([*child, "--measure", str(args.work / f"{form}.mmoe")],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.splitlines()[-1])
            print(f"{round_:5d} {form:9s} {r['kv_cache_bytes'] / 1e6:11.1f} "
                  f"{r['dense_bytes'] / 1e6:9.1f} {r['peak_rss_above_baseline'] / 1e6:17.1f}  "
                  + "  ".join(f"{v:9.1f}" for v in r["decode"].values()), flush=True)


if __name__ == "__main__":
    main()
