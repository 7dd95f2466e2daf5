"""STAR for Qwen2.5-VL: the static windowed vision tower vs HF's dynamic one, the rewrite vs the
dynamic reference and the unmodified model, the ONNX export, greedy decoding, the CLI.

The tiny recipe (recipes/qwen2.5-vl-tiny.toml): 112 px, patch 8, merge 2 -> a 7 x 7 merged grid
(N = 49) with windows of 2 x 2 merged tokens (the last window row and column 1 wide), blocks 1
and 3 full attention, blocks 0 and 2 windowed.
"""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from star_export.check import check_onnx, topk_nodes
from star_export.cli import main
from star_export.contract import decode_contract, prefill_contract
from star_export.families.qwen2_5_vl import FAMILY as QWEN25
from star_export.families.qwen2_5_vl import window_layout
from star_export.runtime import GenerationConfig, TorchBackend, generate
from star_export.star import StarConfig
from star_export.validate import make_inputs, validate, validate_generation

RECIPE = "qwen2.5-vl-tiny"
EXPORT = (f"{RECIPE}-keep8", "--recipe", RECIPE, "--keep", "8")  # shared with test_ties / test_triton


@pytest.fixture(scope="module")
def q25_dir(_isolated_cache):
    """The recipe saved with save_pretrained (seeded random weights, processor files)."""
    from star_export.load import materialise
    from star_export.recipes import load_recipe

    return materialise(load_recipe(RECIPE))


@pytest.fixture(scope="module")
def q25(q25_dir):
    """Loaded back through star_export's loading code (fp32, eager), 112 x 112 static resolution."""
    from star_export.load import load

    return load(q25_dir, options={"image_size": 112})


def resolve(geo, keep, keep1, layer):
    return StarConfig.resolve(
        keep=keep, keep1=keep1, layer=layer, n_visual=geo.n_visual, num_layers=geo.num_layers
    )


def contracts(geo, cfg):
    return (
        prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128)),
        decode_contract(geo, cfg, (1, 2, 8), (2, 24, 128), 16),
    )


def rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------- the static window layout


@pytest.mark.parametrize(("rows", "cols", "window"), [(7, 7, 2), (7, 10, 2), (6, 6, 3), (5, 9, 4), (3, 5, 1)])
def test_window_layout_is_hfs_get_vision_window_index(rows, cols, window):
    """The constants of the static grid: HF's window order and its window lengths (edge windows smaller)."""
    index, window_id = window_layout(rows, cols, window)
    hf_index, cu = get_vision_window_index(torch.tensor([[1, 2 * rows, 2 * cols]]), 2, 16 * window, 8)
    assert index.tolist() == hf_index.tolist()
    lengths = torch.bincount(window_id) * 4  # patches per window, windows in order
    assert [0, *lengths.cumsum(0).tolist()] == cu.tolist()


@pytest.mark.parametrize("size", [112, (112, 160)])
def test_static_windowed_tower_equals_hf_visual(q25_dir, size):
    """F in raster order equals HF's last_hidden_state (window order) put back in raster order, and
    the merger on F equals HF's pooler_output (HF merges in window order, then reverse_indices).
    A uniform image gives bit-equal features. The windows matter: the same tower with every block
    attending globally is far off."""
    from star_export.load import load

    loaded = load(q25_dir, options={"image_size": size})
    model, geo = loaded.model, loaded.geometry
    rows, cols = geo.grid
    grid_thw = torch.tensor([[1, 2 * rows, 2 * cols]])
    pv = torch.from_numpy(make_inputs(geo, seed=9)["pixel_values"])
    pre = QWEN25.prefill_module(model, geo, resolve(geo, 8, None, 2)).eval()
    window_index, _ = get_vision_window_index(grid_thw, 2, 32, 8)
    with torch.no_grad():
        feats = pre.vision_features(pv)  # (B, N, 4 * 32)
        embeds = pre.project(feats)
        for b in range(2):
            out = model.model.visual(pv[b], grid_thw=grid_thw)
            raster = out.last_hidden_state.reshape(geo.n_visual, -1)[torch.argsort(window_index)]
            assert rel(feats[b], raster) <= 1e-6
            assert rel(embeds[b], out.pooler_output) <= 1e-6
        # a uniform image: every merged token's features bit-equal (ties, not near-ties, at stage 1)
        uniform = pre.vision_features(torch.full_like(pv, 0.7))
        assert (uniform == uniform[:, :1]).all()
        pre.full_blocks = frozenset(range(len(pre.blocks)))
        assert rel(pre.vision_features(pv), feats) > 1e-2


