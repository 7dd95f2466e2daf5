"""The demo training loop: exact match as greedy decoding sees it, resume, and a checkpoint that loads
through the same code as any --model DIR."""

from __future__ import annotations

import json

import pytest
import torch

from star_export.demo.train import TrainConfig, rows_exact, train
from star_export.load import load


def _exact(logits, labels):
    """``rows_exact`` on the labelled positions, laid out as ``answer_logits`` gives them."""
    where = labels[:, 1:] != -100
    return rows_exact(logits[:, :-1][where], labels[:, 1:][where], where.nonzero()[:, 0], len(labels))


def test_exact_match_counts_whole_answers_only():
    labels = torch.tensor([[-100, -100, 5, 2], [-100, -100, 7, 2]])
    logits = torch.full((2, 4, 10), -1.0)
    for b, row in enumerate(labels):  # position t predicts label t + 1
        for t in range(3):
            if row[t + 1] >= 0:
                logits[b, t, row[t + 1]] = 1.0
    assert _exact(logits, labels).tolist() == [1.0, 1.0]
    logits[1, 2, 2], logits[1, 2, 3] = -1.0, 1.0  # the end token missed: the answer runs on
    assert _exact(logits, labels).tolist() == [1.0, 0.0]


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

    cfg = TrainConfig(
        steps=4,
        batch=4,
        eval_every=3,
        eval_count=6,
        test_count=6,
        warmup=1,
        captions=0.5,
        symbolic_steps=1,
        vision_steps=1,
        symbolic_tokens=40,
        turns=3,
    )
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


def test_patch_code_names_shape_colour_centre_and_place():
    """The symbolic code the first phase reads and the second asks of the projector: one-hot shape
    and colour where an object is, the centre flag on one patch per object, and the patch's place."""
    import numpy as np

    from star_export.demo import scenes
    from star_export.demo.train import CODE_GAIN, patch_code

    s = scenes.sample(0, "train", 3)
    labels = scenes.patch_labels(s.scene, 168, 14)
    code = patch_code(labels, 12, 128)
    n_shapes = len(scenes.SHAPES)
    assert code.shape == (144, 128) and not code[:, 40:].any()
    assert (code[labels == 0, 0] == CODE_GAIN).all() and not code[labels == 0, 1:10].any()
    for shape in s.scene.shapes:
        row, col = int(shape.y * 168) // 14, int(shape.x * 168) // 14
        c = code[row * 12 + col]
        assert c[1 + scenes.SHAPES.index(shape.kind)] == CODE_GAIN
        assert c[1 + n_shapes + list(scenes.COLOURS).index(shape.colour)] == CODE_GAIN
        assert c[1 + n_shapes + len(scenes.COLOURS)] == CODE_GAIN  # the centre flag
    assert (code[:, 1 + n_shapes + len(scenes.COLOURS)] > 0).sum() == len(s.scene.shapes)
    waves = code[:, 11:13].reshape(12, 12, 2)  # sin, cos of the column: equal down a column
    assert np.allclose(waves[0], waves[5]) and not np.allclose(waves[:, 0], waves[:, 5])
    placeless = patch_code(labels, 12, 128, place=False)  # the M-RoPE demo: ids carry the place
    assert np.array_equal(placeless[:, :11], code[:, :11]) and not placeless[:, 11:].any()


def test_sparse_rows_keep_every_object_patch_at_its_position_id():
    """The symbolic phase's short rows: every object patch, background drawn at random, original
    position ids (what STAR's kept tokens get)."""
    import numpy as np

    from star_export.demo import scenes
    from star_export.demo.train import Batcher
    from star_export.load import load, materialise
    from star_export.recipes import load_recipe

    recipe = load_recipe("llava-demo")
    loaded = load(materialise(recipe), source="recipe", options=recipe.layout)
    batcher = Batcher(loaded, 168, 14)
    batch = list(scenes.samples(0, "train", 3))
    full = batcher(batch, symbolic=True)
    short = batcher(batch, symbolic=True, tokens=40, rng=np.random.default_rng(0))
    image = loaded.geometry.image_token_id
    assert (full["input_ids"] == image).sum(1).tolist() == [144] * 3
    assert (short["input_ids"] == image).sum(1).tolist() == [40] * 3
    assert short["code"].shape == (3, 40, 128)
    for b in range(3):
        ids, pos = short["input_ids"][b], short["position_ids"][b]
        first = int((ids == image).nonzero()[0])
        kept = (pos[ids == image] - first).numpy()
        assert (np.diff(kept) > 0).all() and kept.max() < 144
        objects = np.flatnonzero(short["patch_labels"][b].numpy() > 0)
        assert set(objects) <= set(kept)
        assert torch.equal(short["code"][b], full["code"][b][kept])
        n = int(short["attention_mask"][b].sum())  # the text after the image keeps its own ids
        assert pos[n - 1] == n - 1 + 144 - 40


