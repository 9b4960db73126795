"""OLMoE (`OlmoeForCausalLM`: OLMoE-1B-7B): 64 experts, top-8.

RMSNorm of q and k over the whole projection (before splitting heads), optional clip_qkv;
softmax top-k, renormalised if `norm_topk_prob` (off in the released model).
"""

from .base import ArchitectureSpec, Role, RouterSpec
from .names import P, expert_tensors, fused_expert_tensors, llama_tensors

SPEC = ArchitectureSpec(
    model_type="olmoe",
    hf_architectures=("OlmoeForCausalLM",),
    config_fields={},
    tensors={
        **llama_tensors(),
        f"{P}.self_attn.q_norm.weight": Role.ATTN_Q_NORM,
        f"{P}.self_attn.k_norm.weight": Role.ATTN_K_NORM,
        **expert_tensors(),
        **fused_expert_tensors(),
    },
    router=RouterSpec(scoring="softmax", normalize_top_k=False, normalize_field="norm_topk_prob"),
    qk_norm="full",
)
