"""The analytical cost model: hand-computed numbers, and torch's FLOP counter on the real modules."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from star_export import cost
from star_export.families.llava import LlavaPrefill as StarPrefill
from star_export.rewrite import StarDecode
from star_export.star import StarConfig
from star_export.validate import make_inputs

# A model small enough to count by hand: 28 px / patch 14 -> 2x2 = 4 patches (N = 4, 5 tower
# tokens with CLS), vision width 8, MLP 16, 3 layers (hidden state -2 needs 2), 2 heads; decoder
# width 16, MLP 32, 3 layers, 4 query heads of 4 sharing 2 KV heads, vocab 10.
HAND = cost.ModelDims(
    image_size=28,
    patch_size=14,
    channels=3,
    vision_hidden=8,
    vision_intermediate=16,
    vision_layers=3,
    vision_heads=2,
    vision_feature_layer=-2,
    select_strategy="default",
    hidden=16,
    intermediate=32,
    layers=3,
    heads=4,
    kv_heads=2,
    head_dim=4,
    vocab=10,
)
HAND_CFG = StarConfig(keep2=1, keep1=2, layer=1)  # T = 3 text tokens: L1 = 4, L2 = 3


def test_hand_computed_matmul_flops():
    c = cost.prefill_cost(HAND, HAND_CFG, text_len=3, batch=1)
    items = {i.name: i for i in c.items}
    assert (c.l1, c.l2) == (4, 3)
    # patch conv: 4 patches x 8 channels out, each 3 * 14 * 14 MACs
    assert items["vision.patch_embed"].matmul_flops == 2 * 4 * 8 * 3 * 14 * 14 == 37632
    # one vision layer over 5 tokens: q/k/v/o 4 * 2*5*8*8 = 2560; q k^T + weighted sum
    # 2 * 2*25*8 = 800; fc1 + fc2 2 * 2*5*8*16 = 2560; two layers are needed (hidden state -2)
    assert items["vision.layers"].count == 2
    assert items["vision.layers"].matmul_flops == 2 * (2560 + 800 + 2560) == 11840
    # stage 1: F F^T over N = 4 tokens of width 8
    assert items["star.stage1"].matmul_flops == 2 * 4 * 4 * 8 == 256
    # projector on keep1 = 2 tokens: 8 -> 16 -> 16
    assert items["projector"].matmul_flops == 2 * 2 * 8 * 16 + 2 * 2 * 16 * 16 == 1536
    # decoder layer at L tokens: q, o 2 * 2*L*16*16; k, v (2 KV heads of 4) 2 * 2*L*16*8;
    # q k^T + weighted sum 2 * 2*4*L*L*4; gate, up, down 3 * 2*L*16*32  ->  4608 L + 64 L^2
    assert items["decoder.layer.0"].matmul_flops == 4608 * 4 + 64 * 16 == 19456  # L1 = 4
    assert items["decoder.layer.1"].matmul_flops == items["decoder.layer.2"].matmul_flops == 4608 * 3 + 64 * 9
    # stage 2: a (1, L1) @ (L1, L1) row mean
    assert items["star.stage2"].matmul_flops == 2 * 4 * 4 == 32
    assert items["lm_head"].matmul_flops == 2 * 16 * 10 == 320
    assert c.matmul_flops == 37632 + 11840 + 256 + 1536 + 19456 + 2 * 14400 + 32 + 320 == 99872


def test_hand_computed_other_flops_and_kv():
    c = cost.prefill_cost(HAND, HAND_CFG, text_len=3, batch=1)
    items = {i.name: i for i in c.items}
    # the tie rule compares all n^2 pairs (6 ops each) + 2 n for the keys
    assert cost.topk_sorted_flops(4) == 6 * 16 + 8
    # stage 1 other: scale + softmax (5) + column mean over 4 x 4, plus the ranking of 4
    assert items["star.stage1"].other_flops == 16 * 7 + 104
    # stage 2 other: head mean over 4 heads x 4 x 4, row weights 2 * 4, ranking of keep1 = 2
    assert items["star.stage2"].other_flops == 4 * 16 + 8 + (6 * 4 + 4)
    # KV: K and V, 2 KV heads x 4 dims x 4 bytes per slot: 64 bytes/slot; layer 0 L1 = 4, then L2 = 3
    assert c.kv_bytes_per_layer == (256, 192, 192)
    assert cost.kv_bytes(HAND, 4, batch=2, dtype="float16") == 2 * 2 * 2 * 4 * 4 * 2


def test_batch_scales_linearly_and_json():
    one = cost.prefill_cost(HAND, HAND_CFG, 3, 1)
    three = cost.prefill_cost(HAND, HAND_CFG, 3, 3)
    assert three.flops == 3 * one.flops and three.kv_bytes == 3 * one.kv_bytes
    d = json.loads(json.dumps(three.to_dict()))
    assert d["flops"] == three.flops and d["l1"] == 4 and len(d["items"]) == len(three.items)
    assert set(d["group_flops"]) == {"vision", "star", "projector", "decoder", "lm_head"}


def test_ceiling_and_kv_saved():
    full = cost.unpruned(HAND_CFG, HAND.n_visual)
    assert cost.speedup_ceiling(HAND, full, 3) == pytest.approx(1.0)
    c = cost.ceiling(HAND, HAND_CFG, 3)
    assert c.speedup_ceiling == pytest.approx(c.flops_unpruned / c.flops_pruned) and c.speedup_ceiling > 1
    # unpruned: 3 layers x (T - 1 + N = 6 slots) x 64 bytes; pruned: 4 + 3 + 3 slots
    assert (c.kv_bytes_unpruned, c.kv_bytes_pruned, c.kv_bytes_saved) == (3 * 6 * 64, 10 * 64, 8 * 64)
    json.dumps(c.to_dict())


def test_ceiling_grows_as_keep_shrinks(recipe):
    dims = cost.ModelDims.from_config(recipe.config)
    ceilings = [
        cost.speedup_ceiling(dims, StarConfig(keep2=k, keep1=min(576, 2 * k), layer=2), 48)
        for k in (32, 64, 192, 576)
    ]
    assert ceilings == sorted(ceilings, reverse=True) and ceilings[-1] == pytest.approx(1.0)


def test_from_config_dict_equals_llava_config(gqa):
    from_model = cost.ModelDims.from_config(gqa.model.config)
    from_dict = cost.ModelDims.from_config(json.loads((gqa.model_dir / "config.json").read_text()))
    assert from_model == from_dict
    assert from_model.kv_heads == 2 and from_model.vision_layers_needed == from_model.vision_layers - 1


def test_invalid_config_rejected():
    with pytest.raises(ValueError):
        cost.prefill_cost(HAND, StarConfig(keep2=3, keep1=2, layer=1), 3)
    with pytest.raises(ValueError):
        cost.prefill_cost(HAND, StarConfig(keep2=1, keep1=2, layer=3), 3)


# ------------------------------------------------------------------ against torch's FLOP counter


def _count(module, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("which", ["mha", "gqa"])
@pytest.mark.parametrize("keep", [16, 576])
def test_prefill_matches_flop_counter(request, which, keep):
    """FlopCounterMode on the real StarPrefill (which runs every vision layer in eager PyTorch)."""
    loaded = request.getfixturevalue(which)
    geo = loaded.geometry
    cfg = StarConfig.resolve(keep=keep, keep1=None, layer=2, n_visual=geo.n_visual, num_layers=geo.num_layers)
    feeds = make_inputs(geo, batch=2, text_len=12, pad=0)
    counted = _count(
        loaded.family.prefill_module(loaded.model, geo, cfg).eval(),
        *(torch.from_numpy(v) for v in feeds.values()),
    )
    predicted = cost.prefill_cost(loaded.model, cfg, text_len=12, batch=2, all_vision_layers=True)
    assert counted == pytest.approx(predicted.matmul_flops, rel=0.02)
    # matrix products dominate the model's FLOPs in this convention
    assert predicted.matmul_flops > 0.9 * predicted.flops


def test_hf_model_matches_flop_counter(gqa):
    """The unmodified model on the expanded prompt = the unpruned cost without STAR scoring."""
    model, geo = gqa.model, gqa.geometry
    feeds = make_inputs(geo, batch=1, text_len=12, pad=0)
    ids = feeds["input_ids"][0].tolist()
    p = ids.index(geo.image_token_id)
    expanded = torch.tensor([ids[:p] + [geo.image_token_id] * geo.n_visual + ids[p + 1 :]])
    counted = _count(
        lambda: model(
            pixel_values=torch.from_numpy(feeds["pixel_values"]),
            input_ids=expanded,
            attention_mask=torch.ones_like(expanded),
            position_ids=torch.arange(expanded.shape[1])[None],
            logits_to_keep=1,
        )
    )
    full = cost.unpruned(StarConfig(keep2=64, keep1=128, layer=2), geo.n_visual)
    predicted = cost.prefill_cost(model, full, 12, 1, scoring=False, all_vision_layers=True)
    assert counted == pytest.approx(predicted.matmul_flops, rel=0.02)


def test_needed_vision_layers_are_fewer(gqa):
    dims = cost.ModelDims.from_config(gqa.model.config)
    cfg = StarConfig(keep2=64, keep1=128, layer=2)
    needed = cost.prefill_cost(dims, cfg, 12)
    every = cost.prefill_cost(dims, cfg, 12, all_vision_layers=True)
    one_layer = sum(cost.vision_layer_flops(dims))
    assert every.flops - needed.flops == one_layer  # vision_feature_layer = -2 skips the last layer


def test_decode_step_matches_flop_counter(gqa):
    model, geo = gqa.model, gqa.geometry
    cfg = StarConfig(keep2=64, keep1=128, layer=2)
    text_len, batch = 12, 2
    p1, p2 = text_len - 1 + cfg.keep1, text_len - 1 + cfg.keep2
    pasts = []
    for i in range(geo.num_layers):
        slots = p1 if i < cfg.layer else p2
        pasts += [torch.zeros(batch, geo.num_kv_heads, slots, geo.head_dim)] * 2
    args = (
        torch.ones(batch, 1, dtype=torch.int64),
        torch.full((batch, 1), 600, dtype=torch.int64),
        torch.ones(batch, p1 + 1, dtype=torch.int64),
        torch.ones(batch, p2 + 1, dtype=torch.int64),
        *pasts,
    )
    counted = _count(StarDecode(model, geo, cfg).eval(), *args)
    predicted = cost.decode_step_cost(model, cfg, text_len, batch)
    assert counted == pytest.approx(predicted.matmul_flops, rel=0.02)
    assert predicted.kv_bytes == sum(p.nbytes for p in pasts)


def test_kv_bytes_match_the_presents(gqa):
    model, geo = gqa.model, gqa.geometry
    cfg = StarConfig(keep2=16, keep1=32, layer=2)
    feeds = make_inputs(geo, batch=2, text_len=12, pad=0)
    with torch.no_grad():
        outs = StarPrefill(model, geo, cfg).eval()(*(torch.from_numpy(v) for v in feeds.values()))
    presents = outs[5:]
    measured = [presents[2 * i].nbytes + presents[2 * i + 1].nbytes for i in range(geo.num_layers)]
    assert tuple(measured) == cost.prefill_cost(model, cfg, 12, 2).kv_bytes_per_layer


def test_format_flops():
    assert cost.format_flops(1.5e9) == "1.5 GFLOP"
    assert cost.format_flops(0) == "0 FLOP"
