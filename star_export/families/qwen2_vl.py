"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): a ViT with 2-D RoPE, a 2x2 patch merger and a
Qwen2 decoder with M-RoPE, as static-shape modules.

Fixed static resolution
-----------------------
Dynamic resolution becomes one static resolution per export (``--image-size PX`` or ``HxW``, both
multiples of ``patch_size * spatial_merge_size``, within the processor's min/max pixels; default
336x336): pick the aspect ratio of your images (448x336 for 4:3 photos). Images are resized to it
(bicubic: what the processor's smart_resize gives an image of that aspect ratio) and cut into the
processor's patch layout (``encoding.patchify``): with P = patch_size, m = spatial_merge_size,
Tp = temporal_patch_size, C = in_channels, gh = H / P, gw = W / P,
``pixel_values [B, gh * gw, C * Tp * P * P]``, rows ordered block-major over m x m merge blocks. HF's
vision tower runs over ``grid_thw`` / ``cu_seqlens`` with ``.tolist()`` splits, which do not export
with static shapes, so its forward is written out here over the static grid (same math as HF's eager
path). The merged grid is ``rows x cols = gh/m x gw/m``; merged token j sits at row ``j // cols``,
column ``j % cols`` and consists of pixel rows ``m*m*j .. m*m*j + m*m - 1``. N = rows * cols.

STAR for Qwen2-VL
-----------------
- Stage 1 scores the N merged tokens. F [B, N, m*m*d_v] is the last vision block's output (the
  merger's input) regrouped per merged token: the m*m patch features of a merge block concatenated
  in processor order, d = m*m*d_v. F is taken BEFORE the merger's LayerNorm ``ln_q``: the merger
  (``ln_q`` + MLP) is Qwen2-VL's projector, so this is "after the vision tower, before the projector".
  ``image_embeds = merger(gather(F, stage1_keep_idx))``; the merger acts on each merged token alone,
  so gather-then-merge equals merge-then-gather.
- Position ids are the ORIGINAL M-RoPE ids of HF's ``get_rope_index`` as if nothing were pruned and
  padding absent, as three components (t, h, w): text before the image ``t = h = w = cumsum(mask) - 1``;
  merged token (r, c) at ``(s, s + r, s + c)`` with s = real tokens before the placeholder; text at
  input index t > p at ``s + max(rows, cols) + (t - p - 1)`` on all three (``n_positions``). Kept
  tokens keep their ids; stage 2 gathers all three components.
- Decode: the first generated token sits at ``real prompt tokens - 1 + n_positions``; for text tokens
  the three components are equal, and M-RoPE with equal components is 1-D RoPE, so the decode graph
  takes a scalar ``position_ids [B, 1]``.
- Index space: merged-token index j in raster order over the rows x cols grid.

Decoder: transformers' ``Qwen2VLRotaryEmbedding`` merges the ``mrope_section`` chunks of the three
components into one cos/sin (B, L, head_dim) and ``Qwen2VLAttention`` applies the Llama
``apply_rotary_pos_emb``, so ``rewrite.decoder_layer`` runs the layers unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from star_export import star
from star_export.errors import UsageError
from star_export.families.base import (
    Family,
    ImageSpan,
    normalisation,
    refuse_sliding_window,
    text_geometry,
    tiny_normalisation,
)
from star_export.geometry import Geometry
from star_export.rewrite import StarDecode, StarPrefill
from star_export.star import StarConfig

DEFAULT_IMAGE_SIZE = 336  # 12 x 12 = 144 merged tokens at patch 14, merge 2


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def image_hw(image_size: int | tuple[int, int] | list[int] | None) -> tuple[int, int]:
    """``--image-size`` as (height, width): PX is PX x PX; default 336 x 336."""
    if image_size is None:
        return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = (int(v) for v in image_size)
    return height, width


def qwen_geometry(config: Any, image_size: Any, arch: str, **overrides: Any) -> Geometry:
    """Geometry of a Qwen-VL config at one static resolution (``image_size``: PX or (H, W))."""
    vc, tc = config.vision_config, config.text_config
    height, width = image_hw(image_size)
    patch, merge, tp = int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size)
    unit = patch * merge
    if min(height, width) <= 0 or height % unit or width % unit:
        raise UsageError(
            f"--image-size {height}x{width}: height and width must each be a positive multiple of "
            f"patch_size * spatial_merge_size = {unit}"
        )
    refuse_sliding_window(tc)
    gh, gw = height // patch, width // patch  # patches down / across
    rows, cols = gh // merge, gw // merge
    fields: dict[str, Any] = dict(
        n_visual=rows * cols,
        image_size=height,
        image_hw=(height, width),
        patch_size=patch,
        image_token_id=int(config.image_token_id),
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        vision_feature_layer=-1,  # the last vision block (the merger's input)
        select_strategy="full",  # no CLS token
        **text_geometry(tc),
        arch=arch,
        pixel_shape=(gh * gw, int(vc.in_channels) * tp * patch * patch),
        n_fixed=0,
        n_positions=max(rows, cols),
        grid=(rows, cols),
        position_axes=3,
    )
    return Geometry(**{**fields, **overrides})


