"""The static-shape STAR prefill and decode step, generic over families: the modules that get exported.

``StarPrefill`` holds the STAR data flow (stage 1 -> splice -> decoder with stage 2 at layer K-1)
and reuses the loaded model's text modules and weights (embeddings, norms, MLPs, rotary embedding,
lm_head). A family module subclasses it and supplies the image side through four hooks:
``vision_features`` (the features stage 1 scores), ``project`` (the projector on the kept ones),
``positions`` / ``gather_positions`` (1-D here; M-RoPE families override them), and, when its span
has structural tokens (``geometry.n_fixed``), ``span_offsets`` and ``structural_embed``.

Only decoder attention is written out here, so that it can (a) return the post-softmax
probabilities of layer K-1 that stage 2 scores, (b) return each layer's present key/value after
RoPE, and (c) take an explicit causal + padding mask (never a mask inferred from position ids).
Llama-family layers: q/k/v/o projections (biases allowed), optional per-head q/k RMSNorms, MHA/GQA.

Pruning ops: TopK with a literal K (``star.topk_sorted``) plus Gather/GatherElements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from star_export import star
from star_export.geometry import Geometry
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
    q = attn.q_proj(x).view(b, length, -1, head_dim)  # (B, L, H, hd)
    k = attn.k_proj(x).view(b, length, -1, head_dim)  # (B, L, Hkv, hd)
    v = attn.v_proj(x).view(b, length, -1, head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head RMSNorm before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    if past is not None:
        k = torch.cat([past[0], k], dim=2)  # (B, Hkv, P + L, hd)
        v = torch.cat([past[1], v], dim=2)
    groups = q.shape[1] // k.shape[1]
    # q @ k^T runs in the export dtype (fp16 GEMMs accumulate in fp32 on TensorRT/cuBLAS and
    # onnxruntime's CPU provider; the unscaled products of real checkpoints stay far below fp16's
    # 65504). The scaling, the mask (finfo(float32).min) and the softmax run in float32, so masked
    # slots and the probabilities stage 2 scores keep float32 precision in every export dtype.
    scores = (q @ repeat_kv(k, groups).transpose(2, 3)).to(torch.float32) * attn.scaling + mask
    probs = torch.softmax(scores, dim=-1)  # (B, H, L, P + L) float32
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


@dataclass
class Span:
    """The visual span inside the current sequence, as the layer hooks see it.

    start: (B,) its first slot (the placeholder's index), length: its slots, patch: (B, length) the
    patch index of each slot (N at structural slots), extras: what ``encode_image`` returned beside
    the scored features (DeepStack levels, ...), indexed by patch like the features.
    """

    start: torch.Tensor
    length: int
    patch: torch.Tensor
    extras: Any = None


class TextLayers(nn.Module):
    """The decoder-side hooks a family may override (shared by prefill and decode modules)."""

    geo: Geometry

    def run_layer(
        self,
        i: int,
        layer: nn.Module,
        h: torch.Tensor,
        rope: Any,
        mask: Any,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder layer ``i`` on h (B, L, D) with ``rope`` (from ``rotary``) and ``mask`` (from the
        mask hooks): -> (h, key, value, probs). Default: a Llama-family pre-norm block."""
        cos, sin = rope
        return decoder_layer(layer, h, cos, sin, mask, self.geo.head_dim, past)


def forced_slots(span_patch: torch.Tensor, force: torch.Tensor, is_visual: torch.Tensor | None, k: int):
    """Slots of a span whose patch index is in ``force`` (plus every structural slot), ascending.

    span_patch: (B, n) patch index per slot, force: (B, keep) patch indices -> (B, k) slot positions.
    Only for the PyTorch modules' forced-selection mode (parity checks), never exported.
    """
    hit = (span_patch.unsqueeze(-1) == force.unsqueeze(1)).any(-1)  # (B, n)
    if is_visual is not None:
        hit = hit | ~is_visual
    return star.topk_sorted(hit.to(torch.float32), k)


class StarPrefill(TextLayers):
    """STAR-pruned prefill: (pixel_values, input_ids, attention_mask) -> logits, indices, presents.

    Outputs, in order (names in ``contract.prefill_contract``):
      logits (B, V) float32 at the last position, stage1_keep_idx (B, keep1),
      stage2_keep_idx (B, keep2), stage1_margin / stage2_margin (B,) float32 (the keep-th minus
      the next score), then present.{i}.key / present.{i}.value for every layer, then (families with
      ``slot_positions``) present_positions_l1 (B, L1) / present_positions_l2 (B, L2), int64.
    ``run`` is the same computation with the scores returned and an optional forced selection.
    """

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__()
        bind_text(self, model, geometry, cfg)
        self.fixed_offsets: tuple[int, ...] = ()  # structural tokens' offsets in the span (constants)
        self.slot_positions = carries_positions(geometry)

    # ---- family hooks: the image side ----------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F: (B, *pixel_shape) -> (B, N, d), the features stage 1 scores, in index order."""
        raise NotImplementedError

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(F, extras): the scored features and anything else the image yields for the layer hooks
        (``Span.extras``; DeepStack levels). Default: ``vision_features`` and None."""
        return self.vision_features(pixel_values), None

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """The projector on the kept features: (B, n, d) -> (B, n, D)."""
        raise NotImplementedError

    def span_offsets(self, keep1_idx: torch.Tensor) -> torch.Tensor:
        """Offset of each kept content token in the unpruned span (B, keep1); default its index."""
        return keep1_idx

    def structural_embed(self) -> torch.Tensor:
        """(D,) embedding of the span's structural tokens (only when ``geometry.n_fixed``)."""
        raise NotImplementedError

    def positions(
        self, attention_mask: torch.Tensor, p: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Original position ids of the L1 sequence (B, L1) and key validity (B, L1)."""
        return star.original_positions(attention_mask, p, offsets, self.geo.n_positions)

    def gather_positions(self, pos: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """The position ids of the stage-2 sequence: pos at the slots ``src`` (B, L2)."""
        return torch.gather(pos, 1, src)

    # ---- family hooks: the text side ----------------------------------------------------------
    def rotary(self, h: torch.Tensor, pos: torch.Tensor) -> Any:
        """What ``run_layer`` takes as ``rope`` for the sequence's positions; default (cos, sin)."""
        return self.rotary_emb(h, pos)

    def attention_masks(self, valid: torch.Tensor, pos: torch.Tensor, span: Span) -> Any:
        """What ``run_layer`` takes as ``mask``: default the causal + padding-key additive mask
        (B, 1, L, L) float32 (families with bidirectional image attention or windows override)."""
        return star.additive_mask(valid, torch.float32)

    def after_layer(self, i: int, h: torch.Tensor, span: Span) -> torch.Tensor:
        """h after decoder layer ``i`` (DeepStack injects visual features here); default unchanged."""
        return h

    # ---- the STAR data flow ---------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        keep_slots: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        keeps = self.keeps(keep_slots)
        logits, keep1_idx, keep2_idx, presents, scores1, scores2, span_patch, slot_pos = self._prefill(
            pixel_values, input_ids, attention_mask, keeps=keeps
        )
        margins = self.margins(scores1, scores2, span_patch, keeps)
        return (logits, keep1_idx, keep2_idx, *margins, *presents, *slot_pos)

    def keeps(self, keep_slots: torch.Tensor | None) -> tuple[Any, Any]:
        """(keep1, keep2): the level's constants, or (a keep range) keep2 = the length of
        ``keep_slots`` (B, keep2), whose values are never read, and keep1 by ``star.keep1_rule``.
        Exported, both are shape-derived scalars (Shape -> Gather [-> Mul -> Min]): TopK's K follows
        from the input shapes alone."""
        if self.cfg.keep_range is None:
            return self.cfg.keep1, self.cfg.keep2
        if keep_slots is None:
            raise ValueError("a keep-range prefill takes keep_slots [B, keep2]")
        keep2 = keep_slots.shape[1]
        return self.cfg.keep1_of(keep2), keep2

    def margins(self, scores1: torch.Tensor, scores2: torch.Tensor, span_patch: torch.Tensor, keeps=None):
        """How close each cut was: (B,) stage-1 and stage-2 score margins (``star.cut_margin``); stage 2
        over content tokens only (structural ones are never ranked)."""
        keep1, keep2 = keeps or (self.cfg.keep1, self.cfg.keep2)
        if self.geo.n_fixed:
            content = span_patch < self.geo.n_visual
            scores2 = torch.where(content, scores2, torch.full_like(scores2, float("-inf")))
        return star.cut_margin(scores1, keep1), star.cut_margin(scores2, keep2)

    def run(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        force1: torch.Tensor | None = None,
        force2: torch.Tensor | None = None,
        keep_slots: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The prefill; ``force1`` (B, keep1) / ``force2`` (B, keep2) patch indices replace the
        stage-1 / stage-2 choice (forced-selection parity; ``force2`` must lie in the stage-1 set).
        Returns logits, the kept indices, presents, and the float32 scores: ``stage1_scores``
        (B, N) and ``stage2_scores`` (B, N) by patch index (NaN where not a stage-1 token)."""
        keeps = self.keeps(keep_slots)
        logits, keep1, keep2, presents, scores1, scores2, span_patch, slot_pos = self._prefill(
            pixel_values, input_ids, attention_mask, force1, force2, keeps
        )
        margin1, margin2 = self.margins(scores1, scores2, span_patch, keeps)
        return {
            "logits": logits,
            "stage1_keep_idx": keep1,
            "stage2_keep_idx": keep2,
            "stage1_margin": margin1,
            "stage2_margin": margin2,
            "presents": presents,
            "stage1_scores": scores1,
            "stage2_scores": _by_patch(scores2, span_patch, self.geo.n_visual),
            **dict(zip(("present_positions_l1", "present_positions_l2"), slot_pos, strict=False)),
        }

    def _prefill(
        self, pixel_values, input_ids, attention_mask, force1=None, force2=None, keeps=None
    ) -> tuple:
        geo, cfg = self.geo, self.cfg
        keep1, keep2 = keeps or (cfg.keep1, cfg.keep2)  # ints, or SymInts of a keep range

        # ---- stage 1: score visual tokens by the self-attention they receive
        feats, extras = self.encode_image(pixel_values)  # (B, N, dv)
        scores1 = star.selection_scores(star.stage1_scores(feats), keep1, cfg.selection)  # (B, N)
        keep1_idx = star.topk_sorted(scores1, keep1) if force1 is None else force1  # (B, keep1)
        image_embeds = self.project(star.gather_rows(feats, keep1_idx))  # (B, keep1, D)
        offsets, is_visual, span_patch = self.span_offsets(keep1_idx), None, keep1_idx
        if geo.n_fixed:  # interleave the always-kept structural tokens: a span of keep1 + n_fixed
            image_embeds, offsets, order = star.merge_fixed(
                image_embeds, offsets, self.structural_embed(), self.fixed_offsets
            )
            is_visual = order < keep1  # (B, keep1 + R)
            no_patch = torch.full_like(keep1_idx[:, :1], geo.n_visual).expand(-1, geo.n_fixed)
            span_patch = torch.gather(torch.cat([keep1_idx, no_patch], dim=1), 1, order)  # N at structural
        span1 = geo.span(keep1)

        # ---- the L1 sequence: text before, the visual span, text after
        p = star.image_position(input_ids, geo.image_token_id)  # (B,)
        text_embeds = self.embed_tokens(input_ids)  # (B, T, D)
        h = star.splice(text_embeds, image_embeds.to(text_embeds.dtype), p)  # (B, L1, D)
        pos, valid = self.positions(attention_mask, p, offsets)  # (B, L1) (M-RoPE: (3, B, L1))
        slot_pos = [pos, pos]  # each cached slot's original position, L1 then L2 (slot_positions)
        span = Span(p, span1, span_patch, extras)
        mask = self.attention_masks(valid, pos, span)
        rope = self.rotary(h, pos)

        presents: list[torch.Tensor] = []
        keep2_idx = keep1_idx
        scores2: Any = None  # set at layer K-1 (K >= 1)
        selected = keep1_idx  # replaced at layer K-1 by the stage-2 choice, used from layer K on
        for i, layer in enumerate(self.layers):
            if i == cfg.layer:
                # ---- stage 2: prune by the attention text after the image paid at layer K-1
                src = star.stage2_layout(p, selected, span1, h.shape[1])  # (B, L2)
                h = star.gather_rows(h, src)  # (B, L2, D)
                pos = self.gather_positions(pos, src)
                slot_pos[1] = pos
                valid = torch.gather(valid, 1, src)
                span = Span(p, geo.span(keep2), torch.gather(span_patch, 1, selected), extras)
                mask = self.attention_masks(valid, pos, span)
                rope = self.rotary(h, pos)
            h, k, v, probs = self.run_layer(i, layer, h, rope, mask)
            presents += [k, v]
            if i == cfg.layer - 1:
                scores2 = star.stage2_scores(probs, p, span1)  # (B, span1)
                if cfg.selection == "inverted":
                    scores2 = -scores2
                k2 = keep2 + geo.n_fixed
                if force2 is None:
                    selected = star.stage2_select(scores2, is_visual, keep2, geo.n_fixed)  # (B, k2)
                else:
                    selected = forced_slots(span_patch, force2, is_visual, k2)
                keep2_idx = torch.gather(span_patch, 1, selected)  # patch indices (N at structural)
                if geo.n_fixed:  # drop the structural tokens' N: the keep2 smallest, ascending
                    smallest = torch.topk(keep2_idx.to(torch.float32), keep2, dim=-1, largest=False)
                    keep2_idx = smallest.values.to(torch.int64)  # exact: indices < 2**24
            h = self.after_layer(i, h, span)

        logits = self.lm_head(self.norm(h[:, -1])).to(torch.float32)  # (B, V)
        slot_pos = slot_pos if self.slot_positions else []
        return logits, keep1_idx, keep2_idx, presents, scores1, scores2, span_patch, slot_pos


def carries_positions(geometry: Geometry) -> bool:
    """``Family.slot_positions`` of the geometry's family (the contract reads the same flag)."""
    from star_export.contract import slot_positions

    return slot_positions(geometry)


def _by_patch(scores: torch.Tensor, span_patch: torch.Tensor, n: int) -> torch.Tensor:
    """Span-slot scores (B, span1) -> (B, N) by patch index, NaN where no stage-1 token sits."""
    out = torch.full((scores.shape[0], n + 1), float("nan"), dtype=torch.float32, device=scores.device)
    out.scatter_(1, span_patch, scores.to(torch.float32))
    return out[:, :n]


class StarDecode(TextLayers):
    """One decode step against per-layer pasts of different lengths (no further pruning).

    Inputs (names in ``contract.decode_contract``): input_ids (B, 1), position_ids (B, 1) the
    original position of the new token, attention_mask_l1 (B, P1 + 1) and attention_mask_l2
    (B, P2 + 1) (1 = attend: real/visual slots and the new token; 0 = padding), then
    past.{i}.key / past.{i}.value (B, Hkv, P_i, hd) with P_i = P1 for i < K, P2 for i >= K, then
    (families with ``slot_positions``) past_positions_l1 (B, P1) / past_positions_l2 (B, P2), each
    past slot's original position.
    Outputs: logits (B, V) float32, present.{i}.key / value (B, Hkv, P_i + 1, hd), then
    present_positions_l1 / _l2 (B, P_i + 1): the past positions with position_ids appended.
    """

    def __init__(self, model: nn.Module, geometry: Geometry, cfg: StarConfig):
        super().__init__()
        bind_text(self, model, geometry, cfg)

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """``rope`` of the new token's position (B, 1): default cos/sin (B, 1, hd) each."""
        return self.rotary_emb(h, position_ids)

    def decode_masks(
        self,
        mask_l1: torch.Tensor,
        mask_l2: torch.Tensor,
        position_ids: torch.Tensor,
        slot_pos: tuple[torch.Tensor, ...],
    ) -> tuple[Any, Any]:
        """The ``mask`` of layers < K and >= K from the 0/1 inputs: default additive (B, 1, 1, P + 1).
        ``slot_pos``: (B, P1 + 1) / (B, P2 + 1) original positions of the past slots and the new token
        (``slot_positions`` families; () otherwise)."""
        return star.decode_mask(mask_l1, torch.float32), star.decode_mask(mask_l2, torch.float32)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask_l1: torch.Tensor,
        attention_mask_l2: torch.Tensor,
        *pasts: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        caches = len(self.layers) * 2
        slot_pos = tuple(torch.cat([p, position_ids], dim=1) for p in pasts[caches:])  # (B, P_i + 1)
        h = self.embed_tokens(input_ids)  # (B, 1, D)
        rope = self.rotary(h, position_ids)
        masks = self.decode_masks(attention_mask_l1, attention_mask_l2, position_ids, slot_pos)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            mask = masks[0] if i < self.cfg.layer else masks[1]
            h, k, v, _ = self.run_layer(i, layer, h, rope, mask, (pasts[2 * i], pasts[2 * i + 1]))
            presents += [k, v]
        logits = self.lm_head(self.norm(h[:, -1])).to(torch.float32)  # (B, V)
        return (logits, *presents, *slot_pos)
