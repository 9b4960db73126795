"""Blockwise symmetric quantization in the layout of ONNX Runtime's `MatMulNBits`.

A weight W of a linear layer, [N out, K in] as PyTorch stores it, becomes:
- `qweight` uint8 [N, K_blocks, block_size * bits / 8]: each row cut into blocks of
  `block_size` along K (the last block zero-padded); 4-bit values are packed two per byte,
  low nibble first;
- `scales` float32 [N * K_blocks].
Symmetric: q = round(w / scale) with scale = max|w| / qmax per block, stored with the implicit
zero point of MatMulNBits (8 for 4 bits, 128 for 8 bits), so no zero-point tensor is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantizedLinear:
    qweight: np.ndarray  # uint8 [N, K_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N * K_blocks]
    bits: int
    block_size: int
    in_features: int  # K

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes


ROWS_PER_CHUNK = 1024  # bounds the float temporaries to a few MB whatever the matrix size


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int) -> QuantizedLinear:
    """Quantize a float32 [N, K] weight for MatMulNBits (see the module docstring)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, got {block_size}")
    n, k = weight.shape
    k_blocks = -(-k // block_size)
    qweight = np.empty((n, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    for begin in range(0, n, ROWS_PER_CHUNK):
        rows = slice(begin, min(n, begin + ROWS_PER_CHUNK))
        qweight[rows], scales[rows] = _quantize_rows(weight[rows], bits, block_size, k_blocks)
    return QuantizedLinear(qweight=qweight, scales=scales.reshape(-1), bits=bits,
                           block_size=block_size, in_features=k)


def _quantize_rows(weight: np.ndarray, bits: int, block_size: int,
                   k_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    n, k = weight.shape
    padded = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, k_blocks, block_size)  # [N, K_blocks, block]
    qmax = (1 << (bits - 1)) - 1
    scales = np.abs(blocks).max(axis=-1) / qmax  # [N, K_blocks]
    scales[scales == 0] = 1.0  # an all-zero block: any scale dequantizes to zero
    q = np.clip(np.rint(blocks / scales[..., None]), -qmax, qmax).astype(np.int16)
    q = (q + (1 << (bits - 1))).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scales


def dequantize_blockwise(q: QuantizedLinear) -> np.ndarray:
    """The float32 [N, K] weight that `q` stands for: what MatMulNBits multiplies by."""
    n, k_blocks, _ = q.qweight.shape
    if q.bits == 4:
        values = np.empty((n, k_blocks, q.block_size), dtype=np.int16)
        values[..., 0::2] = q.qweight & 0x0F
        values[..., 1::2] = q.qweight >> 4
    else:
        values = q.qweight.astype(np.int16)
    values = values - (1 << (q.bits - 1))
    weight = values * q.scales.reshape(n, k_blocks)[..., None]
    return weight.reshape(n, -1)[:, : q.in_features].astype(np.float32)


@dataclass(frozen=True)
class QuantizedRows:
    """Per-row symmetric int8 (used for the embedding table, which is gathered, not multiplied)."""

    values: np.ndarray  # int8 [V, H]
    scales: np.ndarray  # float32 [V, 1]


def quantize_rows_int8(table: np.ndarray) -> QuantizedRows:
    scales = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scales[scales == 0] = 1.0
    values = np.clip(np.rint(table / scales), -127, 127).astype(np.int8)
    return QuantizedRows(values=values, scales=scales.astype(np.float32))


def dequantize_rows(q: QuantizedRows) -> np.ndarray:
    return (q.values.astype(np.float32) * q.scales).astype(np.float32)
