"""`mobilemoe inspect`: what a package holds and the smallest memory budget it runs in.

The minimum budget is measured, not estimated from file sizes: the package is loaded with no
budget, which creates the dense sessions and calibrates what one expert holds (`model.plan`):
its block as read on the native kernel, or its session after ONNX Runtime's prepacking.
"""

from __future__ import annotations

from typing import Any

import mobilemoe
from mobilemoe.units import parse_bytes

from .format import console, folder_bytes, format_bytes, print_rows


def inspect_model(package: str, memory_budget: str | None = None, threads: int | None = None,
                  context_length: int | None = None) -> dict[str, Any]:
    """Everything `inspect` prints, as plain JSON-ready values (sizes in bytes)."""
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    with mobilemoe.load(package, memory_budget=None, threads=threads,
                        context_length=context_length) as model:
        m, plan, kernel = model.manifest, model.plan, model.expert_kernel
    d, q = m.dims, m.quantization
    total_experts = m.experts_total
    experts_part = plan.top_k * plan.expert_session_bytes
    # whatever the plan adds on top of the measured parts (headroom for measurement noise)
    margin = plan.minimum_budget - plan.fixed_bytes - experts_part
    info: dict[str, Any] = {
        "package": str(model.package),
        "format_version": m.format_version,
        "created_by": m.created_by,
        "model_type": m.model_type,
        "architecture": m.hf_architecture,
        "layers": d.num_layers,
        "hidden_size": d.hidden_size,
        "intermediate_size": d.intermediate_size,
        "attention_heads": d.num_heads,
        "kv_heads": d.num_kv_heads,
        "head_dim": d.head_dim,
        "latent_cache_dim": d.latent_cache_dim,  # DeepSeek exported with --mla-cache latent
        "vocab_size": d.vocab_size,
        "max_position_embeddings": d.max_position_embeddings,
        "experts": d.num_experts,
        "experts_total": total_experts,
        "top_k": m.routing.top_k,
        "router": {"scoring": m.routing.scoring, "normalize_top_k": m.routing.normalize_top_k},
        "expert_kernel": kernel,  # what computes the experts here: "native" or "onnxruntime"
        "quantization": {"expert_bits": q.expert_bits, "dense_bits": q.dense_bits,
                         "block_size": q.block_size, "accuracy_level": q.accuracy_level},
        "bytes": {
            "package": folder_bytes(model.package),
            "embed_graph": m.embed_graph.size,
            "layer_graphs": sum(g.size for g in m.layer_graphs),
            "head_graph": m.head_graph.size,
            "dense_graphs": m.dense_bytes(),
            "expert_store": m.expert_store.size,
            "experts": m.expert_bytes(),
            "per_expert": {tid: t.block_bytes for tid, t in m.templates.items()},
            # what one paged-in expert holds in memory, measured (`expert_kernel` says how)
            "expert_session": plan.expert_session_bytes,
        },
        "context_length": plan.context_length,
        "minimum_budget": plan.minimum_budget,
        "minimum_budget_parts": {
            "dense": plan.dense_bytes,
            "kv_cache": plan.kv_bytes,
            "activations": plan.activation_bytes,
            "staging": plan.staging_bytes,
            "experts": experts_part,
            "margin": margin,
        },
        # the budget at which every expert stays resident and nothing is ever paged
        "all_experts_budget": plan.fixed_bytes + total_experts * plan.expert_session_bytes,
    }
    if budget is not None:
        capacity = plan.expert_capacity(budget)  # BudgetError if below the minimum
        info["memory_budget"] = budget
        info["expert_cache_capacity"] = capacity
        info["experts_that_fit"] = min(total_experts, capacity // plan.expert_session_bytes)
    return info


def print_inspection(info: dict[str, Any]) -> None:
    b, q, parts = info["bytes"], info["quantization"], info["minimum_budget_parts"]
    per_expert = ", ".join(f"{format_bytes(n)} ({tid})" for tid, n in b["per_expert"].items())
    rows = [
        ("package", f"{info['package']} ({format_bytes(b['package'])})"),
        ("architecture", f"{info['architecture']} ({info['model_type']}), "
                         f"format {info['format_version']}, {info['created_by']}"),
        ("layers", f"{info['layers']} (hidden {info['hidden_size']}, "
                   f"{info['attention_heads']} heads / {info['kv_heads']} KV heads "
                   f"of {info['head_dim']}"
                   + (f", KV cache of latents of {info['latent_cache_dim']}"
                      if info["latent_cache_dim"] else "")
                   + f", vocab {info['vocab_size']})"),
        ("experts", f"{info['experts']} per layer, top-{info['top_k']} "
                    f"({info['router']['scoring']}"
                    f"{', renormalised' if info['router']['normalize_top_k'] else ''}), "
                    f"intermediate {info['intermediate_size']}"),
        ("quantization", f"experts int{q['expert_bits']}, dense int{q['dense_bits']}, "
                         f"block {q['block_size']}, accuracy level {q['accuracy_level']}"),
        ("dense graphs", f"{format_bytes(b['dense_graphs'])} (embed "
                         f"{format_bytes(b['embed_graph'])}, layers "
                         f"{format_bytes(b['layer_graphs'])}, head {format_bytes(b['head_graph'])})"),
        ("expert store", f"{format_bytes(b['expert_store'])} ({info['experts_total']} experts)"),
        ("per expert", f"{per_expert} on disk, {format_bytes(b['expert_session'])} in memory "
                       f"({info['expert_kernel']} kernel)"),
    ]
    print_rows(rows, title="model")
    console().print()
    budget_rows = [
        ("minimum budget", f"{format_bytes(info['minimum_budget'])} "
                           f"({info['minimum_budget']} bytes, context {info['context_length']})"),
        ("  dense part", format_bytes(parts["dense"])),
        ("  KV cache", format_bytes(parts["kv_cache"])),
        ("  activations", format_bytes(parts["activations"])),
        ("  staging", format_bytes(parts["staging"])),
        (f"  {info['top_k']} experts", format_bytes(parts["experts"])),
        ("  margin", format_bytes(parts["margin"])),
        ("no paging at", f"{format_bytes(info['all_experts_budget'])} (all experts resident)"),
    ]
    if "memory_budget" in info:
        budget_rows.append(("with your budget",
                            f"{format_bytes(info['memory_budget'])}: expert cache "
                            f"{format_bytes(info['expert_cache_capacity'])}, "
                            f"{info['experts_that_fit']} of {info['experts_total']} experts"))
    print_rows(budget_rows, title="memory (measured, no budget)")
