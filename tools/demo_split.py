"""Write a split of the demo question set (star_export/demo/scenes.py) as PNGs and a questions.jsonl
in LLaVA's evaluation format, which ``eval --data`` and ``compare --data`` read.

    python tools/demo_split.py --out demo_test                       # the test split, 600 questions
    python -m star_export eval --from out --data demo_test/questions.jsonl

Seeded: the same (seed, split, index) always draws the same scene and question, on any machine.
"""

from __future__ import annotations

import argparse
import sys

from star_export.demo import scenes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write (images/ and questions.jsonl)")
    p.add_argument("--split", default="test", choices=list(scenes.SPLITS), help="default test")
    p.add_argument("--count", type=int, default=600, help="questions (default 600: 100 per kind)")
    p.add_argument("--seed", type=int, default=0, help="default 0, the shipped model's")
    p.add_argument("--size", type=int, default=168, help="image side in pixels (default 168, the demo's)")
    args = p.parse_args(argv)
    if args.count < 1 or args.size < 16:
        print("demo_split: --count must be >= 1 and --size >= 16", file=sys.stderr)
        return 2
    path = scenes.write_split(args.out, args.seed, args.split, args.count, args.size)
    print(f"wrote {path} ({args.count} questions, {args.split} split, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
