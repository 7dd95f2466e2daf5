"""The baseline selections STAR is measured against (``compare``): what each keeps, in the rewrite, and
the refusals that keep a baseline from passing for STAR."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from star_export import star
from star_export.bench.methods import METHODS, format_table, keep1_of, wilson
from star_export.errors import UsageError
from star_export.star import StarConfig
from star_export.validate import make_inputs


def test_stride_prior_keeps_an_even_stride_and_random_is_seeded():
    for n, k in ((144, 16), (144, 64), (576, 64), (10, 3)):
        kept = torch.topk(star.prior_scores(n, k, "stride"), k).indices.sort().values.tolist()
        assert kept == [(2 * i + 1) * n // (2 * k) for i in range(k)]
        gaps = {b - a for a, b in itertools.pairwise(kept)}
        assert max(gaps) - min(gaps) <= 1  # evenly spaced
    a, b = star.prior_scores(144, 8, "random"), star.prior_scores(144, 8, "random")
    assert torch.equal(a, b) and len(set(a.tolist())) == 144  # seeded, no ties
    with pytest.raises(ValueError):
        star.prior_scores(144, 8, "star")


def test_baselines_choose_at_stage_one_and_bad_names_are_refused():
    cfg = StarConfig.resolve(keep=16, keep1=None, layer=2, n_visual=144, num_layers=4, selection="random")
    assert (cfg.keep1, cfg.keep2, cfg.selection) == (16, 16, "random")
    with pytest.raises(UsageError, match="keep1 must be keep"):
        StarConfig.resolve(keep=16, keep1=32, layer=2, n_visual=144, num_layers=4, selection="stride")
    with pytest.raises(UsageError, match="selection must be one of"):
        StarConfig.resolve(keep=16, keep1=None, layer=2, n_visual=144, num_layers=4, selection="best")
    assert [keep1_of(METHODS[m][1], 16, 144) for m in ("star", "stage1-only", "stage2-only")] == [32, 16, 144]


def test_each_selection_keeps_what_it_says_in_the_rewrite(mha):
    """star keeps the top STAR scores; inverted the bottom ones at both stages; random and stride their
    prior's top k whatever the image; the scores the graph outputs are the ones it ranked by."""
    g = mha.geometry
    feeds = make_inputs(g, batch=2, text_len=12, seed=5)
    args = [torch.from_numpy(v) for v in feeds.values()]

    def run(selection, keep1, force1=None):
        cfg = StarConfig.resolve(
            keep=16, keep1=keep1, layer=2, n_visual=g.n_visual, num_layers=g.num_layers, selection=selection
        )
        with torch.no_grad():
            return mha.family.prefill_module(mha.model, g, cfg).eval().run(*args, force1=force1)

    base = run("star", 48)
    s1 = base["stage1_scores"]
    assert base["stage1_keep_idx"].tolist() == star.topk_sorted(s1, 48).tolist()
    inv = run("inverted", 48)
    assert torch.allclose(inv["stage1_scores"], -s1)
    assert inv["stage1_keep_idx"].tolist() == star.topk_sorted(-s1, 48).tolist()
    assert not set(inv["stage1_keep_idx"][0].tolist()) & set(base["stage1_keep_idx"][0].tolist())
    # STAR's own stage-2 scores over the inverted run's stage-1 set (forced), by patch index
    s2 = run("star", 48, force1=inv["stage1_keep_idx"])["stage2_scores"][0]
    kept2 = inv["stage2_keep_idx"][0].tolist()
    dropped = [j for j in inv["stage1_keep_idx"][0].tolist() if j not in kept2]
    assert max(s2[kept2]) <= min(s2[dropped])  # the kept ones are the LOWEST STAR stage-2 scores
    for selection in ("random", "stride"):
        out = run(selection, None)
        want = star.topk_sorted(star.prior_scores(g.n_visual, 16, selection)[None], 16)[0].tolist()
        assert out["stage1_keep_idx"].tolist() == [want, want]
        assert out["stage2_keep_idx"].tolist() == [want, want]  # stage 2 keeps all of stage 1's


def test_a_baseline_export_cannot_be_validated_as_star(tmp_path):
    from star_export import api

    with pytest.raises(UsageError, match="baseline"):
        api.export(recipe="llava-tiny", keep=16, out=tmp_path / "x", selection="random")
    assert not (tmp_path / "x").exists()


def test_wilson_interval_and_table():
    low, high = wilson(0.9, 100)
    assert math.isclose(low, 0.8256, abs_tol=1e-3) and math.isclose(high, 0.9448, abs_tol=1e-3)
    assert wilson(1.0, 50)[1] == 1.0 and wilson(0.0, 50)[0] == 0.0
    result = {
        "n_visual": 144,
        "unpruned": {"accuracy": 0.9, "interval": [0.83, 0.94], "examples": 100},
        "rows": [
            {"method": "star", "keep2": 64, "accuracy": 0.88, "low": 0.8, "high": 0.93, "agreement": 0.95,
             "kl_mean": 0.01, "prefill_ms": 3.0},
        ],
    }  # fmt: skip
    table = format_table(result)
    assert "| star | 64 | 88.0 % [80.0 %, 93.0 %] | 95.0 % | 0.010 | 3.0 |" in table


def test_compare_command_writes_the_table_json_and_plot(tmp_path, capsys):
    """Two methods at one keep on three questions of the synthetic set (the random llava-demo start):
    one export and one eval per method, the table printed, methods.json / .png written; an unknown
    method is one line, exit 2."""
    import json

    from star_export.cli import main
    from star_export.demo import scenes
    from star_export.load import materialise
    from star_export.recipes import load_recipe

    model = materialise(load_recipe("llava-demo"))
    data = scenes.write_split(tmp_path / "q", 0, "test", 3, size=168)
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(model), "--data", str(data), "--keep", "16",
                 "--methods", "star,random", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| star | 16 |" in printed and "| random | 16 |" in printed
    result = json.loads((out / "methods.json").read_text())
    assert [(r["method"], r["keep1"], r["keep2"], r["examples"]) for r in result["rows"]] == [
        ("star", 32, 16, 3),
        ("random", 16, 16, 3),
    ]
    assert result["n_visual"] == 144 and (out / "methods.png").stat().st_size > 1000
    manifest = json.loads((out / "exports" / "random" / "manifest.json").read_text())
    assert {lv["selection"] for lv in manifest["star"]["levels"]} == {"random"}
    assert main(["compare", "--model", str(model), "--data", str(data), "--keep", "16",
                 "--methods", "best", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "unknown best" in capsys.readouterr().err
