"""The demo model: a synthetic question set (``scenes``), the training loop (``train``) and the trained
checkpoint shipped in ``star_export/data/demo/`` (the default model of the command line and the API)."""

from __future__ import annotations

from pathlib import Path

DEMO_RECIPE = "llava-demo"  # the recipe the shipped checkpoint was trained from (its profile ranges)


def default_model() -> Path:
    """The shipped trained demo checkpoint (a directory loaded like any ``--model DIR``)."""
    return Path(__file__).resolve().parent.parent / "data" / "demo" / DEMO_RECIPE
