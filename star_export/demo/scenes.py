"""A synthetic visual question set in the Sort-of-CLEVR spirit, drawn with Pillow (no downloads).

A scene is 2-4 small shapes (circle / square / triangle; six colours; two sizes) at random,
non-overlapping places on a plain or textured light background. The objects cover a small part of
the image (a few percent of its area), so most visual tokens carry nothing an answer needs: the
setting in which token pruning either keeps the right tokens or loses the answer.

Every question has a one-word answer, computed from the scene's own description (``Scene``):

======== ============================================== =====================================
kind     question                                       answers
======== ============================================== =====================================
colour   What colour is the {shape}?                    the colour (the shape is unique)
shape    What shape is the {colour} object?             the shape (the colour is unique)
count    How many {shape}s are there?                   "0" .. "5"
position Is the {colour} {shape} on the left or right?  "left" / "right" (also top / bottom)
presence Is there a {colour} {shape}?                   "yes" / "no"
relation What colour is the shape left of the {shape}?  the colour of the nearest object whose
                                                        centre is left of it (unique shape)
======== ============================================== =====================================

Prompts are the bare question: the model is trained to answer in one word, so LLaVA's
"Answer the question using a single word or phrase." would only lengthen every sequence.

Splits are separate random streams of one seed (``SPLITS``): the same (seed, split, index) always
draws the same scene and question, so a split can be regenerated anywhere, byte for byte.
``write_split`` writes a split as PNGs and a ``questions.jsonl`` in LLaVA's evaluation format,
which ``python -m star_export eval --data`` reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 65, 215),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.065, "large": 0.095}  # radius as a fraction of the image side
KINDS = ("colour", "shape", "count", "position", "presence", "relation")
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_OBJECTS = 4


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    x: float  # centre, as a fraction of the width (0 left .. 1 right)
    y: float  # centre, as a fraction of the height (0 top .. 1 bottom)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    texture: str  # "plain" | "stripes" | "checker" | "noise"
    texture_seed: int


@dataclass(frozen=True)
class Sample:
    scene: Scene
    kind: str  # one of KINDS
    question: str
    answer: str


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return np.random.default_rng([seed, SPLITS[split], index])


def random_scene(rng: np.random.Generator, most: int = MAX_OBJECTS) -> Scene:
    """2..``most`` shapes at non-overlapping places, on a light background."""
    n = int(rng.integers(2, most + 1))
    shapes: list[Shape] = []
    while len(shapes) < n:
        size = str(rng.choice(list(SIZES)))
        r = SIZES[size]
        x, y = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
        if any(math.hypot(x - s.x, y - s.y) < r + SIZES[s.size] + 0.04 for s in shapes):
            continue  # overlapping or touching: draw again
        if any(abs(x - s.x) < 0.03 for s in shapes):
            continue  # "left of" stays unambiguous
        shapes.append(Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), size, x, y))
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    texture = str(rng.choice(["plain", "stripes", "checker", "noise"]))
    return Scene(tuple(shapes), background, texture, int(rng.integers(0, 2**31)))


def _unique(scene: Scene, attr: str) -> list[str]:
    values = [getattr(s, attr) for s in scene.shapes]
    return [v for v in dict.fromkeys(values) if values.count(v) == 1]


def _ask(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One question of ``kind`` about ``scene`` and its answer, or None where the scene has none."""
    shapes = scene.shapes
    if kind == "colour":
        unique = _unique(scene, "kind")
        if not unique:
            return None
        shape = str(rng.choice(unique))
        return f"What colour is the {shape}?", next(s.colour for s in shapes if s.kind == shape)
    if kind == "shape":
        unique = _unique(scene, "colour")
        if not unique:
            return None
        colour = str(rng.choice(unique))
        return f"What shape is the {colour} object?", next(s.kind for s in shapes if s.colour == colour)
    if kind == "count":
        shape = str(rng.choice(SHAPES))
        return f"How many {shape}s are there?", str(sum(s.kind == shape for s in shapes))
    if kind == "position":
        pairs = [(s.colour, s.kind) for s in shapes]
        unique = [p for p in pairs if pairs.count(p) == 1]
        if not unique:
            return None
        colour, shape = unique[int(rng.integers(len(unique)))]
        s = next(s for s in shapes if (s.colour, s.kind) == (colour, shape))
        if rng.random() < 0.5:
            return f"Is the {colour} {shape} on the left or the right?", "left" if s.x < 0.5 else "right"
        return f"Is the {colour} {shape} at the top or the bottom?", "top" if s.y < 0.5 else "bottom"
    if kind == "presence":
        present = {(s.colour, s.kind) for s in shapes}
        if rng.random() < 0.5:
            colour, shape = sorted(present)[int(rng.integers(len(present)))]
        else:
            absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
            colour, shape = absent[int(rng.integers(len(absent)))]
        return f"Is there a {colour} {shape}?", "yes" if (colour, shape) in present else "no"
    if kind == "relation":
        options = []
        for shape in _unique(scene, "kind"):
            ref = next(s for s in shapes if s.kind == shape)
            left = [s for s in shapes if s.x < ref.x]
            if left:
                options.append((shape, max(left, key=lambda s: s.x).colour))
        if not options:
            return None
        shape, colour = options[int(rng.integers(len(options)))]
        return f"What colour is the shape left of the {shape}?", colour
    raise ValueError(f"unknown question kind {kind!r}")


