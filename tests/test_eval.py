"""``eval`` (star_export.evaluate): metrics, readers, bad input, resume, and end-to-end runs on two
exports of the tiny llava (random weights: its answers are noise, agreement is what it is)."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from star_export import cli, evaluate
from star_export.errors import UsageError
from star_export.evaluate import metrics
from star_export.evaluate.data import read_examples

run_module = importlib.import_module("star_export.evaluate.run")  # the package's ``run`` is the API
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "eval"
DATA = EXAMPLES / "questions.jsonl"


# ---- metrics -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red", "red"),
        ("red.", "red"),
        ("It's a dog!", "its dog"),
        ("The  Circle ", "circle"),
        ("an apple", "apple"),
        ("Two", "2"),
        ("three squares", "3 squares"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("  dark   blue\n", "dark blue"),
    ],
)
def test_normalize_rules(text, expected):
    assert metrics.normalize(text) == expected


def test_agreement_counts_disagreements():
    same = [metrics.agree(a, b) for a, b in [("Red", "red."), ("two", "2"), ("the cat", "Cat")]]
    assert metrics.rate(same) == 1.0
    forced = [metrics.agree(a, b) for a, b in [("red", "red"), ("red", "blue")]]
    assert metrics.rate(forced) == 0.5
    assert metrics.rate([]) is None


def test_kl_zero_for_identical_positive_otherwise():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    assert np.allclose(metrics.kl_divergence(logits, logits), 0.0, atol=1e-12)
    assert np.allclose(metrics.kl_divergence(logits, logits + 7.0), 0.0, atol=1e-12)  # shift-invariant
    other = logits.copy()
    other[:, 0] += 3.0
    assert (metrics.kl_divergence(logits, other) > 0).all()


def test_multi_answer_accuracy():
    assert metrics.correct("Two.", ["2", "two"])
    assert metrics.correct("dark blue", ["blue", "Dark Blue"])
    assert not metrics.correct("blue", ["red", "green"])
    assert metrics.median([3.0, None, 1.0, 2.0]) == 2.0


# ---- readers -------------------------------------------------------------------------------------
def test_read_llava_jsonl_relative_paths():
    examples, bad = read_examples(DATA)
    assert len(examples) == 12 and not bad
    assert all(e.image.is_file() for e in examples)
    first = examples[0]
    assert (first.id, first.answers, first.image) == ("1", ("red",), EXAMPLES / "images" / "red_circle.png")
    assert examples[2].answers == ("2", "two")


def test_read_csv_and_plain_jsonl_with_image_root(tmp_path):
    csv_examples, bad = read_examples(EXAMPLES / "questions.csv")
    assert len(csv_examples) == 12 and not bad
    assert csv_examples[2].answers == ("2", "two") and csv_examples[0].where.endswith("questions.csv:2")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        json.dumps({"image": "red_circle.png", "question": "What colour?", "gt_answer": ["red"]})
        + "\n"
        + json.dumps({"id": "b", "image": "blue_square.png", "question": "What shape?"})
        + "\n"
    )
    examples, bad = read_examples(plain, image_root=EXAMPLES / "images")
    assert not bad
    assert [e.id for e in examples] == ["1", "b"]
    assert examples[0].image == EXAMPLES / "images" / "red_circle.png" and examples[1].answers is None


def test_bad_rows_name_file_and_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "a.png", "text": "q"}\n{"text": "q"}\n{"image": "a.png"}\nnot json\n')
    examples, bad = read_examples(data)
    assert len(examples) == 1
    assert [str(b) for b in bad][:2] == [
        f'{data}:2: no "image" field',
        f'{data}:3: no question ("text" or "question") field',
    ]
    assert str(bad[2]).startswith(f"{data}:4: not valid JSON")
    with pytest.raises(UsageError, match="no such file"):
        read_examples(tmp_path / "missing.jsonl")


# ---- the command line on exports ---------------------------------------------------------------------
def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def levels_export(cli_export):
    return cli_export("llava-levels", "--keep", "8,16,32")  # shared with another module: same name + args


@pytest.fixture(scope="module")
def full_export(cli_export):
    return cli_export("llava-levels-full", "--keep", "16,576")


@pytest.fixture
def mixed_data(tmp_path):
    """Three good rows, a row without an image (line 2) and an image that does not open (line 4)."""
    shutil.copy(EXAMPLES / "images" / "red_circle.png", tmp_path / "a.png")
    shutil.copy(EXAMPLES / "images" / "blue_square.png", tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [
        {"question_id": 1, "image": "a.png", "text": "What colour is the circle?", "answer": "red"},
        {"question_id": 2, "text": "What shape?"},
        {"question_id": 3, "image": "b.png", "text": "What shape is it?", "answer": "square"},
        {"question_id": 4, "image": "broken.png", "text": "What?"},
        {"question_id": 5, "image": "a.png", "text": "What shape is it?", "answer": "circle"},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_bad_input_exits_2_one_line_nothing_written(levels_export, mixed_data, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--from", str(levels_export), "--out", str(out), "--max-new-tokens", "4"]
    code, _, err = _eval(capsys, *base, "--data", str(mixed_data))
    assert code == 2 and err.strip().count("\n") == 0
    assert f'{mixed_data}:2: no "image" field' in err
    code, _, err = _eval(capsys, *base, "--data", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "missing.jsonl: no such file" in err and err.strip().count("\n") == 0
    code, _, err = _eval(capsys, *base, "--data", str(DATA), "--keep", "64")
    assert code == 2 and "--keep 64: this export holds keep levels 8,16,32" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"image": "broken.png", "text": "q"}) + "\n")
    code, _, err = _eval(capsys, *base, "--data", str(broken))
    assert code == 2 and f"{broken}:1: " in err and err.strip().count("\n") == 0
    assert not out.exists()


def test_skip_bad_and_resume(levels_export, mixed_data, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--from", str(levels_export), "--data", str(mixed_data), "--out", str(out)]
    base += ["--max-new-tokens", "4", "--keep", "8", "--skip-bad"]
    code, stdout, _ = _eval(capsys, *base, "--limit", "2")
    assert code == 0, stdout
    lines = (out / "rows.jsonl").read_text().splitlines()
    assert [json.loads(x).get("id") for x in lines[1:]] == ["1", "3"]
    assert f'{mixed_data}:2: no "image" field' in stdout
    code, _, err = _eval(capsys, *base, "--limit", "2")  # an earlier run without --resume
    assert code == 2 and "--resume continues it" in err
    code, _, err = _eval(capsys, *base[:-3], "--max-new-tokens", "3", "--keep", "8", "--skip-bad", "--resume")
    assert code == 2 and "max_new_tokens = 4, not 3" in err and err.strip().count("\n") == 0
    code, stdout, err = _eval(capsys, *base, "--resume")
    assert code == 0 and "2 examples already in" in err
    again = (out / "rows.jsonl").read_text().splitlines()
    assert again[:3] == lines and [json.loads(x)["id"] for x in again[1:]] == ["1", "3", "5"]
    report = json.loads((out / "eval.json").read_text())
    assert report["examples"] == 3
    assert [b["where"] for b in report["bad_rows"]] == [f"{mixed_data}:2", f"{mixed_data}:4"]
    assert "skipped 2 bad rows" in stdout


@pytest.fixture(scope="module")
def levels_run(levels_export, tmp_path_factory):
    """No keep = N level: the unpruned row is transformers' unmodified model vs the rewrite."""
    out = tmp_path_factory.mktemp("eval_levels")
    report = evaluate.run(levels_export, DATA, limit=2, out=out, max_new_tokens=4)
    return report, out


