"""LLaVA-NeXT (anyres, fixed tile grid, row newlines): the parity suite of LLaVA-1.5.

Tiny checkpoints (tests/conftest.py: llava-next-tiny with a Llama decoder and with a Mistral
decoder) are saved with save_pretrained and loaded back through ``load``. Checked: the rewrite
against the dynamic reference (whose span order comes from transformers' own
``pack_image_features``) and against the unmodified LlavaNextForConditionalGeneration, a padded
row against the row alone, the ONNX export in onnxruntime, and greedy decoding (onnxruntime vs
PyTorch, and keep = N vs transformers' ``generate``).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from star_export.check import check_onnx, topk_nodes
from star_export.cli import main
from star_export.contract import decode_contract, prefill_contract
from star_export.families.llava_next import next_span_offsets
from star_export.onnx_export import example_decode_inputs, export_onnx
from star_export.rewrite import StarDecode
from star_export.runtime import GenerationConfig, OnnxruntimeBackend, TorchBackend, generate
from star_export.star import StarConfig
from star_export.validate import make_inputs, validate


def resolve(loaded, keep, keep1, layer):
    g = loaded.geometry
    return StarConfig.resolve(
        keep=keep, keep1=keep1, layer=layer, n_visual=g.n_visual, num_layers=g.num_layers
    )


def contracts(loaded, cfg):
    g = loaded.geometry
    return (
        prefill_contract(g, cfg, (1, 2, 8), (2, 24, 128)),
        decode_contract(g, cfg, (1, 2, 8), (2, 24, 128), 64),
    )


def test_geometry_is_the_fixed_grid_layout(next_llama):
    g = next_llama.geometry
    # 112 px tiles of 14 px patches: 8 x 8 = 64 tokens; 2 x 2 grid -> 16 x 16 tile tokens + 16 newlines
    assert g.arch == "llava_next" and g.grid == (2, 2)
    assert g.pixel_shape == (5, 3, 112, 112)
    assert (g.n_visual, g.n_fixed, g.n_positions) == (64 + 256, 16, 64 + 16 * 17)
    cand, fixed = next_span_offsets(g)
    assert sorted(cand + list(fixed)) == list(range(g.n_positions))
    # the unmodified model's span (transformers' pack_image_features) has the same length and layout
    span = next_llama.family.reference_image(next_llama.model, g, torch.zeros(g.pixel_shape)).slots
    assert len(span) == g.n_positions and [o for o, c in enumerate(span) if c is None] == list(fixed)


@pytest.mark.parametrize("which", ["next_llama", "next_mistral"])
@pytest.mark.parametrize(("keep", "keep1", "layer"), [(32, None, 2), (10, 200, 1), (320, 320, 3)])
def test_rewrite_matches_reference_and_unmodified_model(request, which, keep, keep1, layer):
    loaded = request.getfixturevalue(which)
    cfg = resolve(loaded, keep, keep1, layer)
    report = validate(
        loaded.model, loaded.geometry, cfg, contracts(loaded, cfg)[0], onnx_path=None, seed=layer
    )
    assert report.passed, report.format()
    checks = {r.check for r in report.rows}
    assert {
        "torch rewrite vs reference",
        "torch rewrite (keep=N) vs HF",
        "padded row vs alone (torch)",
    } <= checks


@pytest.mark.parametrize("grid", [(1, 2), (2, 1)])
def test_non_square_grids_pass_the_parity_checks(next_dir, grid):
    """1x2 and 2x1 (224x112, 112x224 pinpoints) have the same tile count but other spans."""
    from star_export.load import load

    loaded = load(next_dir, options={"grid": grid})
    g = loaded.geometry
    side = g.image_size // g.patch_size
    assert g.grid == grid and g.pixel_shape == (3, 3, 112, 112)
    assert (g.n_visual, g.n_fixed) == (3 * side * side, grid[0] * side)
    cfg = resolve(loaded, 12, 40, 2)
    report = validate(loaded.model, g, cfg, contracts(loaded, cfg)[0], onnx_path=None, seed=2)
    assert report.passed, report.format()


def test_newlines_are_always_kept_at_their_original_positions(next_llama):
    g = next_llama.geometry
    cfg = resolve(next_llama, 8, 24, 2)
    feeds = make_inputs(g, batch=3, text_len=17, seed=1)
    with torch.no_grad():
        out = next_llama.family.prefill_module(next_llama.model, g, cfg)(
            *(torch.from_numpy(v) for v in feeds.values())
        )
    assert out[1].shape == (3, 24) and out[2].shape == (3, 8)
    for i in range(g.num_layers):
        expect = 17 - 1 + (24 if i < cfg.layer else 8) + g.n_fixed
        assert out[5 + 2 * i].shape == (3, g.num_kv_heads, expect, g.head_dim)
    s1, s2 = out[1].numpy(), out[2].numpy()
    assert (np.diff(s1, axis=1) > 0).all() and (np.diff(s2, axis=1) > 0).all()
    assert all(set(s2[b]) <= set(s1[b]) for b in range(3)) and s1.max() < g.n_visual


def test_pruning_changes_the_logits(next_llama):
    g = next_llama.geometry
    args = [torch.from_numpy(v) for v in make_inputs(g, batch=2, text_len=12, seed=3).values()]
    with torch.no_grad():
        pruned = next_llama.family.prefill_module(next_llama.model, g, resolve(next_llama, 8, 16, 2))(*args)[
            0
        ]
        full = next_llama.family.prefill_module(
            next_llama.model, g, resolve(next_llama, g.n_visual, g.n_visual, 2)
        )(*args)[0]
    assert (pruned - full).abs().max() > 1e-3 * full.abs().max()


def test_export_passes_every_parity_check_and_greedy_is_token_exact(next_mistral, tmp_path):
    loaded = next_mistral
    g = loaded.geometry
    cfg = resolve(loaded, 16, 48, 2)
    pc, dc = contracts(loaded, cfg)
    prefill = export_onnx(
        loaded.family.prefill_module(loaded.model, g, cfg).eval(),
        pc,
        tmp_path / "prefill.onnx",
        g.image_token_id,
    )
    decode = export_onnx(
        StarDecode(loaded.model, g, cfg).eval(),
        dc,
        tmp_path / "decode.onnx",
        example_args=example_decode_inputs(dc),
    )
    report = validate(loaded.model, g, cfg, pc, str(prefill), seed=5)
    assert report.passed, report.format()
    logits = next(
        r for r in report.rows if r.check == "onnxruntime vs torch (batch)" and r.output == "logits"
    )
    assert logits.max_rel <= 1e-4

    model = onnx.load(str(prefill), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"NonZero", "NonMaxSuppression", "Unique", "Compress", "Loop", "Scan", "If"}
    # stage 1, the newline merge, stage 2 (+ newlines) and the patch indices of stage 2: literal K
    r = g.n_fixed
    assert sorted(k for _, k in topk_nodes(model)) == sorted([48, 48 + r, 16 + r, 16, 49, 17])  # + margins
    assert check_onnx(prefill, dynamic_inputs=pc.dynamic_axes()).ok
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert dims["pixel_values"] == ["batch", 5, 3, 112, 112]

    feeds = dict(make_inputs(g, batch=2, text_len=21, pad=6, seed=11))
    gen = GenerationConfig(max_new_tokens=16)
    got = generate(OnnxruntimeBackend(prefill, decode), feeds, g, cfg, gen, True)
    ref = generate(TorchBackend(loaded.model, g, cfg, pc, dc), feeds, g, cfg, gen, True)
    assert got.tokens == ref.tokens and all(len(t) == 16 for t in got.tokens)
    for a, b in zip(got.step_logits, ref.step_logits, strict=True):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    expect = [21 - 1 + r + (48 if i < cfg.layer else 16) for i in range(g.num_layers)]
    assert got.prefill_present_lengths == expect == ref.prefill_present_lengths


@pytest.mark.parametrize("which", ["next_llama", "next_mistral"])
def test_unpruned_rewrite_greedy_equals_hf_generate(request, which):
    """keep1 = keep2 = N: greedy tokens equal LlavaNextForConditionalGeneration.generate, batched
    with left padding (transformers takes the expanded prompt and image_sizes)."""
    loaded = request.getfixturevalue(which)
    g = loaded.geometry
    cfg = resolve(loaded, g.n_visual, g.n_visual, 2)
    pc, dc = contracts(loaded, cfg)
    feeds = dict(make_inputs(g, batch=2, text_len=15, pad=4, seed=5))
    steps = 16
    ours = generate(
        TorchBackend(loaded.model, g, cfg, pc, dc), feeds, g, cfg, GenerationConfig(max_new_tokens=steps)
    )
    rows = []
    for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"], strict=True):
        real = ids[mask.astype(bool)].tolist()
        p = real.index(g.image_token_id)
        rows.append(real[:p] + [g.image_token_id] * g.n_positions + real[p + 1 :])
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    side = g.image_size
    out = loaded.model.generate(
        pixel_values=torch.from_numpy(feeds["pixel_values"]),
        image_sizes=torch.tensor([[g.grid[0] * side, g.grid[1] * side]] * 2),
        input_ids=input_ids,
        attention_mask=attn,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    )
    assert out[:, width:].tolist() == ours.tokens


def test_cli_exports_a_saved_next_checkpoint_with_model_dir(next_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["llava", "--model", str(next_dir), "--keep", "16", "--out", str(out), "--text-len", "12"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    geo, star = manifest["model"]["geometry"], manifest["star"]
    assert geo["arch"] == "llava_next" and geo["grid"] == [2, 2]
    assert star["span1"] == 32 + 16 and star["span2"] == 16 + 16 and star["n_positions"] == 336
    assert manifest["image"]["anyres"]["grid"] == [2, 2]
    assert json.loads((out / "report.json").read_text())["passed"] is True
    shape = next(t for t in manifest["graphs"]["prefill"]["inputs"] if t["name"] == "pixel_values")["shape"]
    assert shape == ["batch", 5, 3, 112, 112]
    # the C++ example's header is for LLaVA-1.5 layouts: refused in one line, not mis-generated
    from star_export.deploy import cpp_header
    from star_export.errors import UsageError

    with pytest.raises(UsageError, match=r"examples/cpp"):
        cpp_header(manifest)


def test_cli_refuses_a_grid_the_checkpoint_does_not_list(next_dir, tmp_path, capsys):
    code = main(["llava", "--model", str(next_dir), "--grid", "3x3", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--grid 3x3" in err[0] and "2x2" in err[0] and not (tmp_path / "o").exists()
