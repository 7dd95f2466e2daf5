"""TensorRT parity without TensorRT: the decode comparison (``validate.generation_rows``) with fake
backends (one that matches, perturbed ones that must fail), TrtBackend against a fake of
polygraphy's TrtRunner (arguments, casts, copies), and ``engines.parity.trt_rows``' plumbing on a real
export with onnxruntime standing in for the engines. No TensorRT engine is run here."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from star_export.contract import DynamicDim, GraphContract, TensorSpec
from star_export.engines import TrtBackend, parity, status, trt_rows
from star_export.errors import MissingComponent, UsageError
from star_export.geometry import Geometry
from star_export.parity import ParityReport
from star_export.star import StarConfig
from star_export.validate import generation_rows, make_inputs

GEO = Geometry(
    n_visual=16,
    image_size=32,
    patch_size=8,
    image_token_id=5,
    num_layers=3,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    hidden_size=8,
    vocab_size=50,
    vision_feature_layer=-2,
    select_strategy="default",
    text_model_type="llama",
)
CFG = StarConfig(keep2=4, keep1=8, layer=1)


class FakeModel:
    """Deterministic stand-in with the I/O ``runtime.generate`` drives: logits depend on the inputs
    (prompt ids, then token and position), every layer's cache grows by one slot per decode step.
    ``noise``: relative logits noise; ``flip``: decode step (1-based) whose argmax is moved;
    ``stuck_layer``: a layer whose cache does not grow; ``keep_shift``: shifts stage-2 indices."""

    def __init__(self, name="fake", noise=0.0, flip=None, stuck_layer=None, keep_shift=0):
        self.name, self.noise, self.flip = name, noise, flip
        self.stuck_layer, self.keep_shift = stuck_layer, keep_shift
        self.rng = np.random.default_rng(7)
        self.step = 0

    def _logits(self, state: np.ndarray) -> np.ndarray:  # (B,) -> (B, V)
        logits = np.cos(np.arange(GEO.vocab_size)[None] * (state[:, None] % 97 + 1) * 0.37) * 5
        logits[np.arange(len(state)), state % GEO.vocab_size] = 8.0  # a clear winner: margin >= 3
        logits += self.noise * 8 * self.rng.standard_normal(logits.shape)
        if self.flip == self.step:
            logits[np.arange(len(state)), logits.argmin(axis=1)] += 100.0
        return logits.astype(np.float32)

    def prefill(self, feeds):
        ids = feeds["input_ids"]
        batch, text_len = ids.shape
        self.step = 0
        out = {
            "logits": self._logits(ids.sum(axis=1)),
            "stage1_keep_idx": np.tile(np.arange(CFG.keep1), (batch, 1)),
            "stage2_keep_idx": np.tile(np.arange(CFG.keep2) + self.keep_shift, (batch, 1)),
        }
        for i in range(GEO.num_layers):
            slots = text_len - 1 + GEO.span(CFG.keep1 if i < CFG.layer else CFG.keep2)
            for kind in ("key", "value"):
                out[f"present.{i}.{kind}"] = np.zeros((batch, 1, slots, 4), np.float32)
        return out

    def decode(self, feeds):
        self.step += 1
        out = {"logits": self._logits(feeds["input_ids"][:, 0] * 31 + feeds["position_ids"][:, 0])}
        for i in range(GEO.num_layers):
            for kind in ("key", "value"):
                past = feeds[f"past.{i}.{kind}"]
                grow = past[:, :, :0] if i == self.stuck_layer else past[:, :, :1]
                out[f"present.{i}.{kind}"] = np.concatenate([past, grow], axis=2)
        return out


@pytest.fixture(scope="module")
def feeds():
    return dict(make_inputs(GEO, batch=2, text_len=12, pad=3, seed=0))


class FakeRef(FakeModel):
    """The rewrite's side: takes a forced selection (ignored: the fake's indices are fixed)."""

    forced = None


def _rows(got, feeds, dtype="float32", steps=5):
    report = ParityReport()
    generation_rows(report, got.name, got, FakeRef("ref"), feeds, GEO, CFG, steps, dtype, 1e-4)
    return {r.output: r for r in report.rows}


def test_matching_backends_pass(feeds):
    rows = _rows(FakeModel("got", noise=1e-7), feeds)
    assert set(rows) == {"tokens", "logits (every step)", "cache lengths L1/L2+t"}
    assert all(r.passed for r in rows.values()), rows
    assert rows["tokens"].tolerance == 0 and rows["logits (every step)"].tolerance == 1e-4
    assert 0 < rows["logits (every step)"].max_rel < 1e-6


def test_a_different_token_fails(feeds):
    rows = _rows(FakeModel("got", flip=2), feeds)  # the 3rd token differs
    assert not rows["tokens"].passed and not rows["logits (every step)"].passed
    assert rows["cache lengths L1/L2+t"].passed


@pytest.mark.parametrize("dtype, passed", [("float32", False), ("float16", True)])
def test_logits_tolerance_follows_the_dtype(feeds, dtype, passed):
    rows = _rows(FakeModel("got", noise=1e-3), feeds, dtype=dtype)  # ~1e-3 relative, argmax kept
    assert rows["logits (every step)"].passed is passed
    if dtype == "float16":  # teacher-forced: every chosen token is the reference's best
        assert rows["tokens (logit shortfall)"].passed and rows["tokens (logit shortfall)"].rule == "forced"


def test_half_precision_flags_a_token_the_reference_would_not_choose(feeds):
    rows = _rows(FakeModel("got", flip=2), feeds, dtype="float16")
    assert not rows["tokens (logit shortfall)"].passed


def test_a_cache_that_does_not_grow_fails(feeds):
    rows = _rows(FakeModel("got", stuck_layer=2), feeds)
    assert not rows["cache lengths L1/L2+t"].passed


# ------------------------------------------------------------------------ TrtBackend over a fake


def test_trt_backend_with_a_fake_trt_runner(monkeypatch, tmp_path):
    """The polygraphy calls behind TrtBackend: engine bytes from each path, one runner per graph,
    inputs cast to the contract's dtypes, outputs copied (TrtRunner reuses its buffers)."""
    import polygraphy.backend.common as poly_common
    import polygraphy.backend.trt as poly_trt

    calls: list[tuple] = []

    class FakeRunner:
        def __init__(self, engine, name):
            self.engine, self.name, self.is_active = engine, name, False
            self.buffer = np.zeros((2, 3), np.float16)
            calls.append(("runner", engine, name))

        def activate(self):
            self.is_active = True

        def deactivate(self):
            self.is_active = False

        def infer(self, feed):
            calls.append(
                ("infer", self.name, {k: (v.dtype, v.flags["C_CONTIGUOUS"]) for k, v in feed.items()})
            )
            self.buffer += 1  # the same buffer every call
            return {"logits": self.buffer}

    monkeypatch.setattr(poly_common, "BytesFromPath", lambda path: ("bytes", path))
    monkeypatch.setattr(poly_trt, "EngineFromBytes", lambda data: ("engine", data))
    monkeypatch.setattr(poly_trt, "TrtRunner", FakeRunner)
    prefill = GraphContract(
        "prefill",
        (TensorSpec("pixel_values", "float16", ("batch", 3)), TensorSpec("input_ids", "int64", ("batch", 3))),
        (TensorSpec("logits", "float16", ("batch", 3)),),
        (DynamicDim("batch", 1, 2, 4),),
    )
    decode = GraphContract(
        "decode", (TensorSpec("input_ids", "int64", ("batch", 1)),), prefill.outputs, prefill.dims
    )
    backend = TrtBackend(tmp_path / "p.plan", tmp_path / "d.plan", prefill, decode)
    assert calls == [
        ("runner", ("engine", ("bytes", str(tmp_path / "p.plan"))), "tensorrt-prefill"),
        ("runner", ("engine", ("bytes", str(tmp_path / "d.plan"))), "tensorrt-decode"),
    ]
    with backend as b:
        first = b.prefill({"pixel_values": np.ones((2, 3)), "input_ids": np.ones((2, 3), np.int32)})
        second = b.decode({"input_ids": np.ones((2, 1), np.int32)[:, ::1]})
        assert all(r.is_active for r, _ in b._graphs.values())
    assert not any(r.is_active for r, _ in backend._graphs.values())
    assert calls[2] == (
        "infer",
        "tensorrt-prefill",
        {"pixel_values": (np.float16, True), "input_ids": (np.int64, True)},
    )
    assert calls[3] == ("infer", "tensorrt-decode", {"input_ids": (np.int64, True)})
    assert first["logits"][0, 0] == 1 and second["logits"][0, 0] == 1  # copies, not the reused buffer


