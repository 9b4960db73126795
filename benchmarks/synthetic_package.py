"""Write a mobilemoe package with a real model's shape and random quantized weights.

    .venv/bin/python benchmarks/synthetic_package.py olmoe-1b-7b -o /work/bench-data/olmoe.mmoe
    .venv/bin/python benchmarks/synthetic_package.py mixtral-8x7b -o /work/bench-data/mixtral.mmoe
    .venv/bin/python benchmarks/synthetic_package.py qwen3-30b-a3b --layers 4 -o /tmp/q.mmoe

No checkpoint, no float weights: quantized weights are drawn directly (random uint8 codes,
float32 scales chosen so that every linear layer keeps its input's scale), so a package of any
size is written at disk speed. It is streamed: one layer graph or one expert block in memory
at a time, so the Mixtral-8x7B shape (~25 GB at int4) is written on a 24 GB machine. The
graphs and the expert store come from the exporter's own builders (`layer_graph`,
`model_graphs`, `store_writer`; dense weights go through the exporter's `quantize` hook, fed
zero-byte placeholders), so the runtime cannot tell the package from an exported one. It has
no tokenizer and no end-of-sequence token: benchmarks feed token ids and generate exactly as
many tokens as they ask for. Same shape, options and seed: same bytes.

Keep big outputs out of the repository (`/work/bench-data/` or `/tmp`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from mobilemoe.export.architectures import Role
from mobilemoe.export.attention import AttentionOptions
from mobilemoe.export.layer_graph import LayerOptions, layer_graph
from mobilemoe.export.model_graphs import (
    embed_graph,
    expert_template_graph,
    expert_tensor_shapes,
    head_graph,
)
from mobilemoe.export.quantize import QuantizedLinear, QuantizedRows
from mobilemoe.export.store_writer import STORE_ALIGNMENT, ExpertStoreWriter, block_slots

from mobilemoe.manifest import (
    DEFAULT_BLOCK_SIZE,
    MANIFEST_FILE,
    ExpertTemplate,
    FileRef,
    Manifest,
    ModelDims,
    Quantization,
    Rope,
    Routing,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, Shape, get_shape  # noqa: E402

EXPERT_STORE = "experts.bin"


def code_std(bits: int) -> float:
    """Standard deviation of uniformly random `bits`-bit codes around their zero point."""
    levels = 1 << bits
    return ((levels * levels - 1) / 12) ** 0.5


def random_linear(rng: np.random.Generator, out_features: int, in_features: int, bits: int,
                  block_size: int) -> QuantizedLinear:
    """A MatMulNBits weight [N, K] of random codes; scales make the output's scale match
    the input's (weight std ~ 1/sqrt(K)), so activations neither vanish nor explode."""
    k_blocks = -(-in_features // block_size)
    blob = block_size * bits // 8
    codes = np.frombuffer(rng.bytes(out_features * k_blocks * blob), dtype=np.uint8)
    scale = 1.0 / (np.sqrt(in_features) * code_std(bits))
    scales = rng.uniform(0.5 * scale, 1.5 * scale, out_features * k_blocks).astype(np.float32)
    return QuantizedLinear(qweight=codes.reshape(out_features, k_blocks, blob), scales=scales,
                           bits=bits, block_size=block_size, in_features=in_features)


def random_embedding(rng: np.random.Generator, vocab: int, hidden: int) -> QuantizedRows:
    values = np.frombuffer(rng.bytes(vocab * hidden), dtype=np.int8).reshape(vocab, hidden)
    scales = np.full((vocab, 1), 1.0 / code_std(8), dtype=np.float32)  # rows of std ~1
    return QuantizedRows(values=values, scales=scales)


def _save_graph(model, root: Path, name: str) -> FileRef:
    data = model.SerializeToString()
    (root / "graphs" / name).write_bytes(data)
    return FileRef(path=f"graphs/{name}", size=len(data), sha256=hashlib.sha256(data).hexdigest())


def model_dims(shape: Shape) -> ModelDims:
    return ModelDims(
        num_layers=shape.layers, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        vocab_size=shape.vocab, num_heads=shape.heads, num_kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, num_experts=shape.experts, top_k=shape.top_k,
        rms_norm_eps=shape.rms_norm_eps, max_position_embeddings=shape.max_position_embeddings)


def write_synthetic_package(shape: Shape, out: str | Path, bits: int = 4, dense_bits: int = 8,
                            block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = 4, seed: int = 0,
                            overwrite: bool = False, progress: bool = False) -> Path:
    """Write `shape` as a mobilemoe package at `out` (atomically: a hidden folder renamed
    into place when complete, manifest last). Returns the package folder."""
    for name, value in (("bits", bits), ("dense_bits", dense_bits)):
        if value not in (4, 8):
            raise ValueError(f"{name} must be 4 or 8, got {value}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, got {block_size}")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite)")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "graphs").mkdir(parents=True)
    try:
        _write(tmp, shape, Quantization(bits, dense_bits, block_size, accuracy_level), seed,
               progress)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(tmp: Path, shape: Shape, quant: Quantization, seed: int, progress: bool) -> None:
    rng = np.random.default_rng(seed)
    dims = model_dims(shape)
    acc, bs = quant.accuracy_level, quant.block_size
    h, q_out, kv_out = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    ones = np.ones(h, dtype=np.float32)
    start = time.perf_counter()

    def dense(w: np.ndarray) -> QuantizedLinear:
        """The exporter's quantize hook: only the placeholder's shape [N, K] is used."""
        return random_linear(rng, w.shape[0], w.shape[1], quant.dense_bits, bs)

    def placeholder(n: int, k: int) -> np.ndarray:  # a zero-byte view: no float weights
        return np.broadcast_to(np.float32(0), (n, k))

    embed = _save_graph(embed_graph(random_embedding(rng, shape.vocab, h)), tmp, "embed.onnx")
    head = _save_graph(head_graph(ones, None, dense(placeholder(shape.vocab, h)), None,
                                  shape.rms_norm_eps, acc), tmp, "head.onnx")

    tensor_shapes = expert_tensor_shapes(h, shape.intermediate, quant.expert_bits, bs)
    slots, block_bytes = block_slots(tensor_shapes)
    template_id = f"silu_h{h}_i{shape.intermediate}_q{quant.expert_bits}"
    template = ExpertTemplate(
        graph=_save_graph(expert_template_graph(h, shape.intermediate, quant.expert_bits, bs, acc),
                          tmp, f"{template_id}.onnx"),
        bits=quant.expert_bits, block_bytes=block_bytes, tensors=slots)
    attention = AttentionOptions(
        num_heads=shape.heads, num_kv_heads=shape.kv_heads, head_dim=shape.head_dim,
        value_head_dim=shape.head_dim, eps=shape.rms_norm_eps, qk_norm=None,
        scale=shape.head_dim ** -0.5, clip_qkv=None, accuracy_level=acc)

    layer_refs = []
    with open(tmp / EXPERT_STORE, "wb") as store_file:
        store = ExpertStoreWriter(store_file)
        for layer in range(shape.layers):
            # Router rows of std 1/sqrt(H): logits of std ~1 on the normed input, so routing
            # spreads over the experts as an untrained model's would.
            router = (rng.standard_normal((shape.experts, h)) / np.sqrt(h)).astype(np.float32)
            tensors = {Role.ATTN_NORM: ones, Role.FFN_NORM: ones, Role.ROUTER: router,
                       Role.ATTN_Q: placeholder(q_out, h), Role.ATTN_K: placeholder(kv_out, h),
                       Role.ATTN_V: placeholder(kv_out, h), Role.ATTN_O: placeholder(h, q_out)}
            options = LayerOptions(layer=layer, moe=True, attention=attention,
                                   residual_multiplier=1.0, rope_dim=shape.head_dim,
                                   accuracy_level=acc)
            model = layer_graph(dims, tensors, dense, options)
            layer_refs.append(_save_graph(model, tmp, f"layer_{layer:03d}.onnx"))
            del model
            for expert in range(shape.experts):
                gate_up = random_linear(rng, 2 * shape.intermediate, h, quant.expert_bits, bs)
                down = random_linear(rng, h, shape.intermediate, quant.expert_bits, bs)
                store.append(layer, expert, template_id, slots, block_bytes, {
                    "gate_up.qweight": gate_up.qweight, "gate_up.scales": gate_up.scales,
                    "down.qweight": down.qweight, "down.scales": down.scales,
                })
            if progress:
                done = store_file.tell()
                print(f"layer {layer + 1}/{shape.layers}: {done / 1e9:.2f} GB of experts, "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        store_size = store_file.tell()

    inv_freq = 1.0 / shape.rope_theta ** (np.arange(0, shape.head_dim, 2) / shape.head_dim)
    manifest = Manifest(
        model_type="mixtral",
        hf_architecture="MixtralForCausalLM",
        dims=dims,
        routing=Routing(scoring="softmax", top_k=shape.top_k,
                        normalize_top_k=shape.normalize_top_k),
        rope=Rope(inv_freq=[float(x) for x in inv_freq.astype(np.float32)]),
        quantization=quant,
        embed_graph=embed,
        layer_graphs=layer_refs,
        head_graph=head,
        templates={template_id: template},
        expert_store=FileRef(path=EXPERT_STORE, size=store_size),
        store_alignment=STORE_ALIGNMENT,
        experts=store.entries,
        eos_token_ids=[],  # never stop early: a benchmark generates what it asks for
        created_by=f"benchmarks/synthetic_package.py shape={shape.name} seed={seed} "
                   f"(random weights, Mixtral layout with the dims of {shape.source})",
    )
    (tmp / MANIFEST_FILE).write_text(manifest.to_json())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("-o", "--out", required=True, type=Path, help="package folder to write")
    parser.add_argument("--layers", type=int, help="keep only the first N layers")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8), help="expert bits")
    parser.add_argument("--dense-bits", type=int, default=8, choices=(4, 8))
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    shape = get_shape(args.shape, args.layers)
    start = time.perf_counter()
    path = write_synthetic_package(shape, args.out, bits=args.bits, dense_bits=args.dense_bits,
                                   block_size=args.block_size, accuracy_level=args.accuracy_level,
                                   seed=args.seed, overwrite=args.overwrite, progress=True)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"wrote {path} ({size / 1e9:.2f} GB, {shape.layers} layers of {shape.name}) in "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
