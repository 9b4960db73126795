"""The ONNX graph builder and the blocks every graph is made of (norms, linears, RoPE).

Node and value names follow the module path they come from
(`/model/layers.3/self_attn/q_proj/MatMulNBits`), so a profile or a Netron view reads like
the transformers code. Only standard ONNX ops (opset 17) plus two contrib ops every ONNX
Runtime build since 1.18 has, including ONNX Runtime Mobile: `com.microsoft.MatMulNBits` and
`com.microsoft.GroupQueryAttention`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .quantize import QuantizedLinear

OPSET = 17
FLOAT = TensorProto.FLOAT
INT32 = TensorProto.INT32


class GraphBuilder:
    """Collects nodes and initializers; `op` returns the output value name(s)."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._consts: dict[tuple, str] = {}
        self._output_names: list[tuple[str, str]] = []  # (value, graph output name), see model()

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        if value != name:  # a node already writing `name` (a KV cache alias) is named already
            self._output_names.append((value, name))
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

    def _name_outputs(self) -> None:
        """Give each graph output's value its output name where a node of this graph writes
        it, instead of copying it with an Identity (ONNX Runtime keeps those for outputs:
        ~10 us each at one token). A graph input, or a value output twice, still gets one."""
        produced = {out for node in self.nodes for out in node.output}
        renamed: dict[str, str] = {}
        copies = []
        for value, name in self._output_names:
            if value in produced and value not in renamed:
                renamed[value] = name
            else:
                copies.append(helper.make_node("Identity", [renamed.get(value, value)], [name],
                                               name=f"/outputs/{name}"))
        for node in self.nodes:
            for values in (node.input, node.output):
                for i, value in enumerate(values):
                    values[i] = renamed.get(value, value)
        self.nodes.extend(copies)
        self._output_names.clear()

    def model(self) -> onnx.ModelProto:
        self._name_outputs()
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


def norm(b: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray | None, eps: float,
         path: str) -> str:
    """RMSNorm (no bias) or LayerNorm (with bias), in float32 like transformers.

    RMSNorm is ONNX Runtime's fused SimplifiedLayerNormalization (one kernel instead of six
    element-wise ones: at one token a layer's small ops cost more in dispatch than in work);
    every ONNX Runtime build has it, Mobile included."""
    if bias is not None:
        return b.op("LayerNormalization", [x, b.weight(f"{path}.weight", weight),
                                           b.weight(f"{path}.bias", bias)],
                    f"{path}/LayerNormalization", axis=-1, epsilon=eps)
    return b.op("SimplifiedLayerNormalization", [x, b.weight(f"{path}.weight", weight)],
                f"{path}/SimplifiedLayerNormalization", axis=-1, epsilon=eps)


def linear(b: GraphBuilder, x: str, q: QuantizedLinear, path: str, accuracy_level: int,
           bias: np.ndarray | None = None) -> str:
    """x [T, K] @ W.T (+ bias) -> [T, N] with W quantized blockwise (see quantize.py)."""
    qweight = b.weight(f"{path}.qweight", q.qweight)
    scales = b.weight(f"{path}.scales", q.scales)
    y = matmul_nbits(b, x, qweight, scales, q.in_features, q.out_features, q.bits, q.block_size,
                     path, accuracy_level)
    return y if bias is None else b.op("Add", [y, b.weight(f"{path}.bias", bias)], f"{path}/Bias")


def matmul_nbits(b: GraphBuilder, x: str, qweight: str, scales: str, k: int, n: int, bits: int,
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


def scale(b: GraphBuilder, x: str, factor: float, path: str) -> str:
    """x * factor, or x itself when the factor is 1 (no node, no rounding)."""
    return x if factor == 1.0 else b.op("Mul", [x, b.const(factor, np.float32)], path)


def swiglu_mlp(b: GraphBuilder, x: str, gate_up: QuantizedLinear, down: QuantizedLinear,
               path: str, accuracy_level: int) -> str:
    """down(silu(gate) * up) with gate and up in one MatMulNBits (gate rows first)."""
    both = linear(b, x, gate_up, f"{path}/gate_up", accuracy_level)
    gate, up = b.op("Split", [both], f"{path}/Split", n_out=2, axis=-1)
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{path}/act/Sigmoid")], f"{path}/act/Mul")
    return linear(b, b.op("Mul", [act, up], f"{path}/Mul"), down, f"{path}/down", accuracy_level)
