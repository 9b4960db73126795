"""One test entry per registered architecture: a tiny config and a real-model-shaped one.

`tiny` exercises every feature the family has at dimensions that are not multiples of the
quantization block (32); `real_like` keeps the real model's structural flags (expert count,
top-k, head layout, multipliers, dense layers, rope type) at scaled-down sizes.
Adding an architecture = one spec file in export/architectures/ + one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import AutoConfig, PretrainedConfig

# Shared by every tiny config: 6 heads over 2 KV heads, hidden 72, vocab 320.
TINY = dict(vocab_size=320, hidden_size=72, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False)
SMALL = dict(vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             max_position_embeddings=512)


@dataclass(frozen=True)
class Entry:
    model_type: str
    tiny: dict
    real_like: dict
    real_models: str
    # max |logit error| of int8 (accuracy level 1) against float32 transformers. Where a
    # quantization error can flip a routing decision of these random models it is larger;
    # the tight test against the same dequantized weights is what checks the semantics.
    int8_bound: float = 0.15
    # config changes for the greedy-generation checkpoint only (see phimoe)
    greedy_overrides: dict = field(default_factory=dict)

    def config(self, which: str = "tiny", **overrides) -> PretrainedConfig:
        base = {**TINY, **self.tiny} if which == "tiny" else {**SMALL, **self.real_like}
        return AutoConfig.for_model(self.model_type, **{**base, **overrides})


ARCHITECTURES: dict[str, Entry] = {
    "mixtral": Entry(
        "mixtral",
        tiny=dict(intermediate_size=88, num_local_experts=4, num_experts_per_tok=2),
        real_like=dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                       num_experts_per_tok=2, rope_theta=1e6),
        real_models="Mixtral-8x7B, Mixtral-8x22B",
    ),
    "qwen2_moe": Entry(
        "qwen2_moe",
        tiny=dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=40,
                  shared_expert_intermediate_size=56, num_experts=4, num_experts_per_tok=2,
                  decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False),
        # Qwen1.5-MoE-A2.7B: 60 experts top-4, shared expert 4x, MHA, qkv bias
        real_like=dict(hidden_size=64, intermediate_size=160, moe_intermediate_size=24,
                       shared_expert_intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=60,
                       num_experts_per_tok=4, norm_topk_prob=False, rope_theta=1e6),
        real_models="Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B",
    ),
    "qwen3_moe": Entry(
        "qwen3_moe",
        tiny=dict(head_dim=16, intermediate_size=96, moe_intermediate_size=40, num_experts=4,
                  num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                  mlp_only_layers=[]),
        # Qwen3-30B-A3B: 128 experts top-8, 32 q heads / 4 kv heads, head_dim != hidden/heads
        real_like=dict(hidden_size=64, head_dim=16, intermediate_size=96,
                       moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, num_experts=128, num_experts_per_tok=8,
                       norm_topk_prob=True, rope_theta=1e6),
        real_models="Qwen3-30B-A3B, Qwen3-235B-A22B",
    ),
    "olmoe": Entry(
        "olmoe",
        tiny=dict(intermediate_size=88, num_experts=8, num_experts_per_tok=3,
                  norm_topk_prob=False),
        # OLMoE-1B-7B: 64 experts top-8, MHA, q/k norm over the projections
        real_like=dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=64,
                       num_experts_per_tok=8, norm_topk_prob=False),
        real_models="OLMoE-1B-7B",
        int8_bound=0.5,  # top-3 of 8 random experts: int8 noise flips some choices
    ),
    "granitemoe": Entry(
        "granitemoe",
        tiny=dict(intermediate_size=88, num_local_experts=4, num_experts_per_tok=2,
                  embedding_multiplier=4.0, attention_multiplier=0.2, residual_multiplier=0.5,
                  logits_scaling=2.0),
        # granite-3.0-3b-a800m: 40 experts top-8, tied embeddings, its multipliers
        real_like=dict(hidden_size=96, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=12, num_key_value_heads=4, num_local_experts=40,
                       num_experts_per_tok=8, embedding_multiplier=12.0,
                       attention_multiplier=0.015625, residual_multiplier=0.22,
                       logits_scaling=6.0, tie_word_embeddings=True, rope_theta=10000.0),
        real_models="granite-3.0-1b-a400m, granite-3.0-3b-a800m, granite-3.1 MoE",
    ),
    "phimoe": Entry(
        "phimoe",
        tiny=dict(intermediate_size=88, num_local_experts=4, num_experts_per_tok=2,
                  attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01),
        # Phi-3.5-MoE: 16 experts top-2, LongRoPE (short factors within 4096 tokens)
        real_like=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, num_local_experts=16,
                       num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
                       router_jitter_noise=0.01, max_position_embeddings=131072,
                       rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.5],
                                     "long_factor": [1.0, 2.0, 4.0, 8.0],
                                     "original_max_position_embeddings": 4096,
                                     "short_mscale": 1.243, "long_mscale": 1.243}),
        real_models="Phi-3.5-MoE-instruct",
        # sparsemixer mixes the experts within 2 x eps (relative) of the best one: on a
        # briefly trained model int8 noise moves router logits across that threshold and
        # changes the mixture, so greedy parity is checked with a sharp threshold.
        int8_bound=1.5,
        greedy_overrides=dict(router_jitter_noise=1e-6),
    ),
    "gpt_oss": Entry(
        "gpt_oss",
        # sliding window 4 < the 16-token test prompt; layers alternate sliding / full; a
        # SwiGLU limit low enough that the clamps bite (~15% of gates, ~25% of ups)
        tiny=dict(head_dim=12, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                  sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                  swiglu_limit=0.8, swiglu_alpha=1.5),
        # gpt-oss-20b: 32 experts top-4, head_dim 64, 8 q heads per kv head, sliding window
        # 128 on even layers, YaRN x32 over 4096 (truncate=False), clamped SwiGLU at 7.0
        real_like=dict(hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=16, num_key_value_heads=2, head_dim=64,
                       num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                       layer_types=["sliding_attention", "full_attention"],
                       max_position_embeddings=131072, swiglu_limit=7.0,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0,
                                        "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "truncate": False,
                                        "original_max_position_embeddings": 4096}),
        real_models="gpt-oss-20b, gpt-oss-120b (MXFP4 experts read and requantized)",
    ),
    "deepseek_v2": Entry(
        "deepseek_v2",
        # MLA without q LoRA, odd head dims, YaRN with mscale != mscale_all_dim (so both the
        # cos/sin factor and the softmax scale matter), group-limited greedy routing, scaling
        tiny=dict(num_key_value_heads=6, q_lora_rank=None, kv_lora_rank=36, qk_rope_head_dim=10,
                  qk_nope_head_dim=14, v_head_dim=18, intermediate_size=88,
                  moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=3,
                  n_shared_experts=2, first_k_dense_replace=1, topk_method="group_limited_greedy",
                  n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False,
                  rms_norm_eps=1e-5,
                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                "mscale_all_dim": 0.5}),
        # DeepSeek-V2-Lite: no q LoRA, kv_lora_rank 512, rope 64 / nope 128 / v 128, 64 experts
        # top-6 greedy, 2 shared experts, first layer dense, YaRN x40 over 4096
        real_like=dict(hidden_size=64, intermediate_size=160, moe_intermediate_size=24,
                       num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                       q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8,
                       qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=64,
                       num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
                       topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                       routed_scaling_factor=1.0, max_position_embeddings=163840,
                       rope_theta=10000.0,
                       rope_scaling={"type": "yarn", "factor": 40,
                                     "original_max_position_embeddings": 4096, "beta_fast": 32,
                                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
        real_models="DeepSeek-V2-Lite, DeepSeek-Coder-V2-Lite (DeepSeek-V2 236B: same code)",
    ),
    "deepseek_v3": Entry(
        "deepseek_v3",
        # MLA with q LoRA, sigmoid routing with a (random) selection bias, groups ranked by
        # their top-2 sum, renormalised and scaled; two MoE layers
        tiny=dict(num_hidden_layers=3, num_key_value_heads=6, q_lora_rank=40, kv_lora_rank=36,
                  qk_rope_head_dim=10, qk_nope_head_dim=14, v_head_dim=18, intermediate_size=88,
                  moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=3,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-5),
        # DeepSeek-V3's structure (256 experts top-8 in 8 groups, top-4 groups, q LoRA, YaRN
        # x40) scaled down; Moonlight-16B-A3B is the same code with q_lora_rank None and
        # n_group 1
        real_like=dict(hidden_size=64, intermediate_size=160, moe_intermediate_size=24,
                       num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                       q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8,
                       qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=64,
                       num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
                       first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                       max_position_embeddings=163840, rope_theta=10000.0,
                       rope_scaling={"type": "yarn", "factor": 40,
                                     "original_max_position_embeddings": 4096, "beta_fast": 32,
                                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
        real_models="Moonlight-16B-A3B, DeepSeek-V3 / R1 layout (bf16 checkpoints)",
        int8_bound=0.6,  # sigmoid top-k over random experts: int8 noise can swap one
    ),
}
