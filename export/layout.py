"""From a checkpoint's config and tensor names to model dimensions and a role table.

`CheckpointLayout` answers "which tensor plays role R in layer L (for expert E)", checks that
every role the model needs is present with the shape the dimensions imply, and hides the
expert layouts (one tensor per expert, or all experts of a layer fused) from the exporter.
"""

from __future__ import annotations

import numpy as np

from mobilemoe.errors import ExportError
from mobilemoe.manifest import ModelDims

from .architectures import ArchitectureSpec, Role, TensorRef, claim_tensors
from .architectures.base import (
    DENSE_MLP_ROLES,
    FUSED_EXPERT_ROLES,
    GQA_ROLES,
    MLA_ROLES,
    MXFP4_EXPERT_ROLES,
    PER_EXPERT_ROLES,
    SHARED_ROLES,
)
from .checkpoint import Checkpoint
from .mxfp4 import BLOCK as MXFP4_BLOCK
from .mxfp4 import dequantize as dequantize_mxfp4
from .rope import rope_parameters

# canonical field -> HF config field(s); an architecture spec overrides entries it renames
DEFAULT_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers",),
    "hidden_size": ("hidden_size",),
    "intermediate_size": ("moe_intermediate_size", "intermediate_size"),  # of one expert
    "vocab_size": ("vocab_size",),
    "num_heads": ("num_attention_heads",),
    "num_kv_heads": ("num_key_value_heads", "num_attention_heads"),
    "head_dim": ("head_dim",),
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "top_k": ("num_experts_per_tok",),
    "rms_norm_eps": ("rms_norm_eps", "layer_norm_eps"),
    "max_position_embeddings": ("max_position_embeddings",),
}


def config_value(spec: ArchitectureSpec, config: dict, field: str, default=None):
    names = spec.config_fields.get(field) or DEFAULT_CONFIG_FIELDS.get(field) or (field,)
    for key in names:
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    raise ExportError(f"config.json has no {field} (looked for {', '.join(names)})")