# -------------------------------------------------------------- trt_rows, end to end-ish


@pytest.mark.parametrize(
    "name, keeps",
    [("llava-keep16", "16"), ("llava-levels", "8,16,32")],  # exports shared with other modules
)
def test_trt_rows_plumbing_on_a_real_export(cli_export, monkeypatch, name, keeps):
    """Manifest, contracts, feeds and engine paths reach the backends, for every keep level (its
    own prefill engine, the shared decode engine); onnxruntime stands in for the engines and is
    judged by the same criterion as everything else (selections, forced logits, generation)
    against the PyTorch rewrite. NOT TensorRT."""
    import json

    from star_export.load import load
    from star_export.runtime import OnnxruntimeBackend

    export = cli_export(name, "--keep", keeps)
    manifest = json.loads((export / "manifest.json").read_text())
    graphs = [lv["graph"] for lv in manifest["star"]["levels"]]
    manifest["engines"] = {g: {"path": f"{g}.plan", "dtype": "fp32", "graph": g} for g in (*graphs, "decode")}
    seen: list[tuple[Path, Path]] = []

    class OnnxruntimeAsEngines:
        def __init__(self, prefill_engine, decode_engine, prefill, decode):
            seen.append((Path(prefill_engine), Path(decode_engine)))  # never opened: not built
            assert prefill.graph == Path(prefill_engine).stem and decode.graph == "decode"
            self.graph = prefill.graph

        def __enter__(self):
            return OnnxruntimeBackend(export / f"{self.graph}.onnx", export / "decode.onnx")

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(status, "trt_status", lambda: (True, "TensorRT (stand-in), no GPU"))
    monkeypatch.setattr(parity, "TrtBackend", OnnxruntimeAsEngines)
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    model = load(manifest["model"]["directory"]).model
    feeds = [make_inputs(geo, batch=b, text_len=20, seed=b) for b in (2, 1)]
    keep2s = [lv["keep2"] for lv in manifest["star"]["levels"]]
    margins = {k: (1e-6, 1e-6) for k in keep2s} if len(keep2s) > 1 else (1e-6, 1e-6)
    rows = trt_rows(manifest, export, model, feeds, margins, steps=3)
    assert seen == [(export / f"{g}.plan", export / "decode.plan") for g in graphs]
    assert rows and all(r["passed"] for r in rows), rows
    prefixes = [f"keep {k}: " for k in keep2s] if len(keep2s) > 1 else [""]
    checks = {r["check"] for r in rows}
    for prefix in prefixes:  # every level: prefill rows per feed and its own generation
        assert {f"{prefix}onnxruntime fp32 vs torch fp32 (feed {i})" for i in (0, 1)} <= checks
        assert f"{prefix}generate onnxruntime fp32 vs torch (3 greedy)" in checks
        outputs = {r["output"] for r in rows if r["check"].startswith(prefix)}
        assert {"stage1_keep_idx", "stage2_keep_idx", "logits", "tokens", "cache lengths L1/L2+t"} <= outputs
    if len(keep2s) > 1:
        kept = {r["check"].split(":")[0]: r for r in rows if r["output"] == "stage2_keep_idx"}
        assert set(kept) == {f"keep {k}" for k in keep2s}
        with pytest.raises(UsageError, match="no selection margins for keep level 16"):
            trt_rows(manifest, export, model, feeds, {8: (1e-6, 1e-6)}, steps=1)


