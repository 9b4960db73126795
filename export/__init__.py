"""The mobilemoe exporter: Hugging Face MoE checkpoint -> mobilemoe package.

Needs the `export` extra (`pip install 'mobilemoe[export]'`); the runtime does not.
"""

from .exporter import export_model

__all__ = ["export_model"]
