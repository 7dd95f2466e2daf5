"""``eval``: what pruning costs in answers, each keep level of an export vs the unpruned model on a
question set (:mod:`star_export.evaluate`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from star_export.commands.argtypes import add_from, integer, integers

NAME = "eval"
HELP = "what pruning costs in answers: each keep level vs the unpruned model on your images and questions"
DESCRIPTION = (
    "Answer every question of --data (greedy) with the unpruned reference (the PyTorch rewrite "
    "of the export's checkpoint at keep1 = keep2 = N) and with each keep level of --from; print per level "
    "answer and first-token agreement with the reference, the first token's KL, accuracy against the "
    "data's answers (VQA accuracy on rows with several, exact match on rows with one) and median latencies; write rows.jsonl (row by row, --resume continues it), "
    "eval.json and eval.png into --out. The 'unpruned' row is the export's own keep = N level (export "
    "with --keep ...,N) or, without one, transformers' unmodified model, against the reference."
)
EPILOG = """\
examples:
  python -m star_export llava --keep 64,128,576 --out star_out
  python -m star_export eval --from star_out --data examples/eval/questions.jsonl --out eval_out
      keep 64 and 128 vs the unpruned reference; the keep 576 level is the 'unpruned' row
  python -m star_export eval --from star_out --data llava-bench.jsonl --image-root images/ --limit 50
"""


def add_arguments(e: argparse.ArgumentParser) -> None:
    add_from(e, help="an export directory")
    e.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE",
        help="LLaVA's question JSONL (question_id, image, text[, answer|answers|gt_answer]), a JSONL of "
        "image, question[, answer...] or a CSV with image, question[, answer|answers (a|b)] columns",
    )
    e.add_argument("--keep", type=integers, default=None, metavar="K2[,K2...]", help="levels (default: all)")
    e.add_argument("--limit", type=integer, default=None, metavar="N", help="the first N examples only")
    e.add_argument("--out", type=Path, default=Path("eval_out"), metavar="DIR", help="default eval_out/")
    e.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime", help="of the levels")
    e.add_argument("--image-root", type=Path, default=None, metavar="DIR", help="images relative to DIR")
    e.add_argument("--resume", action="store_true", help="continue --out's run (same settings)")
    e.add_argument("--skip-bad", action="store_true", help="report bad rows and run the rest")
    e.add_argument("--max-new-tokens", type=integer, default=16, metavar="N", help="default 16")
    e.add_argument(
        "--batch-size", type=integer, default=1, metavar="B", help="examples per request (default 1)"
    )


def run(args: argparse.Namespace) -> int:
    from star_export.evaluate import run as evaluate

    report = evaluate(
        args.from_dir,
        args.data,
        keeps=args.keep,
        limit=args.limit,
        out=args.out,
        runtime=args.runtime,
        image_root=args.image_root,
        resume=args.resume,
        skip_bad=args.skip_bad,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(report.format())
    print(f"wrote {report.files['rows']}, {report.files['json']}, {report.files['plot']}")
    return 0