def _manifest(levels: list[StarConfig], engines: dict) -> dict:
    several = len(levels) > 1
    names = [f"prefill_k{c.keep2}" if several else "prefill" for c in levels]
    return {
        "model": {"geometry": GEO.to_dict()},
        "star": {
            "levels": [
                {"keep1": c.keep1, "keep2": c.keep2, "layer_K": c.layer, "graph": g, "file": f"{g}.onnx"}
                for c, g in zip(levels, names, strict=True)
            ]
        },
        "graphs": {g: {} for g in (*names, "decode")},
        "engines": engines,
    }


def test_trt_rows_usage(monkeypatch, tmp_path):
    ok, _ = status.trt_status()
    if not ok:
        with pytest.raises(MissingComponent, match="TensorRT parity runs only where"):
            trt_rows({"graphs": {}}, tmp_path, None, [], (0.0, 0.0))
    monkeypatch.setattr(status, "trt_status", lambda: (True, "stand-in"))
    with pytest.raises(UsageError, match="no decode engine"):
        trt_rows(_manifest([CFG], {"prefill": {}}), tmp_path, None, [], (0.0, 0.0))
    two = [StarConfig(keep2=2, keep1=4, layer=1), CFG]
    with pytest.raises(UsageError, match="no prefill_k4 engine"):  # every level needs its own engine
        trt_rows(_manifest(two, {"prefill_k2": {}, "decode": {}}), tmp_path, None, [], (0.0, 0.0))


