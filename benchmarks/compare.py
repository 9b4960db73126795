"""mobilemoe against llama.cpp on the same synthetic shape, and the machine's limits, in one run.

    .venv/bin/python benchmarks/compare.py olmoe-1b-7b --threads 2 --fractions 1,0.5,0.25,0.1

1. Writes the shape as a mobilemoe package (synthetic_package.py) and as a GGUF file
   (gguf_writer.py, run with .venv-bench's python) under --data, unless they are there.
2. Measures the machine: memory bandwidth (numpy copy of a 1 GiB array, read + write bytes
   counted), cold sequential read bandwidth (as root: sync, drop the page cache, read the
   expert store in 16 MiB reads).
3. Runs `mobilemoe bench` at each expert fraction (1 = every expert resident), then
   llama.cpp (llama_bench.py, in .venv-bench), each in a fresh process, same prompts,
   same thread count. Both files are read once beforehand so that both start from the
   page cache.
4. Prints markdown tables (and --json-out writes every number): tokens/s, peak RSS, the
   decode roofline (weight bytes read per token / memory bandwidth), paging cost against
   the cold read cost, and mobilemoe's time split per token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mobilemoe.cache_policies import DEFAULT_POLICY

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAIN_PY = ROOT / ".venv" / "bin" / "python"
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
CHUNK = 16 << 20


# -- the machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_bandwidth(size: int = 1 << 30, tries: int = 5) -> float:
    """Bytes/s of a numpy copy (one thread), counting bytes read plus bytes written."""
    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    best = min(_timed(np.copyto, dst, src) for _ in range(tries))
    return 2 * size / best


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def drop_page_cache() -> bool:
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def read_file(path: Path, limit: int | None = None) -> tuple[int, float]:
    """Read `path` sequentially (at most `limit` bytes): (bytes, seconds)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while limit is None or done < limit:
            n = f.readinto(view)
            if not n:
                break
            done += n
    return done, time.perf_counter() - start


def cold_read_bandwidth(path: Path, limit: int = 4 << 30) -> float | None:
    if not drop_page_cache():
        return None
    done, seconds = read_file(path, limit)
    return done / seconds


# -- the runs ---------------------------------------------------------------------------------


def _current(package: Path) -> bool:
    """A package this runtime reads (one of an older format is written again)."""
    from mobilemoe.errors import PackageError
    from mobilemoe.manifest import Manifest

    try:
        Manifest.load(package)
    except (PackageError, FileNotFoundError):
        return False
    return True


def ensure_files(shape: str, layers: int | None, bits: int, data: Path) -> tuple[Path, Path]:
    tag = f"{shape}-{'all' if layers is None else layers}L"
    package = data / f"{tag}-int{bits}.mmoe"
    gguf_file = data / f"{tag}-q{bits}_0.gguf"
    cut = [] if layers is None else ["--layers", str(layers)]
    if not _current(package):
        subprocess.run([str(MAIN_PY), str(HERE / "synthetic_package.py"), shape, "-o", str(package),
                        "--bits", str(bits), "--overwrite", *cut], check=True)
    if not gguf_file.exists() and BENCH_PY.exists():
        subprocess.run([str(BENCH_PY), str(HERE / "gguf_writer.py"), shape, "-o", str(gguf_file),
                        "--bits", str(bits), *cut], check=True)
    return package, gguf_file


def run_json(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip() or done.stdout.strip())[-2000:]}
    return json.loads(done.stdout)


def run_mobilemoe(package: Path, fraction: float, a: argparse.Namespace) -> dict:
    # fused experts need every expert resident: only the fully resident runs take them
    fused = ["--fused-experts"] if a.fused_experts and fraction == 1.0 else []
    return run_json([str(MAIN_PY), "-m", "mobilemoe.cli.main", "bench", str(package),
                     "--expert-fraction", str(fraction), "--threads", str(a.threads),
                     "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
                     "--repeats", str(a.repeats), "--warmup", str(a.warmup),
                     "--temperature", str(a.temperature), "--policy", a.policy, *fused,
                     "--expert-kernel", a.expert_kernel, "--json"])


