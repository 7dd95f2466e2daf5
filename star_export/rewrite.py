"""Stage 2: the static-shape STAR rewrite of a LLaVA prefill, the module that gets exported.

``StarPrefill`` wraps a loaded ``LlavaForConditionalGeneration`` and reuses its modules and
weights (vision tower, projector, embeddings, norms, MLPs, rotary embedding, lm_head). Only
decoder attention is written out here, so that it can (a) return the post-softmax
probabilities of layer K-1 that stage 2 scores, (b) return each layer's present key/value
after RoPE, and (c) take an explicit causal + padding mask (never a mask inferred from
position ids). Works for Llama-family decoders (Llama, Vicuna, Mistral without sliding
window, Qwen2 biases), MHA and GQA.

Pruning ops: TopK with a literal K (see ``star.topk_sorted``) plus Gather/GatherElements.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from star_export import star
from star_export.load import Geometry
from star_export.star import StarConfig


def decoder_attention(
    attn: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    head_dim: int,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention of one Llama-family layer with the weights of ``attn``.

    x: (B, L, D), cos/sin: (B, L, hd), mask: (B, 1, L, P + L) additive float32, past: keys/values
    (B, Hkv, P, hd) or None (P = 0)
    -> output (B, L, D), key (B, Hkv, P + L, hd) after RoPE, value (B, Hkv, P + L, hd),
       probs (B, H, L, P + L) post-softmax, float32.
    """
    b, length, _ = x.shape
    q = attn.q_proj(x).view(b, length, -1, head_dim).transpose(1, 2)  # (B, H, L, hd)
    k = attn.k_proj(x).view(b, length, -1, head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
    v = attn.v_proj(x).view(b, length, -1, head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past is not None:
        k = torch.cat([past[0], k], dim=2)  # (B, Hkv, P + L, hd)
        v = torch.cat([past[1], v], dim=2)
    groups = q.shape[1] // k.shape[1]
    # scores, mask and softmax in float32 whatever the export dtype (fp16 would overflow)
    scores = (q @ repeat_kv(k, groups).transpose(2, 3)).to(
        torch.float32
    ) * attn.scaling + mask  # (B, H, L, P+L)
    probs = torch.softmax(scores, dim=-1)  # float32
    out = (probs.to(v.dtype) @ repeat_kv(v, groups)).transpose(1, 2).reshape(b, length, -1)  # (B, L, H*hd)
    return attn.o_proj(out), k, v, probs


def decoder_layer(
    layer: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    head_dim: int,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-norm residual block: h + attn(norm(h)), then + mlp(norm(.)). Returns (h, k, v, probs)."""
    a, k, v, probs = decoder_attention(
        layer.self_attn, layer.input_layernorm(h), cos, sin, mask, head_dim, past
    )
    h = h + a
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, k, v, probs


def next_span_offsets(geo: Geometry) -> tuple[list[int], tuple[int, ...]]:
    """LLaVA-NeXT's unpruned visual span: the offset of every patch token (in ``vision_features``
    order) and of every row newline.

    Span (LlavaNext pack_image_features, fixed grid, nothing unpadded): the base image's n
    tokens, then for each of the H = gh*g rows of the tile grid its W = gw*g tokens and a newline.
    """
    g = geo.image_size // geo.patch_size
    n = g * g
    rows, cols = geo.grid[0] * g, geo.grid[1] * g
    cand = list(range(n)) + [n + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
    fixed = tuple(n + r * (cols + 1) + cols for r in range(rows))
    return cand, fixed


def bind_text(module: nn.Module, model: nn.Module, geometry: Geometry, cfg: StarConfig) -> None:
    """Attach the text side every exported module uses: embeddings, decoder layers, final norm,
    rotary embedding and lm_head of ``model``, with the geometry and STAR settings."""
    text = model.model.language_model
    module.embed_tokens = text.embed_tokens
    module.layers = text.layers
    module.norm = text.norm
    module.rotary_emb = text.rotary_emb
    module.lm_head = model.lm_head
    module.geo = geometry
    module.cfg = cfg


class StarPrefill(nn.Module):
    """STAR-pruned prefill: (pixel_values, input_ids, attention_mask) -> logits, indices, presents.

    Outputs, in order (names in ``contract.prefill_contract``):
      logits (B, V) float32 at the last position, stage1_keep_idx (B, keep1),
      stage2_keep_idx (B, keep2), then present.{i}.key / present.{i}.value for every layer.
    """

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__()
        bind_text(self, model, geometry, cfg)
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        if geometry.n_fixed:  # LLaVA-NeXT: row newlines, always kept, interleaved by offset
            self.newline = model.model.image_newline
            cand, fixed = next_span_offsets(geometry)
            self.register_buffer("cand_offsets", torch.tensor(cand, dtype=torch.int64), persistent=False)
            self.fixed_offsets = fixed
        for layer in self.layers:
            extra = {"q_norm", "k_norm"} & {n for n, _ in layer.self_attn.named_children()}
            if extra:
                raise NotImplementedError(f"attention with {sorted(extra)} is not Llama-family")

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F: (B, *pixel_shape) -> (B, N, dv), the selected vision layer without CLS.

        LLaVA-NeXT: pixel_values (B, 1 + gh*gw, 3, S, S), the base image then the tiles row by
        row; F lists the base image's tokens, then the tile grid's tokens in raster order over
        the whole (gh*g) x (gw*g) grid, the order LlavaNext's pack_image_features uses.
        """
        geo = self.geo
        if geo.arch == "llava_next":
            b, tiles = pixel_values.shape[0], pixel_values.shape[1]
            pixel_values = pixel_values.flatten(0, 1)  # (B * (1 + G), 3, S, S)
        out = self.vision_tower(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[geo.vision_feature_layer]  # (B', 1 + n, dv)
        feats = feats[:, 1:] if geo.select_strategy == "default" else feats
        if geo.arch != "llava_next":
            return feats
        g = geo.image_size // geo.patch_size
        (gh, gw), dv = geo.grid, feats.shape[-1]
        feats = feats.reshape(b, tiles, g * g, dv)
        grid = feats[:, 1:].reshape(b, gh, gw, g, g, dv).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, dv)
        return torch.cat([feats[:, 0], grid], dim=1)  # (B, N, dv)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """The projector on the kept features: (B, n, dv) -> (B, n, D)."""
        return self.projector(feats)

    def positions(
        self, attention_mask: torch.Tensor, p: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Original position ids of the L1 sequence (B, L1) and key validity (B, L1)."""
        return star.original_positions(attention_mask, p, offsets, self.geo.n_positions)

    def gather_positions(self, pos: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """The position ids of the stage-2 sequence: pos at the slots ``src`` (B, L2)."""
        return torch.gather(pos, 1, src)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        geo, cfg = self.geo, self.cfg
        hd = geo.head_dim

        # ---- stage 1: score visual tokens by the self-attention they receive
        feats = self.vision_features(pixel_values)  # (B, N, dv)
        keep1_idx = star.topk_sorted(star.stage1_scores(feats), cfg.keep1)  # (B, keep1)
        image_embeds = self.project(star.gather_rows(feats, keep1_idx))  # (B, keep1, D)
        offsets, is_visual, span_patch = keep1_idx, None, keep1_idx  # offsets within the visual span
        if geo.n_fixed:  # interleave the always-kept row newlines: span of keep1 + R tokens
            image_embeds, offsets, order = star.merge_fixed(
                image_embeds, self.cand_offsets[keep1_idx], self.newline, self.fixed_offsets
            )
            is_visual = order < cfg.keep1  # (B, keep1 + R)
            no_patch = torch.full_like(keep1_idx[:, :1], geo.n_visual).expand(-1, geo.n_fixed)
            span_patch = torch.gather(torch.cat([keep1_idx, no_patch], dim=1), 1, order)  # N at newlines
        span1 = geo.span(cfg.keep1)

        # ---- the L1 sequence: text before, the visual span, text after
        p = star.image_position(input_ids, geo.image_token_id)  # (B,)
        text_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        h = star.splice(text_embeds, image_embeds.to(text_embeds.dtype), p)  # (B, L1, D)
        pos, valid = self.positions(attention_mask, p, offsets)  # (B, L1) (Qwen2-VL: (3, B, L1))
        mask = star.additive_mask(valid, torch.float32)  # (B, 1, L1, L1)
        cos, sin = self.rotary_emb(h, pos)

        presents: list[torch.Tensor] = []
        keep2_idx = keep1_idx
        selected = keep1_idx  # replaced at layer K-1 by the stage-2 choice, used from layer K on
        for i, layer in enumerate(self.layers):
            if i == cfg.layer:
                # ---- stage 2: prune by the attention text after the image paid at layer K-1
                src = star.stage2_layout(p, selected, span1, h.shape[1])  # (B, L2)
                h = star.gather_rows(h, src)  # (B, L2, D)
                pos = self.gather_positions(pos, src)
                valid = torch.gather(valid, 1, src)
                mask = star.additive_mask(valid, torch.float32)
                cos, sin = self.rotary_emb(h, pos)
            h, k, v, probs = decoder_layer(layer, h, cos, sin, mask, hd)
            presents += [k, v]
            if i == cfg.layer - 1:
                scores = star.stage2_scores(probs, p, span1)  # (B, span1)
                selected = star.stage2_select(scores, is_visual, cfg.keep2, geo.n_fixed)  # (B, keep2 + R)
                keep2_idx = torch.gather(span_patch, 1, selected)  # patch indices (N at newlines)
                if geo.n_fixed:  # drop the newlines' N: the keep2 smallest, ascending
                    smallest = torch.topk(keep2_idx.to(torch.float32), cfg.keep2, dim=-1, largest=False)
                    keep2_idx = smallest.values.to(torch.int64)  # exact: indices < 2**24

        logits = self.lm_head(self.norm(h[:, -1])).to(torch.float32)  # (B, V)
        return (logits, keep1_idx, keep2_idx, *presents)


class StarDecode(nn.Module):
    """One decode step against per-layer pasts of different lengths (no further pruning).

    Inputs (names in ``contract.decode_contract``): input_ids (B, 1), position_ids (B, 1) the
    original position of the new token, attention_mask_l1 (B, P1 + 1) and attention_mask_l2
    (B, P2 + 1) (1 = attend: real/visual slots and the new token; 0 = padding), then
    past.{i}.key / past.{i}.value (B, Hkv, P_i, hd) with P_i = P1 for i < K, P2 for i >= K.
    Outputs: logits (B, V) float32, present.{i}.key / value (B, Hkv, P_i + 1, hd).
    """

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__()
        bind_text(self, model, geometry, cfg)

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the new token's position (B, 1) -> (B, 1, hd) each."""
        return self.rotary_emb(h, position_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask_l1: torch.Tensor,
        attention_mask_l2: torch.Tensor,
        *pasts: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        h = self.embed_tokens(input_ids)  # (B, 1, D)
        cos, sin = self.rotary(h, position_ids)
        masks = [
            star.decode_mask(m, torch.float32) for m in (attention_mask_l1, attention_mask_l2)
        ]  # (B, 1, 1, P+1)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            mask = masks[0] if i < self.cfg.layer else masks[1]
            h, k, v, _ = decoder_layer(
                layer, h, cos, sin, mask, self.geo.head_dim, (pasts[2 * i], pasts[2 * i + 1])
            )
            presents += [k, v]
        logits = self.lm_head(self.norm(h[:, -1])).to(torch.float32)  # (B, V)
        return (logits, *presents)


def prefill_module(model: nn.Module, geometry: Geometry, cfg: StarConfig) -> nn.Module:
    """The exported prefill module of the checkpoint's architecture (``geometry.arch``)."""
    if geometry.arch == "qwen2_vl":
        from star_export.qwen2vl import Qwen2VLPrefill

        return Qwen2VLPrefill(model, geometry, cfg)
    return StarPrefill(model, geometry, cfg)


def decode_module(model: nn.Module, geometry: Geometry, cfg: StarConfig) -> nn.Module:
    """The exported decode-step module of the checkpoint's architecture (``geometry.arch``)."""
    if geometry.arch == "qwen2_vl":
        from star_export.qwen2vl import Qwen2VLDecode

        return Qwen2VLDecode(model, geometry, cfg)
    return StarDecode(model, geometry, cfg)
