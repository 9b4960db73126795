"""Bad input fails with a clear `MobileMoEError`, never a traceback from deep inside.

Three kinds of input are covered, all with real files (a tiny Mixtral written by transformers,
exported, then damaged on a copy) and real ONNX Runtime:
- a package that is missing, tampered with, truncated, corrupt, of another format version,
  or whose manifest is malformed or points outside the package;
- a checkpoint the exporter cannot take (unsupported, incomplete, wrong shapes, pickle, not
  found), and exports that must not leave anything behind when they fail;
- runtime settings: a memory budget too small or unreadable, token ids out of range.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from checkpoints import build_mixtral
from mobilemoe.export import export_model
from safetensors.numpy import load_file, save_file

import mobilemoe
from mobilemoe import BudgetError, ExportError, MobileMoEError, PackageError
from mobilemoe.manifest import FORMAT_VERSION, MANIFEST_FILE
from mobilemoe.units import parse_bytes

IDS = [1, 5, 9, 42, 7, 3, 100, 250]
LAYERS, EXPERTS = 2, 4  # build_mixtral's defaults


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny float32 Mixtral in the hub's layout, one model.safetensors. Never modified."""
    folder = tmp_path_factory.mktemp("bad_input") / "checkpoint"
    build_mixtral(folder, seed=3)
    return folder


@pytest.fixture(scope="module")
def package(checkpoint) -> Path:
    """The checkpoint exported once. Never modified: tests damage a copy."""
    return export_model(checkpoint, checkpoint.parent / "tiny.mmoe", progress=False)


@pytest.fixture
def pkg(package, tmp_path) -> Path:
    """A private copy of the package, to damage."""
    return Path(shutil.copytree(package, tmp_path / "copy.mmoe"))


@pytest.fixture
def ckpt(checkpoint, tmp_path) -> Path:
    """A private copy of the checkpoint, to damage."""
    return Path(shutil.copytree(checkpoint, tmp_path / "checkpoint"))


def read_manifest(pkg: Path) -> dict:
    return json.loads((pkg / MANIFEST_FILE).read_text())


def edit_manifest(pkg: Path, edit: Callable[[dict], object]) -> None:
    data = read_manifest(pkg)
    edit(data)
    (pkg / MANIFEST_FILE).write_text(json.dumps(data))


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place: same size, different content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def load_and_run(pkg: Path, **kwargs) -> np.ndarray:
    """Load the package and run it: a bad package must fail in one or the other."""
    with mobilemoe.load(pkg, **kwargs) as model:
        return model.logits(IDS)


def template(data: dict) -> dict:
    return next(iter(data["templates"].values()))


