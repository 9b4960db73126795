"""ONNX graph builders for a mobilemoe package: embed, dense layer, head, expert template.

Node and value names follow the module path they come from
(`/model/layers.3/self_attn/q_proj/MatMulNBits`), so a profile or a Netron view reads like
the transformers code. Only standard ONNX ops (opset 17) plus `com.microsoft.MatMulNBits`,
which every ONNX Runtime build since 1.17 has, including ONNX Runtime Mobile.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mobilemoe.manifest import ModelDims

from .quantize import QuantizedLinear, QuantizedRows

OPSET = 17
FLOAT = TensorProto.FLOAT


class GraphBuilder:
    """Collects nodes and initializers; `op` returns the output value name(s)."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._consts: dict[tuple, str] = {}

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        self.op("Identity", [value], f"/outputs/{name}", outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def external_weight(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> str:
        """An initializer whose bytes are supplied at session creation
        (`SessionOptions.add_external_initializers`): one graph serves every expert."""
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value="supplied-at-session-creation")
        self.initializers.append(t)
        return name

    def const(self, values: list | float, dtype: type = np.int64) -> str:
        key = (str(values), np.dtype(dtype).str)
        if key not in self._consts:
            name = f"/const/{len(self._consts)}"
            self.weight(name, np.array(values, dtype=dtype))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], path: str, outputs: list[str] | None = None,
           n_out: int = 1, domain: str = "", **attrs) -> str | list[str]:
        outputs = outputs or [f"{path}/output_{i}" for i in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outputs, name=path, domain=domain or None, **attrs)
        )
        return outputs[0] if len(outputs) == 1 else outputs

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
            producer_name="mobilemoe",
        )
        model.ir_version = 8  # the newest IR that ONNX Runtime Mobile 1.17+ reads
        return model


# -- building blocks ------------------------------------------------------------------------


def rms_norm(b: GraphBuilder, x: str, weight: np.ndarray, eps: float, path: str) -> str:
    """x * rsqrt(mean(x^2) + eps) * weight, in float32 like transformers' RMSNorm."""
    sq = b.op("Mul", [x, x], f"{path}/Pow")
    var = b.op("ReduceMean", [sq], f"{path}/ReduceMean", axes=[-1], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, b.const(eps, np.float32)], f"{path}/AddEps")],
               f"{path}/Sqrt")
    normed = b.op("Div", [x, std], f"{path}/Div")
    return b.op("Mul", [normed, b.weight(f"{path}.weight", weight)], f"{path}/MulWeight")


def linear(b: GraphBuilder, x: str, q: QuantizedLinear, path: str, accuracy_level: int) -> str:
    """x [T, K] @ W.T -> [T, N] with W quantized blockwise (see quantize.py)."""
    qweight = b.weight(f"{path}.qweight", q.qweight)
    scales = b.weight(f"{path}.scales", q.scales)
    return _matmul_nbits(b, x, qweight, scales, q.in_features, q.out_features, q.bits,
                         q.block_size, path, accuracy_level)


def _matmul_nbits(b: GraphBuilder, x: str, qweight: str, scales: str, k: int, n: int, bits: int,
                  block_size: int, path: str, accuracy_level: int) -> str:
    return b.op("MatMulNBits", [x, qweight, scales], f"{path}/MatMulNBits", domain="com.microsoft",
                K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)


def rope(b: GraphBuilder, x: str, cos: str, sin: str, path: str) -> str:
    """Rotary embedding, "rotate half" convention: x [..., D], cos/sin broadcast to [..., D/2]."""
    x1, x2 = b.op("Split", [x], f"{path}/Split", n_out=2, axis=-1)
    first = b.op("Sub", [b.op("Mul", [x1, cos], f"{path}/Mul0"),
                         b.op("Mul", [x2, sin], f"{path}/Mul1")], f"{path}/Sub")
    second = b.op("Add", [b.op("Mul", [x2, cos], f"{path}/Mul2"),
                          b.op("Mul", [x1, sin], f"{path}/Mul3")], f"{path}/Add")
    return b.op("Concat", [first, second], f"{path}/Concat", axis=-1)


# -- whole graphs ---------------------------------------------------------------------------


def embed_graph(table: QuantizedRows) -> onnx.ModelProto:
    """input_ids [T] -> hidden [T, H]: gather int8 rows and their scales."""
    b = GraphBuilder("embed")
    ids = b.input("input_ids", TensorProto.INT64, ["T"])
    path = "/model/embed_tokens"
    rows = b.op("Gather", [b.weight(f"{path}.values", table.values), ids], f"{path}/Gather")
    scales = b.op("Gather", [b.weight(f"{path}.scales", table.scales), ids], f"{path}/GatherScale")
    hidden = b.op("Mul", [b.op("Cast", [rows], f"{path}/Cast", to=FLOAT), scales], f"{path}/Mul")
    b.output(hidden, "hidden", FLOAT, ["T", table.values.shape[1]])
    return b.model()


