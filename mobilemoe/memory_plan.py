"""Where the memory budget goes, and the smallest budget a package can run in.

budget = resident dense graphs (measured RSS after creating their sessions)
       + KV cache (preallocated for the context length)
       + activation buffers (the largest prefill chunk's intermediates, estimated)
       + staging (the experts being paged in at once: each one's read block and ONNX
                  Runtime's copy while its session is built)
       + expert cache (the rest; at least one layer's top-k experts)
"""

from __future__ import annotations

from dataclasses import dataclass

from mobilemoe.errors import BudgetError
from mobilemoe.manifest import ModelDims
from mobilemoe.units import format_bytes

FLOAT_BYTES = 4
# Large experts are paged in this many at once, on as many threads: building a session is
# single-threaded and releases the GIL. Measured on 2 cores: Mixtral-8x7B's 99 MB experts page
# in at 2.68 ms/MB two at a time against 3.43 one at a time (decode 0.063 vs 0.045 tok/s);
# OLMoE's 3.5 MB experts gain nothing (3.4-3.8 vs 3.3 ms/MB: the builds are short next to
# ONNX Runtime's thread pool, which keeps spinning on the other core after each expert runs).
PAGE_IN_THREADS = 2
CONCURRENT_PAGE_IN_BLOCK = 16 << 20  # blocks at least this large are paged in concurrently
# Sizes measured from RSS move from one process to the next: by ~1% of a real model's
# (heap layout), and by up to ~0.3 MB whatever the model (which threads' malloc arenas
# the sessions land in; seen on CI for a 10 MB model). A budget we name covers both.
MARGIN_FRACTION = 0.02
MARGIN_BYTES = 512 << 10


def with_margin(need: float) -> int:
    """`need` plus the margin for measurement noise, rounded up to 10 kB."""
    padded = need * (1 + MARGIN_FRACTION) + MARGIN_BYTES
    return int(-(-padded // 10_000) * 10_000)


def page_in_threads(largest_block: int) -> int:
    return PAGE_IN_THREADS if largest_block >= CONCURRENT_PAGE_IN_BLOCK else 1


def staging_bytes(largest_block: int) -> int:
    """Transient memory of the page-ins in flight: a read block and its copy in ONNX Runtime
    while the session is built, per page-in thread."""
    return page_in_threads(largest_block) * 2 * largest_block


def kv_cache_bytes(dims: ModelDims, context_length: int) -> int:
    return dims.num_layers * context_length * dims.cache_floats_per_token * FLOAT_BYTES


def activation_bytes(dims: ModelDims, chunk: int, context_length: int) -> int:
    """A generous estimate of the live intermediates while one prefill chunk runs."""
    attention = dims.num_heads * chunk * context_length  # the fused attention's scores
    # residual stream, norms, q/k/v, outputs, and the heap's slack around them: a 256-token
    # prefill on the OLMoE shape peaked ~95 MB above the resident RSS (VmHWM), this sum ~115 MB
    hidden = 32 * chunk * dims.hidden_size
    logits = 2 * dims.vocab_size
    return (attention + hidden + logits) * FLOAT_BYTES + expert_buffer_bytes(dims, chunk)


def expert_buffer_bytes(dims: ModelDims, chunk: int) -> int:
    """One layer's expert intermediates for a chunk of tokens: each expert's input rows, its
    gate_up and their activations, and the outputs, all held until they are summed."""
    experts = 4 * chunk * dims.intermediate_size * 2
    routed = 2 * chunk * dims.top_k * dims.hidden_size
    return (experts + routed) * FLOAT_BYTES


@dataclass(frozen=True)
class MemoryPlan:
    dense_bytes: int
    kv_bytes: int
    activation_bytes: int
    staging_bytes: int
    expert_session_bytes: int  # one paged-in expert, as ONNX Runtime holds it
    top_k: int
    context_length: int

    @property
    def fixed_bytes(self) -> int:
        return self.dense_bytes + self.kv_bytes + self.activation_bytes + self.staging_bytes

    @property
    def tightest_budget(self) -> int:
        """The budget whose expert cache holds exactly one layer's top-k experts, for this
        plan's measurements (a later load in the same process reuses them). What users are
        told is `minimum_budget`, which adds headroom for a fresh process."""
        return self.fixed_bytes + self.top_k * self.expert_session_bytes

    @property
    def minimum_budget(self) -> int:
        """The measured need with a margin: the number we print must work in a new process."""
        return with_margin(self.tightest_budget)

    def expert_capacity(self, budget: int | None) -> int:
        if budget is None:
            return 1 << 62
        if budget < self.tightest_budget:
            raise BudgetError(
                f"memory budget {format_bytes(budget)} is too small: this model needs at least "
                f"{format_bytes(self.minimum_budget, round_up=True)} "
                f"(dense part {format_bytes(self.dense_bytes)}, "
                f"KV cache {format_bytes(self.kv_bytes)} for {self.context_length} tokens, "
                f"buffers {format_bytes(self.activation_bytes + self.staging_bytes)}, "
                f"{self.top_k} experts x {format_bytes(self.expert_session_bytes)}); "
                "raise --memory-budget or lower --context-length"
            )
        return budget - self.fixed_bytes
