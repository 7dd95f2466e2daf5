"""``eval``: what pruning costs in answers, measured on the user's own images and questions.

    report = star_export.evaluate.run("star_out", "questions.jsonl", keeps=[64], out="eval_out")
    print(report.format()); report.levels[1].agreement

Every example is answered (greedy) by the unpruned reference, the PyTorch rewrite of the export's
checkpoint at keep1 = keep2 = N (in float32, whatever the export's dtype: the report states both),
and by each keep level of the export; per level the report gives answer and first-token agreement
with the reference, the first token's KL, accuracy against the data's answers (VQA accuracy on rows
with several answers, exact match on rows with one: ``EvalReport.metric``), median latencies. Its first row, "unpruned", is the check that can fail: the export's
own keep = N level (export with e.g. ``--keep 64,128,576``) or, without one, transformers' unmodified
model, against the reference's answers.

Modules, one job each: ``data`` (readers), ``metrics`` (normalisation, agreement, KL, accuracy),
``run`` (the loop, rows.jsonl, resume), ``report`` (table, eval.json, eval.png).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from star_export.atomic import disk_guard
from star_export.errors import UsageError
from star_export.evaluate.data import BadRow, Example, check_images, read_examples
from star_export.evaluate.metrics import EXACT_MATCH, VQA_ACCURACY, accuracy, agree, kl_divergence, normalize
from star_export.evaluate.report import EvalReport, LevelRow, plot, summarize, write_json
from star_export.evaluate.run import (
    ROWS,
    check_batch,
    check_out,
    load_examples,
    read_rows,
    run_examples,
    unpruned_source,
)
from star_export.progress import Log, quiet

__all__ = [
    "EXACT_MATCH",
    "ROWS",
    "VQA_ACCURACY",
    "BadRow",
    "EvalReport",
    "Example",
    "LevelRow",
    "accuracy",
    "agree",
    "check_images",
    "kl_divergence",
    "normalize",
    "plot",
    "read_examples",
    "run",
]


def run(
    from_dir: str | Path,
    data: str | Path,
    *,
    keeps: list[int] | None = None,
    limit: int | None = None,
    out: str | Path = "eval_out",
    runtime: str = "onnxruntime",
    image_root: str | Path | None = None,
    resume: bool = False,
    skip_bad: bool = False,
    max_new_tokens: int = 16,
    batch_size: int = 1,
    log: Log = quiet,
) -> EvalReport:
    """Evaluate the keep levels ``keeps`` (default: every level of the export) of ``from_dir`` on
    ``data``; writes ``out``/rows.jsonl (row by row), eval.json and eval.png. Bad input is a one-line
    UsageError before anything is written (with ``skip_bad`` the bad rows are reported instead)."""
    from star_export.api import quiet_libraries
    from star_export.manifest import read_manifest
    from star_export.session import load_export

    for flag, value in (
        ("--max-new-tokens", max_new_tokens),
        ("--batch-size", batch_size),
        ("--limit", limit),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    quiet_libraries()
    from_dir, out = Path(from_dir), Path(out)
    check_out(out)
    pipe = load_export(from_dir, runtime=runtime)
    check_batch(batch_size, pipe.dims)
    export_dtype = str(read_manifest(from_dir).get("graphs", {}).get("decode", {}).get("dtype", "float32"))
    chosen = list(dict.fromkeys(keeps)) if keeps else pipe.keeps
    levels = {keep: pipe.level(keep).keep1 for keep in chosen}  # a keep the export lacks: one line
    examples, bad = load_examples(data, image_root, limit, skip_bad)
    ids, _ = pipe.pre.encode_prompts([e.question for e in examples])
    for keep in {*chosen, *(k for k in pipe.keeps if k == pipe.geo.n_visual)}:
        pipe.check_request(ids.shape[1], max_new_tokens, keep)  # the profile, before any row is run
    settings = {
        "from": str(from_dir.resolve()),
        "data": str(Path(data).resolve()),
        "image_root": None if image_root is None else str(Path(image_root).resolve()),
        "runtime": runtime,
        "keeps": chosen,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "n_visual": pipe.geo.n_visual,
    }
    with disk_guard(out, "--out"):  # a full disk: one line; rows.jsonl keeps whole rows for --resume
        return _run(pipe, from_dir, out, settings, levels, examples, bad, chosen, export_dtype, resume, log)


def _run(
    pipe: Any,
    from_dir: Path,
    out: Path,
    settings: dict[str, Any],
    levels: dict[int, int],
    examples: list[Any],
    bad: list[Any],
    chosen: list[int],
    export_dtype: str,
    resume: bool,
    log: Log,
) -> EvalReport:
    from star_export.session import load_unpruned

    done = read_rows(out, settings, resume)
    log(f"[1/3] loading the unpruned reference (keep1 = keep2 = {pipe.geo.n_visual}, PyTorch rewrite)")
    ref = load_unpruned(from_dir)
    ref_dtype = str(next(ref.model.parameters()).dtype).removeprefix("torch.")
    log(f"[2/3] {len(examples)} examples x ({len(chosen)} levels + reference) into {out / ROWS}")
    rows = run_examples(pipe, ref, examples, settings, out, done, log)
    wanted = {e.id for e in examples}
    rows = [r for r in rows if r["id"] in wanted]  # a resumed run with a smaller --limit reports fewer
    log("[3/3] report")
    report = summarize(
        rows,
        settings,
        levels,
        unpruned_source(pipe),
        f"{ref.where} at keep1 = keep2 = {pipe.geo.n_visual}, layer K = {ref.cfg.layer}",
        [b.to_dict() for b in bad],
        reference_dtype=ref_dtype,
        export_dtype=export_dtype,
    )
    report.files = {
        "rows": str(out / ROWS),
        "json": str(out / "eval.json"),
        "plot": str(out / "eval.png"),
    }
    write_json(report, out / "eval.json")
    plot(report, out / "eval.png")
    return report
