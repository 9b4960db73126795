"""Hub ids: the exporter's huggingface_hub path, against a real local cache and no network.

Each test lays out a Hugging Face cache folder the way huggingface_hub writes one:

    <cache>/models--<org>--<name>/
        refs/main                      the commit hash the branch points to
        blobs/<sha256>                 file contents, stored once
        snapshots/<commit>/<file>      relative symlinks into ../../blobs

and points huggingface_hub at it in offline mode, so `export_model("org/name", ...)` resolves
the id exactly as it would on a machine that downloaded the model earlier.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import build_mixtral
from huggingface_hub import constants as hf_constants
from mobilemoe.export import export_model

import mobilemoe
from mobilemoe import ExportError

REPO = "org/tiny-mixtral"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
IDS = [1, 17, 4, 99, 230, 8, 2, 64]


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT,
               branch: str = "main") -> Path:
    """Write `files` into `cache` as huggingface_hub caches a model repo; the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "tiny-mixtral"
    build_mixtral(folder, seed=11)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline.

    huggingface_hub (2.x) reads HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE into
    `huggingface_hub.constants` once, at import, and its functions read those module
    attributes at call time (`constants.HF_HUB_CACHE` as the default cache_dir,
    `constants.is_offline_mode()` returns `constants.HF_HUB_OFFLINE`). Setting the environment
    variables alone is too late once the package has been imported (this module imports it),
    so both the variables (for anything imported later or in subprocesses) and the constants
    are patched.
    """
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert hf_constants.is_offline_mode()
    return cache


def logits_of(package: Path) -> np.ndarray:
    with mobilemoe.load(package) as model:
        return model.logits(IDS)


def test_export_from_the_cache_equals_export_of_the_folder(checkpoint, hub_cache, tmp_path):
    snapshot = cache_repo(hub_cache, REPO, folder_files(checkpoint))
    assert (snapshot / "model.safetensors").is_symlink()

    from_hub = export_model(REPO, tmp_path / "hub.mmoe", progress=False)
    from_folder = export_model(checkpoint, tmp_path / "folder.mmoe", progress=False)

    assert from_hub == tmp_path / "hub.mmoe"
    assert (from_hub / "experts.bin").read_bytes() == (from_folder / "experts.bin").read_bytes()
    assert (from_hub / "tokenizer.json").is_file()
    np.testing.assert_array_equal(logits_of(from_hub), logits_of(from_folder))
    # Exporting read the cache and changed nothing in it.
    assert (hub_cache / "models--org--tiny-mixtral" / "refs" / "main").read_text() == COMMIT


def test_export_of_a_revision_from_the_cache(checkpoint, hub_cache, tmp_path):
    cache_repo(hub_cache, REPO, folder_files(checkpoint))
    out = export_model(REPO, tmp_path / "rev.mmoe", revision=COMMIT, progress=False)
    assert np.isfinite(logits_of(out)).all()


def test_sharded_checkpoint_from_the_cache(hub_cache, tmp_path):
    local = tmp_path / "sharded"
    build_mixtral(local, seed=11, max_shard_size="100KB")
    assert (local / "model.safetensors.index.json").is_file()
    cache_repo(hub_cache, "org/sharded", folder_files(local))
    from_hub = export_model("org/sharded", tmp_path / "hub.mmoe", progress=False)
    from_folder = export_model(local, tmp_path / "folder.mmoe", progress=False)
    np.testing.assert_array_equal(logits_of(from_hub), logits_of(from_folder))


def test_unknown_hub_id_offline(hub_cache, tmp_path):
    with pytest.raises(ExportError, match="nobody/not-cached: not in the local Hugging Face cache"):
        export_model("nobody/not-cached", tmp_path / "out.mmoe", progress=False)
    assert not (tmp_path / "out.mmoe").exists()


def test_revision_not_in_the_cache(checkpoint, hub_cache, tmp_path):
    cache_repo(hub_cache, REPO, folder_files(checkpoint))
    with pytest.raises(ExportError, match="not in the local Hugging Face cache"):
        export_model(REPO, tmp_path / "out.mmoe", revision="v2", progress=False)


def test_cached_repo_with_only_pickle_weights(checkpoint, hub_cache, tmp_path):
    pickled = tmp_path / "pytorch_model.bin"
    torch.save({"model.norm.weight": torch.ones(72)}, pickled)
    cache_repo(hub_cache, "org/old-mixtral", {
        "config.json": (checkpoint / "config.json").read_bytes(),
        "pytorch_model.bin": pickled.read_bytes(),
    })
    with pytest.raises(ExportError, match=r"org/old-mixtral: has only pickle weights.*"
                                          r"safetensors only"):
        export_model("org/old-mixtral", tmp_path / "out.mmoe", progress=False)
    assert not (tmp_path / "out.mmoe").exists()


def test_cached_repo_without_config(checkpoint, hub_cache, tmp_path):
    cache_repo(hub_cache, "org/no-config",
               {"model.safetensors": (checkpoint / "model.safetensors").read_bytes()})
    with pytest.raises(ExportError, match="org/no-config: no config.json"):
        export_model("org/no-config", tmp_path / "out.mmoe", progress=False)


@pytest.mark.parametrize("src", [
    "/no/such/folder",  # an absolute path: never a hub id
    "org/name/extra",  # three parts
    "org/",  # no name
    "-org/name",  # hub ids start with a letter or digit
    "org name/model",  # spaces
    "~/no-such-folder-for-mobilemoe-tests",
])
def test_neither_a_folder_nor_a_hub_id(hub_cache, tmp_path, src):
    with pytest.raises(ExportError, match="no such folder, and not a hub id"):
        export_model(src, tmp_path / "out.mmoe", progress=False)


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(checkpoint, hub_cache, tmp_path,
                                                           monkeypatch):
    # "org/tiny-mixtral" is both a relative folder here and a hub id that is not cached:
    # an existing folder is used, and the hub is never asked.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoint, tmp_path / "org" / "tiny-mixtral")
    out = export_model(REPO, tmp_path / "out.mmoe", progress=False)
    assert np.isfinite(logits_of(out)).all()