def test_engine_margins_follow_the_lower_precision():
    from star_export.selection import margin_for

    fp32 = (margin_for("float32"), margin_for("float32"))
    assert parity.engine_margins(fp32, "float32", "float32") == fp32
    assert parity.engine_margins(fp32, "float16", "float32") == (margin_for("float16"),) * 2
    assert parity.engine_margins(fp32, "bfloat16", "float32") == (margin_for("bfloat16"),) * 2
    measured = (0.09, 1e-4)  # an fp16 export's measured margins: kept where wider than the floor
    assert parity.engine_margins(measured, "float16", "float16") == measured
    assert parity.engine_margins(measured, "bfloat16", "float16") == (0.09, margin_for("bfloat16"))


@pytest.mark.parametrize("engine_dtype, passed", [("fp32", False), ("fp16", True)])
def test_an_fp16_engine_of_an_fp32_export_is_judged_with_fp16_margins(
    cli_export, monkeypatch, engine_dtype, passed
):
    """``build --dtype fp16`` on an fp32 export (TensorRT 10's FP16 flag): a stand-in engine whose
    stage 1 swaps, in every row, the k-th and (k+1)-th tokens (a near-tie: gaps above fp32's margin,
    below fp16's) and is otherwise the rewrite forced to that selection. Judged with fp32 margins
    the swap fails; as an fp16 engine it is a near-tie and every prefill row passes. NOT TensorRT."""
    import json

    import star_export.comparison as comparison
    from star_export.families import family_of
    from star_export.load import load
    from star_export.selection import margin_for
    from star_export.validate import Rewrite

    export = cli_export("llava-keep16", "--keep", "16")
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["engines"] = {g: {"path": f"{g}.plan", "dtype": engine_dtype} for g in ("prefill", "decode")}
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    lv = manifest["star"]["levels"][0]
    cfg = StarConfig(keep2=lv["keep2"], keep1=lv["keep1"], layer=lv["layer_K"])
    model = load(manifest["model"]["directory"]).model
    rewrite = Rewrite(family_of(geo).prefill_module(model, geo, cfg).eval(), "float32")
    feeds = dict(make_inputs(geo, batch=2, text_len=24, seed=0))
    scores = rewrite.run(feeds)["stage1_scores"]
    swapped, gaps = [], []
    for row in scores:
        order = np.argsort(-np.nan_to_num(row, nan=-np.inf), kind="stable")
        kth, next_ = order[cfg.keep1 - 1], order[cfg.keep1]
        gaps.append((row[kth] - row[next_]) / abs(row[kth]))
        swapped.append(np.sort(np.r_[order[: cfg.keep1 - 1], next_]))
    assert margin_for("float32") < max(gaps) < margin_for("float16"), gaps  # a near-tie at fp16, not fp32

    class NearTieEngines:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return SimpleNamespace(
                name="tensorrt", prefill=lambda f: rewrite.run(f, force1=np.array(swapped))
            )

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(status, "trt_status", lambda: (True, "TensorRT (stand-in), no GPU"))
    monkeypatch.setattr(parity, "TrtBackend", NearTieEngines)
    monkeypatch.setattr(comparison, "generation_rows", lambda *a, **k: None)  # the stand-in has no decode
    margins = (margin_for("float32"),) * 2  # what validate_directory passes for an fp32 export
    rows = {r["output"]: r for r in trt_rows(manifest, export, model, [feeds], margins, steps=1)}
    stage1 = rows["stage1_keep_idx"]
    assert stage1["rule"] == "margin" and stage1["gap"] == pytest.approx(max(gaps), rel=1e-6)
    assert stage1["tolerance"] == margin_for("float16" if engine_dtype == "fp16" else "float32")
    assert bool(stage1["passed"]) is passed
    assert rows["stage2_keep_idx"]["passed"] and rows["logits"]["passed"]  # forced to the engine's selection


