"""A random Mixtral checkpoint in the Hugging Face layout, written with numpy only.

Used by `mobilemoe demo` when no trained demo model is installed, and by benchmarks that need
a real model's shapes without its weights. The folder is a valid `MixtralForCausalLM`
checkpoint (transformers can load it): `config.json`, `model.safetensors` with the hub's
per-expert tensor names, a byte-level BPE `tokenizer.json` trained on a small built-in text,
`tokenizer_config.json` (with a Mixtral-style chat template) and `generation_config.json`.
Same arguments and seed, same bytes.

Needs `safetensors` and `tokenizers`; no torch, no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mobilemoe.errors import ExportError

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [UNK, BOS, EOS]  # trained first, so ids 0, 1, 2 as in Mixtral

# Mixtral-Instruct's template, simplified: [INST] user [/INST] assistant</s>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# Enough varied English (and a little code) for the BPE trainer to fill a few hundred merges.
TRAINING_TEXT = """\
Once upon a time there was a small robot who lived in a library. Every night it read one
book, and every morning it told the cat what the book was about. The cat did not care.
A mixture of experts is a neural network in which a router sends every token to a few
experts out of many. Only the chosen experts run, so the model can be large while each
token costs little. The experts that are not needed can stay on disk until they are asked
for, which is why a phone with little memory can still run a model with many parameters.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! The five boxing wizards jump quickly.
[INST] What is the capital of France? [/INST] The capital of France is Paris.
[INST] Write a short poem about the sea. [/INST] The sea is wide, the sea is deep, it
sings the sailors off to sleep.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

for i in range(10):
    print(i, fibonacci(i))
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 42.
The weather today is sunny with a light breeze from the west, and tomorrow it will rain.
She said that memory is the real limit: bandwidth decides how fast, capacity decides what.
"""


def mixtral_config(*, hidden_size: int, intermediate_size: int, num_layers: int,
                   num_experts: int, top_k: int, num_heads: int, num_kv_heads: int,
                   vocab_size: int, max_position_embeddings: int = 4096) -> dict:
    """config.json as transformers 5 writes it for `MixtralForCausalLM`."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "dtype": "float32",
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "num_attention_heads": num_heads,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "num_local_experts": num_experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _check(hidden_size: int, intermediate_size: int, num_layers: int, num_experts: int,
           top_k: int, num_heads: int, num_kv_heads: int, vocab_size: int) -> None:
    sizes = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                 num_heads=num_heads, num_kv_heads=num_kv_heads)
    for name, value in sizes.items():
        if value <= 0:
            raise ExportError(f"{name} must be positive, got {value}")
    if top_k > num_experts:
        raise ExportError(f"top_k ({top_k}) cannot exceed num_experts ({num_experts})")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ExportError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
    if num_heads % num_kv_heads:
        raise ExportError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    # 256 byte symbols + 3 special tokens come first; the rest are BPE merges.
    if vocab_size < 260:
        raise ExportError(f"vocab_size must be at least 260 for a byte-level tokenizer, got {vocab_size}")


def _weights(rng: np.random.Generator, *, hidden_size: int, intermediate_size: int,
             num_layers: int, num_experts: int, num_heads: int, num_kv_heads: int,
             vocab_size: int, std: float) -> dict[str, np.ndarray]:
    h, i, d = hidden_size, intermediate_size, hidden_size // num_heads

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    tensors = {"model.embed_tokens.weight": normal(vocab_size, h)}
    for layer in range(num_layers):
        p = f"model.layers.{layer}."
        tensors[p + "input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
        tensors[p + "self_attn.q_proj.weight"] = normal(num_heads * d, h)  # [out, in]
        tensors[p + "self_attn.k_proj.weight"] = normal(num_kv_heads * d, h)
        tensors[p + "self_attn.v_proj.weight"] = normal(num_kv_heads * d, h)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, num_heads * d)
        tensors[p + "block_sparse_moe.gate.weight"] = normal(num_experts, h)
        for expert in range(num_experts):
            e = f"{p}block_sparse_moe.experts.{expert}."
            tensors[e + "w1.weight"] = normal(i, h)  # gate
            tensors[e + "w3.weight"] = normal(i, h)  # up
            tensors[e + "w2.weight"] = normal(h, i)  # down
    tensors["model.norm.weight"] = np.ones(h, dtype=np.float32)
    tensors["lm_head.weight"] = normal(vocab_size, h)
    return tensors


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (Mixtral's special tokens, BOS added on encode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def write_random_mixtral(folder: str | Path, *, hidden_size: int = 256,
                         intermediate_size: int = 512, num_layers: int = 4, num_experts: int = 8,
                         top_k: int = 2, num_heads: int = 8, num_kv_heads: int = 4,
                         vocab_size: int = 512, seed: int = 0,
                         max_position_embeddings: int = 4096, std: float = 0.02) -> Path:
    """Write a random Mixtral checkpoint to `folder` (created if needed); returns the folder.

    Weights are normal(0, `std`), norms are ones; deterministic for `seed`. The defaults make
    a ~55 MB float32 model whose export and demo run take seconds.
    """
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ExportError("writing a checkpoint needs safetensors: pip install 'mobilemoe[export]'"
                          ) from None
    dims = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                num_heads=num_heads, num_kv_heads=num_kv_heads, vocab_size=vocab_size)
    _check(**dims)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    tensors = _weights(rng, std=std, **{k: v for k, v in dims.items() if k != "top_k"})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    write_tokenizer(folder, vocab_size)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    # config.json last: a folder interrupted half-way is not mistaken for a checkpoint.
    config = mixtral_config(**dims, max_position_embeddings=max_position_embeddings)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
