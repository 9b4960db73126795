"""Checkpoint -> mobilemoe package, one tensor at a time.

The package is written into a hidden temporary folder next to the output and renamed into
place only when complete, so an interrupted export never leaves anything that loads, and an
existing package is replaced only by a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx

from mobilemoe import __version__
from mobilemoe.errors import ExportError
from mobilemoe.manifest import (
    MANIFEST_FILE,
    ExpertTemplate,
    FileRef,
    Manifest,
    Quantization,
    Rope,
    Routing,
)

from . import graphs
from .architectures import Role, find_spec
from .architectures.base import LAYER_ROLES
from .assets import chat_template, copy_tokenizer, generation_settings
from .checkpoint import Checkpoint
from .layout import CheckpointLayout, model_dims, rope_inv_freq
from .quantize import quantize_blockwise, quantize_rows_int8
from .source import resolve_checkpoint
from .store_writer import STORE_ALIGNMENT, ExpertStoreWriter, block_slots

EXPERT_STORE = "experts.bin"


def export_model(src: str | Path, out: str | Path, bits: int = 4, dense_bits: int = 8,
                 block_size: int = 32, accuracy_level: int = 4, revision: str | None = None,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Export a Hugging Face MoE checkpoint (folder or hub id) to a mobilemoe package.

    bits: expert weights (4 or 8); dense_bits: attention and LM head (8 or 4); block_size:
    quantization block along the input dimension; accuracy_level: MatMulNBits compute
    (4 = int8 activations, fastest; 1 = float32). Returns the package folder.
    """
    for name, value in (("bits", bits), ("dense_bits", dense_bits)):
        if value not in (4, 8):
            raise ExportError(f"{name} must be 4 or 8, got {value}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"block size must be a power of two >= 16, got {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ExportError(f"accuracy level must be 0-4, got {accuracy_level}")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (choose another -o, or pass --overwrite)")
    folder = resolve_checkpoint(src, revision)
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    spec = find_spec(config)
    dims = model_dims(spec, config)
    layout = CheckpointLayout(spec, config, Checkpoint(folder), dims)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "graphs").mkdir(parents=True)
    try:
        _write_package(tmp, folder, config, spec, layout,
                       Quantization(bits, dense_bits, block_size, accuracy_level), progress)
        if out.exists():  # --overwrite: swap only now that the new package is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _write_package(tmp: Path, folder: Path, config: dict, spec, layout: CheckpointLayout,
                   quant: Quantization, progress: bool) -> None:
    dims = layout.dims
    acc = quant.accuracy_level
    bar = _progress(2 + dims.num_layers * (1 + dims.num_experts), progress)

    def dense(w):
        return quantize_blockwise(w, quant.dense_bits, quant.block_size)

    embed = _save_graph(graphs.embed_graph(quantize_rows_int8(layout.global_tensor(Role.EMBED))),
                        tmp, "embed.onnx")
    bar.update()
    head = _save_graph(graphs.head_graph(layout.global_tensor(Role.FINAL_NORM),
                                         dense(layout.global_tensor(Role.LM_HEAD)),
                                         dims.rms_norm_eps, acc), tmp, "head.onnx")
    bar.update()

    shapes = graphs.expert_tensor_shapes(dims.hidden_size, dims.intermediate_size,
                                         quant.expert_bits, quant.block_size)
    slots, block_bytes = block_slots(shapes)
    template_id = f"swiglu_h{dims.hidden_size}_i{dims.intermediate_size}_q{quant.expert_bits}"
    template_graph = graphs.expert_template_graph(dims.hidden_size, dims.intermediate_size,
                                                  quant.expert_bits, quant.block_size, acc)
    template = ExpertTemplate(graph=_save_graph(template_graph, tmp, f"{template_id}.onnx"),
                              bits=quant.expert_bits, block_bytes=block_bytes, tensors=slots)

    layer_refs = []
    with open(tmp / EXPERT_STORE, "wb") as store_file:
        store = ExpertStoreWriter(store_file)
        for layer in range(dims.num_layers):
            bar.set_postfix_str(f"layer {layer}")
            w = {role: layout.layer_tensor(layer, role) for role in LAYER_ROLES}
            model = graphs.dense_layer_graph(
                layer, dims, w[Role.ATTN_NORM], dense(w[Role.ATTN_Q]), dense(w[Role.ATTN_K]),
                dense(w[Role.ATTN_V]), dense(w[Role.ATTN_O]), w[Role.FFN_NORM], w[Role.ROUTER],
                acc)
            layer_refs.append(_save_graph(model, tmp, f"layer_{layer:03d}.onnx"))
            bar.update()
            for expert in range(dims.num_experts):
                gate_up, down = layout.expert_matrices(layer, expert)
                qgu = quantize_blockwise(gate_up, quant.expert_bits, quant.block_size)
                qd = quantize_blockwise(down, quant.expert_bits, quant.block_size)
                store.append(layer, expert, template_id, slots, block_bytes, {
                    "gate_up.qweight": qgu.qweight, "gate_up.scales": qgu.scales,
                    "down.qweight": qd.qweight, "down.scales": qd.scales,
                })
                bar.update()
        store_size = store_file.tell()
    bar.close()

    inv_freq, attention_scaling = rope_inv_freq(config, dims.head_dim)
    bos, eos_ids, generation = generation_settings(folder, config)
    manifest = Manifest(
        model_type=spec.model_type,
        hf_architecture=(config.get("architectures") or [spec.hf_architectures[0]])[0],
        dims=dims,
        routing=Routing(scoring=spec.router.scoring, top_k=dims.top_k,
                        normalize_top_k=spec.router.normalize_top_k),
        rope=Rope(inv_freq=[float(x) for x in inv_freq], attention_scaling=attention_scaling),
        quantization=quant,
        embed_graph=embed,
        layer_graphs=layer_refs,
        head_graph=head,
        templates={template_id: template},
        expert_store=FileRef(path=EXPERT_STORE, size=store_size),
        store_alignment=STORE_ALIGNMENT,
        experts=store.entries,
        tokenizer_file=copy_tokenizer(folder, tmp),
        chat_template=chat_template(folder),
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        generation=generation,
        created_by=f"mobilemoe {__version__}",
    )
    # The manifest goes last: a folder without one is never mistaken for a package.
    (tmp / MANIFEST_FILE).write_text(manifest.to_json())
