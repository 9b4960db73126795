"""Byte sizes as people write them: "512MB", "2GiB", "1.5 GB", or a plain integer."""

from __future__ import annotations

import math
import re

from mobilemoe.errors import MobileMoEError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Parse a byte size. Decimal units (MB, GB) are powers of 10; binary ones (MiB, GiB, or
    the single letters K/M/G as in `ulimit`) are powers of 2."""
    if isinstance(value, bool):
        raise MobileMoEError(f"not a byte size: {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise MobileMoEError(f"a byte size must be positive, got {value}")
        return int(value)
    match = _PATTERN.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise MobileMoEError(
            f"not a byte size: {value!r} (write e.g. 512MB, 2GiB or a number of bytes)"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise MobileMoEError(f"a byte size must be positive, got {value!r}")
    return size


def format_bytes(size: int | float, round_up: bool = False) -> str:
    """Human-readable size in decimal units, e.g. 1.50 GB. round_up: never print less than
    `size` (for a minimum that must be enough when typed back in)."""
    size = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            if unit == "B":
                return f"{math.ceil(size) if round_up else round(size)} B"
            shown = math.ceil(size * 100) / 100 if round_up else size
            return f"{shown:.2f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
