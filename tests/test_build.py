"""Tests for star_export.engines: profiles, precision decisions, manifest I/O and the missing-TensorRT
path run everywhere; tests marked ``tensorrt`` build real engines and skip where TensorRT or a GPU
is absent (with the reason from ``trt_status()``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from star_export import engines as build
from star_export.contract import decode_contract, prefill_contract
from star_export.engines import (
    BuildSettings,
    add_build_arguments,
    build_engine,
    contract_from_dict,
    engine_files,
    engine_paths,
    finish_command,
    graph_overrides,
    output_shapes,
    precision_plan,
    profile_shapes,
    run_build,
    to_polygraphy_profiles,
    trt_status,
)
from star_export.errors import MissingComponent, UsageError
from star_export.geometry import Geometry
from star_export.manifest import MANIFEST_VERSION, prefill_graph
from star_export.star import StarConfig

ROOT = Path(__file__).resolve().parents[1]

GEO = Geometry(
    n_visual=576,
    image_size=336,
    patch_size=14,
    image_token_id=1000,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    hidden_size=64,
    vocab_size=1024,
    vision_feature_layer=-2,
    select_strategy="default",
    text_model_type="llama",
)
CFG = StarConfig(keep2=64, keep1=128, layer=2)  # L1 = text_len + 127, L2 = text_len + 63
LEVELS = [StarConfig(keep2=32, keep1=64, layer=2), CFG]  # a two-level export: keep 32 (default), 64
BATCH, TEXT, MAX_NEW = (1, 2, 8), (2, 64, 512), 256


@pytest.fixture
def prefill():
    return prefill_contract(GEO, CFG, BATCH, TEXT)


@pytest.fixture
def decode():
    return decode_contract(GEO, CFG, BATCH, TEXT, MAX_NEW)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_build_arguments(parser)
    return parser.parse_args(list(argv))


# ------------------------------------------------------------------------------------------ profiles


def test_prefill_profile_shapes(prefill):
    shapes = profile_shapes(prefill)
    assert list(shapes) == ["pixel_values", "input_ids", "attention_mask"]
    assert shapes["pixel_values"] == ((1, 3, 336, 336), (2, 3, 336, 336), (8, 3, 336, 336))
    assert shapes["input_ids"] == ((1, 2), (2, 64), (8, 512))
    assert shapes["attention_mask"] == shapes["input_ids"]
    # derived output dims: L1 = text_len + 127 (layers < K), L2 = text_len + 63
    assert prefill.outputs[5].shape[2] == "text_len + 127"  # after logits, the indices and the margins
    outs = output_shapes(prefill)
    assert outs["present.0.key"] == ((1, 2, 129, 16), (2, 2, 191, 16), (8, 2, 639, 16))
    assert outs["present.3.value"] == ((1, 2, 65, 16), (2, 2, 127, 16), (8, 2, 575, 16))
    assert outs["stage1_keep_idx"] == ((1, 128), (2, 128), (8, 128))
    assert outs["logits"][2] == (8, 1024)


def test_decode_profile_shapes_evaluate_derived_dims(decode):
    """Two independent past lengths: past_len_l1 (layers < K) and past_len_l2 (layers >= K)."""
    p1, p2 = decode.dim("past_len_l1"), decode.dim("past_len_l2")
    shapes = profile_shapes(decode)
    assert set(shapes) == set(decode.input_names)
    corners = list(
        zip(BATCH, (p1.min, p1.opt, p1.max), (p2.min, p2.opt, p2.max), strict=True)
    )  # (batch, P1, P2) at min / opt / max
    assert decode.inputs[2].shape == ("batch", "past_len_l1 + 1")
    assert shapes["attention_mask_l1"] == tuple((b, a + 1) for b, a, _ in corners)
    assert shapes["attention_mask_l2"] == tuple((b, c + 1) for b, _, c in corners)
    assert shapes["past.0.key"] == tuple((b, 2, a, 16) for b, a, _ in corners)  # layers < K: P1
    assert shapes["past.3.value"] == tuple((b, 2, c, 16) for b, _, c in corners)  # layers >= K: P2
    assert shapes["input_ids"] == ((1, 1), (2, 1), (8, 1))
    # one level: P1 - P2 = keep1 - keep2 at every corner (the ranges come from the same prompts)
    assert (p1.min - p2.min, p1.max - p2.max) == (64, 64)
    # the manifest's per-profile output shapes are read back from the input shapes
    assert build.outputs_for_profile(decode, shapes) == output_shapes(decode)
    assert output_shapes(decode)["present.0.key"][2] == (8, 2, p1.max + 1, 16)
    assert output_shapes(decode)["present.3.key"][2] == (8, 2, p2.max + 1, 16)


def test_decode_profile_of_several_levels_covers_every_level():
    """One decode engine serves every keep level: its ranges reach from the smallest span at the
    shortest prompt to the largest span at the longest prompt and answer."""
    decode = decode_contract(GEO, LEVELS, BATCH, TEXT, MAX_NEW)
    p1, p2 = decode.dim("past_len_l1"), decode.dim("past_len_l2")
    assert (p1.min, p1.max) == (TEXT[0] - 1 + 64, TEXT[2] - 1 + 128 + MAX_NEW - 1)
    assert (p2.min, p2.max) == (TEXT[0] - 1 + 32, TEXT[2] - 1 + 64 + MAX_NEW - 1)
    shapes = profile_shapes(decode)
    assert shapes["past.1.value"][0] == (1, 2, p1.min, 16) and shapes["past.2.key"][2] == (8, 2, p2.max, 16)


def test_overrides_replace_a_dims_range(prefill, decode):
    shapes = profile_shapes(prefill, {"batch": (2, 4, 16), "text_len": (8, 32, 128)})
    assert shapes["pixel_values"] == ((2, 3, 336, 336), (4, 3, 336, 336), (16, 3, 336, 336))
    assert shapes["input_ids"] == ((2, 8), (4, 32), (16, 128))
    shapes = profile_shapes(decode, {"past_len_l1": (100, 200, 300), "past_len_l2": (40, 50, 60)})
    assert shapes["attention_mask_l1"] == ((1, 101), (2, 201), (8, 301))
    assert shapes["past.3.key"] == ((1, 2, 40, 16), (2, 2, 50, 16), (8, 2, 60, 16))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"batch": (3, 2, 8)}, "min <= opt <= max"),
        ({"batch": (1, 9, 8)}, "min <= opt <= max"),
        ({"batch": (0, 1, 8)}, "1 <= min"),
        ({"text_len": (1, 8, 16)}, "2 <= min"),  # placeholder + at least one token after it
        ({"past_len": (1, 2, 3)}, "no dynamic dim 'past_len'"),
        ({"batch": (1, 2)}, r"expected \(min, opt, max\)"),
    ],
)
def test_bad_ranges_are_usage_errors(prefill, overrides, match):
    with pytest.raises(UsageError, match=match):
        profile_shapes(prefill, overrides)


def test_check_profile_rejects_wrong_inputs_and_static_axes(prefill):
    good = profile_shapes(prefill)
    build.check_profile(prefill, good)
    with pytest.raises(UsageError, match="missing inputs"):
        build.check_profile(prefill, {k: v for k, v in good.items() if k != "input_ids"})
    bad = dict(good, pixel_values=((1, 3, 224, 224), (2, 3, 224, 224), (8, 3, 224, 224)))
    with pytest.raises(UsageError, match="static"):
        build.check_profile(prefill, bad)


def test_polygraphy_profiles_without_tensorrt(prefill, decode):
    from polygraphy.backend.trt import Profile

    [p] = to_polygraphy_profiles([profile_shapes(prefill)])
    assert isinstance(p, Profile)
    assert list(p) == prefill.input_names
    assert tuple(p["input_ids"].min) == (1, 2) and tuple(p["input_ids"].max) == (8, 512)
    assert tuple(p["pixel_values"].opt) == (2, 3, 336, 336)
    two = to_polygraphy_profiles([profile_shapes(decode), profile_shapes(decode, {"batch": (1, 1, 1)})])
    assert len(two) == 2 and tuple(two[1]["input_ids"].max) == (1, 1)


# ----------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    "dtype, version, onnx_dtype, forced, expect",
    [
        ("fp32", "10.8.0.43", "fp32", None, (False, False, False)),
        ("fp16", "10.8.0.43", "fp32", None, (False, True, False)),  # weak typing + FP16 flag
        ("bf16", "10.15.1", "fp32", None, (False, False, True)),
        ("fp16", "10.15.1", "fp16", None, (True, False, False)),  # ONNX carries fp16: strongly typed
        ("bf16", "10.15.1", "bf16", None, (True, False, False)),
        ("fp16", "10.15.1", "fp16", False, (False, True, False)),  # forced weak typing on 10.x
        ("fp32", "10.15.1", "fp32", True, (True, False, False)),
        ("fp32", "11.5.0", "fp32", None, (True, False, False)),  # 11.x: always strongly typed
        ("fp16", "11.5.0", "fp16", None, (True, False, False)),
        ("bf16", "11.0", "bf16", True, (True, False, False)),
    ],
)
def test_precision_plan(dtype, version, onnx_dtype, forced, expect):
    plan = precision_plan(dtype, version, onnx_dtype, forced)
    assert (plan.strongly_typed, plan.fp16_flag, plan.bf16_flag) == expect
    assert plan.note


@pytest.mark.parametrize(
    "dtype, version, onnx_dtype, forced, match",
    [
        ("fp16", "11.5.0", "fp32", None, "removed the FP16/BF16 builder flags"),
        ("bf16", "11.0.0", "fp16", None, "removed the FP16/BF16 builder flags"),
        ("fp32", "11.5.0", "fp16", None, "removed the FP16/BF16 builder flags"),
        ("fp32", "11.5.0", "fp32", False, "strongly typed networks only"),
        ("fp16", "10.15.1", "fp32", True, "computes? in the ONNX's fp32"),
        ("bf16", "10.15.1", "fp16", None, "the ONNX is fp16"),
        ("fp8", "10.15.1", "fp32", None, "--dtype must be one of"),
    ],
)
def test_precision_plan_rejects(dtype, version, onnx_dtype, forced, match):
    with pytest.raises(UsageError, match=match):
        precision_plan(dtype, version, onnx_dtype, forced)


def test_precision_plan_needs_tensorrt_10():
    with pytest.raises(MissingComponent, match=r"older than 10\.0"):
        precision_plan("fp32", "8.6.1", "fp32")


def test_build_settings(prefill):
    s = BuildSettings(dtype="fp16", timing_cache="cache/tc.bin", workspace_bytes=3 << 30)
    assert s.timing_cache == Path("cache/tc.bin")
    assert s.plan("10.15.1", "fp32").fp16_flag
    with pytest.raises(UsageError):
        s.plan("11.5.0", "fp32")
    s.profiles = [profile_shapes(prefill)]
    summary = json.loads(json.dumps(s.settings_summary()))
    assert summary["dtype"] == "fp16" and summary["strongly_typed"] == "auto" and summary["tf32"] is False
    assert summary["profiles"][0]["input_ids"] == {"min": [1, 2], "opt": [2, 64], "max": [8, 512]}
    for bad in ({"dtype": "int8"}, {"workspace_bytes": 0}, {"builder_optimization_level": 6}):
        with pytest.raises(UsageError):
            BuildSettings(**bad)


def test_polygraphy_loaders_are_configured_without_tensorrt(tmp_path, prefill):
    """The real polygraphy loader objects, constructed (not called): arguments land where they should."""
    shapes = profile_shapes(prefill, {"batch": (1, 1, 4)})
    s = BuildSettings(
        dtype="fp16", timing_cache=tmp_path / "tc", workspace_bytes=1 << 30, builder_optimization_level=2
    )
    weak = precision_plan("fp16", "10.8.0", "fp32")
    net, cfg = build.polygraphy_loaders(
        tmp_path / "prefill.onnx", s, weak, [shapes], typed_flag=False, workspace_pool="WORKSPACE"
    )
    assert net.path == str(tmp_path / "prefill.onnx") and net.strongly_typed is False
    assert cfg.fp16 is True and cfg.bf16 is False and cfg.tf32 is False
    assert cfg.timing_cache_path == str(tmp_path / "tc")
    assert cfg.memory_pool_limits == {"WORKSPACE": 1 << 30} and cfg.builder_optimization_level == 2
    assert tuple(cfg.profiles[0]["input_ids"].max) == (4, 512)

    typed = precision_plan("fp16", "11.5.0", "fp16")
    net, cfg = build.polygraphy_loaders(
        tmp_path / "prefill.onnx", BuildSettings(dtype="fp16"), typed, [shapes], typed_flag=True
    )
    assert net.strongly_typed is True and cfg.fp16 is False and cfg.bf16 is False
    assert cfg.timing_cache_path is None and cfg.memory_pool_limits is None
    assert cfg.version_compatible is False and cfg.hardware_compatibility_level is None

    compat = BuildSettings(version_compatible=True, hardware_compatibility_level="ampere-plus")
    _, cfg = build.polygraphy_loaders(
        tmp_path / "prefill.onnx", compat, typed, [shapes], typed_flag=True, hardware_level="AMPERE_PLUS"
    )
    assert cfg.version_compatible is True and cfg.hardware_compatibility_level == "AMPERE_PLUS"
    with pytest.raises(ValueError, match="HardwareCompatibilityLevel member"):
        build.polygraphy_loaders(tmp_path / "prefill.onnx", compat, typed, [shapes], typed_flag=True)


def test_polygraphy_requirement_is_the_reviewed_release():
    """polygraphy 0.49.0 reads ``layer.precision_is_set`` and sets ``config.int8_calibrator`` without
    an AttributeError guard (both gone in TensorRT 11); the TensorRT path was reviewed against 0.53.6."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "polygraphy"]
    assert not spec.contains("0.49.26") and not spec.contains("0.50.3") and spec.contains("0.53.0")
    pinned = [
        line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.startswith("polygraphy==")
    ]
    assert pinned and spec.contains(pinned[0].split("==")[1])