# ---------------------------------------------------------------------------- (1) the rewrite


@pytest.mark.parametrize(("keep", "keep1", "layer"), [(8, None, 2), (5, 20, 1), (16, 16, 3)])
def test_rewrite_matches_reference_and_unmodified_model(q25, keep, keep1, layer):
    """validate(onnx_path=None): kept indices exact and logits / presents within 1e-5 of the dynamic
    reference, keep = N within 1e-5 of Qwen2_5_VLForConditionalGeneration, a padded row = the row alone."""
    geo = q25.geometry
    cfg = resolve(geo, keep, keep1, layer)
    report = validate(q25.model, geo, cfg, contracts(geo, cfg)[0], onnx_path=None, seed=layer)
    assert report.passed, report.format()
    assert {"torch rewrite vs reference", "torch rewrite (keep=N) vs HF", "padded row vs alone (torch)"} <= {
        r.check for r in report.rows
    }
    args = [torch.from_numpy(v) for v in make_inputs(geo, seed=layer).values()]
    with torch.no_grad():  # pruning matters
        pruned = QWEN25.prefill_module(q25.model, geo, cfg).eval()(*args)[0]
        full = QWEN25.prefill_module(q25.model, geo, resolve(geo, 49, 49, layer)).eval()(*args)[0]
    assert rel(pruned, full) > 1e-3


@pytest.mark.parametrize("size", [(112, 160), (160, 112)])
def test_non_square_static_resolutions_pass_the_parity_checks(q25_dir, size):
    """112x160: a 7 x 10 grid (windows 2 x 2, the last row 1 high); 160x112 its transpose. M-RoPE
    rows/columns as HF's get_rope_index gives them."""
    from star_export.load import load

    loaded = load(q25_dir, options={"image_size": size})
    geo = loaded.geometry
    assert geo.grid == (size[0] // 16, size[1] // 16) and geo.n_positions == 10 and geo.n_visual == 70
    cfg = resolve(geo, 12, 30, 2)
    report = validate(loaded.model, geo, cfg, contracts(geo, cfg)[0], None, seed=1)
    assert report.passed, report.format()


# ---------------------------------------------------------------------------- (2) ONNX, (3) generation


def test_export_matches_the_rewrite_is_static_and_generates_like_torch(cli_export, q25):
    """The recipe's export (prefill.onnx / decode.onnx, keep 8 -> keep1 16, K = 2): onnxruntime vs the
    rewrite (validate with the graph), the graph scan, greedy decoding onnxruntime vs torch."""
    out = cli_export(*EXPORT)
    geo = q25.geometry
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["geometry"]["arch"] == "qwen2_5_vl" and manifest["layout"] == {"image_size": 112}
    cfg = resolve(geo, 8, None, 2)
    pc, dc = contracts(geo, cfg)
    prefill, decode = out / "prefill.onnx", out / "decode.onnx"

    graph = onnx.load(str(prefill), load_external_data=False)
    assert not {n.op_type for n in graph.graph.node} & {"NonZero", "Unique", "Compress", "Loop", "If", "Scan"}
    assert sorted(k for _, k in topk_nodes(graph)) == sorted([16, 8, 17, 9])  # the cuts and the margins
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input
    }
    assert dims["pixel_values"] == ["batch", 196, 384]
    for path, contract in ((prefill, pc), (decode, dc)):
        scan = check_onnx(path, dynamic_inputs=contract.dynamic_axes())
        assert scan.ok, scan.format()

    report = validate(q25.model, geo, cfg, pc, str(prefill), seed=5)
    validate_generation(report, q25.model, geo, cfg, pc, dc, str(prefill), str(decode), seed=6, steps=8)
    assert report.passed, report.format()
    checks = {r.check for r in report.rows}
    assert {"onnxruntime vs torch (batch)", "padded row vs alone (onnxruntime)"} <= checks
    assert "generate onnxruntime vs torch (8 greedy)" in checks


