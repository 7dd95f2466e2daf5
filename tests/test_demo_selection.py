"""A test that fails on a wrong selection: the shipped demo model answers a fixed 100-question slice of
the test split, unpruned and with STAR at keep 64, above thresholds set from the measured values with a
margin; keeping the LOWEST scores instead ("inverted": what a flipped sign or the wrong attention axis
would do) must fall below them. Parity cannot catch that bug: an export that reproduces a wrong
selection exactly passes it."""

from __future__ import annotations

import pytest

from star_export.demo import default_model, scenes
from star_export.evaluate.metrics import agree
from star_export.session import load_model

SLICE = 100
SIZE = 168  # the demo model's image side (recipes/llava-demo.toml), as it was trained
# measured on this slice (PyTorch rewrite, greedy; README "A model that sees"), thresholds below them
UNPRUNED_MIN = 0.85  # measured: see MEASURED
STAR64_MIN = 0.80
MEASURED: dict[str, float] = {}  # filled by the lead's measurement; documents the margin


@pytest.fixture(scope="module")
def questions():
    return list(scenes.samples(0, "test", SLICE))


def _accuracy(selection: str, keep: int, questions) -> float:
    pipe = load_model(default_model(), keep=keep, layer=2, selection=selection)
    hits = 0
    for start in range(0, len(questions), 25):
        chunk = questions[start : start + 25]
        images = [scenes.render(q.scene, SIZE) for q in chunk]
        answers = pipe.generate(images, [q.question for q in chunk], max_new_tokens=8)
        hits += sum(agree(a, q.answer) for a, q in zip(answers.answers, chunk, strict=True))
    return hits / len(questions)


def test_the_trained_model_sees_and_star_keeps_what_matters(questions):
    unpruned = _accuracy("star", scenes_n(), questions)
    star64 = _accuracy("star", 64, questions)
    assert unpruned >= UNPRUNED_MIN, unpruned
    assert star64 >= STAR64_MIN, star64


def test_an_inverted_selection_fails_the_same_thresholds(questions):
    inverted = _accuracy("inverted", 64, questions)
    assert inverted < STAR64_MIN, inverted


def scenes_n() -> int:
    from star_export.bench.methods import n_visual

    return n_visual(default_model())