# ------------------------------------------------------------------------------------ paths, status


def test_engine_paths():
    assert engine_paths(Path("out.plan")) == (Path("out.plan"), Path("out.decode.plan"))
    assert engine_paths(Path("a/b.engine")) == (Path("a/b.engine"), Path("a/b.decode.engine"))
    assert engine_paths(Path("dir/engine")) == (Path("dir/engine"), Path("dir/engine.decode"))


def test_engine_files_one_per_level_and_one_decode():
    assert engine_files(Path("out.plan"), ["prefill", "decode"]) == {
        "prefill": Path("out.plan"),
        "decode": Path("out.decode.plan"),
    }
    several = ["prefill_k32", "prefill_k64", "prefill_k128", "decode"]
    assert engine_files(Path("e/out.plan"), several) == {
        "prefill_k32": Path("e/out.k32.plan"),
        "prefill_k64": Path("e/out.k64.plan"),
        "prefill_k128": Path("e/out.k128.plan"),
        "decode": Path("e/out.decode.plan"),
    }
    assert engine_files(Path("dir/engine"), ["prefill_k8"]) == {"prefill_k8": Path("dir/engine.k8")}
    with pytest.raises(UsageError, match="no engine name"):
        engine_files(Path("out.plan"), ["scoring"])


def test_contract_round_trip(prefill, decode):
    for c in (prefill, decode):
        d = json.loads(json.dumps({**c.to_dict(), "file": f"{c.graph}.onnx", "opset": 18}))
        assert contract_from_dict(d) == c
    with pytest.raises(UsageError):
        contract_from_dict({"graph": "prefill"})


