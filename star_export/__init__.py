"""star_export: STAR visual-token pruning for LLaVA as static-shape ops, exported to ONNX/TensorRT.

The data's way, one module per stage::

    load (recipes, checkpoints) -> rewrite (STAR, static shapes) -> export (ONNX)
      -> build (TensorRT) -> validate (parity) -> bench -> deploy

`star.py` holds the STAR math as written in STAR_SPEC.md; `contract.py` declares the
exported I/O once, as data.
"""

__version__ = "0.1.0"