def test_eval_end_to_end_no_unpruned_level(levels_run):
    report, out = levels_run
    table = report.format()
    assert [r.label for r in report.levels] == ["unpruned (keep 576)", "keep 32", "keep 16", "keep 8"]
    assert "transformers' unmodified model" in table and "keep 32" in table
    assert report.unpruned_source == "transformers"
    unpruned = report.unpruned
    assert unpruned.agreement == 1.0 and unpruned.first_token_agreement == 1.0
    assert unpruned.kl_mean < 1e-6
    for row in report.levels:
        assert row.examples == 2
        assert 0 <= row.agreement <= 1 and 0 <= row.first_token_agreement <= 1 and 0 <= row.accuracy <= 1
        assert row.kl_mean >= 0 and row.prefill_ms > 0 and row.decode_ms_per_token >= 0
        assert row.keep1 >= row.keep2
    saved = json.loads((out / "eval.json").read_text())
    assert saved["levels"][1]["keep2"] == 32 and saved["settings"]["keeps"] == [8, 16, 32]
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_unpruned_disagreement_is_counted(levels_export, tmp_path, monkeypatch):
    """The check can fail: an unmodified model that answers otherwise shows < 100 %."""
    real = run_module.hf_generate

    def other(ref, images, prompts, max_new_tokens):
        return [
            ([t + 1 for t in tokens], first[::-1].copy())
            for tokens, first in real(ref, images, prompts, max_new_tokens)
        ]

    monkeypatch.setattr(run_module, "hf_generate", other)
    report = evaluate.run(levels_export, DATA, keeps=[8], limit=1, out=tmp_path, max_new_tokens=2)
    assert report.unpruned.first_token_agreement == 0.0 and report.unpruned.agreement == 0.0
    assert report.unpruned.kl_mean > 1e-3
    assert "0.0 %" in report.format().splitlines()[5]


@pytest.fixture(scope="module")
def full_run(full_export, tmp_path_factory):
    """The export holds keep = N: its own unpruned level (onnxruntime, batches of 2) vs the rewrite."""
    out = tmp_path_factory.mktemp("eval_full")
    report = evaluate.run(full_export, DATA, limit=2, out=out, max_new_tokens=4, batch_size=2)
    return report, out


def test_eval_exported_unpruned_level_agrees(full_run, capsys):
    report, out = full_run
    assert report.unpruned_source == "export"
    assert [r.label for r in report.levels] == ["unpruned (keep 576)", "keep 16"]
    unpruned = report.unpruned
    assert unpruned.agreement == 1.0 and unpruned.first_token_agreement == 1.0 and unpruned.kl_mean < 1e-6
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()[1:]]
    assert all(r["unpruned"]["tokens"] == r["reference"]["tokens"] for r in rows)
    assert "export's own keep = N level (onnxruntime)" in report.format()