def _no_trt() -> str:
    ok, why = trt_status()
    if ok:
        pytest.skip(f"TensorRT is available here ({why})")
    return why


def test_trt_status_reports_why():
    ok, why = trt_status()
    assert isinstance(ok, bool) and why
    if not ok:
        assert "TensorRT" in why or "GPU" in why


def test_build_engine_missing_tensorrt_gives_finish_command(tmp_path, prefill):
    why = _no_trt()
    settings = BuildSettings(dtype="fp16", timing_cache=tmp_path / "tc.bin")
    with pytest.raises(MissingComponent) as e:
        build_engine(tmp_path / "prefill.onnx", tmp_path / "out.plan", prefill, settings)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(why)
    assert msg.endswith(
        f"python -m star_export build --from {tmp_path} --engine {tmp_path / 'out.plan'} --dtype fp16 "
        f"--timing-cache {tmp_path / 'tc.bin'}"
    )
    assert not (tmp_path / "out.plan").exists()


def test_finish_command_repeats_flags(tmp_path):
    s = BuildSettings(
        dtype="bf16",
        workspace_bytes=(1 << 30) + 1,
        builder_optimization_level=4,
        strongly_typed=True,
        profile_flags=("--max-batch", "4"),
        version_compatible=True,
        hardware_compatibility_level="ampere-plus",
        no_timing_cache=True,
    )
    assert finish_command(Path("o u t"), Path("e.plan"), s) == (
        "python -m star_export build --from 'o u t' --engine e.plan --dtype bf16 --no-timing-cache "
        "--workspace 1025 --builder-optimization-level 4 --strongly-typed --version-compatible "
        "--hardware-compatibility-level ampere-plus --max-batch 4"
    )
    args = _parse(
        "--version-compatible",
        "--hardware-compatibility-level",
        "same-compute-capability",
        "--no-timing-cache",
    )
    got = build.settings_from_args(args)
    assert (got.version_compatible, got.hardware_compatibility_level, got.no_timing_cache) == (
        True,
        "same-compute-capability",
        True,
    )
    with pytest.raises(UsageError, match="--no-timing-cache and --timing-cache exclude each other"):
        build.settings_from_args(_parse("--no-timing-cache", "--timing-cache", "tc"))
    with pytest.raises(SystemExit):
        _parse("--hardware-compatibility-level", "turing")


