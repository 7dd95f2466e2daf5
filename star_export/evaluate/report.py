"""The summary of an ``eval`` run, rebuilt from its per-example rows: one table, eval.json, eval.png.

Per level: answer agreement with the reference, first-token agreement, mean KL(reference || level) of
the first token's distribution, accuracy against the reference answers (where the data gives them),
median prefill latency and decode latency per token, visual tokens kept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from star_export.evaluate.metrics import correct, median, rate

SOURCES = {
    "export": "the export's own keep = N level ({runtime}) vs the reference",
    "transformers": "transformers' unmodified model (generate, greedy) vs the reference (the export holds "
    "no keep = N level; its latency is the reference's, PyTorch)",
    "none": "not checked: no keep = N level in the export and no transformers comparison for this family",
}


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
    accuracy: float | None  # against the reference answers; None when the data has none
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
    bad_rows: list[dict[str, str]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def unpruned(self) -> LevelRow:
        return self.levels[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        s = self.settings
        lines = [
            f"eval: {self.examples} examples of {s['data']}, export {s['from']} ({s['runtime']}), "
            f"max {s['max_new_tokens']} new tokens, batch {s['batch_size']}",
            f"reference: {self.reference}",
            f"unpruned row: {SOURCES[self.unpruned_source].format(runtime=s['runtime'])}",
            "",
            f"{'level':<22}{'kept':>6}{'answers =':>11}{'1st token =':>13}{'KL(ref||lv)':>13}"
            f"{'accuracy':>10}{'prefill ms':>12}{'decode ms/tok':>15}",
        ]
        for r in self.levels:
            lines.append(
                f"{r.label:<22}{r.keep2:>6}{_pct(r.agreement):>11}{_pct(r.first_token_agreement):>13}"
                f"{_num(r.kl_mean, '.2e'):>13}{_pct(r.accuracy):>10}{_num(r.prefill_ms, '.1f'):>12}"
                f"{_num(r.decode_ms_per_token, '.2f'):>15}"
            )
        lines.append(f"reference accuracy: {_pct(self.reference_accuracy).strip()}")
        if self.bad_rows:
            listed = "; ".join(f"{b['where']}: {b['error']}" for b in self.bad_rows)
            lines.append(f"skipped {len(self.bad_rows)} bad rows (--skip-bad): {listed}")
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _level(label: str, keep1: int, keep2: int, sides: list[dict[str, Any]]) -> LevelRow:
    kls = [s["kl"] for s in sides if s["kl"] is not None]
    answered = [s["correct"] for s in sides if s["correct"] is not None]
    return LevelRow(
        label=label,
        keep1=keep1,
        keep2=keep2,
        examples=len(sides),
        agreement=rate([s["agree"] for s in sides]),
        first_token_agreement=rate([s["first_token_agree"] for s in sides]),
        kl_mean=sum(kls) / len(kls) if kls else None,
        accuracy=rate(answered),
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
) -> EvalReport:
    """The report of ``rows`` (run.py's per-example rows); ``levels``: keep2 -> keep1 of the levels
    compared; ``source``: what the unpruned row compares (a key of SOURCES)."""
    n = settings["n_visual"]
    if source == "transformers":  # no exported unpruned latency: the reference's (PyTorch) stands in
        timing = ("prefill_ms", "decode_ms_per_token")
        unpruned = [{**r["unpruned"], **{k: r["reference"][k] for k in timing}} for r in rows]
    else:
        unpruned = [r["unpruned"] for r in rows if "unpruned" in r]
    table = [_level(f"unpruned (keep {n})", n, n, unpruned)]
    for keep2 in sorted((k for k in levels if k != n), reverse=True):
        table.append(_level(f"keep {keep2}", levels[keep2], keep2, [r["levels"][str(keep2)] for r in rows]))
    with_answers = [r for r in rows if r["answers"] is not None]
    return EvalReport(
        settings=settings,
        reference=reference,
        unpruned_source=source,
        levels=table,
        examples=len(rows),
        reference_accuracy=rate([correct(r["reference"]["answer"], r["answers"]) for r in with_answers]),
        bad_rows=bad,
    )


def write_json(report: EvalReport, path: Path) -> Path:
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def plot(report: EvalReport, path: Path) -> Path:
    """Accuracy (agreement with the reference when the data has no answers) vs median prefill latency,
    one point per level, the unpruned one included."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    use_accuracy = report.reference_accuracy is not None
    what = "accuracy" if use_accuracy else "agreement"
    points = [
        (r, r.prefill_ms, r.accuracy if use_accuracy else r.agreement)
        for r in report.levels
        if r.prefill_ms is not None and (r.accuracy if use_accuracy else r.agreement) is not None
    ]
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    ax.plot([p[1] for p in points], [100 * p[2] for p in points], marker="o", linestyle="-", color="tab:blue")
    for r, x, y in points:
        ax.annotate(r.label, (x, 100 * y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"median prefill latency, ms ({report.settings['runtime']})")
    ax.set_ylabel(f"{what}, % ({report.examples} examples)")
    ax.set_ylim(-5, 105)
    ax.margins(x=0.2)  # room for the labels
    ax.set_title(f"STAR keep levels: {what} vs prefill latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
