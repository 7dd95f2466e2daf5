"""The parity report: rows of numbers, each with the rule that judged it, serialised to JSON.

Rules: ``tol`` max|a - b| / max|b| <= tolerance (b the reference side); ``exact`` equal arrays;
``exact`` / ``margin`` for a selection (``selection.compare``: identical, or every disagreement
within the margin of the cut); ``forced`` a numerical comparison made with the selection forced
to the checked side's indices (after the selections differed within the margin); ``skipped`` a
check that cannot run here, with the reason in ``detail``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from star_export.selection import Agreement


@dataclass
class ParityRow:
    check: str
    output: str
    max_abs: float
    max_rel: float  # max|diff| / max|reference|
    tolerance: float  # bound on max_rel (selection rows: the margin); 0 means exact equality
    passed: bool
    rule: str = "tol"
    overlap: float | None = None  # selection rows: min over rows of |A & B| / k
    gap: float | None = None  # selection rows: largest relative score gap of a disagreeing token
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rel_diff(got: Any, ref: Any) -> tuple[float, float]:
    """(max|got - ref|, that over max|ref|) in float64; inf where the shapes differ."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return float("inf"), float("inf")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref.astype(np.float64)).max()) if ref.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


@dataclass
class ParityReport:
    rows: list[ParityRow] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    graph_check: dict[str, Any] | None = None
    comparator: dict[str, Any] | None = None  # polygraphy's compare_accuracy verdict
    trt: list[dict[str, Any]] | None = None  # TensorRT engine rows (engines.parity)
    unchecked: str | None = None  # what a PASS did not cover here (a bf16 graph on CPU): in the verdict

    @property
    def passed(self) -> bool:
        graph_ok = self.graph_check is None or self.graph_check.get("ok", False)
        comparator_ok = self.comparator is None or self.comparator.get("passed", False)
        trt_ok = self.trt is None or all(r.get("passed", False) for r in self.trt)
        return graph_ok and comparator_ok and trt_ok and all(r.passed for r in self.rows)

    def add(self, check: str, output: str, got: Any, ref: Any, tolerance: float, rule: str = "") -> ParityRow:
        """A numerical (``tol``) or, with tolerance 0, an ``exact`` row."""
        max_abs, max_rel = rel_diff(got, ref)
        passed = max_abs == 0.0 if tolerance == 0 else max_rel <= tolerance
        row = ParityRow(
            check, output, max_abs, max_rel, tolerance, passed, rule or ("exact" if tolerance == 0 else "tol")
        )
        self.rows.append(row)
        return row

    def add_selection(self, check: str, output: str, agreement: Agreement) -> ParityRow:
        a = agreement
        row = ParityRow(
            check,
            output,
            max_abs=1.0 - a.overlap,
            max_rel=a.max_gap,
            tolerance=a.margin,
            passed=a.agree,
            rule="exact" if a.identical else "margin",
            overlap=a.overlap,
            gap=a.max_gap,
        )
        self.rows.append(row)
        return row

    def skip(self, check: str, output: str, why: str) -> ParityRow:
        row = ParityRow(check, output, float("nan"), float("nan"), float("nan"), True, "skipped", detail=why)
        self.rows.append(row)
        return row

    @property
    def verdict(self) -> str:
        """PASS, FAIL, or PASS (what was not checked here)."""
        if not self.passed:
            return "FAIL"
        return f"PASS ({self.unchecked})" if self.unchecked else "PASS"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "verdict": self.verdict,
            "inputs": self.inputs,
            "rows": [r.to_dict() for r in self.rows],
            "graph_check": self.graph_check,
            "comparator": self.comparator,
            "tensorrt": self.trt,
        }

    def format(self) -> str:
        width = max([40, *(len(r.check) + 1 for r in self.rows)])
        head = f"{'check':<{width}} {'output':<22} {'max abs':>10} {'max rel':>10} {'tol':>8}  {'rule':<7} result"
        lines = [head]
        for r in self.rows:
            result = "ok" if r.passed else "FAIL"
            if r.rule == "skipped":
                lines.append(
                    f"{r.check:<{width}} {r.output:<22} {'':>10} {'':>10} {'':>8}  {r.rule:<7} {r.detail}"
                )
                continue
            if r.overlap is not None:  # a selection: overlap, largest gap of a disagreement, margin
                cols = f"{'ovl ' + format(r.overlap, '.3f'):>10} {'gap ' + format(r.gap, '.0e'):>10} {r.tolerance:>8.0e}"
            else:
                tol = "exact" if r.tolerance == 0 else f"{r.tolerance:.0e}"
                cols = f"{r.max_abs:>10.2e} {r.max_rel:>10.2e} {tol:>8}"
            lines.append(f"{r.check:<{width}} {r.output:<22} {cols}  {r.rule:<7} {result}")
        if self.comparator is not None:
            verdict = "ok" if self.comparator.get("passed") else "FAIL"
            lines.append(
                f"{'polygraphy compare_accuracy':<{width}} {'all outputs':<22} {'':>10} {'':>10} {'':>8}  {'':<7} {verdict}"
            )
        if self.graph_check is not None:
            verdict = "ok" if self.graph_check.get("ok") else "FAIL"
            lines.append(
                f"{'graph scan (TensorRT readiness)':<{width}} {'all graphs':<22} {'':>10} {'':>10} {'':>8}  {'':<7} {verdict}"
            )
        lines.append(f"overall: {self.verdict}")
        return "\n".join(lines)