# -------------------------------------------------------------------------------------- run_build


def _onnx_for(contract, path: Path, broken: bool = False) -> None:
    """A stand-in graph with the contract's inputs and outputs (names, dtypes, shapes: what
    manifest_check compares), each output an Identity of the first input; ``broken`` adds NonZero."""
    inputs, outputs, nodes = [], [], []
    for t in contract.inputs:
        elem = TensorProto.INT64 if t.dtype == "int64" else TensorProto.FLOAT
        inputs.append(helper.make_tensor_value_info(t.name, elem, list(t.shape)))
    for t in contract.outputs:
        elem = TensorProto.INT64 if t.dtype == "int64" else TensorProto.FLOAT
        nodes.append(helper.make_node("Identity", [contract.inputs[0].name], [t.name]))
        outputs.append(helper.make_tensor_value_info(t.name, elem, list(t.shape)))
    if broken:
        nodes.append(helper.make_node("NonZero", ["input_ids"], ["nz"]))
        outputs.append(helper.make_tensor_value_info("nz", TensorProto.INT64, [2, "n"]))
    graph = helper.make_graph(nodes, contract.graph, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path)


def _star(levels: list[StarConfig]) -> dict:
    """The manifest's ``star`` section of these keep levels (as ``manifest.build_manifest`` writes it)."""
    several = len(levels) > 1
    entries = [
        {
            "keep1": c.keep1,
            "keep2": c.keep2,
            "layer_K": c.layer,
            "span1": GEO.span(c.keep1),
            "span2": GEO.span(c.keep2),
            "graph": prefill_graph(c.keep2, several),
            "file": f"{prefill_graph(c.keep2, several)}.onnx",
        }
        for c in levels
    ]
    return {
        **{k: entries[0][k] for k in ("keep1", "keep2", "layer_K")},
        "default_keep": levels[0].keep2,
        "levels": entries,
    }


