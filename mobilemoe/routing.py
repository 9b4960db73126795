"""Router logits -> chosen experts and their weights, with the architecture's semantics."""

from __future__ import annotations

import numpy as np

from mobilemoe.manifest import Routing


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def route(logits: np.ndarray, routing: Routing) -> tuple[np.ndarray, np.ndarray]:
    """logits [T, E] -> (experts [T, k] int64, weights [T, k] float32).

    Ties go to the lower expert index (a stable sort), so a route never depends on anything
    but the logits.
    """
    if routing.scoring != "softmax":
        raise ValueError(f"unknown router scoring {routing.scoring!r}")
    probs = softmax(logits.astype(np.float32))  # [T, E]
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, : routing.top_k]  # [T, k]
    weights = np.take_along_axis(probs, experts, axis=-1)  # [T, k]
    if routing.normalize_top_k:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return experts, weights.astype(np.float32)
