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
