"""The synthetic question set: deterministic, answers that follow from the scene, small objects,
every question kind, and a test split that ``eval`` reads."""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest

from star_export.demo import scenes
from star_export.evaluate.data import read_examples


def test_same_seed_same_bytes_other_split_other_scenes():
    a = [scenes.render(scenes.sample(0, "test", i).scene, 84).tobytes() for i in range(6)]
    b = [scenes.render(scenes.sample(0, "test", i).scene, 84).tobytes() for i in range(6)]
    c = [scenes.render(scenes.sample(0, "train", i).scene, 84).tobytes() for i in range(6)]
    assert a == b
    assert not set(map(hashlib.sha256, a)) & set(map(hashlib.sha256, c))
    assert all(x != y for x, y in zip(a, c, strict=True))


def _expected(s: scenes.Sample) -> str:
    """The answer recomputed from the question's words and the scene (independent of _ask)."""
    words = s.question.rstrip("?").split()
    shapes = s.scene.shapes
    if s.kind == "colour":
        (hit,) = [o for o in shapes if o.kind == words[-1]]
        return hit.colour
    if s.kind == "shape":
        (hit,) = [o for o in shapes if o.colour == words[-2]]
        return hit.kind
    if s.kind == "count":
        return str(sum(o.kind + "s" == words[-3] for o in shapes))
    if s.kind == "position":
        (hit,) = [o for o in shapes if (o.colour, o.kind) == (words[2], words[3])]
        if "left" in words:
            return "left" if hit.x < 0.5 else "right"
        return "top" if hit.y < 0.5 else "bottom"
    if s.kind == "presence":
        return "yes" if any((o.colour, o.kind) == (words[-2], words[-1]) for o in shapes) else "no"
    (ref,) = [o for o in shapes if o.kind == words[-1]]
    return sorted((o for o in shapes if o.x < ref.x), key=lambda o: o.x)[-1].colour


def test_answers_follow_from_the_scene_and_every_kind_is_asked():
    drawn = [scenes.sample(3, "train", i) for i in range(300)]
    assert all(s.answer == _expected(s) for s in drawn)
    kinds = collections.Counter(s.kind for s in drawn)
    assert set(kinds) == set(scenes.KINDS) and min(kinds.values()) == 50
    presence = collections.Counter(s.answer for s in drawn if s.kind == "presence")
    assert 15 <= presence["yes"] <= 35  # both answers, neither dominant


def test_a_wrong_answer_is_caught_by_the_recomputation():
    s = scenes.sample(3, "train", 0)  # a colour question
    wrong = scenes.Sample(s.scene, s.kind, s.question, "not-" + s.answer)
    assert _expected(wrong) != wrong.answer


def test_objects_cover_a_small_part_of_the_image():
    cover = [scenes.coverage(scenes.sample(0, "val", i).scene, 168) for i in range(40)]
    assert max(cover) < 0.15 and float(np.mean(cover)) < 0.08
    assert min(cover) > 0.005


def test_test_split_is_read_by_eval(tmp_path):
    path = scenes.write_split(tmp_path, seed=0, split="test", count=7, size=56)
    examples, bad = read_examples(path)
    assert bad == []
    assert len(examples) == 7
    assert all(e.image.is_file() and e.answers and len(e.answers) == 1 for e in examples)
    assert examples[0].answers[0] == scenes.sample(0, "test", 0).answer
    assert examples[0].question == scenes.sample(0, "test", 0).question


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        scenes.sample(0, "dev", 0)
