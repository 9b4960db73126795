"""Attention blocks of the layer graph: grouped-query attention with its variants.

Variants, all chosen by which tensors the checkpoint has plus the spec's `qk_norm`:
q/k/v/o biases (Qwen2-MoE, GPT-OSS), q/k RMSNorm per head (Qwen3-MoE) or over the whole
projection (OLMoE), clip_qkv (OLMoE), a custom score scale (Granite), attention sinks
(GPT-OSS), sliding windows (GPT-OSS, Mistral-style configs).

The attention itself is ONNX Runtime's fused `com.microsoft.GroupQueryAttention` over a KV
cache the runtime preallocates for the whole context, [1, kvh, C, D] per layer. The runtime
binds the op's `present_*` outputs to the same memory as its `past_*` inputs, so the op writes
the new keys and values in place and reads only the first `total_sequence_length` positions:
nothing is concatenated or transposed per step. (Built from standard ops instead, the copies
of the cache cost 2 ms a layer at 256 tokens of context, 10x the attention itself.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from mobilemoe.manifest import cache_head_dim

from .architectures import Role
from .graphs import GraphBuilder, linear, norm, rope
from .quantize import QuantizedLinear

Quantize = Callable[[np.ndarray], QuantizedLinear]


# Graph outputs of the layer graph that alias the KV cache (see the module docstring).
PRESENT_KEY = "present_key"
PRESENT_VALUE = "present_value"


@dataclass(frozen=True)
class AttentionInputs:
    """Graph values every attention variant reads."""

    x: str  # normed hidden [T, H]
    cos: str  # the RoPE tables for every position [C, R/2] (attention scaling included)
    sin: str
    past_key: str  # the layer's whole key cache [1, kvh, C, Dc]
    past_value: str  # [1, kvh, C, Dc]
    seqlens_k: str  # int32 [1]: positions valid after this step, minus one
    total_length: str  # int32 scalar: positions valid after this step


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
    sliding_window: int = 0  # attend to the last this many positions (the token's own included)
    rope_dim: int = 0  # rotated dims per head (the layer graph sets it)
    mla_latent_cache: bool = False  # DeepSeek's MLA: cache the latent, not per-head k and v


def step_rope_rows(b: GraphBuilder, inp: AttentionInputs, path: str) -> tuple[str, str]:
    """The RoPE tables' rows for this step's positions P..P+T-1 (P + T = total length):
    cos, sin [T, R/2]."""
    total = b.op("Cast", [inp.total_length], f"{path}/rope/Total", to=TensorProto.INT64)
    count = b.op("Squeeze", [b.op("Shape", [inp.x], f"{path}/rope/Shape", end=1)],
                 f"{path}/rope/Count")  # T
    first = b.op("Sub", [total, count], f"{path}/rope/First")
    positions = b.op("Range", [first, total, b.const(1)], f"{path}/rope/Positions")  # [T]
    return tuple(b.op("Gather", [table, positions], f"{path}/rope/{name}Rows")
                 for table, name in ((inp.cos, "cos"), (inp.sin, "sin")))


def gqa_attention(b: GraphBuilder, inp: AttentionInputs, t: dict[Role, np.ndarray],
                  quantize: Quantize, o: AttentionOptions, path: str) -> str:
    """-> attention output [T, H]; the new keys (with RoPE) and values go into the cache."""
    kvh, d, groups = o.num_kv_heads, o.head_dim, o.num_heads // o.num_kv_heads
    acc = o.accuracy_level
    # RoPE ("rotate half", on the first R dims of each head): the fused attention applies it
    # from the tables at each token's position, if R/2 is a multiple of 8 (its requirement;
    # every real model's is); otherwise (tiny test models) the graph does.
    fused_rope = (o.rope_dim // 2) % 8 == 0
    qkv = qkv_linear(b, inp.x, t, quantize, acc, path)  # [T, (nh + 2 kvh) d]
    if (fused_rope and not o.clip_qkv and o.qk_norm is None
            and d == o.value_head_dim == cache_head_dim(d, o.value_head_dim)):
        # Nothing to do between the projection and the attention (Mixtral, Qwen2-MoE, GPT-OSS):
        # the attention takes q, k and v packed, saving a Split and six Reshapes a layer
        # (~60 us at one token on the OLMoE shape). Parity with transformers: test_parity.
        ctx = attention_core_packed(b, qkv, inp, o, t.get(Role.ATTN_SINKS), path)
        return linear(b, ctx, quantize(t[Role.ATTN_O]), f"{path}/o_proj", acc, t.get(Role.ATTN_O_BIAS))
    q, k, v = b.op("Split", [qkv, b.const(qkv_sizes(t))], f"{path}/qkv/Split", n_out=3, axis=-1)
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
    if not fused_rope:
        cos, sin = step_rope_rows(b, inp, path)
        q = rope(b, q, *(b.op("Unsqueeze", [y, b.const([1, 2])], f"{path}/rope/{n}_q")
                         for y, n in ((cos, "cos"), (sin, "sin"))), f"{path}/rope_q")  # [T,1,1,R/2]
        k = rope(b, k, *(b.op("Unsqueeze", [y, b.const([1])], f"{path}/rope/{n}_k")
                         for y, n in ((cos, "cos"), (sin, "sin"))), f"{path}/rope_k")  # [T,1,R/2]
    ctx = attention_core(b, q, k, v, inp, o, t.get(Role.ATTN_SINKS), path, rotary=fused_rope)
    return linear(b, ctx, quantize(t[Role.ATTN_O]), f"{path}/o_proj", acc, t.get(Role.ATTN_O_BIAS))


def pad_last(b: GraphBuilder, x: str, rank: int, size: int, width: int, path: str) -> str:
    """Zero-pad the last axis of a rank-`rank` value from `size` to `width`."""
    if size == width:
        return x
    pads = [0] * (2 * rank)
    pads[-1] = width - size
    return b.op("Pad", [x, b.const(pads)], path)


_QKV_ROLES = ((Role.ATTN_Q, Role.ATTN_Q_BIAS), (Role.ATTN_K, Role.ATTN_K_BIAS),
              (Role.ATTN_V, Role.ATTN_V_BIAS))


def qkv_sizes(t: dict[Role, np.ndarray]) -> list[int]:
    """The widths of q, k and v in `qkv_linear`'s output."""
    return [t[w].shape[0] for w, _ in _QKV_ROLES]


