"""When do two STAR selections agree? Exact ties, near-ties and reduced precision, as numbers.

Equal scores are bit-equal in every backend the project runs (``star.column_means``), and ties go
to the lower index. Beyond that, rounding may legitimately reorder tokens whose scores lie within
rounding of the cut: fp16/bf16 arithmetic, or another backend's kernels. So:

* **selection agreement with a margin**: two selections A (checked) and B (reference) of k tokens
  agree when every token in one and not the other has a reference score within ``margin`` of the
  cut (the reference's k-th largest score), margins relative to the cut. Reported: the overlap
  |A & B| / k, the largest relative gap of a disagreeing token, and the margin used.
* **the margin** is ``MARGIN_EPS`` machine epsilons of the lower-precision side (fp32: 8 ulps, so
  fp32 keeps the exact-index rule except for scores within rounding of the cut); where a
  half-precision side is involved, ``precision_noise`` widens it to what the dtype's rounding,
  emulated on the fp32 path, moves the scores near the cut by (never by what the half-precision
  code itself measures: a bug there would widen its own margin).
* where the selections differ, numerical parity is checked with the selection FORCED to the same
  indices (``StarPrefill.run(force1=..., force2=...)``): a flip at a near-tie then shows as such,
  and a numerical bug still fails the forced comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
MARGIN_EPS = 8  # margins: at least 8 epsilons of the dtype, relative to the cut
LOGITS_EPS = 32  # forced-selection tolerance of half-precision logits: 32 epsilons, relative to max|logit|
PRECISION = {"float32": 0, "float16": 1, "bfloat16": 2}


def lower(a: str, b: str) -> str:
    """The lower precision of two dtype names ("float16" of float16 vs float32)."""
    return a if PRECISION[a] >= PRECISION[b] else b


def logits_tolerance(dtype: str, fp32_tolerance: float) -> float:
    """Relative logits tolerance of a comparison whose lower-precision side is ``dtype``."""
    return fp32_tolerance if dtype == "float32" else LOGITS_EPS * EPS[dtype]


@dataclass
class Agreement:
    """Two selections of k tokens per row, compared with a margin."""

    overlap: float  # min over rows of |A & B| / k
    max_gap: float  # largest |score - cut| / |cut| of a token in one selection and not the other
    margin: float  # relative to the cut
    identical: bool

    @property
    def agree(self) -> bool:
        return self.identical or self.max_gap <= self.margin


def cuts(scores: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest score of every row over its candidates (NaN = not a candidate).  (B, n) -> (B,)"""
    out = np.empty(scores.shape[0])
    for b, row in enumerate(scores):
        values = np.sort(row[~np.isnan(row)])[::-1]
        out[b] = values[k - 1]
    return out


def margin_for(dtype: str) -> float:
    """The relative margin floor of a comparison whose lower-precision side is ``dtype``."""
    return MARGIN_EPS * EPS[dtype]


def compare(got: np.ndarray, ref: np.ndarray, ref_scores: np.ndarray, margin: float) -> Agreement:
    """Selections ``got`` / ``ref`` (B, k) of token indices; ``ref_scores`` (B, n) by index, NaN where a
    token was not a candidate. Every token in one selection and not the other is scored by the
    reference and measured against the reference's cut."""
    got, ref = np.asarray(got), np.asarray(ref)
    k = ref.shape[1]
    cut = cuts(ref_scores, k)
    overlap, gap = 1.0, 0.0
    for b in range(ref.shape[0]):
        a, r = set(got[b].tolist()), set(ref[b].tolist())
        overlap = min(overlap, len(a & r) / k)
        for j in a ^ r:
            s = ref_scores[b, j]
            g = np.inf if np.isnan(s) else abs(float(s) - cut[b]) / max(abs(cut[b]), 1e-30)
            gap = max(gap, g)
    identical = bool(np.array_equal(np.sort(got, axis=1), np.sort(ref, axis=1)))
    return Agreement(overlap=overlap, max_gap=gap, margin=margin, identical=identical)
