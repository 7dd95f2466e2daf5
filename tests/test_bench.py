"""The benchmark: helpers, the command line, and one smoke run on llava-tiny (no timed asserts)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from star_export import bench
from star_export.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def test_stats_and_rounds():
    s = bench.Stats.of([3.0, 1.0, 2.0, 4.0, 5.0])
    assert (s.n, s.median, s.min, s.max) == (5, 3.0, 1.0, 5.0)
    assert s.p10 < s.median < s.p90
    assert bench.Stats.of([]) is None
    assert bench.repeats_for(1, 10) == 10
    assert bench.repeats_for(4, 10) == 3
    assert bench.repeats_for(2, 10) == 5
    assert bench.repeats_for(64, 10) == 3
    assert bench.repeats_for(4, 2) == 2


def test_bench_inputs_follow_the_prompt_rules(gqa):
    from star_export.star import check_prompts

    geo = gqa.geometry
    feeds = bench.bench_inputs(geo, batch=3, text_len=20, image_position=5)
    assert feeds["input_ids"].shape == (3, 20) and feeds["pixel_values"].shape[0] == 3
    assert (feeds["input_ids"][:, 5] == geo.image_token_id).all()
    check_prompts(feeds["input_ids"], feeds["attention_mask"], geo.image_token_id)
    with pytest.raises(UsageError):
        bench.bench_inputs(geo, 1, 20, image_position=19)


def test_rss_sampler_sees_an_allocation():
    with bench.RssSampler() as s:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block += 1
    assert s.peak >= s.start and s.delta > 32 * 2**20


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    bench.add_bench_arguments(parser)
    args = parser.parse_args(
        ["--keep", "32,64", "--batch", "1,2", "--runtime", "onnxruntime,torch", "--repeats", "3"]
    )
    assert (args.keep, args.batch, args.runtime, args.repeats) == (
        [32, 64],
        [1, 2],
        ["onnxruntime", "torch"],
        3,
    )
    defaults = parser.parse_args([])
    assert defaults.keep == [64, 128, 192] and defaults.batch == [1, 4]
    assert defaults.runtime == ["onnxruntime", "torch", "tensorrt"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--keep", "a,b"])


@pytest.mark.parametrize(
    "kwargs",
    [{"runtimes": ["onnxruntime", "mxnet"]}, {"batches": [0]}, {"repeats": 0}, {"keeps": [576]}],
)
def test_usage_errors_before_work(tmp_path, kwargs):
    args = {"recipe": "llava-tiny", "out": tmp_path / "b", **kwargs}
    with pytest.raises(UsageError):
        bench.run_bench(**args)


def test_bench_command_help():
    """``python -m star_export bench`` is the bench's one command line (bench/run.py, its wrapper, is gone)."""
    out = subprocess.run(
        [sys.executable, "-m", "star_export", "bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "--keep" in out.stdout and "--runtime" in out.stdout


# ------------------------------------------------------------------------------ smoke run

SMALL = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 2}}


@pytest.fixture(scope="module")
def report(recipe, tmp_path_factory):
    """One bench run: llava-tiny (2 + 2 layers), keep 64, batches 1 and 2, every runtime."""
    from star_export.load import materialise

    model_dir = materialise(recipe, SMALL)
    out = tmp_path_factory.mktemp("bench")
    lines: list[str] = []
    rep = bench.run_bench(
        None,
        keeps=[64],
        batches=[1, 2],
        runtimes=["onnxruntime", "torch", "tensorrt"],
        model_dir=model_dir,
        out=out,
        repeats=2,
        warmup=0,
        decode_steps=1,
        layer=1,
        export_workers=2,
        log=lines.append,
    )
    return rep, lines


def test_smoke_json_structure(report):
    rep, lines = report
    data = json.loads(rep.json_path.read_text())
    for key in (
        "machine",
        "settings",
        "model",
        "cost",
        "exports",
        "variants",
        "scoring",
        "profile",
        "ablation",
        "targets",
    ):
        assert key in data, key
    assert data["machine"]["cpu"] and data["machine"]["versions"]["onnxruntime"]
    assert data["settings"]["n_visual"] == 576 and data["settings"]["batches"] == [1, 2]
    names = {v["name"] for v in data["variants"]}
    for b in (1, 2):
        assert f"hf-eager/b{b}/unpruned" in names
        for tag in ("unpruned", "keep64"):
            for runtime in ("torch-rewrite", "onnxruntime", "tensorrt"):
                assert f"{runtime}/b{b}/{tag}" in names
        assert {f"onnxruntime-scoring/b{b}/keep64", f"torch-scoring/b{b}/keep64"} <= names
    assert {e["graph"] for e in data["exports"]} == {"prefill", "decode", "scoring"}
    assert any("[bench 4/6]" in line for line in lines)


def test_smoke_numbers_are_positive(report):
    data = report[0].data
    for v in data["variants"]:
        if v["runtime"] == "tensorrt":
            assert v["skipped"]  # no TensorRT here, or not timed: always a reason
            continue
        assert v["skipped"] is None
        assert v["prefill_s"]["n"] == 2 and v["prefill_s"]["median"] > 0
        assert v["prefill_s"]["p10"] <= v["prefill_s"]["median"] <= v["prefill_s"]["p90"]
        assert v["peak_rss_bytes"] > 0
        if v["kind"] == "prefill":
            assert v["decode_tokens_per_s"]["median"] > 0
            assert v["kv_bytes"] == v["kv_bytes_model"] > 0  # measured cache = cost model
            assert v["flops_model"] > 0
    for c in data["cost"]["ceilings"]:
        assert c["speedup_ceiling"] > 1 and c["kv_bytes_saved"] > 0
    assert data["scoring"] and all(0 < s["share"] for s in data["scoring"])
    for p in data["profile"]:
        assert 0 <= p["scoring_share"] <= 1 and p["op_share"]
    for g in data["ablation"]:
        assert {c["config"] for c in g["configs"]} >= {"ORT_DISABLE_ALL", "ORT_ENABLE_ALL", "ALL, 1 thread"}
        assert all(c["median_s"] > 0 for c in g["configs"])
        assert all(c["parity"] for c in g["configs"] if "int8" not in c["config"])  # exact settings
    assert {t["target"] for t in data["targets"]} and all("met" in t for t in data["targets"])


def test_smoke_table_and_plot(report):
    rep = report[0]
    table = rep.table
    for runtime in ("hf-eager", "torch-rewrite", "onnxruntime", "tensorrt"):
        assert runtime in table
    assert "batch 1" in table and "batch 2" in table and "STAR scoring alone" in table
    assert "ceiling" in table and "targets" in table
    assert rep.plot_path is not None and rep.plot_path.stat().st_size > 1000
    assert rep.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
