"""Half-precision exports validated on CPU (issue #11): fp16 graphs run in onnxruntime's CPU provider
against the PyTorch rewrite in fp16 and in fp32, by the selection-with-margin rule and forced-
selection parity; a deliberately broken fp16 graph still fails; bf16 says what it cannot check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from star_export import selection
from star_export.cli import main


def test_an_fp16_export_passes_validate_with_margins_and_forced_rows(cli_export, capsys):
    out = cli_export("llava-keep16-fp16", "--keep", "16", "--dtype", "fp16")
    assert main(["validate", "--from", str(out)]) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    assert "overall: PASS" in printed
    report = json.loads((out / "report.json").read_text())
    checks = {r["check"] for r in report["rows"]}
    assert {
        "torch rewrite vs reference",
        "torch rewrite (keep=N) vs HF",
        "torch fp16 vs torch fp32 (batch)",
        "onnxruntime fp16 vs torch fp16 (batch)",
        "onnxruntime fp16 vs torch fp16 (row alone)",
        "onnxruntime fp16 vs torch fp32 (batch)",
        "padded row vs alone (onnxruntime fp16)",
        "generate onnxruntime vs torch fp16 (8 steps, teacher-forced)",
    } <= checks
    noise = report["inputs"]["score_noise"]
    assert noise["dtype"] == "float16" and noise["emulated"][0] > 0 and noise["measured"][0] > 0
    fp16_rows = [r for r in report["rows"] if "fp16" in r["check"]]
    for r in fp16_rows:
        if r["output"].endswith("_keep_idx"):  # selection rows: overlap, largest gap, margin, rule
            assert r["rule"] in ("exact", "margin") and 0.5 < r["overlap"] <= 1.0
            assert r["tolerance"] >= selection.MARGIN_EPS * selection.EPS["float16"]
            assert r["gap"] <= r["tolerance"]
        elif r["output"] == "logits":
            assert r["rule"] in ("tol", "forced") and r["tolerance"] == selection.logits_tolerance(
                "float16", 0
            )
    # the fp32 semantics are still checked by the exact-index rule (8 ulps)
    ref_rows = [r for r in report["rows"] if r["check"] == "torch rewrite vs reference"]
    assert all(r["tolerance"] < 1e-6 for r in ref_rows if r["output"].endswith("_keep_idx"))


@pytest.mark.parametrize("broken", ["rope", "mask"])
def test_a_broken_fp16_graph_still_fails(tmp_path, monkeypatch, broken):
    """A wrong RoPE position or a padding mask left out of the exported graph only (the PyTorch
    rewrite the validation builds is the correct one): the forced-selection rows catch it."""
    import star_export.onnx_export as onnx_export
    from star_export import api, star

    real_export = onnx_export.export_onnx

    def sabotaged(module, contract, path, *args, **kwargs):
        if contract.graph == "prefill":
            if broken == "rope":  # text after the image one position later than the spec says
                n = module.geo.n_positions
                module.positions = lambda mask, p, offsets: star.original_positions(mask, p, offsets, n + 1)
            else:
                original = star.additive_mask
                monkeypatch.setattr(
                    star, "additive_mask", lambda valid, dtype: original(torch.ones_like(valid), dtype)
                )
        try:
            return real_export(module, contract, path, *args, **kwargs)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(onnx_export, "export_onnx", sabotaged)
    result = api.export(recipe="llava-tiny", keep=16, dtype="fp16", out=tmp_path / "out")
    assert result.scan_ok and not result.passed
    failed = [r for r in result.report.rows if not r.passed]
    assert failed and all("onnxruntime fp16" in r.check or "generate" in r.check for r in failed), failed
    assert any(r.output in ("logits", "present.* (worst)") for r in failed)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] is False


def test_bf16_reports_what_cpu_cannot_check_and_checks_the_rewrite(_isolated_cache):
    from star_export.contract import prefill_contract
    from star_export.load import load_recipe_model
    from star_export.recipes import load_recipe
    from star_export.star import StarConfig
    from star_export.validate import validate_half

    recipe = load_recipe("llava-tiny")
    low, full = load_recipe_model(recipe, dtype=torch.bfloat16), load_recipe_model(recipe)
    geo = low.geometry
    cfg = StarConfig.resolve(keep=16, keep1=None, layer=2, n_visual=geo.n_visual, num_layers=geo.num_layers)
    contract = prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 128), dtype="bfloat16")
    report = validate_half(low.model, full.model, geo, cfg, contract, "prefill.onnx", "bfloat16")
    skipped = [r for r in report.rows if r.rule == "skipped"]
    assert len(skipped) == 1 and "not checkable on CPU" in skipped[0].detail
    assert "not checkable on CPU" in report.format()
    assert report.format().endswith(
        "overall: PASS (bf16 graph unchecked on this host: run `validate --trt` on a GPU host)"
    )
    bf16 = [r for r in report.rows if r.check == "torch bf16 vs torch fp32 (batch)"]
    assert {r.output for r in bf16} == {"stage1_keep_idx", "stage2_keep_idx", "logits", "present.* (worst)"}
    assert report.passed, report.format()
    margin = report.inputs["score_noise"]["margins"][0]
    assert margin >= selection.MARGIN_EPS * selection.EPS["bfloat16"] and np.isfinite(margin)
