"""The dense layer graphs' side of a forward step: the KV cache, written in place, and the
runner that binds each layer's slice of it (an ONNX Runtime IO binding) to its graph."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from mobilemoe.manifest import ModelDims


class KVCache:
    """Keys and values of every layer, preallocated for the whole context:
    [layers, 1, kv_heads, context, cache_head_dim] each (ModelDims.cache_kv_heads and
    cache_head_dim). MLA's latent cache is its own values: one array serves as both.

    Layer l's graph reads and writes keys[l] and values[l] in place (see `LayerRunner`): a
    step copies nothing but its own new entries. np.zeros maps pages lazily, but
    GroupQueryAttention writes nearly all of a layer's cache at a sequence's first step, so
    the cache is resident from the first prompt on (the plan reserves all of it).
    """

    def __init__(self, dims: ModelDims, context: int):
        shape = (dims.num_layers, 1, dims.cache_kv_heads, context, dims.cache_head_dim)
        self.keys = np.zeros(shape, dtype=np.float32)
        # The attention writes a new token's latent twice, as key and as value, to the same
        # place: the same values, so sharing the memory changes nothing but its size.
        self.values = self.keys if dims.cache_values_are_keys else np.zeros(shape, np.float32)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]


class LayerRunner:
    """Runs one layer graph with its slice of the KV cache bound as both the attention's past
    input and its present output (ONNX Runtime's GroupQueryAttention then appends in place).

    One-token steps (decoding) run on buffers bound once: the step copies its inputs in and
    reads the outputs where the graph wrote them, instead of binding and converting ~10
    values per layer (~0.13 ms a layer in Python, 2 ms a token on a 16-layer model).
    """

    CACHE = {"past_key": "present_key", "past_value": "present_value"}

    def __init__(self, session: ort.InferenceSession, keys: np.ndarray, values: np.ndarray,
                 cos: np.ndarray, sin: np.ndarray):
        """keys, values: this layer's cache [1, kvH, C, Dc]; cos, sin: the RoPE tables [C, R/2]."""
        self.session = session
        self.output_names = [o.name for o in session.get_outputs() if o.name not in
                             self.CACHE.values()]
        self._binding = session.io_binding()
        self._bound = (keys, values, cos, sin)  # the bound memory must outlive the binding
        for (past, present), buffer in zip(self.CACHE.items(), (keys, values), strict=True):
            self._bind(past, buffer, output=False)
            self._bind(present, buffer, output=True)
        self._bind("cos_cache", cos, output=False)
        self._bind("sin_cache", sin, output=False)
        self._one: dict[str, np.ndarray] | None = None  # the one-token buffers, once made
        self._one_bound = False  # whether the binding holds them now

    def _bind(self, name: str, buffer: np.ndarray, output: bool) -> None:
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)

    def run(self, hidden: np.ndarray, start: int) -> dict[str, np.ndarray]:
        """hidden [T, H] at positions start..start+T-1 -> the graph's outputs by name.

        A one-token step's outputs are views of buffers the next one-token step overwrites:
        use them before running this layer again (the forward pass does)."""
        end = start + len(hidden)
        if len(hidden) == 1 and self._one is not None:
            return self._run_one(hidden, end)
        io = self._binding
        self._one_bound = False
        io.bind_cpu_input("hidden", hidden)
        io.bind_cpu_input("seqlens_k", np.array([end - 1], dtype=np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(end, dtype=np.int32))
        for name in self.output_names:  # rebound each run: ONNX Runtime allocates them by shape
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        values = io.get_outputs()  # in binding order: the two cache aliases first
        out = {name: v.numpy() for name, v in zip(self.output_names, values[2:], strict=True)}
        if len(hidden) == 1:  # the first one-token step: now the output shapes are known
            self._one = {"hidden": np.empty_like(hidden), "seqlens_k": np.zeros(1, np.int32),
                         "total_sequence_length": np.zeros((), np.int32),
                         **{name: np.empty_like(y) for name, y in out.items()}}
        return out

    def _run_one(self, hidden: np.ndarray, end: int) -> dict[str, np.ndarray]:
        one = self._one
        if not self._one_bound:
            for name, buffer in one.items():
                self._bind(name, buffer, output=name in self.output_names)
            self._one_bound = True
        one["hidden"][...] = hidden
        one["seqlens_k"][0] = end - 1
        one["total_sequence_length"][...] = end
        self.session.run_with_iobinding(self._binding)
        return {name: one[name] for name in self.output_names}
