"""Mixtral (`MixtralForCausalLM`): Llama attention (GQA + RoPE), 8 SwiGLU experts, top-2.

Router as in transformers' `MixtralTopKRouter`: softmax over all experts, top-k, renormalise.
Hub checkpoints store one tensor per expert (`block_sparse_moe.experts.E.w1/w3/w2`);
transformers 5 with `save_original_format=False` writes them fused under `mlp.experts`.
"""

from .base import ArchitectureSpec, Role, RouterSpec

SPEC = ArchitectureSpec(
    model_type="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    config_fields={
        "num_experts": ("num_local_experts",),
        "top_k": ("num_experts_per_tok",),
    },
    tensors={
        "model.embed_tokens.weight": Role.EMBED,
        "model.norm.weight": Role.FINAL_NORM,
        "lm_head.weight": Role.LM_HEAD,
        "model.layers.{layer}.input_layernorm.weight": Role.ATTN_NORM,
        "model.layers.{layer}.self_attn.q_proj.weight": Role.ATTN_Q,
        "model.layers.{layer}.self_attn.k_proj.weight": Role.ATTN_K,
        "model.layers.{layer}.self_attn.v_proj.weight": Role.ATTN_V,
        "model.layers.{layer}.self_attn.o_proj.weight": Role.ATTN_O,
        "model.layers.{layer}.post_attention_layernorm.weight": Role.FFN_NORM,
        # hub layout
        "model.layers.{layer}.block_sparse_moe.gate.weight": Role.ROUTER,
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight": Role.EXPERT_GATE,
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight": Role.EXPERT_UP,
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight": Role.EXPERT_DOWN,
        # transformers 5 fused layout
        "model.layers.{layer}.mlp.gate.weight": Role.ROUTER,
        "model.layers.{layer}.mlp.experts.gate_up_proj": Role.EXPERTS_GATE_UP,
        "model.layers.{layer}.mlp.experts.down_proj": Role.EXPERTS_DOWN,
    },
    router=RouterSpec(scoring="softmax", normalize_top_k=True),
)