def test_the_phases_move_what_they_train(tmp_path):
    """The symbolic phase trains the decoder and leaves the vision tower and projector as they were;
    the vision phase trains those and leaves the decoder (the forward stops at the projector)."""
    from safetensors.torch import load_file

    from star_export.demo.train import phase
    from star_export.load import materialise
    from star_export.recipes import load_recipe

    start = load_file(materialise(load_recipe("llava-demo")) / "model.safetensors")
    base = dict(batch=4, eval_count=6, test_count=6, warmup=1, symbolic_tokens=40, turns=2)
    cfg = TrainConfig(steps=2, eval_every=2, symbolic_steps=2, **base)
    assert [phase(cfg, s)[0] for s in range(2)] == ["symbolic", "symbolic"]
    train(tmp_path / "a", cfg, log=lambda _: None, progress=False)
    a = load_file(tmp_path / "a" / "model.safetensors")
    vision = [k for k in a if "vision_tower" in k or "multi_modal_projector" in k]
    decoder = [k for k in a if "language_model" in k or "lm_head" in k]
    assert vision and decoder
    assert all(torch.equal(a[k], start[k]) for k in vision)
    assert not all(torch.equal(a[k], start[k]) for k in decoder)
    cfg = TrainConfig(steps=2, eval_every=2, symbolic_steps=0, vision_steps=2, **base)
    assert [phase(cfg, s)[0] for s in range(3)] == ["vision", "vision", "joint"]
    train(tmp_path / "b", cfg, log=lambda _: None, progress=False)
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(b[k], start[k]) for k in decoder)
    assert not all(torch.equal(b[k], start[k]) for k in vision)


def test_sincos_table_encodes_row_and_column():
    """MAE's 2-D table: the first quarter of the channels are sines of the row, the third quarter sines
    of the column, every patch's row distinct; a width not divisible by 4 is refused."""
    import numpy as np

    from star_export.demo.train import sincos_table

    t = sincos_table(12, 96)
    assert t.shape == (144, 96) and t.dtype == np.float32
    row, col = np.divmod(np.arange(144), 12)
    np.testing.assert_allclose(t[:, 0], np.sin(row), atol=1e-6)  # frequency 1, the row
    np.testing.assert_allclose(t[:, 24], np.cos(row), atol=1e-6)
    np.testing.assert_allclose(t[:, 48], np.sin(col), atol=1e-6)  # frequency 1, the column
    assert len({r.tobytes() for r in t}) == 144
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_table(12, 98)


def test_position_init_sincos_starts_the_patch_positions_from_the_table(tmp_path):
    """``position_init = "sincos"`` writes the table into the patch rows of the vision tower's position
    embedding (the class token's row untouched); the symbolic phase leaves it there, so the saved
    checkpoint holds it exactly. "default" keeps the recipe's random start; anything else is refused."""
    from safetensors.torch import load_file

    from star_export.demo.train import sincos_table
    from star_export.load import materialise
    from star_export.recipes import load_recipe

    def table_of(path):
        weights = load_file(path / "model.safetensors")
        return next(
            v for k, v in weights.items() if k.endswith("vision_tower.embeddings.position_embedding.weight")
        )

    start = table_of(materialise(load_recipe("llava-demo")))
    base = dict(steps=1, batch=2, eval_every=1, eval_count=6, test_count=6, warmup=1, symbolic_steps=1)
    train(tmp_path / "s", TrainConfig(position_init="sincos", **base), log=lambda _: None, progress=False)
    table = table_of(tmp_path / "s")
    assert torch.equal(table[1:], torch.from_numpy(sincos_table(12, 96)))
    assert torch.equal(table[0], start[0])
    train(tmp_path / "d", TrainConfig(**base), log=lambda _: None, progress=False)
    assert torch.equal(table_of(tmp_path / "d"), start)
    with pytest.raises(ValueError, match="position_init"):
        train(
            tmp_path / "x", TrainConfig(position_init="learned", **base), log=lambda _: None, progress=False
        )
