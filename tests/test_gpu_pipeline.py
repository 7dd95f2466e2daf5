"""tools/gpu_pipeline.py: the plan of commands (what a GPU host would run), checked here without
running it: the export carries the requested --dtype, the engines are built exactly once, and every
command line parses with the real CLI parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from star_export.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_pipeline.py"


@pytest.fixture(scope="module")
def pipeline(tool):  # conftest's ``tool``: TOOL imported as a module
    return tool


def _commands(pipeline, *argv: str) -> dict[str, list[str]]:
    steps = pipeline.plan(pipeline.parse_args(["--python", "py", *argv]))
    return {s.name: s.command for s in steps if s.command is not None}


def _parsed(command: list[str]):
    assert command[:3] == ["py", "-m", "star_export"]
    return build_parser().parse_args(command[3:])  # argparse exits (SystemExit) on a bad line


def test_fp16_exports_fp16_and_builds_once(pipeline, tmp_path):
    cmds = _commands(pipeline, "--dtype", "fp16", "--out", str(tmp_path / "o"), "--max-batch", "4")
    assert list(cmds) == ["export", "build", "validate", "bench"]
    export, build = _parsed(cmds["export"]), _parsed(cmds["build"])
    assert export.command == "llava" and export.dtype == "fp16" and export.engine is None
    assert build.command == "build" and build.dtype == "fp16" and build.max_batch == 4
    assert build.engine == tmp_path / "o" / "prefill.plan" and build.from_dir == tmp_path / "o"
    assert build.timing_cache == tmp_path / "o" / "timing.cache"
    # exactly one step builds engines: `build`, and no other command names an engine
    builders = [name for name, cmd in cmds.items() if "build" in cmd[3:4] or "--engine" in cmd]
    assert builders == ["build"]
    validate = _parsed(cmds["validate"])
    assert validate.command == "validate" and validate.trt and validate.from_dir == tmp_path / "o"


def test_default_dtype_is_the_checkpoints(pipeline, tmp_path):
    cmds = _commands(pipeline, "--out", str(tmp_path / "o"), "--keep", "32")
    assert "--dtype" not in cmds["export"] and "--dtype" not in cmds["build"]
    assert _parsed(cmds["export"]).dtype is None and _parsed(cmds["build"]).dtype is None


def test_bench_command_is_one_the_cli_takes(pipeline, tmp_path):
    cmds = _commands(pipeline, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "m"))
    bench = _parsed(cmds["bench"])
    assert (
        bench.command == "bench" and bench.model == tmp_path / "m" and bench.out == tmp_path / "o" / "bench"
    )
    assert _parsed(cmds["export"]).model == str(tmp_path / "m")  # a directory or a hub id
    assert "bench" not in _commands(pipeline, "--skip-bench")


def test_help_and_dry_run_print_the_plan(pipeline, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, str(TOOL), "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0 and "--keep" in r.stdout and "--dtype" in r.stdout
    argv = ["--dry-run", "--out", str(tmp_path / "o"), "--dtype", "fp16"]
    r = subprocess.run(
        [sys.executable, str(TOOL), *argv], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    steps = pipeline.plan(pipeline.parse_args(argv))
    assert [line.split("] ", 1)[0] + "]" for line in lines] == [f"[{s.name}]" for s in steps]
    assert "star_export llava" in lines[0] and "--dtype fp16" in lines[0] and "--engine" not in lines[0]
    assert "star_export build" in lines[1] and "--dtype fp16" in lines[1]
    assert sum("star_export build" in line for line in lines) == 1