def vision_patch_positions(gh: int, gw: int, merge: int) -> torch.Tensor:
    """(h, w) patch coordinates of every pixel row in processor order.  -> (gh*gw, 2) int64"""
    h = torch.arange(gh).view(gh // merge, merge, 1, 1).expand(-1, -1, gw // merge, merge)
    w = torch.arange(gw).view(1, 1, gw // merge, merge).expand(gh // merge, merge, -1, -1)
    # processor order: (block row, block col, i, j)
    h = h.permute(0, 2, 1, 3).reshape(-1)
    w = w.permute(0, 2, 1, 3).reshape(-1)
    return torch.stack([h, w], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def vision_block(
    blk: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    mask: torch.Tensor | None = None,
    centred: bool = False,
) -> torch.Tensor:
    """One Qwen-VL vision block (norm1, qkv + 2-D RoPE, proj, norm2, mlp) over (B, n, E) with full
    attention within each of the B sequences.

    cos/sin: (n, head_dim) from the static patch grid, or (B, n, head_dim) when the B sequences sit
    at different positions (Qwen2.5-VL's windows); ``mask``: None, or additive float32 broadcast to
    the scores (B, Hv, n, n) (padding keys). Same math as HF's eager path (RoPE in float32, softmax
    in float32) with the batch as a tensor dim instead of cu_seqlens. ``centred``: the weighted sum
    as ``v0 + probs @ (v - v0)`` with v0 the first value of each sequence (equal as a sum of
    probabilities that is 1): patches with equal values (a uniform image) then get bit-equal
    outputs in every backend, whatever the rounding of their RoPE-dependent probabilities.
    """
    b, n, e = x.shape
    attn = blk.attn
    h = blk.norm1(x)
    qkv = attn.qkv(h).reshape(b, n, 3, num_heads, e // num_heads).permute(2, 0, 3, 1, 4)  # (3,B,Hv,n,hd)
    q, k, v = qkv.unbind(0)
    dtype = q.dtype
    c, s = cos.float().unsqueeze(-3), sin.float().unsqueeze(-3)  # (1, n, hd) or (B, 1, n, hd)
    q = (q.float() * c + _rotate_half(q.float()) * s).to(dtype)
    k = (k.float() * c + _rotate_half(k.float()) * s).to(dtype)
    scores = (q @ k.transpose(2, 3)) * attn.scaling  # (B, Hv, n, n)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    if centred:
        v0 = v[:, :, :1]  # (B, Hv, 1, hd)
        out = (probs @ (v - v0) + v0).transpose(1, 2).reshape(b, n, e)
    else:
        out = (probs @ v).transpose(1, 2).reshape(b, n, e)
    x = x + attn.proj(out)
    return x + blk.mlp(blk.norm2(x))


def mrope_positions(
    attention_mask: torch.Tensor, p: torch.Tensor, keep_idx: torch.Tensor, geo: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Original M-RoPE ids of the spliced sequence.  -> (3, B, L) int64 and key validity (B, L) bool.

    Built from ``star.original_positions`` with ``n_positions`` (text after the image starts at
    s + n_positions) and visual offsets 0 / row / col for the t / h / w components.
    """
    cols = geo.grid[1]
    row = torch.div(keep_idx, cols, rounding_mode="floor")
    col = keep_idx - row * cols
    pt, valid = star.original_positions(attention_mask, p, torch.zeros_like(keep_idx), geo.n_positions)
    ph, _ = star.original_positions(attention_mask, p, row, geo.n_positions)
    pw, _ = star.original_positions(attention_mask, p, col, geo.n_positions)
    return torch.stack([pt, ph, pw]), valid


class MRopePrefill(StarPrefill):
    """Positions of the M-RoPE families: 3-D ids, gathered component-wise at stage 2."""

    def positions(
        self, attention_mask: torch.Tensor, p: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return mrope_positions(attention_mask, p, offsets, self.geo)

    def gather_positions(self, pos: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return torch.gather(pos, 2, src.unsqueeze(0).expand(3, -1, -1))  # (3, B, L2)


class Qwen2VLPrefill(MRopePrefill):
    """STAR prefill of Qwen2-VL: pixel_values (B, gh*gw, C*Tp*P*P), input_ids / attention_mask (B, T)."""

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__(model, geometry, cfg)
        visual = model.model.visual
        vc = visual.config
        self.patch_embed = visual.patch_embed
        self.vision_rotary = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.vision_heads = int(vc.num_heads)
        self.vision_dim = int(visual.patch_embed.embed_dim)  # the tower's width (vc.embed_dim here)
        self.merge = int(vc.spatial_merge_size)
        gh, gw = geometry.grid[0] * self.merge, geometry.grid[1] * self.merge
        self.register_buffer("patch_pos", vision_patch_positions(gh, gw, self.merge), persistent=False)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F: (B, gh*gw, C*Tp*P*P) -> (B, N, m*m*d_v), the merger's input per merged token (pre-ln_q)."""
        b = pixel_values.shape[0]
        n_patches, patch_dim = self.geo.pixel_shape
        x = self.patch_embed(pixel_values.reshape(b * n_patches, patch_dim))  # (B*n, E)
        x = x.reshape(b, n_patches, self.vision_dim)
        cos, sin = self.vision_rotary(x, self.patch_pos)  # (n, hd_v) constants of the static grid
        for blk in self.blocks:
            x = vision_block(blk, x, cos, sin, self.vision_heads)
        return x.reshape(b, self.geo.n_visual, self.merge * self.merge * self.vision_dim)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """The merger on (B, n, m*m*d_v) -> (B, n, D): ln_q per patch, then the MLP per merged token."""
        b, n, _ = feats.shape
        return self.merger(feats.reshape(b * n * self.merge * self.merge, self.vision_dim)).reshape(b, n, -1)


class MRopeDecode(StarDecode):
    """One decode step; ``position_ids (B, 1)`` is the scalar position of the new (text) token,
    expanded to the three equal M-RoPE components."""

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(h, position_ids.unsqueeze(0).expand(3, -1, -1))  # (B, 1, hd)


# ---------------------------------------------------------------------------- the family


class QwenVLFamily(Family):
    """What the Qwen-VL families share: static resolution, patches, M-RoPE, tokenizer-only processor."""

    options = frozenset({"image_size"})
    text_models = None  # its own decoder

    def grid_thw(self, geo: Geometry) -> torch.Tensor:
        height, width = geo.image_hw
        return torch.tensor([[1, height // geo.patch_size, width // geo.patch_size]])

    @staticmethod
    def pixel_range(pre: dict[str, Any]) -> tuple[int | None, int | None]:
        """The image processor's (min_pixels, max_pixels) from its config, None where unset."""
        size = pre.get("size") or {}
        low = pre.get("min_pixels") or size.get("shortest_edge")
        high = pre.get("max_pixels") or size.get("longest_edge")
        return (int(low) if low else None), (int(high) if high else None)

    def checkpoint_options(self, model_dir: Path) -> dict[str, Any]:
        """Without ``--image-size``: the default 336 x 336, or, where the processor's max_pixels is
        below that (a checkpoint trained at one small resolution, as the Qwen demo recipes), the
        largest square of whole merged tokens it admits."""
        pre = read_json(Path(model_dir) / "preprocessor_config.json")
        low, high = self.pixel_range(pre)
        if not high or high >= DEFAULT_IMAGE_SIZE * DEFAULT_IMAGE_SIZE:
            return {}
        unit = int(pre.get("patch_size", 14)) * int(pre.get("merge_size", 2))
        side = math.isqrt(high) // unit * unit
        return {"image_size": side} if side and side * side >= (low or 0) else {}

    def check_layout(self, model_dir: Path, geo: Geometry) -> None:
        """The static resolution within the image processor's min/max pixels (a checkpoint never saw
        images outside them)."""
        low, high = self.pixel_range(read_json(Path(model_dir) / "preprocessor_config.json"))
        height, width = geo.image_hw
        if (low and height * width < low) or (high and height * width > high):
            raise UsageError(
                f"--image-size {height}x{width}: {height * width} pixels is outside the checkpoint's "
                f"image processor range {low}..{high} (min_pixels..max_pixels)"
            )

    def decode_module(self, model: Any, geo: Geometry, cfg: StarConfig) -> StarDecode:
        return MRopeDecode(model, geo, cfg)

    def expanded(self, geo: Geometry, ids: list[int]) -> tuple[list[int], list[int]]:
        """The prompt with its placeholder expanded to N copies, and its mm_token_type_ids."""
        p = ids.index(geo.image_token_id)
        n = geo.n_visual
        return ids[:p] + [geo.image_token_id] * n + ids[p + 1 :], [0] * p + [1] * n + [0] * (len(ids) - p - 1)

    def raster_candidates(self, model: Any) -> torch.nn.Module | None:
        """The merger: its input is every patch row in processor order (merge blocks block-major),
        m*m consecutive rows per merged token, which reshape to (B, N, m*m*dv) in raster order
        (Qwen2.5-VL's windowed tower overrides this)."""
        return model.model.visual.merger

    def hf_inputs(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> dict[str, Any]:
        """The processor's inputs for one row: the placeholder expanded to N copies, its
        ``mm_token_type_ids``, the image's patch rows (gh*gw, C*Tp*P*P) and ``image_grid_thw``."""
        expanded, types = self.expanded(geo, ids)
        input_ids = torch.tensor([expanded])
        model.model.rope_deltas = None  # no stale state from an earlier generate
        return {
            "pixel_values": pixel_values,
            "image_grid_thw": self.grid_thw(geo),
            "input_ids": input_ids,
            "mm_token_type_ids": torch.tensor([types]),
            "attention_mask": torch.ones_like(input_ids),
        }

    def full_positions(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> torch.Tensor:
        """HF's ``get_rope_index`` on the expanded prompt: (3, T - 1 + N)."""
        expanded, types = self.expanded(geo, ids)
        pos, _ = model.model.get_rope_index(
            torch.tensor([expanded]),
            mm_token_type_ids=torch.tensor([types]),
            image_grid_thw=self.grid_thw(geo),
        )  # (3, 1, L)
        return pos[:, 0]

    @torch.no_grad()
    def hf_unpruned_logits(
        self, model: Any, geo: Geometry, pixel_values: torch.Tensor, ids: list[int]
    ) -> torch.Tensor:
        """The unmodified model with the placeholder expanded to N copies, ``image_grid_thw`` and
        ``mm_token_type_ids`` as the processor gives them; HF computes its own M-RoPE positions."""
        out = model(**self.hf_inputs(model, geo, pixel_values, ids), logits_to_keep=1)
        return out.logits[0, -1].float()

    def image_spec(self, model_dir: Path, geo: Geometry) -> dict[str, Any]:
        pre = read_json(Path(model_dir) / "preprocessor_config.json")
        patch, tp, merge = (
            pre.get("patch_size", 14),
            pre.get("temporal_patch_size", 2),
            pre.get("merge_size", 2),
        )
        height, width = geo.image_hw
        return {
            "kind": "patches",
            "processor": "tokenizer",
            "image_token": "<|image_pad|>",
            "size": [height, width],
            "resize": f"bicubic to {height}x{width} (one static resolution: images of another aspect "
            "ratio are stretched to it)",
            **normalisation(pre),
            "patch_size": patch,
            "temporal_patch_size": tp,
            "merge_size": merge,
            "layout": f"[B, {geo.pixel_shape[0]}, {geo.pixel_shape[1]}]: {patch}x{patch} patches in "
            f"{merge}x{merge} merge blocks (block-major), each row [c, t, y, x] with the image repeated "
            f"{tp} times along t (the Qwen-VL image processors' layout; star_export.encoding.patchify)",
        }

    def write_tiny_processor(self, directory: Path, recipe: Any) -> None:
        """preprocessor_config.json + the tiny tokenizer with the chat template (the Qwen-VL processors
        need torchvision for their video half, so the export reads the tokenizer and the config)."""
        from star_export.tiny import CHAT_TEMPLATE, tiny_tokenizer

        vc, size = recipe.config["vision_config"], recipe.image["size"]
        unit = vc["patch_size"] * vc["spatial_merge_size"]
        pre = {
            "image_processor_type": self.image_processor_type,
            "do_resize": True,
            # the processor's pixel range (real checkpoints: 56*56 .. 28*28*16384)
            # ([image] max_pixels: a recipe trained at one resolution admits only up to it)
            "size": {
                "shortest_edge": 4 * unit * unit,
                "longest_edge": int(recipe.image.get("max_pixels", 16 * size * size)),
            },
            **tiny_normalisation(recipe),
            "patch_size": vc["patch_size"],
            "temporal_patch_size": vc["temporal_patch_size"],
            "merge_size": vc["spatial_merge_size"],
        }
        (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        tokenizer = tiny_tokenizer(image_token_id=int(recipe.config["image_token_id"]))
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(directory)

    def pixel_doc(self, geo: Geometry) -> str:
        return (
            "one image resized to the static resolution, normalised and cut into patches in the Qwen-VL "
            "image processors' layout (manifest image.layout)"
        )

    def index_space(self, geo: Geometry) -> str:
        rows, cols = geo.grid
        m = geo.image_size // geo.patch_size // rows
        return (
            f"merged-token index j in 0..{geo.n_visual - 1}: the {rows}x{cols} grid of {m}x{m} patch blocks "
            f"in raster order (row j // {cols}, column j % {cols})"
        )

    def describe(self, geo: Geometry) -> str:
        height, width = geo.image_hw
        return f"N={geo.n_visual} ({geo.grid[0]}x{geo.grid[1]} merged tokens at {height}x{width} px)"


class Qwen2VL(QwenVLFamily):
    name = "qwen2_vl"
    model_type = "qwen2_vl"
    architecture = "Qwen2VLForConditionalGeneration"
    image_processor_type = "Qwen2VLImageProcessor"

    def geometry(self, config: Any, **options: Any) -> Geometry:
        tc = config.text_config
        # Qwen2VLAttention uses hidden_size // heads whatever config.head_dim says
        head_dim = tc.hidden_size // tc.num_attention_heads
        return qwen_geometry(config, options.get("image_size"), self.name, head_dim=head_dim)

    def prefill_module(self, model: Any, geo: Geometry, cfg: StarConfig) -> StarPrefill:
        return Qwen2VLPrefill(model, geo, cfg)

    def candidate_width(self, model: Any) -> int:
        vc = model.config.vision_config
        return int(vc.embed_dim) * int(vc.spatial_merge_size) ** 2

    def reference_image(self, model: Any, geo: Geometry, pixel_values: torch.Tensor) -> ImageSpan:
        """HF's own vision tower on the single image (its grid_thw); F = the merger's input per merged
        token (last block output before ln_q); HF's merger on the kept tokens' patch rows."""
        visual = model.model.visual
        m2 = model.config.vision_config.spatial_merge_size**2
        patches = visual(pixel_values.to(visual.dtype), grid_thw=self.grid_thw(geo)).last_hidden_state
        feats = patches.reshape(patches.shape[0] // m2, -1)  # (N, m*m*dv)

        def project(kept: list[int]) -> torch.Tensor:
            return visual.merger(patches[[r for j in kept for r in range(j * m2, (j + 1) * m2)]])

        return ImageSpan(feats, list(range(feats.shape[0])), project)


FAMILY = Qwen2VL()
