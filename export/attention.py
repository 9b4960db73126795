"""Attention blocks of the layer graph: grouped-query attention with its variants.

Variants, all chosen by which tensors the checkpoint has plus the spec's `qk_norm`:
q/k/v/o biases (Qwen2-MoE, GPT-OSS), q/k RMSNorm per head (Qwen3-MoE) or over the whole
projection (OLMoE), clip_qkv (OLMoE), a custom score scale (Granite), attention sinks
(GPT-OSS). Sliding windows need no graph change: the runtime feeds a windowed mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .architectures import Role
from .graphs import GraphBuilder, linear, norm, rope
from .quantize import QuantizedLinear

Quantize = Callable[[np.ndarray], QuantizedLinear]


@dataclass(frozen=True)
class AttentionInputs:
    """Graph values every attention variant reads."""

    x: str  # normed hidden [T, H]
    cos: str  # [T, R/2]
    sin: str
    mask: str  # [T, S]: 0 where attended, -inf elsewhere
    past_key: str  # [P, kvh, Dk]
    past_value: str  # [P, kvh, Dv]


@dataclass(frozen=True)
class AttentionOptions:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    eps: float
    qk_norm: str | None  # None | "head" | "full"
    scale: float  # multiplies q.k (1/sqrt(head_dim) unless the model says otherwise)
    clip_qkv: float | None
    accuracy_level: int
    rope_interleaved: bool = False  # DeepSeek's pairwise RoPE (export/mla.py reorders for it)


def gqa_attention(b: GraphBuilder, inp: AttentionInputs, t: dict[Role, np.ndarray],
                  quantize: Quantize, o: AttentionOptions, path: str) -> tuple[str, str, str]:
    """-> (attention output [T, H], new keys [T, kvh, D] with RoPE, new values [T, kvh, D])."""
    kvh, d, groups = o.num_kv_heads, o.head_dim, o.num_heads // o.num_kv_heads
    acc = o.accuracy_level
    q = linear(b, inp.x, quantize(t[Role.ATTN_Q]), f"{path}/q_proj", acc, t.get(Role.ATTN_Q_BIAS))
    k = linear(b, inp.x, quantize(t[Role.ATTN_K]), f"{path}/k_proj", acc, t.get(Role.ATTN_K_BIAS))
    v = linear(b, inp.x, quantize(t[Role.ATTN_V]), f"{path}/v_proj", acc, t.get(Role.ATTN_V_BIAS))
    if o.clip_qkv:
        lo, hi = b.const(-o.clip_qkv, np.float32), b.const(o.clip_qkv, np.float32)
        q, k, v = (b.op("Clip", [y, lo, hi], f"{path}/{n}/Clip") for y, n in
                   ((q, "q"), (k, "k"), (v, "v")))
    if o.qk_norm == "full":  # over the whole projection, before splitting heads
        q = norm(b, q, t[Role.ATTN_Q_NORM], None, o.eps, f"{path}/q_norm")
        k = norm(b, k, t[Role.ATTN_K_NORM], None, o.eps, f"{path}/k_norm")
    q = b.op("Reshape", [q, b.const([-1, kvh, groups, d])], f"{path}/q/Reshape")  # [T,kvh,G,d]
    k = b.op("Reshape", [k, b.const([-1, kvh, d])], f"{path}/k/Reshape")  # [T, kvh, d]
    v = b.op("Reshape", [v, b.const([-1, kvh, o.value_head_dim])], f"{path}/v/Reshape")
    if o.qk_norm == "head":
        q = norm(b, q, t[Role.ATTN_Q_NORM], None, o.eps, f"{path}/q_norm")
        k = norm(b, k, t[Role.ATTN_K_NORM], None, o.eps, f"{path}/k_norm")
    cos_q = b.op("Unsqueeze", [inp.cos, b.const([1, 2])], f"{path}/rope/cos_q")  # [T,1,1,d/2]
    sin_q = b.op("Unsqueeze", [inp.sin, b.const([1, 2])], f"{path}/rope/sin_q")
    cos_k = b.op("Unsqueeze", [inp.cos, b.const([1])], f"{path}/rope/cos_k")  # [T, 1, d/2]
    sin_k = b.op("Unsqueeze", [inp.sin, b.const([1])], f"{path}/rope/sin_k")
    q = rope(b, q, cos_q, sin_q, f"{path}/rope_q")
    k = rope(b, k, cos_k, sin_k, f"{path}/rope_k")
    ctx = attention_core(b, q, k, v, inp, o, t.get(Role.ATTN_SINKS), path)
    out = linear(b, ctx, quantize(t[Role.ATTN_O]), f"{path}/o_proj", acc, t.get(Role.ATTN_O_BIAS))
    return out, k, v


def attention_core(b: GraphBuilder, q: str, k_new: str, v_new: str, inp: AttentionInputs,
                   o: AttentionOptions, sinks: np.ndarray | None, path: str) -> str:
    """softmax(q.k * scale + mask) . v over past and new keys -> context [T, nh * Dv].

    q [T, kvh, G, Dk] (RoPE applied), k_new [T, kvh, Dk], v_new [T, kvh, Dv].
    With sinks, each head's learned logit joins the softmax as one more column, then is
    dropped: it takes probability mass without contributing a value.
    """
    keys = b.op("Concat", [inp.past_key, k_new], f"{path}/keys/Concat", axis=0)  # [S, kvh, Dk]
    values = b.op("Concat", [inp.past_value, v_new], f"{path}/values/Concat", axis=0)
    q_t = b.op("Transpose", [q], f"{path}/q/Transpose", perm=[1, 2, 0, 3])  # [kvh, G, T, Dk]
    k_t = b.op("Transpose", [keys], f"{path}/keys/Transpose", perm=[1, 2, 0])  # [kvh, Dk, S]
    k_t = b.op("Unsqueeze", [k_t, b.const([1])], f"{path}/keys/Unsqueeze")  # [kvh, 1, Dk, S]
    v_t = b.op("Transpose", [values], f"{path}/values/Transpose", perm=[1, 0, 2])  # [kvh, S, Dv]
    v_t = b.op("Unsqueeze", [v_t, b.const([1])], f"{path}/values/Unsqueeze")  # [kvh, 1, S, Dv]
    scores = b.op("MatMul", [q_t, k_t], f"{path}/scores/MatMul")  # [kvh, G, T, S]
    scores = b.op("Mul", [scores, b.const(o.scale, np.float32)], f"{path}/scores/Scale")
    scores = b.op("Add", [scores, inp.mask], f"{path}/scores/Mask")
    if sinks is None:
        probs = b.op("Softmax", [scores], f"{path}/Softmax", axis=-1)
    else:
        groups = o.num_heads // o.num_kv_heads
        sink = b.weight(f"{path}.sinks", sinks.reshape(o.num_kv_heads, groups, 1, 1))
        shape = b.op("Shape", [scores], f"{path}/sinks/Shape")  # [kvh, G, T, S]
        column = b.op("Concat", [b.op("Slice", [shape, b.const([0]), b.const([3])],
                                      f"{path}/sinks/Slice"), b.const([1])],
                      f"{path}/sinks/ColumnShape", axis=0)  # [kvh, G, T, 1]
        sink = b.op("Expand", [sink, column], f"{path}/sinks/Expand")
        both = b.op("Concat", [scores, sink], f"{path}/sinks/Concat", axis=-1)  # [.., S + 1]
        probs = b.op("Softmax", [both], f"{path}/Softmax", axis=-1)
        probs = b.op("Slice", [probs, b.const([0]), b.const([-1]), b.const([-1])],
                     f"{path}/sinks/Drop")
    ctx = b.op("MatMul", [probs, v_t], f"{path}/context/MatMul")  # [kvh, G, T, Dv]
    ctx = b.op("Transpose", [ctx], f"{path}/context/Transpose", perm=[2, 0, 1, 3])  # [T,kvh,G,Dv]
    return b.op("Reshape", [ctx, b.const([-1, o.num_heads * o.value_head_dim])],
                f"{path}/context/Reshape")  # [T, nh * Dv]
