"""From a checkpoint's config and tensor names to model dimensions and a role table.

`CheckpointLayout` answers "which tensor plays role R in layer L (for expert E)", checks that
every role the model needs is present with the shape the dimensions imply, and hides the two
expert layouts (one tensor per expert, or all experts of a layer fused) from the exporter.
"""

from __future__ import annotations

import numpy as np

from mobilemoe.errors import ExportError
from mobilemoe.manifest import ModelDims

from .architectures import ArchitectureSpec, Role, TensorRef, claim_tensors
from .architectures.base import FUSED_EXPERT_ROLES, GLOBAL_ROLES, LAYER_ROLES, PER_EXPERT_ROLES
from .checkpoint import Checkpoint

# canonical field -> HF config field(s); an architecture spec overrides entries it renames
DEFAULT_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers",),
    "hidden_size": ("hidden_size",),
    "intermediate_size": ("intermediate_size",),
    "vocab_size": ("vocab_size",),
    "num_heads": ("num_attention_heads",),
    "num_kv_heads": ("num_key_value_heads", "num_attention_heads"),
    "head_dim": ("head_dim",),
    "num_experts": ("num_experts",),
    "top_k": ("num_experts_per_tok",),
    "rms_norm_eps": ("rms_norm_eps",),
    "max_position_embeddings": ("max_position_embeddings",),
}


def config_value(spec: ArchitectureSpec, config: dict, field: str, default=None):
    for key in spec.config_fields.get(field, DEFAULT_CONFIG_FIELDS.get(field, (field,))):
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    names = spec.config_fields.get(field) or DEFAULT_CONFIG_FIELDS.get(field)
    raise ExportError(f"config.json has no {field} (looked for {', '.join(names or [field])})")


def model_dims(spec: ArchitectureSpec, config: dict) -> ModelDims:
    hidden = int(config_value(spec, config, "hidden_size"))
    heads = int(config_value(spec, config, "num_heads"))
    return ModelDims(
        num_layers=int(config_value(spec, config, "num_layers")),
        hidden_size=hidden,
        intermediate_size=int(config_value(spec, config, "intermediate_size")),
        vocab_size=int(config_value(spec, config, "vocab_size")),
        num_heads=heads,
        num_kv_heads=int(config_value(spec, config, "num_kv_heads")),
        head_dim=int(config_value(spec, config, "head_dim", hidden // heads)),
        num_experts=int(config_value(spec, config, "num_experts")),
        top_k=int(config_value(spec, config, "top_k")),
        rms_norm_eps=float(config_value(spec, config, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config_value(spec, config, "max_position_embeddings", 4096)),
    )


def rope_inv_freq(config: dict, head_dim: int) -> tuple[np.ndarray, float]:
    """inv_freq [head_dim/2] and attention scaling, for the rope types we support."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"unsupported rope type {rope_type!r} (supported: default)")
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    return (1.0 / (theta ** exponent)).astype(np.float32), 1.0


class CheckpointLayout:
    def __init__(self, spec: ArchitectureSpec, config: dict, ckpt: Checkpoint, dims: ModelDims):
        self.spec, self.ckpt, self.dims = spec, ckpt, dims
        self.tied_embeddings = bool(config.get("tie_word_embeddings", False))
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

    def _check_complete(self) -> None:
        d = self.dims
        missing = [r.value for r in GLOBAL_ROLES if r not in self._global
                   and not (r is Role.LM_HEAD and self.tied_embeddings)]
        for layer in range(d.num_layers):
            missing += [f"layer {layer} {r.value}" for r in LAYER_ROLES
                        if (layer, r) not in self._layer]
            fused = [r for r in FUSED_EXPERT_ROLES if (layer, r) in self._layer]
            if fused:
                missing += [f"layer {layer} {r.value}" for r in FUSED_EXPERT_ROLES
                            if r not in fused]
                continue
            for expert in range(d.num_experts):
                missing += [f"layer {layer} expert {expert} {r.value}" for r in PER_EXPERT_ROLES
                            if (layer, expert, r) not in self._expert]
        if missing:
            shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
            raise ExportError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")

    def _check_shapes(self) -> None:
        d = self.dims
        h, i, e = d.hidden_size, d.intermediate_size, d.num_experts
        expected = {
            Role.EMBED: (d.vocab_size, h), Role.LM_HEAD: (d.vocab_size, h), Role.FINAL_NORM: (h,),
            Role.ATTN_NORM: (h,), Role.FFN_NORM: (h,), Role.ROUTER: (e, h),
            Role.ATTN_Q: (d.num_heads * d.head_dim, h), Role.ATTN_K: (d.num_kv_heads * d.head_dim, h),
            Role.ATTN_V: (d.num_kv_heads * d.head_dim, h), Role.ATTN_O: (h, d.num_heads * d.head_dim),
            Role.EXPERT_GATE: (i, h), Role.EXPERT_UP: (i, h), Role.EXPERT_DOWN: (h, i),
            Role.EXPERTS_GATE_UP: (e, 2 * i, h), Role.EXPERTS_DOWN: (e, h, i),
        }
        tables = [self._global.items(), self._layer.items(), self._expert.items()]
        for table in tables:
            for key, name in table:
                role = key if isinstance(key, Role) else key[-1]
                shape = self.ckpt.shape(name)
                if shape != expected[role]:
                    raise ExportError(f"{name}: shape {list(shape)}, the config implies "
                                      f"{list(expected[role])}")

    # -- access ---------------------------------------------------------------------------

    def global_tensor(self, role: Role) -> np.ndarray:
        if role is Role.LM_HEAD and role not in self._global:
            role = Role.EMBED  # tie_word_embeddings: the head reuses the embedding table
        return self.ckpt.float32(self._global[role])

    def layer_tensor(self, layer: int, role: Role) -> np.ndarray:
        return self.ckpt.float32(self._layer[(layer, role)])

    def expert_matrices(self, layer: int, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """gate_up [2I, H] (gate rows, then up rows) and down [H, I] of one expert."""
        if (layer, Role.EXPERTS_GATE_UP) in self._layer:
            # Fused 3-D tensors: slicing the memory map reads only this expert's rows.
            gate_up = self.ckpt.float32(self._layer[(layer, Role.EXPERTS_GATE_UP)], expert)
            down = self.ckpt.float32(self._layer[(layer, Role.EXPERTS_DOWN)], expert)
            return gate_up, down
        gate = self.ckpt.float32(self._expert[(layer, expert, Role.EXPERT_GATE)])
        up = self.ckpt.float32(self._expert[(layer, expert, Role.EXPERT_UP)])
        down = self.ckpt.float32(self._expert[(layer, expert, Role.EXPERT_DOWN)])
        return np.concatenate([gate, up], axis=0), down
