"""Phi-3.5-MoE (`PhimoeForCausalLM`): LayerNorm with bias, sparsemixer routing (top-2).

Routing at inference as transformers' `sparsemixer(training=False)`: the best expert, then the
best of the rest, each weighted by a softmax over the experts whose logits are within a
relative threshold (2 x router_jitter_noise) of it. Optional attention and LM-head biases.
"""

from .base import ArchitectureSpec, Role, RouterSpec

P = "model.layers.{layer}"
SPEC = ArchitectureSpec(
    model_type="phimoe",
    hf_architectures=("PhimoeForCausalLM",),
    config_fields={"num_experts": ("num_local_experts",)},
    tensors={
        "model.embed_tokens.weight": Role.EMBED,
        "model.norm.weight": Role.FINAL_NORM,
        "model.norm.bias": Role.FINAL_NORM_BIAS,
        "lm_head.weight": Role.LM_HEAD,
        "lm_head.bias": Role.LM_HEAD_BIAS,
        f"{P}.input_layernorm.weight": Role.ATTN_NORM,
        f"{P}.input_layernorm.bias": Role.ATTN_NORM_BIAS,
        f"{P}.post_attention_layernorm.weight": Role.FFN_NORM,
        f"{P}.post_attention_layernorm.bias": Role.FFN_NORM_BIAS,
        f"{P}.self_attn.q_proj.weight": Role.ATTN_Q,
        f"{P}.self_attn.k_proj.weight": Role.ATTN_K,
        f"{P}.self_attn.v_proj.weight": Role.ATTN_V,
        f"{P}.self_attn.o_proj.weight": Role.ATTN_O,
        f"{P}.self_attn.q_proj.bias": Role.ATTN_Q_BIAS,
        f"{P}.self_attn.k_proj.bias": Role.ATTN_K_BIAS,
        f"{P}.self_attn.v_proj.bias": Role.ATTN_V_BIAS,
        f"{P}.self_attn.o_proj.bias": Role.ATTN_O_BIAS,
        f"{P}.block_sparse_moe.gate.weight": Role.ROUTER,
        f"{P}.block_sparse_moe.experts.{{expert}}.w1.weight": Role.EXPERT_GATE,
        f"{P}.block_sparse_moe.experts.{{expert}}.w3.weight": Role.EXPERT_UP,
        f"{P}.block_sparse_moe.experts.{{expert}}.w2.weight": Role.EXPERT_DOWN,
        # transformers 5 with save_original_format=False
        f"{P}.mlp.router.weight": Role.ROUTER,
        f"{P}.mlp.experts.gate_up_proj": Role.EXPERTS_GATE_UP,
        f"{P}.mlp.experts.down_proj": Role.EXPERTS_DOWN,
    },
    router=RouterSpec(scoring="sparsemixer", sparsemixer_eps_field="router_jitter_noise"),
    norm="layer",
)
