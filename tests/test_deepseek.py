"""DeepSeek specifics the shared runner does not isolate: the routers against transformers'
own router modules, the RoPE reordering behind multi-head latent attention, and V3's
`rope_interleave: false`."""

import json

import numpy as np
import pytest
import torch
from architectures import ARCHITECTURES
from checkpoints import build_checkpoint, dequantized_reference, reference_logits
from mobilemoe.cli.main import app
from mobilemoe.export import export_model
from mobilemoe.export.architectures import find_spec
from mobilemoe.export.exporter import routing_settings
from mobilemoe.export.layout import model_dims
from mobilemoe.export.mla import deinterleave_rope_rows
from mobilemoe.export.mobile import export_mobile
from mobilemoe.export.rope import rope_parameters
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as modeling_v2
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as modeling_v3
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from typer.testing import CliRunner

import mobilemoe
from mobilemoe.bundle import load_bundle
from mobilemoe.errors import ExportError
from mobilemoe.routing import route

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 300, 12, 8, 77, 91, 160, 3]
ROUTER_CONFIGS = {
    "v2 greedy": ("deepseek_v2", DeepseekV2TopkRouter, dict(topk_method="greedy")),
    "v2 group-limited": ("deepseek_v2", DeepseekV2TopkRouter,
                         dict(topk_method="group_limited_greedy", routed_scaling_factor=16.0)),
    "v3": ("deepseek_v3", DeepseekV3TopkRouter, dict(routed_scaling_factor=2.446)),
    "v3 not normalised": ("deepseek_v3", DeepseekV3TopkRouter, dict(norm_topk_prob=False)),
}


