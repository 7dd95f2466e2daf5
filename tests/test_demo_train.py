"""The demo training loop: exact match as greedy decoding sees it, resume, and a checkpoint that loads
through the same code as any --model DIR."""

from __future__ import annotations

import json

import pytest
import torch

from star_export.demo.train import TrainConfig, exact_match, train
from star_export.load import load


def test_exact_match_counts_whole_answers_only():
    labels = torch.tensor([[-100, -100, 5, 2], [-100, -100, 7, 2]])
    logits = torch.full((2, 4, 10), -1.0)
    for b, row in enumerate(labels):  # position t predicts label t + 1
        for t in range(3):
            if row[t + 1] >= 0:
                logits[b, t, row[t + 1]] = 1.0
    assert exact_match(logits, labels).tolist() == [1.0, 1.0]
    logits[1, 2, 2], logits[1, 2, 3] = -1.0, 1.0  # the end token missed: the answer runs on
    assert exact_match(logits, labels).tolist() == [1.0, 0.0]


def test_train_resume_and_load(tmp_path):
    cfg = TrainConfig(steps=2, batch=4, eval_every=1, eval_count=6, test_count=6, warmup=1)
    said: list[str] = []
    card = train(tmp_path, cfg, log=said.append, progress=False)
    assert set(card["test_exact_match"]) >= {"all", "colour", "relation"}
    assert (tmp_path / ".train" / "state.pt").is_file() and (tmp_path / "training.png").is_file()
    assert json.loads((tmp_path / "training.json").read_text())["config"]["steps"] == 2
    train(tmp_path, cfg, log=said.append, progress=False)
    assert said == ["resuming at step 2 of 2"]
    with pytest.raises(ValueError, match="other settings"):
        train(tmp_path, TrainConfig(**{**cfg.__dict__, "lr": 0.5}), log=said.append, progress=False)
    loaded = load(tmp_path)
    assert loaded.geometry.n_visual == 144
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "preprocessor_config.json").is_file()


def test_training_is_reproducible_bit_for_bit(tmp_path):
    """Same settings, same seed: the same weights (what "retraining reproduces the accuracy" rests on),
    and a dense target and captions that really reach the model (another seed differs)."""
    from safetensors.torch import load_file

    cfg = TrainConfig(steps=2, batch=4, eval_every=2, eval_count=6, test_count=6, warmup=1, captions=0.5)
    weights = []
    for name, c in (("a", cfg), ("b", cfg), ("c", TrainConfig(**{**cfg.__dict__, "seed": 1}))):
        train(tmp_path / name, c, log=lambda _: None, progress=False)
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    card = (tmp_path / "a" / "README.md").read_text()
    assert "--captions 0.5" in card and "Test exact match" in card


def test_patch_labels_mark_each_object_once_at_its_centre():
    from star_export.demo import scenes

    for i in range(20):
        s = scenes.sample(0, "train", i)
        labels = scenes.patch_labels(s.scene, 168, 14)
        centres = labels[labels > scenes.PATCH_KINDS]
        assert len(centres) == len(s.scene.shapes)  # one centre patch per object
        assert (labels > 0).sum() >= len(s.scene.shapes)
        assert (labels == 0).mean() > 0.6  # most patches show nothing an answer needs
    caption = scenes.caption(s.scene)
    assert caption.count(",") == len(s.scene.shapes) - 1
