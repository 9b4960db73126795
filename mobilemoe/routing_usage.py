"""Which experts a text is routed to, and how differently two kinds of text use them.

    text ids ─> model.logits in context-sized windows, with model.trace_routing()
             ─> experts [N tokens, L MoE layers, k]
             ─> usage [L, E]: share of routing slots (top-k) or of first choices (top-1)
             ─> total-variation distance between two domains' usage, per layer:
                0 = same experts, 1 = disjoint experts
"""

from __future__ import annotations

import numpy as np

from mobilemoe.model import MoEModel


def routed_experts(model: MoEModel, ids: list[int], window: int | None = None
                   ) -> tuple[list[int], np.ndarray]:
    """(MoE layer indices, experts [N, L, k]) for `ids`, run in fresh windows of at most
    `window` tokens (default: the model's context). Resets the KV cache."""
    window = window or model.context_length
    with model.trace_routing() as trace:
        for start in range(0, len(ids), window):
            model.logits(ids[start:start + window])
    model.reset()
    layers = sorted(trace[0]) if trace else []
    steps = [np.stack([step[layer] for layer in layers], axis=1) for step in trace]  # [T, L, k]
    k = model.dims.top_k
    return layers, (np.concatenate(steps) if steps else np.zeros((0, len(layers), k), np.int64))


def expert_usage(experts: np.ndarray, num_experts: int, top1: bool = False) -> np.ndarray:
    """experts [N, L, k] -> usage [L, E]: each layer's routing shares (rows sum to 1)."""
    chosen = experts[..., :1] if top1 else experts  # route() lists the first choice first
    n, layers, k = chosen.shape
    usage = np.zeros((layers, num_experts))
    for layer in range(layers):
        usage[layer] = np.bincount(chosen[:, layer].ravel(), minlength=num_experts)
    return usage / max(n * k, 1)


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """usage [L, E] twice -> [L]: half the L1 distance between the two distributions."""
    return 0.5 * np.abs(p - q).sum(axis=-1)


def domain_usage(model: MoEModel, texts: dict[str, str], top1: bool = False,
                 max_tokens: int | None = None) -> dict:
    """{domain: text} -> {"layers", "tokens": {domain: n}, "usage": {domain: [L, E]},
    "tv": {"a vs b": [L]}} (at most `max_tokens` tokens of each text)."""
    usage, tokens, layers = {}, {}, []
    for domain, text in texts.items():
        ids = model.encode(text)[:max_tokens]
        layers, experts = routed_experts(model, ids)
        usage[domain] = expert_usage(experts, model.dims.num_experts, top1)
        tokens[domain] = len(ids)
    names = list(texts)
    tv = {f"{a} vs {b}": total_variation(usage[a], usage[b])
          for i, a in enumerate(names) for b in names[i + 1:]}
    return {"layers": layers, "tokens": tokens, "usage": usage, "tv": tv}
