"""tools/gpu_bench.py (``star_export.bench.gpu``) on CPU (issue #16): the whole script end to end on a tiny model (``--device cpu
--tiny``) in a process where onnx, onnxruntime, onnxscript, polygraphy and TensorRT cannot be imported,
as on a GPU host with only PyTorch and transformers; the JSON's structure and real numbers, the plot;
``--help``; one-line errors (exit 2 for flags, 3 for a missing CUDA device); the accelerated mode's
fallback chain, the timing budget and the shared-weight parity model. Nothing asserts a duration."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from star_export.bench.gpu import accel as gpu_accel
from star_export.bench.gpu import device as gpu_device
from star_export.bench.gpu import model as gpu_model
from star_export.bench.gpu import parity as gpu_parity
from star_export.bench.gpu import variants as gpu_variants
from star_export.families.llava import FAMILY, llava_geometry
from star_export.star import StarConfig

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_bench.py"  # the thin script (``tool`` fixture): its command line
ABSENT_ON_GPU_HOST = ("onnx", "onnxruntime", "onnxscript", "polygraphy", "tensorrt")
KEEPS, BATCHES, REPEATS = (8, 16), (1, 2), 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CPU run of the script as a user would start it, the GPU host's missing packages blocked."""
    out = tmp_path_factory.mktemp("gpu_bench") / "out"
    argv = ["--device", "cpu", "--tiny", "--out", str(out), "--keep", *map(str, KEEPS)]
    argv += ["--batch", *map(str, BATCHES), "--repeats", str(REPEATS), "--text-len", "16"]
    argv += ["--threads", "1"]  # one intra-op thread: tiny fp16 ops on a shared CPU crawl with more
    code = (
        "import runpy, sys\n"
        f"for name in {ABSENT_ON_GPU_HOST!r}:\n"
        "    sys.modules[name] = None  # import fails as if not installed\n"
        f"sys.argv = [{str(TOOL)!r}, *{argv!r}]\n"
        f"runpy.run_path({str(TOOL)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    data = json.loads((out / "gpu_bench.json").read_text()) if (out / "gpu_bench.json").is_file() else {}
    return proc, out, data


def _main(tool, argv: list[str]) -> int:
    try:
        return tool.main(argv)
    except SystemExit as e:  # argparse
        return int(e.code)


def test_end_to_end_on_cpu_without_onnx_or_tensorrt(tiny_run):
    proc, _, data = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for phase in range(1, 7):
        assert f"[{phase}/6]" in proc.stdout
    assert data["status"] == "done"
    assert data["table"].splitlines()[0] in proc.stdout  # the table printed is the one stored
    s = data["settings"]
    assert (s["device"], s["keeps"], s["batches"], s["n_visual"]) == ("cpu", list(KEEPS), list(BATCHES), 64)
    assert data["timing"]["rounds_done"] == REPEATS and "stopped" not in data["timing"]
    assert data["peak"]["matmul"]["tflops"] > 0 and data["peak"]["copy"]["gbps"] > 0
    assert data["model"]["parameters"] > 0 and data["model"]["first_logits_finite"] is True
    assert data["modes"]["eager"] == "ok"
    assert "CUDA" in data["modes"]["graphs"] and data["modes"]["compile"].startswith("skipped")


def test_every_variant_timed(tiny_run):
    _, _, data = tiny_run
    variants = {(v["kind"], v["batch"], v["tag"]): v for v in data["variants"]}
    tags = ["unpruned", *(f"keep{k}" for k in KEEPS)]
    expected = {("prefill", b, t) for b in BATCHES for t in tags}
    expected |= {("scoring", b, t) for b in BATCHES for t in tags[1:]}
    assert set(variants) == expected
    for (kind, batch, tag), v in variants.items():
        assert v["mode"] == "eager" and v["skipped"] is None
        assert v["prefill_s"]["n"] == REPEATS and len(v["prefill_samples_s"]) == REPEATS
        assert 0 < v["prefill_s"]["p10"] <= v["prefill_s"]["median"] <= v["prefill_s"]["p90"]
        if kind == "scoring":
            assert v["calls_per_sample"] > 1
            continue
        assert v["decode_tokens_per_s"]["median"] > 0 and v["decode_tokens_per_sample"] == 2 * batch
        assert v["kv_bytes"] == v["kv_bytes_model"] > 0  # the caches' bytes = the cost model's
        assert v["tflops"] > 0 and v["of_matmul_peak"] > 0 and v["flops"] > v["matmul_flops"] > 0
        assert (v["keep1"], v["keep2"]) == ((64, 64) if tag == "unpruned" else (2 * v["keep2"], v["keep2"]))
        assert v["l1"] == 16 - 1 + v["keep1"] and v["l2"] == 16 - 1 + v["keep2"]


def test_ratios_against_the_cost_model(tiny_run):
    _, _, data = tiny_run
    ratios = {(r["batch"], r["keep2"]): r for r in data["ratios"]}
    assert set(ratios) == {(b, k) for b in BATCHES for k in KEEPS}
    for r in ratios.values():
        assert r["speedup"] > 0 and r["ceiling"] > 1
        assert r["of_ceiling"] == pytest.approx(r["speedup"] / r["ceiling"])
        assert 0 < r["scoring_share"] and 0 < r["scoring_share_model"] < 1
        assert r["decode_speedup"] > 0
        assert 0 < r["kv_ratio"] < 1 and r["kv_bytes_pruned"] < r["kv_bytes_unpruned"]
    assert ratios[(1, 8)]["ceiling"] > ratios[(1, 16)]["ceiling"]  # fewer tokens kept, higher ceiling


def test_parity_rows_present_and_passing(tiny_run):
    _, _, data = tiny_run
    parity = data["parity"]
    assert parity["passed"] is True and parity["inputs"]["layers"] == 3
    tags = ["unpruned", *(f"keep{k}" for k in KEEPS)]
    for tag in tags:
        rows = [r for r in parity["rows"] if r["check"].endswith(f", {tag}")]
        outputs = [r["output"] for r in rows]
        assert outputs == ["stage1_keep_idx", "stage2_keep_idx", "logits", "present.* (worst)"], tag
        assert all(r["passed"] for r in rows)
        assert all(r["overlap"] is not None and r["overlap"] > 0.9 for r in rows[:2])
        assert rows[2]["tolerance"] == pytest.approx(32 * 2.0**-10)  # selection.LOGITS_EPS fp16 epsilons
        noise = parity["inputs"]["score_noise"][tag]
        assert noise["dtype"] == "float16" and len(noise["margins"]) == 2
    assert "overall: PASS" in data["parity_table"]


def test_files_small_enough_to_bring_back(tiny_run):
    _, out, data = tiny_run
    png = out / data["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in (png, out / "gpu_bench.json"):
        assert 0 < f.stat().st_size < 1 << 20
    assert sorted(p.name for p in out.iterdir()) == ["gpu_bench.json", "gpu_bench.png"]


def test_help(tool, capsys):
    assert _main(tool, ["--help"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--device",
        "--tiny",
        "--out",
        "--keep",
        "--batch",
        "--mode",
        "--parity-layers",
        "--budget-s",
    ):
        assert flag in text


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--keep", "0"], "--keep must be in 1..64"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--mode", "warp"], "invalid choice: 'warp'"),
        (["--mode", "graphs"], "--mode graphs needs --device cuda"),
        (["--parity-layers", "2"], "--parity-layers must be 0 or in 3..4"),
        (["--image-position", "0"], "--image-position 0 must leave a token"),
    ],
)
def test_bad_flag_is_one_line_exit_2(tool, capsys, tmp_path, argv, says):
    out = tmp_path / "out"
    assert _main(tool, ["--device", "cpu", "--tiny", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu_bench.py: error: ") and says in err, err
    assert not out.exists()  # refused before anything is built or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
def test_cuda_without_cuda_is_one_line_exit_3(tool, capsys, tmp_path):
    out = tmp_path / "out"
    assert _main(tool, ["--device", "cuda", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: PyTorch sees no CUDA device" in err, err
    assert not out.exists()


def _module():
    return torch.nn.Linear(2, 2)


def test_accel_falls_back_from_graphs_to_compile_with_the_reason(monkeypatch):
    def broken_capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    monkeypatch.setattr(gpu_accel, "capture_graph", broken_capture)
    monkeypatch.setattr(gpu_accel, "compile_call", lambda module, args: lambda: "compiled")
    accel = gpu_accel.Accel("auto", torch.device("cuda"))
    assert accel.mode == "graphs"
    call = accel.make(_module(), ())
    assert call() == "compiled" and accel.mode == "compile" and accel.fixed
    assert accel.notes["graphs"] == "failed: RuntimeError: operation not permitted when stream is capturing"
    assert accel.notes["compile"] == "ok"

    def broken_compile(module, args):
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(gpu_accel, "compile_call", broken_compile)
    with pytest.raises(RuntimeError, match="inductor failed"):  # fixed: a later failure is the variant's
        accel.make(_module(), ())
    assert accel.mode == "compile"


def test_accel_every_mode_failing_leaves_eager_only(monkeypatch):
    def broken(*args):
        raise RuntimeError("no")

    monkeypatch.setattr(gpu_accel, "capture_graph", broken)
    monkeypatch.setattr(gpu_accel, "compile_call", broken)
    accel = gpu_accel.Accel("auto", torch.device("cuda"))
    with pytest.raises(RuntimeError):
        accel.make(_module(), ())
    assert accel.mode is None
    assert accel.notes == {
        "eager": "ok",
        "graphs": "failed: RuntimeError: no",
        "compile": "failed: RuntimeError: no",
    }
    cpu = gpu_accel.Accel("auto", torch.device("cpu"))
    assert cpu.mode is None and "CUDA" in cpu.notes["graphs"]
    assert gpu_accel.Accel("eager", torch.device("cuda")).mode is None


def test_timing_stops_at_the_budget_and_keeps_what_it_measured(tmp_path):
    run = gpu_device.Run(tmp_path, budget_s=0.0)
    cfg = StarConfig(keep2=8, keep1=16, layer=2)
    variants = [
        gpu_variants.Variant("prefill", "eager", f"v{i}", cfg, 1, call=lambda: None) for i in range(3)
    ]
    args = argparse.Namespace(warmup=1, repeats=5)
    gpu_variants.interleave(variants, gpu_device.Clock(torch.device("cpu")), args, run, lambda: None)
    assert [len(v.prefill_s) for v in variants] == [1, 1, 1]  # the one timed round always runs
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["timing"]["rounds_done"] == 1 and "--budget-s 0" in saved["timing"]["stopped"]
    assert saved["status"] == "timing (2/6 rounds)"


def test_parity_model_shares_the_benchmarked_weights():
    config = gpu_model.model_config(True, None)
    geo = llava_geometry(config)
    model = gpu_model.build_model(config, torch.device("cpu"), torch.float32, 0)
    small = gpu_parity.truncated(model, 3)
    assert len(small.model.language_model.layers) == 3
    a, b = (
        small.model.language_model.layers[2].mlp.up_proj.weight,
        model.model.language_model.layers[2].mlp.up_proj.weight,
    )
    assert a.data_ptr() == b.data_ptr()
    assert not any(t.is_meta for t in [*small.parameters(), *small.buffers()])
    whole = gpu_parity.truncated(model, geo.num_layers)  # all layers: the same model, the same logits
    cfg = StarConfig(keep2=8, keep1=16, layer=2)
    feeds = (
        torch.randn(1, *geo.pixel_shape),
        torch.tensor([[1, 5, geo.image_token_id, 7, 9]]),
        torch.ones(1, 5, dtype=torch.int64),
    )
    with torch.no_grad():
        got = FAMILY.prefill_module(whole, geo, cfg)(*feeds)
        ref = FAMILY.prefill_module(model, geo, cfg)(*feeds)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
