"""Multi-head latent attention (DeepSeek-V2/V3), from standard ops plus MatMulNBits, over a
cache of every head's keys and values (the default) or of the latent (`--mla-cache latent`).

    x [T,H] ─ q_proj ─────────────────────────────┐        (q_lora_rank None: V2-Lite)
          └ q_a_proj ─ q_a_layernorm ─ q_b_proj ──┴─> q [T, nh, nope+R] ─ split ─ q_nope, q_rope
    x ─ kv_a_proj_with_mqa ─> [T, L+R] ─ split ─ c_kv [T, L] ─ kv_a_layernorm; k_rope [T, R]
    q_rope, k_rope ─ RoPE (one rope key shared by all heads)

    expanded: c_kv ─ kv_b_proj ─> [T, nh, nope+Dv] ─ split ─> k_nope, v
              attention(concat(q_nope, q_rope), concat(k_nope, k_rope), v) ─> [T, nh, Dv]
    latent:   q_nope ─ ·W_UK ─> [T, nh, L]; latent = concat(c_kv, k_rope) [T, 1, L+R]
              attention(concat(q_nope W_UK, q_rope), keys = values = the cached latents)
              ─> [T, nh, L+R] ─ first L ─ ·W_UV ─> [T, nh, Dv]
    ─ o_proj ─> out [T, H]

Expanded, the cache holds every head's key and value (DeepSeek-V2-Lite: 16 x 2 x 192 = 6,144
floats per token and layer, the values padded to the keys' width): simple, and the faster
attention. Latent, it holds the latent once: kv_lora_rank + qk_rope_head_dim floats (576), 10.7x
less. That is the "absorbed" form of DeepSeek's paper: kv_b_proj's key rows W_UK [nh, nope, L]
and value rows W_UV [nh, Dv, L] are not applied to the cache but to the query (q_nope . (W_UK c)
= (W_UK^T q_nope) . c) and to the attention's output (the softmax-weighted sum of latents, then
W_UV per head). The attention is a multi-query one of head width L+R whose values are the latents
themselves, so its output's first L entries are the weighted sum of c_kv (the last R, a weighted
sum of rope keys, are dropped). W_UK and W_UV are float32 copies of kv_b_proj's quantized weight,
the very values MatMulNBits would multiply by: per-head products are batched matmuls, which
MatMulNBits cannot do.

The latent's price is compute: every query head meets the whole 576-wide latent (3x the
multiply-adds of 192-wide keys), and W_UK / W_UV are read as float32 every step. ONNX Runtime's
attention would also read the shared cache once per query head (16 times), so it only appends
the step's latents in place (run with one query head, its output unused) and the attention
itself is two matmuls whose rows are all T x nh queries, each reading the cache once. On
V2-Lite's attention shape (benchmarks/mla_cache.py, docs/PERFORMANCE.md) decoding with the
latent cache ran ~0.84x as fast as expanded at 64 tokens of context and ~0.73x at 2048. So it is
opt-in, for when memory is what limits: at 4096 tokens of context DeepSeek-V2-Lite's cache is
2.7 GB expanded and 0.25 GB latent.

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
from onnx import TensorProto

from mobilemoe.manifest import cache_head_dim

from .architectures import Role
from .attention import (
    PRESENT_KEY,
    PRESENT_VALUE,
    AttentionInputs,
    AttentionOptions,
    Quantize,
    attention_core,
    pad_last,
    step_rope_rows,
)
from .graphs import GraphBuilder, linear, norm, rope
from .quantize import QuantizedLinear, dequantize_blockwise

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
    """-> attention output [T, H]; the new tokens' latents (c_kv, then the rope key) go to the
    cache [1, 1, C, L+R], or, with `mla_latent_cache` off, their per-head keys and values
    [1, nh, C, D]."""
    nh, d, acc = o.num_heads, o.head_dim, o.accuracy_level
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

    cos, sin = (b.op("Unsqueeze", [y, b.const([1])], f"{path}/rope/{n}")  # [T, 1, R/2]
                for y, n in zip(step_rope_rows(b, inp, path), ("cos", "sin"), strict=True))
    q_rope = rope(b, q_rope, cos, sin, f"{path}/rope_q")  # [T, nh, R]
    k_rope = b.op("Unsqueeze", [k_rope, b.const([1])], f"{path}/k_rope/Unsqueeze")  # [T, 1, R]
    k_rope = rope(b, k_rope, cos, sin, f"{path}/rope_k")
    kv_b = quantize(t[Role.ATTN_KV_B])  # [nh * (nope + Dv), L]
    parts = (q_nope, q_rope, c_kv, k_rope)
    if o.mla_latent_cache:
        ctx = _latent_attention(b, inp, o, parts, kv_b, latent, r, path)
    else:
        ctx = _expanded_attention(b, inp, o, parts, kv_b, nope, path)
    return linear(b, ctx, quantize(t[Role.ATTN_O]), f"{path}/o_proj", acc, t.get(Role.ATTN_O_BIAS))


def _latent_attention(b: GraphBuilder, inp: AttentionInputs, o: AttentionOptions,
                      parts: tuple[str, str, str, str], kv_b: QuantizedLinear, latent: int,
                      r: int, path: str) -> str:
    """The absorbed form over a cache of latents [1, 1, C, L+R] -> context [T, nh * Dv]."""
    q_nope, q_rope, c_kv, k_rope = parts  # [T,nh,nope], [T,nh,R] roped, [T,L], [T,1,R] roped
    nh, dv = o.num_heads, o.value_head_dim
    nope = o.head_dim - r
    weight = dequantize_blockwise(kv_b).reshape(nh, nope + dv, latent)
    w_uk = np.ascontiguousarray(weight[:, :nope])  # [nh, nope, L]
    w_uv = np.ascontiguousarray(weight[:, nope:].transpose(0, 2, 1))  # [nh, L, Dv]

    def per_head(x: str, w: np.ndarray, name: str) -> str:
        """x [T, nh, a] -> [T, nh, b]: head h times w[h] [a, b]."""
        heads_first = b.op("Transpose", [x], f"{path}/{name}/Transpose", perm=[1, 0, 2])
        y = b.op("MatMul", [heads_first, b.weight(f"{path}/{name}.weight", w)],
                 f"{path}/{name}/MatMul")  # [nh, T, b]
        return b.op("Transpose", [y], f"{path}/{name}/TransposeBack", perm=[1, 0, 2])

    q = b.op("Concat", [per_head(q_nope, w_uk, "kv_b_proj/keys"), q_rope], f"{path}/q/Concat",
             axis=-1)  # [T, nh, L+R]
    c_kv = b.op("Unsqueeze", [c_kv, b.const([1])], f"{path}/c_kv/Unsqueeze")  # [T, 1, L]
    latents = b.op("Concat", [c_kv, k_rope], f"{path}/latent/Concat", axis=-1)  # [T, 1, L+R]
    keys = _append_latents(b, latents, inp, latent + r, path)  # [1, 1, C, W]: the cache
    ctx = _attend_all_heads(b, q, keys, inp, o.scale, latent + r, path)  # [T, nh, W]
    ctx = b.op("Slice", [ctx, b.const([0]), b.const([latent]), b.const([2])],
               f"{path}/context/Latent")  # [T, nh, L]
    ctx = per_head(ctx, w_uv, "kv_b_proj/values")  # [T, nh, Dv]
    return b.op("Reshape", [ctx, b.const([-1, nh * dv])], f"{path}/context/Values")


def _expanded_attention(b: GraphBuilder, inp: AttentionInputs, o: AttentionOptions,
                        parts: tuple[str, str, str, str], kv_b: QuantizedLinear, nope: int,
                        path: str) -> str:
    """Per-head keys and values in the cache [1, nh, C, D] -> context [T, nh * Dv]."""
    q_nope, q_rope, c_kv, k_rope = parts
    nh, dv = o.num_heads, o.value_head_dim
    kv = linear(b, c_kv, kv_b, f"{path}/kv_b_proj", o.accuracy_level)
    kv = b.op("Reshape", [kv, b.const([-1, nh, nope + dv])], f"{path}/kv/Reshape")
    k_nope, v = b.op("Split", [kv, b.const([nope, dv])], f"{path}/kv/Split", n_out=2, axis=-1)
    k_rope = b.op("Expand", [k_rope, b.const([1, nh, 1])], f"{path}/k_rope/Expand")  # [T,nh,R]
    q = b.op("Concat", [q_nope, q_rope], f"{path}/q/Concat", axis=-1)  # [T, nh, D]
    q = b.op("Unsqueeze", [q, b.const([2])], f"{path}/q/Unsqueeze")  # [T, nh, 1, D]: kvh = nh
    k = b.op("Concat", [k_nope, k_rope], f"{path}/k/Concat", axis=-1)  # [T, nh, D]
    return attention_core(b, q, k, v, inp, o, None, path)  # [T, nh * Dv]


def _append_latents(b: GraphBuilder, latents: str, inp: AttentionInputs, width: int,
                    path: str) -> str:
    """Write the step's latents [T, 1, L+R] into the cache in place -> the cache [1, 1, C, W].

    GroupQueryAttention does the in-place append (see export/attention.py); it is run with one
    query head, the latent itself, whose output is not used: ~1/16 of the attention's work."""
    padded = b.op("Reshape", [latents, b.const([1, -1, width])], f"{path}/latent/Flatten")
    padded = pad_last(b, padded, 3, width, cache_head_dim(width, width), f"{path}/latent/Pad")
    b.op("GroupQueryAttention", [padded, padded, padded, inp.past_key, inp.past_value,
                                 inp.seqlens_k, inp.total_length],
         f"{path}/latent/Append", outputs=[f"{path}/latent/Unused", PRESENT_KEY, PRESENT_VALUE],
         domain="com.microsoft", num_heads=1, kv_num_heads=1)
    return PRESENT_KEY