def _out_dir(tmp_path: Path, contracts, broken: bool = False, levels: list[StarConfig] | None = None) -> Path:
    out = tmp_path / "star_out"
    out.mkdir()
    graphs = {}
    for i, c in enumerate(contracts):
        _onnx_for(c, out / f"{c.graph}.onnx", broken=broken and i == 0)
        graphs[c.graph] = {**c.to_dict(), "file": f"{c.graph}.onnx", "opset": 18, "dtype": "float32"}
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "model": {"geometry": GEO.to_dict()},
        "image_token_id": GEO.image_token_id,
        "image": {"kind": "processor"},  # every key a manifest must hold (manifest_check.REQUIRED)
        "star": _star(levels or [CFG]),
        "decoding": {"max_new_tokens": MAX_NEW},
        "graphs": graphs,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture
def level_contracts():
    """A two-level export's graphs: prefill_k32, prefill_k64 and the decode graph they share."""
    pcs = [
        dataclasses.replace(prefill_contract(GEO, c, BATCH, TEXT), graph=prefill_graph(c.keep2, True))
        for c in LEVELS
    ]
    return [*pcs, decode_contract(GEO, LEVELS, BATCH, TEXT, MAX_NEW)]


def _past_ranges(decode) -> dict:
    return {
        n: (decode.dim(n).min, decode.dim(n).opt, decode.dim(n).max) for n in ("past_len_l1", "past_len_l2")
    }


