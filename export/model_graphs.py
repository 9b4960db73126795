"""The embed graph, the head graph and the expert template."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from .graphs import FLOAT, GraphBuilder, linear, matmul_nbits, norm, scale
from .quantize import QuantizedLinear, QuantizedRows


def embed_graph(table: QuantizedRows, multiplier: float = 1.0) -> onnx.ModelProto:
    """input_ids [T] -> hidden [T, H]: gather int8 rows and their scales (x multiplier)."""
    b = GraphBuilder("embed")
    ids = b.input("input_ids", TensorProto.INT64, ["T"])
    path = "/model/embed_tokens"
    rows = b.op("Gather", [b.weight(f"{path}.values", table.values), ids], f"{path}/Gather")
    scales = b.op("Gather", [b.weight(f"{path}.scales", table.scales), ids], f"{path}/GatherScale")
    hidden = b.op("Mul", [b.op("Cast", [rows], f"{path}/Cast", to=FLOAT), scales], f"{path}/Mul")
    hidden = scale(b, hidden, multiplier, "/model/embedding_multiplier")
    b.output(hidden, "hidden", FLOAT, ["T", table.values.shape[1]])
    return b.model()


def head_graph(final_norm: np.ndarray, final_norm_bias: np.ndarray | None,
               lm_head: QuantizedLinear, lm_head_bias: np.ndarray | None, eps: float,
               accuracy_level: int, logits_divisor: float = 1.0) -> onnx.ModelProto:
    """hidden [T, H] -> logits [T, V]: final norm, the quantized LM head (/ logits scaling)."""
    b = GraphBuilder("head")
    hidden = b.input("hidden", FLOAT, ["T", lm_head.in_features])
    normed = norm(b, hidden, final_norm, final_norm_bias, eps, "/model/norm")
    logits = linear(b, normed, lm_head, "/lm_head", accuracy_level, lm_head_bias)
    if logits_divisor != 1.0:
        logits = b.op("Div", [logits, b.const(logits_divisor, np.float32)], "/logits_scaling")
    b.output(logits, "logits", FLOAT, ["T", lm_head.out_features])
    return b.model()


# GPT-OSS's clamped SwiGLU constants (transformers' GptOssExperts: swiglu_alpha, swiglu_limit)
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0


def expert_tensor_shapes(hidden: int, intermediate: int, bits: int, block_size: int,
                         biased: bool = False) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """dtype and shape of each expert initializer, in the order they lie in the store."""
    def blocks(k: int) -> int:
        return -(-k // block_size)

    blob = block_size * bits // 8
    shapes = {
        "gate_up.qweight": (np.dtype(np.uint8), (2 * intermediate, blocks(hidden), blob)),
        "gate_up.scales": (np.dtype(np.float32), (2 * intermediate * blocks(hidden),)),
        "down.qweight": (np.dtype(np.uint8), (hidden, blocks(intermediate), blob)),
        "down.scales": (np.dtype(np.float32), (hidden * blocks(intermediate),)),
    }
    if biased:
        shapes["gate_up.bias"] = (np.dtype(np.float32), (2 * intermediate,))
        shapes["down.bias"] = (np.dtype(np.float32), (hidden,))
    return shapes


def expert_template_graph(hidden: int, intermediate: int, bits: int, block_size: int,
                          accuracy_level: int, activation: str = "silu",
                          biased: bool = False,
                          swiglu_limits: tuple[float, float] = (GPT_OSS_ALPHA, GPT_OSS_LIMIT)
                          ) -> onnx.ModelProto:
    """One expert whose weights are supplied when its session is created.

        x [N,H] ─ MatMulNBits(gate_up) (+bias) [N,2I] ─ Split ─ gate, up
        "silu":    silu(gate) * up
        "gpt_oss": g = min(gate, limit); u = clip(up, ±limit); g * sigmoid(alpha g) * (u + 1)
        ─ MatMulNBits(down) (+bias) ─> y [N,H]
    gate and up share one MatMulNBits (gate rows first): one kernel call instead of two.
    """
    b = GraphBuilder(f"expert_{activation}_h{hidden}_i{intermediate}_q{bits}")
    x = b.input("x", FLOAT, ["N", hidden])
    shapes = expert_tensor_shapes(hidden, intermediate, bits, block_size, biased)
    w = {n: b.external_weight(n, dt, shape) for n, (dt, shape) in shapes.items()}
    both = matmul_nbits(b, x, w["gate_up.qweight"], w["gate_up.scales"], hidden,
                        2 * intermediate, bits, block_size, "/expert/gate_up", accuracy_level)
    if biased:
        both = b.op("Add", [both, w["gate_up.bias"]], "/expert/gate_up/Bias")
    gate, up = b.op("Split", [both], "/expert/Split", n_out=2, axis=-1)
    if activation == "silu":
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], "/expert/act/Sigmoid")], "/expert/act/Mul")
        inner = b.op("Mul", [act, up], "/expert/Mul")
    elif activation == "gpt_oss":
        alpha, limit = swiglu_limits
        gate = b.op("Min", [gate, b.const(limit, np.float32)], "/expert/gate/Clamp")
        up = b.op("Clip", [up, b.const(-limit, np.float32), b.const(limit, np.float32)],
                  "/expert/up/Clamp")
        sig = b.op("Sigmoid", [b.op("Mul", [gate, b.const(alpha, np.float32)], "/expert/act/Alpha")],
                   "/expert/act/Sigmoid")
        glu = b.op("Mul", [gate, sig], "/expert/act/Mul")
        inner = b.op("Mul", [b.op("Add", [up, b.const(1.0, np.float32)], "/expert/up/AddOne"), glu],
                     "/expert/Mul")
    else:
        raise ValueError(f"unknown expert activation {activation!r}")
    y = matmul_nbits(b, inner, w["down.qweight"], w["down.scales"], intermediate, hidden, bits,
                     block_size, "/expert/down", accuracy_level)
    if biased:
        y = b.op("Add", [y, w["down.bias"]], "/expert/down/Bias")
    b.output(y, "y", FLOAT, ["N", hidden])
    return b.model()
