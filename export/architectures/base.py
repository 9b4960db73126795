"""How an architecture is declared: config-field aliases, a tensor-name table, flavours, hooks.

An architecture is data, not a pipeline: each checkpoint tensor name pattern maps to a *role*
(what the tensor is for), and the exporter works with roles only. `{layer}` and `{expert}` in
a pattern stand for the layer and expert index. What data cannot say (which layers are dense,
which use a sliding window, how a fused expert tensor is laid out) goes in small hooks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from mobilemoe.errors import ExportError


class Role(str, Enum):
    EMBED = "embed"
    FINAL_NORM = "final_norm"
    FINAL_NORM_BIAS = "final_norm_bias"
    LM_HEAD = "lm_head"
    LM_HEAD_BIAS = "lm_head_bias"
    ATTN_NORM = "attn_norm"
    ATTN_NORM_BIAS = "attn_norm_bias"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    ATTN_Q_BIAS = "attn_q_bias"
    ATTN_K_BIAS = "attn_k_bias"
    ATTN_V_BIAS = "attn_v_bias"
    ATTN_O_BIAS = "attn_o_bias"
    ATTN_Q_NORM = "attn_q_norm"  # RMSNorm of q: per head [D] or over the projection [nh*D]
    ATTN_K_NORM = "attn_k_norm"
    ATTN_SINKS = "attn_sinks"  # one learned logit per head, joins the softmax (GPT-OSS)
    # Multi-head latent attention (DeepSeek): low-rank q and kv
    ATTN_Q_A = "attn_q_a"
    ATTN_Q_A_NORM = "attn_q_a_norm"
    ATTN_Q_B = "attn_q_b"
    ATTN_KV_A = "attn_kv_a"  # [kv_lora_rank + rope_dim, H]
    ATTN_KV_A_NORM = "attn_kv_a_norm"
    ATTN_KV_B = "attn_kv_b"  # [nh * (nope + v), kv_lora_rank]
    FFN_NORM = "ffn_norm"
    FFN_NORM_BIAS = "ffn_norm_bias"
    ROUTER = "router"
    ROUTER_BIAS = "router_bias"  # added to the logits (GPT-OSS)
    ROUTER_SELECTION_BIAS = "router_selection_bias"  # chooses, does not weigh (DeepSeek-V3)
    # Dense MLP of a layer without experts, and shared experts that see every token.
    DENSE_GATE = "dense_gate"
    DENSE_UP = "dense_up"
    DENSE_DOWN = "dense_down"
    SHARED_GATE = "shared_gate"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    SHARED_EXPERT_GATE = "shared_expert_gate"  # sigmoid gate on the shared expert (Qwen2-MoE)
    # One expert's matrices, stored one tensor per expert ("legacy" hub layout), [out, in].
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    # All experts of a layer in 3-D tensors; the spec's `fused_layout` says how.
    EXPERTS_GATE_UP = "experts_gate_up"
    EXPERTS_DOWN = "experts_down"
    EXPERTS_GATE_UP_BIAS = "experts_gate_up_bias"
    EXPERTS_DOWN_BIAS = "experts_down_bias"
    # The same matrices in MXFP4 (GPT-OSS releases), [E, out, in] like transformers'
    # `*_blocks` uint8 [E, N, K/32, 16] and `*_scales` uint8 [E, N, K/32]: see export/mxfp4.py.
    EXPERTS_GATE_UP_BLOCKS = "experts_gate_up_blocks"
    EXPERTS_GATE_UP_SCALES = "experts_gate_up_scales"
    EXPERTS_DOWN_BLOCKS = "experts_down_blocks"
    EXPERTS_DOWN_SCALES = "experts_down_scales"


PER_EXPERT_ROLES = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)
FUSED_EXPERT_ROLES = (Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN)
MXFP4_EXPERT_ROLES = (Role.EXPERTS_GATE_UP_BLOCKS, Role.EXPERTS_GATE_UP_SCALES,
                      Role.EXPERTS_DOWN_BLOCKS, Role.EXPERTS_DOWN_SCALES)
GQA_ROLES = (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O)
MLA_ROLES = (Role.ATTN_KV_A, Role.ATTN_KV_A_NORM, Role.ATTN_KV_B, Role.ATTN_O)
DENSE_MLP_ROLES = (Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN)
SHARED_ROLES = (Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN)


@dataclass(frozen=True)
class RouterSpec:
    """How router logits [T, E] become expert choices, as the transformers code does it.

    Config-dependent settings name the config field that holds them (`*_field`).
    """

    scoring: str = "softmax"  # "softmax" | "sigmoid" | "sparsemixer"
    top_k_before_softmax: bool = False  # softmax over the k chosen logits only
    normalize_top_k: bool = True
    normalize_field: str | None = None  # overrides normalize_top_k when the config has it
    scaling_field: str | None = None  # routed_scaling_factor
    # group-limited top-k (n_group / topk_group in the config); a callable decides from the
    # config (DeepSeek-V2: only when topk_method is "group_limited_greedy")
    grouped: bool | Callable[[dict], bool] = False
    group_score: str = "max"  # "max" | "top2_sum": how a group of experts is ranked
    sparsemixer_eps_field: str | None = None


@dataclass(frozen=True)
class ArchitectureSpec:
    model_type: str  # the HF config's `model_type`: how a checkpoint finds its spec
    hf_architectures: tuple[str, ...]
    # canonical field -> HF config field(s), first present wins
    config_fields: dict[str, tuple[str, ...]]
    # checkpoint name pattern -> role; several patterns may share a role (alternative layouts)
    tensors: dict[str, Role]
    router: RouterSpec = field(default_factory=RouterSpec)
    norm: str = "rms"  # "rms" | "layer" (LayerNorm with bias)
    qk_norm: str | None = None  # None | "head" (per head, [D]) | "full" (over the projection)
    activation: str = "silu"  # expert MLP: "silu" (SwiGLU) | "gpt_oss" (clamped, biased)
    # EXPERTS_GATE_UP layout: "rows" = [E, 2I, H], gate rows then up rows;
    # "interleaved_in_out" = [E, H, 2I] with gate/up alternating along 2I (GPT-OSS).
    fused_layout: str = "rows"
    # Hooks (config -> ...). Defaults: every layer has experts; sliding window from
    # `layer_types` when the config has it.
    is_moe_layer: Callable[[dict, int], bool] | None = None
    sliding_window: Callable[[dict, int], int] | None = None
    # Scalars the graphs apply, from the config: "embedding", "attention" (replaces
    # 1/sqrt(head_dim)), "residual" (scales each block's output), "logits" (divides them).
    multipliers: Callable[[dict], dict[str, float]] | None = None

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
