"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's layout with a windowed vision
tower (RMSNorm, SwiGLU MLP, window attention in all but the ``fullatt_block_indexes`` blocks), as
static-shape modules.

What it shares with Qwen2-VL (``families/qwen2_vl.py``, imported): the static resolution
(``--image-size PX|HxW`` within the processor's min/max pixels), the processor's patch layout
(``pixel_values [B, gh*gw, C*Tp*P*P]``, block-major over m x m merge blocks), the merged
``rows x cols`` grid with N = rows * cols, M-RoPE positions (``get_rope_index`` gives a still image
t = s, h = s + row, w = s + col, text after it from s + max(rows, cols): the same as Qwen2-VL;
``second_per_grid_ts`` only scales video), the Qwen2 text decoder and the scalar decode position.

The windowed vision tower at a static grid
------------------------------------------
HF's ``Qwen2_5_VisionTransformerPretrainedModel.forward`` reorders the patches into WINDOW order
(``get_vision_window_index`` + ``permute_input_for_window_attn``), runs the blocks over
``cu_window_seqlens`` (windowed blocks) or ``cu_seqlens`` (full blocks) with ``.tolist()`` splits,
merges in window order and restores raster order after the merger (``reverse_indices``). At a
static grid all of that is constant, computed here at construction (``window_layout``):

- windows of ``w = window_size // (patch_size * spatial_merge_size)`` merged tokens per side tile the
  ``rows x cols`` grid from the top-left; edge windows are smaller when w does not divide the
  grid (HF pads the grid with -100 and drops the padding: the same windows);
- window order: windows in raster order, the merged tokens of a window in raster order, each with
  its m*m patches in processor order (``window_index`` (N,), expanded to patches ``window_patch``);
- windowed blocks attend within their window: the window-ordered patches are gathered into W
  padded windows of ``w*w*m*m`` slots (``padded_windows``), run as a batch of B*W sequences with
  their RoPE angles, padding slots masked as keys (finfo(float32).min) and dropped after; full
  blocks attend over the whole image in window order, as HF runs them. The attention cost is
  W * (w*w*m*m)^2 per windowed block, not (gh*gw)^2, and no (gh*gw)^2 mask exists;
- the weighted sum of values is ``v0 + P (v - v0)`` (``vision_block(centred=True)``, the same
  value as P v since each row of P sums to 1): patches of a uniform image then leave every block
  bit-equal in every backend, so their stage-1 scores tie exactly and the tie rule decides (with
  ``P v`` the RoPE-dependent rounding of P left 1-ulp score differences that onnxruntime and
  PyTorch ordered differently);
- the last block's output goes back to raster (processor) order with the inverse permutation
  (``raster_patch``) BEFORE stage 1 scores it: the spec scores merged tokens in raster order.

STAR for Qwen2.5-VL
-------------------
- Stage 1 scores F [B, N, m*m*d_v]: the last vision block's output in raster order, the m*m patch
  features of a merged token concatenated (the merger's input), BEFORE the merger's RMSNorm ``ln_q``;
  d = m*m*d_v (4 x vision ``hidden_size``). ``image_embeds = merger(gather(F, stage1_keep_idx))``:
  the merger acts on each merged token alone, so merging the kept tokens equals HF's merge in
  window order followed by ``reverse_indices`` and a gather.
- Index space: merged-token index j in raster order over the rows x cols grid (as Qwen2-VL).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from star_export.errors import UsageError
from star_export.families.base import ImageSpan
from star_export.families.qwen2_vl import Qwen2VL, Qwen2VLPrefill, vision_block
from star_export.geometry import Geometry
from star_export.rewrite import StarPrefill
from star_export.star import StarConfig


def merger_window(vc: Any) -> int:
    """Merged tokens per window side: HF's ``window_size // spatial_merge_size // patch_size``."""
    return int(vc.window_size) // int(vc.spatial_merge_size) // int(vc.patch_size)


def window_layout(rows: int, cols: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The static window order of a rows x cols merged grid with windows of ``window`` tokens a side.

    -> window_index (N,) int64: the raster index of the merged token at each window-order slot
       (HF's ``get_vision_window_index`` for one image), and window_id (N,) int64: the window of
       each window-order slot (windows numbered in raster order).
    """
    r = torch.arange(rows).view(rows, 1).expand(rows, cols).reshape(-1)  # (N,) raster order
    c = torch.arange(cols).view(1, cols).expand(rows, cols).reshape(-1)
    n_win_cols = -(-cols // window)
    win = (r // window) * n_win_cols + c // window  # (N,) window of each raster token
    # sort by (window, raster index): raster index < N, so one integer key orders both exactly
    window_index = torch.argsort(win * (rows * cols) + torch.arange(rows * cols))
    return window_index, win[window_index]


def padded_windows(window_id: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows as equal rows of ``width`` slots over a window-ordered sequence (edge windows padded).

    window_id (n,): the window of each element, non-decreasing. -> source (W*width,) int64: the
    element each slot reads (a padding slot reads its window's first element), valid (W, width) bool,
    place (n,) int64: the slot of each element (to come back from the slots).
    """
    n_win = int(window_id.max()) + 1
    lengths = torch.bincount(window_id, minlength=n_win)  # (W,)
    starts = torch.cumsum(lengths, 0) - lengths  # (W,) first element of each window
    offset = torch.arange(width)[None]  # (1, width)
    valid = offset < lengths[:, None]  # (W, width)
    source = torch.where(valid, starts[:, None] + offset, starts[:, None]).reshape(-1)
    place = window_id * width + (torch.arange(window_id.numel()) - starts[window_id])
    return source, valid, place


class Qwen25VLPrefill(Qwen2VLPrefill):
    """STAR prefill of Qwen2.5-VL: pixel_values (B, gh*gw, C*Tp*P*P), input_ids / attention_mask (B, T).

    Qwen2-VL's modules and merger (``project``), with the tower run in window order."""

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__(model, geometry, cfg)
        vc = model.model.visual.config
        self.full_blocks = frozenset(int(i) for i in vc.fullatt_block_indexes)
        m2 = self.merge * self.merge
        window = merger_window(vc)
        self.window_width = window * window * m2  # patch slots of a full window
        window_index, window_id = window_layout(*geometry.grid, window)
        # patch p of merged token j sits at processor row j*m2 + p; window order keeps the m2 together
        window_patch = (window_index[:, None] * m2 + torch.arange(m2)).reshape(-1)  # (n,)
        slot_source, slot_valid, slot_place = padded_windows(
            window_id.repeat_interleave(m2), self.window_width
        )
        # constants of the static grid: int64 / bool buffers (a module .to(dtype) leaves them as they are)
        self.register_buffer("window_patch", window_patch, persistent=False)  # window order <- processor
        self.register_buffer("raster_patch", torch.argsort(window_patch), persistent=False)  # and back
        window_pos = self.patch_pos[window_patch]  # (n, 2) Qwen2-VL's raster positions, window order
        self.register_buffer("patch_pos", window_pos, persistent=False)
        self.register_buffer("slot_source", slot_source, persistent=False)  # (W*width,) window slots
        self.register_buffer("slot_valid", slot_valid, persistent=False)  # (W, width)
        self.register_buffer("slot_place", slot_place, persistent=False)  # (n,) and back

    def windowed_block(
        self, blk: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """A windowed block on x (B, n, E) in window order: each window a sequence of ``window_width``
        slots, padding slots masked as keys and dropped after; cos/sin (n, hd) window order."""
        b, _, e = x.shape
        n_win, width = self.slot_valid.shape
        rows = x[:, self.slot_source].reshape(b * n_win, width, e)  # (B*W, width, E)

        def per_window(t: torch.Tensor) -> torch.Tensor:  # (n, hd) -> (B*W, width, hd)
            return t[self.slot_source].reshape(1, n_win, width, -1).expand(b, -1, -1, -1).flatten(0, 1)

        keys = torch.where(self.slot_valid, 0.0, torch.finfo(torch.float32).min)  # (W, width)
        mask = keys[None, :, None, None, :].expand(b, -1, -1, -1, -1).flatten(0, 1)  # (B*W, 1, 1, width)
        rows = vision_block(blk, rows, per_window(cos), per_window(sin), self.vision_heads, mask, True)
        return rows.reshape(b, n_win * width, e)[:, self.slot_place]  # (B, n, E) window order

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F: (B, gh*gw, C*Tp*P*P) -> (B, N, m*m*d_v), the merger's input per merged token (pre-ln_q),
        in raster order."""
        b = pixel_values.shape[0]
        n_patches, patch_dim = self.geo.pixel_shape
        x = self.patch_embed(pixel_values.reshape(b * n_patches, patch_dim))  # (B*n, E)
        x = x.reshape(b, n_patches, self.vision_dim)[:, self.window_patch]  # (B, n, E) window order
        cos, sin = self.vision_rotary(x, self.patch_pos)  # (n, hd_v), window order
        for i, blk in enumerate(self.blocks):
            if i in self.full_blocks:  # the whole image, in window order as HF runs it
                x = vision_block(blk, x, cos, sin, self.vision_heads, centred=True)
            else:
                x = self.windowed_block(blk, x, cos, sin)
        x = x[:, self.raster_patch]  # (B, n, E) back to processor (raster) order
        return x.reshape(b, self.geo.n_visual, self.merge * self.merge * self.vision_dim)


class Qwen25VL(Qwen2VL):
    """Qwen2-VL's geometry, positions, processor and decode step; its own windowed tower."""

    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    architecture = "Qwen2_5_VLForConditionalGeneration"
    image_processor_type = "Qwen2VLImageProcessor"  # what the Qwen2.5-VL checkpoints ship

    def check_config(self, cfg: dict[str, Any], where: str) -> None:
        """A window of at least one merged token (HF divides by it)."""
        super().check_config(cfg, where)
        vc = cfg.get("vision_config") or {}
        patch, merge = int(vc.get("patch_size", 14)), int(vc.get("spatial_merge_size", 2))
        window = int(vc.get("window_size", 112))
        if window < patch * merge:
            raise UsageError(
                f"{where}: vision_config.window_size {window} is below patch_size * spatial_merge_size = "
                f"{patch * merge} (a window must hold at least one merged token)"
            )

    def prefill_module(self, model: Any, geo: Geometry, cfg: StarConfig) -> StarPrefill:
        return Qwen25VLPrefill(model, geo, cfg)

    def raster_candidates(self, model: Any) -> torch.nn.Module | None:
        """None: the windowed tower feeds its merger in window order, not raster order."""
        return None

    def reference_image(self, model: Any, geo: Geometry, pixel_values: torch.Tensor) -> ImageSpan:
        """HF's own vision tower on the single image (its grid_thw). Its last_hidden_state is in
        window order: HF's ``get_vision_window_index`` for this grid puts it back in raster order
        (the inverse of HF's own permutation); F = the merger's input per merged token (pre-ln_q).
        The kept tokens go through HF's merger."""
        from transformers.vision_utils import get_vision_window_index

        visual = model.model.visual
        vc = model.config.vision_config
        m2 = vc.spatial_merge_size**2
        grid_thw = self.grid_thw(geo)
        patches = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw).last_hidden_state  # window order
        window_index, _ = get_vision_window_index(
            grid_thw, vc.spatial_merge_size, vc.window_size, vc.patch_size
        )
        by_token = patches.reshape(-1, m2, patches.shape[-1])  # (N, m*m, dv), window order
        feats = by_token[torch.argsort(window_index)].reshape(by_token.shape[0], -1)  # (N, m*m*dv) raster

        def project(kept: list[int]) -> torch.Tensor:
            return visual.merger(feats[kept].reshape(-1, patches.shape[-1]))

        return ImageSpan(feats, list(range(feats.shape[0])), project)


FAMILY = Qwen25VL()
