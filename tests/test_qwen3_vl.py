"""STAR for Qwen3-VL: the static vision tower (learned position grid, DeepStack levels), the Qwen3
decoder's q/k norms and interleaved M-RoPE, DeepStack under pruning, the rewrite vs the dynamic
reference and the unmodified model, ONNX, generation, the CLI and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from star_export import reference
from star_export.check import check_onnx, topk_nodes
from star_export.cli import main
from star_export.contract import decode_contract, prefill_contract
from star_export.errors import UsageError
from star_export.families.qwen3_vl import FAMILY as QWEN3
from star_export.families.qwen3_vl import Qwen3VLPrefill, frequency_axes, interleaved_rope, rope_axes
from star_export.load import load, materialise
from star_export.parity import ParityReport
from star_export.recipes import load_recipe
from star_export.rewrite import Span, decoder_attention
from star_export.star import StarConfig
from star_export.validate import make_inputs, validate, validate_generation

IMAGE = 112  # patch 8, merge 2: 14 x 14 patches -> 7 x 7 = 49 merged visual tokens
EXPORT = ("qwen3-vl-tiny-keep8", "--recipe", "qwen3-vl-tiny", "--keep", "8")  # shared with test_ties/triton
REPORT_CHECKS = ("torch rewrite vs reference", "torch rewrite (keep=N) vs HF", "padded row vs alone (torch)")


@pytest.fixture(scope="module")
def qwen3_dir(_isolated_cache):
    return materialise(load_recipe("qwen3-vl-tiny"))  # save_pretrained of the seeded random recipe


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    loaded = load(qwen3_dir, options={"image_size": IMAGE})  # star_export's own loading: fp32, eager
    return loaded.model, loaded.geometry


def tensors(geo, batch=2, text_len=24, seed=0):
    """validate.make_inputs as tensors: row 0 full length, the others left padded."""
    feeds = make_inputs(geo, batch=batch, text_len=text_len, seed=seed)
    return tuple(torch.from_numpy(v) for v in feeds.values())


def rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------- geometry, vision, decoder


def test_geometry_follows_the_config_and_the_static_resolution(qwen3):
    model, geo = qwen3
    assert (geo.arch, geo.n_visual, geo.grid, geo.n_positions, geo.n_fixed) == ("qwen3_vl", 49, (7, 7), 7, 0)
    assert geo.pixel_shape == (196, 3 * 2 * 8 * 8) and geo.position_axes == 3
    # Qwen3VLTextAttention's head_dim is config.head_dim (32), not hidden_size // heads (16)
    assert geo.head_dim == model.model.language_model.layers[0].self_attn.head_dim == 32
    default = QWEN3.geometry(model.config)  # 384 px: 48 x 48 patches -> 24 x 24 merged tokens
    assert default.image_hw == (384, 384) and default.n_visual == 576 and default.n_positions == 24
    assert QWEN3.geometry(model.config, image_size=(64, 96)).grid == (4, 6)
    with pytest.raises(UsageError, match="multiple of"):
        QWEN3.geometry(model.config, image_size=100)


def test_static_vision_tower_and_deepstack_levels_equal_hf_visual(qwen3):
    """F (the merger's input, before its per-patch norm), the merged embeddings and every DeepStack
    level of the static tower (constant position-grid interpolation, 2-D RoPE, full attention)
    equal HF's Qwen3VLVisionModel run over grid_thw."""
    model, geo = qwen3
    pv, _, _ = tensors(geo, seed=9)
    pre = Qwen3VLPrefill(model, geo, StarConfig(keep2=8, keep1=16, layer=2)).eval()
    assert pre.interp_index.shape == (196, 4)  # bilinear: 4 table rows per patch, a 8 x 8 table
    with torch.no_grad():
        feats, levels = pre.encode_image(pv)
        embeds = pre.project(feats)
        for b in range(2):
            out = model.model.visual(pv[b], grid_thw=torch.tensor([[1, 14, 14]]))
            assert rel(feats[b], out.last_hidden_state.reshape(49, -1)) <= 1e-6
            assert rel(embeds[b], out.pooler_output) <= 1e-6
            assert len(levels) == len(out.deepstack_features) == 3
            for got, want in zip(levels, out.deepstack_features, strict=True):
                assert got.shape == (2, 49, geo.hidden_size) and rel(got[b], want) <= 1e-6
    # the merger normalises each patch before the 2x2 concatenation: F is taken before that norm
    assert model.model.visual.merger.norm.normalized_shape == (32,)
    assert model.model.visual.deepstack_merger_list[0].norm.normalized_shape == (4 * 32,)


def test_interleaved_mrope_equals_hf_and_equal_components_are_1d_rope(qwen3):
    """The Gather form of Qwen3VLTextRotaryEmbedding is bit-equal to HF's; with t = h = w it is
    plain 1-D RoPE (the decode graph's scalar position), and not with unequal components."""
    model, geo = qwen3
    rotary = model.model.language_model.rotary_emb
    assert frequency_axes([24, 20, 20], 64) == [0, 1, 2] * 20 + [0] * 4  # the real checkpoints'
    assert frequency_axes(rotary.mrope_section, 16) == [0, 1, 2] * 5 + [0]
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 900, (3, 2, 11), generator=g)
    h = torch.zeros(2, 11, geo.hidden_size)
    for ours, hf in zip(interleaved_rope(rotary, rope_axes(rotary), h, pos), rotary(h, pos), strict=True):
        assert torch.equal(ours, hf)
    flat = torch.tensor([[0, 5, 77, 500]])
    cos, sin = interleaved_rope(rotary, rope_axes(rotary), h[:1, :4], flat[None].expand(3, -1, -1))
    freqs = flat[..., None].float() * rotary.inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    assert torch.allclose(cos, emb.cos(), atol=1e-6) and torch.allclose(sin, emb.sin(), atol=1e-6)
    cos3, _ = rotary(h[:1, :4], torch.stack([flat, flat + 1, flat + 2]))
    assert not torch.allclose(cos3, emb.cos(), atol=1e-3)


