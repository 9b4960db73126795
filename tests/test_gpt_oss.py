"""GPT-OSS beyond the shared runner: MXFP4 experts (the released checkpoints' format), the
sliding window, YaRN as gpt-oss-20b configures it, the default layer schedule.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES
from checkpoints import build_checkpoint, dequantized_reference, reference_logits
from mobilemoe.export import export_model
from mobilemoe.export.architectures.gpt_oss import SPEC
from mobilemoe.export.layout import model_dims
from mobilemoe.export.mxfp4 import FP4_E2M1, decode_fp4, dequantize
from mobilemoe.export.rope import rope_parameters
from safetensors.numpy import load_file, save_file
from transformers import GptOssConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import mobilemoe
from mobilemoe.errors import ExportError

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 300, 12, 8, 77, 91, 160, 3]
ENTRY = ARCHITECTURES["gpt_oss"]
# MXFP4 blocks are 32 values along the input: hidden and intermediate sizes must divide
MXFP4_DIMS = dict(hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=96)


# -- FP4 decoding -----------------------------------------------------------------------------


def test_fp4_codes_decode_to_the_e2m1_table_low_nibble_first():
    # e2m1: sign | 2-bit exponent (bias 1) | 1-bit mantissa; exponent 0 is subnormal (x 0.5)
    by_hand = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert FP4_E2M1.tolist() == by_hand
    packed = np.array([[0x21, 0xF8, 0x7C, 0x90]], dtype=np.uint8)
    # 0x21: low 1 -> 0.5, high 2 -> 1.0; 0xF8: low 8 -> -0.0, high F -> -6.0;
    # 0x7C: low C -> -2.0, high 7 -> 6.0; 0x90: low 0 -> 0.0, high 9 -> -0.5
    decoded = decode_fp4(packed)
    assert decoded.tolist() == [[0.5, 1.0, -0.0, -6.0, -2.0, 6.0, 0.0, -0.5]]
    assert np.signbit(decoded[0, 2])  # -0.0 keeps its sign, as transformers' table has it


def test_mxfp4_scales_are_powers_of_two_with_bias_127():
    blocks = np.zeros((2, 1, 16), dtype=np.uint8)
    blocks[:, 0, 0] = 0x53  # element 0: code 3 (1.5), element 1: code 5 (3.0)
    scales = np.array([[127 + 3], [127 - 130 + 3]], dtype=np.uint8)  # 2^3 and 2^-127
    w = dequantize(blocks, scales)
    assert w.shape == (2, 32) and w.dtype == np.float32
    assert w[0, :2].tolist() == [12.0, 24.0] and not w[0, 2:].any()
    assert w[1, :2].tolist() == [1.5 * 2.0 ** -127, 3.0 * 2.0 ** -127]  # float32 subnormals


def test_mxfp4_dequantization_equals_transformers():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3, 10, 4, 16), dtype=np.uint8)  # [E, N, K/32, 16]
    scales = rng.integers(110, 135, size=(3, 10, 4), dtype=np.uint8)
    theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                        dtype=torch.float32).numpy()  # [E, K, N]
    ours = np.stack([dequantize(b, s).T for b, s in zip(blocks, scales, strict=True)])
    assert np.array_equal(ours, theirs)


def test_mxfp4_rejects_nan_scales_and_mismatched_shapes():
    blocks = np.zeros((2, 1, 16), dtype=np.uint8)
    with pytest.raises(ExportError, match="NaN"):
        dequantize(blocks, np.full((2, 1), 255, dtype=np.uint8))
    with pytest.raises(ExportError, match="do not match"):
        dequantize(blocks, np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ExportError, match="uint8"):
        dequantize(blocks.astype(np.int8), np.zeros((2, 1), dtype=np.uint8))


# -- MXFP4 checkpoints --------------------------------------------------------------------------


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> blocks uint8 [N, K/32, 16], scales uint8 [N, K/32] (OCP MX: the shared
    exponent is floor(log2(max|w|)) - 2, e2m1's largest exponent; values round to nearest)."""
    n, k = w.shape
    groups = w.reshape(n, k // 32, 32)
    amax = np.abs(groups).max(axis=-1)
    exponent = np.floor(np.log2(np.maximum(amax, 2.0 ** -120))).astype(np.int32) - 2
    scaled = groups / np.ldexp(np.float32(1), exponent)[..., None]
    codes = np.abs(scaled[..., None] - FP4_E2M1).argmin(axis=-1).astype(np.uint8)  # [N, G, 32]
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).astype(np.uint8)


