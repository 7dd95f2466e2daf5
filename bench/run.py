"""Run the STAR speed benchmark: ``python bench/run.py [--recipe llava-bench] [--keep 64,128,192] ...``.

A thin wrapper of ``star_export.bench`` (the same flags as ``python -m star_export bench``).
"""

from __future__ import annotations

import argparse
import sys

from star_export.bench import DESCRIPTION, EPILOG, add_bench_arguments, run_bench_cli
from star_export.errors import MissingComponent, UsageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_bench_cli(args)
    except (UsageError, MissingComponent) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":  # guard: export workers are spawned processes that import this module
    sys.exit(main())
