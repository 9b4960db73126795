"""The CRC-32 of expert blocks: zlib's function, which the package format records.

zlib-ng computes the same CRC-32 with SIMD instructions: 10.5 GB/s on this machine against the
system zlib's 1.95, and like zlib it releases the GIL. Every page-in checks its block on a
second thread beside the session build, and on two cores that thread takes time from the build.
"""

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # no zlib-ng wheel for this platform: the standard library's, slower
    from zlib import crc32

__all__ = ["crc32"]
