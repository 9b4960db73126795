"""Blockwise quantization: the layout MatMulNBits reads, checked against ONNX Runtime itself."""

import numpy as np
import pytest
from mobilemoe.export.quantize import (
    dequantize_blockwise,
    dequantize_rows,
    quantize_blockwise,
    quantize_rows_int8,
)
from onnx import TensorProto, helper, numpy_helper

from mobilemoe.ort_sessions import create_session


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(48, 64), (70, 100), (5, 33)])
def test_matmulnbits_computes_with_the_dequantized_weight(bits, shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((3, shape[1])).astype(np.float32)
    q = quantize_blockwise(w, bits, 32)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=shape[1], N=shape[0], bits=bits, block_size=32, accuracy_level=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, shape[0]])],
        initializer=[numpy_helper.from_array(q.qweight, "B"),
                     numpy_helper.from_array(q.scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    # mobilemoe's session options: once a model is loaded in this process, ONNX Runtime's
    # global thread pool requires every session to opt out of per-session threads.
    y = create_session(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize_blockwise(q).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,bound", [(4, 1 / 14), (8, 1 / 254)])
def test_error_is_within_half_a_step_of_each_block(bits, bound):
    w = np.random.default_rng(1).standard_normal((16, 96)).astype(np.float32)
    err = np.abs(dequantize_blockwise(quantize_blockwise(w, bits, 32)) - w)
    block_max = np.abs(w.reshape(16, 3, 32)).max(-1, keepdims=True)
    assert (err.reshape(16, 3, 32) <= block_max * bound + 1e-7).all()


def test_zero_blocks_and_rows_stay_zero():
    w = np.zeros((4, 40), np.float32)
    assert not dequantize_blockwise(quantize_blockwise(w, 4, 32)).any()
    assert not dequantize_rows(quantize_rows_int8(w)).any()


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        quantize_blockwise(np.ones((2, 32), np.float32), 3, 32)
    with pytest.raises(ValueError):
        quantize_blockwise(np.ones((2, 32), np.float32), 4, 24)