def sample(seed: int, split: str, index: int, most: int = MAX_OBJECTS) -> Sample:
    """The ``index``-th sample of ``split``: question kinds in turn, a fresh scene until one fits."""
    rng = _rng(seed, split, index)
    kind = KINDS[index % len(KINDS)]
    while True:
        scene = random_scene(rng, most)
        asked = _ask(scene, kind, rng)
        if asked is not None:
            return Sample(scene, kind, *asked)


def conversation(seed: int, split: str, index: int, turns: int, most: int = MAX_OBJECTS) -> list[Sample]:
    """The ``index``-th sample of ``split`` and up to ``turns - 1`` more questions about the same
    scene, of the next kinds in turn (a kind the scene has no question of is skipped). Training
    asks them one after another in one sequence: the image's tokens, most of a step's cost, then
    serve several answers."""
    first = sample(seed, split, index, most)
    rng = np.random.default_rng([seed, 20 + SPLITS[split], index])
    more = []
    for k in range(1, len(KINDS)):
        if len(more) + 1 >= turns:
            break
        kind = KINDS[(index + k) % len(KINDS)]
        asked = _ask(first.scene, kind, rng)
        if asked is not None:
            more.append(Sample(first.scene, kind, *asked))
    return [first, *more]


CAPTION_PROMPT = "Describe the scene."


def caption(scene: Scene) -> str:
    """Every shape, top to bottom: "red square top left, blue circle bottom right" (the half of the
    image its centre lies in). A training task beside the questions: each word of it needs the
    decoder to read one object's tokens, a dense signal for learning where objects are."""
    ordered = sorted(scene.shapes, key=lambda s: (s.y, s.x))
    return ", ".join(
        f"{s.colour} {s.kind} {'top' if s.y < 0.5 else 'bottom'} {'left' if s.x < 0.5 else 'right'}"
        for s in ordered
    )