# ------------------------------------------------------------------- validate --trt --engines-only


def test_recorded_margins_and_cpu_verdict(tmp_path):
    from star_export.engines.engines_only import cpu_passed, recorded_margins
    from star_export.selection import margin_for

    path = tmp_path / "report.json"
    report = {
        "inputs": {"score_noise_per_keep": {"8": {"margins": [0.01, 0.2]}, "16": {"margins": [0.02, 0.3]}}}
    }
    assert recorded_margins(report, [8, 16], "float16", path) == {8: (0.01, 0.2), 16: (0.02, 0.3)}
    assert recorded_margins({}, [8], "float32", path) == {8: (margin_for("float32"),) * 2}
    with pytest.raises(UsageError, match="records no selection margins for keep level 32 of this bfloat16"):
        recorded_margins(report, [8, 32], "bfloat16", path)
    ok = {
        "passed": False,
        "rows": [{"passed": True}],
        "graph_check": {"ok": True},
        "tensorrt": [{"passed": False}],
    }
    assert cpu_passed(ok)  # an earlier run's failed engine rows are not the CPU verdict
    assert not cpu_passed({**ok, "rows": [{"passed": True}, {"passed": False}]})
    assert not cpu_passed({**ok, "graph_check": {"ok": False}})


@pytest.fixture
def engines_only_export(cli_export, tmp_path, monkeypatch):
    """A copy of the shared llava-keep16 export with engine entries (stand-in paths, never opened), a
    stand-in recorded report.json (CPU rows as an export's validation would record them), TensorRT
    "available", and onnxruntime standing in for the engines (``scale`` multiplies their logits).
    Every CPU check and every model load beyond the one in the export's dtype fail the test. NOT TensorRT."""
    import json
    import shutil

    import star_export.load as load_module
    import star_export.validate as validate
    from star_export.runtime import OnnxruntimeBackend

    export = tmp_path / "export"
    shutil.copytree(cli_export("llava-keep16", "--keep", "16"), export)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["engines"] = {g: {"path": f"{g}.plan", "dtype": "fp32"} for g in ("prefill", "decode")}
    (export / "manifest.json").write_text(json.dumps(manifest))
    cpu_row = {
        "check": "rewrite vs reference (recorded)",
        "output": "logits",
        "max_abs": 1e-7,
        "max_rel": 1e-8,
    }
    cpu_row |= {"tolerance": 1e-5, "passed": True, "rule": "tol", "overlap": None, "gap": None, "detail": ""}
    recorded = {
        "passed": True,
        "inputs": {"seed": 3, "batch": 2, "text_len": 20},
        "rows": [cpu_row],
        "graph_check": {"ok": True},
        "comparator": None,
        "tensorrt": None,
    }
    (export / "report.json").write_text(json.dumps(recorded))
    state = {"scale": 1.0, "loads": []}

    class OnnxruntimeAsEngines:
        def __init__(self, prefill_engine, decode_engine, prefill, decode):
            assert Path(prefill_engine) == export / "prefill.plan"

        def __enter__(self):
            ort = OnnxruntimeBackend(export / "prefill.onnx", export / "decode.onnx")
            run = ort.prefill
            ort.prefill = lambda feeds: {
                k: v * state["scale"] if k == "logits" else v for k, v in run(feeds).items()
            }
            return ort

        def __exit__(self, *exc):
            return None

    def cpu_check(*args, **kwargs):
        raise AssertionError("--engines-only re-ran a CPU check")

    real_load = load_module.load

    def counted_load(directory, *args, **kwargs):
        state["loads"].append(str(kwargs.get("dtype")))
        return real_load(directory, *args, **kwargs)

    monkeypatch.setattr(status, "trt_status", lambda: (True, "TensorRT (stand-in), no GPU"))
    monkeypatch.setattr(parity, "TrtBackend", OnnxruntimeAsEngines)
    for name in ("validate_directory", "validate_levels", "validate_export", "validate_half", "validate"):
        monkeypatch.setattr(validate, name, cpu_check)
    monkeypatch.setattr(load_module, "load", counted_load)
    return export, recorded, state


