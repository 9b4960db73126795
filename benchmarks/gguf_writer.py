"""Write a GGUF file (llama.cpp) with a real model's shape and random quantized weights.

    .venv-bench/bin/python benchmarks/gguf_writer.py olmoe-1b-7b -o /work/bench-data/olmoe-q4_0.gguf

The llama.cpp counterpart of `synthetic_package.py`: the same shapes (benchmarks/shapes.py)
in the same Mixtral-style layout, which llama.cpp runs as architecture `llama` with expert
tensors (`blk.N.ffn_{gate,up,down}_exps`, router `blk.N.ffn_gate_inp`), so both runtimes do
the same work per token. Comparable bits: experts Q4_0 against mobilemoe's int4 and Q8_0
against int8 (both blocks of 32; Q4_0 keeps an fp16 scale per block, 4.5 bits per weight,
mobilemoe a float32 one, 5 bits), attention, embedding and output Q8_0 against int8 dense,
norms and router float32 in both.

Streamed: tensor infos first, then one tensor at a time (the largest, one layer's fused
experts, is ~265 MB for the Mixtral shape). Random blocks are valid: an fp16 scale that keeps
each layer's output at its input's scale, then random codes. The vocabulary is a synthetic
SentencePiece-style list (control tokens, 256 byte tokens, fillers): benchmarks feed token ids.
Needs the `gguf` package (in `.venv-bench`, see `make bench-env`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, Shape, get_shape  # noqa: E402

QTYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}
# standard deviation of the integer codes each block scale multiplies
CODE_STD = {"q4_0": (255 / 12) ** 0.5, "q8_0": (65535 / 12) ** 0.5}


def random_blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> np.ndarray:
    """uint8 [rows, cols / 32 * block bytes]: `rows` rows of `cols` weights, quantized."""
    block, size = gguf.GGML_QUANT_SIZES[QTYPES[qtype]]
    n = rows * cols // block
    data = np.frombuffer(rng.bytes(n * size), dtype=np.uint8).reshape(n, size).copy()
    scale = 1.0 / (np.sqrt(cols) * CODE_STD[qtype])  # weight std ~ 1/sqrt(K)
    data[:, :2] = np.full(n, scale, dtype=np.float16).view(np.uint8).reshape(n, 2)
    return data.reshape(rows, cols // block * size)


def _tensors(shape: Shape, expert_type: str, dense_type: str):
    """(name, kind, dims): dims in numpy order [rows, cols], cols along the dot product."""
    h, i, e = shape.hidden, shape.intermediate, shape.experts
    q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    yield "token_embd.weight", dense_type, (shape.vocab, h)
    for b in range(shape.layers):
        p = f"blk.{b}"
        yield f"{p}.attn_norm.weight", "f32", (h,)
        yield f"{p}.attn_q.weight", dense_type, (q_out, h)
        yield f"{p}.attn_k.weight", dense_type, (kv_out, h)
        yield f"{p}.attn_v.weight", dense_type, (kv_out, h)
        yield f"{p}.attn_output.weight", dense_type, (h, q_out)
        yield f"{p}.ffn_norm.weight", "f32", (h,)
        yield f"{p}.ffn_gate_inp.weight", "router", (e, h)
        yield f"{p}.ffn_gate_exps.weight", expert_type, (e, i, h)
        yield f"{p}.ffn_up_exps.weight", expert_type, (e, i, h)
        yield f"{p}.ffn_down_exps.weight", expert_type, (e, h, i)
    yield "output_norm.weight", "f32", (h,)
    yield "output.weight", dense_type, (shape.vocab, h)


def _info(kind: str, dims: tuple[int, ...]) -> tuple[tuple[int, ...], np.dtype, int, object]:
    """Byte shape, dtype, byte count and GGML type of a tensor, as GGUFWriter wants them."""
    if kind in ("f32", "router"):
        return dims, np.dtype(np.float32), int(np.prod(dims)) * 4, None
    byte_shape = gguf.quant_shape_to_byte_shape(dims, QTYPES[kind])
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), QTYPES[kind]


def _data(rng: np.random.Generator, kind: str, dims: tuple[int, ...]) -> np.ndarray:
    if kind == "f32":
        return np.ones(dims, dtype=np.float32)
    if kind == "router":  # logits of std ~1 on normed input, as in synthetic_package.py
        return (rng.standard_normal(dims) / np.sqrt(dims[-1])).astype(np.float32)
    rows = int(np.prod(dims[:-1]))
    blocks = random_blocks(rng, kind, rows, dims[-1])
    return blocks.reshape(*dims[:-1], blocks.shape[-1])


def _vocabulary(n: int) -> tuple[list[bytes], list[float], list[int]]:
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    if n < len(tokens):
        raise ValueError(f"vocabulary of {n} is too small for the synthetic tokenizer")
    tokens += [f"\u2581t{k}".encode() for k in range(n - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (n - len(types))
    return tokens, [-float(k) for k in range(n)], [int(t) for t in types]


def write_gguf(shape: Shape, out: str | Path, expert_type: str = "q4_0", dense_type: str = "q8_0",
               seed: int = 0, progress: bool = False) -> Path:
    out = Path(out).expanduser()
    tmp = out.with_name(f".{out.name}.partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"synthetic {shape.name} ({expert_type} experts)")
    w.add_context_length(shape.max_position_embeddings)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(shape.rms_norm_eps)
    w.add_expert_count(shape.experts)
    w.add_expert_used_count(shape.top_k)
    w.add_vocab_size(shape.vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if expert_type == "q4_0"
                    else gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens, scores, types = _vocabulary(shape.vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)

    plan = list(_tensors(shape, expert_type, dense_type))
    for name, kind, dims in plan:
        byte_shape, dtype, nbytes, raw = _info(kind, dims)
        w.add_tensor_info(name, byte_shape, dtype, nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for name, kind, dims in plan:
        w.write_tensor_data(_data(rng, kind, dims))
        if progress and name.endswith("ffn_down_exps.weight"):
            print(f"{name.split('.')[1]}/{shape.layers} layers, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    w.close()
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("-o", "--out", required=True, type=Path)
    parser.add_argument("--layers", type=int, help="keep only the first N layers")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8),
                        help="experts: 4 = Q4_0, 8 = Q8_0 (dense parts are always Q8_0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = get_shape(args.shape, args.layers)
    start = time.perf_counter()
    path = write_gguf(shape, args.out, "q4_0" if args.bits == 4 else "q8_0", seed=args.seed,
                      progress=True)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {shape.layers} layers of "
          f"{shape.name}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
