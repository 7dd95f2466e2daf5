"""STAR for Qwen2-VL: the static rewrite vs the dynamic reference, the unmodified model, ONNX and generate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from star_export.check import check_onnx, topk_nodes
from star_export.cli import main
from star_export.contract import decode_contract, prefill_contract
from star_export.encoding import patchify
from star_export.errors import UsageError
from star_export.families.qwen2_vl import FAMILY as QWEN
from star_export.families.qwen2_vl import MRopeDecode as Qwen2VLDecode
from star_export.families.qwen2_vl import Qwen2VLPrefill
from star_export.geometry import Geometry
from star_export.manifest import star_config
from star_export.reference import reference_batch as _reference_batch
from star_export.star import StarConfig

IMAGE = 112  # patch 8, merge 2: 14 x 14 patches -> 7 x 7 = 49 merged visual tokens
IMAGE_TOKEN = 1000


@pytest.fixture(scope="module")
def qwen_dir(_isolated_cache):
    """The qwen2-vl-tiny recipe saved with save_pretrained (seeded random weights, tokenizer)."""
    from star_export.load import materialise
    from star_export.recipes import load_recipe

    return materialise(load_recipe("qwen2-vl-tiny"))


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    """Loaded back through star_export's own loading code (fp32, eager), 112 px static resolution."""
    from star_export.load import load

    loaded = load(qwen_dir, options={"image_size": IMAGE})
    return loaded.model, loaded.geometry


def resolve(geo, keep, keep1, layer):
    return StarConfig.resolve(
        keep=keep, keep1=keep1, layer=layer, n_visual=geo.n_visual, num_layers=geo.num_layers
    )


