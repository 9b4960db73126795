"""Prefill and decode tokens/s of a GGUF file with llama.cpp (llama-cpp-python), as JSON.

    .venv-bench/bin/python benchmarks/llama_bench.py /work/bench-data/olmoe-q4_0.gguf --threads 2

The peer's half of `compare.py`, run in its own process in `.venv-bench` (so its peak RSS is
its own). It does what `mobilemoe bench` does: per repeat, clear the KV cache, prefill a fresh
random prompt from the same seeded generator, decode greedily; median tokens/s over the
recorded repeats after `--warmup` unrecorded ones. Weights are memory-mapped (llama.cpp's
default), so file pages it touches count in its RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import gguf
import numpy as np
import psutil
from llama_cpp import Llama


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def weight_bytes_per_token(path: str) -> tuple[int, int]:
    """(bytes one decode step reads, file bytes): every dense tensor, top-k/E of each expert
    tensor, one embedding row."""
    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}

    def value(key: str) -> int:
        return int(fields[key].parts[fields[key].data[0]][0])

    experts, used = value("llama.expert_count"), value("llama.expert_used_count")
    vocab = value("llama.vocab_size")
    touched = 0
    for t in reader.tensors:
        if "_exps" in t.name:
            touched += int(t.n_bytes) * used // experts
        elif t.name == "token_embd.weight":
            touched += int(t.n_bytes) // vocab
        else:
            touched += int(t.n_bytes)
    return touched, sum(int(t.n_bytes) for t in reader.tensors)


def greedy(llm: Llama, vocab: int) -> int:
    """argmax of the last evaluated token's logits (llama-cpp-python keeps them in the
    context only: `scores` is filled with logits_all=True, which would cost every row)."""
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
    return int(np.argmax(logits))


def no_extra_buffers() -> None:
    """llama.cpp's `--no-repack` (model param use_extra_bufts = false), which llama-cpp-python's
    Llama() does not take: patch the default model params it starts from."""
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params


def run(path: str, prompt_tokens: int, new_tokens: int, repeats: int, warmup: int, threads: int,
        seed: int) -> dict:
    load_before = os.getloadavg()[0]
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    batch = min(prompt_tokens, 512)
    llm = Llama(model_path=path, n_ctx=prompt_tokens + new_tokens + 8, n_batch=batch,
                n_ubatch=batch, n_threads=threads, n_threads_batch=threads, use_mmap=True,
                logits_all=False, verbose=False)
    load_seconds = time.perf_counter() - start
    vocab = llm.n_vocab()
    rng = np.random.default_rng(seed)
    prefill, decode = [], []
    for repeat in range(warmup + repeats):
        ids = rng.integers(0, vocab, prompt_tokens).tolist()
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([greedy(llm, vocab)])
        t2 = time.perf_counter()
        if repeat >= warmup:
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
    touched, file_bytes = weight_bytes_per_token(path)
    return {
        "engine": "llama.cpp", "gguf": path, "threads": threads,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
        "warmup": warmup, "load_seconds": load_seconds,
        "prefill_tokens_per_s": statistics.median(prompt_tokens / s for s in prefill),
        "decode_tokens_per_s": (statistics.median(new_tokens / s for s in decode)
                                if new_tokens else None),
        "prefill_seconds": prefill, "decode_seconds": decode,
        "weight_bytes_per_token": touched, "file_bytes": file_bytes,
        "baseline_rss": baseline, "peak_rss": vm_hwm(),
        "load_average": (load_before, os.getloadavg()[0]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-repack", action="store_true",
                        help="use the mapped Q4_0 weights as they are (llama.cpp's --no-repack): "
                             "its repacked copy for the AVX-512 kernels needs RAM for every weight")
    args = parser.parse_args(argv)
    if args.no_repack:
        no_extra_buffers()
    print(json.dumps(run(args.gguf, args.prompt_tokens, args.new_tokens, args.repeats,
                         args.warmup, args.threads, args.seed), indent=2))


if __name__ == "__main__":
    main()