def run_llama(gguf_file: Path, a: argparse.Namespace) -> dict:
    if not BENCH_PY.exists():
        return {"error": f"{BENCH_PY} is missing: run `make bench-env`"}
    return run_json([str(BENCH_PY), str(HERE / "llama_bench.py"), str(gguf_file),
                     "--threads", str(a.threads), "--prompt-tokens", str(a.prompt_tokens),
                     "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats),
                     "--warmup", str(a.warmup)])


def paired_round(package: Path, gguf_file: Path, a: argparse.Namespace, index: int) -> dict:
    """Both engines fully resident once more, in alternating order (mobilemoe first in even
    rounds): on a shared machine the load drifts, and alternation spreads the drift over both."""
    print(f"round {index + 1}/{a.rounds} ...", file=sys.stderr, flush=True)
    runs = {}
    for engine in (("mobilemoe", "llama") if index % 2 == 0 else ("llama", "mobilemoe")):
        runs[engine] = run_mobilemoe(package, 1.0, a) if engine == "mobilemoe" else \
            run_llama(gguf_file, a)
    m, ll = runs["mobilemoe"], runs["llama"]
    if "error" in m or "error" in ll:
        return {"error": m.get("error") or ll.get("error")}
    return {"mobilemoe_decode": m["decode"]["tokens_per_s"],
            "llama_decode": ll["decode_tokens_per_s"],
            "mobilemoe_prefill": m["prefill"]["tokens_per_s"],
            "llama_prefill": ll["prefill_tokens_per_s"],
            "decode_ratio": m["decode"]["tokens_per_s"] / ll["decode_tokens_per_s"],
            "prefill_ratio": m["prefill"]["tokens_per_s"] / ll["prefill_tokens_per_s"],
            "first": "mobilemoe" if index % 2 == 0 else "llama.cpp"}


# -- the report -------------------------------------------------------------------------------


def gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def report(r: dict) -> str:
    m, out = r["machine"], []
    bw = m["memory_bandwidth"]
    out += ["| machine | |", "|---|---|",
            f"| CPU | {m['cpu']} ({m['cores']} cores, {gb(m['memory'])} RAM) |",
            f"| memory bandwidth (numpy copy, read+write) | {bw / 1e9:.1f} GB/s |",
            f"| cold sequential read | {fmt(m['cold_read'] and m['cold_read'] / 1e9, '.2f')} GB/s |",
            f"| load average (1 min) at start | {m['load_average']:.1f} |",
            ""]
    rows = [("mobilemoe" + (" (fused experts)" if x.get("fused_experts") else "")
             + (" (native kernel)" if x.get("expert_kernel") == "native" else ""), x)
            for x in r["mobilemoe"] if x.get("expert_fraction") == 1.0]
    rows.append(("llama.cpp", r["llama"]))
    out += ["| engine | decode tok/s | prefill tok/s | weights / token | roofline tok/s "
            "| % of roofline | peak RSS | peak - baseline | load avg |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, x in rows:
        if "error" in x:
            out.append(f"| {name} | error: {x['error'].splitlines()[-1][:120]} ||||||||")
            continue
        ours = name.startswith("mobilemoe")
        dec = x["decode"]["tokens_per_s"] if ours else x["decode_tokens_per_s"]
        pre = x["prefill"]["tokens_per_s"] if ours else x["prefill_tokens_per_s"]
        roof = bw / x["weight_bytes_per_token"]
        out.append(f"| {name} | {dec:.2f} | {pre:.1f} | {x['weight_bytes_per_token'] / 1e6:.0f} MB "
                   f"| {roof:.1f} | {100 * dec / roof:.0f}% | {gb(x['peak_rss'])} "
                   f"| {gb(x['peak_rss'] - x['baseline_rss'])} "
                   f"| {x['load_average'][0]:.1f}-{x['load_average'][1]:.1f} |")
    out += ["", "| expert fraction | budget | decode tok/s | prefill tok/s | decode hit rate "
            "| MB paged / decode token | paging ms/MB | cold read ms/MB | peak - baseline |",
            "|---|---|---|---|---|---|---|---|---|"]
    read_ms = 1000 / (m["cold_read"] / 1e6) if m["cold_read"] else None
    for x in r["mobilemoe"]:
        if "error" in x:
            out.append(f"| error: {x['error'].splitlines()[-1][:120]} ||||||||")
            continue
        d = x["decode"]
        out.append(f"| {x['expert_fraction']:.0%} | {gb(x['memory_budget'])} "
                   f"| {d['tokens_per_s']:.2f} | {x['prefill']['tokens_per_s']:.1f} "
                   f"| {d['hit_rate']:.1%} | {d['mb_paged_per_token']:.1f} "
                   f"| {fmt(x['paging_ms_per_mb'], '.2f')} | {fmt(read_ms, '.2f')} "
                   f"| {gb(x['peak_rss'] - x['baseline_rss'])} |")
    rounds = [x for x in r.get("rounds", []) if "error" not in x]
    if rounds:
        out += ["", "| round | first | mobilemoe decode | llama.cpp decode | ratio | prefill ratio |",
                "|---|---|---|---|---|---|"]
        for i, x in enumerate(rounds, 1):
            out.append(f"| {i} | {x['first']} | {x['mobilemoe_decode']:.2f} "
                       f"| {x['llama_decode']:.2f} | {x['decode_ratio']:.2f}x "
                       f"| {x['prefill_ratio']:.2f}x |")
        out.append(f"| median | | | | {statistics.median(x['decode_ratio'] for x in rounds):.2f}x "
                   f"| {statistics.median(x['prefill_ratio'] for x in rounds):.2f}x |")
    out += ["", "mobilemoe, ms per token (mean over recorded repeats):", "",
            "| expert fraction | phase | dense | experts | paging (read) | other | total |",
            "|---|---|---|---|---|---|---|"]
    for x in r["mobilemoe"]:
        for phase in ("prefill", "decode"):
            if "error" in x or not x.get(phase):
                continue
            s = x[phase]["split_ms_per_token"]
            out.append(f"| {x['expert_fraction']:.0%} | {phase} | {fmt(s['dense'], '.2f')} "
                       f"| {fmt(s['experts'], '.2f')} | {fmt(s['paging'], '.2f')} "
                       f"({fmt(s['paging_read'], '.2f')}) | {fmt(s['other'], '.2f')} "
                       f"| {fmt(s['total'], '.2f')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape")
    p.add_argument("--layers", type=int)
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--fractions", default="1", help="comma-separated expert fractions")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="mobilemoe's decoding (llama.cpp always decodes greedily)")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    p.add_argument("--policy", default=DEFAULT_POLICY, help="mobilemoe's expert cache policy")
    p.add_argument("--fused-experts", action="store_true",
                   help="fully resident mobilemoe runs with --fused-experts (one QMoE per layer)")
    p.add_argument("--expert-kernel", default="auto",
                   help="what computes mobilemoe's experts: auto, native or onnxruntime")
    p.add_argument("--rounds", type=int, default=0,
                   help="then this many more fully resident pairs, in alternating order")
    p.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    a.data.mkdir(parents=True, exist_ok=True)
    package, gguf_file = ensure_files(a.shape, a.layers, a.bits, a.data)

    import psutil

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg()[0],
               "memory": psutil.virtual_memory().total,
               "memory_bandwidth": statistics.median(memory_bandwidth() for _ in range(3)),
               "cold_read": cold_read_bandwidth(package / "experts.bin")}
    for f in (package / "experts.bin", gguf_file):  # both start from the page cache
        if f.exists():
            read_file(f)
    result = {"shape": a.shape, "layers": a.layers, "bits": a.bits, "threads": a.threads,
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "machine": machine, "mobilemoe": [], "llama": {"error": "skipped (--no-llama)"}}
    for fraction in [float(x) for x in a.fractions.split(",")]:
        print(f"mobilemoe, expert fraction {fraction} ...", file=sys.stderr, flush=True)
        result["mobilemoe"].append({"expert_fraction": fraction,
                                    **run_mobilemoe(package, fraction, a)})
    if not a.no_llama:
        print("llama.cpp ...", file=sys.stderr, flush=True)
        result["llama"] = run_llama(gguf_file, a)
        result["rounds"] = [paired_round(package, gguf_file, a, i) for i in range(a.rounds)]
    if a.json_out:
        a.json_out.write_text(json.dumps(result, indent=2))
    print(report(result))


if __name__ == "__main__":
    main()
