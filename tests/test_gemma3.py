"""STAR for Gemma 3: pooled SigLIP tokens, bidirectional image attention, sliding and global layers.

The gemma3-tiny recipe (64 px, patch 4, 16 x 16 patches pooled to N = 64 tokens; 4 decoder layers
alternating sliding and global attention) is saved with save_pretrained and loaded back. Checked:
the rewrite against the dynamic reference and against the unmodified
Gemma3ForConditionalGeneration (with token_type_ids: the bidirectional image block), a padded row
against the row alone, the attention mask (bidirectional over the KEPT image tokens, the window in
ORIGINAL positions, with a window small enough to bite), the exported graphs in onnxruntime, greedy
decoding against transformers' generate, the real Gemma3Processor's prompts, the CLI with
``--model DIR``, and the refusals (one line, exit 2, nothing written). Decoding past a window shorter
than the prompt and the answer: tests/test_gemma3_window.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from star_export import encoding
from star_export.check import check_onnx, topk_nodes
from star_export.cli import main
from star_export.contract import decode_contract, prefill_contract
from star_export.families.gemma3 import FAMILY as GEMMA
from star_export.families.gemma3 import Gemma3Prefill
from star_export.reference import reference_batch
from star_export.rewrite import Span
from star_export.runtime import GenerationConfig, TorchBackend, generate
from star_export.star import StarConfig
from star_export.validate import make_inputs, validate

N = 64  # 8 x 8 pooled tokens


@pytest.fixture(scope="module")
def gemma_dir(_isolated_cache):
    from star_export.load import materialise
    from star_export.recipes import load_recipe

    return materialise(load_recipe("gemma3-tiny"))


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    from star_export.load import load

    return load(gemma_dir)


@pytest.fixture(scope="module")
def export(cli_export):
    """The recipe exported through the CLI (shared with tests/test_ties.py and tests/test_triton.py)."""
    return cli_export("gemma3-tiny-keep8", "--recipe", "gemma3-tiny", "--keep", "8")


def resolve(geo, keep, keep1, layer):
    return StarConfig.resolve(
        keep=keep, keep1=keep1, layer=layer, n_visual=geo.n_visual, num_layers=geo.num_layers
    )


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return float((a - b).abs().max() / b.abs().max())


def tensors(feeds):
    return [torch.from_numpy(feeds[k]) for k in ("pixel_values", "input_ids", "attention_mask")]


# ---------------------------------------------------------------------------- layout and processor


def test_geometry_pixels_and_prompts_match_the_real_gemma3_processor(gemma, gemma_dir):
    """pixel_values are the Gemma3ImageProcessor's; the prompt is Gemma3Processor's expanded text with
    its run of N soft tokens collapsed to ONE (start/end-of-image markers stay as text)."""
    from PIL import Image
    from transformers import AutoProcessor

    from star_export.preprocess import Preprocessor

    geo = gemma.geometry
    assert (geo.arch, geo.n_visual, geo.n_fixed, geo.n_positions, geo.grid) == ("gemma3", N, 0, N, (8, 8))
    assert geo.pixel_shape == (3, 64, 64) and geo.image_token_id == 1003 and geo.head_dim == 16
    assert set(gemma.model.config.text_config.layer_types) == {"sliding_attention", "full_attention"}

    pre = Preprocessor.from_dir(gemma_dir, geometry=geo)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray((rng.random((30, 90, 3)) * 255).astype("uint8")),
        Image.new("RGB", (64, 64), "red"),
    ]
    prompts = ["What is in the picture?", "colour?"]
    feeds = pre.encode(images, prompts)
    processor = AutoProcessor.from_pretrained(gemma_dir, backend="pil")
    assert type(processor).__name__ == "Gemma3Processor"
    for b in range(2):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts[b]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        real = processor(text=text, images=[images[b]], return_tensors="np", add_special_tokens=False)
        ids = real["input_ids"][0].tolist()
        p = ids.index(geo.image_token_id)
        assert ids[p - 1] == 1001 and ids[p : p + N] == [geo.image_token_id] * N and ids[p + N] == 1002
        assert real["token_type_ids"][0].tolist() == [int(t == geo.image_token_id) for t in ids]
        ours = feeds["input_ids"][b][feeds["attention_mask"][b].astype(bool)].tolist()
        assert ours == ids[: p + 1] + ids[p + N :]
        np.testing.assert_array_equal(feeds["pixel_values"][b], real["pixel_values"][0])


def test_image_marker_is_data_driven_in_encoding(gemma, gemma_dir):
    """encoding.encode_prompts replaces the template's marker only when the spec declares one; without
    it the processor's own placeholder applies, as for every other family."""
    plain = {"kind": "processor", "processor": "auto"}
    processor = encoding.load_processor(gemma_dir, plain)
    assert processor.image_marker is None and processor.image_token == "<start_of_image>"  # Gemma3Processor's
    with pytest.raises(encoding.InputError, match="0 image placeholders"):
        encoding.encode_prompts(processor, ["hi"], 1003)  # the template writes no soft token
    spec = GEMMA.image_spec(gemma_dir, gemma.geometry)
    assert spec["image_marker"] == {
        "marker": "<start_of_image>",
        "text": "\n\n<start_of_image><image_soft_token><end_of_image>\n\n",
    }
    processor = encoding.load_processor(gemma_dir, spec)
    assert processor.image_token == "<image_soft_token>"
    ids, mask = encoding.encode_prompts(processor, ["hi", "a longer prompt"], 1003)
    assert (ids == 1003).sum(axis=1).tolist() == [1, 1] and (ids == 1001).sum(axis=1).tolist() == [1, 1]
    assert mask[0, 0] == 0 and mask[1].all()  # left padding
    with pytest.raises(encoding.InputError, match="2 image placeholders"):
        encoding.encode_prompts(processor, ["two <start_of_image> images"], 1003)


