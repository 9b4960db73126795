"""mobilemoe: run quantized Mixture-of-Experts models under a hard memory budget.

    import mobilemoe
    model = mobilemoe.load("mixtral.mmoe", memory_budget="4GB")
    for token in model.generate("The capital of France is", max_new_tokens=20):
        print(token.text, end="", flush=True)

The runtime needs numpy, onnxruntime, tokenizers, jinja2 and psutil only; the exporter is
`mobilemoe.export` (extra `[export]`).
"""

__version__ = "0.1.0"

from mobilemoe.errors import BudgetError, ExportError, MobileMoEError, PackageError  # noqa: E402
from mobilemoe.expert_cache import EvictionPolicy, LRUPolicy  # noqa: E402
from mobilemoe.model import Generated, MoEModel, Stats, load  # noqa: E402

__all__ = [
    "BudgetError", "EvictionPolicy", "ExportError", "Generated", "LRUPolicy", "MobileMoEError",
    "MoEModel", "PackageError", "Stats", "load", "__version__",
]