def _engines_only(export: Path, capsys) -> tuple[int, str, dict]:
    import json

    from star_export.cli import main

    code = main(["validate", "--from", str(export), "--engines-only"])
    return code, capsys.readouterr().out, json.loads((export / "report.json").read_text())


def test_engines_only_runs_the_engine_rows_alone(engines_only_export, capsys):
    export, recorded, state = engines_only_export
    code, out, report = _engines_only(export, capsys)
    assert code == 0, out
    assert state["loads"] == ["torch.float32"]  # the checkpoint once, in the export's dtype
    assert "CPU checks: not re-run (--engines-only); recorded in report.json: PASS" in out
    assert "TensorRT engines: PASS" in out and out.splitlines()[-2] == "overall: PASS"
    assert "onnxruntime fp32 vs torch fp32 (feed 0)" in out and "generate onnxruntime fp32" in out
    assert report["rows"] == recorded["rows"] and report["passed"] is True  # CPU rows kept as recorded
    assert report["tensorrt_engines_only"]["inputs"] == {"batch": 2, "text_len": 20, "seed": 3}
    outputs = {r["output"] for r in report["tensorrt"]}
    assert {"stage1_keep_idx", "stage2_keep_idx", "logits", "tokens", "cache lengths L1/L2+t"} <= outputs
    assert all(r["passed"] for r in report["tensorrt"])


def test_engines_only_fails_on_a_wrong_engine_or_a_failed_recorded_report(engines_only_export, capsys):
    import json

    export, recorded, state = engines_only_export
    state["scale"] = 1.01  # prefill logits 1 % off: far beyond fp32's 1e-4
    code, out, report = _engines_only(export, capsys)
    assert code == 1 and "TensorRT engines: FAIL" in out and report["passed"] is False
    (logits,) = [r for r in report["tensorrt"] if r["output"] == "logits" and "feed 0" in r["check"]]
    assert not logits["passed"] and logits["max_rel"] == pytest.approx(0.01, rel=1e-3)

    state["scale"] = 1.0
    failed = {**recorded, "passed": False, "rows": [{**recorded["rows"][0], "passed": False}]}
    (export / "report.json").write_text(json.dumps(failed))
    code, out, report = _engines_only(export, capsys)
    assert code == 1 and "recorded in report.json: FAIL" in out and "TensorRT engines: PASS" in out