def _attend_all_heads(b: GraphBuilder, q: str, cache: str, inp: AttentionInputs, scale: float,
                      width: int, path: str) -> str:
    """softmax(q . latents * scale + causal mask) . latents over the cache's first
    `total_length` positions: q [T, nh, L+R] -> [T, nh, W] (W: the cache's padded width).

    ONNX Runtime's attention would run each of the nh query heads over the shared cache on its
    own; here every head of every token is a row of the same two matrix products, so each
    reads the cache once."""
    total = b.op("Cast", [inp.total_length], f"{path}/attend/Total", to=TensorProto.INT64)
    total_1d = b.op("Unsqueeze", [total, b.const([0])], f"{path}/attend/Total1D")
    keys = b.op("Slice", [cache, b.const([0]), total_1d, b.const([2])], f"{path}/attend/Keys")
    keys = b.op("Squeeze", [keys, b.const([0, 1])], f"{path}/attend/Squeeze")  # [S, W]
    cache_width = cache_head_dim(width, width)
    q = pad_last(b, q, 3, width, cache_width, f"{path}/attend/QPad")  # zeros meet the cache's
    rows = b.op("Reshape", [q, b.const([-1, cache_width])], f"{path}/attend/QRows")  # [T*nh, W]
    scores = b.op("Gemm", [rows, keys], f"{path}/attend/Scores", alpha=float(scale),
                  transB=1)  # [T * nh, S]
    heads = b.op("Concat", [b.op("Shape", [q], f"{path}/attend/Shape", end=2), b.const([-1])],
                 f"{path}/attend/HeadsShape", axis=0)  # [T, nh, -1]
    scores = b.op("Reshape", [scores, heads], f"{path}/attend/ScoresHeads")  # [T, nh, S]
    count = b.op("Squeeze", [b.op("Shape", [q], f"{path}/attend/Count", end=1)],
                 f"{path}/attend/T")
    query_pos = b.op("Range", [b.op("Sub", [total, count], f"{path}/attend/First"), total,
                               b.const(1)], f"{path}/attend/QueryPos")  # [T]
    key_pos = b.op("Range", [b.const(0), total, b.const(1)], f"{path}/attend/KeyPos")  # [S]
    future = b.op("Greater", [key_pos, b.op("Unsqueeze", [query_pos, b.const([1])],
                                            f"{path}/attend/QueryCol")],
                  f"{path}/attend/Future")  # [T, S]
    mask = b.op("Where", [future, b.const(-np.inf, np.float32), b.const(0.0, np.float32)],
                f"{path}/attend/Mask")
    mask = b.op("Unsqueeze", [mask, b.const([1])], f"{path}/attend/MaskHeads")  # [T, 1, S]
    probs = b.op("Softmax", [b.op("Add", [scores, mask], f"{path}/attend/Masked")],
                 f"{path}/attend/Softmax", axis=-1)
    return b.op("MatMul", [probs, keys], f"{path}/attend/Context")  # [T, nh, W]