def test_graph_overrides_resize_decode_past_len(tmp_path, prefill, decode):
    out = _out_dir(tmp_path, [prefill, decode])
    manifest = json.loads((out / "manifest.json").read_text())
    contracts = {"prefill": prefill, "decode": decode}
    over, flags = graph_overrides(manifest, contracts, _parse())
    assert over == {"prefill": {}, "decode": {}} and flags == []

    over, flags = graph_overrides(manifest, contracts, _parse("--max-text-len", "128", "--max-batch", "4"))
    assert over["prefill"] == {"batch": (1, 2, 4), "text_len": (2, 64, 128)}
    want = decode_contract(GEO, CFG, (1, 2, 4), (2, 64, 128), MAX_NEW)
    assert over["decode"] == {"batch": (1, 2, 4), **_past_ranges(want)}
    assert flags == ["--max-batch", "4", "--max-text-len", "128"]

    over, flags = graph_overrides(manifest, contracts, _parse("--max-new-tokens", "16"))
    assert over["decode"] == _past_ranges(decode_contract(GEO, CFG, BATCH, TEXT, 16))
    assert flags == ["--max-new-tokens", "16"]

    # a lower max drags opt with it; an explicit opt outside the range is an error
    over, _ = graph_overrides(manifest, contracts, _parse("--max-text-len", "32"))
    assert over["prefill"]["text_len"] == (2, 32, 32)
    over, _ = graph_overrides(manifest, contracts, _parse("--opt-text-len", "600"))
    with pytest.raises(UsageError, match="min <= opt <= max"):
        profile_shapes(prefill, over["prefill"])


def test_run_build_checks_then_reports_missing_tensorrt(tmp_path, prefill, decode, capsys):
    why = _no_trt()
    out = _out_dir(tmp_path, [prefill, decode])
    engine = tmp_path / "e" / "out.plan"
    args = _parse("--engine", str(engine), "--max-text-len", "128", "--timing-cache", str(tmp_path / "tc"))
    with pytest.raises(MissingComponent) as e:
        run_build(args, out)
    msg = str(e.value)
    assert msg.startswith(why) and "\n" not in msg
    assert msg.endswith(
        f"python -m star_export build --from {out} --engine {engine} --dtype fp32 "
        f"--timing-cache {tmp_path / 'tc'} --max-text-len 128"
    )
    printed = capsys.readouterr().out
    assert "[check] prefill.onnx" in printed and "[check] decode.onnx" in printed
    assert "engines" not in json.loads((out / "manifest.json").read_text())


def test_graph_overrides_of_several_levels(tmp_path, level_contracts):
    """Every level's prefill graph takes the same batch/text_len overrides; the ONE decode graph's two
    past lengths are recomputed over ALL levels (decode_contract with manifest.levels)."""
    out = _out_dir(tmp_path, level_contracts, levels=LEVELS)
    manifest = json.loads((out / "manifest.json").read_text())
    contracts = {c.graph: c for c in level_contracts}
    over, flags = graph_overrides(
        manifest, contracts, _parse("--max-text-len", "128", "--max-new-tokens", "16")
    )
    assert set(over) == {"prefill_k32", "prefill_k64", "decode"}
    assert over["prefill_k32"] == over["prefill_k64"] == {"text_len": (2, 64, 128)}
    assert over["decode"] == _past_ranges(decode_contract(GEO, LEVELS, BATCH, (2, 64, 128), 16))
    assert over["decode"] != _past_ranges(
        decode_contract(GEO, CFG, BATCH, (2, 64, 128), 16)
    )  # not one level's
    assert flags == ["--max-text-len", "128", "--max-new-tokens", "16"]


