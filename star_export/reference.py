"""A readable, dynamic reference of STAR prefill, written from the semantics (docs/star.md) line by line.

It shares no code with ``star.py`` / ``rewrite.py``: each row is run alone with its padding
stripped, selections are Python sorts with the tie rule spelt out, and the decoder is run layer by
layer through transformers' own decoder layers (eager attention, probabilities captured with a
forward hook) with a ``DynamicCache`` for the presents. The image side comes from the family
(``Family.reference_image``: HF's own vision tower and projector; ``Family.full_positions``: the
unmodified model's position ids). Slow and not exportable on purpose: it is what the static
rewrite is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from star_export.families import Family
from star_export.families.base import RefSpan
from star_export.geometry import Geometry


@dataclass
class RowResult:
    logits: torch.Tensor  # (V,) float32
    stage1_keep_idx: list[int]
    stage2_keep_idx: list[int]
    presents: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (Hkv, S_i, hd)
    positions: torch.Tensor  # (A, L2) position ids of the L2 sequence
    stage1_scores: list[float]  # r1 of every candidate 0..N-1
    stage2_scores: dict[int, float]  # r2 of every stage-1 token, by patch index


def top_sorted(scores: list[float], k: int) -> list[int]:
    """k largest, ties to the lower index, returned in ascending index order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


@torch.no_grad()
def reference_row(
    model,
    family: Family,
    geo: Geometry,
    pixel_values: torch.Tensor,
    ids: list[int],
    keep1: int,
    keep2: int,
    layer_k: int,
    force1: list[int] | None = None,
    force2: list[int] | None = None,
) -> RowResult:
    """STAR prefill of ONE unpadded prompt (``pixel_values`` of one image, ``ids`` with one
    placeholder). ``force1`` / ``force2`` replace the stage-1 / stage-2 choice (patch indices)."""
    lm = model.model.language_model
    assert ids.count(geo.image_token_id) == 1, "exactly one image placeholder"
    p = ids.index(geo.image_token_id)

    # Stage 1: the family's features, attention received = column mean of the row softmax.
    image = family.reference_image(model, geo, pixel_values)
    n, dv = image.features.shape
    # The spec's formula in float32, with the exported graph's GEMM shape (1, N, dv) and its summation
    # order (each column summed as a contiguous row, then / N): equal scores stay equal, and fp32
    # rounding of near-equal ones (a uniform image) resolves as in the graph, not by another order.
    f32 = image.features.float()[None]
    attn = torch.softmax(f32 @ f32.transpose(1, 2) / math.sqrt(dv), dim=-1)[0]  # (N, N), rows sum to 1
    received = attn.T.contiguous().sum(dim=1) / n  # attention each token receives: column means
    r1 = received.tolist()
    keep_a = sorted(force1) if force1 is not None else top_sorted(r1, keep1)
    projected = dict(zip(keep_a, image.project(keep_a), strict=True))

    # The kept span: kept candidates and every structural token, in span order, at their offsets.
    kept = set(keep_a)
    slots = [(o, c) for o, c in enumerate(image.slots) if c is None or c in kept]  # (offset, candidate)
    span_embeds = torch.stack([image.structural if c is None else projected[c] for _, c in slots])

    # The L1 sequence and its original position ids (the unmodified model's, kept columns picked).
    emb = lm.embed_tokens(torch.tensor(ids))
    h = torch.cat([emb[:p], span_embeds.to(emb.dtype), emb[p + 1 :]])[None]
    span1, n_span = len(slots), len(image.slots)
    full = family.full_positions(model, geo, pixel_values, ids)  # (A, T - 1 + n_span)
    columns = list(range(p)) + [p + o for o, _ in slots] + list(range(p + n_span, full.shape[1]))
    pos = full[:, columns]  # (A, L1)

    captured: dict[str, torch.Tensor] = {}

    def grab(_module, _args, output):
        captured["probs"] = output[1]

    cache = DynamicCache(config=lm.config)
    keep_b, r2 = keep_a, {}
    span = RefSpan(p, slots, image.extras)
    for i, layer in enumerate(lm.layers):
        length = h.shape[1]
        handle = layer.self_attn.register_forward_hook(grab) if i == layer_k - 1 else None
        h = family.reference_layer(model, geo, i, layer, h, pos, cache, span)
        if handle is not None:
            handle.remove()
            probs = captured["probs"][0].float()  # (H, L1, L1)
            # attention the rows after the image pay each span column, averaged over heads and rows;
            # summed like the graph (rows before the image weighted 0, each column a contiguous row)
            rows = (torch.arange(length) >= p + span1).float()  # (L1,)
            cols = probs[:, :, p : p + span1] * rows[None, :, None]  # (H, L1, span1)
            total = cols.permute(2, 0, 1).contiguous().reshape(span1, -1).sum(dim=1)  # (span1,)
            col = (total / (rows.sum() * probs.shape[0])).tolist()
            content = [j for j, (_, c) in enumerate(slots) if c is not None]  # structural always stay
            r2 = {slots[j][1]: col[j] for j in content}
            if force2 is None:
                chosen = {slots[content[j]][1] for j in top_sorted([col[j] for j in content], keep2)}
            else:
                chosen = set(force2)
            sel = [j for j, (_, c) in enumerate(slots) if c is None or c in chosen]
            keep_b = [slots[j][1] for j in sel if slots[j][1] is not None]
            seq = list(range(p)) + [p + j for j in sel] + list(range(p + span1, length))
            h = h[:, seq]
            pos = pos[:, seq]
            span = RefSpan(p, [slots[j] for j in sel], image.extras)

    logits = model.lm_head(lm.norm(h[:, -1]))[0].float()
    presents = [(cache.layers[i].keys[0], cache.layers[i].values[0]) for i in range(len(lm.layers))]
    return RowResult(logits, keep_a, sorted(keep_b), presents, pos, r1, r2)


def reference_batch(
    model,
    family: Family,
    geo: Geometry,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep1: int,
    keep2: int,
    layer_k: int,
    force1=None,
    force2=None,
) -> list[RowResult]:
    """Each row alone, its left padding stripped (the spec: a padded row equals the row alone).
    ``force1`` / ``force2``: per-row patch indices (B, keep) to force, or None."""
    return [
        reference_row(
            model,
            family,
            geo,
            pixel_values[b],
            [int(t) for t, m in zip(input_ids[b], attention_mask[b], strict=True) if m],
            keep1,
            keep2,
            layer_k,
            None if force1 is None else [int(x) for x in force1[b]],
            None if force2 is None else [int(x) for x in force2[b]],
        )
        for b in range(input_ids.shape[0])
    ]
