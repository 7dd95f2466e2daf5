"""The Python API as the README documents it: examples/python_api.py runs as shipped (export at two
keep levels through ``star_export.export``, then ``star_export.load_export`` answering per level,
onnxruntime token-exact with the PyTorch rewrite)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_python_api_example_runs_as_documented(tmp_path, monkeypatch, capsys):
    """Run as documented (``python examples/python_api.py``: the script as ``__main__``, without
    OUT_DIR) from a clean folder: it writes into a new temporary directory it names, and leaves
    nothing in the folder it ran from (no api_example.png). In this process: a fresh interpreter
    only added some 7 s of imports."""
    import re
    import runpy
    import tempfile

    import torch

    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # its temporary directories land in the test's folder
    monkeypatch.setattr(sys, "argv", [str(ROOT / "examples" / "python_api.py")])
    with torch.random.fork_rng():
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    torch._dynamo.reset()
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-2000:]
    assert list(cwd.iterdir()) == []
    lines = stdout.splitlines()
    out = Path(re.match(r"exported (.+?)/: ", lines[0]).group(1))
    assert out.parent == tmp and out.name.startswith("star_api_out-")
    assert not list(tmp.rglob("api_example.png")) and not list(tmp.glob("tmp*"))  # the image's folder is gone
    assert "(scans ok: True)" in lines[0]
    assert "(the scene's answer: " in lines[1]
    assert [line.split(":")[0] for line in lines[2:]] == ["keep 32", "keep 64"]
    assert all(line.endswith("(onnxruntime == PyTorch rewrite: True)") for line in lines[2:])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [lv["keep2"] for lv in manifest["star"]["levels"]] == [32, 64]
    assert manifest["model"]["source"] == "demo:llava-demo"
    assert sorted(p.name for p in out.glob("*.onnx")) == [
        "decode.onnx",
        "prefill_k32.onnx",
        "prefill_k64.onnx",
    ]


def test_the_api_names_import_from_the_package():
    import star_export
    from star_export import ExportResult, Pipeline, export, load_export, load_model

    assert export.__module__ == "star_export.api" and ExportResult.__module__ == "star_export.api"
    assert {f.__module__ for f in (load_export, load_model, Pipeline)} == {"star_export.session"}
    assert set(star_export.__all__) >= {"export", "load_export", "load_model", "Pipeline", "ExportResult"}
