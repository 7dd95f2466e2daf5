"""The loop of ``eval``: every example through the unpruned reference and each keep level, one JSONL row
per example written as soon as its batch is done (an interrupted run keeps what it measured and
``resume`` carries on from it).

The reference is the PyTorch rewrite of the export's checkpoint at keep1 = keep2 = N
(``session.load_unpruned``). The "unpruned" comparison that can fail: the export's own keep = N level
through the chosen runtime when the export holds one, else transformers' unmodified model
(``model.generate``, greedy, with the checkpoint's ``generation_config`` set aside: no repetition
penalty, sampling or other logits processing the reference does not do) on the same pre-processed
inputs; both against the reference's answers.

rows.jsonl: a first line ``{"settings": {...}}``, then one object per example (``Example.to_dict()``
+ ``reference``, ``unpruned`` and ``levels`` {keep2: side}); a side holds the answer, its tokens,
``agree`` / ``first_token_agree`` / ``kl`` against the reference, ``accuracy`` against the row's
answers (``metrics.accuracy``: VQA accuracy for several, exact match for one; None without answers)
and the batch's ``prefill_ms`` / ``decode_ms_per_token``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from star_export.atomic import atomic_write, check_target
from star_export.errors import UsageError
from star_export.evaluate.data import BadRow, Example, check_images, read_examples
from star_export.evaluate.metrics import accuracy, agree, kl_divergence
from star_export.progress import Log, quiet

ROWS = "rows.jsonl"
CHECKED = ("from", "data", "image_root", "runtime", "keeps", "max_new_tokens", "batch_size")  # on resume


def load_examples(
    data: str | Path, image_root: str | Path | None, limit: int | None, skip_bad: bool
) -> tuple[list[Example], list[BadRow]]:
    """The first ``limit`` good examples; a bad row is a one-line UsageError unless ``skip_bad``."""
    examples, bad = read_examples(data, image_root)
    if bad and not skip_bad:
        raise UsageError(f"{bad[0]} (--skip-bad runs the other rows)")
    examples, unreadable = check_images(examples[:limit] if limit is not None else examples)
    if unreadable and not skip_bad:
        raise UsageError(f"{unreadable[0]} (--skip-bad runs the other rows)")
    bad = sorted(bad + unreadable, key=lambda b: int(b.where.rsplit(":", 1)[1]))
    if not examples:
        raise UsageError(f"--data {data}: no usable rows ({len(bad)} bad)")
    return examples, bad


def check_out(out: Path) -> None:
    """A one-line UsageError when ``out`` cannot become the run's directory (it, or the nearest part of
    its path that exists, is a file, or that directory is not writable); nothing is created here."""
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out}: is a file, not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: not writable")
        return
    check_target(out, "--out")  # the nearest existing parent: a writable directory


def check_batch(batch_size: int, dims: dict[str, Any] | None) -> None:
    """A one-line UsageError when ``batch_size`` exceeds the export's profile (``dims``: the decode
    graph's dynamic dims, None when unbounded)."""
    most = (dims or {}).get("batch", {}).get("max")
    if most is not None and batch_size > most:
        raise UsageError(
            f"--batch-size {batch_size} exceeds the export's profile (batch at most {most}): use "
            f"--batch-size {most} or less, or re-export with --batch-size {batch_size}"
        )


