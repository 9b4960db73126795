"""DeepSeek-V2 (`DeepseekV2ForCausalLM`: DeepSeek-V2-Lite, DeepSeek-V2, DeepSeek-Coder-V2).

Multi-head latent attention (export/mla.py): q straight from q_proj (q_lora_rank None, Lite)
or through the low-rank q_a_proj -> q_a_layernorm -> q_b_proj; k and v from a shared latent.
RoPE on interleaved pairs; with YaRN the softmax scale is multiplied by mscale(factor,
mscale_all_dim)^2. Shared experts beside the routed ones (no gate); the first
`first_k_dense_replace` layers have a dense MLP instead.

Routing as transformers' `DeepseekV2TopkRouter`: softmax over all experts, top-k ("greedy"),
or top-k within the best `topk_group` of `n_group` groups ranked by their best expert
("group_limited_greedy"); the weights times `routed_scaling_factor`, never renormalised:
transformers ignores `norm_topk_prob` here (DeepSeek's own code would renormalise and then
skip the scaling; every released V2 config has norm_topk_prob false, where the two agree).
"""

import math

from .base import ArchitectureSpec, Role, RouterSpec
from .names import (
    DENSE_MLP,
    SHARED_MLP,
    P,
    expert_tensors,
    fused_expert_tensors,
    llama_tensors,
    mlp_tensors,
)


def is_moe_layer(config: dict, layer: int) -> bool:
    # transformers checks first_k_dense_replace only; DeepSeek's code also moe_layer_freq
    # (1 in every released model). A checkpoint follows the latter, and a mismatch would
    # fail the completeness check, never pass silently.
    return (layer >= int(config.get("first_k_dense_replace") or 0)
            and layer % int(config.get("moe_layer_freq") or 1) == 0)


def multipliers(config: dict) -> dict[str, float]:
    """The softmax scale: 1/sqrt(qk_head_dim), x mscale^2 with YaRN (`yarn_apply_mscale`)."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    head_dim = int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"])
    scale = head_dim ** -0.5
    rope_type = params.get("rope_type", params.get("type", "default"))
    mscale_all_dim = params.get("mscale_all_dim") or 0
    if rope_type != "default" and mscale_all_dim and float(params["factor"]) > 1:
        mscale = 0.1 * mscale_all_dim * math.log(float(params["factor"])) + 1.0
        scale *= mscale * mscale
    return {"attention": scale}


TENSORS = {
    **llama_tensors(gqa=False),  # embeddings, norms, LM head; attention is MLA below
    f"{P}.self_attn.q_proj.weight": Role.ATTN_Q,
    f"{P}.self_attn.q_a_proj.weight": Role.ATTN_Q_A,
    f"{P}.self_attn.q_a_layernorm.weight": Role.ATTN_Q_A_NORM,
    f"{P}.self_attn.q_b_proj.weight": Role.ATTN_Q_B,
    f"{P}.self_attn.kv_a_proj_with_mqa.weight": Role.ATTN_KV_A,
    f"{P}.self_attn.kv_a_layernorm.weight": Role.ATTN_KV_A_NORM,
    f"{P}.self_attn.kv_b_proj.weight": Role.ATTN_KV_B,
    f"{P}.self_attn.o_proj.weight": Role.ATTN_O,
    **expert_tensors(),  # hub layout, one tensor per expert
    **fused_expert_tensors(),  # transformers 5 with save_original_format=False
    **mlp_tensors("mlp.shared_experts", SHARED_MLP),
    **mlp_tensors("mlp", DENSE_MLP),  # the dense layers
}

SPEC = ArchitectureSpec(
    model_type="deepseek_v2",
    hf_architectures=("DeepseekV2ForCausalLM",),
    config_fields={"num_experts": ("n_routed_experts",)},
    tensors=TENSORS,
    router=RouterSpec(scoring="softmax", normalize_top_k=False,
                      scaling_field="routed_scaling_factor",
                      grouped=lambda config: config.get("topk_method") == "group_limited_greedy",
                      group_score="max"),
    is_moe_layer=is_moe_layer,
    multipliers=multipliers,
)