def test_run_build_several_levels_missing_tensorrt_runs_as_printed(tmp_path, level_contracts, capsys):
    """Without TensorRT: every graph is checked, then the command to finish on a GPU host is printed;
    run as printed, it checks the same graphs and prints the same command (one --engine for all)."""
    why = _no_trt()
    out = _out_dir(tmp_path, level_contracts, levels=LEVELS)
    engine = tmp_path / "e" / "out.plan"
    with pytest.raises(MissingComponent) as e:
        run_build(_parse("--engine", str(engine), "--max-new-tokens", "16"), out)
    msg = str(e.value)
    command = msg.split(" run: ", 1)[1]
    assert msg.startswith(why) and "\n" not in msg
    assert (
        command
        == f"python -m star_export build --from {out} --engine {engine} --dtype fp32 --max-new-tokens 16"
    )
    printed = capsys.readouterr().out
    assert [line.split()[1] for line in printed.splitlines() if line.startswith("[check]")] == [
        "prefill_k32.onnx",
        "prefill_k64.onnx",
        "decode.onnx",
    ]
    argv = shlex.split(command)
    assert argv[0] == "python"
    r = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert command in r.stderr and r.stdout.count("[check]") == 3
    assert "engines" not in json.loads((out / "manifest.json").read_text())


