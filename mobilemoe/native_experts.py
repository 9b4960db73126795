"""Experts computed by mobilemoe's own int4 kernel, straight from the bytes read from the store.

An ONNX Runtime expert session must prepack its weights when it is built, and that build
(2.0-2.6 ms per MB) is most of what a page-in costs; the prepacked copy is also ~1.4x the
bytes on disk. The kernel in `mobilemoe/native/q4_experts.c` computes MatMulNBits' arithmetic
(int4 blocks of 64, int8 activations: accuracy level 4) from the block layout as exported, so
a page-in is a read and an expert holds its block and nothing more. It needs AVX-512 VNNI
(x86-64 Linux); anywhere else, or for other expert layouts (int8, GPT-OSS's biased experts),
experts run on ONNX Runtime sessions (`expert_kernel="native"` insists, and is refused with
the reason). Measured on the OLMoE shape (docs/PERFORMANCE.md, "A kernel of our own"): decode
1.14x llama.cpp where the sessions reached 0.81-0.94x; paging 0.6-0.7 against 2.9 ms/MB.

The library is plain C loaded with ctypes (built at install: setup.py), so the runtime keeps
numpy and onnxruntime as its only compute dependencies; ctypes releases the GIL while it runs.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import numpy as np

from mobilemoe.errors import MobileMoEError
from mobilemoe.fused_experts import DOWN, DOWN_SCALES, GATE_UP, GATE_UP_SCALES, fusable
from mobilemoe.manifest import ExpertTemplate, ModelDims, Quantization, Routing

# `load(..., expert_kernel=...)`: "auto" (the default) is "native" wherever it can run and
# supports the package's experts, else "onnxruntime"
KERNELS = ("auto", "native", "onnxruntime")

_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the library cannot be used, once looked for
_threads: int | None = None


def _find_library() -> ctypes.CDLL | None:
    global _library, _unavailable
    if _library is not None or _unavailable is not None:
        return _library
    here = Path(__file__).parent
    paths = [here / f"_q4_experts{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        _unavailable = "the native kernel was not built (x86-64 Linux with a C compiler only)"
        return None
    library = ctypes.CDLL(str(path))
    if not library.mm_cpu_supported():
        _unavailable = "this CPU lacks AVX-512 VNNI"
        return None
    library.mm_set_threads.argtypes = [ctypes.c_int]
    for name in ("mm_park", "mm_wake"):
        getattr(library, name).argtypes, getattr(library, name).restype = [], None
    pointer, count = ctypes.c_void_p, ctypes.c_int
    library.mm_q4_silu_expert.argtypes = [pointer, pointer, pointer, pointer, count, count, count,
                                          pointer, pointer]
    library.mm_q4_silu_experts_sum.argtypes = [pointer, pointer, count, count, count, pointer,
                                               pointer]
    library.mm_route_softmax.argtypes = [pointer, count, count, count, count, count,
                                         ctypes.c_float, pointer, pointer]
    _library = library
    return library


def unavailable_reason() -> str | None:
    """None when the native kernel can run here, else why not."""
    _find_library()
    return _unavailable


def use_threads(threads: int) -> None:
    """The kernel's thread count (the caller's included), set once per process like ONNX
    Runtime's pool; a later, different count is ignored (the first `load` decides)."""
    global _threads
    library = _find_library()
    if library is not None and _threads is None:
        if library.mm_set_threads(threads) != 0:
            raise MobileMoEError(f"could not start {threads} threads for the expert kernel")
        _threads = threads


def wake() -> None:
    """Experts are about to run: wake the kernel's workers now, so that the first one does not
    wait for them (it took ~85 us longer than the others)."""
    if _library is not None:
        _library.mm_wake()


def park() -> None:
    """Tell the kernel's workers that no expert is coming for a while (the dense graphs run
    next, or a page-in): they sleep now instead of spinning on cores ONNX Runtime needs.
    Between the experts of a layer they spin, which saves waking them for every expert."""
    if _library is not None:
        _library.mm_park()


