"""Logits and greedy generations against transformers on the same checkpoint.

Two references: the float32 model (what quantization costs), and the float32 model loaded
with the very weights the package stores, dequantized (what the runtime computes must match
it to float32 rounding when MatMulNBits computes in float32, accuracy_level=1).
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
from checkpoints import (
    build_mixtral,
    dequantized_reference,
    load_reference,
    mixtral_config,
    reference_logits,
)
from mobilemoe.export import export_model
from transformers.models.phimoe.modeling_phimoe import sparsemixer

import mobilemoe
from mobilemoe.manifest import Routing
from mobilemoe.routing import route, tokens_by_expert

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 300, 12, 8]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "mixtral"
    build_mixtral(folder)
    return folder


@pytest.fixture(scope="module")
def export(checkpoint, tmp_path_factory):
    made = {}

    def get(bits: int, dense_bits: int, accuracy_level: int):
        key = (bits, dense_bits, accuracy_level)
        if key not in made:
            out = tmp_path_factory.mktemp("pkg") / f"q{bits}-d{dense_bits}-a{accuracy_level}"
            made[key] = export_model(checkpoint, out, bits=bits, dense_bits=dense_bits,
                                     accuracy_level=accuracy_level, progress=False)
        return made[key]

    return get


@pytest.mark.parametrize("bits,dense_bits", [(8, 8), (4, 8), (4, 4)])
def test_logits_match_transformers_with_the_same_dequantized_weights(checkpoint, export, bits,
                                                                     dense_bits):
    model = mobilemoe.load(export(bits, dense_bits, 1))
    expected = reference_logits(dequantized_reference(checkpoint, bits, dense_bits), PROMPT)
    np.testing.assert_allclose(model.logits(PROMPT), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("bits,dense_bits,bound", [(8, 8, 0.1), (4, 8, 0.6), (4, 4, 1.2)])
def test_logits_close_to_float32_transformers(checkpoint, export, bits, dense_bits, bound):
    # Bounds measured and recorded in docs/ACCURACY.md (max |logit error|, logits span ~±3).
    model = mobilemoe.load(export(bits, dense_bits, 1))
    expected = reference_logits(load_reference(checkpoint), PROMPT)
    assert np.abs(model.logits(PROMPT) - expected).max() < bound


def test_default_int8_activations_keep_the_top_token(checkpoint, export):
    # accuracy_level=4 quantizes activations to int8 inside MatMulNBits (the fast path).
    model = mobilemoe.load(export(8, 8, 4))
    got = model.logits(PROMPT)
    expected = reference_logits(dequantized_reference(checkpoint, 8, 8), PROMPT)
    agreement = (got.argmax(-1) == expected.argmax(-1)).mean()
    assert agreement >= 0.75, agreement


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained") / "mixtral"
    build_mixtral(folder, seed=1, train_steps=60)
    return folder


@pytest.mark.parametrize("accuracy_level", [4, 1])
def test_greedy_generation_equals_transformers_token_for_token(trained_checkpoint, tmp_path,
                                                               accuracy_level):
    package = export_model(trained_checkpoint, tmp_path / "pkg", bits=8, dense_bits=8,
                           accuracy_level=accuracy_level, progress=False)
    model = mobilemoe.load(package)
    prompt = model.encode("The quick")
    ours = [t.token_id for t in model.generate(prompt, max_new_tokens=24)]
    reference = load_reference(trained_checkpoint)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=None)[0, len(prompt):].tolist()
    assert len(ours) == 24
    assert ours == theirs


def test_incremental_decode_matches_a_full_forward(export):
    model = mobilemoe.load(export(4, 8, 4))
    full = model.logits(PROMPT)
    model.reset()
    steps = [model._prefill_reusing_cache(PROMPT[:4])[-1]]
    steps += [model._forward([t], "last")[-1] for t in PROMPT[4:]]
    np.testing.assert_allclose(np.stack(steps), full[3:], atol=1e-4)


def test_sharded_bfloat16_checkpoint(tmp_path):
    folder = tmp_path / "bf16"
    build_mixtral(folder, seed=3, dtype=torch.bfloat16, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert (folder / "model.safetensors.index.json").exists()
    model = mobilemoe.load(export_model(folder, tmp_path / "pkg", bits=8, accuracy_level=1,
                                        progress=False))
    expected = reference_logits(dequantized_reference(folder, 8, 8), PROMPT)
    np.testing.assert_allclose(model.logits(PROMPT), expected, atol=2e-5)


def test_fused_expert_layout_gives_the_same_package(tmp_path):
    build_mixtral(tmp_path / "legacy", seed=4)
    build_mixtral(tmp_path / "fused", seed=4, fused=True)
    a = mobilemoe.load(export_model(tmp_path / "legacy", tmp_path / "a", progress=False))
    b = mobilemoe.load(export_model(tmp_path / "fused", tmp_path / "b", progress=False))
    assert np.array_equal(a.logits(PROMPT), b.logits(PROMPT))


def test_text_generation_with_the_packaged_tokenizer(export):
    model = mobilemoe.load(export(4, 8, 4))
    pieces = list(model.generate("The quick brown", max_new_tokens=8, temperature=0.8, seed=1))
    again = list(model.generate("The quick brown", max_new_tokens=8, temperature=0.8, seed=1))
    assert pieces == again  # seeded sampling is reproducible
    assert all(isinstance(p.text, str) for p in pieces)
    prompt = model.chat_prompt([{"role": "user", "content": "hi"}])
    assert prompt[0] == model.manifest.bos_token_id
    assert mixtral_config().vocab_size == model.dims.vocab_size


# -- the runtime's own fast paths agree with its general ones ---------------------------------


def test_one_token_grouping_equals_the_general_one():
    rng = np.random.default_rng(0)
    for _ in range(20):
        experts = rng.permutation(16)[:4][None, :]  # [1, k]
        weights = rng.random((1, 4), dtype=np.float32)
        one = tokens_by_expert(experts, weights)
        both = tokens_by_expert(np.repeat(experts, 2, axis=0), np.repeat(weights, 2, axis=0))
        assert list(one) == list(both)  # expert order: the order outputs are summed in
        for expert, (rows, weight) in one.items():
            assert rows.tolist() == [0] and weight.tobytes() == both[expert][1][:1].tobytes()


def test_sparsemixer_on_zero_logits_matches_transformers_without_warnings():
    """Phi-MoE's routing divides by max(|logit|, best): 0 / 0 when the logits are all zero
    (a zero hidden state), x / 0 when the runner-up's best is below a zero logit. NaN and -inf
    compare false in torch and numpy alike, so nothing is masked; numpy must not warn."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 8)).astype(np.float32)
    logits[:4] = 0
    logits[4:8, 0] = 0
    logits[4:8, 1:] = -rng.random((4, 7), dtype=np.float32) - 0.1
    r = Routing(scoring="sparsemixer", top_k=2, normalize_top_k=False, sparsemixer_eps=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experts, weights = route(logits, r)
    theirs_weights, theirs_experts = sparsemixer(torch.from_numpy(logits), 0.01, training=False)
    np.testing.assert_array_equal(experts, theirs_experts.numpy())
    np.testing.assert_allclose(weights, theirs_weights.numpy(), rtol=1e-6)


def test_decoding_after_a_prefill_and_a_reset_is_bit_identical(export):
    """One-token steps run on buffers bound once per layer, prompts on per-run bindings: a
    model that switched between the two (and was reset) decodes exactly as a fresh one."""
    package = export(4, 8, 4)

    def decode(model: mobilemoe.MoEModel) -> list[bytes]:
        model.reset()
        steps = [model._forward(PROMPT, "last")]
        for _ in range(6):
            steps.append(model._forward([int(steps[-1][-1].argmax())], "last"))
        return [s.tobytes() for s in steps]

    with mobilemoe.load(package) as fresh:
        expected = decode(fresh)
    with mobilemoe.load(package) as used:
        used.logits(PROMPT[:5])
        list(used.generate(PROMPT[3:], max_new_tokens=4))
        assert decode(used) == expected


def test_real_head_widths_take_the_fused_rope_and_match(tmp_path):
    """Heads of 32 (R/2 = 16): the fused attention applies RoPE itself (tiny heads of 12 take
    the graph's own RoPE) and takes q, k and v packed. A prompt, a prompt continued after a
    cached part (positions from the cache length) and decode steps must match transformers."""
    folder = tmp_path / "ckpt"
    build_mixtral(folder, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    package = export_model(folder, tmp_path / "pkg", bits=8, dense_bits=8, accuracy_level=1,
                           progress=False)
    with mobilemoe.load(package) as model:
        assert model.dims.head_dim == 32
        layer = onnx.load(package / model.manifest.layer_graphs[0].path)
        attention = next(n for n in layer.graph.node if n.op_type == "GroupQueryAttention")
        assert {a.name: a.i for a in attention.attribute}["do_rotary"] == 1
        # q, k and v go in packed as projected, and the outputs are written where they are
        # computed: no Split, no copies
        assert list(attention.input[1:3]) == ["", ""]
        assert not {"Split", "Identity"} & {n.op_type for n in layer.graph.node}
        logits = model.logits(PROMPT)
        reference = dequantized_reference(folder, 8, 8)
        np.testing.assert_allclose(logits, reference_logits(reference, PROMPT), rtol=0, atol=5e-5)
        model.reset()
        model._forward(PROMPT[:5], "all")
        continued = model._forward(PROMPT[5:], "all")
        np.testing.assert_allclose(continued, logits[5:], rtol=0, atol=5e-5)
        ours = [t.token_id for t in model.generate(PROMPT, max_new_tokens=12)]
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False)
    assert ours == theirs[0, len(PROMPT):].tolist()
