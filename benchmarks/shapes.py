"""Real MoE models' shapes, for synthetic benchmark models (standard library only).

Every shape is written in a Mixtral-style layout whatever the real model does (GQA attention
with RoPE, SwiGLU experts, softmax router then top-k): the benchmarks measure speed and
memory, which depend on the dimensions, not on QK-norm, attention sinks or biases. The
numbers come from each model's Hugging Face `config.json`, checked against the transformers
config classes:

- olmoe-1b-7b (allenai/OLMoE-1B-7B-0924): 16 layers, hidden 2048, intermediate 1024,
  64 experts top-8 (norm_topk_prob false), 16 heads, 16 KV heads, vocab 50304.
- qwen3-30b-a3b (Qwen/Qwen3-30B-A3B): 48 layers, hidden 2048, moe_intermediate_size 768,
  128 experts top-8 (norm_topk_prob true), 32 heads, 4 KV heads, head_dim 128, vocab 151936.
- gpt-oss-20b (openai/gpt-oss-20b): 24 layers, hidden 2880, intermediate 2880, 32 experts
  top-4, 64 heads, 8 KV heads, head_dim 64, vocab 201088. Its router takes top-k, then a
  softmax over those k: the same weights as softmax + renormalise.
- mixtral-8x7b (mistralai/Mixtral-8x7B-v0.1): 32 layers, hidden 4096, intermediate 14336,
  8 experts top-2, 32 heads, 8 KV heads, vocab 32000.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    source: str  # the Hugging Face model whose config these are
    layers: int
    hidden: int
    intermediate: int  # of one expert
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float = 10000.0
    normalize_top_k: bool = True
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096

    def with_layers(self, layers: int | None) -> Shape:
        """The same shape cut to `layers` decoder layers (None: all of them)."""
        if layers is None or layers == self.layers:
            return self
        if not 0 < layers <= self.layers:
            raise ValueError(f"{self.name} has {self.layers} layers; --layers {layers} is out of range")
        return dataclasses.replace(self, layers=layers)

    def expert_params(self) -> int:
        """Weights of one SwiGLU expert: gate, up [I, H] and down [H, I]."""
        return 3 * self.hidden * self.intermediate

    def attention_params(self) -> int:
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (2 * q_out + 2 * kv_out)


SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", layers=16, hidden=2048, intermediate=1024,
          experts=64, top_k=8, heads=16, kv_heads=16, head_dim=128, vocab=50304,
          normalize_top_k=False),
    Shape("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", layers=48, hidden=2048, intermediate=768,
          experts=128, top_k=8, heads=32, kv_heads=4, head_dim=128, vocab=151936,
          rope_theta=1e6, rms_norm_eps=1e-6),
    Shape("gpt-oss-20b", "openai/gpt-oss-20b", layers=24, hidden=2880, intermediate=2880,
          experts=32, top_k=4, heads=64, kv_heads=8, head_dim=64, vocab=201088,
          rope_theta=150000.0),
    Shape("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", layers=32, hidden=4096,
          intermediate=14336, experts=8, top_k=2, heads=32, kv_heads=8, head_dim=128,
          vocab=32000, rope_theta=1e6),
    # A scaled-down shape for tests and smoke runs: seconds to write and load.
    Shape("tiny", "none (test shape)", layers=2, hidden=256, intermediate=128, experts=8,
          top_k=2, heads=4, kv_heads=2, head_dim=64, vocab=512),
]}


def get_shape(name: str, layers: int | None = None) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name].with_layers(layers)