def test_hf_rope_index_lays_out_the_image_as_the_rewrite_does(qwen3):
    """get_rope_index on the expanded prompt: text t = h = w; merged token (r, c) at (s, s + r, s + c);
    text after the image from s + max(rows, cols)."""
    model, geo = qwen3
    ids = [5, 6, 7, geo.image_token_id, 8, 9]
    pos = QWEN3.full_positions(model, geo, None, ids)  # (3, 5 + 49)
    r, c = torch.arange(49) // 7, torch.arange(49) % 7
    assert torch.equal(pos[:, :3], torch.arange(3).expand(3, -1))
    assert torch.equal(pos[:, 3:52], torch.stack([torch.full((49,), 3), 3 + r, 3 + c]))
    assert torch.equal(pos[:, 52:], torch.tensor([10, 11]).expand(3, -1))


def test_generic_decoder_attention_equals_qwen3_attention_with_its_qk_norms(qwen3):
    """rewrite.decoder_attention applies the module's own q_norm / k_norm (RMSNorm over head_dim,
    eps rms_norm_eps) before RoPE: outputs and probabilities equal Qwen3VLTextAttention (eager)."""
    model, geo = qwen3
    lm = model.model.language_model
    attn = lm.layers[1].self_attn
    eps = model.config.text_config.rms_norm_eps
    assert attn.q_norm.variance_epsilon == attn.k_norm.variance_epsilon == eps
    assert attn.q_norm.weight.shape == (geo.head_dim,) and attn.scaling == geo.head_dim**-0.5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, geo.hidden_size, generator=g)
    saved = [attn.q_norm.weight.clone(), attn.k_norm.weight.clone()]
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):  # non-trivial norm weights
            norm.weight.copy_(1 + torch.randn(geo.head_dim, generator=g))
        pos = torch.randint(0, 50, (3, 1, 9), generator=g)
        cos, sin = lm.rotary_emb(x, pos)
        mask = torch.full((9, 9), torch.finfo(torch.float32).min).triu(1)[None, None]
        want, want_probs = attn(x, position_embeddings=(cos, sin), attention_mask=mask)
        got, _, _, probs = decoder_attention(attn, x, cos, sin, mask, geo.head_dim)
        for norm, weight in zip((attn.q_norm, attn.k_norm), saved, strict=True):
            norm.weight.copy_(weight)
    assert rel(got, want) <= 1e-6 and rel(probs, want_probs) <= 1e-6


