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


def _grid_px(cfg, n_tiles: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The anyres resolution (H, W) of the export's tile grid; without ``grid``, the first pinpoint
    with ``n_tiles`` tiles (ambiguous for 1xC vs Cx1 grids: validation passes the grid)."""
    size = cfg.vision_config.image_size
    if grid is not None:
        return grid[0] * size, grid[1] * size
    return next((h, w) for h, w in cfg.image_grid_pinpoints if (h // size) * (w // size) == n_tiles)


def _visual_span(model, pixel_values: torch.Tensor, grid: tuple[int, int] | None = None):
    """One image's stage-1 candidates and its unpruned visual span, in transformers' own order.

    -> F (N, dv) the candidates' features, and ``span``: for each slot of the unpruned span the
    candidate number (0..N-1, in order of appearance) or None for a LLaVA-NeXT row newline.
    LLaVA-NeXT's order is taken from LlavaNext's own ``pack_image_features`` run on an index
    image (the fixed grid: image_sizes = the grid's resolution, so nothing is unpadded).
    """
    cfg = model.config
    tiles = pixel_values if cfg.model_type == "llava_next" else pixel_values[None]
    vis = model.model.vision_tower(tiles, output_hidden_states=True)
    feats = vis.hidden_states[cfg.vision_feature_layer]  # (tiles, 1 + n, dv)
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    flat = feats.reshape(-1, feats.shape[-1])  # tile-major
    if cfg.model_type != "llava_next":
        return flat, list(range(flat.shape[0]))
    grid_px = _grid_px(cfg, tiles.shape[0] - 1, grid)
    index_image = torch.arange(flat.shape[0], dtype=torch.float32).view(tiles.shape[0], -1, 1)
    packed, _ = model.model.pack_image_features(
        [index_image], torch.tensor([grid_px]), "default", image_newline=torch.tensor([-1.0])
    )
    order = [int(v) for v in packed[0][:, 0].tolist()]  # tile-major feature id, -1 at newlines
    cands = [i for i in order if i >= 0]
    number = {fid: j for j, fid in enumerate(cands)}
    return flat[cands], [number[i] if i >= 0 else None for i in order]


def _top_sorted(scores: list[float], k: int) -> list[int]:
    """k largest, ties to the lower index, returned in ascending index order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


@torch.no_grad()
def reference_row(
    model,
    pixel_values: torch.Tensor,
    ids: list[int],
    keep1: int,
    keep2: int,
    layer_k: int,
    grid: tuple[int, int] | None = None,
) -> RowResult:
    """STAR prefill of ONE unpadded prompt. pixel_values: (3, H, W) (LLaVA-NeXT: (1 + R*C, 3, S, S)
    with ``grid`` = (R, C)); ids: token ids, one placeholder."""
    cfg = model.config
    lm = model.model.language_model
    image_token = cfg.image_token_id
    assert ids.count(image_token) == 1, "exactly one image placeholder"
    p = ids.index(image_token)

    # Stage 1: F from the selected vision layer, CLS dropped (NeXT: every tile, in span order).
    feats, span = _visual_span(model, pixel_values, grid)
    n, dv = feats.shape
    f32 = feats.float()
    attn = torch.softmax(f32 @ f32.T / math.sqrt(dv), dim=-1)
    r1 = [attn[:, j].mean().item() for j in range(n)]  # column mean: attention received
    keep_a = _top_sorted(r1, keep1)
    projected = dict(zip(keep_a, model.model.multi_modal_projector(feats[keep_a][None])[0], strict=True))

    # The kept span: kept candidates and every newline, in span order, at their span offsets.
    kept = set(keep_a)
    slots = [(o, c) for o, c in enumerate(span) if c is None or c in kept]  # (offset, candidate)
    newline = getattr(model.model, "image_newline", None)
    image_embeds = torch.stack([newline if c is None else projected[c] for _, c in slots])

    # The L1 sequence and its original position ids.
    emb = lm.embed_tokens(torch.tensor(ids))
    h = torch.cat([emb[:p], image_embeds.to(emb.dtype), emb[p + 1 :]])[None]
    span1 = len(slots)
    pos = list(range(p)) + [p + o for o, _ in slots] + [p + len(span) + t for t in range(len(ids) - p - 1)]

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
            after = probs[:, p + span1 :, p : p + span1]  # rows after the image, visual columns
            r2 = after.mean(dim=(0, 1)).tolist()
            visual = [j for j, (_, c) in enumerate(slots) if c is not None]  # newlines always stay
            best = _top_sorted([r2[j] for j in visual], keep2)
            sel = sorted({visual[j] for j in best} | {j for j, (_, c) in enumerate(slots) if c is None})
            keep_b = [slots[j][1] for j in sel if slots[j][1] is not None]
            seq = list(range(p)) + [p + j for j in sel] + list(range(p + span1, length))
            h = h[:, seq]
            pos = [pos[s] for s in seq]

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
    row=None,
    **row_kwargs,
) -> list[RowResult]:
    """Each row alone, its left padding stripped (the spec: a padded row equals the row alone).

    ``row``: the per-row reference (default ``reference_row``; Qwen2-VL passes its own), called
    with ``row_kwargs`` (LLaVA-NeXT: ``grid``)."""
    row = row or reference_row
    return [
        row(
            model,
            pixel_values[b],
            [int(t) for t, m in zip(input_ids[b], attention_mask[b], strict=True) if m],
            keep1,
            keep2,
            layer_k,
            **row_kwargs,
        )
        for b in range(input_ids.shape[0])
    ]


def hf_image_inputs(
    model, pixel_values: torch.Tensor, grid: tuple[int, int] | None = None
) -> tuple[int, dict[str, torch.Tensor]]:
    """The unmodified model's visual-span length for one image and its extra inputs (NeXT: image_sizes)."""
    _, span = _visual_span(model, pixel_values, grid)
    cfg = model.config
    if cfg.model_type != "llava_next":
        return len(span), {}
    return len(span), {"image_sizes": torch.tensor([_grid_px(cfg, pixel_values.shape[0] - 1, grid)])}


@torch.no_grad()
def hf_unpruned_logits(
    model, pixel_values: torch.Tensor, ids: list[int], grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Last-position logits of the UNMODIFIED model (LLaVA / LLaVA-NeXT) on the expanded prompt.

    The placeholder is expanded to the span's length, as transformers expects; explicit mask and
    positions.
    """
    cfg = model.config
    p = ids.index(cfg.image_token_id)
    n, extra = hf_image_inputs(model, pixel_values, grid)
    expanded = ids[:p] + [cfg.image_token_id] * n + ids[p + 1 :]
    input_ids = torch.tensor([expanded])
    out = model(
        **extra,
        pixel_values=pixel_values[None],
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        position_ids=torch.arange(len(expanded))[None],
        logits_to_keep=1,
    )
    return out.logits[0, -1].float()
