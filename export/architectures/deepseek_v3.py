"""DeepSeek-V3 (`DeepseekV3ForCausalLM`: Moonlight-16B-A3B, DeepSeek-V3/R1 and their
distillations in this layout).

Attention, shared experts and dense layers as DeepSeek-V2 (see deepseek_v2.py); RoPE on
interleaved pairs unless the config says `rope_interleave: false`.
Routing as transformers' `DeepseekV3TopkRouter`: sigmoid scores; experts *chosen* by score +
`e_score_correction_bias` (the layer graph's `router_selection`) within the best `topk_group`
of `n_group` groups, a group ranked by the sum of its two best biased scores; *weighted* by
the unbiased scores, renormalised (+1e-20) if `norm_topk_prob`, times `routed_scaling_factor`.
"""

from .base import ArchitectureSpec, Role, RouterSpec
from .deepseek_v2 import TENSORS, is_moe_layer, multipliers

SPEC = ArchitectureSpec(
    model_type="deepseek_v3",
    hf_architectures=("DeepseekV3ForCausalLM",),
    config_fields={"num_experts": ("n_routed_experts",)},
    tensors={
        **TENSORS,
        "model.layers.{layer}.mlp.gate.e_score_correction_bias": Role.ROUTER_SELECTION_BIAS,
    },
    router=RouterSpec(scoring="sigmoid", normalize_top_k=True, normalize_field="norm_topk_prob",
                      scaling_field="routed_scaling_factor", grouped=True, group_score="top2_sum"),
    is_moe_layer=is_moe_layer,
    multipliers=multipliers,
)