def _by_expert(experts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(experts, axis=-1)  # transformers' topk(sorted=False) order is arbitrary
    return np.take_along_axis(experts, order, -1), np.take_along_axis(weights, order, -1)


@pytest.mark.parametrize("case", sorted(ROUTER_CONFIGS))
def test_routing_matches_transformers_router(case):
    model_type, router_class, overrides = ROUTER_CONFIGS[case]
    config = ARCHITECTURES[model_type].config("tiny", n_routed_experts=32, num_experts_per_tok=6,
                                              n_group=8, topk_group=3, **overrides)
    torch.manual_seed(0)
    router = router_class(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.normal_(0, 0.2)
        logits, weights, experts = router(torch.randn(400, config.hidden_size))
    settings = config.to_dict()
    spec = find_spec(settings)
    routing = routing_settings(spec, settings, model_dims(spec, settings))
    selection = None
    if hasattr(router, "e_score_correction_bias"):  # what the layer graph outputs
        selection = (logits.sigmoid() + router.e_score_correction_bias).numpy()
    ours = _by_expert(*route(logits.numpy(), routing, selection))
    theirs = _by_expert(experts.numpy(), weights.numpy())
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6, atol=0)


def test_group_limited_routing_that_cannot_fill_top_k_is_refused():
    settings = ARCHITECTURES["deepseek_v3"].config("tiny", n_group=4, topk_group=1).to_dict()
    spec = find_spec(settings)  # 8 experts in 4 groups, 1 group kept: 2 experts < top-3
    with pytest.raises(ExportError, match="group-limited routing"):
        routing_settings(spec, settings, model_dims(spec, settings))


def test_deinterleave_rope_rows_moves_only_each_heads_rope_rows():
    # 2 heads of 6 rows: 2 nope rows, then 4 rope rows (x0, x1, x2, x3) -> (x0, x2, x1, x3)
    assert deinterleave_rope_rows(12, 6, 2, 4).tolist() == [0, 1, 2, 4, 3, 5, 6, 7, 8, 10, 9, 11]


def test_rotate_half_on_reordered_rows_is_deepseeks_interleaved_rope():
    rng = np.random.default_rng(0)
    r = 10
    x, angle = rng.normal(size=(7, r)), rng.normal(size=(7, r // 2))
    # DeepSeek-V2: pairs (x0, x1), (x2, x3) .. as complex numbers times e^(i angle)
    z = (x[:, 0::2] + 1j * x[:, 1::2]) * np.exp(1j * angle)
    deepseek = np.stack([z.real, z.imag], axis=-1).reshape(7, r)
    order = deinterleave_rope_rows(r, r, 0, r)
    y = x[:, order]
    y1, y2 = y[:, : r // 2], y[:, r // 2:]
    cos, sin = np.cos(angle), np.sin(angle)
    ours = np.concatenate([y1 * cos - y2 * sin, y2 * cos + y1 * sin], axis=-1)
    np.testing.assert_allclose(ours, deepseek[:, order], atol=1e-12)


def test_v3_without_rope_interleave_matches_transformers(tmp_path):
    config = ARCHITECTURES["deepseek_v3"].config("tiny", rope_interleave=False)
    build_checkpoint(tmp_path / "ckpt", config, seed=4)
    package = export_model(tmp_path / "ckpt", tmp_path / "pkg", bits=8, dense_bits=8,
                           accuracy_level=1, progress=False)
    expected = reference_logits(dequantized_reference(tmp_path / "ckpt", 8, 8), PROMPT)
    np.testing.assert_allclose(mobilemoe.load(package).logits(PROMPT), expected, rtol=0, atol=5e-5)


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("style", ["transformers 5", "hub"])
def test_rope_and_softmax_scale_match_transformers(name, style):
    """YaRN inv_freq, the cos/sin factor and the softmax scale (x mscale^2), read from a
    config saved by transformers 5 (`rope_parameters`) or as on the hub (`rope_scaling` with
    "type", `rope_theta` beside it)."""
    config = ARCHITECTURES[name].config("real_like")
    settings = config.to_dict()
    if style == "hub":
        params = settings.pop("rope_parameters")
        settings["rope_theta"] = params.pop("rope_theta")
        params.pop("rope_type")
        settings["rope_scaling"] = params
    spec = find_spec(settings)
    dims = model_dims(spec, settings)
    ours = rope_parameters(settings, dims)
    module = {"deepseek_v2": modeling_v2, "deepseek_v3": modeling_v3}[name]
    prefix = "DeepseekV2" if name == "deepseek_v2" else "DeepseekV3"
    rotary = getattr(module, f"{prefix}RotaryEmbedding")(config)
    attention = getattr(module, f"{prefix}Attention")(config, 0)
    np.testing.assert_allclose(ours.inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
    assert ours.attention_scaling == pytest.approx(rotary.attention_scaling, rel=1e-12)
    assert spec.multipliers(settings)["attention"] == pytest.approx(attention.scaling, rel=1e-12)
    assert attention.scaling != pytest.approx(dims.head_dim ** -0.5)  # YaRN's mscale matters
    assert ours.interleaved


@pytest.mark.parametrize("name, mla_cache", [("deepseek_v2", "latent"), ("deepseek_v2", "expanded"),
                                             ("deepseek_v3", "latent")])  # v3: low-rank q
def test_kv_cache_of_latent_attention(tmp_path, name, mla_cache):
    """"latent" caches c_kv and the rope key (kv_lora_rank + qk_rope_head_dim floats per token
    and layer), once, as keys and values alike; "expanded" (the default) every head's key and
    value. Both give transformers' logits, in a prefill and in decode steps."""
    config = ARCHITECTURES[name].config("tiny")
    build_checkpoint(tmp_path / "ckpt", config, seed=5)
    package = export_model(tmp_path / "ckpt", tmp_path / "pkg", bits=8, dense_bits=8,
                           accuracy_level=1, mla_cache=mla_cache, progress=False)
    model = mobilemoe.load(package, context_length=64)
    dims = model.manifest.dims
    if mla_cache == "latent":  # 36 + 10 wide, padded to 48; 6 heads x (key + value) x 24 else
        cache = {"latent": 46, "heads": 1, "width": 48, "floats": 48, "shared": True}
    else:
        cache = {"latent": 0, "heads": 6, "width": 24, "floats": 288, "shared": False}
    assert (dims.latent_cache_dim, dims.cache_kv_heads, dims.cache_head_dim,
            dims.cache_floats_per_token) == (cache["latent"], cache["heads"], cache["width"],
                                             cache["floats"])
    assert model._kv.keys.shape == (dims.num_layers, 1, cache["heads"], 64, cache["width"])
    assert (model._kv.values is model._kv.keys) == cache["shared"]
    assert model.stats.kv_cache_bytes == dims.num_layers * 64 * cache["floats"] * 4
    inspected = CliRunner().invoke(app, ["inspect", str(package), "--json"])
    assert json.loads(inspected.stdout)["latent_cache_dim"] == cache["latent"]
    expected = reference_logits(dequantized_reference(tmp_path / "ckpt", 8, 8), PROMPT)
    np.testing.assert_allclose(model.logits(PROMPT), expected, rtol=0, atol=5e-5)
    written = np.any(model._kv.keys[:, 0, 0], axis=-1)  # [layers, C]: an entry at a position
    assert written[:, :len(PROMPT)].all() and not written[:, len(PROMPT):].any()
    model.logits(PROMPT[:-4])  # then decode the rest one token at a time
    steps = [model._forward([token], "last")[-1] for token in PROMPT[-4:]]
    np.testing.assert_allclose(np.stack(steps), expected[-4:], rtol=0, atol=5e-5)


def test_latent_cache_in_a_mobile_bundle(tmp_path):
    """Phones are where the latent cache matters most: its graphs convert to ORT format and
    the bundle gives the package's logits, bit for bit."""
    build_checkpoint(tmp_path / "ckpt", ARCHITECTURES["deepseek_v2"].config("tiny"), seed=6)
    package = export_model(tmp_path / "ckpt", tmp_path / "pkg", mla_cache="latent",
                           progress=False)
    bundle = export_mobile(package, tmp_path / "pkg.bundle", ram="8GB")
    expected = mobilemoe.load(package).logits(PROMPT)
    phone = load_bundle(bundle)
    assert phone.manifest.dims.latent_cache_dim == 46
    assert np.array_equal(phone.logits(PROMPT), expected)
