"""The package manifest: what a mobilemoe package contains, versioned and validated on load.

The runtime never trusts a package: every field is type-checked, every path must stay inside
the package folder, and file sizes are checked before anything is read. docs/FORMAT.md
describes each field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mobilemoe.errors import PackageError

ROUTER_SCORINGS = ("softmax", "sigmoid", "sparsemixer")
GROUP_SCORES = ("max", "top2_sum")
TENSOR_DTYPES = {"uint8": 1, "int8": 1, "float16": 2, "float32": 4}  # name -> itemsize
FORMAT_NAME = "mobilemoe"
FORMAT_VERSION = 2  # 2: attention over an in-place KV cache (GroupQueryAttention)
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    hidden_size: int
    intermediate_size: int  # of one expert
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    rms_norm_eps: float
    max_position_embeddings: int
    value_head_dim: int = 0  # of v (DeepSeek's differs from q/k's); 0 = head_dim
    # DeepSeek's MLA caching its latent (kv_lora_rank + qk_rope_head_dim wide) instead of
    # per-head keys and values; 0 = keys and values per kv head (export/mla.py)
    latent_cache_dim: int = 0

    def __post_init__(self) -> None:
        if not self.value_head_dim:
            object.__setattr__(self, "value_head_dim", self.head_dim)

    @property
    def cache_kv_heads(self) -> int:
        """Heads of the KV cache: MLA's latent is one head shared by every query head."""
        return 1 if self.latent_cache_dim else self.num_kv_heads

    @property
    def cache_head_dim(self) -> int:
        if self.latent_cache_dim:
            return cache_head_dim(self.latent_cache_dim, self.latent_cache_dim)
        return cache_head_dim(self.head_dim, self.value_head_dim)

    @property
    def cache_values_are_keys(self) -> bool:
        """MLA's latent serves as both keys and values: the cache holds it once."""
        return bool(self.latent_cache_dim)

    @property
    def cache_floats_per_token(self) -> int:
        """One layer's KV cache entries for one token."""
        per_head = self.cache_head_dim * (1 if self.cache_values_are_keys else 2)
        return self.cache_kv_heads * per_head


