"""Unit tests of the STAR math against the spec's formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from star_export import star
from star_export.errors import UsageError
from star_export.star import StarConfig


def python_rule(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k])


def test_topk_sorted_breaks_ties_to_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    assert star.topk_sorted(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert star.topk_sorted(scores, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]


@pytest.mark.parametrize("k", [1, 7, 50, 64])
def test_topk_sorted_matches_the_python_rule_with_many_ties(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 6, (3, 64), generator=g).float()  # heavy ties
    got = star.topk_sorted(scores, k)
    for b in range(3):
        assert got[b].tolist() == python_rule(scores[b].tolist(), k)


def test_stage1_scores_are_column_means_of_a_float32_softmax():
    f = torch.randn(2, 9, 5, dtype=torch.float64)
    r1 = star.stage1_scores(f)
    assert r1.dtype == torch.float32
    for b in range(2):
        a = torch.softmax(f[b] @ f[b].T / math.sqrt(5), dim=-1)
        assert torch.allclose(r1[b].double(), a.mean(dim=0), atol=1e-6)
    assert torch.allclose(r1.sum(-1), torch.ones(2))  # columns of a row-stochastic matrix


def test_splice_and_original_positions_follow_the_spec():
    n_visual = 10
    ids = torch.tensor([[0, 0, 5, 9, 7, 6], [4, 5, 6, 9, 7, 8]])  # row 0: 2 pads, placeholder 9
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    p = star.image_position(ids, 9)
    assert p.tolist() == [3, 3]
    keep = torch.tensor([[1, 4, 8], [0, 2, 9]])
    spliced = star.splice(ids, keep + 100, p)
    assert spliced.tolist() == [[0, 0, 5, 101, 104, 108, 7, 6], [4, 5, 6, 100, 102, 109, 7, 8]]
    pos, valid = star.original_positions(mask, p, keep, n_visual)
    # row 0: s = 1 real token before the image; text after: s + N + (t - p - 1)
    assert pos[0, 2:].tolist() == [0, 1 + 1, 1 + 4, 1 + 8, 1 + 10 + 0, 1 + 10 + 1]
    assert pos[1].tolist() == [0, 1, 2, 3, 5, 12, 13, 14]
    assert valid.tolist() == [[False, False] + [True] * 6, [True] * 8]


def test_additive_mask_is_causal_and_masks_padding_keys():
    valid = torch.tensor([[False, True, True]])
    m = star.additive_mask(valid, torch.float32)[0, 0]
    neg = torch.finfo(torch.float32).min
    assert m.tolist() == [[neg, neg, neg], [neg, 0.0, neg], [neg, 0.0, 0.0]]


def test_stage2_scores_average_heads_and_rows_after_the_image():
    b, h, length, keep1 = 1, 2, 7, 3
    probs = torch.rand(b, h, length, length)
    p = torch.tensor([1])
    r2 = star.stage2_scores(probs, p, keep1)
    expect = probs[0, :, 1 + keep1 :, 1 : 1 + keep1].mean(dim=(0, 1))
    assert torch.allclose(r2[0], expect, atol=1e-6)


def test_stage2_layout_keeps_text_and_selected_visual_in_order():
    p = torch.tensor([2])
    selected = torch.tensor([[0, 3]])  # of keep1 = 4 visual slots at 2..5
    src = star.stage2_layout(p, selected, keep1=4, length1=8)
    assert src.tolist() == [[0, 1, 2, 5, 6, 7]]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"keep": 0}, "--keep must be in 1..576"),
        ({"keep": 577}, "--keep must be in 1..576"),
        ({"keep": 64, "keep1": 32}, "--keep1 (32) must be >= --keep (64)"),
        ({"keep": 64, "keep1": 600}, "--keep1 must be in 1..576"),
        ({"keep": 64, "layer": 0}, "--layer must be in 1..3"),
        ({"keep": 64, "layer": 4}, "--layer must be in 1..3"),
    ],
)
def test_star_config_rejects_what_the_spec_forbids(kw, message):
    args = {"keep1": None, "layer": 2, "n_visual": 576, "num_layers": 4, **kw}
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StarConfig.resolve(**args)


def test_star_config_default_keep1():
    assert StarConfig.resolve(keep=64, keep1=None, layer=2, n_visual=576, num_layers=4).keep1 == 128
    assert StarConfig.resolve(keep=400, keep1=None, layer=2, n_visual=576, num_layers=4).keep1 == 576


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        ([[1, 2, 3, 4]], [[1, 1, 1, 1]], "exactly one image placeholder"),
        ([[1, 9, 3, 9]], [[1, 1, 1, 1]], "found 2"),
        ([[1, 2, 3, 9]], [[1, 1, 1, 1]], "at least one token must follow"),
        ([[1, 9, 3, 0]], [[1, 1, 1, 0]], "padding must be on the left"),
        ([[9, 1, 3, 4]], [[0, 1, 1, 1]], "placeholder sits on a padding"),
    ],
)
def test_check_prompts_rejects_bad_prompts(ids, mask, message):
    with pytest.raises(UsageError, match=message):
        star.check_prompts(torch.tensor(ids), torch.tensor(mask), 9)


def test_check_prompts_accepts_left_padded_rows():
    star.check_prompts(
        torch.tensor([[0, 0, 9, 3], [1, 2, 9, 3]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), 9
    )


def test_cut_margin_is_the_gap_at_the_cut():
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.3, 0.2], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert star.cut_margin(scores, 1).tolist() == pytest.approx([0.2, 0.0])  # 0.5 - 0.3
    assert star.cut_margin(scores, 2).tolist() == pytest.approx([0.0, 0.0])  # 0.3 - 0.3: a tie at the cut
    assert star.cut_margin(scores, 3).tolist() == pytest.approx([0.1, 0.0])  # 0.3 - 0.2
    assert star.cut_margin(scores, 5).tolist() == [float("inf")] * 2  # nothing dropped


def test_attention_mask_values_other_than_0_and_1_are_refused():
    ids = torch.tensor([[4, 9, 5, 6]])
    with pytest.raises(UsageError, match=r"only 0 .* and 1 .*found 2"):
        star.check_prompts(ids, torch.tensor([[1, 1, 2, 1]]), 9)
    star.check_prompts(ids, torch.tensor([[0, 1, 1, 1]]), 9)  # left padding is fine
