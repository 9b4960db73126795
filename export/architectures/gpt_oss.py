"""GPT-OSS (`GptOssForCausalLM`: gpt-oss-20b, gpt-oss-120b).

As transformers' modeling_gpt_oss does it:
- attention: GQA with q/k/v/o biases; one learned sink logit per head joins each softmax and
  takes probability mass without contributing a value; layers alternate sliding-window (even
  layers, `layer_types`) and full attention; YaRN RoPE (rotate-half, truncate=False);
- router: logits = x W.T + bias, top-k of the logits, softmax over those k;
- experts: clamped SwiGLU with biases, g = min(gate, limit), u = clip(up, -limit, limit),
  out = g * sigmoid(alpha g) * (u + 1); gate and up *interleaved* along 2I in
  `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`.
Released checkpoints store the expert matrices in MXFP4 (`*_blocks` / `*_scales`, see
export/mxfp4.py); checkpoints re-saved in float by transformers store them as above.
"""

from .base import ArchitectureSpec, Role, RouterSpec
from .names import P, llama_tensors


def sliding_window(config: dict, layer: int) -> int:
    """`layer_types` when the config lists them; otherwise transformers' default
    (GptOssConfig.__post_init__): even layers slide, odd layers attend to everything."""
    types = config.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(int(config["num_hidden_layers"]))]
    return int(config.get("sliding_window") or 0) if types[layer] == "sliding_attention" else 0


E = f"{P}.mlp.experts"
SPEC = ArchitectureSpec(
    model_type="gpt_oss",
    hf_architectures=("GptOssForCausalLM",),
    config_fields={
        "num_experts": ("num_local_experts",),
        "top_k": ("num_experts_per_tok", "experts_per_token"),
    },
    tensors={
        **llama_tensors(attention_biases=("q", "k", "v", "o")),
        f"{P}.self_attn.sinks": Role.ATTN_SINKS,
        f"{P}.mlp.router.weight": Role.ROUTER,
        f"{P}.mlp.router.bias": Role.ROUTER_BIAS,
        f"{E}.gate_up_proj": Role.EXPERTS_GATE_UP,
        f"{E}.down_proj": Role.EXPERTS_DOWN,
        f"{E}.gate_up_proj_bias": Role.EXPERTS_GATE_UP_BIAS,
        f"{E}.down_proj_bias": Role.EXPERTS_DOWN_BIAS,
        # released checkpoints (quantization_config.quant_method "mxfp4")
        f"{E}.gate_up_proj_blocks": Role.EXPERTS_GATE_UP_BLOCKS,
        f"{E}.gate_up_proj_scales": Role.EXPERTS_GATE_UP_SCALES,
        f"{E}.down_proj_blocks": Role.EXPERTS_DOWN_BLOCKS,
        f"{E}.down_proj_scales": Role.EXPERTS_DOWN_SCALES,
    },
    router=RouterSpec(scoring="softmax", top_k_before_softmax=True),
    activation="gpt_oss",
    fused_layout="interleaved_in_out",
    sliding_window=sliding_window,
)
