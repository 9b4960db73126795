"""How an architecture is declared: config-field aliases, a tensor-name table, router semantics.

An architecture is data, not a pipeline: each checkpoint tensor name pattern maps to a *role*
(what the tensor is for), and the exporter works with roles only. `{layer}` and `{expert}` in
a pattern stand for the layer and expert index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from mobilemoe.errors import ExportError


class Role(str, Enum):
    EMBED = "embed"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"
    ATTN_NORM = "attn_norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    FFN_NORM = "ffn_norm"
    ROUTER = "router"
    # One expert's matrices, stored one tensor per expert ("legacy" hub layout), [out, in].
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    # All experts of a layer in one 3-D tensor (transformers 5 layout):
    # gate_up [E, 2I, H] (gate rows first, then up rows), down [E, H, I].
    EXPERTS_GATE_UP = "experts_gate_up"
    EXPERTS_DOWN = "experts_down"


GLOBAL_ROLES = (Role.EMBED, Role.FINAL_NORM, Role.LM_HEAD)
LAYER_ROLES = (
    Role.ATTN_NORM, Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.FFN_NORM, Role.ROUTER
)
PER_EXPERT_ROLES = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)
FUSED_EXPERT_ROLES = (Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN)


@dataclass(frozen=True)
class RouterSpec:
    """How router logits [T, E] become expert choices, as the transformers code does it."""

    scoring: str = "softmax"  # probabilities over all experts, then top-k
    normalize_top_k: bool = True  # renormalise the k chosen probabilities to sum to 1


@dataclass(frozen=True)
class ArchitectureSpec:
    model_type: str  # the HF config's `model_type`: how a checkpoint finds its spec
    hf_architectures: tuple[str, ...]
    # canonical field -> HF config field(s), first present wins
    config_fields: dict[str, tuple[str, ...]]
    # checkpoint name pattern -> role; several patterns may share a role (alternative layouts)
    tensors: dict[str, Role]
    router: RouterSpec = field(default_factory=RouterSpec)
    activation: str = "silu"  # expert MLP: act(gate) * up, then down
    attention: str = "gqa_rope"

    def compiled_patterns(self) -> list[tuple[re.Pattern[str], Role]]:
        compiled = []
        for pattern, role in self.tensors.items():
            regex = re.escape(pattern)
            regex = regex.replace(r"\{layer\}", r"(?P<layer>\d+)")
            regex = regex.replace(r"\{expert\}", r"(?P<expert>\d+)")
            compiled.append((re.compile(f"^{regex}$"), role))
        return compiled


@dataclass(frozen=True)
class TensorRef:
    name: str
    role: Role
    layer: int | None
    expert: int | None


def claim_tensors(spec: ArchitectureSpec, names: list[str]) -> list[TensorRef]:
    """Assign every checkpoint tensor a role; a tensor no pattern claims is an error."""
    patterns = spec.compiled_patterns()
    refs, unclaimed = [], []
    for name in names:
        for regex, role in patterns:
            match = regex.match(name)
            if match:
                groups = match.groupdict()
                layer = int(groups["layer"]) if groups.get("layer") is not None else None
                expert = int(groups["expert"]) if groups.get("expert") is not None else None
                refs.append(TensorRef(name, role, layer, expert))
                break
        else:
            unclaimed.append(name)
    if unclaimed:
        shown = ", ".join(unclaimed[:5]) + (" ..." if len(unclaimed) > 5 else "")
        raise ExportError(
            f"{len(unclaimed)} checkpoint tensor(s) not claimed by the {spec.model_type} "
            f"architecture spec: {shown}"
        )
    return refs
