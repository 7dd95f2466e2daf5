"""The demo training on a Qwen-VL (issue #21: "one Qwen-VL family"): the recipe ``qwen2-vl-demo``
(Qwen2-VL, M-RoPE) trains through the same loop as the LLaVA demo. What is Qwen-specific and checked
here: the rows' 3-D position ids (the unmodified model's own, also in the short symbolic rows), the
merger's flat patch rows read as the dense target's (B, N, .) raster, and transformers' generate on
the family's ``hf_inputs`` (what ``eval`` compares an export's unpruned answers with)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from star_export.demo import scenes
from star_export.demo.train import Batcher, TrainConfig, model_inputs, train
from star_export.load import load, materialise
from star_export.recipes import load_recipe

RECIPE = "qwen2-vl-demo"


@pytest.fixture(scope="module")
def loaded():
    recipe = load_recipe(RECIPE)
    return load(materialise(recipe), source="recipe", options=recipe.layout)


@pytest.fixture(scope="module")
def batcher(loaded):
    return Batcher(loaded, 168, 14)


def test_rows_carry_the_unmodified_models_positions(loaded, batcher):
    """Pixel rows (right padded, two questions a row) with the Batcher's explicit M-RoPE ids give the
    logits transformers computes from the same ids with its own ``get_rope_index``; the ids put the
    image on the 12 x 12 grid (h = row, w = column). Deliberately wrong ids (1-D positions over the
    image, as a text-only model would number it) change the logits."""
    model = loaded.model.eval()
    geo = loaded.geometry
    batch = [list(scenes.samples(0, "train", 2)), [scenes.sample(0, "train", 5)]]
    inputs = batcher(batch)
    pos = inputs["position_ids"]
    assert pos.shape == (3, 2, inputs["input_ids"].shape[1])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = ids == geo.image_token_id
    assert image.sum(1).tolist() == [144, 144]
    first = int(image[0].nonzero()[0])
    rows, cols = np.divmod(np.arange(144), 12)
    assert (pos[1, 0, image[0]] - first).tolist() == rows.tolist()
    assert (pos[2, 0, image[0]] - first).tolist() == cols.tolist()
    with torch.no_grad():
        ours = model.model(**model_inputs(inputs)).last_hidden_state
        feed = {k: v for k, v in model_inputs(inputs).items() if k != "position_ids"}
        model.model.rope_deltas = None
        hf = model.model(**feed, mm_token_type_ids=image.long()).last_hidden_state
        flat = pos[0][None].expand(3, -1, -1)
        wrong = model.model(**{**model_inputs(inputs), "position_ids": flat}).last_hidden_state
    real = mask.bool()
    assert torch.allclose(ours[real], hf[real], atol=1e-5)
    assert not torch.allclose(ours[real], wrong[real], atol=1e-3)


def test_symbolic_short_rows_keep_each_tokens_3d_position(batcher):
    """The symbolic phase's short rows: the kept image tokens keep their (t, h, w) ids of the full
    row, and the text after the image keeps its own (the full row's) ids."""
    batch = list(scenes.samples(0, "train", 3))
    full = batcher(batch, symbolic=True)
    short = batcher(batch, symbolic=True, tokens=40, rng=np.random.default_rng(0))
    image = batcher.geo.image_token_id
    for b in range(3):
        ids, pos, whole = short["input_ids"][b], short["position_ids"][:, b], full["position_ids"][:, b]
        first = int((ids == image).nonzero()[0])
        kept = (pos[1, ids == image] - first) * 12 + (pos[2, ids == image] - first)  # h * cols + w
        assert len(kept) == 40 and (kept.diff() > 0).all()
        assert torch.equal(pos[:, ids == image], whole[:, first + kept])
        n = int(short["attention_mask"][b].sum())
        m = int(full["attention_mask"][b].sum())
        assert torch.equal(pos[:, n - 1], whole[:, m - 1])  # the last answer token's ids


def test_training_phases_and_the_checkpoint(tmp_path):
    """Three steps (symbolic, vision, joint) train and save a Qwen2-VL that loads through the same
    code as any --model DIR; the symbolic step leaves the tower alone, the vision step the decoder;
    a sine-cosine start is refused (Qwen's tower has rotary positions, no table)."""
    from safetensors.torch import load_file

    start = load_file(materialise(load_recipe(RECIPE)) / "model.safetensors")
    base = dict(recipe=RECIPE, batch=2, eval_count=6, test_count=6, warmup=1, symbolic_tokens=40, turns=2)
    cfg = TrainConfig(steps=1, eval_every=1, symbolic_steps=1, **base)
    train(tmp_path / "s", cfg, log=lambda _: None, progress=False)
    s = load_file(tmp_path / "s" / "model.safetensors")
    vision = [k for k in s if k.startswith("visual.")]  # Qwen2-VL's checkpoint layout
    decoder = [k for k in s if k.startswith(("model.", "lm_head."))]
    assert vision and decoder
    assert all(torch.equal(s[k], start[k]) for k in vision)
    assert not all(torch.equal(s[k], start[k]) for k in decoder)
    cfg = TrainConfig(steps=2, eval_every=2, vision_steps=1, **base)
    card = train(tmp_path / "v", cfg, log=lambda _: None, progress=False)
    assert set(card["test_exact_match"]) >= {"all", "position"}
    loaded = load(tmp_path / "v", options={"image_size": 168})  # --image-size 168, as trained
    assert loaded.geometry.n_visual == 144 and loaded.geometry.position_axes == 3
    assert "Qwen2VLForConditionalGeneration" in (tmp_path / "v" / "README.md").read_text()
    with pytest.raises(ValueError, match="no learned position table"):
        train(tmp_path / "x", TrainConfig(position_init="sincos", steps=1, **base), progress=False)


def test_the_checkpoint_brings_its_resolution(tmp_path):
    """A Qwen-VL checkpoint whose processor admits at most 168 x 168 pixels (the demo's) loads at
    168 px (N = 144) without --image-size; 336 is refused for it; a processor with a wider range
    keeps the family's default 336 x 336."""
    import json
    import shutil

    from star_export.bench.methods import n_visual
    from star_export.errors import UsageError
    from star_export.families import family_named

    src = materialise(load_recipe(RECIPE))
    assert load(src).geometry.image_hw == (168, 168)
    assert n_visual(src) == 144  # the path `compare` and the export read the config by
    family = family_named("qwen2_vl")
    geo336 = load(src, options={"image_size": 336}).geometry
    with pytest.raises(UsageError, match="outside the checkpoint's image processor range"):
        family.check_layout(src, geo336)
    wide = tmp_path / "wide"
    shutil.copytree(src, wide)
    pre = json.loads((wide / "preprocessor_config.json").read_text())
    pre["size"]["longest_edge"] = 336 * 336
    (wide / "preprocessor_config.json").write_text(json.dumps(pre))
    assert load(wide).geometry.image_hw == (336, 336)


@pytest.mark.parametrize("recipe", ["qwen2-vl-tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def test_transformers_generate_on_hf_inputs_equals_the_unpruned_rewrite(recipe, tmp_path):
    """``eval``'s unmodified-model reference for the Qwen-VL families (an export without a keep = N
    level): transformers' ``generate`` on ``hf_inputs`` gives the tokens and first-step logits of the
    PyTorch rewrite at keep = N, row by row; another image changes them."""
    from PIL import Image

    from star_export.evaluate.run import hf_generate
    from star_export.session import load_model

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(paths[-1])
    r = load_recipe(recipe)
    n = load(materialise(r), source="recipe", options=r.layout).geometry.n_visual
    pipe = load_model(recipe=recipe, keep=n, keep1=n)
    prompts = ["What is it?", "Describe the picture."]
    hf = hf_generate(pipe, paths, prompts, max_new_tokens=4)
    ours = pipe.generate(paths, prompts, max_new_tokens=4, keep_logits=True)
    for b in range(2):
        assert hf[b][0] == ours.result.tokens[b]
        np.testing.assert_allclose(hf[b][1], ours.result.step_logits[0][b], atol=1e-4, rtol=1e-4)
    swapped = hf_generate(pipe, paths[::-1], prompts, max_new_tokens=4)
    assert not np.allclose(swapped[0][1], hf[0][1], atol=1e-4)


def test_qwen3_demo_starts_its_position_grid_from_sines(tmp_path):
    """qwen3-vl-demo (Qwen3-VL, merge 1, a 12 x 12 learned position grid, no DeepStack): a sine-cosine
    start writes the grid (the symbolic step leaves the tower alone, so the checkpoint holds it
    exactly); the checkpoint loads at 168 px with N = 144 and no flag, and transformers' generate on it
    equals the unpruned rewrite."""
    from safetensors.torch import load_file

    from star_export.demo.train import sincos_table
    from star_export.evaluate.run import hf_generate
    from star_export.session import load_model

    base = dict(recipe="qwen3-vl-demo", steps=1, batch=2, eval_every=1, eval_count=6, test_count=6)
    cfg = TrainConfig(warmup=1, symbolic_steps=1, symbolic_tokens=40, position_init="sincos", **base)
    train(tmp_path / "q3", cfg, log=lambda _: None, progress=False)
    table = load_file(tmp_path / "q3" / "model.safetensors")["model.visual.pos_embed.weight"]
    assert torch.equal(table, torch.from_numpy(sincos_table(12, 96)))
    assert load(tmp_path / "q3").geometry.n_visual == 144
    samples = list(scenes.samples(0, "test", 2))
    paths = []
    for i, s in enumerate(samples):
        paths.append(tmp_path / f"{i}.png")
        scenes.render(s.scene, 168).save(paths[-1])
    pipe = load_model(tmp_path / "q3", keep=144, keep1=144)
    prompts = [s.question for s in samples]
    hf = hf_generate(pipe, paths, prompts, max_new_tokens=3)
    assert [h[0] for h in hf] == pipe.generate(paths, prompts, max_new_tokens=3).result.tokens
