"""Logit error of mobilemoe packages against transformers, for docs/ACCURACY.md.

    .venv/bin/python benchmarks/accuracy.py

Builds two tiny Mixtral checkpoints (random, and briefly trained) with transformers, exports
each at several bit widths and accuracy levels, and prints max/mean |logit error| against
float32 transformers and against transformers loaded with the package's dequantized weights,
plus top-1 agreement with float32.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from checkpoints import build_mixtral, dequantized_reference, load_reference, reference_logits  # noqa: E402
from mobilemoe.export import export_model  # noqa: E402

import mobilemoe  # noqa: E402

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 300, 12, 8, 77, 91, 160, 3, 45, 201, 18, 66]


def main() -> None:
    print("| checkpoint | experts | dense | accuracy level | max err vs fp32 | mean err vs fp32 "
          "| max err vs dequantized | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, steps in (("random", 0), ("trained 60 steps", 60)):
            ckpt = root / name.replace(" ", "_")
            build_mixtral(ckpt, seed=1, train_steps=steps)
            fp32 = reference_logits(load_reference(ckpt), PROMPT)
            for bits, dense_bits in ((8, 8), (4, 8), (4, 4)):
                dq = reference_logits(dequantized_reference(ckpt, bits, dense_bits), PROMPT)
                for acc in (1, 4):
                    out = root / f"{ckpt.name}-{bits}-{dense_bits}-{acc}"
                    export_model(ckpt, out, bits=bits, dense_bits=dense_bits, accuracy_level=acc,
                                 progress=False)
                    got = mobilemoe.load(out).logits(PROMPT)
                    err = np.abs(got - fp32)
                    agree = (got.argmax(-1) == fp32.argmax(-1)).mean()
                    print(f"| {name} | int{bits} | int{dense_bits} | {acc} | {err.max():.4f} | "
                          f"{err.mean():.4f} | {np.abs(got - dq).max():.2e} | {agree:.0%} |")


if __name__ == "__main__":
    main()