def head_graph(final_norm: np.ndarray, lm_head: QuantizedLinear, eps: float,
               accuracy_level: int) -> onnx.ModelProto:
    """hidden [T, H] -> logits [T, V]: final RMSNorm, then the quantized LM head."""
    b = GraphBuilder("head")
    hidden = b.input("hidden", FLOAT, ["T", lm_head.in_features])
    normed = rms_norm(b, hidden, final_norm, eps, "/model/norm")
    logits = linear(b, normed, lm_head, "/lm_head", accuracy_level)
    b.output(logits, "logits", FLOAT, ["T", lm_head.out_features])
    return b.model()


def dense_layer_graph(layer: int, dims: ModelDims, attn_norm: np.ndarray,
                      q: QuantizedLinear, k: QuantizedLinear, v: QuantizedLinear,
                      o: QuantizedLinear, ffn_norm: np.ndarray, router: np.ndarray,
                      accuracy_level: int) -> onnx.ModelProto:
    """Everything of one decoder layer except the experts.

        hidden [T,H] ──┬─ RMSNorm ─ q,k,v (MatMulNBits) ─ RoPE(q,k)
                       │      past_key/value [P,kvH,D] ─ Concat ─ attention(mask [T,P+T]) ─ o_proj
                       └─────────────────────────────────────────── Add ─> attn_residual [T,H]
        attn_residual ─ RMSNorm ─> moe_input [T,H] ─ MatMul(router, float32) ─> router_logits [T,E]
        new key/value [T,kvH,D] are outputs: the runtime appends them to its KV cache.
    """
    h, nh, kvh, d = dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim
    groups = nh // kvh
    p = f"/model/layers.{layer}"
    b = GraphBuilder(f"layer_{layer}")
    hidden = b.input("hidden", FLOAT, ["T", h])
    cos = b.input("cos", FLOAT, ["T", d // 2])
    sin = b.input("sin", FLOAT, ["T", d // 2])
    mask = b.input("mask", FLOAT, ["T", "S"])  # 0 where attended, -inf elsewhere; S = P + T
    past_key = b.input("past_key", FLOAT, ["P", kvh, d])
    past_value = b.input("past_value", FLOAT, ["P", kvh, d])

    x = rms_norm(b, hidden, attn_norm, dims.rms_norm_eps, f"{p}/input_layernorm")
    a = f"{p}/self_attn"
    q_out = linear(b, x, q, f"{a}/q_proj", accuracy_level)  # [T, nh*d]
    k_out = linear(b, x, k, f"{a}/k_proj", accuracy_level)  # [T, kvh*d]
    v_out = linear(b, x, v, f"{a}/v_proj", accuracy_level)
    q_heads = b.op("Reshape", [q_out, b.const([-1, kvh, groups, d])], f"{a}/q/Reshape")
    k_new = b.op("Reshape", [k_out, b.const([-1, kvh, d])], f"{a}/k/Reshape")  # [T, kvh, d]
    v_new = b.op("Reshape", [v_out, b.const([-1, kvh, d])], f"{a}/v/Reshape")
    cos_q = b.op("Unsqueeze", [cos, b.const([1, 2])], f"{a}/rope/cos_q")  # [T, 1, 1, d/2]
    sin_q = b.op("Unsqueeze", [sin, b.const([1, 2])], f"{a}/rope/sin_q")
    cos_k = b.op("Unsqueeze", [cos, b.const([1])], f"{a}/rope/cos_k")  # [T, 1, d/2]
    sin_k = b.op("Unsqueeze", [sin, b.const([1])], f"{a}/rope/sin_k")
    q_rot = rope(b, q_heads, cos_q, sin_q, f"{a}/rope_q")
    k_rot = rope(b, k_new, cos_k, sin_k, f"{a}/rope_k")

    keys = b.op("Concat", [past_key, k_rot], f"{a}/keys/Concat", axis=0)  # [S, kvh, d]
    values = b.op("Concat", [past_value, v_new], f"{a}/values/Concat", axis=0)
    q_t = b.op("Transpose", [q_rot], f"{a}/q/Transpose", perm=[1, 2, 0, 3])  # [kvh, G, T, d]
    k_t = b.op("Transpose", [keys], f"{a}/keys/Transpose", perm=[1, 2, 0])  # [kvh, d, S]
    k_t = b.op("Unsqueeze", [k_t, b.const([1])], f"{a}/keys/Unsqueeze")  # [kvh, 1, d, S]
    v_t = b.op("Transpose", [values], f"{a}/values/Transpose", perm=[1, 0, 2])  # [kvh, S, d]
    v_t = b.op("Unsqueeze", [v_t, b.const([1])], f"{a}/values/Unsqueeze")  # [kvh, 1, S, d]
    scores = b.op("MatMul", [q_t, k_t], f"{a}/scores/MatMul")  # [kvh, G, T, S]
    scores = b.op("Mul", [scores, b.const(d ** -0.5, np.float32)], f"{a}/scores/Scale")
    scores = b.op("Add", [scores, mask], f"{a}/scores/Mask")
    probs = b.op("Softmax", [scores], f"{a}/Softmax", axis=-1)
    ctx = b.op("MatMul", [probs, v_t], f"{a}/context/MatMul")  # [kvh, G, T, d]
    ctx = b.op("Transpose", [ctx], f"{a}/context/Transpose", perm=[2, 0, 1, 3])  # [T, kvh, G, d]
    ctx = b.op("Reshape", [ctx, b.const([-1, nh * d])], f"{a}/context/Reshape")  # [T, nh*d]
    attn = linear(b, ctx, o, f"{a}/o_proj", accuracy_level)
    residual = b.op("Add", [hidden, attn], f"{p}/residual/Add")

    moe_input = rms_norm(b, residual, ffn_norm, dims.rms_norm_eps, f"{p}/post_attention_layernorm")
    router_w = b.weight(f"{p}/mlp/gate.weight_t", np.ascontiguousarray(router.T))  # [H, E]
    logits = b.op("MatMul", [moe_input, router_w], f"{p}/mlp/gate/MatMul")

    b.output(residual, "attn_residual", FLOAT, ["T", h])
    b.output(moe_input, "moe_input", FLOAT, ["T", h])
    b.output(logits, "router_logits", FLOAT, ["T", dims.num_experts])
    b.output(k_rot, "key", FLOAT, ["T", kvh, d])
    b.output(v_new, "value", FLOAT, ["T", kvh, d])
    return b.model()


EXPERT_TENSORS = ("gate_up.qweight", "gate_up.scales", "down.qweight", "down.scales")


def expert_template_graph(hidden: int, intermediate: int, bits: int, block_size: int,
                          accuracy_level: int) -> onnx.ModelProto:
    """One SwiGLU expert whose weights are supplied when its session is created.

        x [N,H] ─ MatMulNBits(gate_up) [N,2I] ─ Split ─ gate, up
        silu(gate) * up [N,I] ─ MatMulNBits(down) ─> y [N,H]
    gate and up share one MatMulNBits (gate rows first): one kernel call instead of two.
    """
    b = GraphBuilder(f"expert_h{hidden}_i{intermediate}_q{bits}")
    x = b.input("x", FLOAT, ["N", hidden])
    shapes = expert_tensor_shapes(hidden, intermediate, bits, block_size)
    names = {n: b.external_weight(n, dt, shape) for n, (dt, shape) in shapes.items()}
    gate_up = _matmul_nbits(b, x, names["gate_up.qweight"], names["gate_up.scales"], hidden,
                            2 * intermediate, bits, block_size, "/expert/gate_up", accuracy_level)
    gate, up = b.op("Split", [gate_up], "/expert/Split", n_out=2, axis=-1)
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate], "/expert/act/Sigmoid")], "/expert/act/Mul")
    inner = b.op("Mul", [act, up], "/expert/Mul")
    y = _matmul_nbits(b, inner, names["down.qweight"], names["down.scales"], intermediate, hidden,
                      bits, block_size, "/expert/down", accuracy_level)
    b.output(y, "y", FLOAT, ["N", hidden])
    return b.model()


def expert_tensor_shapes(hidden: int, intermediate: int, bits: int,
                         block_size: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """dtype and shape of each expert initializer, in the order they lie in the store."""
    def blocks(k: int) -> int:
        return -(-k // block_size)

    blob = block_size * bits // 8
    return {
        "gate_up.qweight": (np.dtype(np.uint8), (2 * intermediate, blocks(hidden), blob)),
        "gate_up.scales": (np.dtype(np.float32), (2 * intermediate * blocks(hidden),)),
        "down.qweight": (np.dtype(np.uint8), (hidden, blocks(intermediate), blob)),
        "down.scales": (np.dtype(np.float32), (hidden * blocks(intermediate),)),
    }