def test_run_build_records_one_engine_per_level(tmp_path, level_contracts, monkeypatch, capsys):
    """run_build's plumbing with build_engine replaced by a recorder (NO engine is built; the files
    are stand-ins): one prefill engine per level named from --engine, one decode engine, each with
    its own profile, recorded under manifest["engines"] by graph name."""
    from star_export.engines import command, status

    out = _out_dir(tmp_path, level_contracts, levels=LEVELS)
    calls, caches = {}, {}

    def recorder(onnx_path, engine_path, contract, settings, log=print, *, finish=None):
        Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
        Path(engine_path).write_bytes(b"stand-in, not an engine\n")
        calls[contract.graph] = (Path(onnx_path).name, Path(engine_path), settings.profiles[0], finish)
        caches[contract.graph] = settings.timing_cache
        return {
            "path": str(engine_path),
            "graph": contract.graph,
            "bytes": 1,
            "sha256": "0" * 64,
            "tensorrt": "fake",
            "timing_cache": str(settings.timing_cache) if settings.timing_cache else None,
        }

    monkeypatch.setattr(status, "trt_status", lambda: (True, "TensorRT (stand-in)"))
    monkeypatch.setattr(command, "build_engine", recorder)
    engine = tmp_path / "e" / "out.plan"
    assert run_build(_parse("--engine", str(engine), "--max-new-tokens", "16", "--max-batch", "4"), out) == 0
    assert {g: (c[0], c[1]) for g, c in calls.items()} == {
        "prefill_k32": ("prefill_k32.onnx", tmp_path / "e" / "out.k32.plan"),
        "prefill_k64": ("prefill_k64.onnx", tmp_path / "e" / "out.k64.plan"),
        "decode": ("decode.onnx", tmp_path / "e" / "out.decode.plan"),
    }
    assert all(
        c[3].endswith(f"--engine {engine} --dtype fp32 --max-batch 4 --max-new-tokens 16")
        for c in calls.values()
    )
    want = decode_contract(GEO, LEVELS, (1, 2, 4), TEXT, 16)
    decode_profile = calls["decode"][2]
    p1, p2 = want.dim("past_len_l1"), want.dim("past_len_l2")
    assert decode_profile["past.0.key"] == ((1, 2, p1.min, 16), (2, 2, p1.opt, 16), (4, 2, p1.max, 16))
    assert decode_profile["past.3.key"] == ((1, 2, p2.min, 16), (2, 2, p2.opt, 16), (4, 2, p2.max, 16))
    assert calls["prefill_k64"][2]["input_ids"] == ((1, 2), (2, 64), (4, 512))
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["engines"]) == ["decode", "prefill_k32", "prefill_k64"]
    assert manifest["engines"]["prefill_k32"]["path"] == str(tmp_path / "e" / "out.k32.plan")
    printed = capsys.readouterr().out
    assert "engine prefill_k64:" in printed
    # one timing cache per export directory by default, shared by every level's build (and named)
    assert caches == dict.fromkeys(("prefill_k32", "prefill_k64", "decode"), out / "timing.cache")
    assert manifest["engine_build"]["timing_cache"] == str(out / "timing.cache")
    assert f"timing cache: {out / 'timing.cache'}" in printed
    assert manifest["engine_build"]["version_compatible"] is False

    caches.clear()
    flags = ("--engine", str(engine), "--no-timing-cache", "--version-compatible")
    assert run_build(_parse(*flags, "--hardware-compatibility-level", "ampere-plus"), out) == 0
    assert caches == dict.fromkeys(("prefill_k32", "prefill_k64", "decode"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine_build"]["timing_cache"] is None
    assert manifest["engine_build"]["version_compatible"] is True
    assert manifest["engine_build"]["hardware_compatibility_level"] == "ampere-plus"
    assert calls["decode"][3].endswith(
        "--no-timing-cache --version-compatible --hardware-compatibility-level ampere-plus"
    )
    caches.clear()
    assert run_build(_parse("--engine", str(engine), "--timing-cache", str(tmp_path / "tc")), out) == 0
    assert set(caches.values()) == {tmp_path / "tc"}


def test_run_build_fails_readiness_before_anything_else(tmp_path, prefill, decode, capsys):
    out = _out_dir(tmp_path, [prefill, decode], broken=True)
    assert run_build(_parse(), out) == 1
    err = capsys.readouterr().err
    assert "NonZero" in err and "readiness check failed" in err


def test_run_build_usage_errors(tmp_path, prefill, decode):
    with pytest.raises(UsageError, match=r"no manifest\.json"):
        run_build(_parse(), tmp_path)
    out = _out_dir(tmp_path, [prefill, decode])
    (out / "prefill.onnx").unlink()
    with pytest.raises(UsageError, match="missing"):
        run_build(_parse(), out)
    _onnx_for(prefill, out / "prefill.onnx")
    with pytest.raises(UsageError, match="min <= opt <= max"):
        run_build(_parse("--min-batch", "4", "--max-batch", "2"), out)
    with pytest.raises(UsageError, match="is a directory"):
        run_build(_parse("--engine", str(tmp_path)), out)


# ------------------------------------------------------------------------------ needs TensorRT + GPU


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ok, why = trt_status()
    if not ok:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("trt") / "star_out"
    cmd = [
        sys.executable,
        "-m",
        "star_export",
        "llava",
        "--keep",
        "16",
        "--skip-validation",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.tensorrt
def test_trt_prefill_engine_matches_onnxruntime(exported, tmp_path):
    from star_export.validate import make_inputs, row_alone

    manifest = json.loads((exported / "manifest.json").read_text())
    contract = contract_from_dict(manifest["graphs"]["prefill"])
    geo = Geometry.from_dict(manifest["model"]["geometry"])
    settings = BuildSettings(dtype="fp32", timing_cache=tmp_path / "tc.bin")
    engine = tmp_path / "out.plan"
    entry = build_engine(exported / "prefill.onnx", engine, contract, settings)
    assert engine.is_file() and entry["bytes"] == engine.stat().st_size and len(entry["sha256"]) == 64
    assert (tmp_path / "tc.bin").is_file()
    assert {x["name"] for x in entry["io"]} == set(contract.input_names) | set(contract.output_names)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    feeds = make_inputs(geo, batch=2, text_len=24, seed=0)
    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine)))) as runner:
        for f in (feeds, row_alone(feeds, 1)):
            out = runner.infer(f)
            assert set(out) == set(contract.output_names)

    # a second build reuses the timing cache
    entry2 = build_engine(exported / "prefill.onnx", engine, contract, settings)
    assert entry2["timing_cache"] == str(tmp_path / "tc.bin")


@pytest.mark.tensorrt
def test_trt_run_build_records_engines(exported):
    engine = exported / "engines" / "star.plan"
    args = _parse("--engine", str(engine), "--max-batch", "4")
    assert run_build(args, exported) == 0
    manifest = json.loads((exported / "manifest.json").read_text())
    prefill_engine, decode_engine = engine_paths(engine)
    assert manifest["engines"]["prefill"]["path"] == str(prefill_engine) and prefill_engine.is_file()
    if "decode" in manifest["graphs"]:
        assert decode_engine.is_file() and manifest["engines"]["decode"]["graph"] == "decode"
    shapes = manifest["engines"]["prefill"]["profiles"][0]["inputs"]["input_ids"]
    assert shapes["max"][0] == 4