# ---------------------------------------------------------------------------- (1) rewrite vs reference vs HF


@pytest.mark.parametrize(("keep", "keep1", "layer"), [(8, 20, 2), (5, 12, 1), (12, 30, 3)])
def test_validate_report_passes_with_exact_indices(qwen3, keep, keep1, layer):
    """Rewrite vs the dynamic reference (kept indices exact, logits 1e-5), keep = N vs the unmodified
    transformers model (1e-5) and a left-padded row vs the row alone, fp32."""
    model, geo = qwen3
    cfg = StarConfig(keep2=keep, keep1=keep1, layer=layer)
    report = validate(model, geo, cfg, prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128)), None, seed=layer)
    assert report.passed, report.format()
    assert {r.check for r in report.rows} == set(REPORT_CHECKS)
    for row in report.rows:
        if row.output.endswith("keep_idx"):
            assert row.rule == "exact" and row.overlap == 1.0, row
        else:
            assert row.rule == "tol" and row.max_rel <= 1e-5, row


class NoDeepStack(Qwen3VLPrefill):
    def after_layer(self, i, h, span):
        return h


class DeepStackBeforeKOnly(Qwen3VLPrefill):
    def after_layer(self, i, h, span):
        return h if i >= self.cfg.layer else super().after_layer(i, h, span)


class DeepStackBySlot(Qwen3VLPrefill):
    """Wrong on purpose: level rows by span slot instead of by the kept patch index."""

    def after_layer(self, i, h, span):
        slots = torch.arange(span.length).expand(h.shape[0], -1)
        return super().after_layer(i, h, Span(span.start, span.length, slots, span.extras))


@pytest.mark.parametrize(("keep", "keep1", "layer"), [(6, 18, 1), (6, 18, 2)])
def test_deepstack_levels_follow_the_kept_tokens_before_and_after_k(qwen3, keep, keep1, layer):
    """Three levels are added after decoder layers 0, 1, 2: with K = 1 or 2 some before K (stage-1
    tokens) and some from K on (stage-2 tokens, after stage 2 dropped some). The rewrite equals the
    reference (HF's own _deepstack_process on the kept candidates); dropping the levels, dropping the
    ones from K on, or gathering them by slot instead of by patch moves the logits far off."""
    model, geo = qwen3
    cfg = StarConfig(keep2=keep, keep1=keep1, layer=layer)
    pv, ids, mask = tensors(geo, seed=11)
    refs = reference.reference_batch(model, QWEN3, geo, pv, ids, mask, cfg.keep1, cfg.keep2, cfg.layer)
    want = torch.stack([r.logits for r in refs])
    with torch.no_grad():
        out = Qwen3VLPrefill(model, geo, cfg).eval()(pv, ids, mask)
        assert [out[2][b].tolist() for b in range(2)] == [r.stage2_keep_idx for r in refs]
        assert rel(out[0], want) <= 1e-5
        dropped = set(refs[0].stage1_keep_idx) - set(refs[0].stage2_keep_idx)
        assert len(dropped) == keep1 - keep  # stage 2 really drops tokens the levels would add to
        for wrong in (NoDeepStack, DeepStackBeforeKOnly, DeepStackBySlot):
            assert rel(wrong(model, geo, cfg).eval()(pv, ids, mask)[0], want) > 1e-2, wrong.__name__


# ---------------------------------------------------------------------------- (3) generation vs HF generate


