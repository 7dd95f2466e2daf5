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
        ("It's a dog!", "it's dog"),  # apostrophes stay; "!" touches no space: a space
        ("The  Circle ", "circle"),
        ("an apple", "apple"),
        ("Two", "2"),
        ("three squares", "3 squares"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the script's number words end at ten
        ("None", "0"),
        ("3.5", "3.5"),
        ("3.", "3"),  # a period not followed by a digit goes
        (".5", ".5"),
        ("1,000", "1000"),
        ("yes, it is", "yes it is"),  # "," touches a space: deleted, not spaced
        ("black-and-white", "black and white"),
        ("red-blue 1,000", "redblue 1000"),  # a digit-comma-digit text: every mark deleted
        ("x;y (z)", "x y z"),
        ("dont", "don't"),  # the contractions table
        ("Whats up?", "what's up"),
        ("10:30", "10:30"),  # ":" is not in the script's list
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


# m of ten annotators gave the prediction: leaving out one of the m leaves m - 1 matches, one of the
# 10 - m others leaves m; acc = (m min(1, (m-1)/3) + (10-m) min(1, m/3)) / 10, worked by hand:
@pytest.mark.parametrize(
    ("m", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (9, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_ten_answers(m, expected):
    answers = ["2"] * m + ["3"] * (10 - m)
    assert metrics.accuracy("2", answers) == pytest.approx(expected, abs=1e-12)
    assert metrics.metric_of(answers) == metrics.VQA_ACCURACY


def test_vqa_accuracy_not_any_match():
    """The issue's row: "2" against one "2" and nine "3" is 0.30, not the 100 % of any-match."""
    answers = ["2"] + ["3"] * 9
    assert metrics.accuracy("2", answers) == pytest.approx(0.3)
    assert metrics.accuracy("Two.", answers) == pytest.approx(0.3)  # normalised before matching
    assert metrics.accuracy("3", answers) == pytest.approx(1.0)
    # the answers are normalised too: "two", "Two" and "2" are one answer given three times
    assert metrics.accuracy("2", ["two", "Two", "2", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)
    # fewer than ten: the same leave-one-out mean; two annotators agreeing leave one match: 1/3
    assert metrics.accuracy("red", ["red", "Red."]) == pytest.approx(1 / 3)
    assert metrics.accuracy("red", ["red", "red", "red", "blue"]) == pytest.approx((3 * 2 / 3 + 1) / 4)


def test_exact_match_single_answer():
    assert metrics.metric_of(["red"]) == metrics.EXACT_MATCH
    assert metrics.accuracy("The red.", ["Red"]) == 1.0
    assert metrics.accuracy("dark red", ["red"]) == 0.0
    assert metrics.accuracy("Two", ["2"]) == 1.0
    with pytest.raises(ValueError):
        metrics.accuracy("red", [])
    assert metrics.median([3.0, None, 1.0, 2.0]) == 2.0


def _side(answer: str) -> dict:
    return {
        "answer": answer,
        "agree": False,
        "first_token_agree": False,
        "kl": 0.5,
        "prefill_ms": 2.0,
        "decode_ms_per_token": 1.0,
    }


def _rows(pairs: list[tuple[list[str] | None, str]]) -> list[dict]:
    """Rows as run.py writes them: the data's answers and one answer given by every side."""
    return [
        {
            "id": str(i),
            "answers": answers,
            "reference": _side(got),
            "unpruned": _side(got),
            "levels": {"8": _side(got)},
        }
        for i, (answers, got) in enumerate(pairs)
    ]


SETTINGS = {
    "n_visual": 576,
    "data": "d.jsonl",
    "from": "x",
    "runtime": "onnxruntime",
    "max_new_tokens": 4,
    "batch_size": 1,
}


def _report(pairs):
    return evaluate.summarize(_rows(pairs), SETTINGS, {8: 16}, "export", "ref", [], "float32", "float16")


def test_report_names_its_metric(tmp_path):
    ten = ["2"] + ["3"] * 9
    vqa = _report([(ten, "2"), (ten, "3")])
    assert vqa.metric == "vqa_accuracy" and vqa.metric_rows == {"vqa_accuracy": 2, "exact_match": 0}
    assert vqa.reference_accuracy == pytest.approx(0.65) and vqa.levels[1].accuracy == pytest.approx(0.65)
    table = vqa.format()
    assert "VQA acc" in table.splitlines()[4] and "65.0 %" in table.splitlines()[6]
    assert "VQA accuracy on 2 rows with several answers" in table.splitlines()[-1]
    assert "reference: ref, float32 (the export's graphs: float16)" in table
    exact = _report([(["red"], "red"), (["red"], "blue")])
    assert exact.metric == "exact_match" and exact.reference_accuracy == 0.5
    assert "exact match" in exact.format().splitlines()[4]
    mixed = _report([(ten, "2"), (["red"], "red"), (None, "x")])
    assert mixed.metric == "vqa_accuracy+exact_match" and mixed.reference_accuracy == pytest.approx(0.65)
    assert "VQA accuracy on 1 rows" in mixed.format() and "exact match on 1 rows" in mixed.format()
    none = _report([(None, "x")])
    assert none.metric is None and none.reference_accuracy is None and none.levels[1].accuracy is None
    saved = json.loads(evaluate.write_json(vqa, tmp_path / "eval.json").read_text())
    assert (saved["metric"], saved["reference_dtype"], saved["export_dtype"]) == (
        "vqa_accuracy",
        "float32",
        "float16",
    )
    assert saved["levels"][1]["accuracy"] == pytest.approx(0.65) and saved["plotted"] == "accuracy"


def test_plot_shows_agreement_when_accuracy_is_zero_everywhere(tmp_path):
    zero = _report([(["red"], "blue")])
    assert zero.plotted == "agreement"  # random weights: accuracy 0 on every level
    assert _report([(None, "blue")]).plotted == "agreement"
    assert _report([(["red"], "red")]).plotted == "accuracy"
    assert evaluate.plot(zero, tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


# ---- readers -------------------------------------------------------------------------------------
def test_read_llava_jsonl_relative_paths():
    examples, bad = read_examples(DATA)
    assert len(examples) == 12 and not bad
    assert all(e.image.is_file() for e in examples)
    first = examples[0]
    assert (first.id, first.answers, first.image) == ("1", ("red",), EXAMPLES / "images" / "red_circle.png")
    assert examples[2].answers == ("2",) * 7 + ("two",) * 3 and examples[6].answers == ("3",)


def examples_answers(i: int) -> tuple[str, ...] | None:
    return read_examples(DATA)[0][i].answers


def test_read_csv_and_plain_jsonl_with_image_root(tmp_path):
    csv_examples, bad = read_examples(EXAMPLES / "questions.csv")
    assert len(csv_examples) == 12 and not bad
    assert csv_examples[2].answers == examples_answers(2) and csv_examples[0].where.endswith(
        "questions.csv:2"
    )
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


def test_out_under_a_file_and_batch_beyond_profile_exit_2(levels_export, tmp_path, capsys):
    """--out whose parent is a file, --out that is a file, --batch-size above the profile's max batch
    (8, the generic profile): one line, exit 2, nothing written."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    base = ["--from", str(levels_export), "--data", str(DATA), "--max-new-tokens", "2", "--limit", "1"]
    for out, said in [
        (blocker / "eval_out", f"--out {blocker / 'eval_out'}: {blocker} is a file, not a directory"),
        (blocker / "a" / "b", f"{blocker} is a file"),
        (blocker, f"--out {blocker}: is a file, not a directory"),
    ]:
        code, _, err = _eval(capsys, *base, "--out", str(out))
        assert code == 2 and said in err and err.strip().count("\n") == 0, err
    manifest = json.loads((levels_export / "manifest.json").read_text())
    most = next(d["max"] for d in manifest["graphs"]["decode"]["dynamic_dims"] if d["name"] == "batch")
    assert most == 8
    out = tmp_path / "out"
    code, _, err = _eval(capsys, *base, "--out", str(out), "--batch-size", "64")
    assert code == 2 and err.strip().count("\n") == 0
    assert "--batch-size 64 exceeds the export's profile (batch at most 8)" in err
    assert not out.exists() and blocker.read_text() == "x"


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


def test_unpruned_ignores_the_checkpoints_generation_config(levels_export, tmp_path, monkeypatch):
    """A checkpoint whose generation_config asks for sampling, a repetition penalty and suppresses the
    reference's own first token: the unmodified model still generates as the reference does (greedy,
    nothing else), so the unpruned row stays at 100 %; the checkpoint's config is put back after."""
    import star_export.session as session

    real = session.load_unpruned
    seen = {}

    def unpruned(directory):
        ref = real(directory)
        first = read_examples(DATA)[0][0]
        token = ref.generate([first.image], [first.question], max_new_tokens=1).result.tokens[0][0]
        config = ref.model.generation_config
        config.do_sample, config.temperature, config.top_k = True, 5.0, 0
        config.repetition_penalty, config.no_repeat_ngram_size = 10.0, 1
        config.suppress_tokens = [int(token)]
        seen["ref"] = ref
        return ref

    monkeypatch.setattr(session, "load_unpruned", unpruned)
    report = evaluate.run(levels_export, DATA, keeps=[8], limit=2, out=tmp_path, max_new_tokens=4)
    assert report.unpruned_source == "transformers"
    assert report.unpruned.agreement == 1.0 and report.unpruned.first_token_agreement == 1.0
    assert report.unpruned.kl_mean < 1e-6
    config = seen["ref"].model.generation_config
    assert config.repetition_penalty == 10.0 and config.do_sample and len(config.suppress_tokens) == 1


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


def test_full_disk_one_line_no_truncated_plot_and_resume_after_a_part_row(
    levels_export, tmp_path, capsys, monkeypatch
):
    """A disk that fills while eval.png is written: one line naming --out, exit 2, no eval.png (not
    even a truncated one) and no temporary file; a rows.jsonl cut mid-row resumes from its whole rows."""
    import errno

    import matplotlib.figure

    def full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))

    out = tmp_path / "out"
    base = ["--from", str(levels_export), "--data", str(DATA), "--out", str(out)]
    base += ["--max-new-tokens", "2", "--limit", "2", "--keep", "8"]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    code, _, err = _eval(capsys, *base)
    last = err.strip().splitlines()[-1]  # progress lines go to stderr before it
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert last.startswith(f"star_export: error: --out {out}: no space left on device"), last
    assert not (out / "eval.png").exists() and not list(out.glob(".eval.png.*"))
    monkeypatch.undo()
    rows = out / "rows.jsonl"
    whole = rows.read_text()
    rows.write_text(whole + '{"id": "3", "trunc')  # a row cut off by the full disk
    code, _, err = _eval(capsys, *base, "--resume")
    assert code == 0 and "2 examples already in" in err
    assert rows.read_text() == whole and (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
