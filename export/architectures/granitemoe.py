"""Granite-MoE (`GraniteMoeForCausalLM`: granite-3.x-1b-a400m, 3b-a800m).

Experts are stored fused (`input_linear` [E, 2I, H], gate rows then up rows;
`output_linear` [E, H, I]); the router takes the top-k logits, then a softmax over them.
Multipliers: embeddings x embedding_multiplier, attention scores x attention_multiplier
(instead of 1/sqrt(head_dim)), each block's output x residual_multiplier, logits /
logits_scaling.
"""

from .base import ArchitectureSpec, Role, RouterSpec


def multipliers(config: dict) -> dict[str, float]:
    return {
        "embedding": float(config.get("embedding_multiplier", 1.0)),
        "attention": float(config.get("attention_multiplier", 1.0)),
        "residual": float(config.get("residual_multiplier", 1.0)),
        "logits": float(config.get("logits_scaling", 1.0)),
    }


P = "model.layers.{layer}"
SPEC = ArchitectureSpec(
    model_type="granitemoe",
    hf_architectures=("GraniteMoeForCausalLM",),
    config_fields={"num_experts": ("num_local_experts",)},
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
        f"{P}.block_sparse_moe.router.layer.weight": Role.ROUTER,
        f"{P}.block_sparse_moe.input_linear.weight": Role.EXPERTS_GATE_UP,
        f"{P}.block_sparse_moe.output_linear.weight": Role.EXPERTS_DOWN,
        # transformers 5 with save_original_format=False
        f"{P}.block_sparse_moe.router.weight": Role.ROUTER,
        f"{P}.block_sparse_moe.experts.gate_up_proj": Role.EXPERTS_GATE_UP,
        f"{P}.block_sparse_moe.experts.down_proj": Role.EXPERTS_DOWN,
    },
    router=RouterSpec(scoring="softmax", top_k_before_softmax=True),
    multipliers=multipliers,
)
