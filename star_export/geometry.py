"""``Geometry``: the static shape of one export, read from a checkpoint's config by its family.

Generic code reads only the generic fields (token counts, decoder widths, the pixel layout, the
structural tokens and the positions the image occupies); the layout fields (``image_size``,
``patch_size``, ``grid``, ``vision_feature_layer``, ``select_strategy``) are data that the family
module of ``arch`` interprets. A manifest stores ``Geometry.to_dict()``; ``Geometry(**d)`` reads it
back (tuples come back as lists from JSON; manifests older than a field get its default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Geometry:
    """What the exporter needs to know about a checkpoint at one static layout."""

    n_visual: int  # N: content tokens per image that STAR ranks (LLaVA-1.5: 576)
    image_size: int  # the family's image side (LLaVA: the vision tower's; Qwen: the static height)
    patch_size: int
    image_token_id: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    vision_feature_layer: int
    select_strategy: str
    text_model_type: str
    # --- the static layout of the visual span (defaults: LLaVA-1.5, so older manifests load)
    arch: str = "llava"  # the family's name (star_export.families), also the manifest's "arch"
    pixel_shape: tuple[int, ...] = ()  # pixel_values dims after the batch dim
    n_fixed: int = 0  # structural tokens of the span, never scored, always kept (NeXT row newlines)
    n_positions: int = 0  # positions the unpruned image occupies: text after it starts at s + n_positions
    grid: tuple[int, int] = (1, 1)  # the family's grid (NeXT: anyres tiles; Qwen: merged tokens rows x cols)
    position_axes: int = 1  # components of a position id (1: 1-D RoPE; 3: M-RoPE t/h/w)
    image_hw: tuple[int, int] = ()  # the static resolution (height, width); () = image_size square
    slot_positions: bool = False  # the graphs carry each cached slot's original position (Gemma 3's window)

    def __post_init__(self) -> None:
        # JSON round trips (manifest.json) turn tuples into lists; old manifests lack the layout
        object.__setattr__(
            self, "pixel_shape", tuple(self.pixel_shape) or (3, self.image_size, self.image_size)
        )
        object.__setattr__(self, "grid", tuple(self.grid))
        object.__setattr__(self, "image_hw", tuple(self.image_hw) or (self.image_size, self.image_size))
        if not self.n_positions:
            object.__setattr__(self, "n_positions", self.n_visual + self.n_fixed)

    def span(self, keep: int) -> int:
        """Length of the visual span when ``keep`` content tokens are kept (plus the structural ones)."""
        return keep + self.n_fixed

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        """Inverse of ``to_dict`` (unknown keys of newer manifests are ignored)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})