def read_rows(out: Path, settings: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """The rows of an earlier run in ``out`` (resume), checked for the same settings; [] for a new run.
    A previous run without ``resume``, or with other settings, is a one-line UsageError."""
    path = out / ROWS
    if not path.is_file():
        return []
    if not resume:
        raise UsageError(f"--out {out}: holds an earlier run ({ROWS}); --resume continues it")
    text = path.read_text()
    if text and not text.endswith("\n"):  # a run stopped mid-row (full disk, kill): drop the part row
        text = text[: text.rfind("\n") + 1]
        atomic_write(path, text)  # appending goes on after the last whole row
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    before = lines[0].get("settings", {}) if lines else {}
    for key in CHECKED:
        if before.get(key) != settings[key]:
            raise UsageError(
                f"--resume: {path} was run with {key} = {before.get(key)!r}, not {settings[key]!r}"
            )
    return lines[1:]


class Eta:
    """Progress over the examples: a tqdm bar with its ETA on a terminal, else (logs, CI) one line per
    batch, ``eval 3/12 examples, 4s, ETA 12s``."""

    def __init__(self, total: int, log: Log):
        self.total, self.log, self.done, self.start = total, log, 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="      eval", unit="example", file=sys.stderr, leave=False)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        spent = time.perf_counter() - self.start
        left = spent / self.done * (self.total - self.done)
        self.log(f"      eval {self.done}/{self.total} examples, {spent:.0f}s, ETA {left:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def batches(items: Sequence[Example], size: int) -> Iterator[list[Example]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def side(
    answer: str,
    tokens: list[int],
    first: np.ndarray | None,
    ref: dict[str, Any],
    ref_first: np.ndarray,
    example: Example,
    timing: tuple[float | None, float | None],
) -> dict[str, Any]:
    """One answer measured against the reference (``ref``: its answer and tokens; ``ref_first``: its
    first step's logits (V,)); ``timing``: the batch's prefill ms and decode ms per token."""
    return {
        "answer": answer,
        "tokens": tokens,
        "agree": agree(answer, ref["answer"]),
        "first_token_agree": bool(tokens[:1] == ref["tokens"][:1]),
        "kl": None if first is None else float(kl_divergence(ref_first, first)),
        "accuracy": accuracy(answer, example.answers) if example.answers else None,
        "prefill_ms": timing[0],
        "decode_ms_per_token": timing[1],
    }


def _timing(result: Any) -> tuple[float, float]:
    return result.prefill_s * 1e3, result.decode_s * 1e3 / max(result.decode_steps, 1)


def hf_generate(
    ref: Any, images: Sequence[Path], prompts: Sequence[str], max_new_tokens: int
) -> list[tuple[list[int], np.ndarray]]:
    """transformers' unmodified model (``ref.model``) through ``model.generate``, each row alone on the
    reference's pre-processed inputs with the placeholder expanded to the image's span: the generated
    tokens (up to and including a stop token) and the first step's logits (V,). The generation settings
    are the reference's: greedy, the same stop tokens, nothing else; the checkpoint's
    ``generation_config`` (a repetition penalty, sampling, suppressed tokens, a minimum length) is set
    aside for the call."""
    from transformers import GenerationConfig

    from star_export.families import family_named

    geo, pre, model = ref.geo, ref.pre, ref.model
    family = family_named(geo.arch)
    stops = [t for t in (pre.eos_token_id,) if t is not None]
    feeds = pre.encode(list(images), list(prompts))
    dtype = next(model.parameters()).dtype
    greedy = GenerationConfig(
        do_sample=False,
        num_beams=1,
        eos_token_id=stops or None,
        pad_token_id=pre.pad_token_id,
        bos_token_id=model.generation_config.bos_token_id,
    )
    checkpoints = model.generation_config
    model.generation_config = greedy  # generate fills what a call leaves unset from it
    try:
        return [
            _hf_row(model, family, geo, feeds, b, dtype, stops, max_new_tokens) for b in range(len(prompts))
        ]
    finally:
        model.generation_config = checkpoints


def _hf_row(
    model: Any, family: Any, geo: Any, feeds: dict[str, Any], b: int, dtype: Any, stops: list[int], new: int
) -> tuple[list[int], np.ndarray]:
    import torch

    ids = [int(x) for x, m in zip(feeds["input_ids"][b], feeds["attention_mask"][b], strict=True) if m]
    inputs = family.hf_inputs(model, geo, torch.from_numpy(feeds["pixel_values"][b]).to(dtype), ids)
    input_ids = inputs["input_ids"]
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=new, output_logits=True, return_dict_in_generate=True)
    tokens = [int(t) for t in gen.sequences[0, input_ids.shape[1] :]]
    end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:end], gen.logits[0][0].float().numpy()


