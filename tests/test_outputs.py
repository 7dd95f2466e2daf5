"""Atomic output: staged writes, re-runs into the same directory, failures leave nothing."""

from __future__ import annotations

import pytest

from star_export.errors import UsageError
from star_export.outputs import staged


def test_rerun_replaces_files_and_directories_and_drops_stale_owned_entries(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old report")
    (out / "prefill.onnx").write_text("old graph")
    (out / "processor").mkdir()
    (out / "processor" / "old.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own file")
    with staged(out, owned=("prefill.onnx", "processor", "report.json")) as stage:
        (stage / "prefill.onnx").write_text("new graph")
        (stage / "processor").mkdir()
        (stage / "processor" / "tokenizer.json").write_text("{}")
    assert (out / "prefill.onnx").read_text() == "new graph"
    assert sorted(p.name for p in (out / "processor").iterdir()) == ["tokenizer.json"]
    assert not (out / "report.json").exists()  # owned, not produced this time: stale, removed
    assert (out / "notes.txt").read_text() == "the user's own file"  # not ours: kept
    assert not list(tmp_path.rglob(".star_export-*"))


def test_failure_inside_the_stage_changes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "prefill.onnx").write_text("old graph")
    with pytest.raises(RuntimeError), staged(out, owned=("prefill.onnx",)) as stage:
        (stage / "prefill.onnx").write_text("half written")
        raise RuntimeError("export crashed")
    assert (out / "prefill.onnx").read_text() == "old graph"
    assert not list(tmp_path.rglob(".star_export-*"))


def test_out_that_is_a_file_is_a_usage_error(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(UsageError, match="not a directory"), staged(f):
        pass
