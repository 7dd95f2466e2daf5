"""The summary of an ``eval`` run, rebuilt from its per-example rows: one table, eval.json, eval.png.

Per level: answer agreement with the reference, first-token agreement, mean KL(reference || level) of
the first token's distribution, accuracy against the data's answers (where the data gives them: VQA
accuracy on rows with several answers, exact match on rows with one; ``EvalReport.metric`` names it),
median prefill latency and decode latency per token, visual tokens kept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from star_export.atomic import atomic_path, atomic_write
from star_export.evaluate.metrics import EXACT_MATCH, VQA_ACCURACY, accuracy, mean, median, metric_of, rate

SOURCES = {
    "export": "the export's own keep = N level ({runtime}) vs the reference",
    "transformers": "transformers' unmodified model (generate, greedy) vs the reference (the export holds "
    "no keep = N level; its latency is the reference's, PyTorch)",
    "none": "not checked: no keep = N level in the export and no transformers comparison for this family",
}
MIXED = f"{VQA_ACCURACY}+{EXACT_MATCH}"  # the metric of a report whose rows have one answer or several
COLUMN = {VQA_ACCURACY: "VQA acc", EXACT_MATCH: "exact match", MIXED: "accuracy", None: "accuracy"}


@dataclass
class LevelRow:
    """One line of the table: a keep level (or the unpruned comparison) against the reference."""

    label: str
    keep1: int
    keep2: int
    examples: int
    agreement: float | None  # answers equal after normalisation, fraction
    first_token_agreement: float | None
    kl_mean: float | None  # mean KL(reference || level) of the first token, nats
    accuracy: float | None  # mean score against the data's answers (EvalReport.metric); None without
    prefill_ms: float | None  # median over batches
    decode_ms_per_token: float | None


@dataclass
class EvalReport:
    settings: dict[str, Any]
    reference: str  # what the reference is
    unpruned_source: str  # a key of SOURCES
    levels: list[LevelRow]
    examples: int
    reference_accuracy: float | None
    metric: str | None  # "vqa_accuracy", "exact_match", "vqa_accuracy+exact_match"; None without answers
    metric_rows: dict[str, int]  # rows scored by each metric
    reference_dtype: str  # the reference's weights and compute, e.g. "float32"
    export_dtype: str  # the export's graphs
    bad_rows: list[dict[str, str]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def unpruned(self) -> LevelRow:
        return self.levels[0]

    @property
    def plotted(self) -> str:
        """What eval.png plots: "accuracy", or "agreement" (with the reference) when the data gives no
        answers or the accuracy is 0 everywhere (a model with random weights)."""
        accurate = bool(self.reference_accuracy) or any(r.accuracy for r in self.levels)
        return "accuracy" if accurate else "agreement"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "plotted": self.plotted}

    def describe_metric(self) -> str:
        """What the accuracy column is, in one line."""
        if self.metric is None:
            return "none (the data gives no answers)"
        parts = []
        if self.metric_rows.get(VQA_ACCURACY):
            parts.append(f"VQA accuracy on {self.metric_rows[VQA_ACCURACY]} rows with several answers")
        if self.metric_rows.get(EXACT_MATCH):
            parts.append(f"exact match on {self.metric_rows[EXACT_MATCH]} rows with one")
        return ", ".join(parts) + " (answers normalised as the VQA evaluation does)"

    def format(self) -> str:
        s = self.settings
        lines = [
            f"eval: {self.examples} examples of {s['data']}, export {s['from']} ({s['runtime']}), "
            f"max {s['max_new_tokens']} new tokens, batch {s['batch_size']}",
            f"reference: {self.reference}, {self.reference_dtype} (the export's graphs: {self.export_dtype})",
            f"unpruned row: {SOURCES[self.unpruned_source].format(runtime=s['runtime'])}",
            "",
            f"{'level':<22}{'kept':>6}{'answers =':>11}{'1st token =':>13}{'KL(ref||lv)':>13}"
            f"{COLUMN[self.metric]:>13}{'prefill ms':>12}{'decode ms/tok':>15}",
        ]
        for r in self.levels:
            lines.append(
                f"{r.label:<22}{r.keep2:>6}{_pct(r.agreement):>11}{_pct(r.first_token_agreement):>13}"
                f"{_num(r.kl_mean, '.2e'):>13}{_pct(r.accuracy):>13}{_num(r.prefill_ms, '.1f'):>12}"
                f"{_num(r.decode_ms_per_token, '.2f'):>15}"
            )
        lines.append(f"reference {COLUMN[self.metric]}: {_pct(self.reference_accuracy).strip()}")
        lines.append(f"{COLUMN[self.metric]}: {self.describe_metric()}")
        if self.bad_rows:
            listed = "; ".join(f"{b['where']}: {b['error']}" for b in self.bad_rows)
            lines.append(f"skipped {len(self.bad_rows)} bad rows (--skip-bad): {listed}")
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _level(
    label: str, keep1: int, keep2: int, sides: list[dict[str, Any]], answers: list[list[str] | None]
) -> LevelRow:
    """``answers``: the data's answers of each side's row (None where the row has none)."""
    kls = [s["kl"] for s in sides if s["kl"] is not None]
    scores = [accuracy(s["answer"], a) for s, a in zip(sides, answers, strict=True) if a]
    return LevelRow(
        label=label,
        keep1=keep1,
        keep2=keep2,
        examples=len(sides),
        agreement=rate([s["agree"] for s in sides]),
        first_token_agreement=rate([s["first_token_agree"] for s in sides]),
        kl_mean=sum(kls) / len(kls) if kls else None,
        accuracy=mean(scores),
        prefill_ms=median(s["prefill_ms"] for s in sides),
        decode_ms_per_token=median(s["decode_ms_per_token"] for s in sides),
    )


def summarize(
    rows: list[dict[str, Any]],
    settings: dict[str, Any],
    levels: dict[int, int],
    source: str,
    reference: str,
    bad: list[dict[str, str]],
    reference_dtype: str = "float32",
    export_dtype: str = "float32",
) -> EvalReport:
    """The report of ``rows`` (run.py's per-example rows); ``levels``: keep2 -> keep1 of the levels
    compared; ``source``: what the unpruned row compares (a key of SOURCES). Accuracy is scored here
    from each side's answer and the row's answers (``metrics.accuracy``)."""
    n = settings["n_visual"]
    if source == "transformers":  # no exported unpruned latency: the reference's (PyTorch) stands in
        timing = ("prefill_ms", "decode_ms_per_token")
        unpruned = [{**r["unpruned"], **{k: r["reference"][k] for k in timing}} for r in rows]
    else:
        unpruned = [r["unpruned"] for r in rows if "unpruned" in r]
    answers = [r["answers"] for r in rows]
    with_unpruned = [r["answers"] for r in rows if "unpruned" in r or source == "transformers"]
    table = [_level(f"unpruned (keep {n})", n, n, unpruned, with_unpruned)]
    for keep2 in sorted((k for k in levels if k != n), reverse=True):
        sides = [r["levels"][str(keep2)] for r in rows]
        table.append(_level(f"keep {keep2}", levels[keep2], keep2, sides, answers))
    with_answers = [r for r in rows if r["answers"]]
    counts = {m: sum(metric_of(r["answers"]) == m for r in with_answers) for m in (VQA_ACCURACY, EXACT_MATCH)}
    used = [m for m, c in counts.items() if c]
    return EvalReport(
        settings=settings,
        reference=reference,
        unpruned_source=source,
        levels=table,
        examples=len(rows),
        reference_accuracy=mean([accuracy(r["reference"]["answer"], r["answers"]) for r in with_answers]),
        metric=None if not used else used[0] if len(used) == 1 else MIXED,
        metric_rows=counts,
        reference_dtype=reference_dtype,
        export_dtype=export_dtype,
        bad_rows=bad,
    )


def write_json(report: EvalReport, path: Path) -> Path:
    atomic_write(path, json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def plot(report: EvalReport, path: Path) -> Path:
    """Accuracy vs median prefill latency, one point per level, the unpruned one included; answer
    agreement with the reference instead when the data has no answers or the accuracy is 0 everywhere
    (a model with random weights: accuracy would show nothing)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    use_accuracy = report.plotted == "accuracy"
    what = COLUMN[report.metric] if use_accuracy else "agreement with the reference"
    points = [
        (r, r.prefill_ms, r.accuracy if use_accuracy else r.agreement)
        for r in report.levels
        if r.prefill_ms is not None and (r.accuracy if use_accuracy else r.agreement) is not None
    ]
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    ax.plot([p[1] for p in points], [100 * p[2] for p in points], marker="o", linestyle="-", color="tab:blue")
    right = max((p[1] for p in points), default=0.0)
    for r, x, y in points:  # the rightmost label to the left of its point, so that it stays inside
        left = x == right and len(points) > 1
        ax.annotate(
            r.label,
            (x, 100 * y),
            textcoords="offset points",
            xytext=(-5 if left else 5, 5),
            ha="right" if left else "left",
            fontsize=8,
        )
    ax.set_xlabel(f"median prefill latency, ms ({report.settings['runtime']})")
    ax.set_ylabel(f"{what}, % ({report.examples} examples)")
    ax.set_ylim(-5, 105)
    ax.margins(x=0.2)  # room for the labels
    ax.set_title(f"STAR keep levels: {'accuracy' if use_accuracy else 'answer agreement'} vs prefill latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # never a truncated eval.png
            fig.savefig(tmp, dpi=80, format="png")
    finally:
        plt.close(fig)
    return path
