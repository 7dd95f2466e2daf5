"""Tests for star_export.preprocess: the tiny tokenizer and the prompt/image encoder (fast, offline)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from star_export.errors import UsageError
from star_export.families.llava import FAMILY as LLAVA
from star_export.preprocess import Preprocessor
from star_export.recipes import load_recipe
from star_export.tiny import CHAT_TEMPLATE

IMAGE_ID = 1000
FILES = {
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _build(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    LLAVA.write_tiny_processor(directory, load_recipe("llava-tiny"))
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pre(tiny_dir) -> Preprocessor:
    return Preprocessor.from_dir(tiny_dir)


def _clip_by_hand(img: Image.Image, size: int, mean, std) -> np.ndarray:
    """Shortest edge -> size (bicubic), center crop size x size, /255, (x - mean) / std, CHW."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    resized = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0
    out = (crop - np.asarray(mean)) / np.asarray(std)
    return out.transpose(2, 0, 1)


def _noise_png(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(path)
    return path


def test_files_and_auto_processor(tiny_dir):
    from transformers import AutoProcessor, LlavaProcessor

    assert {p.name for p in tiny_dir.iterdir()} == FILES
    proc = AutoProcessor.from_pretrained(tiny_dir, local_files_only=True, backend="pil")
    assert isinstance(proc, LlavaProcessor)
    assert proc.tokenizer.is_fast
    assert type(proc.image_processor).__name__ == "CLIPImageProcessorPil"
    assert proc.patch_size == 14 and proc.vision_feature_select_strategy == "default"
    assert proc.image_token == "<image>" and proc.image_token_id == IMAGE_ID
    ip, pre_cfg = proc.image_processor, json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert ip.size["shortest_edge"] == 336 and (ip.crop_size["height"], ip.crop_size["width"]) == (336, 336)
    assert list(ip.image_mean) == pre_cfg["image_mean"] and list(ip.image_std) == pre_cfg["image_std"]
    assert int(ip.resample) == int(Image.Resampling.BICUBIC)


def test_special_ids_and_image_token(pre):
    tok = pre.tokenizer
    assert (pre.pad_token_id, pre.bos_token_id, pre.eos_token_id, pre.image_token_id) == (0, 1, 2, IMAGE_ID)
    assert tok.convert_ids_to_tokens([0, 1, 2, IMAGE_ID]) == ["<pad>", "<s>", "</s>", "<image>"]
    assert tok.encode("<image>", add_special_tokens=False) == [IMAGE_ID]
    assert len(tok) == IMAGE_ID + 1
    ids = tok("a red ball and a blue box")["input_ids"]
    assert ids[0] == 1 and all(2 < t < 1000 for t in ids[1:])


@pytest.mark.parametrize(
    "text",
    ["a red ball on the table.", "What colour is the zebra?  Two spaces, digits 42!", "Ünïcode: café 日本"],
)
def test_round_trip(pre, text):
    ids = pre.tokenizer(text)["input_ids"]
    assert pre.decode(ids) == text
    assert pre.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_deterministic(tiny_dir, tmp_path):
    again = _build(tmp_path / "again")
    for name in sorted(FILES):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    # Another process (the Rust side seeds its hash maps per process) trains the same tokenizer.
    code = (
        "import hashlib; from star_export.tiny import _train_bpe; "
        "print(hashlib.sha256(_train_bpe(1000, 1000).to_str().encode()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from star_export.tiny import _train_bpe

    assert other.stdout.strip() == hashlib.sha256(_train_bpe(1000, 1000).to_str().encode()).hexdigest()


def test_chat_template(pre, tiny_dir):
    assert (tiny_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert pre.prompt_text("What is in the picture?") == "USER: <image>\nWhat is in the picture? ASSISTANT:"


def test_encode_batch(pre, tmp_path):
    a = _noise_png(tmp_path / "a.png", 500, 300, seed=1)
    b = _noise_png(tmp_path / "b.png", 200, 400, seed=2)
    prompts = ["Describe the image.", "How many red apples are in the basket on the wooden table?"]
    out = pre.encode([a, str(b)], prompts)
    assert set(out) == {"pixel_values", "input_ids", "attention_mask"}
    pv, ids, mask = out["pixel_values"], out["input_ids"], out["attention_mask"]
    assert pv.dtype == np.float32 and pv.shape == (2, 3, 336, 336)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape and ids.shape[0] == 2

    singles = [pre.encode_prompts([p])[0][0] for p in prompts]
    assert len(singles[0]) < len(singles[1]) == ids.shape[1]
    for row, single in enumerate(singles):
        n_pad = ids.shape[1] - len(single)
        assert mask[row].tolist() == [0] * n_pad + [1] * len(single)  # left padding
        assert (ids[row, :n_pad] == pre.pad_token_id).all()
        assert ids[row, n_pad:].tolist() == single.tolist()
        real = ids[row, n_pad:]
        assert real[0] == pre.bos_token_id
        assert (real == IMAGE_ID).sum() == 1  # one placeholder, not 576
        assert np.flatnonzero(real == IMAGE_ID)[0] < len(real) - 1
        assert pre.decode(real) == pre.prompt_text(prompts[row]).replace("<image>", "")

    ip = pre.image_processor
    for row, path in enumerate((a, b)):
        with Image.open(path) as im:
            expected = _clip_by_hand(im.convert("RGB"), 336, ip.image_mean, ip.image_std)
        np.testing.assert_allclose(pv[row], expected, rtol=0, atol=1e-5)


def test_solid_colour_normalisation(pre):
    colour = (10, 200, 128)
    pv = pre.pixel_values([Image.new("RGB", (50, 70), colour)])
    mean, std = np.asarray(pre.image_processor.image_mean), np.asarray(pre.image_processor.image_std)
    expected = (np.asarray(colour) / 255.0 - mean) / std
    for c in range(3):
        np.testing.assert_allclose(pv[0, c], expected[c], rtol=0, atol=1e-6)
    # Transparency is composited on white, as transformers' convert_to_rgb does.
    clear = pre.pixel_values([Image.new("RGBA", (40, 40), (0, 0, 0, 0))])
    np.testing.assert_allclose(clear, pre.pixel_values([Image.new("RGB", (40, 40), "white")]), atol=0)


def test_errors(pre, tmp_path):
    good = _noise_png(tmp_path / "good.png", 32, 32, seed=3)
    with pytest.raises(UsageError, match="no such file"):
        pre.encode([tmp_path / "missing.png"], ["hi"])
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture\n")
    with pytest.raises(UsageError, match="not an image"):
        pre.encode([fake], ["hi"])
    with pytest.raises(UsageError, match="not a file"):
        pre.encode([tmp_path], ["hi"])
    with pytest.raises(UsageError, match="image placeholder"):
        pre.encode([good], ["look at <image> please"])
    with pytest.raises(UsageError, match="one image per prompt"):
        pre.encode([good, good], ["hi"])
    with pytest.raises(UsageError, match="non-empty"):
        pre.encode([], [])


def test_from_dir_missing_files(tmp_path):
    with pytest.raises(UsageError, match="no such directory"):
        Preprocessor.from_dir(tmp_path / "nope")
    LLAVA.write_tiny_processor(tmp_path, load_recipe("llava-tiny"))
    (tmp_path / "tokenizer.json").unlink()  # image processor present, tokenizer missing
    with pytest.raises(UsageError, match=r"missing tokenizer \(tokenizer.json\)") as err:
        Preprocessor.from_dir(tmp_path)
    assert "\n" not in str(err.value)
