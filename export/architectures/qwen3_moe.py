"""Qwen3-MoE (`Qwen3MoeForCausalLM`: Qwen3-30B-A3B, Qwen3-235B-A22B).

Per-head RMSNorm of q and k before RoPE; no biases, no shared expert; softmax top-k
renormalised if `norm_topk_prob`; dense layers as in Qwen2-MoE.
"""

from .base import ArchitectureSpec, Role, RouterSpec
from .qwen2_moe import is_moe_layer

P = "model.layers.{layer}"
SPEC = ArchitectureSpec(
    model_type="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    config_fields={},
    tensors={
        "model.embed_tokens.weight": Role.EMBED,
        "model.norm.weight": Role.FINAL_NORM,
        "lm_head.weight": Role.LM_HEAD,
        f"{P}.input_layernorm.weight": Role.ATTN_NORM,
        f"{P}.post_attention_layernorm.weight": Role.FFN_NORM,
        f"{P}.self_attn.q_proj.weight": Role.ATTN_Q,
        f"{P}.self_attn.k_proj.weight": Role.ATTN_K,
        f"{P}.self_attn.v_proj.weight": Role.ATTN_V,
        f"{P}.self_attn.o_proj.weight": Role.ATTN_O,
        f"{P}.self_attn.q_norm.weight": Role.ATTN_Q_NORM,
        f"{P}.self_attn.k_norm.weight": Role.ATTN_K_NORM,
        f"{P}.mlp.gate.weight": Role.ROUTER,
        f"{P}.mlp.experts.{{expert}}.gate_proj.weight": Role.EXPERT_GATE,
        f"{P}.mlp.experts.{{expert}}.up_proj.weight": Role.EXPERT_UP,
        f"{P}.mlp.experts.{{expert}}.down_proj.weight": Role.EXPERT_DOWN,
        f"{P}.mlp.experts.gate_up_proj": Role.EXPERTS_GATE_UP,
        f"{P}.mlp.experts.down_proj": Role.EXPERTS_DOWN,
        f"{P}.mlp.gate_proj.weight": Role.DENSE_GATE,
        f"{P}.mlp.up_proj.weight": Role.DENSE_UP,
        f"{P}.mlp.down_proj.weight": Role.DENSE_DOWN,
    },
    router=RouterSpec(scoring="softmax", normalize_top_k=False, normalize_field="norm_topk_prob"),
    qk_norm="head",
    is_moe_layer=is_moe_layer,
)
