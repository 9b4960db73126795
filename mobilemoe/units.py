"""Byte sizes as people write them: "512MB", "2GiB", "1.5 GB", or a plain integer."""

from __future__ import annotations

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


def format_bytes(size: int | float) -> str:
    """Human-readable size in decimal units, e.g. 1.50 GB."""
    size = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} TB"
