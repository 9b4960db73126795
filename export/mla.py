"""Multi-head latent attention (DeepSeek-V2/V3), from standard ops plus MatMulNBits.

    x [T,H] ─ q_proj ─────────────────────────────┐        (q_lora_rank None: V2-Lite)
          └ q_a_proj ─ q_a_layernorm ─ q_b_proj ──┴─> q [T, nh, nope+R] ─ split
                                                      q_nope ────────────────┐
                                                      q_rope ─ RoPE ─────────┴─ concat ─> q
    x ─ kv_a_proj_with_mqa ─> [T, L+R] ─ split
          c_kv [T, L] ─ kv_a_layernorm ─ kv_b_proj ─> [T, nh, nope+Dv] ─ split ─> k_nope, v
          k_rope [T, 1, R] ─ RoPE ─ expand to nh heads (one rope key shared by all heads)
          k = concat(k_nope, k_rope) [T, nh, nope+R]
    attention_core(q, k, v) ─ o_proj ─> out [T, H]

The KV cache holds the expanded per-head keys [T, nh, nope+R] and values [T, nh, Dv] (padded
to nope+R: the fused attention wants one width): simple, and exact against transformers.
Caching the latent instead (c_kv [T, L] and k_rope [T, R]: 576 floats per token and layer for
DeepSeek-V2-Lite instead of 6,144) is a later
memory optimisation; it wants the "absorbed" form (q_nope through kv_b's key rows, kv_b's value
rows after the attention) to stay fast.

RoPE: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... (a complex multiplication);
`graphs.rope` rotates halves. With `rope_interleaved`, the rope rows of the q projection (each
head's last R rows) and of kv_a_proj_with_mqa (its last R rows) are reordered at export to
[x0, x2, x4, ... | x1, x3, x5, ...], so that rotating halves of the reordered vector is
DeepSeek's rotation, reordered alike. q and k are reordered the same way, so every q.k dot
product, and hence the attention, is unchanged. Reordering output rows commutes with the
blockwise quantization (blocks run along the input dimension).
"""

from __future__ import annotations

import numpy as np

from .architectures import Role
from .attention import AttentionInputs, AttentionOptions, Quantize, attention_core, step_rope_rows
from .graphs import GraphBuilder, linear, norm, rope

# transformers builds q_a_layernorm and kv_a_layernorm with DeepseekV2RMSNorm's default eps,
# not the config's rms_norm_eps (DeepSeek's own modelling code does the same).
LOW_RANK_NORM_EPS = 1e-6


def deinterleave_rope_rows(rows: int, period: int, offset: int, rope_dim: int) -> np.ndarray:
    """Row order for a weight of `rows` rows made of blocks of `period` rows, each with its
    rope part at [offset, offset + rope_dim): pairs (x0,x1),(x2,x3).. become halves."""
    order = np.arange(rows)
    halves = np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])
    for start in range(offset, rows, period):
        order[start:start + rope_dim] = start + halves
    return order


def mla_attention(b: GraphBuilder, inp: AttentionInputs, t: dict[Role, np.ndarray],
                  quantize: Quantize, o: AttentionOptions, path: str) -> str:
    """-> attention output [T, H]; keys [T, nh, nope+R] (with RoPE) and values go to the cache."""
    nh, d, dv, acc = o.num_heads, o.head_dim, o.value_head_dim, o.accuracy_level
    latent = t[Role.ATTN_KV_A_NORM].shape[0]  # kv_lora_rank
    r = t[Role.ATTN_KV_A].shape[0] - latent  # qk_rope_head_dim
    nope = d - r

    def reorder(w: np.ndarray, period: int, offset: int) -> np.ndarray:
        if not o.rope_interleaved:
            return w
        return w[deinterleave_rope_rows(w.shape[0], period, offset, r)]

    if Role.ATTN_Q_A in t:
        q = linear(b, inp.x, quantize(t[Role.ATTN_Q_A]), f"{path}/q_a_proj", acc)
        q = norm(b, q, t[Role.ATTN_Q_A_NORM], None, LOW_RANK_NORM_EPS, f"{path}/q_a_layernorm")
        q = linear(b, q, quantize(reorder(t[Role.ATTN_Q_B], d, nope)), f"{path}/q_b_proj", acc)
    else:
        q = linear(b, inp.x, quantize(reorder(t[Role.ATTN_Q], d, nope)), f"{path}/q_proj", acc)
    q = b.op("Reshape", [q, b.const([-1, nh, d])], f"{path}/q/Reshape")  # [T, nh, D]
    q_nope, q_rope = b.op("Split", [q, b.const([nope, r])], f"{path}/q/Split", n_out=2, axis=-1)

    kv_a = reorder(t[Role.ATTN_KV_A], latent + r, latent)
    compressed = linear(b, inp.x, quantize(kv_a), f"{path}/kv_a_proj_with_mqa", acc)  # [T, L+R]
    c_kv, k_rope = b.op("Split", [compressed, b.const([latent, r])], f"{path}/kv_a/Split",
                        n_out=2, axis=-1)
    c_kv = norm(b, c_kv, t[Role.ATTN_KV_A_NORM], None, LOW_RANK_NORM_EPS,
                f"{path}/kv_a_layernorm")
    kv = linear(b, c_kv, quantize(t[Role.ATTN_KV_B]), f"{path}/kv_b_proj", acc)
    kv = b.op("Reshape", [kv, b.const([-1, nh, nope + dv])], f"{path}/kv/Reshape")
    k_nope, v = b.op("Split", [kv, b.const([nope, dv])], f"{path}/kv/Split", n_out=2, axis=-1)

    cos, sin = (b.op("Unsqueeze", [y, b.const([1])], f"{path}/rope/{n}")  # [T, 1, R/2]
                for y, n in zip(step_rope_rows(b, inp, path), ("cos", "sin"), strict=True))
    q_rope = rope(b, q_rope, cos, sin, f"{path}/rope_q")  # [T, nh, R]
    k_rope = b.op("Unsqueeze", [k_rope, b.const([1])], f"{path}/k_rope/Unsqueeze")  # [T, 1, R]
    k_rope = rope(b, k_rope, cos, sin, f"{path}/rope_k")
    k_rope = b.op("Expand", [k_rope, b.const([1, nh, 1])], f"{path}/k_rope/Expand")  # [T,nh,R]

    q = b.op("Concat", [q_nope, q_rope], f"{path}/q/Concat", axis=-1)  # [T, nh, D]
    q = b.op("Unsqueeze", [q, b.const([2])], f"{path}/q/Unsqueeze")  # [T, nh, 1, D]: kvh = nh
    k = b.op("Concat", [k_nope, k_rope], f"{path}/k/Concat", axis=-1)  # [T, nh, D]
    ctx = attention_core(b, q, k, v, inp, o, None, path)  # [T, nh * Dv]
    return linear(b, ctx, quantize(t[Role.ATTN_O]), f"{path}/o_proj", acc, t.get(Role.ATTN_O_BIAS))
