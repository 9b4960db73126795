"""The `mobilemoe` command line, run for real: a tiny Mixtral is built with transformers,
exported once, and driven both in-process (typer's CliRunner) and as the installed script."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoints import build_mixtral
from mobilemoe.cli.demo import demo_package
from mobilemoe.cli.main import app
from mobilemoe.export import export_model
from mobilemoe.export.synthetic import write_random_mixtral
from typer.testing import CliRunner

import mobilemoe
from mobilemoe.cache_policies import POLICY_NAMES
from mobilemoe.planner import write_routing_profile

SCRIPT = Path(sys.executable).with_name("mobilemoe")
CONTEXT = 2048  # long enough that a greedy reply can be interrupted half-way
SIZE = re.compile(r"at least ([0-9.]+ [KMGT]?B)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    build_mixtral(folder, max_position_embeddings=CONTEXT)
    return folder


@pytest.fixture(scope="module")
def package(checkpoint, tmp_path_factory) -> Path:
    return export_model(checkpoint, tmp_path_factory.mktemp("pkg") / "tiny.mmoe", progress=False)


@pytest.fixture(scope="module")
def many_experts(tmp_path_factory) -> Path:
    """A package whose experts are many next to the minimum budget's margin (~0.7 MB, ~7 of
    its 64 experts): at that budget most of them must be paged, whatever a process measures."""
    folder = tmp_path_factory.mktemp("many-experts")
    build_mixtral(folder / "checkpoint", num_local_experts=32)
    return export_model(folder / "checkpoint", folder / "many.mmoe", progress=False)


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def cli(*args: str, stdin: str | None = None, timeout: float = 60, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """The installed `mobilemoe` script as a real process."""
    return subprocess.run([str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(exit_code: int, stderr: str, *fragments: str) -> str:
    assert exit_code == 1, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def library_text(package: Path, prompt, **options) -> str:
    with mobilemoe.load(package) as model:
        return "".join(t.text for t in model.generate(prompt, **options))


# -- export ---------------------------------------------------------------------------------


def test_export_makes_a_loadable_package(runner, checkpoint, tmp_path):
    out = tmp_path / "cli.mmoe"
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(out), "--bits", "8",
                                 "--block-size", "32"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout and re.search(r"\d (KB|MB)", result.stdout)
    with mobilemoe.load(out) as model:
        assert model.manifest.quantization.expert_bits == 8
        assert model.manifest.quantization.block_size == 32
        assert model.logits([1, 5, 7]).shape == (3, model.dims.vocab_size)

    again = runner.invoke(app, ["export", str(checkpoint), "-o", str(out)])
    assert_one_line_error(again.exit_code, again.stderr, "already exists", "--overwrite")
    replaced = runner.invoke(app, ["export", str(checkpoint), "-o", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    with mobilemoe.load(out) as model:
        assert model.manifest.quantization.expert_bits == 4


def test_export_errors_are_one_line(runner, checkpoint, tmp_path):
    bad_bits = runner.invoke(app, ["export", str(checkpoint), "-o", str(tmp_path / "x"),
                                   "--bits", "3"])
    assert_one_line_error(bad_bits.exit_code, bad_bits.stderr, "bits must be 4 or 8")
    missing = runner.invoke(app, ["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "y")])
    assert_one_line_error(missing.exit_code, missing.stderr, "no such folder")
    usage = runner.invoke(app, ["export", str(checkpoint)])  # no -o: typer's own usage error
    assert usage.exit_code == 2 and "Traceback" not in usage.output


# -- run ------------------------------------------------------------------------------------


def test_run_streams_what_the_library_generates(runner, package):
    result = runner.invoke(app, ["run", str(package), "The quick brown fox", "-n", "12",
                                 "--stats"])
    assert result.exit_code == 0, result.output
    expected = library_text(package, "The quick brown fox", max_new_tokens=12)
    assert expected and result.stdout == expected + "\n"
    assert re.search(r"hits\s+\d+", result.stderr) and re.search(r"misses\s+\d+", result.stderr)


def test_run_passes_sampling_and_stop_options(runner, package):
    options = dict(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    full = library_text(package, "Mixture of experts", **options)
    stop = full[6:8]
    expected = library_text(package, "Mixture of experts", stop=(stop,), **options)
    result = runner.invoke(app, ["run", str(package), "Mixture of experts", "-n", "16",
                                 "-t", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "3",
                                 "--stop", stop, "--stop", "never appears"])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n" and len(expected) < len(full)


def test_run_under_a_paging_budget_as_a_process(many_experts):
    info = json.loads(cli("inspect", str(many_experts), "--json", "-c", "256").stdout)
    # The smallest budget inspect names: the top-2 a step needs plus its margin. Another
    # process measures its resident part within that margin (heap layout moves it by up to
    # ~0.3 MB), so between 2 and ~10 of the 64 experts fit: most must be paged.
    budget = info["minimum_budget"]
    done = cli("run", str(many_experts), "The quick brown fox", "-n", "20", "-c", "256",
               "--threads", "1", "-m", str(budget), "--stats")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "Traceback" not in done.stderr
    assert int(re.search(r"evictions\s+(\d+)", done.stderr).group(1)) > 0
    peak = re.search(r"peak RSS - baseline .*budget.*", done.stderr).group()
    assert "OVER BUDGET" not in peak, peak


# -- chat -----------------------------------------------------------------------------------


def test_chat_through_a_pipe(runner, package):
    question = [{"role": "user", "content": "What is a mixture of experts?"}]
    with mobilemoe.load(package) as model:
        first = "".join(t.text for t in model.generate(model.chat_prompt(question),
                                                       max_new_tokens=10))
    lines = ["What is a mixture of experts?", "/stats", "And then?", "/reset",
             "What is a mixture of experts?", "/exit", "never read"]
    result = runner.invoke(app, ["chat", str(package), "-n", "10"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("> ") >= 6
    assert re.search(r"hits\s+\d+", out) and re.search(r"evictions\s+\d+", out)
    assert "(conversation cleared)" in out
    # the first turn, and the same question after /reset, answer as a fresh conversation does
    assert first.strip() and out.split("> ", 1)[1].startswith(first + "\n")
    assert out.split("(conversation cleared)\n> ")[1].startswith(first + "\n")


def test_chat_as_a_process_ends_at_eof(package):
    done = cli("chat", str(package), "-n", "5", stdin="hello\n/stats\nhi again\n")
    assert done.returncode == 0, done.stderr
    assert "misses" in done.stdout and "Traceback" not in done.stderr


def _read_until(proc: subprocess.Popen, seen: bytearray, marker: bytes, after: int = 0,
                timeout: float = 30) -> int:
    """Read the process's stdout into `seen` until `marker` appears after offset `after`;
    returns the offset just past it."""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while (found := seen.find(marker, after)) < 0:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {bytes(seen)[-400:]!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"process ended before {marker!r}: {bytes(seen)[-400:]!r}"
            seen += chunk
    return found + len(marker)


def test_chat_ctrl_c_stops_the_reply_then_quits_at_the_prompt(tmp_path):
    # The shipped demo model, in a copy that never ends a reply by itself, with room for
    # 2000 tokens: the reply must still be streaming when the interrupt arrives (the tiny
    # test model decodes a short reply faster than the pipe is read).
    endless = tmp_path / "endless"
    shutil.copytree(demo_package(tmp_path / "demo", say=lambda text: None), endless)
    manifest = json.loads((endless / "manifest.json").read_text())
    manifest["eos_token_ids"] = []
    (endless / "manifest.json").write_text(json.dumps(manifest))
    # A shell without job control starts background commands with SIGINT ignored, and the
    # child would inherit that: give it the default disposition, as a terminal would.
    proc = subprocess.Popen([str(SCRIPT), "chat", str(endless), "-n", "2000", "-c", "4096"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = bytearray()
        at = _read_until(proc, seen, b"> ")
        proc.stdin.write(b"tell me a long story\n")
        proc.stdin.flush()
        while len(seen) < at + 8:  # the reply is streaming (greedy: ~2000 tokens, seconds)
            assert select.select([proc.stdout.fileno()], [], [], 30)[0], "no reply"
            seen += os.read(proc.stdout.fileno(), 4096)
        proc.send_signal(signal.SIGINT)  # during the reply: stop it, keep the conversation
        at = _read_until(proc, seen, b" [interrupted]\n> ", after=at)
        proc.stdin.write(b"/stats\n")
        proc.stdin.flush()
        at = _read_until(proc, seen, b"baseline RSS", after=at)
        _read_until(proc, seen, b"> ", after=at)
        proc.send_signal(signal.SIGINT)  # at the prompt: quit cleanly
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err


# -- inspect --------------------------------------------------------------------------------


def test_inspect_table_and_json(runner, package):
    table = runner.invoke(app, ["inspect", str(package)])
    assert table.exit_code == 0, table.output
    for label in ("architecture", "MixtralForCausalLM", "experts", "quantization",
                  "expert store", "per expert", "minimum budget"):
        assert label in table.stdout

    result = runner.invoke(app, ["inspect", str(package), "--json", "-c", "512"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["model_type"], info["layers"], info["experts"], info["top_k"]) == ("mixtral", 2, 4, 2)
    assert info["quantization"]["expert_bits"] == 4 and info["context_length"] == 512
    assert info["expert_kernel"] in ("native", "onnxruntime")  # native on AVX-512 VNNI
    minimum = info["minimum_budget"]
    assert isinstance(minimum, int) and minimum > 0
    assert sum(info["minimum_budget_parts"].values()) == minimum
    assert info["minimum_budget_parts"]["experts"] == 2 * info["bytes"]["expert_session"]
    sizes = info["bytes"]
    assert sizes["dense_graphs"] == sizes["embed_graph"] + sizes["layer_graphs"] + sizes["head_graph"]
    assert sizes["experts"] == info["experts_total"] * sizes["per_expert"].popitem()[1]
    assert sizes["expert_store"] >= sizes["experts"]

    roomy = runner.invoke(app, ["inspect", str(package), "--json", "-c", "512",
                                "-m", str(2 * info["all_experts_budget"])])
    assert json.loads(roomy.stdout)["experts_that_fit"] == info["experts_total"]


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["run", "{pkg}", "hi"], ["chat", "{pkg}"],
                                     ["inspect", "{pkg}"], ["inspect", "{pkg}", "--json"]])
def test_missing_package_is_one_line(runner, tmp_path, command):
    args = [a.format(pkg=tmp_path / "nope.mmoe") for a in command]
    result = runner.invoke(app, args)
    assert_one_line_error(result.exit_code, result.stderr, "nope.mmoe")
    assert result.stdout == ""


def test_missing_package_as_a_process(tmp_path):
    done = cli("run", str(tmp_path / "nope.mmoe"), "hello")
    assert_one_line_error(done.returncode, done.stderr, "nope.mmoe", "not a folder")
    not_a_package = cli("inspect", str(tmp_path))
    assert_one_line_error(not_a_package.returncode, not_a_package.stderr, "manifest.json")


def test_bad_memory_budget_string(runner, package):
    for command in (["run", str(package), "hi"], ["inspect", str(package)]):
        result = runner.invoke(app, [*command, "--memory-budget", "lots"])
        assert_one_line_error(result.exit_code, result.stderr, "not a byte size", "lots")


def test_budget_below_the_minimum_names_the_smallest(runner, package):
    result = runner.invoke(app, ["run", str(package), "hi", "--memory-budget", "1MB"])
    line = assert_one_line_error(result.exit_code, result.stderr, "too small", "--memory-budget")
    assert SIZE.search(line), line


def test_the_named_smallest_budget_works(package):
    first = cli("run", str(package), "hi", "-n", "1", "-c", "256", "-m", "1MB")
    named = SIZE.search(first.stderr).group(1).replace(" ", "")
    again = cli("run", str(package), "hi", "-n", "1", "-c", "256", "-m", named)
    assert again.returncode == 0, again.stderr


# -- cache policies -------------------------------------------------------------------------


def test_every_cache_policy_pages_and_generates_the_same_text(runner, many_experts, tmp_path):
    # Measured and run in fresh processes: RSS-measured sizes depend on the process's heap.
    info = json.loads(cli("inspect", str(many_experts), "--json", "-c", "256").stdout)
    budget = info["minimum_budget"]  # 2 to ~10 of 64 experts (as in the test above)
    hot_first = list(range(32, 0, -1))
    profile = write_routing_profile(tmp_path / "profile.json", [hot_first, hot_first[::-1]])
    texts = {}
    for policy in POLICY_NAMES:
        extra = ["--routing-profile", str(profile)] if policy == "pinned" else []
        result = cli("run", str(many_experts), "The quick brown fox", "-n", "12", "-c", "256",
                     "-m", str(budget), "--stats", "--policy", policy, *extra)
        assert result.returncode == 0, result.stderr
        assert int(re.search(r"evictions\s+(\d+)", result.stderr).group(1)) > 0
        texts[policy] = result.stdout
    assert len(set(texts.values())) == 1, texts  # what is cached never changes the output
    chat = runner.invoke(app, ["chat", str(many_experts), "-n", "4", "--policy", "lfu"],
                         input="hello\n/stats\n")
    assert chat.exit_code == 0 and "misses" in chat.stdout, chat.output


@pytest.mark.parametrize("command", [["run", "{pkg}", "hi"], ["chat", "{pkg}"], ["bench", "{pkg}"]])
def test_bad_policy_or_routing_profile_is_one_line(runner, package, tmp_path, command):
    args = [a.format(pkg=package) for a in command]
    (tmp_path / "broken.json").write_text("{not json")
    wrong = write_routing_profile(tmp_path / "wrong.json", [[1, 2, 3, 4]] * 3)  # 3 layers, not 2
    good = write_routing_profile(tmp_path / "good.json", [[1, 2, 3, 4]] * 2)
    cases = [
        (["--policy", "fifo"], "unknown cache policy 'fifo'", "lru, lfu, lrfu, dlfu, pinned"),
        (["--policy", "pinned"], "needs a routing profile", "--routing-profile"),
        (["--policy", "pinned", "--routing-profile", str(tmp_path / "nope.json")],
         "nope.json", "no such routing profile"),
        (["--policy", "pinned", "--routing-profile", str(tmp_path / "broken.json")],
         "broken.json", "not valid JSON"),
        (["--policy", "pinned", "--routing-profile", str(wrong)], "must list 2 layers"),
        (["--policy", "lfu", "--routing-profile", str(good)], "only used by the pinned"),
    ]
    for options, *fragments in cases:
        result = runner.invoke(app, [*args, *options])
        assert_one_line_error(result.exit_code, result.stderr, *fragments)
        assert result.stdout == ""


def test_unknown_policy_as_a_process(package):
    done = cli("run", str(package), "hi", "--policy", "fifo")
    assert_one_line_error(done.returncode, done.stderr, "unknown cache policy 'fifo'")


# -- demo and the synthetic checkpoint -------------------------------------------------------


def without_modules(folder: Path, *names: str) -> dict[str, str]:
    """An environment in which importing `names` fails as if they were not installed."""
    for name in names:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {name!r} (blocked)", name={name!r})\n')
    path = [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_export_without_the_export_extra(checkpoint, tmp_path):
    env = without_modules(tmp_path / "blocked", "onnx")
    done = cli("export", str(checkpoint), "-o", str(tmp_path / "x.mmoe"), env=env)
    assert_one_line_error(done.returncode, done.stderr, "onnx", "pip install 'mobilemoe[export]'")


def test_demo_end_to_end_without_torch(tmp_path):
    # torch and transformers are installed for the tests; the demo must not need them.
    env = without_modules(tmp_path / "blocked", "torch", "transformers")
    out = tmp_path / "demo"
    done = cli("demo", "--out", str(out), "--max-tokens", "30", env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    evictions = int(re.search(r"evictions\s+(\d+)", done.stdout).group(1))
    assert evictions > 0, done.stdout
    assert "within budget" in done.stdout
    assert any(p.name.endswith(".mmoe") and (p / "manifest.json").is_file() for p in out.iterdir())

    cached = cli("demo", "--out", str(out), "--max-tokens", "5", env=env, timeout=120)
    assert cached.returncode == 0, cached.stdout + cached.stderr
    assert "cached:" in cached.stdout


def test_synthetic_checkpoint_is_a_mixtral_transformers_loads(tmp_path):
    from transformers import AutoTokenizer, MixtralForCausalLM

    dims = dict(hidden_size=64, intermediate_size=96, num_layers=2, num_experts=4, top_k=2,
                num_heads=4, num_kv_heads=2, vocab_size=300)
    a = write_random_mixtral(tmp_path / "a", seed=5, **dims)
    b = write_random_mixtral(tmp_path / "b", seed=5, **dims)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    model, info = MixtralForCausalLM.from_pretrained(a, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    tok = AutoTokenizer.from_pretrained(a)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and len(tok) == 300
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<s>[INST] hi [/INST]"

    package = export_model(a, tmp_path / "a.mmoe", progress=False)
    with mobilemoe.load(package) as loaded:
        assert loaded.encode("hi")[0] == 1  # BOS added on encode, as Mixtral's tokenizer does
        assert loaded.logits(loaded.encode("hello there")).shape[1] == 300
