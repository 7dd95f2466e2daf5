"""STAR for Qwen2-VL (``Qwen2VLForConditionalGeneration``, M-RoPE) as static-shape modules.

``Qwen2VLPrefill`` / ``Qwen2VLDecode`` have exactly the forward signatures, output order and
output shapes of ``rewrite.StarPrefill`` / ``rewrite.StarDecode``, so the contract, exporter,
runtime loop and parity checks serve both architectures. They reuse the loaded model's modules
and weights; the vision tower's forward is written out here (HF's runs over ``grid_thw`` /
``cu_seqlens`` tensors with ``.tolist()`` splits, which do not export with static shapes).

Fixed static resolution
-----------------------
One image per row, resized by the caller to ``image_size x image_size`` (a multiple of
``patch_size * spatial_merge_size``; no ``smart_resize``: that is the caller's job, the same way
a LLaVA caller resizes/crops to 336). With ``P = patch_size``, ``m = spatial_merge_size``,
``Tp = temporal_patch_size``, ``C = in_channels``, ``gh = gw = image_size / P``:

``pixel_values`` for one image is ``(gh * gw, C * Tp * P * P)``, exactly what
``Qwen2VLImageProcessor`` (torchvision or PIL backend) produces for that image: the normalised
``(C, H, W)`` image is cut into ``P x P`` patches ordered block-major over ``m x m`` merge
blocks -- row index ``((R * gw/m + Cm) * m + i) * m + j`` for merge block (R, Cm) and the
patch (i, j) inside it -- and each row holds ``[c, t, y, x]`` flattened with the still frame
repeated ``Tp`` times along t (see ``patchify``). The exported graph takes
``pixel_values [B, gh * gw, C * Tp * P * P]`` (``Geometry.pixel_shape``) and the equivalent of
``image_grid_thw = [1, gh, gw]`` for every row, as Python constants.

The merged grid is ``rows x cols = gh/m x gw/m``; merged token ``j`` sits at row ``j // cols``,
column ``j % cols``, and consists of pixel rows ``m*m*j .. m*m*j + m*m - 1``. ``N = rows * cols``.

STAR semantics for Qwen2-VL (extending STAR_SPEC.md)
----------------------------------------------------
- Stage 1 scores the N merged visual tokens. ``F [B, N, m*m*d_v]`` is the vision tower's last
  block output (the input of ``PatchMerger``) regrouped per merged token: the ``m*m`` patch
  features of a merge block concatenated in processor order. We take F BEFORE the merger's
  LayerNorm ``ln_q``: the merger (``ln_q`` + MLP) is Qwen2-VL's projector, so this is the
  literal "after the vision tower, before the projector" of the spec (LLaVA's F is also an
  un-normalised residual stream). ``A = softmax(F F^T / sqrt(m*m*d_v))`` in float32, ``r1`` =
  column mean, keep1 largest (ties to the lower index) sorted ascending (``star.topk_sorted``).
- ``image_embeds = merger(gather(F, stage1_keep_idx))``. The merger acts on each merged token
  alone (``ln_q`` per patch, then the MLP per merged token), so gather-then-merge equals
  merge-then-gather.
- Position ids are the ORIGINAL M-RoPE ids of HF's ``get_rope_index`` as if nothing were
  pruned and padding absent, as three components (t, h, w):
  text before the image: ``t = h = w = cumsum(mask) - 1``; merged token (r, c):
  ``(s, s + r, s + c)`` with ``s`` = real tokens before the placeholder; text at input index
  ``t > p``: ``s + max(rows, cols) + (t - p - 1)`` on all three (``Geometry.n_positions``).
  Kept tokens keep their ids; stage 2 gathers all three components.
- The attention mask is explicit (``star.additive_mask``: causal + padding keys).
- Stage 2 exactly as STAR_SPEC (``star.stage2_scores`` / ``star.stage2_layout`` on the post-softmax
  probabilities of decoder layer K-1).
- Decode: the first generated token's position is ``s + n_positions + (T - p - 1)``
  (= real prompt tokens - 1 + n_positions), a scalar: for text tokens the three M-RoPE
  components are equal, and M-RoPE with equal components is 1-D RoPE at that position
  (checked in tests/test_qwen2vl.py), so ``position_ids [B, 1]`` is enough.

Decoder: transformers 5.24's ``Qwen2VLRotaryEmbedding`` already merges the ``mrope_section``
chunks of the three components into one ``cos``/``sin`` of shape ``(B, L, head_dim)``
(``recomposition_frequencies``), and ``Qwen2VLAttention`` then applies the Llama
``apply_rotary_pos_emb``. So ``rewrite.decoder_layer`` runs the Qwen2-VL layers unchanged
(q/k/v biases live in the Linear modules).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from star_export import star
from star_export.errors import UsageError
from star_export.load import Geometry, text_geometry
from star_export.rewrite import StarDecode, StarPrefill, bind_text
from star_export.star import StarConfig

ARCH = "qwen2_vl"


def geometry_of_qwen2vl(config: Any, image_size: int = 336) -> Geometry:
    """Geometry of a Qwen2VLConfig at a fixed static ``image_size x image_size`` resolution."""
    vc, tc = config.vision_config, config.text_config
    patch, merge, tp = int(vc.patch_size), int(vc.spatial_merge_size), int(vc.temporal_patch_size)
    if image_size <= 0 or image_size % (patch * merge):
        raise UsageError(
            f"image size {image_size} must be a positive multiple of patch_size * spatial_merge_size "
            f"= {patch * merge}"
        )
    if "sliding_attention" in (getattr(tc, "layer_types", None) or []):
        raise UsageError(
            f"text model {tc.model_type} uses sliding-window attention; not supported "
            "(the exported attention is global)"
        )
    side = image_size // patch  # patches per side
    rows = cols = side // merge
    head_dim = tc.hidden_size // tc.num_attention_heads  # Qwen2VLAttention ignores config.head_dim
    return Geometry(
        n_visual=rows * cols,
        image_size=image_size,
        patch_size=patch,
        image_token_id=int(config.image_token_id),
        head_dim=head_dim,
        vision_feature_layer=-1,  # the last vision block (the merger's input)
        select_strategy="full",  # no CLS token
        **text_geometry(tc),
        arch=ARCH,
        pixel_shape=(side * side, int(vc.in_channels) * tp * patch * patch),
        n_fixed=0,
        n_positions=max(rows, cols),
        grid=(rows, cols),
    )


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """A normalised (C, H, W) image -> (gh * gw, C * Tp * P * P), Qwen2VLImageProcessor's layout."""
    c, height, width = image.shape
    gh, gw = height // patch_size, width // patch_size
    x = image.reshape(c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, *x.shape[5:]))
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size))