def supports(template: ExpertTemplate, dims: ModelDims, quantization: Quantization) -> bool:
    """Whether the kernel computes this template's experts as its ONNX graph does: unbiased
    SiLU-gated int4 experts at block 64 with int8 activations (accuracy level 4)."""
    if not fusable(template):  # the same unbiased SiLU experts QMoE takes
        return False
    slots = {s.name: s for s in template.tensors}
    if template.bits != 4 or quantization.block_size != 64 or quantization.accuracy_level != 4:
        return False
    h = dims.hidden_size
    blocks = -(-h // 64)
    gate_up, down = slots[GATE_UP].shape, slots[DOWN].shape  # [2I, blocks, 32], [H, blocks, 32]
    i = gate_up[0] // 2
    return (gate_up == [2 * i, blocks, 32] and down == [h, -(-i // 64), 32]
            and slots[GATE_UP_SCALES].nbytes == 2 * i * blocks * 4
            and slots[DOWN_SCALES].nbytes == h * -(-i // 64) * 4
            and all(slots[name].dtype == "float32" for name in (GATE_UP_SCALES, DOWN_SCALES)))


MAX_ROUTED_EXPERTS = 1024  # mm_route_softmax's limit


def routes(routing: Routing, num_experts: int) -> bool:
    """Whether `route` computes this routing: softmax scoring without expert groups (Mixtral,
    Qwen-MoE, OLMoE, Granite, GPT-OSS; not DeepSeek's groups or sigmoid, nor Phi-MoE), over
    at most MAX_ROUTED_EXPERTS experts."""
    return (routing.scoring == "softmax" and routing.n_group == 1
            and routing.top_k <= num_experts <= MAX_ROUTED_EXPERTS)


def route(logits: np.ndarray, routing: Routing) -> tuple[np.ndarray, np.ndarray]:
    """mobilemoe.routing.route for a routing that `routes`, in one C call instead of ~15
    numpy ones: logits [T, E] -> experts [T, k] int64, weights [T, k] float32. The same
    choices and weights up to float32 rounding (C's expf, sums in index order). Right after
    a layer graph has streamed its weights, numpy's calls run from cold caches: 110 us a
    layer on the OLMoE shape (16 us warm), 39 us here. It wakes the kernel's workers, as
    `wake` does (another ~50 us on these machines, the futex wake-up): experts run next."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    t, e = logits.shape
    k = routing.top_k
    experts, weights = np.empty((t, k), np.int64), np.empty((t, k), np.float32)
    if _library.mm_route_softmax(logits.ctypes.data, t, e, k, routing.normalize_top_k,
                                 routing.top_k_before_softmax, routing.scaling,
                                 experts.ctypes.data, weights.ctypes.data) != 0:
        raise MobileMoEError(f"routing: top {k} of {e} experts is out of the kernel's range")
    return experts, weights


def weighted_sum(experts: list[NativeExpert], weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One token x [1, H] through `experts` -> [1, H], the sum over them in order of
    weights[e] * expert(x): bit for bit what calling each expert and adding up `w * y` in
    numpy gives, in one call (each thread takes whole experts, no Python between them). The
    workers are parked after it (as by `park`): the dense graph comes next."""
    pointers = np.array([e._pointers for e in experts], dtype=np.uint64)  # [k, 4]
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    first = experts[0]
    if _library.mm_q4_silu_experts_sum(pointers.ctypes.data, weights.ctypes.data, len(experts),
                                       first._hidden, first._intermediate, x.ctypes.data,
                                       out.ctypes.data) != 0:
        raise MemoryError("expert kernel: out of memory for its scratch buffers")
    return out


class NativeExpert:
    """One expert's weights (views into the block read from the store) and the kernel: called
    like an expert's `SessionRunner`, {"x": x [T, H]} -> [y [T, H]]."""

    __slots__ = ("_weights", "_pointers", "_hidden", "_intermediate", "_run")

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        library = _find_library()
        if library is None:
            raise MobileMoEError(f"native expert kernel unavailable: {_unavailable}")
        self._weights = weights  # the kernel reads them in place: keep them alive
        self._pointers = tuple(weights[name].ctypes.data
                               for name in (GATE_UP, GATE_UP_SCALES, DOWN, DOWN_SCALES))
        self._hidden = weights[DOWN].shape[0]
        self._intermediate = weights[GATE_UP].shape[0] // 2  # gate rows, then up rows
        self._run = library.mm_q4_silu_expert

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = np.ascontiguousarray(feeds["x"], dtype=np.float32)  # [T, H]
        y = np.empty_like(x)
        if self._run(*self._pointers, self._hidden, self._intermediate, len(x),
                     x.ctypes.data, y.ctypes.data) != 0:
            raise MemoryError("expert kernel: out of memory for its scratch buffers")
        return [y]
