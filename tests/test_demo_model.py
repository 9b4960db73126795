"""The shipped demo model: the default for run/chat, the routing trace, --show-experts and
`inspect --routing` (its experts specialise: prose and code use different ones)."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mobilemoe.cli.demo import demo_context, demo_package
from mobilemoe.cli.main import app
from typer.testing import CliRunner

import mobilemoe

HELDOUT = Path(__file__).parents[1] / "tools" / "heldout"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def package(cache) -> Path:
    return demo_package(cache / "demo", say=lambda text: None)


@pytest.fixture(scope="module")
def runner(cache, package) -> CliRunner:
    # the CLI's default model comes from $MOBILEMOE_CACHE/demo, where `package` already is
    return CliRunner(env={"MOBILEMOE_CACHE": str(cache)})


def test_demo_package_is_cached_and_context_is_the_trained_one(package, cache):
    source = package.parent / f".{package.name}.source"
    stamp = source.stat().st_mtime_ns
    assert demo_package(cache / "demo", say=lambda text: None) == package
    assert source.stat().st_mtime_ns == stamp  # not exported again
    assert demo_context(256) == 256 and demo_context(4096) == 512


def test_a_demo_package_from_another_exporter_is_exported_again(tmp_path, monkeypatch):
    """The cached package's fingerprint covers the exporter's code: a package an older exporter
    wrote (same format version, graphs this runtime no longer takes) is replaced."""
    import importlib.util

    from mobilemoe.cli import demo

    first = demo_package(tmp_path / "demo", say=lambda text: None)
    source = first.parent / f".{first.name}.source"
    stamp = source.stat().st_mtime_ns
    real = importlib.util.find_spec("mobilemoe.export")
    changed = tmp_path / "exporter"
    changed.mkdir()
    for path in sorted(Path(real.submodule_search_locations[0]).rglob("*.py")):
        target = changed / path.relative_to(real.submodule_search_locations[0])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (changed / "graphs.py").write_text((changed / "graphs.py").read_text() + "\n# changed\n")
    spec = importlib.util.spec_from_file_location("mobilemoe.export", changed / "__init__.py",
                                                  submodule_search_locations=[str(changed)])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: spec if name == "mobilemoe.export" else find_spec(name, *a))
    assert demo_package(tmp_path / "demo", say=lambda text: None) == first
    assert source.stat().st_mtime_ns != stamp  # exported again


def test_run_without_a_package_uses_the_demo_model(runner):
    result = runner.invoke(app, ["run", "In the beginning", "-n", "8", "-t", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip(), result.output
    assert "demo model" in result.stderr and "does not follow instructions" in result.stderr


def test_routing_trace_has_every_layer_and_k_experts_per_token(package):
    with mobilemoe.load(package, context_length=256) as model:
        d = model.dims
        assert model.routing_trace is None  # off by default
        with model.trace_routing() as trace:
            tokens = list(model.generate("In the beginning", max_new_tokens=5, temperature=0))
        assert model.routing_trace is None
    prompt = len(model.encode("In the beginning"))
    # the prompt's prefill, then one step per generated token fed back in
    assert len(tokens) == 5 and len(trace) == 1 + 5
    assert [next(iter(step.values())).shape[0] for step in trace] == [prompt] + [1] * 5
    for step in trace:
        assert sorted(step) == list(range(d.num_layers))
        for experts in step.values():
            assert experts.shape[1] == d.top_k
            assert ((experts >= 0) & (experts < d.num_experts)).all()
            assert all(len(set(row)) == d.top_k for row in experts.tolist())


def test_show_experts_prints_each_tokens_experts(runner, package):
    result = runner.invoke(app, ["run", str(package), "def main(", "-n", "6", "-t", "0",
                                 "--show-experts"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if " L0 " in line]
    assert len(lines) == 7  # the prompt's last token, then the 6 generated
    for line in lines:
        groups = re.findall(r"L(\d) (\d) (\d)", line)
        assert [int(g[0]) for g in groups] == [0, 1, 2, 3]
        assert all(g[1] != g[2] for g in groups)
    assert "\x1b[" not in result.stdout  # not a terminal: plain text


def test_chat_show_experts_with_the_demo_model(runner):
    result = runner.invoke(app, ["chat", "-n", "4", "-t", "0", "--show-experts"],
                           input="And God said\n/exit\n")
    assert result.exit_code == 0, result.output
    assert re.search(r"L0 \d \d \| L1 \d \d", result.stdout)


def test_inspect_routing_shows_prose_and_code_use_different_experts(runner, package):
    args = ["inspect", str(package), "-c", "256", "-n", "256", "--json",
            "--routing", f"prose={HELDOUT / 'prose.txt'}",
            "--routing", f"code={HELDOUT / 'code.txt'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["tokens"] == {"prose": 256, "code": 256}
    for usage in info["usage"].values():
        assert np.allclose(np.sum(usage, axis=1), 1)
    tv = info["tv"]["prose vs code"]
    assert len(tv) == 4 and tv[-1] > 0.2, tv

    text = runner.invoke(app, [a for a in args if a != "--json"])
    assert text.exit_code == 0, text.output
    assert "prose vs code: L0" in text.stdout and "layer 3" in text.stdout


def test_run_with_a_package_and_no_prompt_asks_for_one(runner, package):
    result = runner.invoke(app, ["run", str(package)])
    assert result.exit_code == 1 and "give a prompt" in result.stderr


def test_demo_on_a_terminal_shows_live_statistics(tmp_path):
    """`mobilemoe demo` (what `make demo` runs) on a terminal: the trained model's text
    streams with the cache statistics updating under it, and the budget forces paging."""
    script = Path(sys.executable).parent / "mobilemoe"
    leader, follower = pty.openpty()
    proc = subprocess.Popen([str(script), "demo", "--out", str(tmp_path)], stdout=follower,
                            stderr=follower, stdin=subprocess.DEVNULL, close_fds=True)
    os.close(follower)
    output = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the demo has exited
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, output.decode(errors="replace")[-2000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    live = text[text.index("[4/5]"):text.index("[5/5]")]
    assert "trained demo model" in text
    assert re.search(r"hits \d+\s+misses \d+\s+evictions [1-9]\d*", live), live
