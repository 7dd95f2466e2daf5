"""star_export: STAR visual-token pruning for vision-language models as static-shape ops, exported
to ONNX / TensorRT with parity proofs.

The Python API (the CLI is a thin layer over it)::

    import star_export
    result = star_export.export("path/or/org-name", keep=64, out="star_out")
    pipe = star_export.load_export("star_out")
    pipe.generate(["cat.png"], ["What is in the image?"]).answers

The data's way, one module per stage::

    load (families, checkpoints) -> rewrite (STAR, static shapes) -> onnx_export (ONNX)
      -> check -> validate (parity) -> manifest -> build (TensorRT) -> runtime / deploy / bench

``star.py`` holds the STAR math (docs/star.md); ``contract.py`` declares the exported I/O once, as
data; ``families/`` holds one module per model family.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "export": "star_export.api",
    "ExportResult": "star_export.api",
    "load_export": "star_export.session",
    "load_model": "star_export.session",
    "Pipeline": "star_export.session",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:  # the API is imported on first use: `import star_export` stays light
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'star_export' has no attribute {name!r}")