def caption_sample(seed: int, split: str, index: int, most: int = MAX_OBJECTS) -> Sample:
    """The ``index``-th captioning sample of ``split`` (a random stream of its own)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    scene = random_scene(np.random.default_rng([seed, 10 + SPLITS[split], index]), most)
    return Sample(scene, "caption", CAPTION_PROMPT, caption(scene))


def samples(seed: int, split: str, count: int, start: int = 0, most: int = MAX_OBJECTS) -> Iterator[Sample]:
    """``count`` samples from ``start``; ``most``: at most that many shapes a scene (a curriculum)."""
    for i in range(start, start + count):
        yield sample(seed, split, i, most)


def _texture(draw: ImageDraw.ImageDraw, scene: Scene, size: int) -> None:
    rng = np.random.default_rng(scene.texture_seed)
    shade = tuple(max(0, c - 22) for c in scene.background)
    if scene.texture == "stripes":
        step = int(rng.integers(size // 24, size // 10))
        for x in range(0, 2 * size, 2 * step):
            draw.polygon([(x, 0), (x + step, 0), (x + step - size, size), (x - size, size)], fill=shade)
    elif scene.texture == "checker":
        step = int(rng.integers(size // 16, size // 6))
        for i in range(0, size, step):
            for j in range(0, size, step):
                if (i // step + j // step) % 2:
                    draw.rectangle([i, j, i + step - 1, j + step - 1], fill=shade)
    elif scene.texture == "noise":
        for _ in range(size):
            x, y = (int(v) for v in rng.integers(0, size, size=2))
            r = int(rng.integers(1, max(2, size // 60)))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=shade)


def render(scene: Scene, size: int = 336) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels."""
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    _texture(draw, scene, size)
    for s in scene.shapes:
        _draw_shape(draw, s, size, COLOURS[s.colour])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, size: int, fill: tuple[int, int, int] | int) -> None:
    cx, cy, r = s.x * size, s.y * size, SIZES[s.size] * size
    if s.kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.kind == "square":
        h = r * 0.886  # the square of the circle's area
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon(
            [(cx, cy - r * 1.15), (cx - r * 1.15, cy + r * 0.85), (cx + r * 1.15, cy + r * 0.85)],
            fill=fill,
        )


PATCH_KINDS = len(COLOURS) * len(SHAPES)
N_CLASSES = 1 + 2 * PATCH_KINDS  # patch classes: background, covered by (colour, shape), its centre


def patch_labels(scene: Scene, size: int, patch: int, least: float = 0.25) -> np.ndarray:
    """(size // patch)^2 class ids in raster order, the demo training's dense target for the vision
    tower (what each patch shows; never a model input): 0 where no shape covers at least ``least``
    of the patch; else 1 + c for the shape covering most of it, c = colour * len(SHAPES) + shape;
    the patch holding a shape's centre is 1 + PATCH_KINDS + c (one patch per object: what a count
    needs)."""
    index = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(index)
    for i, s in enumerate(scene.shapes, start=1):
        _draw_shape(draw, s, size, i)
    grid = size // patch
    ids = np.asarray(index)[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch)
    ids = ids.transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    counts = np.stack([(ids == i).sum(1) for i in range(len(scene.shapes) + 1)], axis=1)
    counts[:, 0] = 0
    best = counts.argmax(1)
    covered = counts.max(1) >= least * patch * patch
    colours, kinds = list(COLOURS), list(SHAPES)
    kind = [colours.index(s.colour) * len(SHAPES) + kinds.index(s.kind) for s in scene.shapes]
    labels = np.where(covered, 1 + np.array([0, *kind])[best], 0)
    for s, c in zip(scene.shapes, kind, strict=True):
        row, col = min(grid - 1, int(s.y * size) // patch), min(grid - 1, int(s.x * size) // patch)
        labels[row * grid + col] = 1 + PATCH_KINDS + c
    return labels


def coverage(scene: Scene, size: int = 336) -> float:
    """The fraction of the image's pixels that the shapes cover."""
    blank = Scene((), scene.background, "plain", 0)
    a = np.asarray(render(Scene(scene.shapes, scene.background, "plain", 0), size))
    b = np.asarray(render(blank, size))
    return float((a != b).any(axis=-1).mean())


def write_split(out: str | Path, seed: int, split: str, count: int, size: int = 336) -> Path:
    """``count`` samples of ``split`` as ``out/images/*.png`` and ``out/questions.jsonl`` (LLaVA's
    evaluation format, one answer each). Returns the JSONL's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(samples(seed, split, count)):
        name = f"images/{split}_{i:05d}.png"
        render(s.scene, size).save(out / name)
        rows.append({"question_id": i, "image": name, "text": s.question, "answer": s.answer, "kind": s.kind})
    path = out / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
