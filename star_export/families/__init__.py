"""The model families star_export exports, one module each, and the registry that finds them.

Adding a family is one new module implementing ``base.Family`` (its ``FAMILY`` instance), one line
in ``FAMILIES`` below, a tiny recipe in ``recipes/`` and its tests (see docs/families.md).
Generic code asks this registry, never a family by name.
"""

from __future__ import annotations

from typing import Any

from star_export.errors import UsageError
from star_export.families import gemma3, llava, llava_next, qwen2_5_vl, qwen2_vl, qwen3_vl
from star_export.families.base import Family, ImageSpan
from star_export.geometry import Geometry

FAMILIES: tuple[Family, ...] = (
    llava.FAMILY,
    llava_next.FAMILY,
    qwen2_vl.FAMILY,
    qwen2_5_vl.FAMILY,
    qwen3_vl.FAMILY,
    gemma3.FAMILY,
)

__all__ = [
    "FAMILIES",
    "Family",
    "ImageSpan",
    "family_for_architecture",
    "family_for_config",
    "family_named",
    "family_of",
    "option_families",
]


def family_named(name: str) -> Family:
    """The family whose ``name`` (the manifest's ``arch``) is ``name``."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UsageError(f"model family {name!r} is not known to this star_export ({supported()})")


def family_of(geo: Geometry) -> Family:
    return family_named(geo.arch)


def family_for_architecture(architecture: str) -> Family:
    """The family whose transformers class is ``architecture`` (a recipe's ``architecture``)."""
    for family in FAMILIES:
        if family.architecture == architecture:
            return family
    raise UsageError(f"architecture {architecture} is not supported; {supported()}")


def supported() -> str:
    return "supported: " + ", ".join(f.architecture for f in FAMILIES)


def family_for_config(cfg: dict[str, Any], where: str) -> Family:
    """The family of a checkpoint's config.json (a dict), or a one-line UsageError naming it."""
    model_type = cfg.get("model_type")
    for family in FAMILIES:
        if family.model_type == model_type:
            family.check_config(cfg, where)
            return family
    arch = ", ".join(cfg.get("architectures") or []) or model_type or "unknown"
    raise UsageError(
        f"{where}: architecture {arch} (model_type {model_type!r}) is not supported; {supported()}"
    )


def option_families(option: str) -> list[str]:
    """Names of the families that take a layout option (``grid``, ``image_size``)."""
    return [f.name for f in FAMILIES if option in f.options]
