"""MXFP4 (OCP microscaling FP4), the format GPT-OSS releases store their experts in; numpy only.

A weight W [N out, K in] is cut into blocks of 32 values along K. Each block is stored as
- 32 FP4 (e2m1) codes, two per byte, the *low* nibble holding the even element:
  `*_blocks` uint8 [..., N, K/32, 16];
- one shared power-of-two scale, an e8m0 exponent with bias 127: `*_scales` uint8 [..., N, K/32].
    W[n, 32 g + j] = FP4_E2M1[code(n, g, j)] * 2 ** (scales[n, g] - 127)
This is transformers' `convert_moe_packed_tensors` (integrations/mxfp4.py), which then
transposes to the module's [E, K, N] parameter: the blocks are [out, in], the transpose of
GPT-OSS's `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]`. So for `gate_up` the rows
alternate gate, up, gate, up ... (GPT-OSS's interleaving) and for `down` they are H rows of I.

Every decoded value is exact in float32 (2 significant bits, exponent in range), so the
exporter can requantize it to int4/int8 like any float weight.
"""

from __future__ import annotations

import numpy as np

from mobilemoe.errors import ExportError

BLOCK = 32  # values per shared scale
SCALE_BIAS = 127
SCALE_NAN = 255  # e8m0's one special value: NaN

# code -> value: bit 3 is the sign, bits 2..1 the exponent (bias 1), bit 0 the mantissa.
FP4_E2M1 = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def decode_fp4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., B] -> float32 [..., 2B]: byte b holds element 2b (low nibble), 2b+1 (high)."""
    out = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), dtype=np.float32)
    out[..., 0::2] = FP4_E2M1[packed & 0x0F]
    out[..., 1::2] = FP4_E2M1[packed >> 4]
    return out


def dequantize(blocks: np.ndarray, scales: np.ndarray, name: str = "MXFP4 tensor") -> np.ndarray:
    """One matrix: blocks uint8 [N, G, 16], scales uint8 [N, G] -> float32 [N, 32 G]."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ExportError(f"{name}: MXFP4 blocks and scales must be uint8, got "
                          f"{blocks.dtype} and {scales.dtype}")
    if blocks.ndim != 3 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ExportError(f"{name}: MXFP4 blocks {list(blocks.shape)} and scales "
                          f"{list(scales.shape)} do not match ([N, G, 16] and [N, G])")
    if (scales == SCALE_NAN).any():
        raise ExportError(f"{name}: MXFP4 scale 255 (NaN in e8m0): corrupt checkpoint")
    n, groups, _ = blocks.shape
    values = decode_fp4(blocks)  # [N, G, 32]
    exponents = scales.astype(np.int32)[..., None] - SCALE_BIAS  # [N, G, 1]
    np.ldexp(values, exponents, out=values)
    if not np.isfinite(values).all():  # 6 * 2^128 does not fit a float32
        raise ExportError(f"{name}: MXFP4 values overflow float32 (scales too large)")
    return values.reshape(n, groups * BLOCK)
