"""``llava``: the headline command, :mod:`star_export.commands.export` under the name most users
look for (same flags, same run)."""

from __future__ import annotations

from star_export.commands.export import DESCRIPTION, EPILOG, add_arguments, run

NAME = "llava"
HELP = "the headline command: export a STAR-pruned model to ONNX and validate it"

__all__ = ["DESCRIPTION", "EPILOG", "HELP", "NAME", "add_arguments", "run"]
