"""Writes the example evaluation set: 12 small PNGs of coloured shapes (Pillow, no downloads) and
the same questions in the two formats ``python -m star_export eval --data`` reads:

* ``questions.jsonl``: LLaVA's evaluation question format (``question_id``, ``image``, ``text``)
  with the reference answers in ``answer`` (one: exact match) or ``answers`` (one per annotator, as
  VQAv2 gives ten: VQA accuracy);
* ``questions.csv``: a plain table of ``image,question,answers`` (several separated by ``|``).

Run from anywhere: ``python examples/eval/make_examples.py``; the files land next to this script.
The drawing is deterministic, so re-running rewrites the same bytes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 96
HINT = "Answer the question using a single word or phrase."  # LLaVA's short-answer instruction
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
    "orange": (240, 140, 30),
}

# (file, background, [(shape, colour, box)], question, answers)
EXAMPLES = [
    ("red_circle.png", "white", [("circle", "red", (24, 24, 72, 72))], "What colour is the circle?", ["red"]),
    (
        "blue_square.png",
        "white",
        [("square", "blue", (20, 20, 76, 76))],
        "What shape is in the image?",
        ["square"],
    ),
    (
        "two_green_circles.png",
        "black",
        [("circle", "green", (8, 30, 44, 66)), ("circle", "green", (52, 30, 88, 66))],
        "How many circles are there?",
        ["2"] * 7 + ["two"] * 3,  # ten annotators, one answer after normalisation
    ),
    (
        "yellow_triangle.png",
        "grey",
        [("triangle", "yellow", (16, 16, 80, 80))],
        "What shape is in the image?",
        ["triangle"],
    ),
    (
        "black_bg_square.png",
        "black",
        [("square", "white", (30, 30, 66, 66))],
        "What colour is the background?",
        ["black"],
    ),
    (
        "orange_circle.png",
        "blue",
        [("circle", "orange", (20, 20, 76, 76))],
        "What colour is the circle?",
        ["orange"],
    ),
    (
        "three_squares.png",
        "white",
        [
            ("square", "red", (6, 36, 28, 58)),
            ("square", "red", (37, 36, 59, 58)),
            ("square", "red", (68, 36, 90, 58)),
        ],
        "How many squares are there?",
        ["3"],
    ),
    (
        "green_triangle.png",
        "white",
        [("triangle", "green", (16, 20, 80, 84))],
        "Is there a triangle in the image?",
        ["yes"],
    ),
    (
        "red_square.png",
        "yellow",
        [("square", "red", (24, 24, 72, 72))],
        "Is there a circle in the image?",
        ["no"],
    ),
    (
        "blue_circle.png",
        "grey",
        [("circle", "blue", (18, 18, 78, 78))],
        "What colour is the shape?",
        ["blue"] * 7 + ["dark blue"] * 3,  # ten annotators: "blue" scores 1.0, "dark blue" 0.9
    ),
    (
        "circle_and_square.png",
        "white",
        [("circle", "red", (6, 30, 42, 66)), ("square", "blue", (54, 30, 90, 66))],
        "What colour is the square?",
        ["blue"],
    ),
    (
        "white_triangle.png",
        "black",
        [("triangle", "white", (16, 16, 80, 80))],
        "What colour is the triangle?",
        ["white"],
    ),
]


def draw(background: str, shapes: list[tuple[str, str, tuple[int, int, int, int]]]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), COLOURS[background])
    pen = ImageDraw.Draw(image)
    for shape, colour, (x0, y0, x1, y1) in shapes:
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle, apex up
            pen.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


HERE = Path(__file__).resolve().parent


def main(here: Path = HERE) -> None:
    (here / "images").mkdir(exist_ok=True)
    rows = []
    for qid, (name, background, shapes, question, answers) in enumerate(EXAMPLES, start=1):
        draw(background, shapes).save(here / "images" / name, optimize=True)
        row = {"question_id": qid, "image": f"images/{name}", "text": f"{question}\n{HINT}"}
        row.update({"answer": answers[0]} if len(answers) == 1 else {"answers": answers})
        rows.append(row)
    with (here / "questions.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with (here / "questions.csv").open("w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["image", "question", "answers"])
        for name, _, _, question, answers in EXAMPLES:
            out.writerow([f"images/{name}", f"{question} {HINT}", "|".join(answers)])
    print(f"wrote {len(rows)} images and questions to {here}")


if __name__ == "__main__":
    main()
