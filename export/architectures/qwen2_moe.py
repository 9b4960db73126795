"""Qwen2-MoE (`Qwen2MoeForCausalLM`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B).

q/k/v with biases; a shared expert gated by sigmoid(shared_expert_gate(x)) beside the routed
experts; softmax top-k renormalised only if `norm_topk_prob`; dense MLP layers where
`mlp_only_layers` or `decoder_sparse_step` say so.
"""

from .base import ArchitectureSpec, Role, RouterSpec
from .names import DENSE_MLP, SHARED_MLP, P, expert_tensors, fused_expert_tensors, llama_tensors, mlp_tensors


def is_moe_layer(config: dict, layer: int) -> bool:
    # transformers 5 saves num_experts as num_local_experts; hub configs say num_experts
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    return (layer not in (config.get("mlp_only_layers") or [])
            and experts > 0
            and (layer + 1) % (config.get("decoder_sparse_step") or 1) == 0)


SPEC = ArchitectureSpec(
    model_type="qwen2_moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
    config_fields={},
    tensors={
        **llama_tensors(attention_biases=("q", "k", "v")),
        **expert_tensors(),
        **fused_expert_tensors(),
        **mlp_tensors("mlp.shared_expert", SHARED_MLP),
        f"{P}.mlp.shared_expert_gate.weight": Role.SHARED_EXPERT_GATE,
        **mlp_tensors("mlp", DENSE_MLP),  # the dense layers
    },
    router=RouterSpec(scoring="softmax", normalize_top_k=False, normalize_field="norm_topk_prob"),
    is_moe_layer=is_moe_layer,
)
