"""Mixtral (`MixtralForCausalLM`): Llama attention (GQA + RoPE), 8 SwiGLU experts, top-2.

Router as in transformers' `MixtralTopKRouter`: softmax over all experts, top-k, renormalise.
Hub checkpoints store one tensor per expert (`block_sparse_moe.experts.E.w1/w3/w2`);
transformers 5 with `save_original_format=False` writes them fused under `mlp.experts`.
"""

from .base import ArchitectureSpec, RouterSpec
from .names import expert_tensors, fused_expert_tensors, llama_tensors

SPEC = ArchitectureSpec(
    model_type="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    config_fields={
        "num_experts": ("num_local_experts",),
        "top_k": ("num_experts_per_tok",),
    },
    tensors={
        **llama_tensors(),
        **expert_tensors("block_sparse_moe", gate="w1", up="w3", down="w2"),  # hub layout
        **fused_expert_tensors("mlp"),  # transformers 5
    },
    router=RouterSpec(scoring="softmax", normalize_top_k=True),
)