def test_static_vision_features_are_the_pooled_tokens_before_the_norm(gemma):
    """F = HF's projector input to mm_soft_emb_norm (the pooled tokens); project = HF's projector."""
    model, geo = gemma.model, gemma.geometry
    pv = torch.from_numpy(make_inputs(geo, seed=9)["pixel_values"])
    pre = Gemma3Prefill(model, geo, resolve(geo, 8, None, 2)).eval()
    with torch.no_grad():
        feats = pre.vision_features(pv)  # (B, N, 32)
        embeds = pre.project(feats)
        for b in range(2):
            image = GEMMA.reference_image(model, geo, pv[b])
            assert feats.shape == (2, N, 32) and rel(feats[b], image.features) <= 1e-6
            assert rel(embeds[b], image.project(list(range(N)))) <= 1e-6
            # the norm is the projector's, not the score's: F is not normalised
            assert rel(model.model.multi_modal_projector.mm_soft_emb_norm(feats[b]), feats[b]) > 1e-2


# ---------------------------------------------------------------------------- (1) rewrite vs reference vs HF


@pytest.mark.parametrize(("keep", "keep1", "layer"), [(16, None, 2), (5, 40, 1), (N, N, 3)])
def test_validate_report_passes(gemma, keep, keep1, layer):
    """Rewrite vs the dynamic reference (indices exact, logits/presents 1e-5), keep = N vs the
    unmodified Gemma3ForConditionalGeneration (1e-5), a left-padded row vs the row alone."""
    geo = gemma.geometry
    cfg = resolve(geo, keep, keep1, layer)
    report = validate(
        gemma.model, geo, cfg, prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128)), None, seed=layer
    )
    assert report.passed, report.format()
    assert {"torch rewrite vs reference", "torch rewrite (keep=N) vs HF", "padded row vs alone (torch)"} <= {
        r.check for r in report.rows
    }
    if cfg.keep2 < N:  # pruning must matter
        feeds = make_inputs(geo, seed=layer)
        with torch.no_grad():
            pruned = Gemma3Prefill(gemma.model, geo, cfg).eval()(*tensors(feeds))[0]
            full = Gemma3Prefill(gemma.model, geo, resolve(geo, N, N, layer)).eval()(*tensors(feeds))[0]
        assert rel(pruned, full) > 1e-3


def test_the_pruned_mask_is_bidirectional_on_kept_image_tokens_and_windowed_in_original_positions(gemma):
    """One row: text 0..1, a span of 3 kept image tokens at slots 2..4 (original positions 2, 9, 30:
    tokens dropped between them), text after at 66..67. Global layers: causal OR image-to-image;
    sliding layers additionally pos_q - pos_k < window, counted in original positions."""
    geo = gemma.geometry
    pre = Gemma3Prefill(gemma.model, geo, resolve(geo, 3, 3, 2))
    pre.window = 20
    pos = torch.tensor([[0, 1, 2, 9, 30, 66, 67]])
    valid = torch.ones(1, 7, dtype=torch.bool)
    masks = pre.attention_masks(valid, pos, Span(torch.tensor([2]), 3, torch.tensor([[0, 7, 28]])))
    full = (masks["full_attention"][0, 0] == 0).int().tolist()
    sliding = (masks["sliding_attention"][0, 0] == 0).int().tolist()
    assert full == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],  # image tokens see every kept image token, later ones too
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],  # text after the image is causal
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert sliding == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],  # 2 - 30 < 20: a later key is never outside the window
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0, 0],  # position 30: 30 - 9 = 21 >= 20 although the slots are adjacent
        [0, 0, 0, 0, 0, 1, 0],  # position 66: only itself (66 - 30 = 36)
        [0, 0, 0, 0, 0, 1, 1],
    ]
    # a padded key is never attended
    valid[0, 0] = False
    masks = pre.attention_masks(valid, pos, Span(torch.tensor([2]), 3, torch.tensor([[0, 7, 28]])))
    assert (masks["full_attention"][0, 0, :, 0] < 0).all()


