"""Phi-3.5-MoE (`PhimoeForCausalLM`): LayerNorm with bias, sparsemixer routing (top-2).

Routing at inference as transformers' `sparsemixer(training=False)`: the best expert, then the
best of the rest, each weighted by a softmax over the experts whose logits are within a
relative threshold (2 x router_jitter_noise) of it. Optional attention and LM-head biases.
"""

from .base import ArchitectureSpec, Role, RouterSpec
from .names import P, expert_tensors, fused_expert_tensors, llama_tensors

SPEC = ArchitectureSpec(
    model_type="phimoe",
    hf_architectures=("PhimoeForCausalLM",),
    config_fields={"num_experts": ("num_local_experts",)},
    tensors={
        **llama_tensors(attention_biases=("q", "k", "v", "o")),
        # LayerNorms: the RMSNorm names of llama_tensors plus their biases
        "model.norm.bias": Role.FINAL_NORM_BIAS,
        "lm_head.bias": Role.LM_HEAD_BIAS,
        f"{P}.input_layernorm.bias": Role.ATTN_NORM_BIAS,
        f"{P}.post_attention_layernorm.bias": Role.FFN_NORM_BIAS,
        **expert_tensors("block_sparse_moe", gate="w1", up="w3", down="w2"),
        **fused_expert_tensors("mlp", router="router"),  # transformers 5
    },
    router=RouterSpec(scoring="sparsemixer", sparsemixer_eps_field="router_jitter_noise"),
    norm="layer",
)
