"""Read a Hugging Face checkpoint tensor by tensor, without torch.

Why not the `safetensors` package: its numpy backend cannot return bfloat16 tensors, and
most MoE checkpoints on the hub are bfloat16. The format is simple (an 8-byte header length,
a JSON header, then raw little-endian data), so we memory-map each file and convert one
tensor at a time: the exporter's memory stays near the largest tensor, not the model.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mobilemoe.errors import ExportError

# safetensors dtype name -> (numpy dtype of the stored bits, converter to float32)
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 in _to_float32
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: shift the bits into place.
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class _SafetensorsFile:
    """One memory-mapped .safetensors file; tensors are views until converted."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ExportError(f"{path.name}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if header_len > size - 8:
                raise ExportError(f"{path.name}: corrupt safetensors header")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as e:
                raise ExportError(f"{path.name}: corrupt safetensors header ({e})") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._size = size
        self.entries: dict[str, dict] = header

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process: a read-only file mapping keeps every page
        it touched resident (and counted in RSS) until unmapped, which would make the
        exporter's memory grow to the size of the checkpoint."""
        begin, end = self.entries[name]["data_offsets"]
        page = mmap.PAGESIZE
        start = (self._data_start + begin) // page * page
        if self._map is not None and end > begin and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, start, self._data_start + end - start)

    def raw(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise ExportError(f"{self.path.name}: tensor {name} has unsupported dtype {dtype}")
        begin, end = entry["data_offsets"]
        begin += self._data_start
        end += self._data_start
        count = int(np.prod(entry["shape"], dtype=np.int64))
        if end > self._size or end - begin != count * _DTYPES[dtype].itemsize:
            raise ExportError(f"{self.path.name}: tensor {name} is truncated or corrupt")
        return np.frombuffer(self._map, dtype=_DTYPES[dtype], count=count, offset=begin).reshape(
            entry["shape"]
        )


class Checkpoint:
    """All safetensors files of one checkpoint folder, addressed by tensor name."""

    def __init__(self, folder: Path):
        self.folder = folder
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
                raise ExportError(
                    f"{folder}: only pickle weights (.bin/.pt) found; mobilemoe reads safetensors "
                    "only (pickle files can run code). Convert them with transformers' "
                    "`save_pretrained(..., safe_serialization=True)` first."
                )
            raise ExportError(f"{folder}: no .safetensors files found")
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
            if missing:
                raise ExportError(f"{folder}: shard(s) named in the index are missing: {missing}")
            files = [folder / f for f in sorted(set(weight_map.values()))]
        self._files = [_SafetensorsFile(p) for p in files]
        self._where: dict[str, _SafetensorsFile] = {}
        for sf in self._files:
            for name in sf.entries:
                self._where[name] = sf

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(name)

    def raw(self, name: str) -> np.ndarray:
        """The stored bits as a read-only memory-mapped view (slicing it reads only the slice)."""
        return self._where[name].raw(name)

    def float32(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor (or its `index`-th slice along axis 0) as a fresh float32 array."""
        raw = self.raw(name)
        if index is not None:
            raw = raw[index]
        converted = _to_float32(raw, self._where[name].dtype(name))  # always a copy
        del raw
        self._where[name].release(name)
        return converted

    def copy(self, name: str, index: int | None = None) -> np.ndarray:
        """The stored bits unconverted (packed formats: MXFP4's uint8 blocks and scales), or
        their `index`-th slice along axis 0, as a fresh array; the mapped pages are released."""
        raw = self.raw(name)
        out = np.array(raw if index is None else raw[index])
        del raw
        self._where[name].release(name)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
