"""Checkpoint names most families share, as role tables to merge into a spec's `tensors`.

Like llama.cpp's tensor map: the names come from Llama, and each family renames a few.
`{layer}` and `{expert}` are the placeholders of base.claim_tensors.
"""

from __future__ import annotations

from .base import Role

P = "model.layers.{layer}"


def llama_tensors(attention_biases: tuple[str, ...] = (), gqa: bool = True) -> dict[str, Role]:
    """Embeddings, final norm, LM head, the two per-layer RMSNorms and (gqa) q/k/v/o; with
    biases on the projections named in `attention_biases` (e.g. ("q", "k", "v"))."""
    table = {
        "model.embed_tokens.weight": Role.EMBED,
        "model.norm.weight": Role.FINAL_NORM,
        "lm_head.weight": Role.LM_HEAD,
        f"{P}.input_layernorm.weight": Role.ATTN_NORM,
        f"{P}.post_attention_layernorm.weight": Role.FFN_NORM,
    }
    if not gqa:
        return table
    table |= {
        f"{P}.self_attn.q_proj.weight": Role.ATTN_Q,
        f"{P}.self_attn.k_proj.weight": Role.ATTN_K,
        f"{P}.self_attn.v_proj.weight": Role.ATTN_V,
        f"{P}.self_attn.o_proj.weight": Role.ATTN_O,
    }
    biases = {"q": Role.ATTN_Q_BIAS, "k": Role.ATTN_K_BIAS, "v": Role.ATTN_V_BIAS,
              "o": Role.ATTN_O_BIAS}
    table.update({f"{P}.self_attn.{p}_proj.bias": biases[p] for p in attention_biases})
    return table


def expert_tensors(block: str = "mlp", router: str = "gate", gate: str = "gate_proj",
                   up: str = "up_proj", down: str = "down_proj") -> dict[str, Role]:
    """The router and the experts in the hub's one-tensor-per-expert layout, under
    `model.layers.N.<block>`."""
    return {
        f"{P}.{block}.{router}.weight": Role.ROUTER,
        f"{P}.{block}.experts.{{expert}}.{gate}.weight": Role.EXPERT_GATE,
        f"{P}.{block}.experts.{{expert}}.{up}.weight": Role.EXPERT_UP,
        f"{P}.{block}.experts.{{expert}}.{down}.weight": Role.EXPERT_DOWN,
    }


def fused_expert_tensors(block: str = "mlp", router: str = "gate") -> dict[str, Role]:
    """The router and the experts as transformers 5 saves them with
    save_original_format=False: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    return {
        f"{P}.{block}.{router}.weight": Role.ROUTER,
        f"{P}.{block}.experts.gate_up_proj": Role.EXPERTS_GATE_UP,
        f"{P}.{block}.experts.down_proj": Role.EXPERTS_DOWN,
    }


def mlp_tensors(module: str, roles: tuple[Role, Role, Role]) -> dict[str, Role]:
    """A SwiGLU MLP `model.layers.N.<module>.{gate,up,down}_proj` (dense or shared)."""
    gate, up, down = roles
    return {f"{P}.{module}.gate_proj.weight": gate, f"{P}.{module}.up_proj.weight": up,
            f"{P}.{module}.down_proj.weight": down}


DENSE_MLP = (Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN)
SHARED_MLP = (Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN)
