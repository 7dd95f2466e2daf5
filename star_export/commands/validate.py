"""``validate``: re-run the parity checks of an export directory (and of its TensorRT engines)."""

from __future__ import annotations

import argparse

from star_export.commands.argtypes import add_from, integer
from star_export.errors import UsageError

NAME = "validate"
HELP = "re-run the parity checks of an exported directory (and of its TensorRT engines with --trt)"
DESCRIPTION = (
    "Parity of --from's graphs against the PyTorch rewrite of the checkpoint recorded in the "
    "manifest and the dynamic reference (and, with --trt, of the TensorRT engines against onnxruntime "
    "through polygraphy's TrtRunner/OnnxrtRunner/Comparator); writes report.json."
)
EPILOG = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from star_export.engines.engines_only import add_trt_flags

    add_from(p)
    add_trt_flags(p)  # --trt, --engines-only
    p.add_argument(
        "--batch-size",
        type=integer,
        default=2,
        metavar="B",
        help="batch of the random validation inputs (default 2, at least 2: one row is left padded)",
    )
    p.add_argument(
        "--text-len",
        type=integer,
        default=24,
        metavar="T",
        help="prompt length of the validation inputs (default 24)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random validation inputs (default 0)")


def run(args: argparse.Namespace) -> int:
    from star_export.api import quiet_libraries
    from star_export.engines.engines_only import run_engines_only
    from star_export.validate import validate_directory

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    quiet_libraries()
    if args.engines_only:  # implies --trt: the engine rows alone, against the recorded report.json
        return run_engines_only(args.from_dir, max(2, args.batch_size), args.text_len, args.seed)
    report = validate_directory(
        args.from_dir, trt=args.trt, batch=max(2, args.batch_size), text_len=args.text_len, seed=args.seed
    )
    print(report.format())
    print(f"wrote {args.from_dir / 'report.json'}")
    return 0 if report.passed else 1
