"""Router logits -> chosen experts and their weights, with each architecture's semantics.

    softmax      probabilities over all experts, top-k, optionally renormalised (Mixtral,
                 Qwen-MoE, OLMoE, DeepSeek-V2); or top-k of the logits, then a softmax over
                 those k (`top_k_before_softmax`: Granite, GPT-OSS)
    sigmoid      independent scores; chosen by score + selection bias, weighted by score
                 (DeepSeek-V3)
    sparsemixer  Phi-MoE's inference routing: top-2 chosen one at a time, each weighted by a
                 softmax over the experts within a relative threshold of it
Group-limited top-k (`n_group` > 1): only experts in the `topk_group` best groups compete
(DeepSeek-V2 masks the others' scores with 0, V3 with -inf: the same choice whenever top_k
<= the experts in the kept groups, which the exporter checks).
Ties go to the lower expert index (stable sorts), so a route depends on the logits only.
"""

from __future__ import annotations

import numpy as np

from mobilemoe.manifest import Routing


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]  # [T, k]


def _group_mask(scores: np.ndarray, r: Routing) -> np.ndarray:
    """scores [T, E] with experts outside the best `topk_group` groups set to -inf."""
    t, e = scores.shape
    grouped = scores.reshape(t, r.n_group, e // r.n_group)  # [T, G, E/G]
    if r.group_score == "top2_sum":
        group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)  # [T, G]
    else:
        group_scores = grouped.max(axis=-1)
    keep = np.zeros((t, r.n_group), dtype=bool)
    np.put_along_axis(keep, _top_k(group_scores, r.topk_group), True, axis=-1)
    return np.where(np.repeat(keep, e // r.n_group, axis=-1), scores, -np.inf)


def _sparsemixer(logits: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Phi-MoE at inference (transformers' `sparsemixer` with training=False), top-2."""
    def pick(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        best = scores.max(axis=-1, keepdims=True)  # [T, 1]
        choice = np.argmax(scores, axis=-1)[:, None]
        factor = np.maximum(np.abs(logits), best)
        # 0 / 0 (all logits zero) and x / 0 (a zero logit above a negative runner-up) give
        # NaN and -inf, which compare false: not masked, as in transformers' torch code.
        with np.errstate(divide="ignore", invalid="ignore"):
            masked = np.where((best - logits) / factor > 2 * eps, -np.inf, scores)
        return choice, np.take_along_axis(softmax(masked), choice, axis=-1)

    first, w1 = pick(logits)
    rest = logits.copy()
    np.put_along_axis(rest, first, -np.inf, axis=-1)
    second, w2 = pick(rest)
    return np.concatenate([first, second], axis=1), np.concatenate([w1, w2], axis=1)


def route(logits: np.ndarray, r: Routing, selection: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """logits [T, E] (selection [T, E]: what to choose by, if not the scores) ->
    (experts [T, k] int64, weights [T, k] float32)."""
    logits = np.asarray(logits, dtype=np.float32)  # no copy when it is float32 already
    if r.scoring == "sparsemixer":
        experts, weights = _sparsemixer(logits, r.sparsemixer_eps)
        return experts, weights.astype(np.float32)
    if r.top_k_before_softmax:
        experts = _top_k(logits, r.top_k)
        weights = softmax(np.take_along_axis(logits, experts, axis=-1))
    else:
        if r.scoring == "softmax":
            scores = softmax(logits)
        else:
            with np.errstate(over="ignore"):  # exp(-x) = inf below x = -88: 0, as in torch
                scores = 1 / (1 + np.exp(-logits))
        choose_by = scores if selection is None else selection.astype(np.float32)
        if r.n_group > 1:
            choose_by = _group_mask(choose_by, r)
        experts = _top_k(choose_by, r.top_k)
        weights = np.take_along_axis(scores, experts, axis=-1)  # [T, k]
        if r.normalize_top_k:
            denominator = weights.sum(axis=-1, keepdims=True)
            weights = weights / (denominator + 1e-20 if r.scoring == "sigmoid" else denominator)
    if r.scaling != 1.0:
        weights = weights * np.float32(r.scaling)
    return experts, weights.astype(np.float32)


def tokens_by_expert(experts: np.ndarray, weights: np.ndarray
                     ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """experts, weights [T, k] -> {expert: (rows of the tokens routed to it [n], their weights
    [n])}, in expert order."""
    if len(experts) == 1:  # one token (decoding): the same result with fewer numpy calls
        row = np.zeros(1, np.intp)
        return {int(e): (row, weights[0, j:j + 1]) for j, e in
                sorted(enumerate(experts[0].tolist()), key=lambda je: je[1])}
    groups = {}
    for expert in np.unique(experts):
        chosen = experts == expert  # [T, k]: a token picks an expert at most once
        rows = np.nonzero(chosen.any(axis=1))[0]
        groups[int(expert)] = rows, (weights[rows] * chosen[rows]).sum(axis=1)
    return groups
