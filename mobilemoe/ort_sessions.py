"""How every ONNX Runtime session of the runtime is created.

One process-wide intra-op thread pool (instead of one per session: 40 expert sessions would
otherwise start 40 pools) and no memory arena (so an evicted expert's memory is freed, not
kept by an arena for reuse).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

_global_threads: int | None = None  # > 0: the process-wide pool's size; < 0: per-session pools
_spin_after_runs = True  # False: ONNX Runtime's threads stop spinning at the end of each run


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def use_threads(threads: int, spin_after_runs: bool = True) -> None:
    """Set the process-wide thread pool size; ONNX Runtime allows this once per process.

    spin_after_runs=False, for a process whose experts run on the native kernel
    (mobilemoe.native_experts): per-session pools that spin within a run and stop at its
    end (`session.force_spinning_stop`). ONNX Runtime's process-wide pool spins on after
    every run, and Python cannot stop it, so the kernel's own worker found no core free
    (resident decode 108-149 ms a token against ~80). Threads that never spin cost the dense
    graphs a wake-up per parallel operator (+4-6 ms a token); stopping at a run's end costs
    one per run. The sessions are then the dense graphs only: 18 pools on the OLMoE shape."""
    global _global_threads, _spin_after_runs
    if _global_threads is None:
        set_sizes = getattr(ort.capi._pybind_state, "set_global_thread_pool_sizes", None)
        _spin_after_runs = spin_after_runs
        if set_sizes is None or not spin_after_runs:  # per-session pools
            _global_threads = -threads
            return
        set_sizes(threads, 1)
        _global_threads = threads
    elif abs(_global_threads) != threads or _spin_after_runs != spin_after_runs:
        def setup(n: int, spin: bool) -> str:
            return f"{n} threads, " + ("spinning" if spin else "not spinning between runs")

        warnings.warn(f"ONNX Runtime's threads were set up by an earlier load in this process "
                      f"({setup(abs(_global_threads), _spin_after_runs)}); keeping them instead "
                      f"of {setup(threads, spin_after_runs)}", stacklevel=3)


_WARMED_UP = False


def warm_up() -> None:
    """Create one trivial session, once per process.

    ONNX Runtime allocates its environment, thread pool and kernel registry with the first
    session. That memory belongs to the process baseline, not to the first model loaded, so
    it must be there before the baseline is measured.
    """
    global _WARMED_UP
    if not _WARMED_UP:
        create_session(_IDENTITY_MODEL).run(None, {"x": np.zeros(1, np.float32)})
        _WARMED_UP = True


# `y = Identity(x)`, serialized here so that the runtime does not depend on `onnx`.
_IDENTITY_MODEL = bytes.fromhex(
    "08083a370a100a017812017922084964656e746974791201675a0f0a0178120a0a08080112040a020801"
    "620f0a0179120a0a08080112040a02080142040a001011"
)  # onnx.helper: graph "g", Identity(x) -> y, float [1], opset 17, IR 8


def session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    if _global_threads is not None and _global_threads > 0:
        so.use_per_session_threads = False
    elif _global_threads is not None:
        so.intra_op_num_threads = -_global_threads
        if not _spin_after_runs:
            so.add_session_config_entry("session.force_spinning_stop", "1")
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False  # without an arena it only adds a block per input shape
    so.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    return so


def create_session(model: str | bytes, options: ort.SessionOptions | None = None
                   ) -> ort.InferenceSession:
    return ort.InferenceSession(model, options or session_options(),
                                providers=["CPUExecutionProvider"])


class SessionRunner:
    """`session.run(None, feeds)` as a call, without the Python wrapper's per-call checks
    (input names, OrtValue ownership, WebGPU graph capture): 14 of the ~170 us an OLMoE
    expert's run took here, and a decode token runs top-k experts in every layer. ONNX
    Runtime's C++ run still checks the feeds' names, types and shapes."""

    __slots__ = ("session", "_outputs", "_run")

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session  # also keeps what the session's weights live in
        self._outputs = [o.name for o in session.get_outputs()]
        binding = getattr(session, "_sess", None)  # the pybind session the wrapper calls
        self._run = binding.run if hasattr(binding, "run") else None

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._run is None:  # an ONNX Runtime that keeps its binding elsewhere
            return self.session.run(self._outputs, feeds)
        return self._run(self._outputs, feeds, None)


ORT_MAGIC = b"ORTM"  # flatbuffer file identifier at bytes 4..8 of an ORT-format model


def is_ort_format(model: bytes) -> bool:
    return model[4:8] == ORT_MAGIC


def expert_session_options() -> ort.SessionOptions:
    """An expert template is exported final (a handful of nodes, nothing to fuse or fold):
    skipping ONNX Runtime's graph optimizers saves ~0.5 ms of every page-in."""
    so = session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if _global_threads is not None and _global_threads < 0:
        # Per-session pools (a native-kernel process, or an ONNX Runtime without global
        # pools): a pool per expert would start a thread per resident expert.
        so.intra_op_num_threads = 1
    return so


def create_session_with_weights(template: bytes, names: Sequence[str],
                                arrays: Sequence[np.ndarray]) -> ort.InferenceSession:
    """A session of an expert `template` whose weights are `arrays`.

    The weights become initializers, so ONNX Runtime prepacks them for its fast kernels
    (fed as inputs instead, MatMulNBits runs two orders of magnitude slower). Two template
    forms: ONNX with external-data initializers (packages: `add_external_initializers`) or
    ORT format with placeholder initializers (mobile bundles: ONNX Runtime refuses external
    initializers for ORT-format models, and minimal builds lack them; `add_initializer`).
    """
    so = expert_session_options()
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if not is_ort_format(template):
        so.add_external_initializers(list(names), values)
        return create_session(template, so)
    for name, value in zip(names, values, strict=True):
        so.add_initializer(name, value)
    session = create_session(template, so)
    # add_initializer does not copy: the arrays must outlive the session.
    session._mobilemoe_weights = (arrays, values)
    return session
