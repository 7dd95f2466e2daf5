"""A readable, dynamic reference of STAR prefill, written from STAR_SPEC.md line by line.

It shares no code with ``star.py`` / ``rewrite.py``: each row is run alone with its padding
stripped, selections are Python sorts with the tie rule spelt out, and the decoder is run
layer by layer through transformers' own ``LlamaDecoderLayer`` (eager attention, whose
probabilities are captured with a forward hook) with a ``DynamicCache`` for the presents.
It is slow and not exportable on purpose: it is what the static rewrite is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class RowResult:
    logits: torch.Tensor  # (V,) float32
    stage1_keep_idx: list[int]
    stage2_keep_idx: list[int]
    presents: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (Hkv, S_i, hd)
    positions: list[int]  # position ids of the L2 sequence


def _top_sorted(scores: list[float], k: int) -> list[int]:
    """k largest, ties to the lower index, returned in ascending index order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


@torch.no_grad()
def reference_row(
    model, pixel_values: torch.Tensor, ids: list[int], keep1: int, keep2: int, layer_k: int
) -> RowResult:
    """STAR prefill of ONE unpadded prompt. pixel_values: (3, H, W); ids: token ids, one placeholder."""
    cfg = model.config
    lm = model.model.language_model
    image_token = cfg.image_token_id
    assert ids.count(image_token) == 1, "exactly one image placeholder"
    p = ids.index(image_token)

    # Stage 1: F from the selected vision layer, CLS dropped.
    vis = model.model.vision_tower(pixel_values[None], output_hidden_states=True)
    feats = vis.hidden_states[cfg.vision_feature_layer][0]
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[1:]
    n, dv = feats.shape
    f32 = feats.float()
    attn = torch.softmax(f32 @ f32.T / math.sqrt(dv), dim=-1)
    r1 = [attn[:, j].mean().item() for j in range(n)]  # column mean: attention received
    keep_a = _top_sorted(r1, keep1)
    image_embeds = model.model.multi_modal_projector(feats[keep_a][None])[0]

    # The L1 sequence and its original position ids.
    emb = lm.embed_tokens(torch.tensor(ids))
    h = torch.cat([emb[:p], image_embeds.to(emb.dtype), emb[p + 1 :]])[None]
    pos = list(range(p)) + [p + j for j in keep_a] + [p + n + t for t in range(len(ids) - p - 1)]

    captured: dict[str, torch.Tensor] = {}

    def grab(_module, _args, output):
        captured["probs"] = output[1]

    cache = DynamicCache(config=lm.config)
    keep_b = keep_a
    for i, layer in enumerate(lm.layers):
        length = h.shape[1]
        causal = torch.full((length, length), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]
        pos_t = torch.tensor([pos])
        cos_sin = lm.rotary_emb(h, pos_t)
        if i == layer_k - 1:
            handle = layer.self_attn.register_forward_hook(grab)
        h = layer(
            h,
            attention_mask=causal,
            position_ids=pos_t,
            cache=cache,
            use_cache=True,
            position_embeddings=cos_sin,
        )
        if isinstance(h, tuple):
            h = h[0]
        if i == layer_k - 1:
            handle.remove()
            probs = captured["probs"][0].float()  # (H, L1, L1)
            after = probs[:, p + keep1 :, p : p + keep1]  # rows after the image, visual columns
            r2 = after.mean(dim=(0, 1)).tolist()
            sel = _top_sorted(r2, keep2)
            keep_b = [keep_a[j] for j in sel]
            slots = list(range(p)) + [p + j for j in sel] + list(range(p + keep1, length))
            h = h[:, slots]
            pos = [pos[s] for s in slots]

    logits = model.lm_head(lm.norm(h[:, -1]))[0].float()
    presents = [(cache.layers[i].keys[0], cache.layers[i].values[0]) for i in range(len(lm.layers))]
    return RowResult(logits, keep_a, keep_b, presents, pos)


def reference_batch(
    model,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep1: int,
    keep2: int,
    layer_k: int,
) -> list[RowResult]:
    """Each row alone, its left padding stripped (the spec: a padded row equals the row alone)."""
    rows = []
    for b in range(input_ids.shape[0]):
        ids = [int(t) for t, m in zip(input_ids[b], attention_mask[b], strict=True) if m]
        rows.append(reference_row(model, pixel_values[b], ids, keep1, keep2, layer_k))
    return rows


@torch.no_grad()
def hf_unpruned_logits(model, pixel_values: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Last-position logits of the UNMODIFIED LlavaForConditionalGeneration on the expanded prompt.

    The placeholder is expanded to N copies, as transformers expects; explicit mask and positions.
    """
    cfg = model.config
    p = ids.index(cfg.image_token_id)
    n = cfg.image_seq_length
    expanded = ids[:p] + [cfg.image_token_id] * n + ids[p + 1 :]
    input_ids = torch.tensor([expanded])
    out = model(
        pixel_values=pixel_values[None],
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        position_ids=torch.arange(len(expanded))[None],
        logits_to_keep=1,
    )
    return out.logits[0, -1].float()