def test_engines_only_needs_the_recorded_report(engines_only_export, capsys):
    export, _, _ = engines_only_export
    (export / "report.json").unlink()
    from star_export.cli import main

    assert main(["validate", "--from", str(export), "--trt", "--engines-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report.json not found" in err[0] and "drop --engines-only" in err[0]


# --------------------------------------------------------------- bf16: the cast path, once (issue #20)


def test_trt_rows_on_a_bf16_export_feed_the_engines_bf16_tensors_once(monkeypatch, tmp_path, _isolated_cache):
    """``validate --trt`` on a bf16 export used to crash (``trt_rows`` cast the feeds, ``TrtBackend`` cast
    them again: ``np.asarray(<torch bf16>, dtype=float32)`` raises TypeError). A stand-in for polygraphy's
    TrtRunner checks what an engine would be given (float inputs as torch bfloat16 tensors, the rest
    int64 arrays) and answers with the bf16 PyTorch rewrite as torch tensors, as TrtRunner does for
    torch inputs; the rows then compare it with the rewrite by the usual bf16 criterion. NOT TensorRT."""
    import polygraphy.backend.common as poly_common
    import polygraphy.backend.trt as poly_trt
    import torch

    from star_export.contract import decode_contract, prefill_contract
    from star_export.load import load_recipe_model
    from star_export.manifest import build_manifest
    from star_export.recipes import load_recipe

    loaded = load_recipe_model(load_recipe("llava-tiny"), dtype=torch.bfloat16)
    geo, family, model = loaded.geometry, loaded.family, loaded.model
    cfg = StarConfig.resolve(keep=16, keep1=None, layer=2, n_visual=geo.n_visual, num_layers=geo.num_layers)
    pc = prefill_contract(geo, cfg, (1, 2, 8), (2, 24, 64), dtype="bfloat16")
    dc = decode_contract(geo, cfg, (1, 2, 8), (2, 24, 64), 16, dtype="bfloat16")
    manifest = build_manifest(
        contracts=[pc, dc],
        levels=[cfg],
        geo=geo,
        family=family,
        model_dir=loaded.model_dir,
        source=loaded.source,
        files=[],
        opset=18,
        dtype="bfloat16",
    )
    manifest["engines"] = {g: {"path": f"{g}.plan", "dtype": "bf16"} for g in ("prefill", "decode")}
    modules = {"prefill": (family.prefill_module(model, geo, cfg).eval(), pc)}
    modules["decode"] = (family.decode_module(model, geo, cfg).eval(), dc)
    given: dict[str, set] = {"prefill": set(), "decode": set()}

    class EngineStandIn:
        def __init__(self, engine, name):
            self.graph, self.is_active = name.removeprefix("tensorrt-"), False

        def activate(self):
            self.is_active = True

        def deactivate(self):
            self.is_active = False

        def infer(self, feed):
            module, contract = modules[self.graph]
            for spec in contract.inputs:
                value = feed[spec.name]
                if spec.dtype == "bfloat16":
                    assert torch.is_tensor(value) and value.dtype == torch.bfloat16, (spec.name, type(value))
                else:
                    assert isinstance(value, np.ndarray) and value.dtype == spec.dtype, (
                        spec.name,
                        value.dtype,
                    )
                given[self.graph].add((spec.name.split(".")[0], str(value.dtype)))
            with torch.no_grad():
                outs = module(*(torch.as_tensor(feed[n]) for n in contract.input_names))
            return dict(zip(contract.output_names, outs, strict=True))

    monkeypatch.setattr(poly_common, "BytesFromPath", lambda path: path)
    monkeypatch.setattr(poly_trt, "EngineFromBytes", lambda data: data)
    monkeypatch.setattr(poly_trt, "TrtRunner", EngineStandIn)
    monkeypatch.setattr(status, "trt_status", lambda: (True, "TensorRT (stand-in), no GPU"))
    feeds = [make_inputs(geo, batch=b, text_len=20, seed=b) for b in (2, 1)]
    rows = trt_rows(manifest, tmp_path, model, feeds, (1e-6, 1e-6), steps=3)
    assert given["prefill"] == {
        ("pixel_values", "torch.bfloat16"),
        ("input_ids", "int64"),
        ("attention_mask", "int64"),
    }
    assert ("past", "torch.bfloat16") in given["decode"] and ("position_ids", "int64") in given["decode"]
    checks = {r["check"] for r in rows}
    assert {"tensorrt bf16 vs torch bf16 (feed 0)", "tensorrt bf16 vs torch bf16 (feed 1)"} <= checks
    assert "generate tensorrt bf16 vs torch bf16 (3 steps, teacher-forced)" in checks
    assert rows and all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
