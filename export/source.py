"""Where a checkpoint comes from: a local folder, or a hub id fetched with huggingface_hub."""

from __future__ import annotations

import re
from pathlib import Path

from mobilemoe.errors import ExportError

# Only what the exporter reads: weights as safetensors, configs, tokenizer files.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken",
                "*.txt"]
# Top-level files only: some repos carry other copies of the weights in subfolders
# (gpt-oss's original/ holds 13 GB the exporter never reads).
HUB_IGNORE = ["*/*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_checkpoint(src: str | Path, revision: str | None = None) -> Path:
    """A folder holding config.json and safetensors weights, for a local path or a hub id."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"{src}: not a folder (give the checkpoint folder, not a file)")
        return _check_folder(path, str(src))
    if not _HUB_ID.match(str(src)):
        raise ExportError(f"{src}: no such folder, and not a hub id (owner/name)")
    return _check_folder(_download(str(src), revision), str(src))


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:
        raise ExportError("hub ids need huggingface-hub: pip install 'mobilemoe[export]'") from None
    try:
        if not constants.is_offline_mode():
            files = HfApi().list_repo_files(repo_id, revision=revision)
            if not any(f.endswith(".safetensors") for f in files):
                _refuse_pickle(repo_id, files)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                      ignore_patterns=HUB_IGNORE))
    except LocalEntryNotFoundError:
        raise ExportError(
            f"{repo_id}: not in the local Hugging Face cache and the hub is offline "
            "(HF_HUB_OFFLINE=1 or no network); download it once while online"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ExportError(
            f"{repo_id}: not found on the hub or not accessible ({e.__class__.__name__})"
        ) from None
    except HfHubHTTPError as e:
        raise ExportError(f"{repo_id}: hub request failed: {str(e).splitlines()[0]}") from None


def _refuse_pickle(where: str, files: list[str]) -> None:
    if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files):
        raise ExportError(
            f"{where}: has only pickle weights (.bin/.pt); mobilemoe reads safetensors only, "
            "because loading pickle can run arbitrary code"
        )
    raise ExportError(f"{where}: has no .safetensors weights")


def _check_folder(folder: Path, name: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ExportError(f"{name}: no config.json; not a Hugging Face checkpoint folder")
    if not any(folder.glob("*.safetensors")):
        _refuse_pickle(name, [p.name for p in folder.iterdir()])
    return folder
