"""Qwen2-MoE (`Qwen2MoeForCausalLM`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

q/k/v with biases; a shared expert gated by sigmoid(shared_expert_gate(x)) beside the routed
experts; softmax top-k renormalised only if `norm_topk_prob`; dense MLP layers where
`mlp_only_layers` or `decoder_sparse_step` say so.
"""

from .base import ArchitectureSpec, Role, RouterSpec


def is_moe_layer(config: dict, layer: int) -> bool:
    # transformers 5 saves num_experts as num_local_experts; hub configs say num_experts
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    return (layer not in (config.get("mlp_only_layers") or [])
            and experts > 0
            and (layer + 1) % (config.get("decoder_sparse_step") or 1) == 0)


P = "model.layers.{layer}"
SPEC = ArchitectureSpec(
    model_type="qwen2_moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
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
        f"{P}.self_attn.q_proj.bias": Role.ATTN_Q_BIAS,
        f"{P}.self_attn.k_proj.bias": Role.ATTN_K_BIAS,
        f"{P}.self_attn.v_proj.bias": Role.ATTN_V_BIAS,
        f"{P}.mlp.gate.weight": Role.ROUTER,
        f"{P}.mlp.experts.{{expert}}.gate_proj.weight": Role.EXPERT_GATE,
        f"{P}.mlp.experts.{{expert}}.up_proj.weight": Role.EXPERT_UP,
        f"{P}.mlp.experts.{{expert}}.down_proj.weight": Role.EXPERT_DOWN,
        f"{P}.mlp.experts.gate_up_proj": Role.EXPERTS_GATE_UP,
        f"{P}.mlp.experts.down_proj": Role.EXPERTS_DOWN,
        f"{P}.mlp.shared_expert.gate_proj.weight": Role.SHARED_GATE,
        f"{P}.mlp.shared_expert.up_proj.weight": Role.SHARED_UP,
        f"{P}.mlp.shared_expert.down_proj.weight": Role.SHARED_DOWN,
        f"{P}.mlp.shared_expert_gate.weight": Role.SHARED_EXPERT_GATE,
        f"{P}.mlp.gate_proj.weight": Role.DENSE_GATE,
        f"{P}.mlp.up_proj.weight": Role.DENSE_UP,
        f"{P}.mlp.down_proj.weight": Role.DENSE_DOWN,
    },
    router=RouterSpec(scoring="softmax", normalize_top_k=False, normalize_field="norm_topk_prob"),
    is_moe_layer=is_moe_layer,
)
