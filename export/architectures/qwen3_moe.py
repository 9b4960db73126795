"""Qwen3-MoE (`Qwen3MoeForCausalLM`: Qwen3-30B-A3B, Qwen3-235B-A22B).

Per-head RMSNorm of q and k before RoPE; no biases, no shared expert; softmax top-k
renormalised if `norm_topk_prob`; dense layers as in Qwen2-MoE.
"""

from .base import ArchitectureSpec, Role, RouterSpec
from .names import DENSE_MLP, P, expert_tensors, fused_expert_tensors, llama_tensors, mlp_tensors
from .qwen2_moe import is_moe_layer

SPEC = ArchitectureSpec(
    model_type="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    config_fields={},
    tensors={
        **llama_tensors(),
        f"{P}.self_attn.q_norm.weight": Role.ATTN_Q_NORM,
        f"{P}.self_attn.k_norm.weight": Role.ATTN_K_NORM,
        **expert_tensors(),
        **fused_expert_tensors(),
        **mlp_tensors("mlp", DENSE_MLP),  # the dense layers
    },
    router=RouterSpec(scoring="softmax", normalize_top_k=False, normalize_field="norm_topk_prob"),
    qk_norm="head",
    is_moe_layer=is_moe_layer,
)
