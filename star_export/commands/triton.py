"""``triton``: a Triton model repository from an export; its flags, examples and writer are the
deploy package's own (:mod:`star_export.deploy.command`)."""

from __future__ import annotations

from star_export.deploy import EPILOG
from star_export.deploy import add_triton_arguments as add_arguments
from star_export.deploy import run_triton as run

NAME = "triton"
HELP = "write a Triton model repository (prefill, decode, image+prompt pipeline)"
DESCRIPTION = (
    "Triton model repository from an export: prefill/decode (tensorrt_plan, onnxruntime_onnx "
    "or a Python-backend model running onnxruntime) + a BLS pipeline model (image + prompt -> text). "
    "Every config.pbtxt is generated from manifest.json."
)

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "NAME", "add_arguments", "run"]
