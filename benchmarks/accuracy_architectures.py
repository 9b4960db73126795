"""int8 and int4 logit error of every registered architecture, for docs/ACCURACY.md.

    .venv/bin/python benchmarks/accuracy_architectures.py

For each test entry's tiny config (tests/architectures.py), random and fitted for 60 steps:
export with int8 dense weights and int8 or int4 experts at the default accuracy level (4),
and compare the logits of a 16-token prompt with float32 transformers.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from architectures import ARCHITECTURES  # noqa: E402
from checkpoints import build_checkpoint, load_reference, reference_logits  # noqa: E402
from mobilemoe.export import export_model  # noqa: E402

import mobilemoe  # noqa: E402

PROMPT = [1, 17, 42, 99, 7, 250, 31, 64, 5, 300, 12, 8, 77, 91, 160, 3]


def main() -> None:
    print("| architecture | checkpoint | experts | max err vs fp32 | mean err | top-1 agreement |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, entry in sorted(ARCHITECTURES.items()):
            for label, steps in (("random", 0), ("trained", 60)):
                ckpt = Path(tmp) / f"{name}-{label}"
                build_checkpoint(ckpt, entry.config("tiny", **entry.greedy_overrides), seed=3,
                                 train_steps=steps)
                fp32 = reference_logits(load_reference(ckpt), PROMPT)
                for bits in (8, 4):
                    out = export_model(ckpt, Path(tmp) / f"{name}-{label}-{bits}", bits=bits,
                                       progress=False)
                    got = mobilemoe.load(out).logits(PROMPT)
                    err = np.abs(got - fp32)
                    agree = (got.argmax(-1) == fp32.argmax(-1)).mean()
                    print(f"| {name} | {label} | int{bits} | {err.max():.3f} | {err.mean():.4f} "
                          f"| {agree:.0%} |", flush=True)


if __name__ == "__main__":
    main()
