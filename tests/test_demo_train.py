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
