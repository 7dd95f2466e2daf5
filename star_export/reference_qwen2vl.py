"""A readable, dynamic reference of STAR prefill for Qwen2-VL, written from the semantics in
``qwen2vl.py``'s docstring (which extend STAR_SPEC.md).

It shares no code with ``qwen2vl.py`` / ``star.py`` / ``rewrite.py``: each row runs alone with its
padding stripped; the vision tower is HF's own ``model.model.visual`` on the single image with
its ``grid_thw``; the 3-D positions come from HF's ``get_rope_index`` on the prompt with the
placeholder expanded (the columns of the kept tokens are then picked); selections are Python
sorts with the tie rule spelt out; the decoder runs layer by layer through HF's own
``Qwen2VLDecoderLayer`` (eager attention, probabilities captured with a forward hook) with a
``DynamicCache`` for the presents. Slow and not exportable on purpose.
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
    positions: torch.Tensor  # (3, L2) M-RoPE ids of the L2 sequence


def _top_sorted(scores: list[float], k: int) -> list[int]:
    """k largest, ties to the lower index, returned in ascending index order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


def image_grid_thw(model, pixel_values_row: torch.Tensor) -> torch.Tensor:
    """[[1, gh, gw]] of a square image given as its (gh * gw, patch_dim) pixel rows."""
    side = math.isqrt(pixel_values_row.shape[0])
    assert side * side == pixel_values_row.shape[0], "square images only"
    return torch.tensor([[1, side, side]])


def expand_prompt(model, pixel_values_row: torch.Tensor, ids: list[int]) -> tuple[list[int], list[int], int]:
    """The prompt with its placeholder expanded to N copies, its mm_token_type_ids, and N."""
    cfg = model.config
    _, gh, gw = image_grid_thw(model, pixel_values_row)[0].tolist()
    m = cfg.vision_config.spatial_merge_size
    n = (gh // m) * (gw // m)
    p = ids.index(cfg.image_token_id)
    expanded = ids[:p] + [cfg.image_token_id] * n + ids[p + 1 :]
    types = [0] * p + [1] * n + [0] * (len(ids) - p - 1)
    return expanded, types, n


@torch.no_grad()
def reference_row(
    model, pixel_values_row: torch.Tensor, ids: list[int], keep1: int, keep2: int, layer_k: int
) -> RowResult:
    """STAR prefill of ONE unpadded prompt. pixel_values_row: (gh * gw, patch_dim); ids: one placeholder."""
    cfg = model.config
    lm = model.model.language_model
    visual = model.model.visual
    assert ids.count(cfg.image_token_id) == 1, "exactly one image placeholder"
    p = ids.index(cfg.image_token_id)
    grid = image_grid_thw(model, pixel_values_row)
    m2 = cfg.vision_config.spatial_merge_size**2

    # Stage 1: F = the merger's input (last vision block output, before ln_q), per merged token.
    out = visual(pixel_values_row.to(visual.dtype), grid_thw=grid)
    patches = out.last_hidden_state  # (gh * gw, dv), processor order: m*m consecutive rows per token
    feats = patches.reshape(patches.shape[0] // m2, -1)  # (N, m*m*dv)
    n, d = feats.shape
    f32 = feats.float()
    attn = torch.softmax(f32 @ f32.T / math.sqrt(d), dim=-1)
    r1 = [attn[:, j].mean().item() for j in range(n)]  # column mean: attention received
    keep_a = _top_sorted(r1, keep1)
    rows_of_kept = [r for j in keep_a for r in range(j * m2, (j + 1) * m2)]
    image_embeds = visual.merger(patches[rows_of_kept])  # (keep1, D): HF's merger on the kept patches

    # Original 3-D positions: HF's get_rope_index on the expanded prompt, kept columns picked.
    expanded, types, n_check = expand_prompt(model, pixel_values_row, ids)
    assert n_check == n
    pos_full, _ = model.model.get_rope_index(
        torch.tensor([expanded]), mm_token_type_ids=torch.tensor([types]), image_grid_thw=grid
    )  # (3, 1, T - 1 + N)
    slots = list(range(p)) + [p + j for j in keep_a] + list(range(p + n, len(expanded)))
    pos = pos_full[:, 0, slots]  # (3, L1)

    emb = lm.embed_tokens(torch.tensor(ids))
    h = torch.cat([emb[:p], image_embeds.to(emb.dtype), emb[p + 1 :]])[None]

    captured: dict[str, torch.Tensor] = {}

    def grab(_module, _args, output):
        captured["probs"] = output[1]

    cache = DynamicCache(config=lm.config)
    keep_b = keep_a
    for i, layer in enumerate(lm.layers):
        length = h.shape[1]
        causal = torch.full((length, length), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]
        cos_sin = lm.rotary_emb(h, pos[:, None, :])
        handle = layer.self_attn.register_forward_hook(grab) if i == layer_k - 1 else None
        h = layer(h, attention_mask=causal, cache=cache, use_cache=True, position_embeddings=cos_sin)
        if isinstance(h, tuple):
            h = h[0]
        if handle is not None:
            handle.remove()
            probs = captured["probs"][0].float()  # (H, L1, L1)
            after = probs[:, p + keep1 :, p : p + keep1]  # rows after the image, visual columns
            r2 = after.mean(dim=(0, 1)).tolist()
            sel = _top_sorted(r2, keep2)
            keep_b = [keep_a[j] for j in sel]
            keep_slots = list(range(p)) + [p + j for j in sel] + list(range(p + keep1, length))
            h = h[:, keep_slots]
            pos = pos[:, keep_slots]

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
    """Each row alone, its left padding stripped (a padded row equals the row alone)."""
    from star_export import reference

    return reference.reference_batch(
        model, pixel_values, input_ids, attention_mask, keep1, keep2, layer_k, row=reference_row
    )


@torch.no_grad()
def hf_unpruned_logits(model, pixel_values_row: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Last-position logits of the UNMODIFIED Qwen2VLForConditionalGeneration on the expanded prompt.

    The placeholder is expanded to N copies with ``image_grid_thw`` and ``mm_token_type_ids`` as
    the processor would give them; HF computes its own M-RoPE positions (explicit all-ones mask).
    """
    expanded, types, _ = expand_prompt(model, pixel_values_row, ids)
    input_ids = torch.tensor([expanded])
    model.model.rope_deltas = None  # no stale state from an earlier generate
    out = model(
        pixel_values=pixel_values_row,
        image_grid_thw=image_grid_thw(model, pixel_values_row),
        input_ids=input_ids,
        mm_token_type_ids=torch.tensor([types]),
        attention_mask=torch.ones_like(input_ids),
        logits_to_keep=1,
    )
    return out.logits[0, -1].float()
