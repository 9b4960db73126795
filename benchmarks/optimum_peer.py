"""The route a Hugging Face user takes today (optimum-onnx + ONNX Runtime) next to mobilemoe.

    make bench-optimum-env      # .venv-optimum: optimum-onnx needs transformers < 4.58
    chrt -r 1 .venv/bin/python benchmarks/optimum_peer.py --layers 2 --repeats 5 \
        --json-out /work/bench-data/optimum/result.json

One Qwen3-MoE checkpoint with random weights (Qwen3-30B-A3B's layer dimensions, fewer layers,
a smaller vocabulary; bf16 safetensors, as the real checkpoint ships) is
1. exported by optimum-onnx (`optimum-cli export onnx --task text-generation-with-past`, fp32)
   and quantized to int4 by ONNX Runtime's own `matmul_nbits_quantizer` (block 32, symmetric,
   accuracy level 4; it takes every MatMul with a constant weight, router and LM head included);
2. exported by mobilemoe (`mobilemoe export`: int4 and int8 experts, int8 dense, same block);
3. checked on one fixed prompt of token ids: greedy tokens and the prompt's logits of each
   engine against transformers float32, and (the tight pair) mobilemoe int8 computing in
   float32 against transformers run with the int8-rounded weights that package holds;
4. measured, one engine after the other in fresh processes: prefill and decode tokens/s
   (median of the recorded repeats), baseline and peak RSS (VmHWM). The optimum graphs run in
   a plain ONNX Runtime greedy loop (`_ort_bench` below, in .venv-optimum), mobilemoe with
   `mobilemoe bench --json`: same threads, random prompt length and new tokens.

Exports and checks run at normal priority even when this script runs under `chrt -r 1`;
only the measuring processes keep the real-time policy (see docs/PERFORMANCE.md for why the
shared machine needs it). Files go to --data (outside the repository); the checkpoint and
optimum's models are reused, mobilemoe's packages re-exported every run. Results: docs/OPTIMUM_PEER.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAIN_PY = ROOT / ".venv" / "bin" / "python"
MOBILEMOE = ROOT / ".venv" / "bin" / "mobilemoe"
OPT_BIN = ROOT / ".venv-optimum" / "bin"
OPT_PY = OPT_BIN / "python"

# Qwen3-30B-A3B's config.json, less depth (--layers) and vocabulary (--vocab).
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
                     rope_theta=1_000_000.0, max_position_embeddings=40960,
                     tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
AGREE_PROMPT = 32  # fixed prompt length of the agreement check
AGREE_SEED = 1234


# -- helpers shared by both environments ------------------------------------------------------


def proc_status(key: str) -> int:
    """A memory line of /proc/self/status in bytes: VmRSS now, VmHWM the peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def agree_prompt(vocab: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(AGREE_SEED).integers(0, vocab, AGREE_PROMPT).tolist()


# -- workers in .venv-optimum -----------------------------------------------------------------


def _checkpoint(a: argparse.Namespace) -> None:
    """A random-weight Qwen3-MoE checkpoint, bf16 safetensors (transformers 4.x expert layout)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=a.vocab, num_hidden_layers=a.layers, **QWEN3_30B_A3B)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: 2 bytes a weight, no fp32 copy
    model = Qwen3MoeForCausalLM(config).eval()
    model.save_pretrained(a.out, safe_serialization=True, max_shard_size="2GB")


class OrtDecoder:
    """optimum's `model.onnx` with its KV cache fed back by hand: input_ids, attention_mask,
    position_ids, past_key_values.{i}.key/value [1, kv_heads, past, head_dim] -> logits
    [1, T, vocab], present.{i}.key/value."""

    def __init__(self, session):
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()}
        self.past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        import numpy as np

        self.length = 0
        self.cache = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past}

    def forward(self, ids: list[int]):
        import numpy as np

        t = len(ids)
        feeds = {"input_ids": np.array([ids], np.int64),
                 "attention_mask": np.ones((1, self.length + t), np.int64),
                 "position_ids": np.arange(self.length, self.length + t, dtype=np.int64)[None],
                 **self.cache}
        out = dict(zip(self.outputs, self.session.run(None, {k: v for k, v in feeds.items()
                                                              if k in self.inputs}), strict=True))
        self.cache = {name.replace("present.", "past_key_values."): v
                      for name, v in out.items() if name.startswith("present.")}
        self.length += t
        return out["logits"][0]  # [T, vocab]


def _session(model: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()  # ONNX Runtime's defaults, as optimum's ORTModel uses them
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def _ort_bench(a: argparse.Namespace) -> None:
    """Prefill + greedy decode of fresh random prompts, like `mobilemoe bench`: JSON."""
    import numpy as np
    import onnxruntime  # noqa: F401  (part of the baseline, as in mobilemoe's)

    load_before = os.getloadavg()[0]
    baseline = proc_status("VmRSS")  # interpreter, numpy, onnxruntime imported; no session yet
    # Loading the fp32 graph takes up to a minute: not at a real-time priority from `chrt`.
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    _normal_priority()
    start = time.perf_counter()
    decoder = OrtDecoder(_session(a.model, a.threads))
    load_seconds, loaded_rss = time.perf_counter() - start, proc_status("VmRSS")
    for task in os.listdir("/proc/self/task"):  # ORT's pool threads were started meanwhile
        os.sched_setscheduler(int(task), policy, param)
    vocab = json.loads((a.model.parent / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(a.seed)
    prefill, decode = [], []
    for repeat in range(a.warmup + a.repeats):
        ids = rng.integers(0, vocab, a.prompt_tokens).tolist()
        decoder.reset()
        t0 = time.perf_counter()
        token = int(np.argmax(decoder.forward(ids)[-1]))
        t1 = time.perf_counter()
        for _ in range(a.new_tokens):
            token = int(np.argmax(decoder.forward([token])[-1]))
        t2 = time.perf_counter()
        if repeat >= a.warmup:
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
    print(json.dumps({
        "model": str(a.model), "threads": a.threads, "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens, "repeats": a.repeats, "warmup": a.warmup,
        "load_seconds": load_seconds, "prefill_seconds": prefill, "decode_seconds": decode,
        "prefill_tokens_per_s": statistics.median(a.prompt_tokens / s for s in prefill),
        "decode_tokens_per_s": (statistics.median(a.new_tokens / s for s in decode)
                                if a.new_tokens else None),
        "baseline_rss": baseline, "loaded_rss": loaded_rss, "peak_rss": proc_status("VmHWM"),
        "load_average": [load_before, os.getloadavg()[0]]}))


def _ort_tokens(a: argparse.Namespace) -> None:
    import numpy as np

    decoder = OrtDecoder(_session(a.model, a.threads))
    ids = agree_prompt(json.loads((a.model.parent / "config.json").read_text())["vocab_size"])
    logits = decoder.forward(ids)
    np.save(a.logits_out, logits)
    tokens = [int(np.argmax(logits[-1]))]
    while len(tokens) < a.n:
        tokens.append(int(np.argmax(decoder.forward([tokens[-1]])[-1])))
    print(json.dumps({"prompt": ids, "greedy": tokens}))


def _hf_tokens(a: argparse.Namespace) -> None:
    """The reference: transformers float32 (greedy by hand, to avoid generate()'s defaults).

    --qdq-bits B: first round the weights as a mobilemoe package at `--bits B` stores them
    (export/quantize.py): experts B-bit and attention / LM head 8-bit, blockwise symmetric
    along the input dimension; the embedding per row, int8; the router left in float32.
    """
    import numpy as np
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.set_num_threads(a.threads)
    model = Qwen3MoeForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    if a.qdq_bits:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding):
                _round_blocks(module.weight.data, 8, module.weight.shape[1])
            elif isinstance(module, torch.nn.Linear) and not name.endswith("mlp.gate"):
                _round_blocks(module.weight.data, a.qdq_bits if ".experts." in name else 8, a.block_size)
    ids = agree_prompt(model.config.vocab_size)
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        np.save(a.logits_out, out.logits[0].numpy())
        tokens, past = [int(out.logits[0, -1].argmax())], out.past_key_values
        while len(tokens) < a.n:
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
            past = out.past_key_values
    print(json.dumps({"prompt": ids, "greedy": tokens}))


def _round_blocks(weight, bits: int, block: int) -> None:
    """In place: w [N, K] -> scale * clip(rint(w / scale)), scale = max|block| / qmax."""
    import torch

    n, k = weight.shape
    assert k % block == 0, (k, block)
    blocks = weight.view(n, k // block, block)  # [N, K_blocks, block]
    qmax = (1 << (bits - 1)) - 1
    scale = blocks.abs().amax(dim=-1, keepdim=True) / qmax
    scale[scale == 0] = 1.0
    blocks.copy_(torch.clamp(torch.round(blocks / scale), -qmax, qmax) * scale)


def _graph(a: argparse.Namespace) -> None:
    """What optimum's graph does with the experts: op counts, weight elements by dtype."""
    from collections import Counter

    import onnx

    model = onnx.load(str(a.model), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    sizes: Counter = Counter()
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        sizes[onnx.TensorProto.DataType.Name(t.data_type)] += n
    print(json.dumps({"nodes": sum(ops.values()), "ops": dict(ops.most_common()),
                      "initializer_elements": dict(sizes), "opset": model.opset_import[0].version}))


# -- worker in the main venv ------------------------------------------------------------------


def _mobilemoe_tokens(a: argparse.Namespace) -> None:
    import numpy as np

    import mobilemoe

    model = mobilemoe.load(a.model, threads=a.threads)
    ids = agree_prompt(model.dims.vocab_size)
    np.save(a.logits_out, model.logits(ids))
    tokens = [t.token_id for t in model.generate(ids, max_new_tokens=a.n, temperature=0.0)]
    print(json.dumps({"prompt": ids, "greedy": tokens}))


WORKERS = {"_checkpoint": _checkpoint, "_ort_bench": _ort_bench, "_ort_tokens": _ort_tokens,
           "_hf_tokens": _hf_tokens, "_graph": _graph, "_mobilemoe_tokens": _mobilemoe_tokens}


def worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog=f"optimum_peer.py {argv[0]}")
    p.add_argument("model", type=Path, nargs="?")
    for flag, kind, default in [("--out", Path, None), ("--layers", int, 2), ("--vocab", int, 32768),
                                ("--threads", int, 2), ("--prompt-tokens", int, 128),
                                ("--new-tokens", int, 32), ("--repeats", int, 3), ("--warmup", int, 1),
                                ("--seed", int, 0), ("--n", int, 10), ("--logits-out", Path, None),
                                ("--qdq-bits", int, 0), ("--block-size", int, 32)]:
        p.add_argument(flag, type=kind, default=default)
    WORKERS[argv[0]](p.parse_args(argv[1:]))


# -- the driver -------------------------------------------------------------------------------


def _normal_priority() -> None:
    """In a child: leave a real-time policy inherited from `chrt` (exports take minutes)."""
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def run_step(cmd: list, *, capture: bool = False, normal_priority: bool = True) -> dict:
    """Run `cmd`; its wall time, its own peak RSS (wait4's rusage) and, if captured, its stdout."""
    print("$", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE if capture else None,
                            text=True, preexec_fn=_normal_priority if normal_priority else None)
    out = proc.stdout.read() if capture else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    step = {"command": " ".join(str(c) for c in cmd), "seconds": time.perf_counter() - start,
            "peak_rss": usage.ru_maxrss * 1024, "returncode": proc.returncode}
    if proc.returncode != 0:
        step["error"] = f"exit code {proc.returncode}"
    elif capture:
        step["output"] = json.loads(out[out.index("{"):])
    return step


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def warm_page_cache(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(16 << 20):
                    pass


def files(d: Path, block: int) -> dict[str, Path]:
    """Where each model lives under the run's folder `d`."""
    return {"checkpoint": d / "checkpoint", "optimum fp32": d / "optimum-fp32",
            "optimum int4": d / f"optimum-int4-b{block}",
            "mobilemoe int4": d / f"mobilemoe-int4-b{block}.mmoe",
            "mobilemoe int8": d / f"mobilemoe-int8-b{block}.mmoe",
            "mobilemoe int8, accuracy level 1": d / f"mobilemoe-int8-acc1-b{block}.mmoe"}


def prepare(a: argparse.Namespace, f: dict[str, Path]) -> dict:
    """The checkpoint and optimum's models, made once (reused); mobilemoe's, made every run
    (20 s each, and then the numbers belong to this commit's exporter)."""
    steps: dict[str, dict] = {}
    ckpt, fp32, int4 = f["checkpoint"], f["optimum fp32"], f["optimum int4"]
    if not (ckpt / "config.json").exists():
        steps["checkpoint"] = run_step([OPT_PY, __file__, "_checkpoint", "--out", ckpt,
                                        "--layers", a.layers, "--vocab", a.vocab])
    if not (fp32 / "model.onnx").exists():
        steps["optimum export fp32"] = run_step([OPT_BIN / "optimum-cli", "export", "onnx", "-m", ckpt,
                                                 "--task", "text-generation-with-past",
                                                 "--dtype", "fp32", fp32])
    if (fp32 / "model.onnx").exists() and not (int4 / "model.onnx").exists():
        int4.mkdir(exist_ok=True)
        steps["optimum int4 (matmul_nbits_quantizer)"] = run_step(
            [OPT_PY, "-m", "onnxruntime.quantization.matmul_nbits_quantizer",
             "--input_model", fp32 / "model.onnx", "--output_model", int4 / "model.onnx",
             "--block_size", a.block_size, "--accuracy_level", 4, "--bits", 4])
        for name in ("config.json", "generation_config.json"):
            (int4 / name).write_bytes((fp32 / name).read_bytes())
    exports = {"mobilemoe int4": [4, 4], "mobilemoe int8": [8, 4]}
    if not a.skip_agreement:  # int8 computing in float32: for the tight agreement check only
        exports["mobilemoe int8, accuracy level 1"] = [8, 1]
    for name, (bits, level) in exports.items():
        steps[f"{name} export"] = run_step(
            [MOBILEMOE, "export", ckpt, "-o", f[name], "--bits", bits, "--accuracy-level", level,
             "--block-size", a.block_size, "--overwrite", "--no-progress"])
        if (f[name] / "manifest.json").exists():
            steps[f"{name} export"]["format_version"] = json.loads(
                (f[name] / "manifest.json").read_text()).get("format_version")
    return steps


def agreement(a: argparse.Namespace, f: dict[str, Path]) -> dict:
    """Greedy tokens and the prompt's logits of each engine against a transformers reference."""
    import numpy as np

    hf, ort_tokens = [OPT_PY, __file__, "_hf_tokens", f["checkpoint"]], [OPT_PY, __file__, "_ort_tokens"]
    # name: (command, reference). The tight pair: mobilemoe int8 computing in float32
    # (accuracy level 1) against transformers run with the very weights that package holds.
    runs = {"transformers fp32": (hf, None),
            "transformers, int8-rounded weights": (hf + ["--qdq-bits", 8], None),
            "optimum fp32": (ort_tokens + [f["optimum fp32"] / "model.onnx"], "transformers fp32"),
            "optimum int4": (ort_tokens + [f["optimum int4"] / "model.onnx"], "transformers fp32"),
            "mobilemoe int8, accuracy level 1": (None, "transformers, int8-rounded weights"),
            "mobilemoe int8": (None, "transformers fp32"),
            "mobilemoe int4": (None, "transformers fp32")}
    result = {}
    for name, (cmd, ref_name) in runs.items():
        cmd = cmd or [MAIN_PY, __file__, "_mobilemoe_tokens", f[name]]
        npy = f["checkpoint"].parent / f"logits-{name.replace(' ', '-').replace(',', '')}.npy"
        step = run_step([*cmd, "--threads", a.threads, "--n", a.agree_tokens, "--logits-out", npy,
                         "--block-size", a.block_size], capture=True)
        x = result[name] = step.get("output", {"error": step.get("error")})
        ref = result.get(ref_name or "", {})
        if "greedy" not in x:
            continue
        x["logits"] = str(npy)
        if "greedy" not in ref:
            continue
        z, r = np.load(npy), np.load(ref["logits"])  # [prompt, vocab]
        x.update(reference=ref_name,
                 greedy_matches_reference=sum(1 for _ in _common_prefix(x["greedy"], ref["greedy"])),
                 prompt_argmax_agreement=float(np.mean(z.argmax(-1) == r.argmax(-1))),
                 max_abs_logit_diff=float(np.abs(z - r).max()),
                 relative_rms_diff=float(np.sqrt(np.mean((z - r) ** 2) / np.mean(r**2))))
    if "logits" in result["transformers fp32"]:
        r = np.load(result["transformers fp32"]["logits"])
        top2 = np.sort(r, axis=-1)[:, -2:]
        result["reference_stats"] = {"logit_std": float(r.std()),
                                     "median_top1_top2_margin": float(np.median(top2[:, 1] - top2[:, 0]))}
    return result


def _common_prefix(a: list, b: list):
    for x, y in zip(a, b, strict=False):
        if x != y:
            return
        yield x


def measure(a: argparse.Namespace, f: dict[str, Path]) -> dict:
    shared = ["--threads", a.threads, "--prompt-tokens", a.prompt_tokens, "--new-tokens", a.new_tokens,
              "--repeats", a.repeats, "--warmup", a.warmup]
    runs = {("optimum-onnx + ORT", bits): (f[f"optimum {bits}"], [OPT_PY, __file__, "_ort_bench",
                                                                  f[f"optimum {bits}"] / "model.onnx"])
            for bits in ("fp32", "int4")}
    runs.update({("mobilemoe", bits): (f[f"mobilemoe {bits}"], [MOBILEMOE, "bench", f[f"mobilemoe {bits}"],
                                                                "--json"])
                 for bits in ("int4", "int8")})
    rows = []
    for (engine, bits), (path, cmd) in runs.items():
        warm_page_cache(path)  # every engine starts from the page cache
        step = run_step([*cmd, *shared], capture=True, normal_priority=False)
        row = {"engine": engine, "bits": bits, "path": str(path), "disk_bytes": disk_bytes(path),
               "command": step["command"], "load_average_1min": os.getloadavg()[0]}
        out = step.get("output")
        if out is None:
            row["error"] = step.get("error")
        elif engine == "mobilemoe":
            row.update(prefill_tokens_per_s=out["prefill"]["tokens_per_s"],
                       decode_tokens_per_s=out["decode"]["tokens_per_s"],
                       baseline_rss=out["baseline_rss"], peak_rss=out["max_rss"], raw=out)
        else:
            row.update({k: out[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s",
                                            "baseline_rss", "peak_rss")}, raw=out)
        rows.append(row)
    return {"rows": rows}


def gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def report(r: dict) -> str:
    c = r["config"]
    out = [f"Qwen3-MoE, random weights: {c['layers']} layers, hidden 2048, 128 experts top-8, "
           f"expert intermediate 768, 32/4 heads, head_dim 128, vocab {c['vocab']}; "
           f"{c['threads']} threads, prompt {c['prompt_tokens']}, {c['new_tokens']} new tokens, "
           f"median of {c['repeats']} after {c['warmup']} warm-up. Load average (1 min) at "
           f"start {r['machine']['load_average_1min']:.1f}.", "",
           f"| engine | bits | on disk | prefill tok/s ({c['prompt_tokens']}) | decode tok/s "
           "| baseline RSS | peak RSS (VmHWM) | peak - baseline | load avg after |",
           "|---|---|---|---|---|---|---|---|---|"]
    for x in r["measure"]["rows"]:
        if "error" in x:
            out.append(f"| {x['engine']} | {x['bits']} | {gb(x['disk_bytes'])} | error: {x['error']} |||||")
            continue
        out.append(f"| {x['engine']} | {x['bits']} | {gb(x['disk_bytes'])} "
                   f"| {x['prefill_tokens_per_s']:.1f} | {x['decode_tokens_per_s']:.2f} "
                   f"| {gb(x['baseline_rss'])} | {gb(x['peak_rss'])} "
                   f"| {gb(x['peak_rss'] - x['baseline_rss'])} | {x['load_average_1min']:.1f} |")
    if r.get("steps"):
        out += ["", "| step | wall time | peak RSS | |", "|---|---|---|---|"]
        out += [f"| {k} | {v['seconds']:.0f} s | {gb(v['peak_rss'])} | {v.get('error', '')}"
                for k, v in r["steps"].items()]
    agree = dict(r.get("agreement") or {})
    stats = agree.pop("reference_stats", None)
    if stats:
        out += ["", f"Greedy tokens and prompt logits on a fixed {AGREE_PROMPT}-token prompt (reference "
                f"logit std {stats['logit_std']:.3f}, median top-1/top-2 margin "
                f"{stats['median_top1_top2_margin']:.3f}):", "",
                "| engine | reference | greedy tokens | same as reference | prompt argmax agreement "
                "| max abs logit diff | relative RMS diff |", "|---|---|---|---|---|---|---|"]
        for name, x in agree.items():
            if "greedy" not in x:
                out.append(f"| {name} | error: {x.get('error')} ||||||")
            elif x.get("reference"):
                out.append(f"| {name} | {x['reference']} | {' '.join(map(str, x['greedy']))} "
                           f"| {x['greedy_matches_reference']}/{len(x['greedy'])} "
                           f"| {x['prompt_argmax_agreement']:.0%} | {x['max_abs_logit_diff']:.2e} "
                           f"| {x['relative_rms_diff']:.2e} |")
            else:
                out.append(f"| {name} | (reference) | {' '.join(map(str, x['greedy']))} |||||")
    return "\n".join(out)


def git_describe() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()

    return {"commit": git("log", "-1", "--oneline"),
            "dirty": git("status", "--short", "--", "mobilemoe", "export", "cli").splitlines()}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKERS:
        return worker(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--block-size", type=int, default=32, help="int4 block size, both engines")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--agree-tokens", type=int, default=10)
    p.add_argument("--skip-agreement", action="store_true")
    p.add_argument("--data", type=Path, default=Path("/work/bench-data/optimum"))
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    if not OPT_PY.exists():
        sys.exit(f"optimum_peer: {OPT_PY} is missing: run make bench-optimum-env")
    d = a.data / f"qwen3-30b-a3b-{a.layers}L-v{a.vocab}"
    d.mkdir(parents=True, exist_ok=True)
    f = files(d, a.block_size)
    result = {"config": vars(a) | {"data": str(d), "json_out": str(a.json_out)},
              "command": " ".join(["optimum_peer.py", *argv]), "mobilemoe_git": git_describe(),
              "machine": {"cores": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
                          "scheduler": os.sched_getscheduler(0)}}
    result["steps"] = prepare(a, f)
    result["graphs"] = {name: run_step([OPT_PY, __file__, "_graph", f[name] / "model.onnx"],
                                       capture=True).get("output")
                        for name in ("optimum fp32", "optimum int4") if (f[name] / "model.onnx").exists()}
    if not a.skip_agreement:
        result["agreement"] = agreement(a, f)
    result["measure"] = measure(a, f)
    result["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(result, indent=2, default=str))
    print(report(result))


if __name__ == "__main__":
    main()