@pytest.fixture(scope="module")
def narrow(_isolated_cache):
    """gemma3-tiny with a sliding window of 12: the window cuts into every prompt."""
    from star_export.load import load, materialise
    from star_export.recipes import load_recipe

    return load(materialise(load_recipe("gemma3-tiny"), {"text_config": {"sliding_window": 12}}))


@pytest.mark.parametrize(("keep", "keep1", "layer"), [(12, 30, 2), (N, N, 1)])
def test_a_biting_window_matches_the_reference_and_the_unmodified_model(gemma, narrow, keep, keep1, layer):
    """With a window of 12 the prefill still equals the dynamic reference (which builds the window in
    original positions independently), and at keep = N the unmodified model (whose window counts
    sequence indices: the same as original positions for an unpadded row)."""
    geo = narrow.geometry
    cfg = resolve(geo, keep, keep1, layer)
    feeds = make_inputs(geo, seed=7)
    pv, ids, mask = tensors(feeds)
    with torch.no_grad():
        out = Gemma3Prefill(narrow.model, geo, cfg).eval()(pv, ids, mask)
        wide = Gemma3Prefill(gemma.model, geo, cfg).eval()(pv, ids, mask)[0]
    assert rel(out[0], wide) > 1e-3  # the window matters
    refs = reference_batch(narrow.model, GEMMA, geo, pv, ids, mask, cfg.keep1, cfg.keep2, cfg.layer)
    for b, ref in enumerate(refs):
        assert out[1][b].tolist() == ref.stage1_keep_idx and out[2][b].tolist() == ref.stage2_keep_idx
        assert rel(out[0][b], ref.logits) <= 1e-5
    if keep == N:
        real = ids[0][mask[0].bool()].tolist()  # row 0 is unpadded
        assert rel(out[0][0], GEMMA.hf_unpruned_logits(narrow.model, geo, pv[0], real)) <= 1e-5


# ---------------------------------------------------------------------------- (2) the exported graphs


