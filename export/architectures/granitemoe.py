"""Granite-MoE (`GraniteMoeForCausalLM`: granite-3.x-1b-a400m, 3b-a800m).

Experts are stored fused (`input_linear` [E, 2I, H], gate rows then up rows;
`output_linear` [E, H, I]); the router takes the top-k logits, then a softmax over them.
Multipliers: embeddings x embedding_multiplier, attention scores x attention_multiplier
(instead of 1/sqrt(head_dim)), each block's output x residual_multiplier, logits /
logits_scaling.
"""

from .base import ArchitectureSpec, Role, RouterSpec
from .names import P, fused_expert_tensors, llama_tensors


def multipliers(config: dict) -> dict[str, float]:
    return {
        "embedding": float(config.get("embedding_multiplier", 1.0)),
        "attention": float(config.get("attention_multiplier", 1.0)),
        "residual": float(config.get("residual_multiplier", 1.0)),
        "logits": float(config.get("logits_scaling", 1.0)),
    }


SPEC = ArchitectureSpec(
    model_type="granitemoe",
    hf_architectures=("GraniteMoeForCausalLM",),
    config_fields={"num_experts": ("num_local_experts",)},
    tensors={
        **llama_tensors(),
        f"{P}.block_sparse_moe.router.layer.weight": Role.ROUTER,
        f"{P}.block_sparse_moe.input_linear.weight": Role.EXPERTS_GATE_UP,
        f"{P}.block_sparse_moe.output_linear.weight": Role.EXPERTS_DOWN,
        **fused_expert_tensors("block_sparse_moe", router="router"),  # transformers 5
    },
    router=RouterSpec(scoring="softmax", top_k_before_softmax=True),
    multipliers=multipliers,
)