def qkv_linear(b: GraphBuilder, x: str, t: dict[Role, np.ndarray], quantize: Quantize,
               accuracy_level: int, path: str) -> str:
    """x @ [Wq; Wk; Wv].T (+ biases): q, k and v side by side, [T, q + k + v widths].

    One MatMulNBits over the stacked rows instead of three: at one token a layer's time is
    mostly per-kernel overhead and weight streaming, and one kernel streams the three weights
    in one pass. Blockwise quantization runs along the input dimension, so stacking rows
    changes no quantized value; a missing bias adds exact zeros.
    """
    sizes = qkv_sizes(t)
    weight = np.concatenate([t[w] for w, _ in _QKV_ROLES])
    bias = None
    if any(bias_role in t for _, bias_role in _QKV_ROLES):
        bias = np.concatenate([t.get(bias_role, np.zeros(n, np.float32))
                               for (_, bias_role), n in zip(_QKV_ROLES, sizes, strict=True)])
    return linear(b, x, quantize(weight), f"{path}/qkv_proj", accuracy_level, bias)


def attention_core(b: GraphBuilder, q: str, k_new: str, v_new: str, inp: AttentionInputs,
                   o: AttentionOptions, sinks: np.ndarray | None, path: str,
                   rotary: bool = False) -> str:
    """softmax(q.k * scale + causal mask) . v over the cached and new keys -> [T, nh * Dv].

    q [T, kvh, G, Dk], k_new [T, kvh, Dk], v_new [T, kvh, Dv], with RoPE applied, or applied
    here from `inp.cos`/`inp.sin` with `rotary` (the new keys go to the cache rotated). Query head
    h = kv_head * G + g uses kv head h // G, as GroupQueryAttention expects. With sinks, each
    head's learned logit joins the softmax denominator without contributing a value.

    The fused attention wants one head width for keys and values, a multiple of 8: q, k and v
    are zero-padded to `cache_head_dim` (zeros change no dot product; the scale is explicit)
    and the padding is cut from the output. Only DeepSeek's MLA (values narrower than keys)
    and tiny test models pad at all.
    """
    nh, kvh, dk, dv = o.num_heads, o.num_kv_heads, o.head_dim, o.value_head_dim
    width = cache_head_dim(dk, dv)
    q, k_new, v_new = (pad_last(b, y, rank, d, width, f"{path}/{name}/Pad") for y, rank, d, name
                       in ((q, 4, dk, "q"), (k_new, 3, dk, "k"), (v_new, 3, dv, "v")))
    flat = [b.op("Reshape", [y, b.const([1, -1, n * width])], f"{path}/{name}/Flatten")  # [1,T,.]
            for y, name, n in ((q, "q", nh), (k_new, "k", kvh), (v_new, "v", kvh))]
    ctx = group_query_attention(b, flat, inp, o, sinks, path, rotary)  # [1, T, nh * width]
    if dv < width:
        ctx = b.op("Reshape", [ctx, b.const([-1, nh, width])], f"{path}/context/Heads")
        ctx = b.op("Slice", [ctx, b.const([0]), b.const([dv]), b.const([2])],
                   f"{path}/context/Unpad")  # [T, nh, Dv]
    return b.op("Reshape", [ctx, b.const([-1, nh * dv])], f"{path}/context/Reshape")  # [T, nh*Dv]


