"""Checkpoint -> mobilemoe package, one tensor at a time.

The package is written into a hidden temporary folder next to the output and renamed into
place only when complete, so an interrupted export never leaves anything that loads, and an
existing package is replaced only by a finished one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx

from mobilemoe import __version__
from mobilemoe.errors import ExportError
from mobilemoe.manifest import (
    DEFAULT_BLOCK_SIZE,
    MANIFEST_FILE,
    ExpertTemplate,
    FileRef,
    LayerInfo,
    Manifest,
    ModelDims,
    Quantization,
    Rope,
    Routing,
)

from .architectures import ArchitectureSpec, Role, find_spec
from .assets import chat_template, copy_tokenizer, generation_settings
from .atomic import atomic_folder
from .attention import AttentionOptions
from .checkpoint import Checkpoint
from .layer_graph import LayerOptions, layer_graph
from .layout import CheckpointLayout, model_dims
from .model_graphs import (
    GPT_OSS_ALPHA,
    GPT_OSS_LIMIT,
    embed_graph,
    expert_template_graph,
    expert_tensor_shapes,
    head_graph,
)
from .quantize import quantize_blockwise, quantize_rows_int8
from .source import resolve_checkpoint
from .store_writer import STORE_ALIGNMENT, ExpertStoreWriter, block_slots

EXPERT_STORE = "experts.bin"


def export_model(src: str | Path, out: str | Path, bits: int = 4, dense_bits: int = 8,
                 block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = 4,
                 mla_cache: str = "expanded", revision: str | None = None,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Export a Hugging Face MoE checkpoint (folder or hub id) to a mobilemoe package.

    bits: expert weights (4 or 8); dense_bits: attention and LM head (8 or 4); block_size:
    quantization block along the input dimension; accuracy_level: MatMulNBits compute
    (4 = int8 activations, fastest; 1 = float32); mla_cache: what a DeepSeek model's KV cache
    holds, "expanded" (every head's key and value) or "latent" (kv_lora_rank + rope dims a
    token and layer: ~10x less memory, slower attention; export/mla.py). Returns the package
    folder.
    """
    for name, value in (("bits", bits), ("dense_bits", dense_bits)):
        if value not in (4, 8):
            raise ExportError(f"{name} must be 4 or 8, got {value}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"block size must be a power of two >= 16, got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ExportError(f"accuracy level must be 0-4, got {accuracy_level}")
    if mla_cache not in ("latent", "expanded"):
        raise ExportError(f"the MLA cache must be 'latent' or 'expanded', got {mla_cache!r}")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (choose another -o, or pass --overwrite)")
    folder = resolve_checkpoint(src, revision)
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    spec = find_spec(config)
    dims = model_dims(spec, config, mla_latent_cache=mla_cache == "latent")
    layout = CheckpointLayout(spec, config, Checkpoint(folder), dims)

    with atomic_folder(out) as tmp:
        (tmp / "graphs").mkdir()
        _write_package(tmp, folder, config, spec, layout,
                       Quantization(bits, dense_bits, block_size, accuracy_level), progress)
    return out


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; exporting works without it
        enabled = False
    if not enabled:
        class _Silent:
            def update(self, n: int = 1) -> None: ...
            def set_postfix_str(self, s: str) -> None: ...
            def close(self) -> None: ...
        return _Silent()
    return tqdm(total=total, unit="tensor", desc="export", dynamic_ncols=True)


def _save_graph(model: onnx.ModelProto, root: Path, name: str) -> FileRef:
    path = root / "graphs" / name
    data = model.SerializeToString()
    path.write_bytes(data)
    return FileRef(path=f"graphs/{name}", size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _write_package(tmp: Path, folder: Path, config: dict, spec: ArchitectureSpec,
                   layout: CheckpointLayout, quant: Quantization, progress: bool) -> None:
    dims = layout.dims
    routing = routing_settings(spec, config, dims)  # first: it validates the config
    acc = quant.accuracy_level
    mult = layout.multipliers
    moe_layers = [i for i in range(dims.num_layers) if layout.moe_layers[i]]
    bar = _progress(2 + dims.num_layers + len(moe_layers) * dims.num_experts, progress)

    def dense(w):
        return quantize_blockwise(w, quant.dense_bits, quant.block_size)

    table = quantize_rows_int8(layout.global_tensor(Role.EMBED))
    embed = _save_graph(embed_graph(table, mult.get("embedding", 1.0)), tmp, "embed.onnx")
    bar.update()
    head = _save_graph(head_graph(
        layout.global_tensor(Role.FINAL_NORM), layout.global_tensor(Role.FINAL_NORM_BIAS),
        dense(layout.global_tensor(Role.LM_HEAD)), layout.global_tensor(Role.LM_HEAD_BIAS),
        dims.rms_norm_eps, acc, mult.get("logits", 1.0)), tmp, "head.onnx")
    bar.update()

    template_id, template = _expert_template(tmp, spec, layout, quant)
    attention = AttentionOptions(
        num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads, head_dim=dims.head_dim,
        value_head_dim=dims.value_head_dim, eps=dims.rms_norm_eps, qk_norm=spec.qk_norm,
        scale=mult.get("attention", dims.head_dim ** -0.5),
        clip_qkv=config.get("clip_qkv"), accuracy_level=acc,
        rope_interleaved=layout.rope.interleaved, mla_latent_cache=dims.latent_cache_dim > 0)
    layer_refs = []
    with open(tmp / EXPERT_STORE, "wb") as store_file:
        store = ExpertStoreWriter(store_file)
        for layer in range(dims.num_layers):
            bar.set_postfix_str(f"layer {layer}")
            options = LayerOptions(layer=layer, moe=layout.moe_layers[layer], attention=attention,
                                   residual_multiplier=mult.get("residual", 1.0),
                                   rope_dim=2 * len(layout.rope.inv_freq), accuracy_level=acc,
                                   sliding_window=layout.sliding_windows[layer])
            model = layer_graph(dims, layout.layer_tensors(layer), dense, options)
            layer_refs.append(_save_graph(model, tmp, f"layer_{layer:03d}.onnx"))
            bar.update()
            if not options.moe:
                continue
            for expert in range(dims.num_experts):
                store.append(layer, expert, template_id, template.tensors, template.block_bytes,
                             _expert_arrays(layout.expert_matrices(layer, expert), quant))
                bar.update()
        store_size = store_file.tell()
    bar.close()

    bos, eos_ids, generation = generation_settings(folder, config)
    manifest = Manifest(
        model_type=spec.model_type,
        hf_architecture=(config.get("architectures") or [spec.hf_architectures[0]])[0],
        dims=dims,
        routing=routing,
        rope=Rope(inv_freq=[float(x) for x in layout.rope.inv_freq],
                  attention_scaling=layout.rope.attention_scaling),
        quantization=quant,
        embed_graph=embed,
        layer_graphs=layer_refs,
        head_graph=head,
        templates={template_id: template},
        expert_store=FileRef(path=EXPERT_STORE, size=store_size),
        store_alignment=STORE_ALIGNMENT,
        experts=store.entries,
        layers=[LayerInfo(moe=layout.moe_layers[i], sliding_window=layout.sliding_windows[i])
                for i in range(dims.num_layers)],
        moe_output_scale=mult.get("residual", 1.0),
        tokenizer_file=copy_tokenizer(folder, tmp),
        chat_template=chat_template(folder),
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        generation=generation,
        created_by=f"mobilemoe {__version__}",
    )
    # The manifest goes last: a folder without one is never mistaken for a package.
    (tmp / MANIFEST_FILE).write_text(manifest.to_json())


def _expert_template(tmp: Path, spec: ArchitectureSpec, layout: CheckpointLayout,
                     quant: Quantization) -> tuple[str, ExpertTemplate]:
    d, biased = layout.dims, layout.has_expert_bias()
    shapes = expert_tensor_shapes(d.hidden_size, d.intermediate_size, quant.expert_bits,
                                  quant.block_size, biased)
    slots, block_bytes = block_slots(shapes)
    template_id = (f"expert_{spec.activation}{'_bias' if biased else ''}_h{d.hidden_size}"
                   f"_i{d.intermediate_size}_q{quant.expert_bits}")
    limits = (float(layout.config.get("swiglu_alpha", GPT_OSS_ALPHA)),
              float(layout.config.get("swiglu_limit", GPT_OSS_LIMIT)))
    graph = expert_template_graph(d.hidden_size, d.intermediate_size, quant.expert_bits,
                                  quant.block_size, quant.accuracy_level, spec.activation, biased,
                                  limits)
    return template_id, ExpertTemplate(graph=_save_graph(graph, tmp, f"{template_id}.onnx"),
                                       bits=quant.expert_bits, block_bytes=block_bytes,
                                       tensors=slots)


def _expert_arrays(matrices: dict[str, np.ndarray], quant: Quantization) -> dict[str, np.ndarray]:
    gate_up = quantize_blockwise(matrices["gate_up"], quant.expert_bits, quant.block_size)
    down = quantize_blockwise(matrices["down"], quant.expert_bits, quant.block_size)
    arrays = {"gate_up.qweight": gate_up.qweight, "gate_up.scales": gate_up.scales,
              "down.qweight": down.qweight, "down.scales": down.scales}
    if "gate_up_bias" in matrices:
        arrays["gate_up.bias"] = matrices["gate_up_bias"].astype(np.float32)
        arrays["down.bias"] = matrices["down_bias"].astype(np.float32)
    return arrays


def routing_settings(spec: ArchitectureSpec, config: dict, dims: ModelDims) -> Routing:
    r = spec.router
    normalize = r.normalize_top_k
    if r.normalize_field and config.get(r.normalize_field) is not None:
        normalize = bool(config[r.normalize_field])
    grouped = r.grouped(config) if callable(r.grouped) else r.grouped
    n_group = int(config.get("n_group") or 1) if grouped else 1
    topk_group = int(config.get("topk_group") or 1) if grouped else 1
    if n_group > 1:
        size = dims.num_experts // n_group
        # Beyond these limits transformers' result depends on how torch.topk breaks ties
        # among masked-out experts: refuse rather than route differently.
        if dims.num_experts % n_group or dims.top_k > topk_group * size or not \
                (0 < topk_group <= n_group) or (r.group_score == "top2_sum" and size < 2):
            raise ExportError(f"group-limited routing with {dims.num_experts} experts in "
                              f"{n_group} groups, top-{topk_group} groups, top-{dims.top_k} "
                              "experts is not a valid configuration")
    return Routing(
        scoring=r.scoring, top_k=dims.top_k, normalize_top_k=normalize,
        top_k_before_softmax=r.top_k_before_softmax,
        scaling=float(config.get(r.scaling_field) or 1.0) if r.scaling_field else 1.0,
        n_group=n_group,
        topk_group=topk_group,
        group_score=r.group_score,
        sparsemixer_eps=float(config.get(r.sparsemixer_eps_field) or 0.0)
        if r.sparsemixer_eps_field else 0.0,
    )