def test_unpruned_greedy_generation_equals_hf_generate(q25):
    """keep1 = keep2 = N: prefill + decode steps give Qwen2_5_VLForConditionalGeneration.generate's
    greedy tokens and logits (a batch of 2, one row left padded; HF takes the expanded prompt,
    image_grid_thw and mm_token_type_ids)."""
    model, geo = q25.model, q25.geometry
    steps = 8
    cfg = resolve(geo, geo.n_visual, geo.n_visual, 2)
    feeds = dict(make_inputs(geo, batch=2, text_len=13, pad=3, seed=8))
    backend = TorchBackend(model, geo, cfg, *contracts(geo, cfg))
    ours = generate(backend, feeds, geo, cfg, GenerationConfig(max_new_tokens=steps), keep_logits=True)
    rows = [
        QWEN25.expanded(geo, ids[m.astype(bool)].tolist())[0]
        for ids, m in zip(feeds["input_ids"], feeds["attention_mask"], strict=True)
    ]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    model.model.rope_deltas = None
    hf = model.generate(
        pixel_values=torch.from_numpy(feeds["pixel_values"]).reshape(-1, geo.pixel_shape[1]),
        image_grid_thw=QWEN25.grid_thw(geo).expand(2, -1),
        input_ids=input_ids,
        attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        mm_token_type_ids=(input_ids == geo.image_token_id).long(),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    model.model.rope_deltas = None
    assert hf.sequences[:, width:].tolist() == ours.tokens
    assert max(rel(a, b) for a, b in zip(ours.step_logits, hf.logits, strict=True)) <= 1e-5


# ---------------------------------------------------------------------------- (4) the CLI, (7) bad input


def test_cli_exports_a_saved_checkpoint_with_model_dir(q25_dir, tmp_path, capsys):
    """save_pretrained -> ``llava --model DIR --image-size 64x96``: a 4 x 6 grid of 2 x 2 windows."""
    out = tmp_path / "out"
    args = ["llava", "--model", str(q25_dir), "--image-size", "64x96", "--keep", "6", "--out", str(out)]
    code = main([*args, "--text-len", "12"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "overall: PASS" in captured.out + captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    geo = manifest["model"]["geometry"]
    assert (geo["arch"], geo["n_visual"], geo["n_positions"], geo["grid"]) == ("qwen2_5_vl", 24, 6, [4, 6])
    assert manifest["star"]["keep1"] == 12 and manifest["star"]["keep2"] == 6
    assert manifest["image"]["kind"] == "patches" and manifest["image"]["size"] == [64, 96]
    shape = next(t for t in manifest["graphs"]["prefill"]["inputs"] if t["name"] == "pixel_values")["shape"]
    assert shape == ["batch", 96, 384]
    assert json.loads((out / "report.json").read_text())["passed"] is True


def test_bad_layouts_and_configs_are_refused_in_one_line(q25_dir, tmp_path, capsys):
    bad = tmp_path / "bad-window"
    shutil.copytree(q25_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["window_size"] = 8  # below one merged token (16 px)
    (bad / "config.json").write_text(json.dumps(cfg))
    for model, flags, message in (
        (q25_dir, ["--image-size", "16x16"], "outside the checkpoint's image processor range"),
        (q25_dir, ["--image-size", "1024x1024"], "outside the checkpoint's image processor range"),
        (q25_dir, ["--image-size", "112x100"], "multiple of"),
        (q25_dir, ["--grid", "2x2"], "does not apply to qwen2_5_vl"),
        (bad, [], "window_size 8"),
    ):
        out = tmp_path / "o"
        code = main(["llava", "--model", str(model), *flags, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (flags, err)
        assert not out.exists()