def _vision_patch_positions(side: int, merge: int) -> torch.Tensor:
    """(h, w) patch coordinates of every pixel row in processor order.  -> (side*side, 2) int64"""
    h = torch.arange(side).view(side // merge, merge, 1, 1).expand(-1, -1, side // merge, merge)
    w = torch.arange(side).view(1, 1, side // merge, merge).expand(side // merge, merge, -1, -1)
    # processor order: (block row, block col, i, j)
    h = h.permute(0, 2, 1, 3).reshape(-1)
    w = w.permute(0, 2, 1, 3).reshape(-1)
    return torch.stack([h, w], dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def vision_block(
    blk: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """One Qwen2VLVisionBlock over (B, n, E) with full attention within each image.

    cos/sin: (n, head_dim) from the static patch grid. Same math as HF's eager path
    (RoPE in float32, softmax in float32) with the batch as a tensor dim instead of cu_seqlens.
    """
    b, n, e = x.shape
    attn = blk.attn
    h = blk.norm1(x)
    qkv = attn.qkv(h).reshape(b, n, 3, num_heads, e // num_heads).permute(2, 0, 3, 1, 4)  # (3,B,Hv,n,hd)
    q, k, v = qkv.unbind(0)
    dtype = q.dtype
    c, s = cos.float()[None, None], sin.float()[None, None]  # (1, 1, n, hd)
    q = (q.float() * c + _rotate_half(q.float()) * s).to(dtype)
    k = (k.float() * c + _rotate_half(k.float()) * s).to(dtype)
    scores = (q @ k.transpose(2, 3)) * attn.scaling  # (B, Hv, n, n)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    out = (probs @ v).transpose(1, 2).reshape(b, n, e)
    x = x + attn.proj(out)
    return x + blk.mlp(blk.norm2(x))


def mrope_positions(
    attention_mask: torch.Tensor, p: torch.Tensor, keep_idx: torch.Tensor, geo: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Original M-RoPE ids of the spliced sequence.  -> (3, B, L) int64 and key validity (B, L) bool.

    Built from ``star.original_positions`` with ``n_visual = n_positions`` (text after the image
    starts at s + n_positions) and visual offsets 0 / row / col for the t / h / w components.
    """
    cols = geo.grid[1]
    row = torch.div(keep_idx, cols, rounding_mode="floor")
    col = keep_idx - row * cols
    pt, valid = star.original_positions(attention_mask, p, torch.zeros_like(keep_idx), geo.n_positions)
    ph, _ = star.original_positions(attention_mask, p, row, geo.n_positions)
    pw, _ = star.original_positions(attention_mask, p, col, geo.n_positions)
    return torch.stack([pt, ph, pw]), valid


class Qwen2VLPrefill(StarPrefill):
    """STAR-pruned Qwen2-VL prefill: (pixel_values, input_ids, attention_mask) -> logits, indices,
    presents, with the outputs of ``rewrite.StarPrefill`` (names in ``contract.prefill_contract``).

    pixel_values: (B, gh*gw, C*Tp*P*P) (see the module docstring), input_ids / attention_mask
    (B, T) with one placeholder per row, left padding.
    """

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        nn.Module.__init__(self)  # StarPrefill's __init__ binds a LLaVA vision tower and projector
        if geometry.arch != ARCH:
            raise ValueError(f"Qwen2VLPrefill needs a qwen2_vl geometry, got {geometry.arch!r}")
        bind_text(self, model, geometry, cfg)
        visual = model.model.visual
        vc = visual.config
        self.patch_embed = visual.patch_embed
        self.vision_rotary = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.vision_heads = int(vc.num_heads)
        self.vision_dim = int(vc.embed_dim)
        self.merge = int(vc.spatial_merge_size)
        side = geometry.grid[0] * self.merge
        self.register_buffer("patch_pos", _vision_patch_positions(side, self.merge), persistent=False)

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

    def positions(
        self, attention_mask: torch.Tensor, p: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Original 3-D M-RoPE ids (3, B, L1) and key validity (B, L1)."""
        return mrope_positions(attention_mask, p, offsets, self.geo)

    def gather_positions(self, pos: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return torch.gather(pos, 2, src.unsqueeze(0).expand(3, -1, -1))  # (3, B, L2)


class Qwen2VLDecode(StarDecode):
    """One decode step, the I/O of ``rewrite.StarDecode``. ``position_ids (B, 1)`` is the scalar
    position of the new (text) token; it is expanded to the three equal M-RoPE components."""

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(h, position_ids.unsqueeze(0).expand(3, -1, -1))  # (B, 1, hd)
