"""One decoder layer's graph: everything except the routed experts.

    hidden [T,H] ─ norm ─ attention (KV cache [1,kvh,C,D] in, the same buffer out: in place)
        h = hidden + residual_multiplier * attention
    h ─ norm ─> moe_input [T,H]
        MoE layer:   router_logits = moe_input @ router.T (+ bias), float32     [T,E]
                     (router_selection = sigmoid(logits) + selection bias, DeepSeek-V3)
                     residual = h + residual_multiplier * shared_expert(moe_input)
                                 (x sigmoid(shared_expert_gate) for Qwen2-MoE)
        dense layer: residual = h + residual_multiplier * mlp(moe_input)
The runtime adds residual_multiplier * (weighted routed experts) to `residual`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from mobilemoe.errors import ExportError
from mobilemoe.manifest import ModelDims

from .architectures import Role
from .attention import (
    PRESENT_KEY,
    PRESENT_VALUE,
    AttentionInputs,
    AttentionOptions,
    Quantize,
    gqa_attention,
)
from .graphs import FLOAT, INT32, GraphBuilder, norm, scale, swiglu_mlp


@dataclass(frozen=True)
class LayerOptions:
    layer: int
    moe: bool
    attention: AttentionOptions
    residual_multiplier: float
    rope_dim: int
    accuracy_level: int
    sliding_window: int = 0  # 0: attend to the whole context


def layer_graph(dims: ModelDims, t: dict[Role, np.ndarray], quantize: Quantize,
                opts: LayerOptions) -> onnx.ModelProto:
    h, eps = dims.hidden_size, dims.rms_norm_eps
    acc = opts.accuracy_level
    p = f"/model/layers.{opts.layer}"
    b = GraphBuilder(f"layer_{opts.layer}")
    hidden = b.input("hidden", FLOAT, ["T", h])
    cache = [1, dims.cache_kv_heads, "C", dims.cache_head_dim]
    x = norm(b, hidden, t[Role.ATTN_NORM], t.get(Role.ATTN_NORM_BIAS), eps, f"{p}/input_layernorm")
    inp = AttentionInputs(
        x=x,
        cos=b.input("cos_cache", FLOAT, ["C", opts.rope_dim // 2]),
        sin=b.input("sin_cache", FLOAT, ["C", opts.rope_dim // 2]),
        past_key=b.input("past_key", FLOAT, cache),
        past_value=b.input("past_value", FLOAT, cache),
        seqlens_k=b.input("seqlens_k", INT32, [1]),
        total_length=b.input("total_sequence_length", INT32, []),
    )
    attention = replace(opts.attention, sliding_window=opts.sliding_window, rope_dim=opts.rope_dim)
    if Role.ATTN_KV_A in t:
        try:
            from .mla import mla_attention  # DeepSeek's multi-head latent attention
        except ImportError:
            raise ExportError("multi-head latent attention (DeepSeek) is not supported yet") from None
        attn = mla_attention(b, inp, t, quantize, attention, f"{p}/self_attn")
    else:
        attn = gqa_attention(b, inp, t, quantize, attention, f"{p}/self_attn")
    residual = b.op("Add", [hidden, scale(b, attn, opts.residual_multiplier, f"{p}/attn/Scale")],
                    f"{p}/residual/Add")
    y = norm(b, residual, t[Role.FFN_NORM], t.get(Role.FFN_NORM_BIAS), eps,
             f"{p}/post_attention_layernorm")

    mlp = None
    if not opts.moe:
        mlp = swiglu_mlp(b, y, quantize(np.concatenate([t[Role.DENSE_GATE], t[Role.DENSE_UP]])),
                         quantize(t[Role.DENSE_DOWN]), f"{p}/mlp", acc)
    elif Role.SHARED_GATE in t:
        mlp = swiglu_mlp(b, y, quantize(np.concatenate([t[Role.SHARED_GATE], t[Role.SHARED_UP]])),
                         quantize(t[Role.SHARED_DOWN]), f"{p}/mlp/shared_expert", acc)
        if Role.SHARED_EXPERT_GATE in t:
            gate_w = b.weight(f"{p}/mlp/shared_expert_gate.weight_t",
                              np.ascontiguousarray(t[Role.SHARED_EXPERT_GATE].T))  # [H, 1]
            gate = b.op("Sigmoid", [b.op("MatMul", [y, gate_w], f"{p}/mlp/shared_expert_gate/MatMul")],
                        f"{p}/mlp/shared_expert_gate/Sigmoid")
            mlp = b.op("Mul", [gate, mlp], f"{p}/mlp/shared_expert/Gate")
    if mlp is not None:
        residual = b.op("Add", [residual, scale(b, mlp, opts.residual_multiplier, f"{p}/mlp/Scale")],
                        f"{p}/mlp/residual/Add")

    b.output(residual, "residual", FLOAT, ["T", h])
    if opts.moe:
        # The router stays float32: a quantization error here changes which experts run.
        router_w = b.weight(f"{p}/mlp/gate.weight_t", np.ascontiguousarray(t[Role.ROUTER].T))
        logits = b.op("MatMul", [y, router_w], f"{p}/mlp/gate/MatMul")  # [T, E]
        if Role.ROUTER_BIAS in t:
            logits = b.op("Add", [logits, b.weight(f"{p}/mlp/gate.bias", t[Role.ROUTER_BIAS])],
                          f"{p}/mlp/gate/Bias")
        b.output(y, "moe_input", FLOAT, ["T", h])
        b.output(logits, "router_logits", FLOAT, ["T", dims.num_experts])
        if Role.ROUTER_SELECTION_BIAS in t:
            bias = b.weight(f"{p}/mlp/gate.e_score_correction_bias", t[Role.ROUTER_SELECTION_BIAS])
            selection = b.op("Add", [b.op("Sigmoid", [logits], f"{p}/mlp/gate/Sigmoid"), bias],
                             f"{p}/mlp/gate/Selection")
            b.output(selection, "router_selection", FLOAT, ["T", dims.num_experts])
    b.output(PRESENT_KEY, PRESENT_KEY, FLOAT, cache)
    b.output(PRESENT_VALUE, PRESENT_VALUE, FLOAT, cache)
    return b.model()
