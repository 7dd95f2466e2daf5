"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): a ViT with a learned position grid and 2-D RoPE,
a 2x2 patch merger, DeepStack mergers and a Qwen3 decoder with interleaved M-RoPE, as static-shape
modules. What it shares with Qwen2-VL (the static resolution, the patch layout, M-RoPE positions,
the scalar decode position, the tokenizer-only processor) comes from ``families/qwen2_vl.py``.

Fixed static resolution
-----------------------
``--image-size PX`` or ``HxW`` (multiples of ``patch_size * spatial_merge_size``, 32 px for the real
checkpoints, within the processor's min/max pixels; default 384x384: 12 x 12 = 144 merged tokens).
``pixel_values [B, gh * gw, C * Tp * P * P]`` in the Qwen-VL processors' block-major patch order
(``encoding.patchify``), as for Qwen2-VL. HF's vision tower runs over ``grid_thw`` / ``cu_seqlens``
with ``.tolist()`` splits; it is written out here over the static grid:

- ``Qwen3VLVisionModel`` adds a LEARNED position embedding, a square table resampled to the image's
  patch grid (bilinear, align_corners) by ``get_vision_interpolation_indices_and_weights``. At a static
  grid its gather indices and weights are constants (buffers computed once by that same function);
  the weighted sum of table rows runs in the graph, in the table's dtype then float32, like HF's;
- the 2-D rotary embedding of the patch (row, column) is ``Qwen3VLVisionRotaryEmbedding`` on the
  constant patch coordinates; the blocks run full attention within each image
  (``qwen2_vl.vision_block``: the same block structure and RoPE math).

STAR for Qwen3-VL
-----------------
- Stage 1 scores the N merged tokens: F [B, N, m*m*d_v] is the last vision block's output, the m*m
  patch features of a merge block concatenated (the merger's input). The merger
  (``use_postshuffle_norm=False``) applies its LayerNorm to each PATCH before the concatenation
  (``norm(x).view(-1, m*m*d_v)``), so F is taken before the merger's norm, as STAR_SPEC asks.
  ``image_embeds = merger(gather(F, stage1_keep_idx))`` (per merged token: gather-then-merge equals
  merge-then-gather).
- DeepStack: the outputs of the vision blocks ``deepstack_visual_indexes`` each go through their own
  merger (``use_postshuffle_norm=True``: LayerNorm over the concatenated m*m*d_v features), giving
  one level (B, N, D) per index; ``Qwen3VLTextModel._deepstack_process`` ADDS level i to the hidden
  states at the visual positions after decoder layer i (i < number of levels). Under STAR every level
  is gathered with the same kept indices: after layers < K at the stage-1 tokens (L1 layout; the
  addition after layer K-1 comes after stage 2 has scored layer K-1's attention and before the
  stage-2 gather), after layers >= K at the stage-2 tokens (L2 layout). ``encode_image`` returns the
  levels as ``Span.extras``; ``after_layer`` adds level i gathered by ``Span.patch``.
- Positions: HF's ``get_rope_index`` lays an image out as Qwen2-VL does: merged token (r, c) at
  ``(t, h, w) = (s, s + r, s + c)``, text after the image from ``s + max(rows, cols)`` on all three
  (``qwen2_vl.mrope_positions``). ``Qwen3VLTextRotaryEmbedding`` INTERLEAVES the components over the
  frequencies (frequency j takes h where j % 3 == 1 and j < 3 * mrope_section[1], w where
  j % 3 == 2 and j < 3 * mrope_section[2], t elsewhere) instead of Qwen2-VL's contiguous chunks;
  with equal components every frequency gets the same position, so the decode graph's scalar
  ``position_ids [B, 1]`` (``Qwen3VLDecode``, an ``MRopeDecode``) is still 1-D RoPE. The
  interleaving is written as a Gather of each frequency's component (``interleaved_rope``, bit-equal
  to HF's module), since HF's in-place slice writes export as ScatterND. Rope types that recompute
  their frequencies from the sequence length (``dynamic``, ``longrope``) are refused.
- Decoder: ``Qwen3VLTextAttention`` applies per-head RMSNorms ``q_norm`` / ``k_norm`` (eps
  ``rms_norm_eps``, over ``head_dim`` = ``config.head_dim``, which need not be hidden / heads) to the
  projections before RoPE, scaling ``head_dim ** -0.5``: ``rewrite.decoder_attention`` calls the
  module's own norms at that point, so the generic layer runs unchanged.
- Index space: merged-token index j in raster order over the rows x cols grid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from star_export import star
from star_export.errors import UsageError
from star_export.families.base import ImageSpan, RefSpan
from star_export.families.qwen2_vl import (
    MRopeDecode,
    MRopePrefill,
    QwenVLFamily,
    qwen_geometry,
    vision_block,
    vision_patch_positions,
)
from star_export.geometry import Geometry
from star_export.rewrite import Span, StarDecode, StarPrefill
from star_export.star import StarConfig

DEFAULT_IMAGE_SIZE = 384  # 12 x 12 = 144 merged tokens at patch 16, merge 2 (as Qwen2-VL's 336 at 14)
DYNAMIC_ROPE = frozenset({"dynamic", "longrope"})  # rope types whose frequencies change at run time


def position_interpolation(visual: nn.Module, gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's resampling of the learned position table to a (gh, gw) patch grid, in processor order:
    gather indices (gh*gw, taps) int64 and weights (gh*gw, taps) float32 (constants of the grid)."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    return get_vision_interpolation_indices_and_weights(
        torch.tensor([[1, gh, gw]]),
        num_grid_per_side=visual.num_grid_per_side,
        mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners,
        spatial_merge_size=visual.spatial_merge_size,
    )


def frequency_axes(mrope_section: list[int], half: int) -> list[int]:
    """The M-RoPE component (0 t, 1 h, 2 w) that each of the head_dim / 2 rotary frequencies takes in
    ``Qwen3VLTextRotaryEmbedding.recomposition_frequencies``: h at j = 1, 4, 7, ... below
    3 * mrope_section[1], w at j = 2, 5, 8, ... below 3 * mrope_section[2], t elsewhere."""
    axes = [0] * half
    for axis in (1, 2):
        for j in range(axis, min(3 * int(mrope_section[axis]), half), 3):
            axes[j] = axis
    return axes


def rope_axes(rotary_emb: nn.Module) -> torch.Tensor:
    """``frequency_axes`` of a ``Qwen3VLTextRotaryEmbedding`` as an int64 tensor (a graph constant)."""
    return torch.tensor(frequency_axes(rotary_emb.mrope_section, rotary_emb.inv_freq.shape[0]))


def interleaved_rope(
    rotary_emb: nn.Module, axes: torch.Tensor, h: torch.Tensor, pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL's interleaved M-RoPE cos/sin (B, L, head_dim) of positions (3, B, L), as a Gather of
    each frequency's component (``axes``: (head_dim / 2,) constant) instead of HF's in-place slice
    writes (which export as ScatterND): the same float32 products, bit for bit."""
    per_freq = torch.index_select(pos, 0, axes).permute(1, 2, 0)  # (B, L, hd/2) each frequency's position
    freqs = per_freq.to(torch.float32) * rotary_emb.inv_freq.to(torch.float32)  # (B, L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, hd)
    scale = rotary_emb.attention_scaling
    return (emb.cos() * scale).to(h.dtype), (emb.sin() * scale).to(h.dtype)


def add_at_span(h: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """h (B, L, D) with values (B, n, D) added at slots start .. start + n - 1 (start: (B,)); the
    other slots unchanged (plus an exact 0)."""
    n = values.shape[1]
    return h + star.splice(torch.zeros_like(h[:, n - 1 :]), values.to(h.dtype), start)


class Qwen3VLPrefill(MRopePrefill):
    """STAR prefill of Qwen3-VL: pixel_values (B, gh*gw, C*Tp*P*P), input_ids / attention_mask (B, T)."""

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__(model, geometry, cfg)
        visual = model.model.visual
        vc = visual.config
        self.patch_embed = visual.patch_embed
        self.pos_embed = visual.pos_embed
        self.vision_rotary = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.deepstack_mergers = visual.deepstack_merger_list
        self.deepstack_indexes = [int(i) for i in vc.deepstack_visual_indexes]
        self.vision_heads = int(vc.num_heads)
        self.vision_dim = int(vc.hidden_size)
        self.merge = int(vc.spatial_merge_size)
        gh, gw = geometry.grid[0] * self.merge, geometry.grid[1] * self.merge
        self.register_buffer("patch_pos", vision_patch_positions(gh, gw, self.merge), persistent=False)
        index, weight = position_interpolation(visual, gh, gw)
        self.register_buffer("interp_index", index, persistent=False)  # (gh*gw, taps)
        self.register_buffer("interp_weight", weight, persistent=False)  # (gh*gw, taps) float32
        self.register_buffer("freq_axes", rope_axes(self.rotary_emb), persistent=False)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, gh*gw, C*Tp*P*P) -> F (B, N, m*m*d_v), the merger's input per merged token (pre-norm),
        and the DeepStack levels, each (B, N, D), in ``deepstack_visual_indexes`` order."""
        b = pixel_values.shape[0]
        n_patches, patch_dim = self.geo.pixel_shape
        n = self.geo.n_visual
        x = self.patch_embed(pixel_values.reshape(b * n_patches, patch_dim))  # (B*n, d_v)
        x = x.reshape(b, n_patches, self.vision_dim)
        table = self.pos_embed(self.interp_index) * self.interp_weight[:, :, None]  # (n, taps, d_v) float32
        x = x + table.sum(1).to(x.dtype)  # the learned position grid at this resolution
        cos, sin = self.vision_rotary(x, self.patch_pos)  # (n, hd_v) constants of the static grid
        levels: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            x = vision_block(blk, x, cos, sin, self.vision_heads)
            if i in self.deepstack_indexes:  # its own merger: LayerNorm over the 2x2 concatenation
                merger = self.deepstack_mergers[self.deepstack_indexes.index(i)]
                levels.append(merger(x).reshape(b, n, -1))  # (B, N, D)
        return x.reshape(b, n, self.merge * self.merge * self.vision_dim), levels

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode_image(pixel_values)[0]

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """The merger on (B, n, m*m*d_v) -> (B, n, D): its norm per patch, then the MLP per merged token."""
        b, n, _ = feats.shape
        return self.merger(feats.reshape(b, n * self.merge * self.merge, self.vision_dim)).reshape(b, n, -1)

    def rotary(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return interleaved_rope(self.rotary_emb, self.freq_axes, h, pos)  # pos (3, B, L)

    def after_layer(self, i: int, h: torch.Tensor, span: Span) -> torch.Tensor:
        """DeepStack: level i of the span's tokens (stage-1 or stage-2 ones, by ``span.patch``) added
        at the span's slots after decoder layer i."""
        if i >= len(span.extras):
            return h
        return add_at_span(h, star.gather_rows(span.extras[i], span.patch), span.start)


class Qwen3VLDecode(MRopeDecode):
    """One decode step: the scalar position of the new text token as three equal components."""

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__(model, geometry, cfg)
        self.register_buffer("freq_axes", rope_axes(self.rotary_emb), persistent=False)

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = position_ids.unsqueeze(0).expand(3, -1, -1)  # (3, B, 1): equal components = 1-D RoPE
        return interleaved_rope(self.rotary_emb, self.freq_axes, h, pos)


class Qwen3VL(QwenVLFamily):
    name = "qwen3_vl"
    model_type = "qwen3_vl"
    architecture = "Qwen3VLForConditionalGeneration"
    image_processor_type = "Qwen2VLImageProcessor"  # what transformers maps qwen3_vl to

    def check_config(self, cfg: dict[str, Any], where: str) -> None:
        tc = cfg.get("text_config") or {}
        rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind in DYNAMIC_ROPE:
            raise UsageError(
                f"{where}: text rope_type {kind!r} recomputes its frequencies from the sequence length at "
                f"run time; not supported (static exports need fixed frequencies)"
            )

    def geometry(self, config: Any, **options: Any) -> Geometry:
        # head_dim: Qwen3VLTextAttention uses config.head_dim (not hidden_size // heads)
        return qwen_geometry(config, options.get("image_size") or DEFAULT_IMAGE_SIZE, self.name)

    def prefill_module(self, model: Any, geo: Geometry, cfg: StarConfig) -> StarPrefill:
        return Qwen3VLPrefill(model, geo, cfg)

    def decode_module(self, model: Any, geo: Geometry, cfg: StarConfig) -> StarDecode:
        return Qwen3VLDecode(model, geo, cfg)

    def candidate_width(self, model: Any) -> int:
        vc = model.config.vision_config
        return int(vc.hidden_size) * int(vc.spatial_merge_size) ** 2

    def patch_positions(self, model: Any) -> torch.Tensor | None:
        """The learned position grid (side x side, raster order), interpolated to the patch grid at run
        time: the patches' own table where the grid is the image's (the demo recipe's 12 x 12)."""
        return model.model.visual.pos_embed.weight

    def reference_image(self, model: Any, geo: Geometry, pixel_values: torch.Tensor) -> ImageSpan:
        """HF's own vision tower on the single image (its grid_thw): F = the merger's input per merged
        token (last block output, before the merger's norm); HF's merger on the kept tokens' patch rows;
        ``extras``: HF's DeepStack features (one (N, D) per level)."""
        visual = model.model.visual
        m2 = model.config.vision_config.spatial_merge_size**2
        out = visual(pixel_values.to(visual.dtype), grid_thw=self.grid_thw(geo))
        patches = out.last_hidden_state  # (N * m2, d_v)
        feats = patches.reshape(patches.shape[0] // m2, -1)  # (N, m*m*d_v)

        def project(kept: list[int]) -> torch.Tensor:
            return visual.merger(patches[[r for j in kept for r in range(j * m2, (j + 1) * m2)]])

        return ImageSpan(feats, list(range(feats.shape[0])), project, extras=list(out.deepstack_features))

    def reference_layer(
        self,
        model: Any,
        geo: Geometry,
        i: int,
        layer: Any,
        h: torch.Tensor,
        pos: torch.Tensor,
        cache: Any,
        span: RefSpan,
    ) -> torch.Tensor:
        """HF's decoder layer, then HF's ``_deepstack_process`` with level i of the span's candidates."""
        h = super().reference_layer(model, geo, i, layer, h, pos, cache, span)
        if i >= len(span.extras):
            return h
        visual = torch.zeros(h.shape[:2], dtype=torch.bool)
        visual[0, [span.start + j for j, (_, c) in enumerate(span.slots) if c is not None]] = True
        kept = [c for _, c in span.slots if c is not None]
        return model.model.language_model._deepstack_process(h, visual, span.extras[i][kept])


FAMILY = Qwen3VL()
