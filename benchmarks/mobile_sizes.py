"""Package and mobile-bundle sizes of the real-shape synthetic models (docs/MOBILE.md).

    .venv/bin/python benchmarks/mobile_sizes.py olmoe-1b-7b qwen3-30b-a3b gpt-oss-20b mixtral-8x7b

Writing whole packages of these shapes would take minutes to hours and up to ~25 GB each, so
for each shape a one-layer synthetic package is written and bundled, and the sizes are
extrapolated: every layer has the same graph and the same expert blocks, so
size(L layers) = embed + head + template + L * (layer graph + E * aligned block).
`--check` also bundles a package of several layers and compares it with the extrapolation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from mobilemoe.export.mobile import BUNDLE_ALIGNMENT, export_mobile

from mobilemoe.manifest import Manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, get_shape  # noqa: E402
from synthetic_package import write_synthetic_package  # noqa: E402


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def sizes(folder: Path) -> dict[str, int]:
    """Bytes of each part of a package or bundle: embed, head, one layer graph, templates,
    one expert block as stored (aligned), everything else."""
    m = Manifest.load(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in folder.rglob("*") if p.is_file()}
    graphs = {m.embed_graph.path, m.head_graph.path, *(g.path for g in m.layer_graphs),
              *(t.graph.path for t in m.templates.values()), m.expert_store.path}
    block = max(t.block_bytes for t in m.templates.values())
    return {
        "embed": m.embed_graph.size, "head": m.head_graph.size,
        "layer": m.layer_graphs[0].size,
        "templates": sum(t.graph.size for t in m.templates.values()),
        "block": block, "stored_block": _align(block, m.store_alignment),
        "other": sum(size for path, size in files.items() if path not in graphs),
    }


def extrapolate(s: dict[str, int], layers: int, experts: int) -> int:
    return (s["embed"] + s["head"] + s["templates"] + s["other"]
            + layers * (s["layer"] + experts * s["stored_block"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--check", type=int, metavar="LAYERS",
                        help="also bundle a package of this many layers of the first shape")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as work:
        for name in args.shapes:
            shape = get_shape(name)
            pkg = write_synthetic_package(shape.with_layers(1), Path(work) / f"{name}.mmoe",
                                          progress=False)
            bundle = export_mobile(pkg, Path(work) / f"{name}.bundle", ram="8GB")
            p, b = sizes(pkg), sizes(bundle)
            rows.append({"shape": name, "layers": shape.layers, "experts": shape.experts,
                         "package": extrapolate(p, shape.layers, shape.experts),
                         "bundle": extrapolate(b, shape.layers, shape.experts),
                         "package_parts": p, "bundle_parts": b,
                         "ort_over_onnx": (b["embed"] + b["head"] + b["layer"])
                         / (p["embed"] + p["head"] + p["layer"])})
            print(json.dumps(rows[-1]), flush=True)
            for folder in (pkg, bundle):
                shutil.rmtree(folder)
        if args.check:
            name = args.shapes[0]
            shape = get_shape(name, args.check)
            pkg = write_synthetic_package(shape, Path(work) / "check.mmoe", progress=False)
            bundle = export_mobile(pkg, Path(work) / "check.bundle", ram="8GB")
            actual = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
            predicted = extrapolate(rows[0]["bundle_parts"], args.check, shape.experts)
            print(f"check: {name} x {args.check} layers: bundle {actual} bytes, extrapolated "
                  f"{predicted} ({predicted / actual - 1:+.3%})")
    print("\n| model | layers x experts | package | bundle | of which template placeholders "
          "| 16 KiB alignment padding |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        p, b = r["package_parts"], r["bundle_parts"]
        padding = r["layers"] * r["experts"] * (_align(b["block"], BUNDLE_ALIGNMENT) - b["block"])
        print(f"| {r['shape']} | {r['layers']} x {r['experts']} | {r['package'] / 1e9:.2f} GB "
              f"| {r['bundle'] / 1e9:.2f} GB | {b['templates'] / 1e6:.1f} MB "
              f"| {padding / 1e6:.1f} MB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
