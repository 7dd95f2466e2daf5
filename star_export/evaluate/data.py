"""The user's questions: LLaVA's evaluation JSONL, a plain JSONL or a CSV, read into ``Example``s.

Formats (chosen by the file's suffix: ``.csv`` is a table, anything else one JSON object a line):

* LLaVA's question files: ``{"question_id": 7, "image": "x.jpg", "text": "What ...?"}``, with an
  optional reference answer in ``answer`` (one string), ``answers`` (a list; VQA's
  ``[{"answer": ...}]`` too) or ``gt_answer`` (a string or a list);
* a plain JSONL: ``image``, ``question`` and the same optional answer fields (``id`` optional);
* a CSV with a header: ``image``, ``question`` (or ``text``), optionally ``answer`` (one) or
  ``answers`` (alternatives separated by ``|``) and ``id``.

Image paths are taken as given when absolute, else relative to ``image_root`` (LLaVA's
``--image-folder``) or, without one, to the data file's directory. A row's id is its
``question_id`` / ``id``, or its line number. A bad row is a ``BadRow`` naming ``file:line``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from star_export.errors import UsageError

QUESTION_FIELDS = ("text", "question")  # LLaVA's, then the plain format's
ANSWER_FIELDS = ("answer", "answers", "gt_answer")


@dataclass(frozen=True)
class Example:
    """One question about one image; ``answers`` None where the data gives no reference answer."""

    id: str
    where: str  # "file:line"
    image: Path
    question: str
    answers: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "where": self.where,
            "image": str(self.image),
            "question": self.question,
            "answers": list(self.answers) if self.answers is not None else None,
        }


@dataclass(frozen=True)
class BadRow:
    where: str  # "file:line"
    error: str

    def __str__(self) -> str:
        return f"{self.where}: {self.error}"

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "error": self.error}


class _Bad(Exception):
    """A row's problem, raised inside the readers and turned into a ``BadRow``."""


def _answers(value: Any, field: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, list) and value:
        out = []
        for item in value:
            if isinstance(item, dict) and "answer" in item:  # VQA's [{"answer": ..., "answer_id": ...}]
                item = item["answer"]
            if not isinstance(item, (str, int, float)) or isinstance(item, bool):
                raise _Bad(f'"{field}" holds {type(item).__name__}, expected strings')
            out.append(str(item))
        return tuple(out)
    raise _Bad(f'"{field}" must be a string or a non-empty list of strings')


def _text(row: dict[str, Any], names: tuple[str, ...], what: str) -> str:
    for name in names:
        value = row.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise _Bad(f'"{name}" is {type(value).__name__}, expected a string')
        return value
    raise _Bad(f"no {what} field" if len(names) > 1 else f'no "{names[0]}" field')


def _example(row: dict[str, Any], where: str, line: int, base: Path) -> Example:
    image = row.get("image")
    if image is None or image == "":
        raise _Bad('no "image" field')
    if not isinstance(image, str):
        raise _Bad(f'"image" is {type(image).__name__}, expected one file name')
    question = _text(row, QUESTION_FIELDS, 'question ("text" or "question")')
    answers = None
    for field in ANSWER_FIELDS:
        if row.get(field) not in (None, ""):
            answers = _answers(row[field], field)
            break
    rid = row.get("question_id", row.get("id"))
    if isinstance(rid, (dict, list)):
        raise _Bad("question_id must be a string or a number")
    path = Path(image).expanduser()
    return Example(
        id=str(line) if rid in (None, "") else str(rid),
        where=where,
        image=path if path.is_absolute() else base / path,
        question=question,
        answers=answers,
    )


def _jsonl_rows(text: str, name: str) -> list[tuple[int, Any]]:
    if text.lstrip().startswith("["):
        raise UsageError(f"--data {name}: a JSON array; write one JSON object a line (JSONL)")
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((line, json.loads(raw)))
        except json.JSONDecodeError as e:
            rows.append((line, _Bad(f"not valid JSON ({e.msg}, column {e.colno})")))
    return rows


def _csv_rows(text: str, name: str) -> list[tuple[int, Any]]:
    reader = csv.DictReader(text.splitlines())
    fields = reader.fieldnames or []
    if "image" not in fields or not any(q in fields for q in QUESTION_FIELDS):
        raise UsageError(f"--data {name}: the CSV header needs image and question columns, got {fields}")
    rows = []
    for row in reader:
        line = reader.line_num
        if None in row:  # more cells than header columns
            rows.append((line, _Bad(f"{len(fields) + len(row[None])} cells, the header has {len(fields)}")))
            continue
        cells = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        if cells.get("answers"):
            cells["answers"] = [a.strip() for a in cells["answers"].split("|")]
        rows.append((line, cells))
    return rows


def read_examples(
    data: str | Path, image_root: str | Path | None = None
) -> tuple[list[Example], list[BadRow]]:
    """The examples of ``data`` in file order and its bad rows (structure only: images are checked
    by ``check_images``). A missing, unreadable or empty file is a one-line ``UsageError``."""
    path = Path(data)
    name = str(data)
    if not path.is_file():
        raise UsageError(
            f"--data {name}: no such file" if not path.exists() else f"--data {name}: not a file"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise UsageError(f"--data {name}: cannot be read ({reason})") from None
    if image_root is not None and not Path(image_root).is_dir():
        raise UsageError(f"--image-root {image_root}: no such directory")
    base = Path(image_root) if image_root is not None else path.parent
    rows = _csv_rows(text, name) if path.suffix.lower() == ".csv" else _jsonl_rows(text, name)
    examples: list[Example] = []
    bad: list[BadRow] = []
    seen: dict[str, str] = {}
    for line, row in rows:
        where = f"{name}:{line}"
        try:
            if isinstance(row, _Bad):
                raise row
            if not isinstance(row, dict):
                raise _Bad(f"not a JSON object ({type(row).__name__})")
            example = _example(row, where, line, base)
            if example.id in seen:
                raise _Bad(f"id {example.id} repeats {seen[example.id]}")
        except _Bad as e:
            bad.append(BadRow(where, str(e)))
            continue
        seen[example.id] = where
        examples.append(example)
    if not rows:
        raise UsageError(f"--data {name}: no rows")
    return examples, bad


def check_images(examples: list[Example]) -> tuple[list[Example], list[BadRow]]:
    """The examples whose image opens (decoded in full: a truncated file fails here, not mid-run)."""
    from star_export import encoding

    good, bad = [], []
    for example in examples:
        try:
            encoding.open_image(example.image)
        except encoding.InputError as e:
            bad.append(BadRow(example.where, str(e)))
            continue
        good.append(example)
    return good, bad