def make_inputs(geo, batch=2, text_len=14, pad=4, seed=0):
    """Seeded pixels and prompts; row 0 full length, the other rows left padded by ``pad``."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, *geo.pixel_shape, generator=g)
    ids = torch.randint(3, 900, (batch, text_len), generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    for b in range(batch):
        n_pad = 0 if b == 0 else pad
        mask[b, :n_pad] = 0
        ids[b, :n_pad] = 0
        ids[b, int(torch.randint(n_pad + 2, text_len - 2, (1,), generator=g))] = IMAGE_TOKEN
    return pixel_values, ids, mask


def rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())


def reference_batch(model, pv, ids, mask, keep1, keep2, layer):
    return _reference_batch(
        model, QWEN, QWEN.geometry(model.config, image_size=IMAGE), pv, ids, mask, keep1, keep2, layer
    )


def hf_unpruned_logits(model, pv, ids):
    return QWEN.hf_unpruned_logits(model, QWEN.geometry(model.config, image_size=IMAGE), pv, ids)


def real_ids(ids, mask, b) -> list[int]:
    return [int(t) for t, m in zip(ids[b], mask[b], strict=True) if m]


# ---------------------------------------------------------------------------- geometry and layout


def test_geometry_and_pixel_layout_match_the_hf_processor(qwen):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model, geo = qwen
    assert (geo.arch, geo.n_visual, geo.grid, geo.n_positions, geo.n_fixed) == ("qwen2_vl", 49, (7, 7), 7, 0)
    assert geo.pixel_shape == (196, 3 * 2 * 8 * 8) and geo.head_dim == 16 and geo.num_kv_heads == 2
    with pytest.raises(UsageError, match="multiple of"):
        QWEN.geometry(model.config, image_size=100)

    proc = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((IMAGE, IMAGE, 3)) * 255).astype("uint8"))
    out = proc(images=image, return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 14, 14]]
    assert out["pixel_values"].shape == geo.pixel_shape
    # the documented layout: normalise, then patchify (block-major over merge blocks, frame repeated)
    arr = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean, std = np.array(proc.image_mean)[:, None, None], np.array(proc.image_std)[:, None, None]
    ours = patchify(((arr - mean) / std).astype(np.float32), 8, 2, 2)
    assert np.abs(ours - out["pixel_values"]).max() < 1e-5


def test_mrope_with_equal_components_is_1d_rope(qwen):
    """Decode feeds a scalar position: M-RoPE with t = h = w must be plain 1-D RoPE."""
    model, geo = qwen
    rotary = model.model.language_model.rotary_emb
    pos = torch.tensor([[0, 5, 77, 500]])
    h = torch.zeros(1, 4, geo.hidden_size)
    cos, sin = rotary(h, pos[None].expand(3, -1, -1))
    freqs = pos[..., None].float() * rotary.inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    assert torch.allclose(cos, emb.cos(), atol=1e-6) and torch.allclose(sin, emb.sin(), atol=1e-6)
    # and M-RoPE is not 1-D RoPE when the components differ (the h/w sections move)
    cos3, _ = rotary(h, torch.stack([pos, pos + 1, pos + 2]))
    assert not torch.allclose(cos3, emb.cos(), atol=1e-3)


def test_static_vision_tower_equals_hf_visual(qwen):
    model, geo = qwen
    pv, _, _ = make_inputs(geo, seed=9)
    pre = Qwen2VLPrefill(model, geo, resolve(geo, 8, None, 2)).eval()
    with torch.no_grad():
        feats = pre.vision_features(pv)  # (B, N, 4 * 32)
        embeds = pre.project(feats)
        for b in range(2):
            out = model.model.visual(pv[b], grid_thw=torch.tensor([[1, 14, 14]]))
            assert rel(feats[b], out.last_hidden_state.reshape(49, -1)) <= 1e-6
            assert rel(embeds[b], out.pooler_output) <= 1e-6


# ---------------------------------------------------------------------------- (a) rewrite vs reference

SETTINGS = [(8, 20, 2), (5, None, 1), (16, 16, 3), (49, 49, 2)]


@pytest.mark.parametrize(("keep", "keep1", "layer"), SETTINGS)
def test_rewrite_matches_reference(qwen, keep, keep1, layer):
    model, geo = qwen
    cfg = resolve(geo, keep, keep1, layer)
    pv, ids, mask = make_inputs(geo, seed=keep + layer)
    with torch.no_grad():
        out = Qwen2VLPrefill(model, geo, cfg).eval()(pv, ids, mask)
    refs = reference_batch(model, pv, ids, mask, cfg.keep1, cfg.keep2, cfg.layer)
    t = ids.shape[1]
    assert (
        out[0].shape == (2, geo.vocab_size)
        and out[1].shape == (2, cfg.keep1)
        and out[2].shape == (2, cfg.keep2)
    )
    for b, ref in enumerate(refs):
        assert out[1][b].tolist() == ref.stage1_keep_idx
        assert out[2][b].tolist() == ref.stage2_keep_idx
        assert rel(out[0][b], ref.logits) <= 1e-5
        n_pad = int((mask[b] == 0).sum())
        for i in range(geo.num_layers):
            length = t - 1 + (cfg.keep1 if i < cfg.layer else cfg.keep2)
            for j in range(2):
                got = out[5 + 2 * i + j]
                assert got.shape == (2, geo.num_kv_heads, length, geo.head_dim)
                assert rel(got[b, :, n_pad:], ref.presents[i][j]) <= 1e-5
    if cfg.keep2 < geo.n_visual:  # pruning must matter
        full = StarConfig(keep2=geo.n_visual, keep1=geo.n_visual, layer=layer)
        with torch.no_grad():
            unpruned = Qwen2VLPrefill(model, geo, full).eval()(pv, ids, mask)[0]
        assert rel(out[0], unpruned) > 1e-3


# ---------------------------------------------------------------------------- (b), (c)


def test_unpruned_rewrite_equals_unmodified_hf_model(qwen):
    model, geo = qwen
    cfg = resolve(geo, geo.n_visual, geo.n_visual, 2)
    pv, ids, mask = make_inputs(geo, seed=3)
    with torch.no_grad():
        out = Qwen2VLPrefill(model, geo, cfg).eval()(pv, ids, mask)
    for b in range(2):
        assert rel(out[0][b], hf_unpruned_logits(model, pv[b], real_ids(ids, mask, b))) <= 1e-5


def test_left_padded_row_equals_the_row_alone(qwen):
    model, geo = qwen
    cfg = resolve(geo, 6, 18, 2)
    pv, ids, mask = make_inputs(geo, pad=5, seed=4)
    pre = Qwen2VLPrefill(model, geo, cfg).eval()
    keep = mask[1].bool()
    with torch.no_grad():
        both = pre(pv, ids, mask)
        alone = pre(pv[1:], ids[1:, keep], mask[1:, keep])
    assert both[1][1].tolist() == alone[1][0].tolist() and both[2][1].tolist() == alone[2][0].tolist()
    assert rel(both[0][1], alone[0][0]) <= 1e-5
    for i in range(2 * geo.num_layers):
        assert rel(both[5 + i][1, :, 5:], alone[5 + i][0]) <= 1e-5


# ---------------------------------------------------------------------------- (d) ONNX


EXPORT = ("qwen2-vl-tiny-keep8", "--recipe", "qwen2-vl-tiny", "--keep", "8")  # shared with test_ties/triton


def test_onnx_export_matches_the_rewrite_and_is_static(qwen, cli_export):
    """The CLI's export of the recipe (--keep 8: keep1 16, K 2; shared with test_ties, test_keep_range
    and test_triton) is static and equals the rewrite built from its manifest's STAR settings."""
    model, geo = qwen
    out = cli_export(*EXPORT)
    manifest = json.loads((out / "manifest.json").read_text())
    assert Geometry.from_dict(manifest["model"]["geometry"]) == geo
    cfg = star_config(manifest, geo, "test")
    assert (cfg.keep1, cfg.keep2, cfg.layer) == (16, 8, 2)
    pc = prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128))
    dc = decode_contract(geo, cfg, (1, 2, 8), (2, 24, 128), 16)
    assert pc.inputs[0].shape == ("batch", *geo.pixel_shape)
    pre = Qwen2VLPrefill(model, geo, cfg).eval()
    dec = Qwen2VLDecode(model, geo, cfg).eval()
    graph = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"NonZero", "NonMaxSuppression", "Unique", "Compress", "Loop", "If", "Scan"}
    assert sorted(k for _, k in topk_nodes(graph)) == sorted(
        [cfg.keep1, cfg.keep2, cfg.keep1 + 1, cfg.keep2 + 1]
    )
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input
    }
    assert dims == {
        "pixel_values": ["batch", *geo.pixel_shape],
        "input_ids": ["batch", "text_len"],
        "attention_mask": ["batch", "text_len"],
    }
    assert [o.name for o in graph.graph.output] == pc.output_names
    for name, contract in (("prefill", pc), ("decode", dc)):
        scan = check_onnx(out / f"{name}.onnx", dynamic_inputs=contract.dynamic_axes())
        assert scan.ok, scan.format()

    sess = ort.InferenceSession(str(out / "prefill.onnx"), providers=["CPUExecutionProvider"])
    dsess = ort.InferenceSession(str(out / "decode.onnx"), providers=["CPUExecutionProvider"])
    for batch, text_len, seed in [(2, 14, 5), (3, 23, 6)]:
        pv, ids, mask = make_inputs(geo, batch=batch, text_len=text_len, seed=seed)
        got = sess.run(
            None, {"pixel_values": pv.numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        )
        with torch.no_grad():
            ref = pre(pv, ids, mask)
        assert np.array_equal(got[1], ref[1].numpy()) and np.array_equal(got[2], ref[2].numpy())
        assert rel(got[0], ref[0]) <= 1e-4
        for g_, r_ in zip(got[5:], ref[5:], strict=True):
            assert g_.shape == tuple(r_.shape) and rel(g_, r_) <= 1e-4
        # one decode step on the prefill presents
        real = mask.sum(1)
        pad = text_len - real
        l1, l2 = text_len - 1 + cfg.keep1, text_len - 1 + cfg.keep2
        feeds = {
            "input_ids": torch.full((batch, 1), 7),
            "position_ids": (real - 1 + geo.n_positions)[:, None],
            "attention_mask_l1": torch.cat(
                [(torch.arange(l1)[None] >= pad[:, None]).long(), torch.ones(batch, 1, dtype=torch.long)], 1
            ),
            "attention_mask_l2": torch.cat(
                [(torch.arange(l2)[None] >= pad[:, None]).long(), torch.ones(batch, 1, dtype=torch.long)], 1
            ),
        }
        pasts = {f"past.{i // 2}.{('key', 'value')[i % 2]}": r_ for i, r_ in enumerate(ref[5:])}
        dgot = dsess.run(None, {k: v.numpy() for k, v in {**feeds, **pasts}.items()})
        with torch.no_grad():
            dref = dec(*feeds.values(), *pasts.values())
        assert rel(dgot[0], dref[0]) <= 1e-4


# ---------------------------------------------------------------------------- (e) generation


def test_unpruned_greedy_generation_equals_hf_generate(qwen):
    """keep1 = keep2 = N: prefill + 8 decode steps give HF generate's greedy tokens (batch of 2,
    one row left padded; HF takes the expanded prompt with image_grid_thw)."""
    model, geo = qwen
    steps = 8
    cfg = resolve(geo, geo.n_visual, geo.n_visual, 2)
    pv, ids, mask = make_inputs(geo, text_len=13, pad=3, seed=8)
    pre, dec = Qwen2VLPrefill(model, geo, cfg).eval(), Qwen2VLDecode(model, geo, cfg).eval()

    batch, text_len = ids.shape
    real = mask.sum(1)
    pad = text_len - real
    length = text_len - 1 + geo.n_visual
    m1 = (torch.arange(length)[None] >= pad[:, None]).long()
    m2 = m1.clone()
    tokens, step_logits = [], []
    with torch.no_grad():
        out = pre(pv, ids, mask)
        logits, pasts = out[0], list(out[5:])
        for step in range(steps):
            token = logits.argmax(-1)
            tokens.append(token)
            step_logits.append(logits)
            if step == steps - 1:
                break
            one = torch.ones(batch, 1, dtype=torch.long)
            m1, m2 = torch.cat([m1, one], 1), torch.cat([m2, one], 1)
            position = (real - 1 + geo.n_positions + step)[:, None]
            out = dec(token[:, None], position, m1, m2, *pasts)
            logits, pasts = out[0], list(out[1:])
    ours = torch.stack(tokens, 1).tolist()

    rows = [real_ids(ids, mask, b) for b in range(batch)]
    expanded = []
    for r in rows:
        p = r.index(IMAGE_TOKEN)
        expanded.append(r[:p] + [IMAGE_TOKEN] * geo.n_visual + r[p + 1 :])
    width = max(map(len, expanded))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in expanded])
    attn = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in expanded])
    model.model.rope_deltas = None
    hf = model.generate(
        pixel_values=pv.reshape(-1, geo.pixel_shape[1]),
        image_grid_thw=torch.tensor([[1, 14, 14]] * batch),
        input_ids=input_ids,
        attention_mask=attn,
        mm_token_type_ids=(input_ids == IMAGE_TOKEN).long(),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    model.model.rope_deltas = None
    assert hf.sequences[:, width:].tolist() == ours
    # the logits too: a random tiny model's greedy tokens can miss a wrong decode position
    assert len(hf.logits) == steps
    worst = max(rel(a, b) for a, b in zip(step_logits, hf.logits, strict=True))
    assert worst <= 1e-5


# ---------------------------------------------------------------------------- the parity report and the CLI


def test_validate_report_passes_for_qwen2vl(qwen):
    """The same report as LLaVA's (rewrite vs reference vs unmodified model, padded vs alone)."""
    from star_export.validate import validate

    model, geo = qwen
    cfg = resolve(geo, 12, 30, 2)
    contract = prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128))
    report = validate(model, geo, cfg, contract, onnx_path=None, seed=3)
    assert report.passed, report.format()
    assert {"torch rewrite vs reference", "torch rewrite (keep=N) vs HF", "padded row vs alone (torch)"} <= {
        r.check for r in report.rows
    }


