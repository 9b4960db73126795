"""Tiny real checkpoints for the tests, written with transformers' `save_pretrained`."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from mobilemoe.export.architectures import Role, claim_tensors, find_spec
from mobilemoe.export.quantize import (
    dequantize_blockwise,
    dequantize_rows,
    quantize_blockwise,
    quantize_rows_int8,
)
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from mobilemoe.manifest import DEFAULT_BLOCK_SIZE

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
    """Random Mixtral saved to `folder` as the hub does (or fused, as transformers 5 can)."""
    return build_checkpoint(folder, mixtral_config(**overrides), seed=seed, dtype=dtype,
                            max_shard_size=max_shard_size, fused=fused, train_steps=train_steps)


def build_checkpoint(folder: Path, config: PretrainedConfig, seed: int = 0,
                     dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                     fused: bool = False, train_steps: int = 0) -> PreTrainedModel:
    """A random model of `config` saved to `folder` with its tokenizer.

    train_steps > 0 first fits it briefly to CORPUS: a random model's top logits are often
    within quantization noise of each other, a trained one's are not, which is what a
    token-for-token comparison of greedy generations needs.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Larger-than-default weights so routing and logits are far from uniform. Norm weights
    # (1-D, init 1) stay; biases get small random values so that they matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in name or "sinks" in name:
                p.normal_(0, 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: zero at init
                buf.normal_(0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, model.config.vocab_size)
    if train_steps:
        _fit(model, Tokenizer.from_file(str(folder / "tokenizer.json")), train_steps)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(folder, save_original_format=not fused, **kwargs)
    return model.float()


def _fit(model: PreTrainedModel, tokenizer: Tokenizer, steps: int) -> None:
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


def load_reference(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


DENSE_ROLES = {Role.LM_HEAD, Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.DENSE_GATE,
               Role.DENSE_UP, Role.DENSE_DOWN, Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN,
               Role.ATTN_Q_A, Role.ATTN_Q_B, Role.ATTN_KV_A, Role.ATTN_KV_B}
EXPERT_ROLES = {Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN}
FUSED_ROLES = {Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN}


def dequantized_reference(folder: Path, bits: int, dense_bits: int,
                          block_size: int = DEFAULT_BLOCK_SIZE) -> PreTrainedModel:
    """transformers' model with each weight replaced by what the package stores for it.

    Works on the saved checkpoint, by role (the architecture spec's table), so the same code
    serves every architecture: quantized roles are quantized and dequantized with the
    exporter's own (separately tested) quantizer; norms, biases and the router stay exact.
    """
    config = json.loads((folder / "config.json").read_text())
    spec = find_spec(config)
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))

    def requant(w: np.ndarray, b: int) -> np.ndarray:
        return dequantize_blockwise(quantize_blockwise(w.astype(np.float32), b, block_size))

    for ref in claim_tensors(spec, list(tensors)):
        w = tensors[ref.name].astype(np.float32)
        if ref.role is Role.EMBED:
            w = dequantize_rows(quantize_rows_int8(w))
        elif ref.role in DENSE_ROLES:
            w = requant(w, dense_bits)
        elif ref.role in EXPERT_ROLES:
            w = requant(w, bits)
        elif ref.role in FUSED_ROLES:
            # [E, N, K] as the exporter reads it; "interleaved_in_out" stores [E, K, N]
            transposed = spec.fused_layout == "interleaved_in_out"
            w = np.stack([requant(e.T, bits).T if transposed else requant(e, bits) for e in w])
        tensors[ref.name] = np.ascontiguousarray(w, dtype=np.float32)
    out = Path(tempfile.mkdtemp(prefix="dequantized-"))
    for name in ("config.json", "generation_config.json"):
        if (folder / name).exists():
            shutil.copyfile(folder / name, out / name)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    try:
        return load_reference(out)
    finally:
        shutil.rmtree(out)


def reference_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
