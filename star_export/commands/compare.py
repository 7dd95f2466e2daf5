"""``compare``: STAR against the selections a user would otherwise try, at several keeps, on one
question set (:mod:`star_export.bench.methods`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from star_export.commands.argtypes import integer, integers

NAME = "compare"
HELP = "what STAR's choice is worth: STAR vs random, stride, stage-1-only and stage-2-only selections"
DESCRIPTION = (
    "Export --model once per method (each keep a level; the same static graphs: a TopK with a literal K "
    "and a Gather), answer --data with each (eval), and print one table per method and keep: accuracy "
    "with a 95 % Wilson interval, answer agreement with the unpruned reference, the first token's KL, "
    "median prefill latency. Methods: star (keep1 = min(N, 2 keep)), stage1-only (keep1 = keep, "
    "VisionZip-like), stage2-only (keep1 = N, FastV-like at layer K), random (seeded, image-blind), "
    "stride (every N/keep-th token), inverted (the lowest STAR scores: a deliberately wrong selection). "
    "Writes methods.json, methods.png and each method's export and eval into --out."
)
EPILOG = """\
examples:
  python -m star_export compare --model ckpt/ --data q.jsonl --keep 144,96,64,32,16,8
  python -m star_export compare --model ckpt/ --data q.jsonl --keep 64 --methods star,inverted --limit 100
"""


def add_arguments(c: argparse.ArgumentParser) -> None:
    from star_export.bench.methods import DEFAULT_METHODS, METHODS

    c.add_argument(
        "--model",
        required=True,
        metavar="DIR|HUB_ID|demo:NAME",
        help="a checkpoint directory, a hub id in the local Hugging Face cache, or a shipped demo "
        "(demo:llava-demo, demo:qwen3-vl-demo)",
    )
    c.add_argument("--data", type=Path, required=True, metavar="FILE", help="a question file, as for eval")
    c.add_argument("--keep", type=integers, required=True, metavar="K[,K...]", help="keeps to compare")
    c.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        metavar="M[,M...]",
        help=f"of {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})",
    )
    c.add_argument(
        "--layer", type=integer, default=None, metavar="K", help="stage 2's layer (default the model's)"
    )
    c.add_argument("--limit", type=integer, default=None, metavar="N", help="the first N questions only")
    c.add_argument(
        "--out", type=Path, default=Path("compare_out"), metavar="DIR", help="default compare_out/"
    )


def run(args: argparse.Namespace) -> int:
    from star_export.bench.methods import compare, format_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = compare(
        args.model,
        args.data,
        keeps=args.keep,
        methods=methods,
        out=args.out,
        limit=args.limit,
        layer=args.layer,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(format_table(result))
    print(f"wrote {args.out / 'methods.json'} and {args.out / 'methods.png'}")
    return 0