def unpruned_source(pipe: Any) -> str:
    """What the "unpruned" row compares with the reference: ``export`` (the export's keep = N level),
    ``transformers`` (the unmodified model) or ``none`` (neither available for this family)."""
    if pipe.geo.n_visual in pipe.keeps:
        return "export"
    from star_export.families import family_named

    return "transformers" if family_named(pipe.geo.arch).has_hf_inputs else "none"


def _sides(
    out: Any, refs: list[dict[str, Any]], ref_first: np.ndarray, batch: list[Example]
) -> list[dict[str, Any]]:
    """Each row of one ``Pipeline.generate`` answer (``out``, step logits kept) against the reference."""
    r, timing = out.result, _timing(out.result)
    return [
        side(out.answers[b], r.tokens[b], r.step_logits[0][b], refs[b], ref_first[b], e, timing)
        for b, e in enumerate(batch)
    ]


def measure_batch(
    pipe: Any,
    ref: Any,
    batch: list[Example],
    keeps: Sequence[int],
    source: str,
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """The rows of one batch: the reference, the unpruned comparison and every keep level."""
    images, prompts = [e.image for e in batch], [e.question for e in batch]
    n = pipe.geo.n_visual

    def run(p: Any, keep: int | None) -> Any:
        return p.generate(images, prompts, max_new_tokens=max_new_tokens, keep=keep, keep_logits=True)

    r = run(ref, None)
    ref_first = r.result.step_logits[0]  # (B, V)
    timing = dict(zip(("prefill_ms", "decode_ms_per_token"), _timing(r.result), strict=True))
    refs = [{"answer": a, "tokens": t, **timing} for a, t in zip(r.answers, r.result.tokens, strict=True)]
    rows = [{**e.to_dict(), "reference": refs[b], "levels": {}} for b, e in enumerate(batch)]
    if source == "export":
        for b, one in enumerate(_sides(run(pipe, n), refs, ref_first, batch)):
            rows[b]["unpruned"] = one
    elif source == "transformers":
        for b, (tokens, first) in enumerate(hf_generate(ref, images, prompts, max_new_tokens)):
            answer = ref.pre.decode(tokens)
            rows[b]["unpruned"] = side(answer, tokens, first, refs[b], ref_first[b], batch[b], (None, None))
    for keep in keeps:
        if keep != n:
            for b, one in enumerate(_sides(run(pipe, keep), refs, ref_first, batch)):
                rows[b]["levels"][str(keep)] = one
    return rows


def run_examples(
    pipe: Any,
    ref: Any,
    examples: list[Example],
    settings: dict[str, Any],
    out: Path,
    done: list[dict[str, Any]],
    log: Log = quiet,
) -> list[dict[str, Any]]:
    """Every example not in ``done`` (by id), appended to ``out``/rows.jsonl batch by batch; returns all
    rows (``done`` first)."""
    seen = {row["id"] for row in done}
    todo = [e for e in examples if e.id not in seen]
    source = unpruned_source(pipe)
    path = out / ROWS
    out.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        path.write_text(json.dumps({"settings": settings}) + "\n")
    rows = list(done)
    if done:
        log(f"      --resume: {len(done)} examples already in {path}, {len(todo)} to run")
    eta = Eta(len(todo), log)
    try:
        with path.open("a") as f:
            for batch in batches(todo, settings["batch_size"]):
                new = measure_batch(pipe, ref, batch, settings["keeps"], source, settings["max_new_tokens"])
                f.writelines(json.dumps(row) + "\n" for row in new)
                f.flush()
                rows.extend(new)
                eta.advance(len(batch))
    finally:
        eta.close()
    return rows
