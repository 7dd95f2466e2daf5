"""What an answer costs: VQA-style normalisation, answer agreement, the first token's KL, accuracy.

``normalize`` follows the VQA evaluation's answer processing, simplified: lower case; apostrophes
dropped (``don't`` -> ``dont``); every other punctuation mark becomes a space, except a ``.`` or ``,``
between digits (``3.5``, ``1,000`` -> ``1000``); number words ``zero`` .. ``twenty`` become digits;
the articles ``a``, ``an``, ``the`` go; runs of spaces collapse.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")  # 1,000 -> 1000
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")  # any punctuation but a decimal point


def normalize(text: str) -> str:
    """An answer's comparable form (see the module docstring)."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    text = _PUNCT.sub(" ", _DIGIT_COMMA.sub("", text))
    words = [NUMBERS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def agree(a: str, b: str) -> bool:
    """Two answers say the same after normalisation."""
    return normalize(a) == normalize(b)


def correct(prediction: str, answers: Iterable[str]) -> bool:
    """The prediction equals one of the reference answers after normalisation."""
    got = normalize(prediction)
    return any(got == normalize(a) for a in answers)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(other)) per row, in nats (float64; 0 for equal logits)."""
    lp, lq = log_softmax(reference), log_softmax(other)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def rate(flags: Sequence[bool]) -> float | None:
    """The fraction of True, None for no flags."""
    return sum(map(bool, flags)) / len(flags) if flags else None


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None