def test_exported_graphs_match_the_rewrite_and_are_static(gemma, export):
    geo = gemma.geometry
    manifest = json.loads((export / "manifest.json").read_text())
    cfg = resolve(geo, 8, None, 2)
    assert manifest["star"]["keep1"] == cfg.keep1 == 16 and manifest["model"]["geometry"]["arch"] == "gemma3"
    pc = prefill_contract(geo, cfg, (1, 2, 8), (2, 64, 512))
    dc = decode_contract(geo, cfg, (1, 2, 8), (2, 64, 512), 256)
    graph = onnx.load(str(export / "prefill.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"NonZero", "NonMaxSuppression", "Unique", "Compress", "Loop", "If", "Scan"}
    assert sorted(k for _, k in topk_nodes(graph)) == sorted(
        [cfg.keep1, cfg.keep2, cfg.keep1 + 1, cfg.keep2 + 1]
    )
    for name, contract in (("prefill", pc), ("decode", dc)):
        scan = check_onnx(export / f"{name}.onnx", dynamic_inputs=contract.dynamic_axes())
        assert scan.ok, scan.format()

    pre = Gemma3Prefill(gemma.model, geo, cfg).eval()
    sess = ort.InferenceSession(str(export / "prefill.onnx"), providers=["CPUExecutionProvider"])
    for batch, text_len, seed in [(1, 9, 6), (3, 19, 5)]:
        feeds = make_inputs(geo, batch=batch, text_len=text_len, seed=seed)
        got = sess.run(None, dict(feeds))
        with torch.no_grad():
            ref = pre(*tensors(feeds))
        assert np.array_equal(got[1], ref[1].numpy()) and np.array_equal(got[2], ref[2].numpy())
        assert rel(got[0], ref[0]) <= 1e-4
        for g_, r_ in zip(got[5:], ref[5:], strict=True):
            assert g_.shape == tuple(r_.shape) and rel(g_, r_) <= 1e-4


# ---------------------------------------------------------------------------- (3) greedy decoding


def test_unpruned_greedy_generation_equals_hf_generate(gemma):
    """keep1 = keep2 = N: prefill + decode give Gemma3ForConditionalGeneration.generate's greedy
    tokens and logits, batched with left padding (HF: the expanded prompt and token_type_ids)."""
    model, geo = gemma.model, gemma.geometry
    steps = 10
    cfg = resolve(geo, N, N, 2)
    pc = prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128))
    dc = decode_contract(geo, cfg, (1, 2, 8), (2, 24, 128), 64)
    feeds = dict(make_inputs(geo, batch=2, text_len=15, pad=4, seed=5))
    ours = generate(
        TorchBackend(model, geo, cfg, pc, dc), feeds, geo, cfg, GenerationConfig(max_new_tokens=steps), True
    )
    rows = []
    for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"], strict=True):
        real = ids[mask.astype(bool)].tolist()
        p = real.index(geo.image_token_id)
        rows.append(real[:p] + [geo.image_token_id] * N + real[p + 1 :])
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    hf = model.generate(
        pixel_values=torch.from_numpy(feeds["pixel_values"]),
        input_ids=input_ids,
        attention_mask=attn,
        token_type_ids=(input_ids == geo.image_token_id).long(),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert hf.sequences[:, width:].tolist() == ours.tokens
    worst = max(rel(a, b) for a, b in zip(ours.step_logits, hf.logits, strict=True))
    assert worst <= 1e-5


def test_onnxruntime_greedy_generation_equals_torch(gemma, export):
    from star_export.parity import ParityReport
    from star_export.validate import validate_generation

    geo = gemma.geometry
    cfg = resolve(geo, 8, None, 2)
    pc = prefill_contract(geo, cfg, (1, 2, 8), (2, 64, 512))
    dc = decode_contract(geo, cfg, (1, 2, 8), (2, 64, 512), 256)
    report = ParityReport()
    validate_generation(
        report,
        gemma.model,
        geo,
        cfg,
        pc,
        dc,
        str(export / "prefill.onnx"),
        str(export / "decode.onnx"),
        seed=4,
        batch=3,
        text_len=17,
        steps=12,
    )
    assert report.passed, report.format()
    assert any(r.output == "tokens" for r in report.rows)


# ---------------------------------------------------------------------------- (4) the CLI, (7) bad input


def test_cli_exports_a_saved_checkpoint_with_model_dir(tmp_path, _isolated_cache, capsys):
    """save_pretrained -> ``llava --model DIR`` (a 2-layer variant: one sliding, one global layer) with
    validation: manifest written, report PASS."""
    from star_export.load import materialise
    from star_export.recipes import load_recipe

    two = materialise(load_recipe("gemma3-tiny"), {"text_config": {"num_hidden_layers": 2}})
    out = tmp_path / "out"
    code = main(
        ["llava", "--model", str(two), "--keep", "6", "--layer", "1", "--text-len", "12", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    geo = manifest["model"]["geometry"]
    assert (geo["arch"], geo["n_visual"], geo["num_layers"]) == ("gemma3", N, 2)
    assert (
        manifest["star"]["keep1"] == 12 and manifest["image"]["image_marker"]["marker"] == "<start_of_image>"
    )
    shape = next(t for t in manifest["graphs"]["prefill"]["inputs"] if t["name"] == "pixel_values")["shape"]
    assert shape == ["batch", 3, 64, 64]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True


def _edited(gemma_dir, tmp_path, name, edit):
    """A copy of the checkpoint with ``edit(config, preprocessor)`` applied to its JSON files."""
    target = tmp_path / name
    shutil.copytree(gemma_dir, target)
    files = [target / "config.json", target / "preprocessor_config.json"]
    data = [json.loads(f.read_text()) for f in files]
    edit(*data)
    for f, d in zip(files, data, strict=True):
        f.write_text(json.dumps(d))
    return target


def _set(path: str, value):
    def edit(config, pre):
        root = {"config": config, "pre": pre}
        *keys, last = path.split(".")
        node = root
        for key in keys:
            node = node.setdefault(key, {})
        node[last] = value

    return edit


@pytest.mark.parametrize(
    ("name", "edit", "args", "message"),
    [
        ("plain", None, ["--image-size", "448"], "--image-size does not apply to gemma3"),
        ("plain", None, ["--grid", "2x2"], "--grid does not apply to gemma3"),
        ("plain", None, ["--keep", "65"], "--keep must be in 1..64"),
        (
            "size",
            _set("pre.size", {"height": 96, "width": 96}),
            [],
            "resizes to 96x96, the vision tower takes 64x64",
        ),
        (
            "rope",
            _set(
                "config.text_config.rope_parameters.full_attention",
                {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
            ),
            [],
            "rope_type 'dynamic'",
        ),
        (
            "bidir",
            _set("config.text_config.use_bidirectional_attention", True),
            [],
            "use_bidirectional_attention",
        ),
        ("pool", _set("config.mm_tokens_per_image", 48), [], "mm_tokens_per_image 48"),
        (
            "vision",
            _set("config.vision_config.model_type", "clip_vision_model"),
            [],
            "vision model 'clip_vision_model'",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    gemma_dir, tmp_path, capsys, name, edit, args, message
):
    model_dir = gemma_dir if edit is None else _edited(gemma_dir, tmp_path, name, edit)
    out = tmp_path / "o"
    code = main(["llava", "--model", str(model_dir), *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()
