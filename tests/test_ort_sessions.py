"""How the runtime creates and runs ONNX Runtime sessions (mobilemoe/ort_sessions.py)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from mobilemoe.ort_sessions import SessionRunner, create_session


def _two_output_session():
    """y = a + b, z = a * b over float [N, 3]."""
    shape = [None, 3]
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"]), helper.make_node("Mul", ["a", "b"], ["z"])],
        "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "ab"],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "yz"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return create_session(model.SerializeToString())


def test_runner_gives_what_session_run_gives():
    session = _two_output_session()
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((4, 3), dtype=np.float32),
             "b": rng.standard_normal((4, 3), dtype=np.float32)}
    runner = SessionRunner(session)
    expected = session.run(None, feeds)
    for got in (runner(feeds), _without_binding(runner)(feeds)):
        assert len(got) == 2
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)


def test_runner_still_refuses_bad_feeds():
    """The skipped Python checks are repeated by ONNX Runtime's C++ run: a wrong name, a
    missing input or a wrong type is an error, not a crash."""
    runner = SessionRunner(_two_output_session())
    a = np.ones((2, 3), np.float32)
    for feeds in ({"a": a, "c": a}, {"a": a}, {"a": a, "b": a.astype(np.float64)}):
        with pytest.raises(Exception, match="(?i)input|type"):
            runner(feeds)


def _without_binding(runner: SessionRunner) -> SessionRunner:
    """The fallback an ONNX Runtime without the `_sess` binding would take."""
    fallback = SessionRunner(runner.session)
    fallback._run = None
    return fallback
