"""Argument types shared by the commands: a bad value is one line naming what was expected."""

from __future__ import annotations

import argparse
from pathlib import Path


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def integers(text: str) -> list[int]:
    """``32`` or ``32,64,128``."""
    return [integer(v) for v in text.split(",")]


def keeps(text: str) -> list[int] | str:
    """``--keep``: ``64``, levels ``32,64,128``, or a keep range ``16:128`` / ``16:64:128`` (kept as
    text, checked against N where the model is known)."""
    if ":" not in text:
        return integers(text)
    from star_export.errors import UsageError
    from star_export.star import parse_keep_range

    try:
        parse_keep_range(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--keep {text}: ")) from None
    return text


def grid(text: str) -> tuple[int, int]:
    """``--grid``: ROWSxCOLS."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 2x2, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"expected positive rows and cols, got {text!r}")
    return rows, cols


def image_size(text: str) -> int | tuple[int, int]:
    """``--image-size``: PX or HxW."""
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected PX or HxW such as 336 or 336x448, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def add_from(p: argparse.ArgumentParser, help: str = "an export directory (`llava --out DIR`)") -> None:
    """``--from DIR`` (dest ``from_dir``), required: the export a command reads."""
    p.add_argument("--from", dest="from_dir", type=Path, required=True, metavar="DIR", help=help)
