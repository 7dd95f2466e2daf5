"""The command line end to end: outputs, exit codes and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest

from star_export.cli import main
from star_export.engines import trt_status

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def run_main(capsys: pytest.CaptureFixture, *args: str) -> SimpleNamespace:
    """``main(args)`` in this process (no interpreter start, no torch import): exit code and output.
    An exception escaping ``main`` fails the test, as a traceback would."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors exit 2 from inside main
        code = e.code
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "star_export", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_llava_with_a_saved_gqa_checkpoint_writes_onnx_manifest_and_report(gqa_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)  # the user's own files in --out stay, and are not listed as written
    (out / "thesis.txt").write_text("mine")
    code = main(
        ["llava", "--model", str(gqa_dir), "--keep", "32", "--keep1", "32", "--layer", "3", "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "overall: PASS" in printed and "onnxruntime vs torch (batch)" in printed
    assert (
        f"wrote {out}/: decode.onnx, manifest.json, prefill.onnx, processor, report.json, weights.onnx.data\n"
        in printed
    )
    assert (out / "thesis.txt").read_text() == "mine" and (out / "sub").is_dir()
    assert sorted(p.name for p in out.iterdir()) == [
        "decode.onnx",
        "manifest.json",
        "prefill.onnx",
        "processor",
        "report.json",
        "sub",
        "thesis.txt",
        "weights.onnx.data",
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["graph_check"]["ok"] and report["comparator"]["passed"]
    assert {r["check"] for r in report["rows"]} >= {
        "onnxruntime vs torch (batch)",
        "torch rewrite vs reference",
        "torch rewrite (keep=N) vs HF",
        "padded row vs alone (onnxruntime)",
        "generate onnxruntime vs torch (8 greedy)",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["star"] == {
        "N": 576,
        "keep1": 32,
        "keep2": 32,
        "layer_K": 3,
        "n_fixed": 0,
        "span1": 32,
        "span2": 32,
        "n_positions": 576,
        "L1": "text_len - 1 + 32",
        "L2": "text_len - 1 + 32",
        "present_length_per_layer": ["L1", "L1", "L1", "L2"],
        "index_space": "patch index j in 0..575: the vision tower's 24x24 patch grid in raster order "
        "(row j // 24, column j % 24)",
        "default_keep": 32,
        "levels": [
            {
                "keep1": 32,
                "keep2": 32,
                "layer_K": 3,
                "span1": 32,
                "span2": 32,
                "L1": "text_len - 1 + 32",
                "L2": "text_len - 1 + 32",
                "graph": "prefill",
                "file": "prefill.onnx",
            }
        ],
    }
    assert manifest["image"]["kind"] == "processor" and manifest["layout"] == {}
    prefill = manifest["graphs"]["prefill"]
    names = [t["name"] for t in prefill["outputs"]]
    assert names[:3] == ["logits", "stage1_keep_idx", "stage2_keep_idx"] and names[-1] == "present.3.value"
    assert prefill["inputs"][1] == {
        "name": "input_ids",
        "dtype": "int64",
        "shape": ["batch", "text_len"],
        "doc": prefill["inputs"][1]["doc"],
    }
    assert manifest["image_token_id"] == 1000 and manifest["image"]["size"] == 336
    assert manifest["model"]["source"] == str(gqa_dir)
    assert {"star_export", "torch", "transformers", "onnx", "onnxruntime", "polygraphy"} <= set(
        manifest["versions"]
    )
    assert sorted(f["file"] for f in manifest["files"]) == [
        "decode.onnx",
        "prefill.onnx",
        "weights.onnx.data",
    ]
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"])
    assert [t["name"] for t in manifest["graphs"]["decode"]["inputs"]][:4] == [
        "input_ids",
        "position_ids",
        "attention_mask_l1",
        "attention_mask_l2",
    ]
    assert (out / "processor" / "tokenizer.json").is_file()


@pytest.mark.skipif(trt_status()[0], reason="TensorRT is present here: the exit-3 path does not apply")
def test_engine_flag_writes_fp16_onnx_then_exits_3_with_the_finish_command(mha_dir, tmp_path, capsys):
    """The headline command with ``--engine`` where TensorRT is absent (in this process: the exit
    code and the output are main's; test_check_command_exit_codes runs a real process)."""
    out = tmp_path / "eng"
    plan = tmp_path / "out.plan"
    r = run_main(
        capsys,
        "llava",
        "--model",
        str(mha_dir),
        "--keep",
        "16",
        "--out",
        str(out),
        "--engine",
        str(plan),
        "--dtype",
        "fp16",
    )
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0 and "TensorRT" in line
    assert f"python -m star_export build --from {out} --engine {plan} --dtype fp16" in line
    assert (out / "prefill.onnx").is_file() and (out / "decode.onnx").is_file()
    assert (out / "manifest.json").is_file()
    assert not plan.exists() and not list(tmp_path.glob("*.plan*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graphs"]["prefill"]["dtype"] == "float16"
    model = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert "[check] prefill.onnx for TensorRT" in r.stdout
    # `build --from` on the same directory ends the same way
    r2 = run_main(capsys, "build", "--from", str(out), "--engine", str(plan))
    assert r2.returncode == 3 and f"build --from {out} --engine {plan}" in r2.stderr


def _not_llava(tmp_path: Path) -> Path:
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    return d


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "0"], "--keep must be in 1..576"),
        (["--keep", "577"], "--keep must be in 1..576"),
        (["--keep", "64", "--keep1", "32"], "--keep1 (32) must be >= --keep (64)"),
        (["--keep", "8", "--keep1", "600"], "--keep1 must be in 1..576"),
        (["--keep", "8", "--layer", "0"], "--layer must be in 1..3"),
        (["--keep", "8", "--layer", "4"], "--layer must be in 1..3"),
        (["--keep", "x"], "expected an integer"),
        (["--keep", "8", "--model", "{tmp}/missing"], "no such directory"),
        (["--keep", "8", "--model", "{bert}"], "architecture BertModel"),
        (["--keep", "8", "--model", "{tmp}"], "no config.json"),
        (["--keep", "8", "--out", "{file}"], "exists and is not a directory"),
        (["--keep", "8", "--out", "{file}/sub"], "not writable"),
        (["--keep", "8", "--recipe", "nope"], "unknown recipe"),
        (["--keep", "8", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--keep", "8", "--text-len", "3"], "--text-len must be in 5..512"),
        (
            ["--keep", "8", "--grid", "2x2"],
            "--grid does not apply to llava checkpoints (it applies to: llava_next)",
        ),
        (["--keep", "8", "--grid", "2"], "expected ROWSxCOLS"),
        (["--keep", "8", "--model", "{internvl}"], "architecture InternVLForConditionalGeneration"),
        (["--keep", "8", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
        (["--keep", "8", "--min-batch", "4", "--max-batch", "2"], "--min-batch 4 > --max-batch 2"),
        (["--keep", "8", "--out", "/proc/star_out"], "--out /proc/star_out: not writable"),
        (["--keep", "8", "--model", "{notok}"], "--model {notok}: cannot encode prompts, missing tokenizer"),
        (["--keep", "8", "--model", "{corrupt}"], "--model {corrupt}: cannot load the checkpoint"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_files(tmp_path, gqa_dir, args, message, capsys):
    file = tmp_path / "afile"
    file.write_text("x")
    bert = _not_llava(tmp_path)
    internvl = tmp_path / "internvl"
    internvl.mkdir()
    (internvl / "config.json").write_text(
        json.dumps({"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"]})
    )
    import shutil

    notok, corrupt = tmp_path / "notok", tmp_path / "corrupt"
    if "{notok}" in args:  # a checkpoint without tokenizer files
        shutil.copytree(gqa_dir, notok)
        (notok / "tokenizer.json").unlink()
    if "{corrupt}" in args:  # a .safetensors whose header is garbage
        shutil.copytree(gqa_dir, corrupt)
        (corrupt / "model.safetensors").write_bytes(b"\xff" * 64)
    fmt = {
        "tmp": tmp_path,
        "file": file,
        "bert": bert,
        "internvl": internvl,
        "notok": notok,
        "corrupt": corrupt,
    }
    args = [a.format(**fmt) for a in args]
    message = message.format(**fmt)
    out = tmp_path / "out"
    if "--out" not in args:
        args += ["--out", str(out)]
    if not {"--model", "--recipe"} & set(args):  # the tests' model, not the shipped demo
        args = ["--recipe", "llava-tiny", *args]
    r = run_main(capsys, "llava", *args)  # in process (the console entry point: test_help_runs et al.)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".star_export-*"))


def test_failure_during_export_leaves_no_partial_files(tmp_path, monkeypatch):
    import star_export.onnx_export as export_mod

    def boom(*_a, **_k):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(export_mod, "export_onnx", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        main(["llava", "--recipe", "llava-tiny", "--keep", "8", "--out", str(out)])
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".star_export-*"))


@pytest.mark.parametrize(
    "command",
    [[], *([c] for c in "llava generate build validate triton serve bench check eval".split())],
)
def test_help_runs(command, capsys):
    """Every command's --help, in this process (``main`` is what ``python -m star_export`` runs; the
    entry point itself is run as a process for the top-level help, and by test_check_command_exit_codes)."""
    r = run_cli("--help", timeout=60) if not command else run_main(capsys, *command, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout


def test_check_command_exit_codes(tmp_path, capsys):
    r = run_cli("check", str(tmp_path / "nope.onnx"), timeout=60)  # the process's own exit code
    assert r.returncode == 2 and "no such file" in r.stderr
    notes, png = tmp_path / "notes.txt", tmp_path / "cat.png"
    notes.write_text("a note, not a graph\n")
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    for path in (notes, png):
        r = run_main(capsys, "check", str(path))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "not an ONNX model" in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_sigterm_during_an_export_leaves_nothing_behind(tmp_path):
    """SIGTERM (a scheduler stopping the job) cleans up the staging directory like SIGINT does."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "star_export", "llava", "--recipe", "llava-tiny", "--keep", "8", "--out", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        for line in proc.stdout:  # wait until the export has started writing into the stage
            if line.startswith("[2/"):
                break
        time.sleep(2.0)
        assert list(tmp_path.glob(".star_export-*")), "the staging directory should exist mid-export"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".star_export-*"))


@pytest.mark.skipif(trt_status()[0], reason="TensorRT is present here: the suggested commands would build")
def test_every_command_the_tool_suggests_runs_as_printed(cli_export, tmp_path, capsys):
    """The commands star_export prints as advice (help epilogs, error hints) parse and run: with no
    TensorRT here they end in exit 3 (the documented 'missing component'), never in a usage error."""
    import re

    export = cli_export("llava-keep16", "--keep", "16")
    hints: list[str] = []
    for command in ("triton", "build"):
        text = run_main(capsys, command, "--help").stdout
        hints += re.findall(r"python -m star_export (?:build|validate) [^`\n]*", text)
    r = run_main(
        capsys, "triton", "--from", str(export), "--repo", str(tmp_path / "repo"), "--backend", "tensorrt"
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    hints += re.findall(r"python -m star_export (?:build|validate) [^`)\n]*", r.stderr)
    hints = [h for h in hints if "[" not in h]  # usage synopses are not advice
    assert len(hints) >= 2, hints
    for hint in hints:
        argv = hint.replace("star_out", str(export)).split()[3:]
        done = run_cli(*argv, timeout=300)
        assert done.returncode == 3 and "Traceback" not in done.stderr, (hint, done.stderr)


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        ({"dtype": "float16"}, "fp16"),
        ({"torch_dtype": "bfloat16"}, "bf16"),
        ({"torch_dtype": "torch.float16"}, "fp16"),
        ({"dtype": "float32"}, "fp32"),
        ({}, "fp32"),
    ],
)
def test_default_export_dtype_is_the_checkpoints(tmp_path, config, expect):
    """A half-precision checkpoint is never widened to an fp32 copy unless --dtype fp32 asks for it."""
    from star_export.load import checkpoint_dtype

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", **config}))
    assert checkpoint_dtype(tmp_path) == expect


def test_long_steps_print_a_heartbeat_until_they_end(capsys):
    import time as _time

    from star_export.progress import heartbeat

    with heartbeat("exporting x", print, every=0.05):
        _time.sleep(0.3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 3 and all(line.startswith("      ... exporting x (") for line in lines)
    _time.sleep(0.15)
    assert capsys.readouterr().out == ""  # nothing after the step ended