def cache_head_dim(head_dim: int, value_head_dim: int) -> int:
    """One head's width in the KV cache, keys and values alike: the fused attention
    (GroupQueryAttention) wants one width, a multiple of 8; the layer graph zero-pads q, k and v
    to it (DeepSeek's MLA has narrower values; tiny test models odd widths)."""
    return -(-max(head_dim, value_head_dim) // 8) * 8


@dataclass(frozen=True)
class Routing:
    """How router logits [T, E] become k experts per token and their weights."""

    scoring: str  # "softmax" | "sigmoid" | "sparsemixer" (see mobilemoe/routing.py)
    top_k: int
    normalize_top_k: bool  # renormalise the chosen weights to sum to 1
    top_k_before_softmax: bool = False  # softmax over the k chosen logits only
    scaling: float = 1.0  # multiplies the weights (DeepSeek's routed_scaling_factor)
    n_group: int = 1  # group-limited top-k: experts in n_group groups,
    topk_group: int = 1  # only the best topk_group groups are eligible
    group_score: str = "max"  # "max" | "top2_sum": how a group is ranked
    sparsemixer_eps: float = 0.0  # Phi-MoE's sparsemixer threshold


@dataclass(frozen=True)
class LayerInfo:
    moe: bool = True  # False: a dense MLP layer (no router, no experts)
    sliding_window: int = 0  # attend to at most this many positions (own included); 0 = all


@dataclass(frozen=True)
class Rope:
    inv_freq: list[float]  # [head_dim / 2], computed at export by the architecture's rope rule
    attention_scaling: float = 1.0


# 64 weights per float32 scale: 4.5 bits per int4 weight and 8.5 per int8 weight, exactly
# llama.cpp's Q4_0 and Q8_0. Perplexity and KL as block 32 (docs/QUALITY.md), and ~12% faster
# per token: ONNX Runtime's prepacked int4 layout keeps a scale and a block sum per block.
DEFAULT_BLOCK_SIZE = 64


@dataclass(frozen=True)
class Quantization:
    expert_bits: int
    dense_bits: int
    block_size: int
    accuracy_level: int  # MatMulNBits: 4 = int8 activations (fast), 0/1 = float32 compute


@dataclass(frozen=True)
class FileRef:
    path: str  # relative to the package folder
    size: int
    sha256: str | None = None  # None for the expert store: experts carry their own crc32


@dataclass(frozen=True)
class TensorSlot:
    """Where one initializer of an expert template lies inside an expert's byte block."""

    name: str
    dtype: str  # numpy dtype name
    shape: list[int]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ExpertTemplate:
    graph: FileRef
    bits: int
    block_bytes: int
    tensors: list[TensorSlot]


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    template: str
    offset: int  # into the expert store, aligned to `store_alignment`
    length: int
    crc32: int


@dataclass
class Manifest:
    model_type: str
    hf_architecture: str
    dims: ModelDims
    routing: Routing
    rope: Rope
    quantization: Quantization
    embed_graph: FileRef
    layer_graphs: list[FileRef]
    head_graph: FileRef
    templates: dict[str, ExpertTemplate]
    expert_store: FileRef
    store_alignment: int
    experts: list[ExpertEntry]
    layers: list[LayerInfo] = field(default_factory=list)  # empty: all MoE, full attention
    moe_output_scale: float = 1.0  # routed experts' sum is scaled by this (Granite)
    tokenizer_file: str | None = None
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    # -- writing ---------------------------------------------------------------------------

    def to_json(self) -> str:
        data = {"format": FORMAT_NAME, **asdict(self)}
        return json.dumps(data, indent=1)

    # -- reading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, package: Path) -> Manifest:
        path = package / MANIFEST_FILE
        if not package.is_dir():
            raise PackageError(f"{package}: not a folder (a mobilemoe package is a folder)")
        if not path.is_file():
            raise PackageError(
                f"{package}: no {MANIFEST_FILE}; not a mobilemoe package "
                "(create one with `mobilemoe export CHECKPOINT -o OUT`)"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackageError(f"{path}: manifest is not valid JSON ({e})") from None
        manifest = _parse(data)
        _check_files(package, manifest)
        return manifest

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers with routed experts (DeepSeek's first layers and Qwen2-MoE's
        mlp_only_layers are dense)."""
        return [i for i in range(self.dims.num_layers) if not self.layers or self.layers[i].moe]

    @property
    def experts_total(self) -> int:
        return len(self.moe_layers) * self.dims.num_experts

    def expert_bytes(self) -> int:
        return sum(e.length for e in self.experts)

    def dense_bytes(self) -> int:
        return sum(g.size for g in [self.embed_graph, *self.layer_graphs, self.head_graph])


# -- validation -----------------------------------------------------------------------------


def _get(data: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise PackageError(f"manifest: missing field {where}{key}")
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise PackageError(f"manifest: field {where}{key} has the wrong type")
    return value


_KINDS: dict[str, Any] = {
    "int": int, "float": float, "str": str, "bool": bool,
    "list[float]": list, "list[int]": list, "str | None": (str, type(None)),
}


def _fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """Read a flat dataclass's fields from `data`, checking each against its annotation."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING and (not isinstance(data, dict) or f.name not in data):
            out[f.name] = f.default
            continue
        out[f.name] = _get(data, f.name, _KINDS[str(f.type)], where)
    return out


def _file_ref(data: Any, where: str) -> FileRef:
    return FileRef(**_fields(FileRef, data, where))


def _parse(data: Any) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise PackageError("manifest: not a mobilemoe manifest (field format != 'mobilemoe')")
    version = _get(data, "format_version", int, "")
    if version != FORMAT_VERSION:
        newer = version > FORMAT_VERSION
        raise PackageError(
            f"package format {version}, this runtime reads {FORMAT_VERSION}: "
            + ("upgrade mobilemoe (pip install -U mobilemoe)" if newer else
               "re-export it with `mobilemoe export CHECKPOINT -o OUT`")
        )
    dims = ModelDims(**_fields(ModelDims, _get(data, "dims", dict, ""), "dims."))
    templates = {}
    for tid, t in _get(data, "templates", dict, "").items():
        where = f"templates.{tid}."
        slots = [TensorSlot(**_slot(s, where)) for s in _get(t, "tensors", list, where)]
        templates[tid] = ExpertTemplate(
            graph=_file_ref(_get(t, "graph", dict, where), where + "graph."),
            bits=_get(t, "bits", int, where),
            block_bytes=_get(t, "block_bytes", int, where),
            tensors=slots,
        )
    experts = [ExpertEntry(**_fields(ExpertEntry, e, "experts[].")) for e in
               _get(data, "experts", list, "")]
    manifest = Manifest(
        model_type=_get(data, "model_type", str, ""),
        hf_architecture=_get(data, "hf_architecture", str, ""),
        dims=dims,
        routing=Routing(**_fields(Routing, _get(data, "routing", dict, ""), "routing.")),
        rope=_rope(_get(data, "rope", dict, "")),
        quantization=Quantization(
            **_fields(Quantization, _get(data, "quantization", dict, ""), "quantization.")
        ),
        embed_graph=_file_ref(_get(data, "embed_graph", dict, ""), "embed_graph."),
        layer_graphs=[_file_ref(g, "layer_graphs[].") for g in
                      _get(data, "layer_graphs", list, "")],
        head_graph=_file_ref(_get(data, "head_graph", dict, ""), "head_graph."),
        templates=templates,
        expert_store=_file_ref(_get(data, "expert_store", dict, ""), "expert_store."),
        store_alignment=_get(data, "store_alignment", int, ""),
        experts=experts,
        layers=[LayerInfo(**_fields(LayerInfo, x, "layers[].")) for x in
                _optional(data, "layers", list) or []],
        moe_output_scale=_get(data, "moe_output_scale", float, "") if "moe_output_scale" in data
        else 1.0,
        tokenizer_file=_optional(data, "tokenizer_file", str),
        chat_template=_optional(data, "chat_template", str),
        bos_token_id=_optional(data, "bos_token_id", int),
        eos_token_ids=_int_list(_optional(data, "eos_token_ids", list) or [], "eos_token_ids"),
        generation=_optional(data, "generation", dict) or {},
        created_by=_optional(data, "created_by", str) or "",
        format_version=version,
    )
    _check_consistency(manifest)
    return manifest


def _rope(data: dict) -> Rope:
    fields = _fields(Rope, data, "rope.")
    values = fields["inv_freq"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise PackageError("manifest: rope.inv_freq must be a list of numbers")
    return Rope(inv_freq=[float(v) for v in values], attention_scaling=fields["attention_scaling"])


def _optional(data: dict, key: str, kind: type) -> Any:
    return None if data.get(key) is None else _get(data, key, kind, "")


def _int_list(values: list, where: str) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise PackageError(f"manifest: field {where} must be a list of integers")
    return values


def _slot(s: Any, where: str) -> dict[str, Any]:
    return {
        "name": _get(s, "name", str, where + "tensors[]."),
        "dtype": _get(s, "dtype", str, where + "tensors[]."),
        "shape": _get(s, "shape", list, where + "tensors[]."),
        "offset": _get(s, "offset", int, where + "tensors[]."),
        "nbytes": _get(s, "nbytes", int, where + "tensors[]."),
    }


def _check_consistency(m: Manifest) -> None:
    d = m.dims
    if len(m.layer_graphs) != d.num_layers:
        raise PackageError(f"manifest: {len(m.layer_graphs)} layer graphs for {d.num_layers} layers")
    if not 0 < m.routing.top_k <= d.num_experts:
        raise PackageError("manifest: routing.top_k must be between 1 and num_experts")
    if not 0 < len(m.rope.inv_freq) * 2 <= d.head_dim:
        raise PackageError("manifest: rope.inv_freq must have at most head_dim / 2 entries")
    if m.layers and len(m.layers) != d.num_layers:
        raise PackageError(f"manifest: {len(m.layers)} layer entries for {d.num_layers} layers")
    if m.routing.group_score not in GROUP_SCORES or m.routing.n_group < 1 or not (
            1 <= m.routing.topk_group <= m.routing.n_group) or d.num_experts % m.routing.n_group:
        raise PackageError("manifest: bad group routing settings")
    if m.store_alignment <= 0:
        raise PackageError("manifest: store_alignment must be positive")
    moe_layers = set(m.moe_layers)
    seen = set()
    for e in m.experts:
        key = (e.layer, e.expert)
        if key in seen or e.layer not in moe_layers or not 0 <= e.expert < d.num_experts:
            raise PackageError(f"manifest: bad or duplicate expert entry {key}")
        seen.add(key)
        template = m.templates.get(e.template)
        if template is None:
            raise PackageError(f"manifest: expert {key} names unknown template {e.template!r}")
        if e.length != template.block_bytes or e.offset % m.store_alignment or e.offset < 0:
            raise PackageError(f"manifest: expert {key} has a bad offset or length")
        if e.offset + e.length > m.expert_store.size:
            raise PackageError(f"manifest: expert {key} lies past the end of the expert store")
    if len(seen) != len(moe_layers) * d.num_experts:
        raise PackageError(
            f"manifest: {len(seen)} expert entries for {len(moe_layers)} MoE layers x "
            f"{d.num_experts} experts"
        )
    if m.routing.scoring not in ROUTER_SCORINGS:
        raise PackageError(f"manifest: routing.scoring {m.routing.scoring!r} is not one of "
                           f"{', '.join(ROUTER_SCORINGS)}")
    for tid, t in m.templates.items():
        for s in t.tensors:
            if s.dtype not in TENSOR_DTYPES:
                raise PackageError(f"manifest: template {tid} tensor {s.name} has dtype "
                                   f"{s.dtype!r}; expected one of {', '.join(TENSOR_DTYPES)}")
            shape_ok = all(isinstance(n, int) and n > 0 for n in s.shape)
            if not shape_ok or math.prod(s.shape) * TENSOR_DTYPES[s.dtype] != s.nbytes:
                raise PackageError(f"manifest: template {tid} tensor {s.name}: shape {s.shape} "
                                   f"does not make {s.nbytes} bytes of {s.dtype}")
            if s.offset < 0 or s.offset + s.nbytes > t.block_bytes:
                raise PackageError(f"manifest: template {tid} tensor {s.name} lies outside its block")


def resolve_inside(package: Path, relative: str) -> Path:
    """`package / relative`, refusing anything that escapes the package folder."""
    if os.path.isabs(relative):
        raise PackageError(f"manifest: path {relative!r} is absolute; package paths are relative")
    root = package.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise PackageError(f"manifest: path {relative!r} escapes the package folder")
    return path


def _check_files(package: Path, m: Manifest) -> None:
    refs = [m.embed_graph, *m.layer_graphs, m.head_graph, m.expert_store]
    refs += [t.graph for t in m.templates.values()]
    for ref in refs:
        path = resolve_inside(package, ref.path)
        if not path.is_file():
            raise PackageError(f"{package}: missing file {ref.path} (re-export the package)")
        size = path.stat().st_size
        if size != ref.size:
            raise PackageError(
                f"{package}: {ref.path} is {size} bytes, the manifest says {ref.size} "
                "(truncated or replaced; re-export the package)"
            )
    if m.tokenizer_file is not None:
        path = resolve_inside(package, m.tokenizer_file)
        if not path.is_file():
            raise PackageError(f"{package}: missing file {m.tokenizer_file}")
