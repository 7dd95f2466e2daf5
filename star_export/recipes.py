"""Recipes: one TOML file per model in the repository's ``recipes/`` folder.

A recipe names an architecture and either embeds a small config (built with seeded random
weights) or lists what a real checkpoint directory must look like. It also carries the image
pre-processing, STAR defaults and the optimization-profile ranges ``[min, opt, max]`` for the
dynamic dims.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from star_export.errors import UsageError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    architecture: str
    embedded: bool
    path: Path
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    expect: dict[str, Any] = field(default_factory=dict)
    image: dict[str, Any] = field(default_factory=dict)
    star: dict[str, int] = field(default_factory=dict)
    profile: dict[str, list[int]] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)  # the family's layout options (image_size, grid)

    def profile_range(self, dim: str) -> tuple[int, int, int]:
        lo, opt, hi = self.profile[dim]
        return int(lo), int(opt), int(hi)


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by name (``llava-tiny``) or by the path of a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UsageError(f"unknown recipe {str(name_or_path)!r}; available: {', '.join(available())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"recipe {path} is not valid TOML: {e}") from None
    _check_recipe(data, path)
    return Recipe(
        name=data["name"],
        description=data.get("description", ""),
        architecture=data["architecture"],
        embedded=bool(data.get("embedded", False)),
        path=path,
        seed=int(data.get("seed", 0)),
        config=data.get("config", {}),
        expect=data.get("expect", {}),
        image=data.get("image", {}),
        star=data.get("star", {}),
        profile=data.get("profile", {}),
        layout=data.get("layout", {}),
    )


REQUIRED = {"name": str, "architecture": str}
OPTIONAL = {"description": str, "embedded": bool, "seed": int}
KINDS = {str: "a string", bool: "true or false", int: "an integer"}
TABLES = ("config", "expect", "image", "star", "profile", "layout")
PROFILE_RANGES = ("batch", "text_len")


def _check_recipe(data: dict[str, Any], path: Path) -> None:
    """A one-line UsageError naming the file and the key for a missing or mistyped key."""
    for key in REQUIRED:
        if key not in data:
            raise UsageError(f"recipe {path}: missing required key {key!r}")
    if data.get("embedded") and not data.get("config"):
        raise UsageError(f"recipe {path}: missing required key 'config' (an embedded recipe's model config)")
    for key, kind in (REQUIRED | OPTIONAL).items():
        if key in data and not isinstance(data[key], kind):
            raise UsageError(f"recipe {path}: {key!r} must be {KINDS[kind]}, got {data[key]!r}")
    for key in TABLES:
        if key in data and not isinstance(data[key], dict):
            raise UsageError(f"recipe {path}: [{key}] must be a table, got {data[key]!r}")
    for key, value in data.get("star", {}).items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"recipe {path}: [star] {key} must be an integer, got {value!r}")
    profile = data.get("profile", {})
    for key in PROFILE_RANGES:
        value = profile.get(key)
        if value is not None and not (
            isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value)
        ):
            raise UsageError(
                f"recipe {path}: [profile] {key} must be [min, opt, max] integers, got {value!r}"
            )
    mnt = profile.get("max_new_tokens")
    if mnt is not None and (not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1):
        raise UsageError(f"recipe {path}: [profile] max_new_tokens must be a positive integer, got {mnt!r}")
