"""All experts of a layer in one ONNX Runtime `QMoE` kernel: the fused path for resident models.

The default path runs one session per chosen expert (k session runs and k weighted sums in
Python per layer and step) so that any expert can be paged in or out on its own. When every
expert is resident anyway, ONNX Runtime's `com.microsoft.QMoE` can hold a whole layer's
experts and run the chosen ones in one call, on the same MLAS int4/int8 kernels that
`MatMulNBits` uses.

It is lossy in the last bits of float32, and opt-in for that: QMoE computes SiLU with its own
sigmoid, and sums the weighted expert outputs in its own order (experts dealt round-robin to its
threads, then the threads' partial sums added). With int8 activations (accuracy level 4) such a
rounding can cross a quantization step, so a token's logits can move by up to ~1% of their range
on tiny models; on the trained demo model perplexity, top-1 agreement and KL against float32 are
the same as the default path's (docs/QUALITY.md). The weights, the routing and the bits per
weight are the same.

The graph is built here, not in the package: it is one node whose weights come from the
expert store, and building it needs no `onnx` (the runtime stays numpy + onnxruntime).
"""

from __future__ import annotations

import struct

import numpy as np

from mobilemoe.expert_store import ExpertStore
from mobilemoe.manifest import ExpertTemplate
from mobilemoe.ort_sessions import SessionRunner, create_session_with_weights

# Layers whose QMoE sessions are built at once when the budget holds their stacked weights
# side by side: on the OLMoE shape two builds on two threads took 1.3-1.5 s for two layers
# against 2.2-2.5 s one after the other (reading, stacking and ONNX Runtime's prepacking
# each run partly single-threaded).
LAYERS_BUILT_AT_ONCE = 2

# The expert template's tensors, as laid out in the store (export/model_graphs.py).
GATE_UP, GATE_UP_SCALES = "gate_up.qweight", "gate_up.scales"
DOWN, DOWN_SCALES = "down.qweight", "down.scales"


def fusable(template: ExpertTemplate) -> bool:
    """An expert template the QMoE kernel computes exactly as the template graph does: the
    unbiased SiLU-gated experts (every exporter architecture but GPT-OSS, whose experts are
    biased and clamped)."""
    return {s.name for s in template.tensors} == {GATE_UP, GATE_UP_SCALES, DOWN, DOWN_SCALES}


def stacked_bytes(hidden: int, intermediate: int, num_experts: int, bits: int,
                  block_size: int) -> tuple[int, int]:
    """(quantized weights, float32 scales) of one layer's experts stacked for QMoE."""
    weights = num_experts * 3 * hidden * intermediate  # gate, up and down
    return weights * bits // 8, weights // block_size * 4