def rewrite_weights(folder: Path, edit: Callable[[dict[str, np.ndarray]], object]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def expert_name(layer: int, expert: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


# -- the package ----------------------------------------------------------------------------


def test_the_undamaged_package_loads_and_runs(package):
    # The baseline every other test in this section departs from.
    assert np.isfinite(load_and_run(package)).all()


def test_missing_manifest(pkg):
    (pkg / MANIFEST_FILE).unlink()
    with pytest.raises(PackageError, match="no manifest.json; not a mobilemoe package"):
        mobilemoe.load(pkg)


def test_package_path_that_does_not_exist(tmp_path):
    with pytest.raises(PackageError, match="not a folder"):
        mobilemoe.load(tmp_path / "nothing.mmoe")


@pytest.mark.parametrize("graph", ["embed.onnx", "layer_001.onnx", "head.onnx", "expert_*.onnx"])
def test_missing_graph_file(pkg, graph):
    victim = next((pkg / "graphs").glob(graph))
    victim.unlink()
    with pytest.raises(PackageError, match=f"missing file graphs/{re.escape(victim.name)}"):
        mobilemoe.load(pkg)


def test_renamed_expert_store(pkg):
    store = read_manifest(pkg)["expert_store"]["path"]
    os.rename(pkg / store, pkg / (store + ".old"))
    with pytest.raises(PackageError, match=f"missing file {re.escape(store)}"):
        mobilemoe.load(pkg)


@pytest.mark.parametrize("graph", ["embed.onnx", "layer_000.onnx", "head.onnx", "expert_*.onnx"])
def test_graph_modified_with_the_same_size(pkg, graph):
    victim = next((pkg / "graphs").glob(graph))
    size = victim.stat().st_size
    flip_byte(victim, size // 2)
    assert victim.stat().st_size == size
    with pytest.raises(PackageError, match=f"{re.escape(victim.name)} does not match its checksum"):
        load_and_run(pkg)


def test_truncated_expert_store(pkg):
    store = pkg / read_manifest(pkg)["expert_store"]["path"]
    size = store.stat().st_size
    with open(store, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(PackageError, match=rf"is {size - 100} bytes, the manifest says {size}"):
        mobilemoe.load(pkg)


def test_expert_store_with_extra_bytes(pkg):
    # Replaced by another file of another size: caught by the same check.
    store = pkg / read_manifest(pkg)["expert_store"]["path"]
    with open(store, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(PackageError, match="the manifest says"):
        mobilemoe.load(pkg)


def test_the_fast_crc32_is_zlibs():
    """Packages record zlib's CRC-32; the runtime checks with zlib-ng's where installed."""
    import zlib

    from mobilemoe import checksum

    assert checksum.crc32.__module__ == "zlib_ng.zlib_ng"  # a dependency: installed here
    rng = np.random.default_rng(0)
    for size in (0, 1, 63, 4096, 1 << 20, (1 << 20) + 7):
        block = rng.integers(0, 256, size, dtype=np.uint8)
        assert checksum.crc32(block) == zlib.crc32(block)


def test_corrupt_byte_in_every_layer0_expert(pkg):
    """Same size, so only the per-expert crc32 can notice; every forward pass pages layer-0
    experts in, so whether the runtime checks at load (calibration) or at page-in, it must
    refuse before computing with corrupt weights."""
    data = read_manifest(pkg)
    store = pkg / data["expert_store"]["path"]
    for e in data["experts"]:
        if e["layer"] == 0:
            flip_byte(store, e["offset"] + e["length"] // 2)
    with pytest.raises(PackageError, match="checksum mismatch at expert 0/"):
        load_and_run(pkg)


def test_expert_store_corrupted_after_load_is_caught_at_page_in(pkg):
    """The store changes under a loaded model (failing storage, another process): every
    page-in re-reads the expert, so it must be checked again, not only at load."""
    data = read_manifest(pkg)
    store = pkg / data["expert_store"]["path"]
    with mobilemoe.load(pkg) as model:
        # No forward pass has run yet, so the expert cache is empty and the first one pages in.
        for e in data["experts"]:
            flip_byte(store, e["offset"] + 7)
        with pytest.raises(PackageError, match="checksum mismatch"):
            model.logits(IDS)


def test_one_corrupt_expert_is_named_when_the_router_picks_it(pkg):
    """Only one expert is damaged: the others keep working until the router picks it, and
    then the error names it."""
    data = read_manifest(pkg)
    store = pkg / data["expert_store"]["path"]
    layer, expert = LAYERS - 1, EXPERTS - 1
    entry = next(e for e in data["experts"] if (e["layer"], e["expert"]) == (layer, expert))
    with mobilemoe.load(pkg) as model:
        flip_byte(store, entry["offset"] + entry["length"] // 2)
        with pytest.raises(PackageError, match=f"checksum mismatch at expert {layer}/{expert}"):
            for token in range(model.dims.vocab_size):  # one token at a time until it is picked
                assert np.isfinite(model.logits([token])).all()


@pytest.mark.parametrize("delta, hint", [(1, "upgrade mobilemoe"), (-1, "re-export")])
def test_other_format_version(pkg, delta, hint):
    version = FORMAT_VERSION + delta
    edit_manifest(pkg, lambda d: d.update(format_version=version))
    with pytest.raises(PackageError, match=rf"package format {version}, this runtime reads "
                                           rf"{FORMAT_VERSION}: .*{hint}"):
        mobilemoe.load(pkg)


def test_not_a_mobilemoe_manifest(pkg):
    edit_manifest(pkg, lambda d: d.update(format="gguf"))
    with pytest.raises(PackageError, match="not a mobilemoe manifest"):
        mobilemoe.load(pkg)


# Every path field of the manifest, as (description, setter).
PATH_FIELDS = {
    "embed_graph": lambda d, p: d["embed_graph"].update(path=p),
    "layer_graph": lambda d, p: d["layer_graphs"][1].update(path=p),
    "head_graph": lambda d, p: d["head_graph"].update(path=p),
    "template_graph": lambda d, p: template(d)["graph"].update(path=p),
    "expert_store": lambda d, p: d["expert_store"].update(path=p),
    "tokenizer_file": lambda d, p: d.update(tokenizer_file=p),
}


@pytest.mark.parametrize("field", sorted(PATH_FIELDS))
def test_path_escaping_the_package(pkg, field):
    # The file exists outside, so only the containment check can refuse it.
    (pkg.parent / "outside.onnx").write_bytes((pkg / "graphs" / "embed.onnx").read_bytes())
    edit_manifest(pkg, lambda d: PATH_FIELDS[field](d, "../outside.onnx"))
    with pytest.raises(PackageError, match="'../outside.onnx' escapes the package folder"):
        load_and_run(pkg)


@pytest.mark.parametrize("field", sorted(PATH_FIELDS))
def test_absolute_path(pkg, field):
    edit_manifest(pkg, lambda d: PATH_FIELDS[field](d, "/etc/passwd"))
    with pytest.raises(PackageError, match="'/etc/passwd' is absolute"):
        load_and_run(pkg)


def test_symlink_escaping_the_package(pkg):
    # A relative path that looks innocent but is a symlink to a file outside.
    outside = pkg.parent / "outside.onnx"
    shutil.copyfile(pkg / "graphs" / "head.onnx", outside)
    (pkg / "graphs" / "head.onnx").unlink()
    (pkg / "graphs" / "head.onnx").symlink_to(outside)
    with pytest.raises(PackageError, match="escapes the package folder"):
        mobilemoe.load(pkg)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe garbage"])
def test_manifest_not_json(pkg, text):
    (pkg / MANIFEST_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(PackageError, match="manifest is not valid JSON"):
        mobilemoe.load(pkg)


@pytest.mark.parametrize("text", ["[1, 2]", "null", "42"])
def test_manifest_json_but_not_an_object(pkg, text):
    (pkg / MANIFEST_FILE).write_text(text)
    with pytest.raises(PackageError, match="not a mobilemoe manifest"):
        mobilemoe.load(pkg)


@pytest.mark.parametrize("where, key", [
    ((), "dims"), ((), "experts"), ((), "format_version"), ((), "expert_store"),
    (("dims",), "hidden_size"), (("routing",), "top_k"), (("quantization",), "block_size"),
    (("head_graph",), "size"), (("expert_store",), "path"),
])
def test_manifest_missing_field(pkg, where, key):
    def drop(d):
        for k in where:
            d = d[k]
        d.pop(key, None)
    edit_manifest(pkg, drop)
    dotted = ".".join([*where, key])
    with pytest.raises(PackageError, match=f"missing field {re.escape(dotted)}"):
        mobilemoe.load(pkg)


def test_manifest_missing_field_in_an_expert_entry(pkg):
    edit_manifest(pkg, lambda d: d["experts"][3].pop("crc32"))
    with pytest.raises(PackageError, match=r"missing field experts\[\]\.crc32"):
        mobilemoe.load(pkg)


# (field, setter, words the message must contain). Every manifest value is untrusted input:
# a wrong type must be a PackageError naming the field, not a TypeError from deep inside.
WRONG_TYPES = {
    "dims.hidden_size": (lambda d: d["dims"].update(hidden_size="72"), "dims.hidden_size"),
    "layer_graphs": (lambda d: d.update(layer_graphs={"0": 1}), "layer_graphs"),
    "experts[].offset": (lambda d: d["experts"][0].update(offset=1.5), r"experts\[\]\.offset"),
    "routing.normalize_top_k": (lambda d: d["routing"].update(normalize_top_k=1),
                                "routing.normalize_top_k"),
    "tokenizer_file": (lambda d: d.update(tokenizer_file=5), "tokenizer_file"),
    "eos_token_ids": (lambda d: d.update(eos_token_ids=7), "eos_token_ids"),
    "bos_token_id": (lambda d: d.update(bos_token_id="one"), "bos_token_id"),
    "generation": (lambda d: d.update(generation=[1, 2]), "generation"),
    "rope.inv_freq": (lambda d: d["rope"].update(inv_freq=["x"] * len(d["rope"]["inv_freq"])),
                      "rope.inv_freq"),
}


@pytest.mark.parametrize("field", list(WRONG_TYPES))
def test_manifest_field_of_the_wrong_type(pkg, field):
    setter, words = WRONG_TYPES[field]
    edit_manifest(pkg, setter)
    with pytest.raises(PackageError, match=words):
        load_and_run(pkg)


# Values of the right type that still describe an impossible package.
INCONSISTENT = {
    "tensor shape does not fill its bytes":
        (lambda d: template(d)["tensors"][0].update(shape=[3, 3]), "gate_up.qweight"),
    "tensor dtype unknown":
        (lambda d: template(d)["tensors"][0].update(dtype="nonsense"), "gate_up.qweight"),
    "tensor dtype holds Python objects":
        (lambda d: template(d)["tensors"][1].update(dtype="object"), "gate_up.scales"),
    "router scoring unknown": (lambda d: d["routing"].update(scoring="tanh"), "scoring"),
    "top_k above experts": (lambda d: d["routing"].update(top_k=99), "top_k"),
    "fewer layer graphs than layers": (lambda d: d["layer_graphs"].pop(), "layer graphs"),
    "expert past the store": (lambda d: d["experts"][-1].update(offset=1 << 30), "expert"),
    "duplicate expert": (lambda d: d["experts"][1].update(expert=0), "duplicate expert"),
    "unknown template": (lambda d: d["experts"][0].update(template="nope"), "unknown template"),
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_manifest_inconsistent_values(pkg, case):
    setter, words = INCONSISTENT[case]
    edit_manifest(pkg, setter)
    with pytest.raises(PackageError, match=words):
        load_and_run(pkg)


@pytest.mark.parametrize("name, content", [
    ("tokenizer.json", b"{ this is not a tokenizer"),
    ("tokenizer_config.json", b"\x00\x01 not json"),
])
def test_corrupt_tokenizer_files(pkg, name, content):
    # Tokenizer files carry no checksum in the manifest, so they must at least be parsed
    # with a clear error rather than a tokenizers/json traceback.
    (pkg / name).write_bytes(content)
    with pytest.raises(PackageError, match=re.escape(name)):
        mobilemoe.load(pkg)


# -- the exporter ---------------------------------------------------------------------------


def test_the_undamaged_checkpoint_exports(ckpt, tmp_path):
    out = export_model(ckpt, tmp_path / "ok.mmoe", progress=False)
    assert (out / MANIFEST_FILE).is_file()


def test_unsupported_architecture(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"unsupported architecture: model_type 'llama' "
                                          r"\(LlamaForCausalLM\); supported: .*mixtral"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)
    assert not (tmp_path / "out.mmoe").exists()


def test_config_not_json(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{oops")
    with pytest.raises(ExportError, match="config.json: not valid JSON"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)


def test_config_missing_a_dimension(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    del config["num_local_experts"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="config.json has no num_experts"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    with pytest.raises(ExportError, match="no config.json"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)


def test_extra_tensor_nobody_claims(ckpt, tmp_path):
    name = "model.layers.0.block_sparse_moe.shared_expert.w1.weight"
    rewrite_weights(ckpt, lambda t: t.update({name: np.zeros((4, 72), np.float32)}))
    with pytest.raises(ExportError, match=rf"1 checkpoint tensor\(s\) not claimed by the mixtral "
                                          rf"architecture spec: {re.escape(name)}"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)


def test_tensor_of_a_layer_the_config_does_not_have(ckpt, tmp_path):
    extra = expert_name(LAYERS, 0, "w1")  # layer index == num_layers: one too many
    rewrite_weights(ckpt, lambda t: t.update({extra: t[expert_name(0, 0, "w1")].copy()}))
    with pytest.raises(ExportError, match=rf"layer {LAYERS} but the config has {LAYERS} layers"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)


def test_missing_expert_tensor(ckpt, tmp_path):
    rewrite_weights(ckpt, lambda t: t.pop(expert_name(1, 2, "w3")))
    with pytest.raises(ExportError, match=r"missing 1 tensor\(s\): layer 1 expert 2 expert_up"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)


def test_missing_dense_tensor(ckpt, tmp_path):
    rewrite_weights(ckpt, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ExportError, match=r"missing 1 tensor\(s\): layer 0 attn_k"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)


def test_tensor_with_a_wrong_shape(ckpt, tmp_path):
    name = expert_name(0, 1, "w2")  # [hidden, intermediate] = [72, 88]
    rewrite_weights(ckpt, lambda t: t.update({name: np.zeros((72, 80), np.float32)}))
    with pytest.raises(ExportError, match=rf"{re.escape(name)}: shape \[72, 80\], the config "
                                          rf"implies \[72, 88\]"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)


def test_corrupt_safetensors_header(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#" * 12  # the JSON header starts at byte 8
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="model.safetensors: corrupt safetensors header"):
        export_model(ckpt, tmp_path / "out.mmoe", progress=False)


def test_only_pickle_weights(checkpoint, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(checkpoint / "config.json", folder / "config.json")
    # A real (tiny) pickle checkpoint, as old hub repos have: it is refused, never unpickled.
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ExportError, match="pickle"):
        export_model(folder, tmp_path / "out.mmoe", progress=False)
    assert not (tmp_path / "out.mmoe").exists()


@pytest.mark.parametrize("src", ["/no/such/checkpoint/folder", "./not-here/a/b", "bad id!"])
def test_nonexistent_path_that_is_not_a_hub_id(tmp_path, src):
    with pytest.raises(ExportError, match="no such folder, and not a hub id"):
        export_model(src, tmp_path / "out.mmoe", progress=False)


def test_source_is_a_file(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="not a folder"):
        export_model(checkpoint / "model.safetensors", tmp_path / "out.mmoe", progress=False)


def test_output_already_exists(checkpoint, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="already exists"):
        export_model(checkpoint, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("name, value, words", [
    ("bits", 3, "bits must be 4 or 8, got 3"),
    ("dense_bits", 16, "dense_bits must be 4 or 8, got 16"),
    ("block_size", 48, "block size must be a power of two >= 16, got 48"),
    ("block_size", 8, "block size must be a power of two >= 16, got 8"),
    ("accuracy_level", 7, "accuracy level must be 0-4, got 7"),
    ("mla_cache", "compressed", "the MLA cache must be 'latent' or 'expanded', got 'compressed'"),
])
def test_bad_export_settings(checkpoint, tmp_path, name, value, words):
    with pytest.raises(ExportError, match=re.escape(words)):
        export_model(checkpoint, tmp_path / "out.mmoe", progress=False, **{name: value})
    assert not (tmp_path / "out.mmoe").exists()


def sharded_with_a_truncated_late_shard(folder: Path) -> None:
    """A sharded checkpoint whose shard holding the last layer's experts is cut short.

    Headers and shapes are intact, so the exporter only notices when it reads those tensors,
    after it has written the embedding, the head and all of layer 0: an export failing midway.
    """
    build_mixtral(folder, seed=3, max_shard_size="100KB")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map[expert_name(LAYERS - 1, EXPERTS - 1, "w2")]
    in_shard = [name for name, f in weight_map.items() if f == shard]
    # Only tensors the exporter reads last are in it (transformers shards experts together).
    assert all(name.startswith(f"model.layers.{LAYERS - 1}.block_sparse_moe.experts.")
               for name in in_shard), in_shard
    path = folder / shard
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 64)


def test_export_failing_midway_leaves_nothing_behind(tmp_path):
    src = tmp_path / "sharded"
    sharded_with_a_truncated_late_shard(src)
    work = tmp_path / "work"
    work.mkdir()
    (work / "unrelated.txt").write_text("x")
    with pytest.raises(ExportError, match="truncated or corrupt"):
        export_model(src, work / "out.mmoe", progress=False)
    # Neither the package nor its temporary (".out.mmoe.partial-PID") folder is left.
    assert sorted(p.name for p in work.iterdir()) == ["unrelated.txt"]


def test_failed_overwrite_keeps_the_old_package(package, tmp_path):
    src = tmp_path / "sharded"
    sharded_with_a_truncated_late_shard(src)
    work = tmp_path / "work"
    out = Path(shutil.copytree(package, work / "out.mmoe"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ExportError, match="truncated or corrupt"):
        export_model(src, out, overwrite=True, progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in work.iterdir()) == ["out.mmoe"]
    np.testing.assert_array_equal(load_and_run(out), load_and_run(package))


# -- runtime settings -----------------------------------------------------------------------

_MINIMUM = re.compile(r"needs at least ([0-9.]+ [KMGT]?B)")


@pytest.mark.parametrize("budget", [1, "1KB", "1MB"])
def test_budget_below_the_minimum_names_the_smallest_budget_that_works(package, budget):
    with pytest.raises(BudgetError, match="too small: this model needs at least") as error:
        mobilemoe.load(package, memory_budget=budget)
    minimum = _MINIMUM.search(str(error.value)).group(1)
    # The promise: the number in the message is enough. Loading with exactly it works.
    with mobilemoe.load(package, memory_budget=minimum) as model:
        assert np.isfinite(model.logits(IDS)).all()
        assert model.stats.memory_budget == parse_bytes(minimum)


@pytest.mark.parametrize("budget, words", [
    ("lots", "not a byte size: 'lots'"),
    ("-5MB", "not a byte size: '-5MB'"),
    ("5 parsecs", "not a byte size"),
    ("", "not a byte size"),
    ("0MB", "must be positive"),
    (0, "must be positive"),
    (-5, "must be positive"),
    (True, "not a byte size"),
])
def test_unreadable_budget(package, budget, words):
    with pytest.raises(MobileMoEError, match=words):
        mobilemoe.load(package, memory_budget=budget)


@pytest.mark.parametrize("bad", [320, 10**9, -1])
def test_token_id_out_of_range(package, bad):
    with mobilemoe.load(package) as model:
        vocab = model.dims.vocab_size
        assert vocab == 320
        with pytest.raises(MobileMoEError, match=rf"token id {bad} out of range \(vocab size 320\)"):
            model.logits([1, 2, bad])
        with pytest.raises(MobileMoEError, match=f"token id {bad} out of range"):
            next(model.generate([bad, 1]))
        # The model is still usable after refusing bad input.
        assert np.isfinite(model.logits([1, 2, 3])).all()


def test_empty_token_list(package):
    with mobilemoe.load(package) as model:
        with pytest.raises(MobileMoEError, match="at least one token"):
            model.logits([])
        with pytest.raises(MobileMoEError, match="the prompt is empty"):
            next(model.generate([]))


def test_layer_graph_from_another_exporter_version(pkg):
    """A layer graph whose outputs are not the ones the runtime reads (e.g. the name an older
    exporter used) is refused at load, even with a matching checksum."""
    path = pkg / "graphs" / "layer_000.onnx"
    model = onnx.load(path)
    for node in model.graph.node:
        for values in (node.input, node.output):
            values[:] = ["attn_residual" if v == "residual" else v for v in values]
    for output in model.graph.output:
        if output.name == "residual":
            output.name = "attn_residual"
    data = model.SerializeToString()
    path.write_bytes(data)

    def point_at_new_graph(d: dict) -> None:
        d["layer_graphs"][0].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())

    edit_manifest(pkg, point_at_new_graph)
    with pytest.raises(PackageError, match=r"layer 0's graph lacks inputs or outputs \['residual'\]"):
        mobilemoe.load(pkg)