@pytest.fixture(scope="module")
def mxfp4_checkpoints(tmp_path_factory):
    """The same model twice: experts in MXFP4 as the released checkpoints store them, and
    as float32 weights equal to what transformers' MXFP4 loader decodes from them."""
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    build_checkpoint(root / "float", ENTRY.config("tiny", **MXFP4_DIMS), seed=11)
    tensors = load_file(root / "float" / "model.safetensors")
    shutil.copytree(root / "float", root / "mxfp4", ignore=shutil.ignore_patterns("*.safetensors"))
    packed, decoded = {}, {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        # [E, K, N] (transformers' parameter) -> per expert [N, K] -> MXFP4
        pairs = [quantize_mxfp4(np.ascontiguousarray(w.T)) for w in tensors.pop(name)]
        blocks, scales = (np.stack(x) for x in zip(*pairs, strict=True))
        packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
        decoded[name] = convert_moe_packed_tensors(torch.from_numpy(blocks),
                                                   torch.from_numpy(scales),
                                                   dtype=torch.float32).numpy()
    save_file({**tensors, **packed}, root / "mxfp4" / "model.safetensors",
              metadata={"format": "pt"})
    save_file({**tensors, **decoded}, root / "float" / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((root / "mxfp4" / "config.json").read_text())
    config["quantization_config"] = {  # as openai/gpt-oss-20b's config.json has it
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"]}
    (root / "mxfp4" / "config.json").write_text(json.dumps(config))
    return root


def test_mxfp4_checkpoint_has_the_released_layout(mxfp4_checkpoints):
    tensors = load_file(mxfp4_checkpoints / "mxfp4" / "model.safetensors")
    e, h, i = 4, MXFP4_DIMS["hidden_size"], MXFP4_DIMS["intermediate_size"]
    prefix = "model.layers.0.mlp.experts"
    assert tensors[f"{prefix}.gate_up_proj_blocks"].shape == (e, 2 * i, h // 32, 16)
    assert tensors[f"{prefix}.gate_up_proj_scales"].shape == (e, 2 * i, h // 32)
    assert tensors[f"{prefix}.down_proj_blocks"].shape == (e, h, i // 32, 16)
    assert tensors[f"{prefix}.down_proj_scales"].dtype == np.uint8
    assert f"{prefix}.gate_up_proj" not in tensors and f"{prefix}.gate_up_proj_bias" in tensors


def test_mxfp4_checkpoint_exports_the_model_transformers_decodes(mxfp4_checkpoints, tmp_path):
    def export(which):
        return mobilemoe.load(export_model(mxfp4_checkpoints / which, tmp_path / which, bits=8,
                                           dense_bits=8, accuracy_level=1, progress=False))

    ours = export("mxfp4").logits(PROMPT)
    # the exporter decodes MXFP4 to exactly the floats transformers decodes, then requantizes
    assert np.array_equal(ours, export("float").logits(PROMPT))
    expected = reference_logits(dequantized_reference(mxfp4_checkpoints / "float", 8, 8), PROMPT)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=5e-5)


def test_mxfp4_needs_sizes_that_are_multiples_of_32(mxfp4_checkpoints, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(mxfp4_checkpoints / "mxfp4", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ExportError, match="multiples of 32"):
        export_model(folder, tmp_path / "pkg", progress=False)


# -- sliding window -----------------------------------------------------------------------------


def test_sliding_window_changes_logits_as_transformers_does(tmp_path):
    """Layer 0 sees only the last 4 keys. The same weights with every layer on full attention
    give the same logits for the first 4 positions and different ones after; each variant
    matches transformers."""
    window = tmp_path / "window"
    build_checkpoint(window, ENTRY.config("tiny"), seed=4)
    full = tmp_path / "full"
    shutil.copytree(window, full)
    config = json.loads((full / "config.json").read_text())
    assert config["sliding_window"] == 4 and config["layer_types"][0] == "sliding_attention"
    config["layer_types"] = ["full_attention"] * len(config["layer_types"])
    (full / "config.json").write_text(json.dumps(config))

    logits = {}
    for name, folder in (("window", window), ("full", full)):
        model = mobilemoe.load(export_model(folder, tmp_path / f"{name}.mmoe", bits=8,
                                            dense_bits=8, accuracy_level=1, progress=False))
        assert [layer.sliding_window for layer in model.manifest.layers] == \
            ([4, 0] if name == "window" else [0, 0])
        logits[name] = model.logits(PROMPT)
        expected = reference_logits(dequantized_reference(folder, 8, 8), PROMPT)
        np.testing.assert_allclose(logits[name], expected, rtol=0, atol=5e-5)
    np.testing.assert_allclose(logits["window"][:4], logits["full"][:4], rtol=0, atol=1e-5)
    assert np.abs(logits["window"][4:] - logits["full"][4:]).max(axis=-1).min() > 1e-3


def test_default_layer_schedule_is_transformers_alternation():
    """Configs without `layer_types` get transformers' default: even layers slide."""
    config = GptOssConfig(num_hidden_layers=5, sliding_window=128)
    hub = {"num_hidden_layers": 5, "sliding_window": 128}  # no layer_types
    windows = [SPEC.sliding_window(hub, i) for i in range(5)]
    assert windows == [128 if t == "sliding_attention" else 0 for t in config.layer_types]
    assert windows == [128, 0, 128, 0, 128]


# -- YaRN -------------------------------------------------------------------------------------


def test_yarn_matches_transformers_for_the_gpt_oss_20b_config():
    # as openai/gpt-oss-20b's config.json writes it: legacy `rope_scaling`, top-level theta
    hub = dict(model_type="gpt_oss", hidden_size=2880, head_dim=64, num_attention_heads=64,
               num_key_value_heads=8, num_hidden_layers=24, intermediate_size=2880,
               vocab_size=201088, num_local_experts=32, num_experts_per_tok=4,
               max_position_embeddings=131072, rope_theta=150000,
               rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 4096})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](
        GptOssConfig(**{k: v for k, v in hub.items() if k != "model_type"}))
    ours = rope_parameters(hub, model_dims(SPEC, hub))
    assert ours.attention_scaling == scaling  # 0.1 ln(32) + 1
    # numpy's and torch's float32 pow differ by at most one ulp on a few frequencies
    np.testing.assert_allclose(ours.inv_freq, inv_freq.numpy(), rtol=2e-7, atol=0)
    truncated = rope_parameters({**hub, "rope_scaling": {**hub["rope_scaling"], "truncate": True}},
                                model_dims(SPEC, hub))
    assert np.abs(truncated.inv_freq / inv_freq.numpy() - 1).max() > 1e-3  # truncate matters