def attention_core_packed(b: GraphBuilder, qkv: str, inp: AttentionInputs, o: AttentionOptions,
                          sinks: np.ndarray | None, path: str) -> str:
    """`attention_core` for qkv [T, (nh + 2 kvh) * D] as projected (q, k, v side by side,
    heads in order, one head width D for all), RoPE applied by the attention -> [T, nh * D]."""
    nh, kvh, d = o.num_heads, o.num_kv_heads, o.head_dim
    packed = b.op("Reshape", [qkv, b.const([1, -1, (nh + 2 * kvh) * d])], f"{path}/qkv/Batch")
    ctx = group_query_attention(b, [packed, "", ""], inp, o, sinks, path, rotary=True)
    return b.op("Reshape", [ctx, b.const([-1, nh * d])], f"{path}/context/Reshape")  # [T, nh*D]


def group_query_attention(b: GraphBuilder, qkv: list[str], inp: AttentionInputs,
                          o: AttentionOptions, sinks: np.ndarray | None, path: str,
                          rotary: bool) -> str:
    """ONNX Runtime's GroupQueryAttention over the layer's cache: qkv = [q, k, v] each
    [1, T, heads * width], or [qkv packed, "", ""] -> [1, T, nh * width]; the new keys and
    values are written to the cache in place (see the module docstring)."""
    inputs = [*qkv, inp.past_key, inp.past_value, inp.seqlens_k, inp.total_length,
              inp.cos if rotary else "", inp.sin if rotary else ""]
    if sinks is not None:  # optional inputs 9, 10: position ids, attention bias
        inputs += ["", "", b.weight(f"{path}.sinks", sinks.astype(np.float32))]
    while not inputs[-1]:
        inputs.pop()
    return b.op("GroupQueryAttention", inputs, f"{path}/GroupQueryAttention",
                outputs=[f"{path}/GroupQueryAttention/output_0", PRESENT_KEY, PRESENT_VALUE],
                domain="com.microsoft", num_heads=o.num_heads, kv_num_heads=o.num_kv_heads,
                scale=float(o.scale), local_window_size=o.sliding_window or -1,
                do_rotary=int(rotary), rotary_interleaved=0)[0]