def test_preprocessor_resizes_to_the_static_square_and_patchifies(qwen_dir, qwen):
    from PIL import Image

    from star_export.preprocess import Preprocessor

    _, geo = qwen
    pre = Preprocessor.from_dir(qwen_dir, geometry=geo)
    rng = np.random.default_rng(1)
    wide = Image.fromarray((rng.random((60, 150, 3)) * 255).astype("uint8"))
    feeds = pre.encode([wide, wide.resize((IMAGE, IMAGE), Image.Resampling.BICUBIC)], ["a", "what is this?"])
    assert feeds["pixel_values"].shape == (2, *geo.pixel_shape)
    # any image is first resized to IMAGE x IMAGE: the same pixels as a pre-resized one
    np.testing.assert_allclose(feeds["pixel_values"][0], feeds["pixel_values"][1], atol=1e-6)
    assert (feeds["input_ids"] == geo.image_token_id).sum(axis=1).tolist() == [1, 1]


def test_cli_exports_a_saved_qwen2vl_checkpoint_with_model_dir(qwen_dir, tmp_path, capsys):
    import json

    from star_export.cli import main

    out = tmp_path / "out"
    args = ["llava", "--model", str(qwen_dir), "--image-size", "64", "--keep", "6", "--out", str(out)]
    code = main([*args, "--text-len", "12"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    geo = manifest["model"]["geometry"]
    # 64 px / patch 8 = 8 x 8 patches -> 4 x 4 = 16 merged tokens, text after the image at s + 4
    assert (geo["arch"], geo["n_visual"], geo["n_positions"], geo["grid"]) == ("qwen2_vl", 16, 4, [4, 4])
    assert manifest["star"]["keep1"] == 12 and manifest["star"]["keep2"] == 6
    shape = next(t for t in manifest["graphs"]["prefill"]["inputs"] if t["name"] == "pixel_values")["shape"]
    assert shape == ["batch", 64, 384]
    assert json.loads((out / "report.json").read_text())["passed"] is True


def test_cli_refuses_an_image_size_off_the_patch_grid(qwen_dir, tmp_path, capsys):
    from star_export.cli import main

    code = main(["llava", "--model", str(qwen_dir), "--image-size", "100", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "multiple of" in err[0] and not (tmp_path / "o").exists()


def test_preprocessor_takes_the_processors_chat_template_json(qwen_dir, qwen, tmp_path):
    """Qwen checkpoints may keep the template in chat_template.json (the processor's) only."""
    import json
    import shutil

    from PIL import Image

    from star_export.preprocess import Preprocessor

    _, geo = qwen
    moved = tmp_path / "ckpt"
    shutil.copytree(qwen_dir, moved)
    template = (moved / "chat_template.jinja").read_text()
    (moved / "chat_template.jinja").unlink()
    (moved / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    pre = Preprocessor.from_dir(moved, geometry=geo)
    ref = Preprocessor.from_dir(qwen_dir, geometry=geo)
    image = Image.new("RGB", (40, 30), "red")
    got, want = pre.encode([image], ["what is it?"]), ref.encode([image], ["what is it?"])
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


@pytest.mark.parametrize("size", [(112, 160), (160, 112)])
def test_non_square_static_resolutions_pass_the_parity_checks(qwen_dir, size):
    """--image-size HxW keeps the images' aspect ratio: a rows x cols merged grid with M-RoPE
    rows/columns as HF's get_rope_index gives them; rewrite vs reference vs the unmodified model."""
    from star_export.load import load
    from star_export.validate import validate

    loaded = load(qwen_dir, options={"image_size": size})
    geo = loaded.geometry
    rows, cols = size[0] // 16, size[1] // 16
    assert geo.grid == (rows, cols) and geo.image_hw == size and geo.n_positions == max(rows, cols)
    assert geo.pixel_shape == (rows * cols * 4, 384) and geo.n_visual == rows * cols
    cfg = resolve(geo, 12, 30, 2)
    report = validate(
        loaded.model, geo, cfg, prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128)), None, seed=1
    )
    assert report.passed, report.format()


def test_image_sizes_outside_the_processor_range_or_the_merge_grid_are_refused(qwen_dir, tmp_path, capsys):
    for size, message in (
        ("16x16", "outside the checkpoint's image processor range"),
        ("112x100", "multiple of"),
    ):
        code = main(["llava", "--model", str(qwen_dir), "--image-size", size, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o").exists()
