"""What the export commands' TensorRT-group flags mean for the export itself: the profile flags
(``--min/opt/max-batch``, ``--min/opt/max-text-len``, ``--max-new-tokens``) set the exported
profile (the manifest's dynamic-dim ranges, the decode graph's past lengths, Triton's limits, the
export's checks), not only an ``--engine`` build's."""

from __future__ import annotations

import argparse
from typing import Any

EXPORT_DTYPE_HELP = (
    "precision of the export (and of the --engine build); default: the checkpoint's own "
    "dtype (config.json), so fp16/bf16 checkpoints are never widened to fp32"
)


def profile_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``export``'s ``profile`` from the flags: {"batch": (min, opt, max), "text_len": (...),
    "max_new_tokens": n} with None for a bound not given."""
    from star_export.engines import DIM_FLAGS

    out: dict[str, Any] = {}
    for dim, names in DIM_FLAGS.items():
        values = tuple(getattr(args, n.lstrip("-").replace("-", "_"), None) for n in names)
        if any(v is not None for v in values):
            out[dim] = values
    if getattr(args, "max_new_tokens", None) is not None:
        out["max_new_tokens"] = args.max_new_tokens
    return out


def describe_export_flags(parser: argparse.ArgumentParser) -> None:
    """Help texts of the build flags as the export reads them (its --dtype, its profile)."""
    from star_export.engines import DIM_FLAGS

    profile = {n.lstrip("-").replace("-", "_") for names in DIM_FLAGS.values() for n in names}
    for action in parser._actions:
        if action.dest == "dtype":
            action.help = EXPORT_DTYPE_HELP
        elif action.dest in profile or action.dest == "max_new_tokens":
            action.help = f"{action.help}; sets the exported profile (manifest, Triton limits) too"