class FusedLayerExperts:
    """Every expert of one layer in one QMoE session."""

    def __init__(self, store: ExpertStore, layer: int, num_experts: int, top_k: int,
                 hidden: int, intermediate: int, bits: int, block_size: int,
                 accuracy_level: int) -> None:
        self.num_experts = num_experts
        h, i = hidden, intermediate
        fc1 = np.empty((num_experts, 2 * i, h * bits // 8), np.uint8)
        fc1_scales = np.empty((num_experts, 2 * i, h // block_size), np.float32)
        fc2 = np.empty((num_experts, h, i * bits // 8), np.uint8)
        fc2_scales = np.empty((num_experts, h, i // block_size), np.float32)
        for expert in range(num_experts):
            w = store.read(layer, expert)  # crc32-checked
            # The store keeps gate rows then up rows; CPU QMoE wants them interleaved
            # (gate 0, up 0, gate 1, ...): [2I, X] -> [I, 2, X] with gate at [:, 0].
            _interleave(w[GATE_UP].reshape(2 * i, -1), fc1[expert])
            _interleave(w[GATE_UP_SCALES].reshape(2 * i, -1), fc1_scales[expert])
            fc2[expert] = w[DOWN].reshape(h, -1)
            fc2_scales[expert] = w[DOWN_SCALES].reshape(h, -1)
        model = qmoe_model(h, num_experts, top_k, bits, block_size, accuracy_level,
                           {"fc1": fc1.shape, "fc1_scales": fc1_scales.shape,
                            "fc2": fc2.shape, "fc2_scales": fc2_scales.shape})
        # ONNX Runtime copies external initializers (checked: overwriting them after this
        # changes nothing), so the stacked arrays go when this returns; it keeps the weights
        # repacked and its own copy of the scales.
        self._run = SessionRunner(create_session_with_weights(
            model, ["fc1", "fc1_scales", "fc2", "fc2_scales"], [fc1, fc1_scales, fc2, fc2_scales]))

    def __call__(self, x: np.ndarray, experts: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """x [T, H], experts and weights [T, k] (the runtime's routing) -> sum of weighted
        expert outputs [T, H]. QMoE picks its own top-k from `probs`: the chosen experts get
        1, the others 0, so it picks exactly these, and weighs them by `weights`."""
        t = len(x)
        probs = np.zeros((t, self.num_experts), np.float32)
        np.put_along_axis(probs, experts, 1.0, axis=1)
        dense_weights = np.zeros((t, self.num_experts), np.float32)
        np.put_along_axis(dense_weights, experts, weights, axis=1)
        return self._run({"x": x, "probs": probs, "weights": dense_weights})[0]


def _interleave(rows: np.ndarray, out: np.ndarray) -> None:
    half = len(rows) // 2
    pairs = out.reshape(half, 2, -1)  # [I, 2, X]: a view of out
    pairs[:, 0] = rows[:half]
    pairs[:, 1] = rows[half:]


# -- the ONNX model, serialized by hand (protobuf wire format, field numbers of onnx.proto) ---

_FLOAT, _UINT8 = 1, 2  # TensorProto.DataType
_ATTR_FLOAT, _ATTR_INT, _ATTR_STRING = 1, 2, 3  # AttributeProto.AttributeType


def qmoe_model(hidden: int, num_experts: int, top_k: int, bits: int, block_size: int,
               accuracy_level: int, shapes: dict[str, tuple[int, ...]]) -> bytes:
    """x [N, H], probs [N, E], weights [N, E] -> y [N, H] through one QMoE node whose
    initializers fc1, fc1_scales, fc2, fc2_scales (`shapes`) are supplied at session creation.
    Activation: SwiGLU with alpha 1 and beta 0, i.e. silu(gate) * up, gate/up interleaved."""
    attributes = [
        _attribute("k", _ATTR_INT, top_k),
        _attribute("expert_weight_bits", _ATTR_INT, bits),
        _attribute("block_size", _ATTR_INT, block_size),
        _attribute("accuracy_level", _ATTR_INT, accuracy_level),
        _attribute("activation_type", _ATTR_STRING, b"swiglu"),
        _attribute("swiglu_fusion", _ATTR_INT, 1),
        _attribute("activation_alpha", _ATTR_FLOAT, 1.0),
        _attribute("activation_beta", _ATTR_FLOAT, 0.0),
        _attribute("normalize_routing_weights", _ATTR_INT, 0),
    ]
    # QMoE's inputs by position; "" skips an optional one (biases, fc3, zero points).
    inputs = ["x", "probs", "fc1", "fc1_scales", "", "fc2", "fc2_scales"] + [""] * 7 + ["weights"]
    node = (b"".join(_string(1, name) for name in inputs) + _string(2, "y") + _string(3, "qmoe")
            + _string(4, "QMoE") + b"".join(_message(5, a) for a in attributes)
            + _string(7, "com.microsoft"))
    initializers = [_external_initializer(name, _UINT8 if name in ("fc1", "fc2") else _FLOAT,
                                          shape) for name, shape in shapes.items()]
    graph = (_message(1, node) + _string(2, "fused_experts")
             + b"".join(_message(5, t) for t in initializers)
             + _message(11, _value_info("x", ["N", hidden]))
             + _message(11, _value_info("probs", ["N", num_experts]))
             + _message(11, _value_info("weights", ["N", num_experts]))
             + _message(12, _value_info("y", ["N", hidden])))
    opsets = _message(8, _string(1, "") + _int(2, 17)) + \
        _message(8, _string(1, "com.microsoft") + _int(2, 1))
    return _int(1, 8) + opsets + _message(7, graph)  # ir_version 8


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _message(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _string(field: int, text: str | bytes) -> bytes:
    return _message(field, text.encode() if isinstance(text, str) else text)


def _attribute(name: str, kind: int, value: float | int | bytes) -> bytes:
    if kind == _ATTR_FLOAT:
        body = _varint(2 << 3 | 5) + struct.pack("<f", value)  # f: fixed32
    elif kind == _ATTR_INT:
        body = _int(3, int(value))
    else:
        body = _string(4, value)
    return _string(1, name) + body + _int(20, kind)


def _external_initializer(name: str, data_type: int, shape: tuple[int, ...]) -> bytes:
    location = _string(1, "location") + _string(2, "supplied-at-session-creation")
    return (b"".join(_int(1, d) for d in shape) + _int(2, data_type) + _string(8, name)
            + _message(13, location) + _int(14, 1))  # data_location: EXTERNAL


def _value_info(name: str, dims: list[int | str]) -> bytes:
    shape = b"".join(_message(1, _string(2, d) if isinstance(d, str) else _int(1, d))
                     for d in dims)
    tensor_type = _int(1, _FLOAT) + _message(2, shape)
    return _string(1, name) + _message(2, _message(1, tensor_type))
