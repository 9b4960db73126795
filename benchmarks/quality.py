"""Quality of the shipped demo model through mobilemoe against transformers float32.

    python benchmarks/quality.py [--windows 8]

For each domain (tools/heldout/prose.txt, code.txt) the held-out text is tokenised (no
special tokens) and cut into `--windows` consecutive windows of 256 tokens (the training
context); each window is one fresh forward pass. Reference: transformers
`MixtralForCausalLM` in float32. Candidates: the checkpoint exported with int8 and with int4
experts at block sizes 32, 64 and 128 (dense graphs int8 at the same block size, accuracy
level 4 as `mobilemoe export` defaults), run by `model.logits`, and again with fused
experts (`fused_experts=True`) where the widths allow it. Reported per domain:

    ppl        exp(mean next-token NLL) over the 255 predicted positions of each window
    top-1      share of positions where the argmax token equals float32's
    KL         mean KL(p_float32 || p_mobilemoe) per position, in nats
"""

from __future__ import annotations

import argparse
import importlib.resources
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mobilemoe

ROOT = Path(__file__).parents[1]
DOMAINS = {"prose": ROOT / "tools/heldout/prose.txt", "code": ROOT / "tools/heldout/code.txt"}
WINDOW = 256
CONFIGS = [(bits, block) for bits in (8, 4) for block in (32, 64, 128)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def windows(checkpoint: Path, count: int) -> dict[str, list[list[int]]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    out = {}
    for domain, path in DOMAINS.items():
        ids = tok.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids
        if len(ids) < count * WINDOW:
            sys.exit(f"{path}: {len(ids)} tokens, fewer than {count} windows of {WINDOW}")
        out[domain] = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(count)]
    return out


def reference_logits(checkpoint: Path, data: dict) -> tuple[dict[str, list[np.ndarray]], int]:
    """(float32 logits per domain per window, parameter count)"""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = {d: [model(torch.tensor([w])).logits[0].numpy() for w in ws]
                  for d, ws in data.items()}
    return logits, sum(p.numel() for p in model.parameters())


def scores(logits: list[np.ndarray], data: list[list[int]],
           reference: list[np.ndarray] | None) -> dict[str, float]:
    nll, agree, kl, n = 0.0, 0, 0.0, 0
    for i, ids in enumerate(data):
        lp = log_softmax(logits[i][:-1])  # [T-1, V]: position t predicts token t+1
        nll -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
        if reference is not None:
            ref = log_softmax(reference[i][:-1])
            agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
            kl += float((np.exp(ref) * (ref - lp)).sum())
    out = {"ppl": float(np.exp(nll / n)), "positions": n}
    if reference is not None:
        out |= {"top1": agree / n, "kl": kl / n}
    return out


def window_arguments(description: str) -> argparse.Namespace:
    """--windows and --threads, as this script and prefetch_accuracy.py take them; torch (a
    dev dependency, imported here) is set to the thread count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--windows", type=int, default=8, help="windows of 256 tokens per domain")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = window_arguments(__doc__.split("\n")[0])
    import torch
    from mobilemoe.export import export_model

    start = time.perf_counter()
    with importlib.resources.as_file(importlib.resources.files("mobilemoe") / "demo_model"
                                     ) as checkpoint:
        data = windows(checkpoint, args.windows)
        reference, params = reference_logits(checkpoint, data)
        rows = [("transformers float32", "-", {d: scores(reference[d], data[d], None)
                                               for d in data}, 4 * params)]
        with tempfile.TemporaryDirectory() as tmp:
            for bits, block in CONFIGS:
                package = export_model(checkpoint, Path(tmp) / f"q{bits}-{block}.mmoe",
                                       bits=bits, dense_bits=8, block_size=block,
                                       progress=False)
                size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
                for fused in (False, True):
                    try:
                        m = mobilemoe.load(package, threads=args.threads, context_length=WINDOW,
                                           fused_experts=fused)
                    except mobilemoe.MobileMoEError:  # fused: widths off the block size
                        continue
                    with m:
                        result = {d: scores([m.logits(w) for w in ws], ws, reference[d])
                                  for d, ws in data.items()}
                    rows.append((f"mobilemoe int{bits} experts, int8 dense"
                                 + (", fused experts" if fused else ""), f"{block}", result, size))
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"threads {args.threads}; python {platform.python_version()}, "
          f"torch {torch.__version__}, mobilemoe {mobilemoe.__version__}")
    print(f"{args.windows} windows x {WINDOW} tokens per domain "
          f"({args.windows * (WINDOW - 1)} predicted positions); "
          f"{time.perf_counter() - start:.0f} s\n")
    domains = list(DOMAINS)
    head = ["model", "block", "weights on disk"] + [f"{d} {c}" for d in domains
                                            for c in ("ppl", "top-1", "KL")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        name, block, result, size = row
        cells = [name, block, f"{size / 1e6:.1f} MB"]
        for d in domains:
            r = result[d]
            cells += [f"{r['ppl']:.3f}",
                      f"{r['top1']:.1%}" if "top1" in r else "-",
                      f"{r['kl']:.4f}" if "kl" in r else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
