"""RoPE frequencies, computed at export with numpy so the runtime only needs `inv_freq`.

The formulas follow transformers' `modeling_rope_utils` (default, linear and YaRN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mobilemoe.errors import ExportError
from mobilemoe.manifest import ModelDims


@dataclass(frozen=True)
class RopeParameters:
    inv_freq: np.ndarray  # float32 [rope_dim / 2]
    attention_scaling: float  # multiplies cos and sin
    interleaved: bool  # pairs (x0, x1), (x2, x3) rotate together (DeepSeek), not halves


def rope_parameters(config: dict, dims: ModelDims) -> RopeParameters:
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    mla = config.get("qk_rope_head_dim") is not None
    dim = int(config["qk_rope_head_dim"]) if mla else int(
        dims.head_dim * float(params.get("partial_rotary_factor",
                                         config.get("partial_rotary_factor", 1.0))))
    base_freq = theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    if rope_type == "default":
        inv_freq, scaling = 1.0 / base_freq, 1.0
    elif rope_type == "linear":
        inv_freq, scaling = 1.0 / (float(params["factor"]) * base_freq), 1.0
    elif rope_type == "yarn":
        inv_freq, scaling = _yarn(params, config, dim, theta, base_freq)
    elif rope_type == "longrope":
        inv_freq, scaling = _longrope(params, config, base_freq)
    else:
        raise ExportError(f"unsupported rope type {rope_type!r} (supported: default, linear, yarn, longrope)")
    # DeepSeek-V2 always rotates interleaved pairs; V3 unless its config says rope_interleave=False
    interleaved = mla and bool(config.get("rope_interleave", True))
    return RopeParameters(np.asarray(inv_freq, dtype=np.float32), float(scaling), interleaved)


def _longrope(params: dict, config: dict, base_freq: np.ndarray) -> tuple[np.ndarray, float]:
    """Phi-3.5's LongRoPE with its *short* factors. transformers switches to the long factors
    once a sequence passes original_max_position_embeddings; the runtime keeps the short ones,
    which is exact for contexts up to that length (4096 for Phi-3.5-MoE, the default here)."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or config["max_position_embeddings"] / original
    # Phi-3.5's rotary embedding scales cos/sin by short_mscale within the original length.
    attention_factor = params.get("short_mscale") or params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = np.asarray(params["short_factor"], dtype=np.float32)
    return 1.0 / (short * base_freq), float(attention_factor)


def _yarn(params: dict, config: dict, dim: int, base: float,
          pos_freqs: np.ndarray) -> tuple[np.ndarray, float]:
    original = params.get("original_max_position_embeddings") or config["max_position_embeddings"]
    factor = params.get("factor") or config["max_position_embeddings"] / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all \
            else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(params.get("beta_fast") or 32)
    high = correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)
