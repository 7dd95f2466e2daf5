"""``build``: TensorRT engines from an export directory; the flags and the build are
:mod:`star_export.engines.command`'s."""

from __future__ import annotations

import argparse

from star_export.commands.argtypes import add_from

NAME = "build"
HELP = "build TensorRT engines from an exported directory (needs TensorRT + a CUDA GPU)"
DESCRIPTION = (
    "Check every graph of --from for TensorRT readiness, then build the prefill engine at "
    "--engine (default DIR/prefill.plan) and the decode engine beside it (out.plan -> out.decode.plan; "
    "an export with several keep levels: one prefill engine per level, out.k32.plan, out.k64.plan, ..., "
    "and one decode engine) through polygraphy's "
    "TensorRT loaders, with optimization profiles from the manifest (or the --min/opt/max flags; the "
    "decode profile covers both past lengths of every level), "
    "the precision of --dtype and a reusable --timing-cache; records each in manifest.json. "
    "Exits 3 with the exact command to run on a GPU host when TensorRT or a GPU is missing."
)
EPILOG = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from star_export.engines import add_build_arguments

    add_from(p)
    add_build_arguments(p)


def run(args: argparse.Namespace) -> int:
    from star_export.engines import run_build
    from star_export.manifest import read_manifest

    read_manifest(args.from_dir)  # --engine defaults to DIR/prefill.plan (run_build)
    return run_build(args, args.from_dir)