def test_unpruned_greedy_generation_equals_hf_generate(qwen3):
    """keep1 = keep2 = N: the runtime's prefill + decode loop on the PyTorch rewrite gives HF
    generate's greedy tokens and logits (a batch of 2, one row left padded; HF takes the expanded
    prompt with image_grid_thw and mm_token_type_ids, and adds the DeepStack levels itself)."""
    from star_export.runtime import GenerationConfig, TorchBackend, generate

    model, geo = qwen3
    steps = 8
    cfg = StarConfig(keep2=geo.n_visual, keep1=geo.n_visual, layer=2)
    feeds = make_inputs(geo, batch=2, text_len=13, pad=3, seed=8)
    pc = prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128))
    dc = decode_contract(geo, cfg, (1, 2, 8), (2, 24, 128), 16)
    ours = generate(
        TorchBackend(model, geo, cfg, pc, dc), feeds, geo, cfg, GenerationConfig(steps), keep_logits=True
    )

    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    expanded = [QWEN3.expanded(geo, [int(t) for t in ids[b][mask[b] == 1]])[0] for b in range(2)]
    width = max(map(len, expanded))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in expanded])
    greedy = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False, "pad_token_id": 0}
    model.model.rope_deltas = None
    hf = model.generate(
        pixel_values=torch.from_numpy(feeds["pixel_values"]).reshape(-1, geo.pixel_shape[1]),
        image_grid_thw=QWEN3.grid_thw(geo).expand(2, -1),
        input_ids=input_ids,
        attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in expanded]),
        mm_token_type_ids=(input_ids == geo.image_token_id).long(),
        **greedy,
        return_dict_in_generate=True,
        output_logits=True,
    )
    model.model.rope_deltas = None
    assert hf.sequences[:, width:].tolist() == ours.tokens
    worst = max(rel(torch.from_numpy(a), b) for a, b in zip(ours.step_logits, hf.logits, strict=True))
    assert worst <= 1e-5


# ---------------------------------------------------------------------------- (2), (3) ONNX


@pytest.fixture(scope="module")
def exported(cli_export, qwen3):
    """The recipe exported by the CLI (--keep 8: keep1 16, K 2), shared with test_ties and test_triton."""
    from star_export.geometry import Geometry
    from star_export.manifest import star_config

    out = cli_export(*EXPORT)
    manifest = json.loads((out / "manifest.json").read_text())
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    assert geo == qwen3[1]
    return out, geo, star_config(manifest, geo, "test")


def test_onnx_export_is_static_and_matches_the_rewrite(exported, qwen3):
    out, geo, cfg = exported
    model = qwen3[0]
    assert (cfg.keep1, cfg.keep2, cfg.layer) == (16, 8, 2) and geo.arch == "qwen3_vl"
    pc = prefill_contract(geo, cfg, (1, 2, 8), (2, 64, 512))
    dc = decode_contract(geo, cfg, (1, 2, 8), (2, 64, 512), 256)
    for name, contract in (("prefill", pc), ("decode", dc)):
        scan = check_onnx(out / f"{name}.onnx", dynamic_inputs=contract.dynamic_axes())
        assert scan.ok, scan.format()
        graph = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        ops = {n.op_type for n in graph.graph.node}
        # the interleaved M-RoPE is a Gather, not HF's in-place slice writes (ScatterND)
        assert not ops & {"NonZero", "Loop", "If", "Scan", "ScatterND", "ScatterElements"}, ops
        if name == "prefill":
            assert sorted(k for _, k in topk_nodes(graph)) == [8, 9, 16, 17]  # literal Ks

    pre = QWEN3.prefill_module(model, geo, cfg).eval()
    dec = QWEN3.decode_module(model, geo, cfg).eval()
    sess = ort.InferenceSession(str(out / "prefill.onnx"), providers=["CPUExecutionProvider"])
    dsess = ort.InferenceSession(str(out / "decode.onnx"), providers=["CPUExecutionProvider"])
    feeds = make_inputs(geo, batch=3, text_len=23, seed=5)
    got = sess.run(None, dict(feeds))
    with torch.no_grad():
        ref = pre(*(torch.from_numpy(v) for v in feeds.values()))
    assert np.array_equal(got[1], ref[1].numpy()) and np.array_equal(got[2], ref[2].numpy())
    assert rel(got[0], ref[0]) <= 1e-4
    for g_, r_ in zip(got[5:], ref[5:], strict=True):
        assert g_.shape == tuple(r_.shape) and rel(g_, r_) <= 1e-4
    # one decode step on the prefill presents: the scalar position of the first new token
    real = feeds["attention_mask"].sum(1)
    pad = 23 - real
    masks = [
        np.concatenate([(np.arange(n)[None] >= pad[:, None]), np.ones((3, 1), bool)], 1).astype(np.int64)
        for n in (22 + cfg.keep1, 22 + cfg.keep2)
    ]
    step = {
        "input_ids": np.full((3, 1), 7),
        "position_ids": (real - 1 + geo.n_positions)[:, None],
        "attention_mask_l1": masks[0],
        "attention_mask_l2": masks[1],
        **{f"past.{i // 2}.{('key', 'value')[i % 2]}": r_.numpy() for i, r_ in enumerate(ref[5:])},
    }
    dgot = dsess.run(None, step)
    with torch.no_grad():
        dref = dec(*(torch.from_numpy(v) for v in step.values()))
    assert rel(dgot[0], dref[0]) <= 1e-4


