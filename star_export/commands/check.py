"""``check``: the TensorRT-readiness scan of one ONNX graph (:mod:`star_export.check`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from star_export.errors import UsageError

NAME = "check"
HELP = "TensorRT-readiness scan of an ONNX graph (no TensorRT needed)"
DESCRIPTION = (
    "Scan an ONNX graph for what TensorRT's ONNX parser cannot take or what breaks static "
    "shapes: unsupported ops, TopK with a non-constant K or K > 3840, NonZero and other "
    "data-dependent shapes, opset range, dtypes. Exits 1 on a violation."
)
EPILOG = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("onnx", type=Path, help="path of the .onnx file")
    p.add_argument("--target", default="10", help="TensorRT major version to check against (default 10)")


def run(args: argparse.Namespace) -> int:
    from star_export.check import check_onnx

    if not args.onnx.is_file():
        raise UsageError(f"{args.onnx}: no such file")
    try:
        report = check_onnx(args.onnx, target=args.target)
    except ValueError as e:
        raise UsageError(f"{args.onnx}: {e}") from None
    print(report.format())
    return 0 if report.ok else 1
