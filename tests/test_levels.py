"""Several keep levels in one export (issue #14): one prefill graph per level, ONE decode graph for
all of them, the weights stored once, every level validated, and the keep chosen per request."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from star_export.cli import main

KEEPS = (8, 16, 32)


@pytest.fixture(scope="module")
def levels_export(cli_export):
    """``llava --keep 8,16,32`` on the default model (the session's shared several-level export)."""
    return cli_export("llava-levels", "--keep", ",".join(map(str, KEEPS)))


def test_three_prefill_graphs_one_decode_graph_all_pass_parity(levels_export, capsys):
    out = levels_export
    names = sorted(p.name for p in out.iterdir() if p.name != "report.json")
    assert names == sorted(
        ["decode.onnx", "manifest.json", "processor", "weights.onnx.data"]
        + [f"prefill_k{k}.onnx" for k in KEEPS]
    )
    assert main(["validate", "--from", str(out)]) == 0, capsys.readouterr().out  # every level, one report
    manifest = json.loads((out / "manifest.json").read_text())
    star = manifest["star"]
    assert star["default_keep"] == KEEPS[0] and [lv["keep2"] for lv in star["levels"]] == list(KEEPS)
    assert [lv["file"] for lv in star["levels"]] == [f"prefill_k{k}.onnx" for k in KEEPS]
    assert set(manifest["graphs"]) == {*(f"prefill_k{k}" for k in KEEPS), "decode"}
    decode_dims = {d["name"] for d in manifest["graphs"]["decode"]["dynamic_dims"]}
    assert decode_dims == {"batch", "past_len_l1", "past_len_l2"}  # no keep baked into decode.onnx
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    checks = {r["check"] for r in report["rows"]}
    for k in KEEPS:  # one row group per level
        assert f"keep {k}: onnxruntime vs torch (batch)" in checks
        assert f"keep {k}: torch rewrite vs reference" in checks
        assert f"keep {k}: generate onnxruntime vs torch (8 greedy)" in checks
    assert sum("(keep=N) vs HF" in c for c in checks) == 1  # does not depend on the level: once


def test_the_weights_exist_once(levels_export, gqa):
    """Every graph reads the same external-data file; its size is about one copy of the weights."""
    out = levels_export
    data_files = [p for p in out.iterdir() if p.name.endswith(".data")]
    assert [p.name for p in data_files] == ["weights.onnx.data"]
    locations, shared, referenced = set(), {}, 0
    for graph in (*(f"prefill_k{k}" for k in KEEPS), "decode"):
        model = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                locations.add(info["location"])
                shared.setdefault(t.name, set()).add((info["offset"], info["length"]))
                referenced += int(info["length"])
    assert locations == {"weights.onnx.data"}
    # the exporter names most (transposed) weights val_N per graph: they are shared by content; the
    # weights that keep their module names sit at one place in every graph
    named = {name: places for name, places in shared.items() if "." in name}
    assert named and all(len(places) == 1 for places in named.values())
    assert referenced > 2.5 * data_files[0].stat().st_size  # 4 graphs read the same bytes
    weights = sum(p.numel() * p.element_size() for p in gqa.model.parameters())  # the same tiny model
    assert data_files[0].stat().st_size < 1.2 * weights


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat.png"
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((200, 260, 3)) * 255).astype("uint8")).save(path)
    return path


@pytest.mark.parametrize("keep", [KEEPS[0], KEEPS[-1], None])
def test_keep_per_request_is_token_exact_with_the_rewrite_at_that_keep(levels_export, image, keep):
    from star_export.session import load_export

    ort, torch_ = load_export(levels_export), load_export(levels_export, runtime="torch")
    prompts = ["What is in the image?", "Describe the colours."]
    got = ort.generate([image], prompts, max_new_tokens=6, keep=keep)
    ref = torch_.generate([image], prompts, max_new_tokens=6, keep=keep)
    expect = keep or KEEPS[0]
    assert got.cfg.keep2 == ref.cfg.keep2 == expect
    assert got.result.tokens == ref.result.tokens and got.answers == ref.answers
    assert got.result.stage2_keep_idx.shape == (2, expect)
    np.testing.assert_array_equal(got.result.stage2_keep_idx, ref.result.stage2_keep_idx)
    span1 = got.cfg.keep1
    assert got.result.prefill_present_lengths[0] - got.result.prefill_present_lengths[-1] == span1 - expect


def test_generate_cli_picks_the_level_and_refuses_one_the_export_lacks(levels_export, image, capsys):
    code = main(
        [
            "generate",
            "--from",
            str(levels_export),
            "--image",
            str(image),
            "--prompt",
            "hi",
            "--keep",
            "32",
            "--json",
        ]
    )
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["visual_tokens"]["keep2"] == 32 and len(res["stage2_keep_idx"][0]) == 32
    code = main(
        ["generate", "--from", str(levels_export), "--image", str(image), "--prompt", "hi", "--keep", "12"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "holds keep levels 8,16,32" in err[0]


def test_bad_level_lists_are_refused_before_any_work(tmp_path, capsys):
    for args, message in (
        (["--keep", "16,16"], "each keep level once"),
        (["--keep", "8,16", "--keep1", "32"], "--keep1 lists 1 values for 2 keep levels"),
        (["--keep", "8,x"], "expected an integer"),
    ):
        try:
            code = main(["llava", "--recipe", "llava-tiny", *args, "--out", str(tmp_path / "o")])
        except SystemExit as e:  # argparse's own one-line errors
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o").exists()
