"""Tiny real checkpoints for the tests, written with transformers' `save_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from mobilemoe.export.quantize import (
    dequantize_blockwise,
    dequantize_rows,
    quantize_blockwise,
    quantize_rows_int8,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "In the beginning was the word, and the word was with the experts.",
    "Mixture of experts models route every token to a few experts.",
] * 20

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
    }))


def mixtral_config(**overrides) -> MixtralConfig:
    # Dimensions deliberately not multiples of the block size (32).
    settings = dict(vocab_size=320, hidden_size=72, intermediate_size=88, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=1,
                    eos_token_id=2, rope_theta=10000.0)
    settings.update(overrides)
    return MixtralConfig(**settings)


def build_mixtral(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                  max_shard_size: str | None = None, fused: bool = False, train_steps: int = 0,
                  **overrides) -> MixtralForCausalLM:
    """Random Mixtral saved to `folder` as the hub does (or fused, as transformers 5 can).

    train_steps > 0 first fits it briefly to CORPUS: a random model's top logits are often
    within quantization noise of each other, a trained one's are not, which is what a
    token-for-token comparison of greedy generations needs.
    """
    torch.manual_seed(seed)
    model = MixtralForCausalLM(mixtral_config(**overrides)).eval()
    # Larger-than-default weights so routing and logits are far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, model.config.vocab_size)
    if train_steps:
        _fit(model, Tokenizer.from_file(str(folder / "tokenizer.json")), train_steps)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(folder, save_original_format=not fused, **kwargs)
    return model.float()


def _fit(model: MixtralForCausalLM, tokenizer: Tokenizer, steps: int) -> None:
    text = " ".join(CORPUS[:4])
    ids = torch.tensor([[1] + tokenizer.encode(text).ids])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def load_reference(folder: Path) -> MixtralForCausalLM:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def dequantized_reference(folder: Path, bits: int, dense_bits: int,
                          block_size: int = 32) -> MixtralForCausalLM:
    """The float32 model with each weight replaced by what the package stores for it."""
    model = load_reference(folder)

    def requant(w: torch.Tensor, b: int) -> torch.Tensor:
        q = quantize_blockwise(w.detach().float().numpy(), b, block_size)
        return torch.from_numpy(dequantize_blockwise(q))

    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.from_numpy(dequantize_rows(quantize_rows_int8(emb.numpy()))))
        model.lm_head.weight.copy_(requant(model.lm_head.weight, dense_bits))
        for layer in model.model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = getattr(layer.self_attn, proj).weight
                w.copy_(requant(w, dense_bits))
            experts = layer.mlp.experts
            for e in range(experts.gate_up_proj.shape[0]):
                experts.gate_up_proj[e] = requant(experts.gate_up_proj[e], bits)
                experts.down_proj[e] = requant(experts.down_proj[e], bits)
    return model


def reference_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