def model_dims(spec: ArchitectureSpec, config: dict, mla_latent_cache: bool = False) -> ModelDims:
    """The model's dimensions; `mla_latent_cache`: a DeepSeek KV cache of latents (export/mla.py)."""
    hidden = int(config_value(spec, config, "hidden_size"))
    heads = int(config_value(spec, config, "num_heads"))
    mla = config.get("kv_lora_rank") is not None
    latent_cache_dim = 0
    if mla:  # DeepSeek: every head has its own k and v, of different widths, made from a latent
        head_dim = int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"])
        value_head_dim, kv_heads = int(config["v_head_dim"]), heads
        if mla_latent_cache:
            latent_cache_dim = int(config["kv_lora_rank"]) + int(config["qk_rope_head_dim"])
    else:
        head_dim = int(config_value(spec, config, "head_dim", hidden // heads))
        value_head_dim, kv_heads = head_dim, int(config_value(spec, config, "num_kv_heads"))
    return ModelDims(
        num_layers=int(config_value(spec, config, "num_layers")),
        hidden_size=hidden,
        intermediate_size=int(config_value(spec, config, "intermediate_size")),
        vocab_size=int(config_value(spec, config, "vocab_size")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        value_head_dim=value_head_dim,
        num_experts=int(config_value(spec, config, "num_experts")),
        top_k=int(config_value(spec, config, "top_k")),
        rms_norm_eps=float(config_value(spec, config, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config_value(spec, config, "max_position_embeddings", 4096)),
        latent_cache_dim=latent_cache_dim,
    )


def default_sliding_window(config: dict, layer: int) -> int:
    """transformers 5 configs list each layer's attention type in `layer_types`."""
    types = config.get("layer_types")
    if types and layer < len(types) and types[layer] == "sliding_attention":
        return int(config.get("sliding_window") or 0)
    return 0


class CheckpointLayout:
    def __init__(self, spec: ArchitectureSpec, config: dict, ckpt: Checkpoint, dims: ModelDims):
        self.spec, self.config, self.ckpt, self.dims = spec, config, ckpt, dims
        self.tied_embeddings = bool(config.get("tie_word_embeddings", False))
        self.rope = rope_parameters(config, dims)
        self.moe_layers = [spec.is_moe_layer(config, i) if spec.is_moe_layer else True
                           for i in range(dims.num_layers)]
        window = spec.sliding_window or default_sliding_window
        self.sliding_windows = [int(window(config, i) or 0) for i in range(dims.num_layers)]
        self.multipliers = dict(spec.multipliers(config)) if spec.multipliers else {}
        refs = claim_tensors(spec, ckpt.names())
        self._global: dict[Role, str] = {}
        self._layer: dict[tuple[int, Role], str] = {}
        self._expert: dict[tuple[int, int, Role], str] = {}
        for ref in refs:
            self._place(ref)
        self._check_complete()
        self._check_shapes()

    def _place(self, ref: TensorRef) -> None:
        if ref.layer is not None and not 0 <= ref.layer < self.dims.num_layers:
            raise ExportError(f"{ref.name}: layer {ref.layer} but the config has "
                              f"{self.dims.num_layers} layers")
        if ref.expert is not None and not 0 <= ref.expert < self.dims.num_experts:
            raise ExportError(f"{ref.name}: expert {ref.expert} but the config has "
                              f"{self.dims.num_experts} experts")
        if ref.expert is not None:
            table, key = self._expert, (ref.layer, ref.expert, ref.role)
        elif ref.layer is not None:
            table, key = self._layer, (ref.layer, ref.role)
        else:
            table, key = self._global, ref.role
        if key in table:
            raise ExportError(f"two tensors play the same role: {table[key]} and {ref.name}")
        table[key] = ref.name

    def has(self, layer: int, role: Role) -> bool:
        return (layer, role) in self._layer

    def _check_complete(self) -> None:
        d = self.dims
        layer_norm = self.spec.norm == "layer"  # LayerNorm: every norm has a bias
        need_global = (Role.EMBED, Role.FINAL_NORM, *((Role.FINAL_NORM_BIAS,) if layer_norm else ()))
        missing = [r.value for r in need_global if r not in self._global]
        if Role.LM_HEAD not in self._global and not self.tied_embeddings:
            missing.append(Role.LM_HEAD.value)
        for layer in range(d.num_layers):
            need = [Role.ATTN_NORM, Role.FFN_NORM]
            if layer_norm:
                need += [Role.ATTN_NORM_BIAS, Role.FFN_NORM_BIAS]
            if self.has(layer, Role.ATTN_KV_A):
                need += [*MLA_ROLES, *([Role.ATTN_Q_A, Role.ATTN_Q_A_NORM, Role.ATTN_Q_B]
                                       if self.has(layer, Role.ATTN_Q_A) else [Role.ATTN_Q])]
            else:
                need += GQA_ROLES
            if self.spec.qk_norm:
                need += [Role.ATTN_Q_NORM, Role.ATTN_K_NORM]
            if any(self.has(layer, r) for r in SHARED_ROLES):
                need += SHARED_ROLES
            if not self.moe_layers[layer]:
                need += DENSE_MLP_ROLES
            else:
                need.append(Role.ROUTER)
                if any(self.has(layer, r) for r in FUSED_EXPERT_ROLES):
                    need += FUSED_EXPERT_ROLES
                elif any(self.has(layer, r) for r in MXFP4_EXPERT_ROLES):
                    need += MXFP4_EXPERT_ROLES
                else:
                    missing += [f"layer {layer} expert {e} {r.value}" for e in range(d.num_experts)
                                for r in PER_EXPERT_ROLES if (layer, e, r) not in self._expert]
            missing += [f"layer {layer} {r.value}" for r in need if not self.has(layer, r)]
        if missing:
            shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise ExportError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")

    def _check_shapes(self) -> None:
        d = self.dims
        h, i, e = d.hidden_size, d.intermediate_size, d.num_experts
        q_out, kv_out = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        fused_gate_up = (e, h, 2 * i) if self.spec.fused_layout == "interleaved_in_out" \
            else (e, 2 * i, h)
        fused_down = (e, i, h) if self.spec.fused_layout == "interleaved_in_out" else (e, h, i)
        mxfp4 = any(role in MXFP4_EXPERT_ROLES for (_, role) in self._layer)
        if mxfp4 and (h % MXFP4_BLOCK or i % MXFP4_BLOCK):
            raise ExportError(f"MXFP4 experts need hidden and intermediate sizes that are "
                              f"multiples of {MXFP4_BLOCK}; the config says {h} and {i}")
        mx = MXFP4_BLOCK  # values per block: 16 bytes of blocks and one scale
        expected = {
            Role.EMBED: (d.vocab_size, h), Role.LM_HEAD: (d.vocab_size, h), Role.FINAL_NORM: (h,),
            Role.ATTN_NORM: (h,), Role.FFN_NORM: (h,), Role.ROUTER: (e, h),
            Role.ATTN_Q: (q_out, h), Role.ATTN_K: (kv_out, h), Role.ATTN_V: (kv_out, h),
            Role.ATTN_O: (h, d.num_heads * d.value_head_dim),
            Role.ATTN_Q_BIAS: (q_out,), Role.ATTN_K_BIAS: (kv_out,), Role.ATTN_V_BIAS: (kv_out,),
            Role.ATTN_O_BIAS: (h,), Role.ROUTER_BIAS: (e,), Role.ROUTER_SELECTION_BIAS: (e,),
            Role.EXPERT_GATE: (i, h), Role.EXPERT_UP: (i, h), Role.EXPERT_DOWN: (h, i),
            Role.EXPERTS_GATE_UP: fused_gate_up, Role.EXPERTS_DOWN: fused_down,
            Role.EXPERTS_GATE_UP_BIAS: (e, 2 * i), Role.EXPERTS_DOWN_BIAS: (e, h),
            Role.ATTN_SINKS: (d.num_heads,),
            # MXFP4 holds [E, out, in] (see mxfp4.py), whatever the float layout
            Role.EXPERTS_GATE_UP_BLOCKS: (e, 2 * i, h // mx, mx // 2),
            Role.EXPERTS_GATE_UP_SCALES: (e, 2 * i, h // mx),
            Role.EXPERTS_DOWN_BLOCKS: (e, h, i // mx, mx // 2),
            Role.EXPERTS_DOWN_SCALES: (e, h, i // mx),
        }
        if self.config.get("kv_lora_rank") is not None:  # MLA: low-rank q and kv
            latent, rope = int(self.config["kv_lora_rank"]), int(self.config["qk_rope_head_dim"])
            q_rank = int(self.config.get("q_lora_rank") or 0)
            expected.update({
                Role.ATTN_KV_A: (latent + rope, h), Role.ATTN_KV_A_NORM: (latent,),
                Role.ATTN_KV_B: (d.num_heads * (d.head_dim - rope + d.value_head_dim), latent),
                Role.ATTN_Q_A: (q_rank, h), Role.ATTN_Q_A_NORM: (q_rank,),
                Role.ATTN_Q_B: (q_out, q_rank),
            })
        tables = [self._global.items(), self._layer.items(), self._expert.items()]
        for table in tables:
            for key, name in table:
                role = key if isinstance(key, Role) else key[-1]
                shape = self.ckpt.shape(name)
                if role in expected and shape != expected[role]:
                    raise ExportError(f"{name}: shape {list(shape)}, the config implies "
                                      f"{list(expected[role])}")

    # -- access ---------------------------------------------------------------------------

    def global_tensor(self, role: Role) -> np.ndarray | None:
        if role is Role.LM_HEAD and role not in self._global:
            role = Role.EMBED  # tie_word_embeddings: the head reuses the embedding table
        name = self._global.get(role)
        return None if name is None else self.ckpt.float32(name)

    def layer_tensor(self, layer: int, role: Role) -> np.ndarray | None:
        """The tensor, or None for an optional role the checkpoint does not have."""
        name = self._layer.get((layer, role))
        return None if name is None else self.ckpt.float32(name)

    def layer_tensors(self, layer: int) -> dict[Role, np.ndarray]:
        """Every non-expert tensor of a layer, by role."""
        skip = (*FUSED_EXPERT_ROLES, *MXFP4_EXPERT_ROLES, Role.EXPERTS_GATE_UP_BIAS,
                Role.EXPERTS_DOWN_BIAS)
        return {role: self.ckpt.float32(name) for (lay, role), name in self._layer.items()
                if lay == layer and role not in skip}

    def expert_matrices(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """One expert as the template wants it: gate_up [2I, H] (gate rows, then up rows),
        down [H, I], and gate_up_bias [2I] / down_bias [H] when the model has them."""
        fused = self._layer.get((layer, Role.EXPERTS_GATE_UP))
        mxfp4 = self.has(layer, Role.EXPERTS_GATE_UP_BLOCKS)
        if fused is None and not mxfp4:
            gate = self.ckpt.float32(self._expert[(layer, expert, Role.EXPERT_GATE)])
            up = self.ckpt.float32(self._expert[(layer, expert, Role.EXPERT_UP)])
            down = self.ckpt.float32(self._expert[(layer, expert, Role.EXPERT_DOWN)])
            return {"gate_up": np.concatenate([gate, up], axis=0), "down": down}
        interleaved = self.spec.fused_layout == "interleaved_in_out"
        if mxfp4:  # MXFP4 decodes to [out, in] whatever the float layout (see mxfp4.py)
            gate_up = self._mxfp4(layer, expert, Role.EXPERTS_GATE_UP_BLOCKS,
                                  Role.EXPERTS_GATE_UP_SCALES)
            down = self._mxfp4(layer, expert, Role.EXPERTS_DOWN_BLOCKS, Role.EXPERTS_DOWN_SCALES)
        else:  # fused 3-D tensors: slicing the memory map reads only this expert's rows
            gate_up = self.ckpt.float32(fused, expert)
            down = self.ckpt.float32(self._layer[(layer, Role.EXPERTS_DOWN)], expert)
            if interleaved:  # [H, 2I] / [I, H] -> [out, in]
                gate_up, down = gate_up.T, np.ascontiguousarray(down.T)
        out = {"gate_up": gate_up, "down": down}
        for role, key in ((Role.EXPERTS_GATE_UP_BIAS, "gate_up_bias"),
                          (Role.EXPERTS_DOWN_BIAS, "down_bias")):
            if (layer, role) in self._layer:
                out[key] = self.ckpt.float32(self._layer[(layer, role)], expert)
        if interleaved:
            # rows (and bias) alternate gate, up, gate, ... -> gate rows, then up rows
            out["gate_up"] = np.concatenate([gate_up[0::2], gate_up[1::2]], axis=0)
            if "gate_up_bias" in out:
                b = out["gate_up_bias"]
                out["gate_up_bias"] = np.concatenate([b[0::2], b[1::2]])
        return out

    def _mxfp4(self, layer: int, expert: int, blocks: Role, scales: Role) -> np.ndarray:
        """One expert's matrix from MXFP4 blocks and scales; only its bytes are read."""
        name = self._layer[(layer, blocks)]
        return dequantize_mxfp4(self.ckpt.copy(name, expert),
                                self.ckpt.copy(self._layer[(layer, scales)], expert),
                                f"{name}[{expert}]")

    def has_expert_bias(self) -> bool:
        return any(self.has(layer, Role.EXPERTS_GATE_UP_BIAS) for layer in range(self.dims.num_layers))
