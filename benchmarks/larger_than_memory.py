"""A model larger than memory: mobilemoe under a budget next to llama.cpp, in one run.

    sudo .venv/bin/python benchmarks/larger_than_memory.py \\
        /work/bench-data/mixtral-8x7b-allL-int4.mmoe /work/bench-data/mixtral-8x7b-allL-q4_0.gguf \\
        --budget 8GB --memory-limit 9GB --json-out /work/bench-data/M-mixtral.json

Three runs, each in a fresh process started with the page cache dropped:
1. mobilemoe with `--memory-budget BUDGET`;
2. llama.cpp (memory-mapped weights, its default) in a memory cgroup limited to
   `--memory-limit`: a machine with that much RAM. The limit counts the page cache the
   process uses, so the mapped file competes for it as on a small device;
3. llama.cpp with the whole machine, as a reference.
mobilemoe runs in the same cgroup as 2 (its budget is below the limit; what it reads through
the page cache is charged there too). Needs root (cgroup v1 memory controller, drop_caches).
Same prompt and decode length for both engines, `nice -n -10` (runs take minutes: real-time
priority for that long would starve the machine's other users). llama.cpp runs with
`--no-repack`: by default it copies every Q4_0 weight into a repacked buffer for its AVX-512
kernels, which for Mixtral-8x7B is 24 GB of RAM: it fails to load on a 25 GB machine
("insufficient memory (attempted to allocate 24192.00 MB)").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAIN_PY = ROOT / ".venv" / "bin" / "python"
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
CGROUP = Path("/sys/fs/cgroup/memory/mobilemoe-bench")
# glibc marks its mmapped chunks MADV_HUGEPAGE: ONNX Runtime's prepacked copy of a paged-in
# expert and the read buffer then fault in 2 MiB at a time
HUGE_PAGES = "glibc.malloc.hugetlb=1"

sys.path.insert(0, str(HERE))
from compare import drop_page_cache  # noqa: E402

from mobilemoe.cache_policies import DEFAULT_POLICY  # noqa: E402
from mobilemoe.units import parse_bytes  # noqa: E402


def limited(limit: int | None):
    """preexec_fn: move the child into the memory cgroup (or leave it free)."""
    def enter() -> None:
        os.nice(-10)
        if limit is not None:
            (CGROUP / "cgroup.procs").write_text(str(os.getpid()))
    return enter


def run(cmd: list[str], limit: int | None, env: dict | None = None) -> dict:
    drop_page_cache()
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limited(limit),
                          env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        return {"error": (done.stderr.strip() or done.stdout.strip())[-2000:],
                "returncode": done.returncode}
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package")
    p.add_argument("gguf")
    p.add_argument("--budget", default="8GB")
    p.add_argument("--memory-limit", default="9GB", help="llama.cpp's cgroup (RAM + page cache)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--policy", default=DEFAULT_POLICY)
    p.add_argument("--no-free-llama", action="store_true", help="skip run 3")
    p.add_argument("--huge-pages", action="store_true",
                   help="run mobilemoe with glibc's malloc asking for transparent huge pages "
                        f"({HUGE_PAGES})")
    p.add_argument("--no-llama", action="store_true", help="mobilemoe only")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args(argv)
    limit = parse_bytes(a.memory_limit)
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.limit_in_bytes").write_text(str(limit))
    common = ["--threads", str(a.threads), "--prompt-tokens", str(a.prompt_tokens),
              "--new-tokens", str(a.new_tokens), "--repeats", "1", "--warmup", "0"]
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "load_average": os.getloadavg()[0], "memory_limit": limit}
    print("mobilemoe ...", file=sys.stderr, flush=True)
    result["mobilemoe"] = run([str(MAIN_PY), "-m", "mobilemoe.cli.main", "bench", a.package,
                               "--memory-budget", a.budget, "--policy", a.policy, "--json",
                               *common], limit,
                               {"GLIBC_TUNABLES": HUGE_PAGES} if a.huge_pages else None)
    llama = [str(BENCH_PY), str(HERE / "llama_bench.py"), a.gguf, "--no-repack", *common]
    if not a.no_llama:
        print("llama.cpp in the cgroup ...", file=sys.stderr, flush=True)
        result["llama_limited"] = run(llama, limit)
    if not a.no_free_llama and not a.no_llama:
        print("llama.cpp with the whole machine ...", file=sys.stderr, flush=True)
        result["llama_free"] = run(llama, None)
    text = json.dumps(result, indent=2)
    if a.json_out:
        a.json_out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
