"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``): anyres tiles + row newlines.

Static layout: ONE anyres tile grid per export (``--grid RxC``, one of the checkpoint's
``image_grid_pinpoints``; default 2x2). The pre-processing letterboxes every image into that grid
(the checkpoint's image processor with the grid as its only pinpoint), so transformers' unpad step
removes nothing and the span is static: the base image's n = g*g tokens, then the (R*g) x (C*g)
tile grid in raster order with one ``image_newline`` token after each of its R*g rows.
``pixel_values [B, 1 + R*C, 3, S, S]`` (base image, then tiles row by row).

STAR: stage 1 scores ALL N = (1 + R*C) * n patch tokens of the image in one softmax (base image and
tiles together); the newlines are structural (``n_fixed = R*g``): never scored, always kept, merged
back at their constant offsets. Stage 2 ranks patch tokens only. Index space: base image patches
0..n-1 (raster), then the tile grid's patches n..N-1 in raster order over the whole (R*g) x (C*g)
grid (newlines skipped): index n + r*(C*g) + c is grid row r, column c, i.e. tile
(r // g, c // g), patch (r % g, c % g) inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from star_export.errors import UsageError
from star_export.families.base import ImageSpan
from star_export.families.llava import (
    Llava,
    LlavaPrefill,
    clip_features,
    llava_geometry,
)
from star_export.geometry import Geometry
from star_export.star import StarConfig


def next_grid(config: Any, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The static tile grid (rows, cols): ``grid`` if given, else 2x2 when the checkpoint lists that
    resolution, else its first pinpoint. It must be one of ``image_grid_pinpoints``."""
    size = config.vision_config.image_size
    pinpoints = [tuple(int(v) for v in pp) for pp in config.image_grid_pinpoints]
    allowed = [(h // size, w // size) for h, w in pinpoints if h % size == 0 and w % size == 0]
    if grid is None:
        grid = (2, 2) if (2, 2) in allowed else (allowed[0] if allowed else (0, 0))
    if tuple(grid) not in allowed:
        raise UsageError(
            f"--grid {grid[0]}x{grid[1]}: the checkpoint's image_grid_pinpoints allow "
            f"{', '.join(f'{h}x{w}' for h, w in allowed) or 'no tile grid'} ({size} px tiles)"
        )
    return (int(grid[0]), int(grid[1]))


def next_span_offsets(geo: Geometry) -> tuple[list[int], tuple[int, ...]]:
    """The unpruned span: the offset of every patch token (in index order) and of every newline."""
    g = geo.image_size // geo.patch_size
    n = g * g
    rows, cols = geo.grid[0] * g, geo.grid[1] * g
    cand = list(range(n)) + [n + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
    fixed = tuple(n + r * (cols + 1) + cols for r in range(rows))
    return cand, fixed


class LlavaNextPrefill(LlavaPrefill):
    """STAR prefill of a LLaVA-NeXT checkpoint at a fixed tile grid: pixel_values (B, 1 + R*C, 3, S, S)."""

    def __init__(self, model: Any, geometry: Geometry, cfg: StarConfig):
        super().__init__(model, geometry, cfg)
        self.newline = model.model.image_newline
        cand, self.fixed_offsets = next_span_offsets(geometry)
        self.register_buffer("cand_offsets", torch.tensor(cand, dtype=torch.int64), persistent=False)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F (B, N, dv): the base image's tokens, then the tile grid's in raster order over the whole
        grid (the order LlavaNext's pack_image_features uses)."""
        geo = self.geo
        b, tiles = pixel_values.shape[0], pixel_values.shape[1]
        feats = super().vision_features(pixel_values.flatten(0, 1))  # (B * (1 + G), n, dv)
        g = geo.image_size // geo.patch_size
        (gh, gw), dv = geo.grid, feats.shape[-1]
        feats = feats.reshape(b, tiles, g * g, dv)
        grid = feats[:, 1:].reshape(b, gh, gw, g, g, dv).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, dv)
        return torch.cat([feats[:, 0], grid], dim=1)  # (B, N, dv)

    def span_offsets(self, keep1_idx: torch.Tensor) -> torch.Tensor:
        return self.cand_offsets[keep1_idx]

    def structural_embed(self) -> torch.Tensor:
        return self.newline


class LlavaNext(Llava):
    name = "llava_next"
    model_type = "llava_next"
    architecture = "LlavaNextForConditionalGeneration"
    options = frozenset({"grid"})

    def raster_candidates(self, model: Any) -> torch.nn.Module | None:
        return None  # base tile + grid tiles, not one raster

    def geometry(self, config: Any, **options: Any) -> Geometry:
        if config.vision_feature_select_strategy != "default":
            raise UsageError("LLaVA-NeXT: only vision_feature_select_strategy 'default' is supported")
        vc = config.vision_config
        gh, gw = next_grid(config, options.get("grid"))
        side = vc.image_size // vc.patch_size
        return llava_geometry(
            config,
            arch=self.name,
            n_visual=(1 + gh * gw) * side * side,  # base image + tiles, all scored together
            pixel_shape=(1 + gh * gw, 3, vc.image_size, vc.image_size),
            n_fixed=gh * side,  # one newline per row of the tile grid
            grid=(gh, gw),
        )

    def describe(self, geo: Geometry) -> str:
        return f"N={geo.n_visual} + {geo.n_fixed} row newlines, grid {geo.grid[0]}x{geo.grid[1]}"

    def prefill_module(self, model: Any, geo: Geometry, cfg: StarConfig) -> LlavaNextPrefill:
        return LlavaNextPrefill(model, geo, cfg)

    def _grid_px(self, geo: Geometry) -> list[int]:
        return [geo.grid[0] * geo.image_size, geo.grid[1] * geo.image_size]

    def reference_image(self, model: Any, geo: Geometry, pixel_values: torch.Tensor) -> ImageSpan:
        """Candidates and span in transformers' own order: LlavaNext's ``pack_image_features`` run on an
        index image of the fixed grid (image_sizes = the grid's resolution, so nothing is unpadded)."""
        cfg = model.config
        feats = clip_features(
            model.model.vision_tower,
            pixel_values,
            cfg.vision_feature_layer,
            cfg.vision_feature_select_strategy,
        )  # (tiles, n, dv)
        flat = feats.reshape(-1, feats.shape[-1])  # tile-major
        index_image = torch.arange(flat.shape[0], dtype=torch.float32).view(feats.shape[0], -1, 1)
        packed, _ = model.model.pack_image_features(
            [index_image], torch.tensor([self._grid_px(geo)]), "default", image_newline=torch.tensor([-1.0])
        )
        order = [int(v) for v in packed[0][:, 0].tolist()]  # tile-major feature id, -1 at newlines
        cands = [i for i in order if i >= 0]
        number = {fid: j for j, fid in enumerate(cands)}
        span_feats = flat[cands]

        def project(kept: list[int]) -> torch.Tensor:
            return model.model.multi_modal_projector(span_feats[kept][None])[0]

        slots = [number[i] if i >= 0 else None for i in order]
        return ImageSpan(span_feats, slots, project, model.model.image_newline)

    def hf_extra(self, geo: Geometry) -> dict[str, Any]:
        """Anyres needs the image size: the fixed grid's resolution (every image is letterboxed into it)."""
        return {"image_sizes": torch.tensor([self._grid_px(geo)])}

    def image_spec(self, model_dir: Path, geo: Geometry) -> dict[str, Any]:
        spec = super().image_spec(model_dir, geo)
        px = self._grid_px(geo)
        spec["processor_kwargs"] = {"image_grid_pinpoints": [px]}
        spec["anyres"] = {
            "grid": list(geo.grid),
            "pixel_values": f"[B, {geo.pixel_shape[0]}, 3, {geo.image_size}, {geo.image_size}]: the base "
            "image resized to the tile size, then the tiles of the image resized (aspect kept) and "
            f"padded to {px[0]}x{px[1]}, row by row (the checkpoint's LlavaNextImageProcessor with that "
            "resolution as its only pinpoint)",
        }
        return spec

    tiny_anyres = True

    def tiny_image_processor(self, recipe: Any) -> dict[str, Any]:
        """LLaVA's tiny image processor as LlavaNextImageProcessor, with the recipe's pinpoints."""
        return {
            **super().tiny_image_processor(recipe),
            "image_processor_type": "LlavaNextImageProcessor",
            "image_grid_pinpoints": recipe.config["image_grid_pinpoints"],
            "do_pad": True,
        }

    def pixel_doc(self, geo: Geometry) -> str:
        return (
            "anyres tiles of one image: the base image (resized to the tile size) then the fixed grid's "
            "tiles row by row, each normalised with the manifest's mean/std"
        )

    def index_space(self, geo: Geometry) -> str:
        g = geo.image_size // geo.patch_size
        n = g * g
        cols = geo.grid[1] * g
        return (
            f"0..{n - 1}: the base image's {g}x{g} patches in raster order; {n}..{geo.n_visual - 1}: the "
            f"{geo.grid[0]}x{geo.grid[1]} tile grid as one {geo.grid[0] * g}x{cols} patch grid in raster order "
            f"(index {n} + r*{cols} + c = grid row r, column c = tile (r//{g}, c//{g}), patch (r%{g}, c%{g})); "
            "row newlines are not indexed (always kept)"
        )


FAMILY = LlavaNext()