def test_onnxruntime_greedy_generation_equals_torch(exported, qwen3):
    out, geo, cfg = exported
    report = ParityReport()
    pc = prefill_contract(geo, cfg, (1, 2, 8), (2, 64, 512))
    dc = decode_contract(geo, cfg, (1, 2, 8), (2, 64, 512), 256)
    paths = (str(out / "prefill.onnx"), str(out / "decode.onnx"))
    validate_generation(report, qwen3[0], geo, cfg, pc, dc, *paths)
    assert report.passed, report.format()
    assert {r.output for r in report.rows} == {"tokens", "logits (every step)", "cache lengths L1/L2+t"}


# ---------------------------------------------------------------------------- (4) the CLI, (7) bad input


def test_cli_exports_a_saved_checkpoint_with_model_dir(qwen3_dir, tmp_path, capsys):
    """save_pretrained -> llava --model DIR at 64x96 (4 x 6 = 24 merged tokens), K = 1: validated
    (onnxruntime vs torch vs reference vs HF, generation), manifest written, report PASS."""
    out = tmp_path / "out"
    args = ["llava", "--model", str(qwen3_dir), "--image-size", "64x96", "--keep", "6", "--layer", "1"]
    code = main([*args, "--text-len", "12", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    geo = manifest["model"]["geometry"]
    assert (geo["arch"], geo["n_visual"], geo["n_positions"], geo["grid"]) == ("qwen3_vl", 24, 6, [4, 6])
    assert manifest["star"]["keep1"] == 12 and manifest["star"]["keep2"] == 6 and manifest["layout"]
    shape = next(t for t in manifest["graphs"]["prefill"]["inputs"] if t["name"] == "pixel_values")["shape"]
    assert shape == ["batch", 96, 384]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    checks = {r["check"] for r in report["rows"]}
    assert {
        "onnxruntime vs torch (batch)",
        "torch rewrite vs reference",
        "torch rewrite (keep=N) vs HF",
    } <= checks


def test_preprocessor_matches_the_checkpoints_image_processor(qwen3_dir, qwen3):
    """The export's patch pre-processing equals the processor transformers maps qwen3_vl to."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from star_export.preprocess import Preprocessor

    _, geo = qwen3
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((IMAGE, IMAGE, 3)) * 255).astype("uint8"))
    feeds = Preprocessor.from_dir(qwen3_dir, geometry=geo).encode([image], ["what is this?"])
    hf = AutoImageProcessor.from_pretrained(qwen3_dir, backend="pil")(images=image, return_tensors="np")
    assert hf["image_grid_thw"].tolist() == [[1, 14, 14]]
    assert np.abs(feeds["pixel_values"][0] - hf["pixel_values"]).max() < 1e-5
    assert (feeds["input_ids"] == geo.image_token_id).sum() == 1


def dynamic_rope_checkpoint(qwen3_dir, tmp_path):
    moved = tmp_path / "dynamic"
    shutil.copytree(qwen3_dir, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["text_config"]["rope_parameters"]["rope_type"] = "dynamic"
    (moved / "config.json").write_text(json.dumps(cfg))
    return moved


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image-size", "100"], "multiple of"),
        (["--image-size", "112x100"], "multiple of"),
        (["--image-size", "16x16"], "outside the checkpoint's image processor range"),
        (["--image-size", "2048"], "outside the checkpoint's image processor range"),
        (["--grid", "2x2"], "does not apply to qwen3_vl"),
        (["--keep", "50"], "--keep must be in 1..49"),
        (["--layer", "4"], "--layer must be in 1..3"),
        ("dynamic-rope", "rope_type 'dynamic'"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(qwen3_dir, tmp_path, capsys, extra, message):
    model = qwen3_dir
    if extra == "dynamic-rope":
        model, extra = dynamic_rope_checkpoint(qwen3_dir, tmp_path), []
    out = tmp_path / "o"
    args = ["llava", "--model", str(model), "--image-size", "112", "--keep", "8", *extra]
    code = main([*args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()
